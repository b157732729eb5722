"""The simulator as a real process (the `streamgate-sim` console script) seen from the wire."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time

import httpx
import openai
import pytest
from streamgate.simulator.capacity import SimulatorProcess, run_capacity_check
from streamgate.simulator.script import expected_text

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sim_process():
    """Contract defaults except a stall long enough to outlast any test."""
    with SimulatorProcess(["--stall-s", "600"]) as process:
        yield process


def test_the_console_script_prints_its_address_and_answers(sim_process):
    assert SimulatorProcess.command()[0].endswith("streamgate-sim")
    assert sim_process.url.startswith("http://127.0.0.1:")
    assert httpx.get(sim_process.url + "/healthz").json() == {"status": "ok"}


def test_a_taken_port_is_a_clear_error(sim_process):
    completed = subprocess.run(
        [*SimulatorProcess.command(), "--port", str(sim_process.port)],
        capture_output=True,
        check=False,
        text=True,
        timeout=20,
    )
    assert completed.returncode == 1
    assert f"cannot listen on 127.0.0.1:{sim_process.port}" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_bad_flag_stops_the_process_with_the_reason():
    with pytest.raises(RuntimeError, match=r"--tokens: 0 outside 1\.\.16384"):
        SimulatorProcess(["--tokens", "0"]).start()


def test_environment_variables_configure_the_process():
    env = {**os.environ, "STREAMGATE_SIM_TOKENS": "7", "STREAMGATE_SIM_TTFT_MS": "300"}
    with SimulatorProcess(env=env) as process:
        started = time.monotonic()
        response = httpx.post(
            process.url + "/v1/chat/completions", json={"messages": []}
        )
        elapsed = time.monotonic() - started
    assert response.json()["choices"][0]["message"]["content"] == expected_text(7)
    assert elapsed >= 0.3


def test_tokens_arrive_one_read_each_at_the_configured_pace():
    """The contract defaults on the wire: 50 tokens 20 ms apart after 50 ms, each its own read."""
    result = run_capacity_check(
        streams=10, tokens=50, gap_ms=20, ttft_ms=50, timeout_s=20
    )
    assert result.completed == 10, result.errors
    assert result.reads_per_stream_min >= 45, result.summary()
    assert result.spread_min_ms >= 800, result.summary()
    assert result.ttft_max_ms <= 50 + 50, result.summary()


def test_a_slow_first_token_is_slow_on_the_wire():
    """Negative control for the pace check: the configured TTFT is what the client sees."""
    result = run_capacity_check(
        streams=2, tokens=5, gap_ms=20, ttft_ms=400, timeout_s=20
    )
    assert result.completed == 2
    assert result.ttft_p50_ms >= 400


def _open_stream(
    process: SimulatorProcess, model: str, request_id: str
) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", process.port), timeout=5)
    body = b'{"stream": true, "model": "%b"}' % model.encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n"
        b"x-request-id: %b\r\ncontent-length: %d\r\n\r\n%b"
        % (request_id.encode(), len(body), body)
    )
    received = b""
    wanted = b"200 OK" if model == "sim-fault-stall-first" else b'"content":"ing "'
    while wanted not in received:
        received += sock.recv(65536)
    return sock


def _poll_stats(process: SimulatorProcess, condition, timeout_s: float = 3.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = process.stats()
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, f"stats never matched: {stats}"
        time.sleep(0.005)


@pytest.mark.parametrize("model", ["streamgate-sim", "sim-fault-stall-first"])
def test_a_disconnect_is_on_record_within_100_ms_across_processes(sim_process, model):
    """What gateway tests rely on: last_cancel_at is wall-clock time, comparable to ours."""
    sim_process.reset_stats()
    sock = _open_stream(sim_process, model, f"rid-{model}")
    time.sleep(0.1)
    closed_at = time.time()
    sock.close()
    stats = _poll_stats(sim_process, lambda s: s["cancelled"] == 1)
    assert 0 <= stats["last_cancel_at"] - closed_at < 0.1
    assert stats["recent_cancels"][-1]["request_id"] == f"rid-{model}"
    assert (stats["started"], stats["completed"], stats["active"]) == (1, 0, 0)


def test_an_open_stream_is_active_not_cancelled(sim_process):
    """Negative control: a stalled client that is still connected is not counted cancelled."""
    sim_process.reset_stats()
    sock = _open_stream(sim_process, "sim-fault-stall-first", "rid-open")
    try:
        time.sleep(0.2)
        stats = sim_process.stats()
        assert (stats["active"], stats["cancelled"]) == (1, 0)
    finally:
        sock.close()
    _poll_stats(sim_process, lambda s: s["cancelled"] == 1)


def test_async_openai_sdk_against_the_process(sim_process):
    async def run() -> tuple[str, str, int]:
        async with openai.AsyncOpenAI(
            base_url=sim_process.url + "/v1", api_key="unused", max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "hello"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            whole = await client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=12,
            )
        streamed = "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices
        )
        return (
            streamed,
            whole.choices[0].message.content,
            chunks[-1].usage.completion_tokens,
        )

    streamed, whole, usage_tokens = asyncio.run(run())
    assert streamed == expected_text(50)
    assert usage_tokens == 50
    assert whole == expected_text(12)


def test_sigterm_stops_the_process_promptly_even_with_streams_open():
    with SimulatorProcess(["--stall-s", "600"]) as process:
        sock = _open_stream(process, "sim-fault-stall-first", "rid-term")
        started = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        assert process.popen is not None
        assert process.popen.wait(timeout=5) == 0
        assert time.monotonic() - started < 5
        sock.close()
