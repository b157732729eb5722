"""A cheap closed-loop HTTP/1.1 streaming client: raw asyncio protocol on uvloop.

Each virtual client keeps one keep-alive connection and sends its next request the moment the
previous response ends. Every read the kernel hands over (one `data_received`) is one arrival:
its time is recorded, so "every token in its own read" can be counted rather than assumed.
Work per read is kept small (no HTTP client package; the tests' chunked decoder, bytes.find and a
regex per chunk line) so the load generator distorts the figures as little as possible; its own
CPU is reported anyway.
"""

from __future__ import annotations

import asyncio
import gzip
import multiprocessing
import re
import ssl
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

# One chunked decoder for the probe, the wire tests and the benchmark (stdlib only).
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from support.stream_probe import ChunkedDecoder, ProtocolError

# A non-empty `content` in an OpenAI chunk (the simulator's own format); role-only, finish and
# usage chunks carry none and are not tokens.
SSE_CONTENT = re.compile(rb'"content":\s?"[^"]')
HEADER_END = b"\r\n\r\n"
CONNECT_RETRY_PAUSE_S = 0.05
# Judges a whole body whose text is not known in advance (a real model's): the error kind ("" for
# a whole answer) and the tokens it carried. With one, each completed stream's tokens and
# first-to-last-token time are kept.
Judge = Callable[[bytes], tuple[str, int]]


LEAD_S = 0.5  # from planning a measurement to its first request: forking the load generators
RESULTS_GRACE_S = 15.0  # for a load generator to pickle and send its outcome


@dataclass
class Schedule:
    """Absolute CLOCK_MONOTONIC times shared by all processes of one measurement."""

    start: float  # first requests go out from here, spread over `stagger_s`
    stagger_s: float
    warm: float  # measurement window opens
    end: float  # window closes; no new requests after it
    stream_timeout_s: float

    @classmethod
    def from_now(
        cls, *, warmup_s: float, duration_s: float, stagger_s: float, stream_timeout_s: float
    ) -> Schedule:
        """A measurement that starts once the load generators are forked (LEAD_S from now)."""
        start = time.monotonic() + LEAD_S
        return cls(
            start=start,
            stagger_s=stagger_s,
            warm=start + warmup_s,
            end=start + warmup_s + duration_s,
            stream_timeout_s=stream_timeout_s,
        )

    @property
    def results_due(self) -> float:
        """By when every load generator has reported: its last stream ended or timed out."""
        return self.end + self.stream_timeout_s + RESULTS_GRACE_S


@dataclass
class Outcome:
    """What one load-generator process saw inside the window (picklable, mergeable)."""

    completed: int = 0
    ttft_s: array = field(default_factory=lambda: array("d"))
    gaps_s: array = field(default_factory=lambda: array("d"))
    arrivals: array = field(default_factory=lambda: array("i"))
    # Only with a judge: tokens of each completed stream, and its first-to-last-token time.
    tokens: array = field(default_factory=lambda: array("i"))
    token_spans_s: array = field(default_factory=lambda: array("d"))
    errors: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    window_s: float = 0.0
    # The longest this process's event loop ran late in the window: a read it was too late
    # for can hold two tokens that the stack delivered apart.
    loop_lag_max_s: float = 0.0
    # Body chunks of each completed chunked response: a hop writes one per read of its own
    # upstream, so fewer chunks than tokens says a hop before this client merged tokens, and
    # more chunks than reads (`arrivals`) that this client read late.
    chunks: array = field(default_factory=lambda: array("i"))

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def merge(self, other: Outcome) -> None:
        self.completed += other.completed
        self.ttft_s.extend(other.ttft_s)
        self.gaps_s.extend(other.gaps_s)
        self.arrivals.extend(other.arrivals)
        self.tokens.extend(other.tokens)
        self.token_spans_s.extend(other.token_spans_s)
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count
        self.cpu_s += other.cpu_s
        self.window_s = max(self.window_s, other.window_s)
        self.loop_lag_max_s = max(self.loop_lag_max_s, other.loop_lag_max_s)
        self.chunks.extend(other.chunks)


class ResponseError(Exception):
    """A response that is not a complete, correct stream; `kind` names the error class."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class StreamConnection(asyncio.Protocol):
    """One keep-alive connection that runs one request at a time and times every read."""

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.done: asyncio.Future | None = None
        self.responses = 0  # ended on this connection
        self._reset()

    def _reset(self) -> None:
        self.in_headers = True
        self.head = b""
        self.status = 0
        self.chunked = False
        self.content_left = -1
        self.keep_alive = True
        self.gzipped = False
        self.decoder: ChunkedDecoder | None = None
        self.parts: list[bytes] = []
        self.t_first = 0.0
        self.t_last = 0.0
        self.content_arrivals = 0
        self.gaps: list[float] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ResponseError("closed-midstream"))

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.done is None or self.done.done():
            return
        if self.in_headers:
            self.head += data
            end = self.head.find(HEADER_END)
            if end < 0:
                return
            data = self.head[end + 4 :]
            self._parse_head(self.head[:end])
            self.in_headers = False
            if not data:
                return
        before = len(self.parts)
        try:
            finished = self._feed_chunked(data) if self.chunked else self._feed_length(data)
        except ProtocolError:
            self.done.set_exception(ResponseError("malformed-chunking"))
            return
        if len(self.parts) > before:
            self._count_arrival(now, data)
        if finished:
            self.done.set_result(None)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self.chunked = True
                self.decoder = ChunkedDecoder()
            elif name == b"content-length":
                self.content_left = int(value)
            elif name == b"connection" and value == b"close":
                self.keep_alive = False
            elif name == b"content-encoding" and value == b"gzip":
                self.gzipped = True

    def _count_arrival(self, now: float, data: bytes) -> None:
        if self.sse and SSE_CONTENT.search(data) is None:
            return  # role/finish/usage/[DONE] only: not a token arrival
        if self.content_arrivals:
            self.gaps.append(now - self.t_last)
        else:
            self.t_first = now
        self.t_last = now
        self.content_arrivals += 1

    def _feed_length(self, data: bytes) -> bool:
        if self.content_left < 0:
            self.parts.append(data)  # read-until-close body
            return False
        take = data[: self.content_left]
        if take:
            self.parts.append(take)
        self.content_left -= len(take)
        return self.content_left == 0

    def _feed_chunked(self, data: bytes) -> bool:
        """True once the last chunk (and the trailers, if any) has been read."""
        assert self.decoder is not None
        payload = self.decoder.feed(data)
        if payload:
            self.parts.append(payload)
        return self.decoder.done

    def body(self) -> bytes:
        body = b"".join(self.parts)
        return gzip.decompress(body) if self.gzipped else body

    async def exchange(self, request: bytes, timeout_s: float) -> None:
        """Send one request and wait for its response to end (raises ResponseError)."""
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            await asyncio.wait_for(self.done, timeout_s)
        except TimeoutError:
            raise ResponseError("timeout") from None
        self.responses += 1
        if self.status != 200:
            raise ResponseError(f"http-{self.status}")
        if not self.keep_alive:
            self.transport.close()

    def closed_between_responses(self) -> bool:
        """The server closed this kept-alive connection after an earlier response and before
        any byte of the current one: the request can be sent again on a new connection."""
        return self.closed and self.responses > 0 and self.in_headers and not self.head


def build_request(host: str, port: int, path: str, body: bytes, key: str | None = None) -> bytes:
    authorization = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        # Like a browser: a compressing hop (the negative control) then shows as bursts.
        f"Accept: */*\r\nAccept-Encoding: gzip\r\n{authorization}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def client_tls(cafile: str | None) -> ssl.SSLContext | None:
    """HTTPS to a server whose certificate this CA file signed (HTTP/1.1: no ALPN offered, so
    the streams are timed per read exactly as over plain HTTP); None: plain HTTP."""
    return ssl.create_default_context(cafile=cafile) if cafile else None


async def virtual_client(
    index: int,
    clients: int,
    host: str,
    port: int,
    request: bytes,
    sse: bool,
    expected_body: bytes | None,
    schedule: Schedule,
    outcome: Outcome,
    tls: ssl.SSLContext | None = None,
    judge: Judge | None = None,
) -> None:
    """Closed loop: one stream after another on one connection, until the window closes.
    With `tls`, the connection is HTTPS (one handshake per connection, as a browser's).
    With `judge`, each body is judged by it (instead of compared with `expected_body`)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(
        max(0.0, schedule.start + schedule.stagger_s * index / clients - time.monotonic())
    )
    conn: StreamConnection | None = None
    # Bounded by time (window end) and by count (no stream is shorter than a millisecond).
    max_streams = int((schedule.end - schedule.start) * 1000) + 1
    for _ in range(max_streams):
        if time.monotonic() >= schedule.end:
            break
        if conn is None or conn.closed:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: StreamConnection(sse),
                        host,
                        port,
                        ssl=tls,
                        server_hostname=host if tls else None,
                    ),
                    schedule.stream_timeout_s,
                )
            except (OSError, TimeoutError, ssl.SSLError):
                if time.monotonic() >= schedule.warm:
                    outcome.error("connect")
                await asyncio.sleep(CONNECT_RETRY_PAUSE_S)
                conn = None
                continue
        t_sent = time.monotonic()
        kind = ""
        try:
            await conn.exchange(request, schedule.stream_timeout_s)
        except ResponseError as exc:
            kind = exc.kind
        if kind and conn.closed_between_responses():
            # As HTTP clients do when nothing of the answer came (RFC 9112, 9.3.1): llama.cpp's
            # server closes the connection after every stream while announcing keep-alive,
            # and the next request, sent at once, meets the close. Once per request: a new
            # connection has served nothing, so it is never retried.
            conn = None
            continue
        if not kind and expected_body is not None and conn.body() != expected_body:
            kind = "content"
        tokens = 0
        if not kind and judge is not None:
            kind, tokens = judge(conn.body())
        if not kind and not conn.content_arrivals:
            kind = "empty"
        t_done = time.monotonic()
        if t_done < schedule.warm:
            if kind:
                conn.transport.close()
                conn = None
            continue
        if kind:
            outcome.error(kind)
            conn.transport.close()  # a broken response leaves the connection in an unknown state
            conn = None
            continue
        if t_done > schedule.end:
            continue  # finished during the drain: outside the window
        outcome.completed += 1
        outcome.ttft_s.append(conn.t_first - t_sent)
        outcome.gaps_s.extend(conn.gaps)
        outcome.arrivals.append(conn.content_arrivals)
        if conn.decoder is not None:
            outcome.chunks.append(conn.decoder.payload_chunks)
        if judge is not None:
            outcome.tokens.append(tokens)
            outcome.token_spans_s.append(conn.t_last - conn.t_first)
    if conn is not None and conn.transport is not None:
        conn.transport.close()


async def _measure_cpu_window(schedule: Schedule, outcome: Outcome) -> None:
    await asyncio.sleep(max(0.0, schedule.warm - time.monotonic()))
    cpu_start = time.process_time()
    await asyncio.sleep(max(0.0, schedule.end - time.monotonic()))
    outcome.cpu_s = time.process_time() - cpu_start
    outcome.window_s = schedule.end - schedule.warm


LAG_PROBE_S = 0.005


async def watch_loop_lag(schedule: Schedule, outcome: Outcome) -> None:
    """How late a short sleep wakes up, over the window: the load generator's own lag."""
    await asyncio.sleep(max(0.0, schedule.warm - time.monotonic()))
    for _ in range(int((schedule.end - schedule.warm) / LAG_PROBE_S) + 1):
        asleep = time.monotonic()
        if asleep >= schedule.end:
            break
        await asyncio.sleep(LAG_PROBE_S)
        late = time.monotonic() - asleep - LAG_PROBE_S
        outcome.loop_lag_max_s = max(outcome.loop_lag_max_s, late)


async def run_clients(
    host: str,
    port: int,
    path: str,
    body: bytes,
    sse: bool,
    expected_body: bytes | None,
    first_index: int,
    count: int,
    total_clients: int,
    schedule: Schedule,
    key: str | None = None,
    cafile: str | None = None,
    judge: Judge | None = None,
) -> Outcome:
    outcome = Outcome()
    request = build_request(host, port, path, body, key)
    tls = client_tls(cafile)
    tasks = [
        virtual_client(
            first_index + i,
            total_clients,
            host,
            port,
            request,
            sse,
            expected_body,
            schedule,
            outcome,
            tls,
            judge,
        )
        for i in range(count)
    ]
    await asyncio.gather(
        _measure_cpu_window(schedule, outcome), watch_loop_lag(schedule, outcome), *tasks
    )
    return outcome


def collect_outcome(workers, deadline: float) -> Outcome:
    """Every load generator's results by `deadline` (one it lost is an error), each process
    joined, or killed by PID (only our own forked load generators)."""
    outcome = Outcome()
    for process, receiver in workers:
        if receiver.poll(max(0.0, deadline - time.monotonic())):
            outcome.merge(receiver.recv())
        else:
            outcome.error("loadgen-lost")
        process.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if process.is_alive():
            process.kill()
            process.join(5.0)
    return outcome


def start_process(*args) -> tuple[BaseProcess, Connection]:
    """One forked load-generator process running `run_clients(*args)`; its Outcome comes back
    on the returned pipe (collect_outcome reads it)."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=run_process, args=(sender, *args), daemon=True)
    process.start()
    sender.close()
    return process, receiver


def run_process(conn, *args) -> None:
    """Entry of one load-generator process: run its share of clients, send the outcome back."""
    import uvloop

    outcome = uvloop.run(run_clients(*args))
    conn.send(outcome)
    conn.close()
