"""Every stream ends: clients that trickle their request or stop reading their answer are cut.

Real gunicorn (the deployed worker class), real sockets. Proof from both ends: what the client's
socket sees (a 408, a close), the simulator's record that the upstream request was cancelled,
and the gateway's access-log line for the request id. Memory per stream is measured with
clients that never read (the worker's RSS while their streams are held).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pytest
from support.procs import wait_until

HEAD_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.5
SEND_TIMEOUT_S = 1.0
TOTAL_TIMEOUT_S = 3.0
LATE_TOLERANCE_S = 2.0  # timers fire on a shared machine's event loop: late, never early
SILENT_CLIENTS = 16
MEMORY_SEND_TIMEOUT_S = 5.0
MAX_BYTES_PER_HELD_STREAM = 1024 * 1024
CLIENT_RCVBUF = 4096


@pytest.fixture(scope="module")
def fast_simulator(simulator_factory):
    """Long, fast answers (16 s at 1 ms a token): a client that does not read falls behind at
    once, and the answer is still running upstream when the gateway cuts it."""
    return simulator_factory(ttft_ms=10, gap_ms=1, tokens=16384)


@pytest.fixture(scope="module")
def deadline_gateway(gateway_factory, fast_simulator):
    return gateway_factory(
        fast_simulator,
        workers=1,
        request_head_timeout_s=HEAD_TIMEOUT_S,
        request_body_timeout_s=BODY_TIMEOUT_S,
        send_timeout_s=SEND_TIMEOUT_S,
        total_timeout_s=TOTAL_TIMEOUT_S,
    )


def request_bytes(port: int, request_id: str, body: bytes | None = None) -> bytes:
    body = (
        body
        if body is not None
        else json.dumps(
            {
                "messages": [{"role": "user", "content": "a long answer please"}],
                "stream": True,
                "max_tokens": 16384,
            }
        ).encode()
    )
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, set before connecting: the gateway's writes back up at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes: (bytes, seconds it took)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the gateway kept the connection open for {timeout_s} s: {received[:200]!r}")
    return received, time.monotonic() - started


def cancelled(simulator, request_id: str) -> dict | None:
    return next(
        (c for c in simulator.stats()["recent_cancels"] if c["request_id"] == request_id), None
    )


def logged(gateway, request_id: str) -> dict:
    return wait_until(
        lambda: gateway.access_record(request_id),
        timeout_s=5,
        what=f"the access-log line of {request_id}",
    )


def test_a_request_head_that_trickles_gets_a_408_and_the_connection_closes(deadline_gateway):
    sock = connect(deadline_gateway.port)
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and no more
        received, took = read_until_closed(sock, HEAD_TIMEOUT_S + LATE_TOLERANCE_S + 2)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert json.loads(received.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert HEAD_TIMEOUT_S - 0.05 <= took <= HEAD_TIMEOUT_S + LATE_TOLERANCE_S


def test_a_connection_that_sends_nothing_is_closed(deadline_gateway):
    with connect(deadline_gateway.port) as sock:
        received, took = read_until_closed(sock, HEAD_TIMEOUT_S + LATE_TOLERANCE_S + 2)
    assert received == b""
    assert HEAD_TIMEOUT_S - 0.05 <= took <= HEAD_TIMEOUT_S + LATE_TOLERANCE_S


def test_a_request_body_that_trickles_gets_a_408_that_the_log_records(deadline_gateway):
    request_id = f"wire-body-trickle-{uuid.uuid4().hex[:8]}"
    whole = request_bytes(deadline_gateway.port, request_id)
    with connect(deadline_gateway.port) as sock:
        sock.sendall(whole[:-20])  # the head and most of the body; the last 20 bytes never come
        received, took = read_until_closed(sock, BODY_TIMEOUT_S + LATE_TOLERANCE_S + 10)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert BODY_TIMEOUT_S - 0.05 <= took <= BODY_TIMEOUT_S + LATE_TOLERANCE_S
    assert logged(deadline_gateway, request_id)["status"] == 408


def test_a_client_that_stops_reading_is_cut_and_its_upstream_released(
    deadline_gateway, fast_simulator
):
    request_id = f"wire-never-reads-{uuid.uuid4().hex[:8]}"
    with connect(deadline_gateway.port) as sock:
        sock.sendall(request_bytes(deadline_gateway.port, request_id))
        started = time.monotonic()
        wait_until(
            lambda: cancelled(fast_simulator, request_id),
            timeout_s=SEND_TIMEOUT_S + LATE_TOLERANCE_S + 3,
            interval_s=0.05,
            what="the upstream request's cancel",
        )
        took = time.monotonic() - started
    assert SEND_TIMEOUT_S <= took <= SEND_TIMEOUT_S + LATE_TOLERANCE_S + 3
    assert logged(deadline_gateway, request_id)["outcome"] == "send_timeout"


def test_control_a_slow_but_steady_reader_is_not_cut(deadline_gateway, fast_simulator):
    """The send timeout cuts clients that take nothing, not slow ones: this one reads 10 KB/s,
    far behind the answer, and keeps its stream until total time ends it (its upstream is
    released then, as the total timeout promises)."""
    request_id = f"wire-slow-reader-{uuid.uuid4().hex[:8]}"
    with connect(deadline_gateway.port) as sock:
        sock.sendall(request_bytes(deadline_gateway.port, request_id))
        started = time.monotonic()
        while not cancelled(fast_simulator, request_id):
            elapsed = time.monotonic() - started
            assert elapsed < TOTAL_TIMEOUT_S + LATE_TOLERANCE_S + 2, "total time did not end it"
            assert sock.recv(2048), f"cut after {elapsed:.2f} s"
            time.sleep(0.2)
        ended = time.monotonic() - started
    assert TOTAL_TIMEOUT_S - 0.3 <= ended <= TOTAL_TIMEOUT_S + LATE_TOLERANCE_S + 2
    assert logged(deadline_gateway, request_id)["outcome"] in ("timeout", "upstream_error")


def worker_rss_bytes(gateway) -> int:
    """Resident memory of the gateway's one worker (a child of the gunicorn arbiter)."""
    master = gateway.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_per_stream_held_by_clients_that_never_read_is_bounded(
    gateway_factory, fast_simulator, capsys
):
    gateway = gateway_factory(fast_simulator, workers=1, send_timeout_s=MEMORY_SEND_TIMEOUT_S)
    warm_up = f"wire-memory-warmup-{uuid.uuid4().hex[:8]}"
    with connect(gateway.port) as sock:  # a stream first (imports, pools, caches), hung up
        sock.sendall(request_bytes(gateway.port, warm_up))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    wait_until(lambda: cancelled(fast_simulator, warm_up), timeout_s=5, what="warm-up end")
    baseline = worker_rss_bytes(gateway)

    request_ids = [f"wire-memory-{n}-{uuid.uuid4().hex[:8]}" for n in range(SILENT_CLIENTS)]
    sockets = [connect(gateway.port) for _ in request_ids]
    try:
        for sock, request_id in zip(sockets, request_ids, strict=True):
            sock.sendall(request_bytes(gateway.port, request_id))
        time.sleep(MEMORY_SEND_TIMEOUT_S / 2)  # every buffer on the way is full by now
        held = worker_rss_bytes(gateway)
        stats = fast_simulator.stats()
        assert not any(cancelled(fast_simulator, r) for r in request_ids), stats["recent_cancels"]
        per_stream = (held - baseline) / SILENT_CLIENTS
        with capsys.disabled():
            print(
                f"\nworker RSS {baseline / 2**20:.1f} MiB -> {held / 2**20:.1f} MiB with "
                f"{SILENT_CLIENTS} streams nobody reads: {per_stream / 1024:.0f} KiB each"
            )
        assert per_stream <= MAX_BYTES_PER_HELD_STREAM
        for request_id in request_ids:
            wait_until(
                lambda r=request_id: cancelled(fast_simulator, r),
                timeout_s=MEMORY_SEND_TIMEOUT_S + LATE_TOLERANCE_S + 3,
                interval_s=0.05,
                what=f"the cancel of {request_id}",
            )
            assert logged(gateway, request_id)["outcome"] == "send_timeout"
    finally:
        for sock in sockets:
            sock.close()
