"""Capacity check: many concurrent streams against one simulator process, measured from outside.

    cd tests && ../.venv/bin/python -m support.sim_capacity --streams 5000 --tokens 50 --gap-ms 20

starts a simulator process (``--port 0``), opens all client connections first, then sends every
request in one burst, so all streams are in flight at once (the simulator's ``peak_active``
proves it). Each client is a raw asyncio Protocol that only timestamps its reads; decoding and
checking the text (every stream must say exactly ``expected_text(tokens)``) happens after the
run. Reported: completed streams, errors, TTFT and inter-token gap percentiles (a gap is the time
between two reads that carry events), reads per stream, the simulator's CPU time (from /proc)
per second of wall time and per chunk, how late its token clock ran, and how long the simulator
and the client waited for a CPU (schedstat): on a shared machine that last figure says whether
late tokens were the simulator's doing or the scheduler's (`oversubscribed`).

``SimulatorProcess`` (start a simulator on a free port, read /stats, stop it) is shared
with the wire tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from streamgate.doctor.probe import decode_chunked
from streamgate.simulator.__main__ import _loop_factory, raise_fd_limit
from streamgate.simulator.script import expected_text

from support import sse
from support.procs import ManagedProcess

LISTENING_PREFIX = "streamgate-sim listening on "
_CHUNKED_END = b"0\r\n\r\n"


class SimulatorProcess:
    """A ``streamgate-sim`` child on a port of its choosing (its URL read from the line it
    logs), run by the tests' process harness (support/procs.py)."""

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.env = env
        self.process: ManagedProcess | None = None
        self.url = ""
        self._log_dir = tempfile.TemporaryDirectory(prefix="streamgate-sim-")

    @staticmethod
    def command() -> list[str]:
        """The installed console script when present, else the module."""
        script = Path(sys.executable).parent / "streamgate-sim"
        return [str(script)] if script.exists() else [sys.executable, "-m", "streamgate.simulator"]

    def start(self, timeout_s: float = 15.0) -> SimulatorProcess:
        argv = [*self.command(), "--host", "127.0.0.1", "--port", "0", *self.args]
        self.process = ManagedProcess("sim", argv, log_dir=Path(self._log_dir.name), env=self.env)
        self.process.start()
        listening = self.process.wait_output(f"^{LISTENING_PREFIX}(\\S+)", timeout_s=timeout_s)
        self.url = listening[1]
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def logs(self) -> str:
        return self.process.logs(tail_chars=1 << 20) if self.process else ""

    def get_json(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self.get_json("/stats")

    def reset_stats(self) -> dict[str, Any]:
        return self.get_json("/stats/reset", method="POST")

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU time of the simulator process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / ticks, int(fields[12]) / ticks

    def peak_rss_mib(self) -> float:
        """The simulator's peak resident memory so far (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def runqueue_wait_seconds(self) -> float:
        """How long the simulator has been ready to run but waiting for a CPU."""
        return _runqueue_wait_seconds(str(self.pid))

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None:
            self.process.stop(term_timeout_s=timeout_s)
        self._log_dir.cleanup()

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _runqueue_wait_seconds(pid: str) -> float:
    """Time a process's main thread spent runnable but not running (/proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


class _StreamClient(asyncio.Protocol):
    """One connection, one request; records every read with its arrival time."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.reads: list[tuple[float, bytes]] = []
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, hold_reads_s: float = 0.0) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(request)
        if hold_reads_s > 0:
            # A reader that looks away, as a buffering hop does: the kernel merges what arrives.
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(hold_reads_s, self.transport.resume_reading)

    def data_received(self, data: bytes) -> None:
        self.reads.append((time.perf_counter(), data))
        self._tail = (self._tail + data)[-len(_CHUNKED_END) :]
        if self._tail == _CHUNKED_END and not self.done.done():
            self.done.set_result(None)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before the end: {exc}"))


def check_stream_body(raw: bytes, tokens: int) -> str | None:
    """None when a raw HTTP response is a complete, exact stream of `tokens`; else what is wrong."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator or not head.startswith(b"HTTP/1.1 200"):
        return f"bad response head: {head[:80]!r}"
    stream = sse.parse(decode_chunked(body))
    if not stream.events or stream.events[-1].data != "[DONE]" or stream.unterminated:
        return "stream does not end with data: [DONE]"
    content = []
    finish = None
    for event in stream.events[:-1]:
        chunk = orjson.loads(event.data)
        for choice in chunk["choices"]:
            content.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    if finish != "stop":
        return f"finish_reason {finish!r}"
    if "".join(content) != expected_text(tokens):
        return "content differs from expected_text"
    return None


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class CapacityResult:
    streams: int
    tokens: int
    gap_ms: float
    ramp_s: float = 0.0
    completed: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    peak_active: int = 0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    gap_p50_ms: float = 0.0
    gap_p99_ms: float = 0.0
    gap_max_ms: float = 0.0
    ttft_max_ms: float = 0.0
    spread_min_ms: float = 0.0
    reads_per_stream_min: int = 0
    reads_per_stream_median: float = 0.0
    wall_s: float = 0.0
    sim_cpu_s: float = 0.0
    sim_user_s: float = 0.0
    sim_system_s: float = 0.0
    sim_cpu_per_wall: float = 0.0
    sim_cpu_us_per_chunk: float = 0.0
    client_cpu_s: float = 0.0
    sim_clock_lag_p99_ms: float = 0.0
    sim_runqueue_wait_s: float = 0.0
    client_runqueue_wait_s: float = 0.0
    sim_peak_rss_mib: float = 0.0
    sim_clock_lag_max_ms: float = 0.0

    def summary(self) -> str:
        return json.dumps(asdict(self), indent=1)


async def _run_streams(url: str, streams: int, tokens: int, connect_concurrency: int):
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = orjson.dumps(
        {
            "model": "streamgate-sim",
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "capacity check"}],
        }
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
    )
    limiter = asyncio.Semaphore(connect_concurrency)

    async def connect() -> tuple[_StreamClient, asyncio.Future[None]]:
        done: asyncio.Future[None] = loop.create_future()
        async with limiter:
            _, client = await loop.create_connection(lambda: _StreamClient(done), host, int(port))
        return client, done

    connected = await asyncio.gather(*(connect() for _ in range(streams)))
    return connected, request


async def _send_and_wait(
    connected: list[tuple[_StreamClient, asyncio.Future[None]]],
    request: bytes,
    ramp_s: float,
    timeout_s: float,
    hold_reads_s: float = 0.0,
) -> list[BaseException | None]:
    """Send every request, spread over `ramp_s` in 1 ms slots; wait for every response."""
    # Streams in steady state run at random phases; a ramp of 0 sends all at once (harshest).
    slots = max(1, int(ramp_s * 1000))
    per_slot = -(-len(connected) // slots)
    loop = asyncio.get_running_loop()
    first_slot_at = loop.time()
    for slot, offset in enumerate(range(0, len(connected), per_slot)):
        await asyncio.sleep(max(0.0, first_slot_at + slot / 1000 - loop.time()))
        for client, _ in connected[offset : offset + per_slot]:
            client.send(request, hold_reads_s)
    waits = [done for _, done in connected]
    try:
        return await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout_s)
    except TimeoutError:
        return [
            (done.exception() or None) if done.done() else TimeoutError("unfinished")
            for done in waits
        ]


def _verdict(client: _StreamClient, outcome: BaseException | None, tokens: int) -> str | None:
    if outcome is not None:
        return repr(outcome)
    try:
        return check_stream_body(b"".join(data for _, data in client.reads), tokens)
    except (ValueError, KeyError, TypeError) as error:  # orjson's decode error is a ValueError
        return f"undecodable response: {error!r}"


def run_capacity_check(
    streams: int = 5000,
    tokens: int = 50,
    gap_ms: float = 20.0,
    ttft_ms: float = 50.0,
    timeout_s: float = 40.0,
    connect_concurrency: int = 256,
    ramp_s: float | None = None,
    hold_reads_s: float = 0.0,
) -> CapacityResult:
    """Start a simulator, run `streams` concurrent streams through it once, measure.

    `hold_reads_s` > 0 makes every client stop reading that long after its request (the negative
    control: tokens then coalesce whatever the simulator does).
    """
    raise_fd_limit()
    ramp_s = gap_ms / 1000 if ramp_s is None else ramp_s
    result = CapacityResult(streams=streams, tokens=tokens, gap_ms=gap_ms, ramp_s=ramp_s)
    sim_args = ["--ttft-ms", str(ttft_ms), "--gap-ms", str(gap_ms), "--tokens", str(tokens)]
    with SimulatorProcess(sim_args) as sim, asyncio.Runner(loop_factory=_loop_factory()) as runner:
        connected, request = runner.run(_run_streams(sim.url, streams, tokens, connect_concurrency))
        # A connection the kernel completed but the simulator has not accepted yet would start
        # late (or after a SYN-ACK retransmit, seconds late): wait until it holds them all.
        deadline = time.monotonic() + 10
        while sim.stats()["connections_open"] < streams and time.monotonic() < deadline:
            time.sleep(0.01)
        sim.reset_stats()
        cpu_before = sim.cpu_seconds()
        wait_before = sim.runqueue_wait_seconds()
        client_wait_before = _runqueue_wait_seconds("self")
        client_cpu_before = time.process_time()
        started = time.perf_counter()
        gc.disable()  # the reads lists grow by the thousand: no collector pauses while measuring
        try:
            outcomes = runner.run(
                _send_and_wait(connected, request, ramp_s, timeout_s, hold_reads_s)
            )
        finally:
            gc.enable()
        result.wall_s = time.perf_counter() - started
        cpu_after = sim.cpu_seconds()
        result.sim_runqueue_wait_s = sim.runqueue_wait_seconds() - wait_before
        result.client_runqueue_wait_s = _runqueue_wait_seconds("self") - client_wait_before
        result.client_cpu_s = time.process_time() - client_cpu_before
        sim_stats = sim.stats()
        result.sim_peak_rss_mib = sim.peak_rss_mib()
        for client, _ in connected:
            if client.transport is not None:
                client.transport.abort()
    result.sim_user_s = cpu_after[0] - cpu_before[0]
    result.sim_system_s = cpu_after[1] - cpu_before[1]
    result.sim_cpu_s = result.sim_user_s + result.sim_system_s
    result.sim_cpu_per_wall = result.sim_cpu_s / result.wall_s
    result.sim_cpu_us_per_chunk = result.sim_cpu_s / (streams * tokens) * 1e6
    result.peak_active = sim_stats["peak_active"]
    result.sim_clock_lag_p99_ms = sim_stats["clock_lag_ms"]["p99"]
    result.sim_clock_lag_max_ms = sim_stats["clock_lag_ms"]["max"]
    for (client, _), outcome in zip(connected, outcomes, strict=True):
        problem = _verdict(client, outcome, tokens)
        if problem is None:
            result.completed += 1
            continue
        result.error_count += 1
        if len(result.errors) < 5:
            result.errors.append(problem)
    _measure_timing([client for client, _ in connected], result)
    return result


def _measure_timing(clients: list[_StreamClient], result: CapacityResult) -> None:
    ttfts, gaps, reads_per_stream, spreads = [], [], [], []
    for client in clients:
        arrivals = [at for at, data in client.reads if b"data: " in data]
        if not arrivals:
            continue
        spreads.append((arrivals[-1] - arrivals[0]) * 1000)
        ttfts.append((arrivals[0] - client.sent_at) * 1000)
        gaps.extend((later - earlier) * 1000 for earlier, later in itertools.pairwise(arrivals))
        reads_per_stream.append(len(arrivals))
    result.ttft_p50_ms = _percentile(ttfts, 0.5)
    result.ttft_p99_ms = _percentile(ttfts, 0.99)
    result.ttft_max_ms = max(ttfts, default=float("nan"))
    result.spread_min_ms = min(spreads, default=0.0)
    result.gap_p50_ms = _percentile(gaps, 0.5)
    result.gap_p99_ms = _percentile(gaps, 0.99)
    result.gap_max_ms = max(gaps, default=float("nan"))
    result.reads_per_stream_min = min(reads_per_stream, default=0)
    result.reads_per_stream_median = _percentile([float(n) for n in reads_per_stream], 0.5)


def capacity_problems(
    result: CapacityResult,
    *,
    max_gap_p99_ms: float,
    min_reads_fraction: float = 0.9,
    max_sim_cpu_per_wall: float = 0.9,
    max_sim_cpu_us_per_chunk: float = 25.0,
    judge_timing: bool = True,
) -> list[str]:
    """What makes a capacity run a failure (empty: it passed).

    Every stream complete and exact, all of them in flight at once, the simulator's CPU below
    saturation (so it was not what limited the run) and cheap per chunk (the gateway's budget
    is 40 us per relayed chunk: the simulator must cost well under that); and, when
    `judge_timing` (see `oversubscribed`), tokens in separate reads, the median gap close to the
    configured one and the p99 gap bounded.
    """
    problems = []
    if result.completed != result.streams:
        problems.append(f"{result.error_count}/{result.streams} streams failed: {result.errors}")
    if result.peak_active < result.streams:
        problems.append(f"only {result.peak_active} streams were in flight at once")
    if result.sim_cpu_per_wall > max_sim_cpu_per_wall:
        problems.append(f"simulator CPU {result.sim_cpu_per_wall:.2f} s per s: saturated")
    if result.sim_cpu_us_per_chunk > max_sim_cpu_us_per_chunk:
        problems.append(f"simulator CPU {result.sim_cpu_us_per_chunk:.1f} us per chunk")
    if not judge_timing:
        return problems
    if result.reads_per_stream_min < min_reads_fraction * result.tokens:
        problems.append(
            f"tokens coalesced: a stream arrived in {result.reads_per_stream_min} reads "
            f"for {result.tokens} tokens"
        )
    if not 0.8 * result.gap_ms <= result.gap_p50_ms <= 1.5 * result.gap_ms + 5:
        problems.append(f"median gap {result.gap_p50_ms:.1f} ms for {result.gap_ms} ms configured")
    if result.gap_p99_ms > max_gap_p99_ms:
        problems.append(f"p99 gap {result.gap_p99_ms:.1f} ms over {max_gap_p99_ms} ms")
    return problems


def oversubscribed(result: CapacityResult, max_wait_fraction: float = 0.4) -> str | None:
    """Why the run's timing says more about the machine than about the simulator, or None.

    When the simulator or the client spent a large part of the run ready to run but waiting for
    a CPU (other work on a shared machine), late tokens are the scheduler's doing. A simulator
    that is itself too slow shows as busy (CPU criteria), and one that blocks shows as neither
    busy nor waiting: both are still caught.
    """
    for who, waited in (
        ("simulator", result.sim_runqueue_wait_s),
        ("client", result.client_runqueue_wait_s),
    ):
        if waited > max_wait_fraction * result.wall_s:
            return (
                f"the {who} waited {waited:.2f} s of {result.wall_s:.2f} s for a CPU: "
                "the machine is oversubscribed, timing not judged"
            )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--timeout-s", type=float, default=40.0)
    parser.add_argument(
        "--ramp-s",
        type=float,
        default=None,
        help="spread the request starts over this long (default: one gap; 0 = all at once)",
    )
    args = parser.parse_args(argv)
    result = run_capacity_check(
        streams=args.streams,
        tokens=args.tokens,
        gap_ms=args.gap_ms,
        ttft_ms=args.ttft_ms,
        timeout_s=args.timeout_s,
        ramp_s=args.ramp_s,
    )
    print(result.summary())
    return 0 if result.completed == result.streams else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
