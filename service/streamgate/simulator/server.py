"""The simulator's HTTP/1.1 server: an asyncio Protocol per connection, one shared token clock.

Why not a web framework: the simulator must never be the bottleneck of a benchmark (one process
holds 5,000 concurrent streams on two cores). A framework costs a coroutine, a sleep and several
object layers per token; here a stream is a small object on a timer wheel, a token is one
``transport.write`` of bytes assembled from pre-encoded pieces, and all streams due in the same
millisecond are served by one timer callback. The Protocol also hears a client's disconnect at
once (``connection_lost``), even while a stream is stalled and nothing is being written: that is
what makes the ``cancelled`` counter a proof that a gateway closed its upstream request.

The wire format, routes and faults are described in the package docstring.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import json
import math
import os
import random
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import httptools
import orjson

from streamgate.simulator.config import SimConfig
from streamgate.simulator.script import MAX_TOKENS, expected_tokens

DEFAULT_MODEL = "streamgate-sim"
FAULT_MODEL_PREFIX = "sim-fault-"
FAULT_HEADER = b"x-sim-fault"
REQUEST_ID_HEADER = b"x-request-id"
SYSTEM_FINGERPRINT = "fp_streamgate_sim"
RECENT_LIMIT = 256

# -- bounds: what one connection can make the simulator hold, whatever a client sends ----------
# Request line + headers of one request. Clients send about 1 KiB; nginx and Node stop at 8-16
# KiB. Over it: 414 (the request line alone) or 431, then the connection is closed.
MAX_HEAD_BYTES = 16 * 1024
# Header lines per request (as gunicorn's default): many tiny headers cost more than their bytes.
MAX_HEADERS = 100
# One request body. A chat request with a long conversation is tens of KiB. Over it: 413 as soon
# as Content-Length (or the chunked body so far) says so, without reading the rest; then closed.
MAX_BODY_BYTES = 1024 * 1024
# Pipelining: requests read ahead of the one being answered, by count and by size. At either
# bound the simulator stops reading the socket until answers catch up: TCP back-pressure, not an
# error, so a client that writes without reading blocks instead of filling the simulator.
MAX_PIPELINED = 8
MAX_PIPELINED_BYTES = 256 * 1024
# The parser is fed at most this much at once, so reading can stop between requests; requests
# fit in one slice, so the usual request costs one parser call, as before.
FEED_SLICE = 8 * 1024
# After an error that ends a connection: the answer and a half-close are sent, and whatever the
# client still sends is read and dropped for this long, so that closing with unread input (which
# resets the connection) cannot destroy the answer before the client has read it.
LINGER_S = 1.0

FAULT_KINDS = (
    "429",
    "500",
    "error-midstream",
    "stall-first",
    "stall-midstream",
    "close-midstream",
    "drop-token",
)
_MIDSTREAM_END_FAULTS = ("error-midstream", "close-midstream")

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}
_TOKENS: tuple[str, ...] = tuple(expected_tokens(MAX_TOKENS))
# The same bytes orjson would write, but compact: each orjson.dumps result keeps a ~4 KiB
# allocation, which for 16,384 long-lived tokens would cost 64 MiB of resident memory.
_TOKEN_JSON: tuple[bytes, ...] = tuple(
    json.dumps(token, ensure_ascii=False).encode() for token in _TOKENS
)
_DONE_EVENT = b"data: [DONE]\n\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _error_body(message: str, error_type: str, code: str | None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    )


class Stats:
    """Counters for /stats. started == completed + cancelled + active at all times.

    completed: the simulator wrote the response as scripted, faults included (a 429, an error
    event, a deliberate close). cancelled: the client went away before that.
    """

    def __init__(self) -> None:
        self.connections_open = 0  # a gauge: kept across resets
        self.started = self.completed = self.cancelled = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; streams still in flight count as started after the reset, so
        started == completed + cancelled + active keeps holding when they end."""
        in_flight = self.active
        self.started = in_flight
        self.completed = 0
        self.cancelled = 0
        self.peak_active = in_flight
        self.connections_total = 0
        self.tokens_sent = 0
        self.faults: Counter[str] = Counter()
        self.requests_with_request_id = 0
        self.recent_request_ids: deque[str] = deque(maxlen=RECENT_LIMIT)
        self.recent_cancels: deque[dict[str, Any]] = deque(maxlen=RECENT_LIMIT)
        self.last_cancel_at: float | None = None
        self.reset_at = time.time()

    @property
    def active(self) -> int:
        return self.started - self.completed - self.cancelled

    def record_start(self, request_id: str | None, fault: str | None) -> None:
        self.started += 1
        self.peak_active = max(self.peak_active, self.active)
        if request_id is not None:
            self.requests_with_request_id += 1
            self.recent_request_ids.append(request_id)
        if fault is not None:
            self.faults[fault] += 1

    def record_cancel(self, request_id: str, tokens_sent: int) -> None:
        now = time.time()
        self.cancelled += 1
        self.last_cancel_at = now
        self.recent_cancels.append(
            {"request_id": request_id, "at": now, "tokens_sent": tokens_sent}
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "active": self.active,
            "faults": dict(self.faults),
            "peak_active": self.peak_active,
            "connections_open": self.connections_open,
            "connections_total": self.connections_total,
            "tokens_sent": self.tokens_sent,
            "requests_with_request_id": self.requests_with_request_id,
            "recent_request_ids": list(self.recent_request_ids),
            "last_cancel_at": self.last_cancel_at,
            "recent_cancels": list(self.recent_cancels),
            "reset_at": self.reset_at,
            "now": time.time(),
        }


class TokenClock:
    """One timer for every stream: a wheel of 1 ms buckets, a heap of the non-empty ones.

    A stream asks to be stepped at a time; all streams due in the same millisecond are stepped by
    one callback, so 5,000 streams cost a few hundred timer events per second, not 250,000.
    """

    RESOLUTION_S = 0.001

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, list[ChatResponse]] = {}
        self._ticks: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed_tick: int | None = None
        # How late each callback ran after its earliest due stream: the simulator's own lag.
        self.lags_ms: deque[float] = deque(maxlen=20_000)

    def call_at(self, when: float, response: ChatResponse) -> None:
        tick = math.ceil(when / self.RESOLUTION_S)  # never early
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.append(response)
            return
        self._buckets[tick] = [response]
        heapq.heappush(self._ticks, tick)
        if self._armed_tick is None or tick < self._armed_tick:
            self._arm(tick)

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_tick = tick
        self._timer = self._loop.call_at(tick * self.RESOLUTION_S, self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        limit = max(self._armed_tick or 0, math.floor(now / self.RESOLUTION_S))
        if self._ticks:
            self.lags_ms.append(max(0.0, now - self._ticks[0] * self.RESOLUTION_S) * 1000)
        self._timer = None
        self._armed_tick = None
        due: list[list[ChatResponse]] = []
        while self._ticks and self._ticks[0] <= limit:
            due.append(self._buckets.pop(heapq.heappop(self._ticks)))
        # Streams reschedule themselves while stepping; those land in new buckets, served by a
        # later callback, so a zero gap cannot spin here forever.
        for bucket in due:
            for response in bucket:
                if not response.finished:
                    response.step()
        if self._ticks and (self._armed_tick is None or self._ticks[0] < self._armed_tick):
            self._arm(self._ticks[0])


@dataclass(slots=True)
class Request:
    method: bytes
    path: str
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool
    http11: bool
    size: int  # head + body bytes: what it costs while queued behind another answer


class Simulator:
    """Shared state of one simulator process: settings, counters, the token clock."""

    def __init__(self, config: SimConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.stats = Stats()
        self.clock = TokenClock(loop)
        self.random = random.Random(0)  # jitter only; the text never varies
        self.connections: set[SimProtocol] = set()

    def snapshot(self) -> dict[str, Any]:
        """/stats: the counters plus how late the token clock has been running."""
        lags = sorted(self.clock.lags_ms)
        snapshot = self.stats.snapshot()
        # Which client connection (its port) carries which answer right now: a test can tell
        # which of a gateway's worker processes holds a stream (at most RECENT_LIMIT listed).
        in_flight = (c for c in self.connections if c.response is not None)
        snapshot["active_streams"] = [
            {
                "request_id": connection.response.request_id,
                "peer_port": connection.peer_port,
                "tokens_sent": connection.response.tokens_sent,
            }
            for connection in itertools.islice(in_flight, RECENT_LIMIT)
            if connection.response is not None
        ]
        snapshot["clock_lag_ms"] = {
            "p50": lags[len(lags) // 2] if lags else 0.0,
            "p99": lags[int(len(lags) * 0.99)] if lags else 0.0,
            "max": lags[-1] if lags else 0.0,
        }
        return snapshot

    def reset(self) -> None:
        self.stats.reset()
        self.clock.lags_ms.clear()

    def delay_s(self, base_ms: float) -> float:
        jitter = self.config.jitter_ms
        if jitter:
            return max(0.0, base_ms + self.random.uniform(-jitter, jitter)) / 1000.0
        return base_ms / 1000.0


def _head(status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
    lines.extend(name + b": " + value for name, value in headers)
    lines.append(b"connection: keep-alive" if keep_alive else b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class ChatResponse:
    """One /v1/chat/completions answer, stepped token by token by the TokenClock."""

    __slots__ = (
        "chunked",
        "completion_id",
        "conn",
        "content_parts",
        "created",
        "due",
        "fault",
        "finished",
        "include_usage",
        "model",
        "n_tokens",
        "next_index",
        "prefix",
        "prompt_tokens",
        "request_id",
        "sim",
        "stalled",
        "stream",
        "suffix",
        "tokens_sent",
    )

    def __init__(
        self,
        conn: SimProtocol,
        sim: Simulator,
        request: Request,
        request_id: str,
        model: str,
        fault: str | None,
        n_tokens: int,
        stream: bool,
        include_usage: bool,
        prompt_tokens: int,
    ) -> None:
        self.conn = conn
        self.sim = sim
        self.request_id = request_id
        self.model = model
        self.fault = fault
        self.n_tokens = n_tokens
        self.stream = stream
        self.include_usage = include_usage
        self.prompt_tokens = prompt_tokens
        self.chunked = request.http11
        self.completion_id = "chatcmpl-sim" + os.urandom(10).hex()
        self.created = int(time.time())
        self.next_index = 0
        self.tokens_sent = 0
        self.finished = False
        self.stalled = False
        self.content_parts: list[str] = []
        head = orjson.dumps(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        self.prefix = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        self.suffix = b'},"logprobs":null,"finish_reason":null}]'
        self.suffix += b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self.due = 0.0

    # -- framing -------------------------------------------------------------------------

    def _chunk_event(self, choices: list[Any], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _write_body(self, payload: bytes, end: bool = False) -> None:
        """Write payload as one chunk; `end` adds the terminating chunk to the same write."""
        if self.chunked:
            terminator = _LAST_CHUNK if end else b""
            self.conn.write(b"%x\r\n%b\r\n%b" % (len(payload), payload, terminator))
        else:
            self.conn.write(payload)

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.n_tokens,
            "total_tokens": self.prompt_tokens + self.n_tokens,
        }

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Send the headers (streaming) and schedule the first token."""
        if self.stream:
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-request-id", self.request_id.encode("latin-1")),
            ]
            if self.chunked:
                headers.append((b"transfer-encoding", b"chunked"))
            self.conn.write(_head(200, headers, keep_alive=self.chunked and self.conn.keep_alive))
        self.due = self.sim.loop.time() + self.sim.delay_s(self.sim.config.ttft_ms)
        if self.fault == "stall-first":
            self.stalled = True
            self.due += self.sim.config.stall_s
        self.sim.clock.call_at(self.due, self)

    def step(self) -> None:
        """Send the next token (or play the fault due at this point) and schedule the next."""
        index = self.next_index
        half = self.n_tokens // 2
        if index == half and self.fault in _MIDSTREAM_END_FAULTS:
            self._end_midstream()
            return
        if index == half and self.fault == "stall-midstream" and not self.stalled:
            self.stalled = True
            self.due += self.sim.config.stall_s
            self.sim.clock.call_at(self.due, self)
            return
        self.next_index = index + 1
        last = self.next_index == self.n_tokens
        dropped = self.fault == "drop-token" and index == half
        if self.stream:
            events = []
            if index == 0:
                events.append(self._chunk_event([_role_choice()]))
            if not dropped:
                events.append(self.prefix + _TOKEN_JSON[index] + self.suffix)
            if last:
                events.append(self._chunk_event([_stop_choice()]))
                if self.include_usage:
                    events.append(self._chunk_event([], self._usage()))
                events.append(_DONE_EVENT)
            if events:
                self._write_body(b"".join(events), end=last)
        elif not dropped:
            self.content_parts.append(_TOKENS[index])
        if not dropped:
            self.tokens_sent += 1
            self.sim.stats.tokens_sent += 1
        if last:
            self._finish_normally()
            return
        self.due += self.sim.delay_s(self.sim.config.gap_ms)
        self.sim.clock.call_at(self.due, self)

    def _finish_normally(self) -> None:
        if not self.stream:  # a stream's last write already ended the body
            body = orjson.dumps(
                {
                    "id": self.completion_id,
                    "object": "chat.completion",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "".join(self.content_parts),
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": self._usage(),
                }
            )
            self.conn.send_json(200, body, self.request_id)
        self._mark_done(close=self.stream and not self.chunked)

    def _end_midstream(self) -> None:
        if self.fault == "close-midstream":
            self._mark_done(close=True)
            return
        # error-midstream
        error = _error_body(
            "simulated failure in the middle of the stream",
            "server_error",
            "simulated_midstream_error",
        )
        if self.stream:
            self._write_body(b"data: " + error + b"\n\n", end=True)
            self._mark_done(close=not self.chunked)
        else:
            self.conn.send_json(500, error, self.request_id)
            self._mark_done(close=False)

    def _mark_done(self, close: bool) -> None:
        self.finished = True
        self.sim.stats.completed += 1
        self.conn.response_done(self, close=close)

    def cancel(self) -> None:
        """The client went away before the answer was complete."""
        if self.finished:
            return
        self.finished = True
        self.sim.stats.record_cancel(self.request_id, self.tokens_sent)


def _role_choice() -> dict[str, Any]:
    return {
        "index": 0,
        "delta": {"role": "assistant", "content": "", "refusal": None},
        "logprobs": None,
        "finish_reason": None,
    }


def _stop_choice() -> dict[str, Any]:
    return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


class RequestError(Exception):
    """A request the simulator refuses, answered with an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.code = code
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": str(self),
                    "type": self.error_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A stable stand-in for the prompt's token count: its whitespace-separated words."""
    words = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                words += len(content.split())
            elif isinstance(content, list):
                words += sum(
                    len(part.get("text", "").split())
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
    return max(words, 1)


def _fault_of(model: str, headers: dict[bytes, bytes]) -> str | None:
    header = headers.get(FAULT_HEADER)
    kind = None
    if header is not None:
        kind = header.decode("latin-1").strip()
    elif model.startswith(FAULT_MODEL_PREFIX):
        kind = model[len(FAULT_MODEL_PREFIX) :]
    if kind is not None and kind not in FAULT_KINDS:
        raise RequestError(
            400,
            f"unknown simulator fault {kind!r}; known: {', '.join(FAULT_KINDS)}",
            code="unknown_fault",
        )
    return kind


def _token_count(body: dict[str, Any], default: int) -> int:
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(400, f"{field} must be a positive integer", param=field)
        return min(value, MAX_TOKENS)
    return default


class SimProtocol(asyncio.Protocol):
    """One client connection: parses HTTP/1.1 requests, answers them one at a time, in order.

    Bounded whatever the client sends (the MAX_* constants): a request that breaks a bound or
    cannot be parsed is answered with an error in its turn, after every answer before it has
    ended (never inside one), and the connection then ends. Requests pipelined behind the one
    being answered are read ahead up to MAX_PIPELINED / MAX_PIPELINED_BYTES; beyond that, and
    while the transport's write buffer is full (a client that does not read), reading stops
    until the answers catch up.
    """

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.peer_port: int | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.keep_alive = True
        self.response: ChatResponse | None = None
        # Parsed requests waiting for their turn. A RequestError stands for a request that broke
        # the parser or a bound: answered in its turn, and the connection ends with it.
        self.pending: deque[Request | RequestError] = deque()
        self._pending_bytes = 0
        self._held: bytes | None = None  # received but not parsed while the read-ahead is full
        self._reading_paused = False
        self._writing_paused = False
        self._broken = False  # the parser has stopped for good: an error is queued or sent
        self._closing = False  # the connection's last answer is written: no more are
        self._advancing = False
        self._linger: asyncio.TimerHandle | None = None
        self._error: RequestError | None = None  # what a parser callback refused
        self._messages = 0
        self._in_head = False
        self._head_size = 0
        self._head_fed = 0
        self._header_lines = 0
        self._continue_wanted = False
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._body_size = 0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.sim.stats.connections_open += 1
        self.sim.stats.connections_total += 1
        self.sim.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer_port = peer[1]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._broken or self._closing:
            return  # dropped: nothing after an error or a closing answer is ever parsed
        if self._held is not None:  # read before reading paused: parsed with the rest
            self._held += data
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        return None  # close: a client that half-closes has gone away

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.sim.stats.connections_open -= 1
        self.sim.connections.discard(self)
        self.pending.clear()
        self._held = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.response is not None:
            self.response.cancel()
            self.response = None

    def pause_writing(self) -> None:
        self._writing_paused = True  # the client is not reading: answer nothing more for now

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._advance()

    # -- reading -------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse data a slice at a time; once the read-ahead is full, hold the rest unparsed
        and stop reading (resumed by _advance)."""
        size = len(data)
        if size <= FEED_SLICE and not self._queue_full():
            self._parse(data)
            return
        view = memoryview(data)
        offset = 0
        while offset < size and not (self._broken or self._closing):
            if self._queue_full():
                self._held = bytes(view[offset:])
                self._pause_reading()
                return
            self._parse(view[offset : offset + FEED_SLICE])
            offset += FEED_SLICE

    def _parse(self, piece: bytes | memoryview) -> None:
        messages = self._messages
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            self._fail(RequestError(400, "protocol upgrade not supported"))
        except httptools.HttpParserError as error:
            self._fail(self._error or RequestError(400, f"malformed HTTP request: {error}"))
        else:
            if self._in_head and self._messages == messages:
                # The whole piece belongs to one unfinished head. Counted here because the
                # parser keeps a header line to itself until the line is complete.
                self._head_fed += len(piece)
                if self._head_fed > MAX_HEAD_BYTES:
                    self._fail(self._head_too_large())

    def _queue_full(self) -> bool:
        return len(self.pending) >= MAX_PIPELINED or self._pending_bytes >= MAX_PIPELINED_BYTES

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _fail(self, error: RequestError) -> None:
        """The parser cannot go on: `error` is answered in its turn. What the client sends
        meanwhile is read and dropped, so that its hang-up is still heard at once."""
        self._broken = True
        self._error = None
        self._held = None
        self._resume_reading()
        self._enqueue(error)

    def _refuse(self, status: int, message: str, code: str) -> RequestError:
        """For parser callbacks: the error to raise (the parser reports it as its own)."""
        self._error = RequestError(status, message, code=code)
        return self._error

    def _head_too_large(self) -> RequestError:
        return self._refuse(
            431,
            f"request head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} header lines",
            "request_header_fields_too_large",
        )

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._messages += 1
        self._in_head = True
        self._head_size = 0
        self._head_fed = 0
        self._header_lines = 0
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD_BYTES:
            raise self._refuse(414, f"request line over {MAX_HEAD_BYTES} bytes", "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        self._header_lines += 1
        if self._head_size > MAX_HEAD_BYTES or self._header_lines > MAX_HEADERS:
            raise self._head_too_large()
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = self._headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > MAX_BODY_BYTES:  # refused before it is sent
            raise self._refuse(
                413, f"request body over {MAX_BODY_BYTES} bytes", "request_too_large"
            )
        # curl sends "Expect: 100-continue" with bodies over 1 KiB and waits a second for this;
        # behind another answer it is sent when that answer has ended (_advance).
        if self._headers.get(b"expect", b"").lower() == b"100-continue":
            if self._idle():
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self._continue_wanted = True

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY_BYTES:  # a chunked body has no length up front
            raise self._refuse(
                413, f"request body over {MAX_BODY_BYTES} bytes", "request_too_large"
            )
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._continue_wanted = False
        body = b"".join(self._body)
        self._enqueue(
            Request(
                method=self.parser.get_method(),
                path=self._url.split(b"?", 1)[0].decode("latin-1"),
                headers=self._headers,
                body=body,
                keep_alive=self.parser.should_keep_alive(),
                http11=self.parser.get_http_version() == "1.1",
                size=self._head_size + len(body),
            )
        )

    # -- turns ---------------------------------------------------------------------------

    def _idle(self) -> bool:
        """Nothing being answered or waiting: the next request may be answered at once."""
        return (
            self.response is None
            and not self.pending
            and not self._writing_paused
            and not self._closing
        )

    def _enqueue(self, item: Request | RequestError) -> None:
        if self._closing:
            return  # behind a closing answer: never answered
        if self._idle():
            self._answer(item)
            return
        self.pending.append(item)  # pipelined: answered in order
        if isinstance(item, Request):
            self._pending_bytes += item.size

    def _answer(self, item: Request | RequestError) -> None:
        if isinstance(item, RequestError):
            self._send_error_and_close(item)
        else:
            self._dispatch(item)

    def _advance(self) -> None:
        """Answer what waits, in order, while nothing else is being answered; parse what was
        held while the read-ahead has room; read again once nothing is held."""
        if self._advancing:  # re-entered from a write: the running loop carries on
            return
        self._advancing = True
        try:
            while self.transport is not None and not self._closing:
                if self.pending and self.response is None and not self._writing_paused:
                    item = self.pending.popleft()
                    if isinstance(item, Request):
                        self._pending_bytes -= item.size
                    self._answer(item)
                elif self._held is not None and not self._queue_full():
                    held, self._held = self._held, None
                    self._feed(held)
                else:
                    break
            if self.transport is None or self._closing:
                return
            if self._held is None and not self._queue_full():
                self._resume_reading()
            if self._continue_wanted and self._idle():
                self._continue_wanted = False
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        finally:
            self._advancing = False

    def response_done(self, response: ChatResponse, close: bool) -> None:
        if self.response is response:
            self.response = None
        if close or not self.keep_alive:
            self._close()
            return
        self._advance()

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def send_json(
        self,
        status: int,
        body: bytes,
        request_id: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if request_id is not None:
            headers.append((b"x-request-id", request_id.encode("latin-1")))
        if extra:
            headers.extend(extra)
        self.write(_head(status, headers, self.keep_alive) + body)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        """The last answer is written: close once it is sent; nothing more is answered."""
        self._closing = True
        self.pending.clear()
        self._pending_bytes = 0
        self._held = None
        if self.transport is not None:
            self.transport.close()

    def _send_error_and_close(self, error: RequestError) -> None:
        """Answer `error` with `connection: close` and end the connection: half-close at once,
        drop what the client still sends (it may be mid-body) for LINGER_S, then close."""
        self.keep_alive = False
        self.send_json(error.status, error.body())
        self._closing = True
        self.pending.clear()
        self._pending_bytes = 0
        self._held = None
        transport = self.transport
        if transport is None:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._resume_reading()  # read to drop: unread input would reset the connection
        self._linger = self.sim.loop.call_later(LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.close()

    # -- routing -------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self.keep_alive = request.keep_alive
        try:
            self._route(request)
        except RequestError as error:
            self.send_json(error.status, error.body(), _request_id(request))
            self._after_plain_response()

    def _after_plain_response(self) -> None:
        if not self.keep_alive:
            self._close()

    def _route(self, request: Request) -> None:
        routes = {
            "/v1/chat/completions": (b"POST", self._chat),
            "/v1/models": (b"GET", self._models),
            "/healthz": (b"GET", self._healthz),
            "/stats": (b"GET", self._stats),
            "/stats/reset": (b"POST", self._stats_reset),
        }
        route = routes.get(request.path)
        if route is None:
            raise RequestError(404, f"no route {request.path}", code="not_found")
        method, handler = route
        if request.method != method:
            raise RequestError(405, f"{request.path} takes {method.decode()}")
        handler(request)

    def _plain(self, request: Request, payload: Any) -> None:
        self.send_json(200, orjson.dumps(payload), _request_id(request))
        self._after_plain_response()

    def _healthz(self, request: Request) -> None:
        self._plain(request, {"status": "ok"})

    def _stats(self, request: Request) -> None:
        self._plain(request, self.sim.snapshot())

    def _stats_reset(self, request: Request) -> None:
        self.sim.reset()
        self._plain(request, self.sim.snapshot())

    def _models(self, request: Request) -> None:
        created = int(self.sim.stats.reset_at)
        names = [DEFAULT_MODEL] + [FAULT_MODEL_PREFIX + kind for kind in FAULT_KINDS]
        self._plain(
            request,
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "streamgate"}
                    for name in names
                ],
            },
        )

    def _chat(self, request: Request) -> None:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as error:
            raise RequestError(400, f"body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "body must be a JSON object")
        model = body.get("model", DEFAULT_MODEL)
        if not isinstance(model, str) or not model:
            raise RequestError(400, "model must be a non-empty string", param="model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "stream must be a boolean", param="stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestError(400, "stream_options must be an object", param="stream_options")
        include_usage = stream and bool(options and options.get("include_usage") is True)
        n_tokens = _token_count(body, self.sim.config.tokens)
        fault = _fault_of(model, request.headers)
        received_id = request.headers.get(REQUEST_ID_HEADER)
        received = received_id.decode("latin-1") if received_id is not None else None
        request_id = received or "req_sim" + os.urandom(8).hex()
        self.sim.stats.record_start(received, fault)
        if fault in ("429", "500"):
            status = int(fault)
            error = (
                _error_body("simulated rate limit", "requests", "rate_limit_exceeded")
                if status == 429
                else _error_body("simulated server error", "server_error", None)
            )
            self.sim.stats.completed += 1
            self.send_json(status, error, request_id)
            self._after_plain_response()
            return
        self.response = ChatResponse(
            self,
            self.sim,
            request,
            request_id,
            model,
            fault,
            n_tokens,
            stream,
            include_usage,
            _prompt_tokens(body),
        )
        self.response.start()


def _request_id(request: Request) -> str | None:
    value = request.headers.get(REQUEST_ID_HEADER)
    return value.decode("latin-1") if value is not None else None


async def start_server(config: SimConfig) -> tuple[asyncio.Server, Simulator]:
    """Listen on config.host:config.port in the running loop; returns the server and its state."""
    loop = asyncio.get_running_loop()
    sim = Simulator(config, loop)
    server = await loop.create_server(
        lambda: SimProtocol(sim), config.host, config.port, backlog=8192, reuse_address=True
    )
    return server, sim


def bound_port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


async def stop_server(server: asyncio.Server, sim: Simulator) -> None:
    """Stop listening and drop every connection: a stalled stream must not hold up a shutdown
    (since Python 3.12, Server.wait_closed waits for all connections)."""
    server.close()
    for connection in list(sim.connections):
        connection.abort()
    await asyncio.wait_for(server.wait_closed(), timeout=5)


class SimulatorThread:
    """A simulator on its own event loop in a background thread, for in-process tests.

    ``with SimulatorThread(SimConfig(port=0)) as sim: httpx.get(sim.url + "/healthz")``;
    ``sim.stats`` is the live Stats object (read it, or call ``sim.call(fn)`` to run code on the
    simulator's loop).
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.simulator: Simulator | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def stats(self) -> Stats:
        assert self.simulator is not None
        return self.simulator.stats

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            self._server, self.simulator = loop.run_until_complete(start_server(self.config))
            self.url = f"http://{self.config.host}:{bound_port(self._server)}"
        except BaseException as error:  # reported to the starting thread
            self._error = error
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(stop_server(self._server, self.simulator))
        loop.close()

    def start(self) -> SimulatorThread:
        self._thread = threading.Thread(target=self._run, name="streamgate-sim", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)
        if self._error is not None:
            raise self._error
        return self

    def call(self, function: Any, *args: Any) -> Any:
        """Run function(*args) on the simulator's loop and return its result."""
        assert self.loop is not None
        future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function(*args))
            except BaseException as error:
                future.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
