"""Reloads under load, through nginx: a changed setting reaches every worker and no stream is lost.

30 closed-loop streams (OpenAI route, 50 tokens 20 ms apart: about 1 s each) through nginx to a
two-worker gateway. A HUP of the gateway (what the app role's reload does for a changed setting)
and a HUP of nginx (a changed nginx variable) each run three times; every stream open during one
must end complete and exact, and the p99 time to first token of those streams must stay within
twice its value at rest. The same counters, pointed at a killed worker and at a frozen gateway,
must see the loss and the spike (negative controls).
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
from streamgate.simulator.script import expected_text
from support import services
from support.stream_load import (
    StreamLoad,
    WindowReport,
    assert_nothing_lost,
    at_rest_before,
    spiked,
)

CLIENTS = 30
TOKENS = 50
RELOADS = 3
SETTLE_S = 3.0  # load running before the first operation, and between two
WINDOW_S = 3.0  # streams open within this long after an operation count as "during" it
BODY = json.dumps(
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


@pytest.fixture(scope="module")
def edge(nginx_factory, gateway_factory, simulator):
    """Its own gateway and nginx: reloading them must not disturb other tests."""
    gateway = gateway_factory(simulator, workers=2)
    proxy = nginx_factory(gateway)
    yield gateway, proxy
    proxy.stop()
    gateway.stop()


def run_operations(url: str, operate, times: int = RELOADS) -> tuple[WindowReport, WindowReport]:
    """(at rest, during) for `times` runs of `operate()` under load."""
    load = StreamLoad(url, BODY, clients=CLIENTS, expected_text=expected_text(TOKENS)).start()
    rest, during = [], []
    try:
        time.sleep(SETTLE_S)
        for _ in range(times):
            before = time.monotonic()
            operate()
            rest.append(at_rest_before(before, SETTLE_S))
            during.append((before, before + WINDOW_S))
            time.sleep(WINDOW_S + SETTLE_S)
    finally:
        load.stop()
    return load.report(*rest), load.report(*during)


def test_gateway_reload_loses_no_stream_and_keeps_the_first_token_fast(edge):
    gateway, proxy = edge
    rest, during = run_operations(
        f"{proxy.base_url}/v1/chat/completions", lambda: os.kill(gateway.process.pid, signal.SIGHUP)
    )
    assert_nothing_lost(rest, during, min_streams=RELOADS * CLIENTS)


def test_nginx_reload_loses_no_stream_and_keeps_the_first_token_fast(edge):
    _, proxy = edge
    rest, during = run_operations(
        f"{proxy.base_url}/v1/chat/completions", lambda: os.kill(proxy.process.pid, signal.SIGHUP)
    )
    assert_nothing_lost(rest, during, min_streams=RELOADS * CLIENTS)


def gateway_workers(gateway) -> list[psutil.Process]:
    return psutil.Process(gateway.process.pid).children()


def test_control_a_killed_worker_is_counted_as_lost_streams(edge):
    """The loss counter sees streams cut mid-answer (gunicorn replaces the worker)."""
    gateway, proxy = edge

    def kill_a_worker() -> None:
        time.sleep(0.5)  # into the answers, past the retryable first bytes
        gateway_workers(gateway)[0].send_signal(signal.SIGKILL)

    _, during = run_operations(f"{proxy.base_url}/v1/chat/completions", kill_a_worker, times=1)
    assert during.failed.get("aborted", 0) > 0, during


def test_control_workers_that_import_the_app_after_a_reload_are_a_first_token_spike(
    nginx_factory, gateway_factory, simulator, tmp_path
):
    """The spike check sees the gateway as it was: each new worker imports the app itself while
    the old ones stop accepting (gunicorn.conf.py's import_app_code made a no-op)."""
    conf = tmp_path / "gunicorn-importing-workers.conf.py"
    conf.write_text(
        f"exec(compile(open({str(services.GUNICORN_CONF)!r}).read(), "
        f"{str(services.GUNICORN_CONF)!r}, 'exec'))\n"
        "def import_app_code():\n    pass\n"
    )
    gateway = gateway_factory(simulator, workers=2, gunicorn_conf=conf)
    proxy = nginx_factory(gateway)
    try:
        rest, during = run_operations(
            f"{proxy.base_url}/v1/chat/completions",
            lambda: os.kill(gateway.process.pid, signal.SIGHUP),
        )
    finally:
        proxy.stop()
        gateway.stop()
    assert spiked(rest, during), (rest, during)
