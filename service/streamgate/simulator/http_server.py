"""The simulator's HTTP/1.1 layer: an asyncio Protocol per connection, bounded whatever a
client sends, that parses requests, answers them in order and routes them.

Why not a web framework: the simulator must never be the bottleneck of a benchmark (one process
holds 5,000 concurrent streams on two cores); a framework costs a coroutine and several object
layers per token. The Protocol also hears a client's disconnect at once (``connection_lost``),
even while a stream is stalled and nothing is being written: that is what makes the
``cancelled`` counter a proof that a gateway closed its upstream request.

The wire format, routes and faults are described in the package docstring.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools
import orjson

from streamgate.simulator.config import SimConfig
from streamgate.simulator.faults import (
    FAULT_KINDS,
    FAULT_MODEL_PREFIX,
    IMMEDIATE_FAULTS,
    fault_of,
    immediate_error,
)
from streamgate.simulator.openai_format import (
    DEFAULT_MODEL,
    RequestError,
    models_list,
    read_chat_request,
)
from streamgate.simulator.simulation import ChatResponse, Simulator

REQUEST_ID_HEADER = b"x-request-id"

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
_LAST_CHUNK = b"0\r\n\r\n"


@dataclass(slots=True)
class Request:
    method: bytes
    path: str
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool
    http11: bool
    size: int  # head + body bytes: what it costs while queued behind another answer


def _head(status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
    lines.extend(name + b": " + value for name, value in headers)
    lines.append(b"connection: keep-alive" if keep_alive else b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


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

    def send_head(self, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        """A response head whose body follows in write_body calls."""
        self.write(_head(status, headers, keep_alive))

    def write_body(self, payload: bytes, chunked: bool, end: bool = False) -> None:
        """Write payload as one chunk (HTTP/1.1) or as is (1.0); `end` adds the terminating
        chunk to the same write."""
        if chunked:
            terminator = _LAST_CHUNK if end else b""
            self.write(b"%x\r\n%b\r\n%b" % (len(payload), payload, terminator))
        else:
            self.write(payload)

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
        names = [DEFAULT_MODEL] + [FAULT_MODEL_PREFIX + kind for kind in FAULT_KINDS]
        self._plain(request, models_list(names, int(self.sim.stats.reset_at)))

    def _chat(self, request: Request) -> None:
        chat = read_chat_request(request.body, self.sim.config.tokens)
        fault = fault_of(chat.model, request.headers)
        received = _request_id(request)
        request_id = received or "req_sim" + os.urandom(8).hex()
        self.sim.stats.record_start(received, fault)
        if fault in IMMEDIATE_FAULTS:
            status, error = immediate_error(fault)
            self.sim.stats.completed += 1
            self.send_json(status, error, request_id)
            self._after_plain_response()
            return
        self.response = ChatResponse(
            self,
            self.sim,
            request.http11,
            request_id,
            chat.model,
            fault,
            chat.n_tokens,
            chat.stream,
            chat.include_usage,
            chat.prompt_tokens,
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
