"""Streams under way while something else happens: what an operation costs the users.

`StreamLoad` keeps `clients` closed-loop streams open against one URL (each client one keep-alive
connection, its next request the moment its answer ends) in a thread of its own, and records
every stream: when it started, its first token, its end and its outcome. The caller runs an
operation (a reload, a deploy, a kill) in between and `report()` counts the streams that
overlapped it. A stream's outcome is judged from the whole body, as a user would:
- `completed`: 200, the framing ended cleanly, the end event arrived, no error event, and (when
  the expected text is known: the simulator upstream) the text is exactly it;
- `corrupted`: it ended cleanly but the text differs (a gateway that lost or mixed tokens);
- `failed:<kind>`: an HTTP error status, an in-band error event, a connection that closed or a
  body that stopped before its end (`aborted`), a refused connection, a timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO / "bench", REPO / "loadtest"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from loadgen import ResponseError, StreamConnection, build_request, client_tls
from streamcheck import OpenAIDecoder

COMPLETED = "completed"
CORRUPTED = "corrupted"
FAILED = "failed"
CONNECT_RETRY_PAUSE_S = 0.05


@dataclass(frozen=True)
class StreamResult:
    started: float  # time.monotonic()
    first_token: float | None
    ended: float
    outcome: str  # COMPLETED, CORRUPTED, or FAILED:<kind>

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    def overlaps(self, start: float, end: float) -> bool:
        return self.started < end and self.ended > start


@dataclass
class WindowReport:
    """The streams that were open during some windows of time, by outcome."""

    streams: int
    completed: int
    corrupted: int
    failed: dict[str, int]
    ttft_p99_ms: float | None

    @property
    def lost(self) -> int:
        return self.corrupted + sum(self.failed.values())

    def __str__(self) -> str:
        p99 = "-" if self.ttft_p99_ms is None else f"{self.ttft_p99_ms:.0f} ms"
        return (
            f"{self.streams} streams: {self.completed} completed, {self.corrupted} corrupted, "
            f"failed {self.failed or 0}, p99 TTFT {p99}"
        )


# The promise of every operation (a reload, an upgrade, a drain): no stream lost, and the p99
# time to first token of the streams open during it within this many times its value at rest.
TTFT_SPIKE_LIMIT = 2.0


def spiked(rest: WindowReport, during: WindowReport) -> bool:
    return during.ttft_p99_ms > TTFT_SPIKE_LIMIT * rest.ttft_p99_ms


def at_rest_before(event_at: float, settle_s: float) -> tuple[float, float]:
    """The window of load at rest before an event: the `settle_s` before it, half a second off
    each end (the load still ramping up, the event's own start)."""
    return (event_at - settle_s + 0.5, event_at - 0.5)


def assert_nothing_lost(rest: WindowReport, during: WindowReport, *, min_streams: int) -> None:
    """At rest and during the operation every stream whole, at least `min_streams` of them
    during it, and no first-token spike."""
    assert rest.lost == 0, f"streams lost at rest: {rest}"
    assert during.streams >= min_streams, f"too few streams during the operation: {during}"
    assert during.lost == 0, f"streams lost during the operation: {during} (at rest: {rest})"
    assert not spiked(rest, during), (
        f"p99 TTFT during the operation {during.ttft_p99_ms:.0f} ms, at rest "
        f"{rest.ttft_p99_ms:.0f} ms: more than {TTFT_SPIKE_LIMIT}x"
    )


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def judge(connection: StreamConnection, expected_text: str | None) -> str:
    decoder = OpenAIDecoder()
    text, _ = decoder.feed(connection.body())
    if decoder.error:
        return f"{FAILED}:error-event"
    if not decoder.done:
        return f"{FAILED}:no-end-event"
    if expected_text is not None and text != expected_text:
        return CORRUPTED
    return COMPLETED


class StreamLoad:
    """`clients` closed-loop OpenAI streams to `url` (http or https) until `stop()`."""

    def __init__(
        self,
        url: str,
        body: bytes,
        *,
        clients: int,
        key: str | None = None,
        cafile: str | None = None,
        expected_text: str | None = None,
        stream_timeout_s: float = 60.0,
        max_seconds: float = 900.0,
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.request = build_request(self.host, self.port, parts.path or "/", body, key)
        self.tls = client_tls(cafile) if parts.scheme == "https" else None
        if parts.scheme == "https" and self.tls is None:
            self.tls = ssl.create_default_context()
        self.clients = clients
        self.expected_text = expected_text
        self.stream_timeout_s = stream_timeout_s
        self.max_seconds = max_seconds  # a forgotten stop() still ends
        self.results: list[StreamResult] = []
        self.in_flight: dict[int, float] = {}  # client -> start of its open stream
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- control, from the caller's thread ---------------------------------------------------
    def start(self, ramp_s: float = 1.0) -> StreamLoad:
        self._thread = threading.Thread(
            target=self._run, args=(ramp_s,), daemon=True, name="stream-load"
        )
        self._thread.start()
        return self

    def stop(self, drain_s: float | None = None) -> list[StreamResult]:
        """No new streams; the open ones may finish (within the stream timeout)."""
        self._stopping.set()
        assert self._thread is not None
        self._thread.join(self.stream_timeout_s + 10 if drain_s is None else drain_s)
        if self._thread.is_alive():
            raise RuntimeError("the stream load did not stop")
        if self._error is not None:
            raise RuntimeError("the stream load crashed") from self._error
        return self.results

    def open_streams(self) -> int:
        return len(self.in_flight)

    def report(self, *windows: tuple[float, float]) -> WindowReport:
        """The streams open at any moment of any of the (start, end) windows."""
        window = [
            result
            for result in list(self.results)
            if any(result.overlaps(start, end) for start, end in windows)
        ]
        failed: dict[str, int] = {}
        for result in window:
            if result.outcome.startswith(FAILED):
                kind = result.outcome.partition(":")[2]
                failed[kind] = failed.get(kind, 0) + 1
        ttfts = [result.ttft_s * 1000 for result in window if result.ttft_s is not None]
        return WindowReport(
            streams=len(window),
            completed=sum(result.outcome == COMPLETED for result in window),
            corrupted=sum(result.outcome == CORRUPTED for result in window),
            failed=failed,
            ttft_p99_ms=percentile(ttfts, 0.99),
        )

    # -- the load, in its own thread and event loop --------------------------------------------
    def _run(self, ramp_s: float) -> None:
        try:
            asyncio.run(self._clients(ramp_s))
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    async def _clients(self, ramp_s: float) -> None:
        deadline = time.monotonic() + self.max_seconds
        await asyncio.gather(
            *(
                self._client(index, ramp_s * index / self.clients, deadline)
                for index in range(self.clients)
            )
        )

    async def _client(self, index: int, delay_s: float, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(delay_s)
        connection: StreamConnection | None = None
        # Bounded by time (deadline, stop) and by count (no stream is shorter than a millisecond).
        for _ in range(int(self.max_seconds * 1000)):
            if self._stopping.is_set() or time.monotonic() >= deadline:
                break
            started = time.monotonic()
            self.in_flight[index] = started
            outcome = ""
            # Like every HTTP client, a request that met a reused connection closed before any
            # byte of an answer (the server closed it as idle) is sent again on a new one, once.
            for attempt in range(2):
                reused = (
                    connection is not None
                    and not connection.closed
                    and not connection.transport.is_closing()
                )  # e.g. Connection: close
                try:
                    if not reused:
                        _, connection = await asyncio.wait_for(
                            loop.create_connection(
                                lambda: StreamConnection(sse=True),
                                self.host,
                                self.port,
                                ssl=self.tls,
                                server_hostname=self.host if self.tls else None,
                            ),
                            self.stream_timeout_s,
                        )
                    await connection.exchange(self.request, self.stream_timeout_s)
                    outcome = ""
                except ResponseError as exc:
                    kind = "aborted" if exc.kind == "closed-midstream" else exc.kind
                    outcome = f"{FAILED}:{kind}"
                    if kind == "aborted" and reused and connection.status == 0 and attempt == 0:
                        connection = None
                        continue
                except (OSError, TimeoutError, ssl.SSLError):
                    outcome = f"{FAILED}:connect"
                break
            if not outcome:
                outcome = judge(connection, self.expected_text)
            ended = time.monotonic()
            first = (
                connection.t_first
                if connection is not None and connection.content_arrivals
                else None
            )
            del self.in_flight[index]
            self.results.append(StreamResult(started, first, ended, outcome))
            if outcome != COMPLETED and connection is not None:
                connection.transport.close()  # unknown state after a broken answer
                connection = None
            if outcome == f"{FAILED}:connect":
                await asyncio.sleep(CONNECT_RETRY_PAUSE_S)
        if connection is not None and connection.transport is not None:
            connection.transport.close()
