"""No internals to clients: errors in user terms, the detail in the log, no secrets anywhere.

The gateway points at an upstream URL with credentials in it (user:password@) on a loopback
port where nothing listens: the client must read "upstream unreachable" and nothing about the
address; /readyz says ready without the URL; the log has the request's detail (the address,
the transport's words) next to its request id, and never the password.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass

import pytest
from support import chat
from support.procs import free_port, wait_until

PASSWORD = "s3cret-in-the-url"


@dataclass
class Unreachable:
    port: int

    @property
    def base_url(self) -> str:
        return f"http://streamgate:{PASSWORD}@127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def unreachable_gateway(gateway_factory):
    upstream = Unreachable(free_port())  # free a moment ago: nothing listens there
    return gateway_factory(upstream, workers=1, upstream_retries=0), upstream


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_an_unreachable_upstream_is_named_in_user_terms_and_detailed_in_the_log(
    unreachable_gateway, route
):
    gateway, upstream = unreachable_gateway
    request_id, trace = chat.tagged_request(
        gateway,
        route,
        tag="wire-privacy",
        timeout_s=10,
    )
    assert trace.status == 502, (trace.status, trace.body[:300])
    error = chat.json_body(trace)["error"]
    assert error["message"] == "upstream unreachable", error
    for internal in ("127.0.0.1", str(upstream.port), PASSWORD, "streamgate:"):
        assert internal not in trace.body.decode(), internal
    record = wait_until(
        lambda: gateway.access_record(request_id), timeout_s=5, what="the access-log line"
    )
    assert record["status"] == 502 and str(upstream.port) in record["error"], record


def test_readyz_says_ready_without_the_upstream_url(unreachable_gateway):
    gateway, upstream = unreachable_gateway
    with urllib.request.urlopen(f"{gateway.base_url}/readyz", timeout=5) as response:
        body = response.read().decode()
    assert json.loads(body)["status"] == "ready"
    assert "127.0.0.1" not in body and str(upstream.port) not in body and PASSWORD not in body


def test_the_log_never_carries_the_upstream_urls_password(unreachable_gateway):
    gateway, upstream = unreachable_gateway
    chat.request(gateway, chat.TEXT, timeout_s=10)
    log = gateway.process.log_path.read_text(errors="replace")
    assert '"event":"worker_started"' in log  # the settings were logged: the URL was there
    assert f"127.0.0.1:{upstream.port}" in log
    assert PASSWORD not in log
