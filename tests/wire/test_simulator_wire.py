"""The simulator as a real process (the `streamgate-sim` console script) seen from the wire."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from streamgate.doctor.probe import decode_chunked
from streamgate.simulator.script import expected_text
from support import sdk, sse
from support.sim_capacity import SimulatorProcess, run_capacity_check

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
        response = httpx.post(process.url + "/v1/chat/completions", json={"messages": []})
        elapsed = time.monotonic() - started
    assert response.json()["choices"][0]["message"]["content"] == expected_text(7)
    assert elapsed >= 0.3


def test_tokens_arrive_one_read_each_at_the_configured_pace():
    """The contract defaults on the wire: 50 tokens 20 ms apart after 50 ms, each its own read."""
    result = run_capacity_check(streams=10, tokens=50, gap_ms=20, ttft_ms=50, timeout_s=20)
    assert result.completed == 10, result.errors
    assert result.reads_per_stream_min >= 45, result.summary()
    assert result.spread_min_ms >= 800, result.summary()
    assert result.ttft_max_ms <= 50 + 50, result.summary()


def test_a_slow_first_token_is_slow_on_the_wire():
    """Negative control for the pace check: the configured TTFT is what the client sees."""
    result = run_capacity_check(streams=2, tokens=5, gap_ms=20, ttft_ms=400, timeout_s=20)
    assert result.completed == 2
    assert result.ttft_p50_ms >= 400


def _open_stream(process: SimulatorProcess, model: str, request_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", process.port), timeout=5)
    body = b'{"stream": true, "model": "%b"}' % model.encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n"
        b"x-request-id: %b\r\ncontent-length: %d\r\n\r\n%b" % (request_id.encode(), len(body), body)
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
    answers = asyncio.run(
        sdk.streamed_and_whole(
            sim_process.url,
            streamed={"stream_options": {"include_usage": True}},
            whole={"max_tokens": 12},
        )
    )
    assert answers.streamed == expected_text(50)  # the contract's default length
    assert answers.usage_tokens == 50
    assert answers.whole == expected_text(12)


def test_sigterm_stops_the_process_promptly_even_with_streams_open():
    with SimulatorProcess(["--stall-s", "600"]) as process:
        sock = _open_stream(process, "sim-fault-stall-first", "rid-term")
        started = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        assert process.process is not None
        assert process.process.popen.wait(timeout=5) == 0
        assert time.monotonic() - started < 5
        sock.close()


# -- bounds: a client that writes without reading --------------------------------------------

PIPELINE_BYTES = 4 * 1024 * 1024
PIPELINES = {
    # each answered over ~1 s: the requests behind the first one wait in the simulator
    "streams": b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: "
    b'application/json\r\ncontent-length: 16\r\n\r\n{"stream": true}',
    # answered at once: the answers pile up, unread, in the simulator's write buffer
    "health-checks": b"GET /healthz HTTP/1.1\r\nhost: sim\r\n\r\n",
}


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _write_without_reading(port: int, data: bytes, limit_s: float) -> tuple[socket.socket, int]:
    """Write data without ever reading; stops when a write blocks for a while (back-pressure)
    or after limit_s. Returns the open socket and how much was written."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=0.3)
    view = memoryview(data)
    sent = 0
    deadline = time.monotonic() + limit_s
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(view[sent : sent + 65536])
        except TimeoutError:
            break
    return sock, sent


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_a_pipeline_written_without_reading_keeps_the_simulator_small(kind):
    request = PIPELINES[kind]
    with SimulatorProcess(["--stall-s", "600"]) as process:
        # warm up the paths the pipeline takes, so that what grows afterwards is the pipeline
        assert httpx.get(process.url + "/healthz").status_code == 200
        streamed = httpx.post(
            process.url + "/v1/chat/completions", json={"stream": True, "max_tokens": 2}
        )
        assert streamed.content.endswith(b"data: [DONE]\n\n")
        before_kib = _memory_kib(process.pid, "VmRSS")
        data = request * (PIPELINE_BYTES // len(request))
        sock, sent = _write_without_reading(process.port, data, limit_s=1.5)
        try:
            time.sleep(0.3)  # let the simulator take in whatever it is going to take in
            grew_kib = _memory_kib(process.pid, "VmHWM") - before_kib
            # still serving other clients meanwhile
            assert httpx.get(process.url + "/healthz").json() == {"status": "ok"}
        finally:
            sock.close()
    assert grew_kib < 3 * 1024, (
        f"{kind}: the simulator grew by {grew_kib} KiB while a client wrote {sent} bytes "
        "of pipelined requests without reading"
    )


def test_a_bad_request_pipelined_behind_a_stream_waits_for_its_end(sim_process):
    """The console script's loop (uvloop when installed) as well: the 400 follows the stream."""
    good = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json"
        b'\r\ncontent-length: 33\r\n\r\n{"stream": true, "max_tokens": 5}'
    )
    with socket.create_connection(("127.0.0.1", sim_process.port), timeout=3) as sock:
        sock.sendall(good + b"GARBAGE\r\n\r\n")
        raw = b""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            piece = sock.recv(65536)
            if not piece:
                break
            raw += piece
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    stream_end = body.find(b"0\r\n\r\n")
    error_at = body.find(b"HTTP/1.1 400 Bad Request")
    assert -1 < stream_end < error_at, raw
    decoded = decode_chunked(body[: stream_end + 5])
    assert decoded.endswith(b"data: [DONE]\n\n")
    chunks = [event.json() for event in sse.parse(decoded).events if event.data != "[DONE]"]
    content = "".join(
        chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]
    )
    assert content == expected_text(5)
    assert b"connection: close" in body[error_at:]
