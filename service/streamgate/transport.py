"""A lean HTTP/1.1 transport for the openai SDK's HTTP client: asyncio protocol + httptools.

Why not the default (httpcore2 + h11): measured on this kit's load, it spends ~30 us of CPU per
streamed chunk in h11 and anyio layers, and its pool scans every idle connection on each request
(with a poll() syscall each), so the cost of a request grows with the number of open streams.
Here a chunk costs one httptools callback and one future wake-up, and the pool is a LIFO list.

The SDK still builds and sends the request (base URL, auth, headers, JSON body, error mapping);
this only moves bytes. Scope: http and https, HTTP/1.1, no proxies.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import overload

import httptools
import httpx2

# Pause reading from the upstream when this much body is buffered and not yet consumed.
_HIGH_WATER_BYTES = 64 * 1024
# Idle connections older than this are not reused: servers close idle keep-alive connections
# (uvicorn after 5 s), and a request written into a closing socket is wasted.
_IDLE_REUSE_S = 4.0
# At most this many idle connections are kept per upstream; the rest are closed when released.
MAX_IDLE_PER_ORIGIN = 256
# A response head (status line, headers, and any 1xx interim heads before it) larger than this
# is refused: real LLM servers send a few hundred bytes, and an unbounded head is unbounded memory.
MAX_HEAD_BYTES = 64 * 1024
# 1xx interim responses (100 Continue, 103 Early Hints) skipped before the final one, at most.
MAX_INTERIM_RESPONSES = 8


def upstream_ssl_context() -> ssl.SSLContext:
    """The one CA policy for every upstream client: the system's trust store, or the file and
    directory named by SSL_CERT_FILE / SSL_CERT_DIR (OpenSSL's own variables), in dev and on
    hosts alike. Not certifi's bundle: a platform team's private CA goes in the system store."""
    return ssl.create_default_context()


class UpstreamReadTimeout(httpx2.ReadTimeout):
    """No body bytes arrived before the caller's deadline."""


class UpstreamHeadTooLarge(httpx2.RemoteProtocolError):
    """The upstream's response head went over MAX_HEAD_BYTES."""


class _UnsolicitedResponse(Exception):
    """Bytes of a further response arrived on a connection whose response had ended."""


class _Connection(asyncio.Protocol):
    """One upstream TCP (or TLS) connection carrying one response at a time.

    Bytes belong to the request that is waiting for them, or to nobody: 1xx interim responses
    are skipped, and any byte that arrives while no request is waiting (idle in the pool, or
    after the response ended) makes the connection unusable, so it is closed instead of reused.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: Exception | None = None
        self.idle_since = 0.0
        self.idle = False  # in the pool: no request owns it, so no byte may arrive
        self.reused = False
        self._start_response()

    def _start_response(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.head_bytes = 0  # received before the final head was complete (MAX_HEAD_BYTES)
        self.interim_responses = 0
        self.headers_future: asyncio.Future[None] = self.loop.create_future()
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        # Resolved with None (bytes or the end came), _HANDOFF or _EXPIRED.
        self.waiter: asyncio.Future[object] | None = None
        self.paused = False
        self.deadline: float | None = None
        # Called with body bytes instead of buffering them while set (see read()).
        self.sink: Callable[[bytes], bool] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle or self.complete:
            # Nobody asked for these bytes: reusing the connection would hand them (another
            # request's answer, or junk) to the next request. Close it instead.
            self.keep_alive = False
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - we never ask for upgrades
            self._fail(httpx2.RemoteProtocolError("unexpected upgrade"))
            return
        except httptools.HttpParserError as exc:
            if self.complete:  # e.g. _UnsolicitedResponse from on_message_begin
                self.keep_alive = False  # our response is whole; the rest was unsolicited
                self.abort()
            else:
                self._fail(httpx2.RemoteProtocolError(f"bad HTTP from upstream: {exc}"))
            return
        if not self.headers_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(
                    UpstreamHeadTooLarge(f"upstream response head over {MAX_HEAD_BYTES} bytes")
                )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            if exc is None and self.status and not self._length_delimited():
                # A body without length or chunking ends where the connection ends.
                self.complete = True
                self.on_message_complete()
                self.keep_alive = False
                return
            self._fail(
                httpx2.RemoteProtocolError("upstream closed the connection mid-response")
                if exc is None
                else httpx2.ReadError(str(exc))
            )

    def _length_delimited(self) -> bool:
        delimiting = (b"content-length", b"transfer-encoding")
        return any(name.lower() in delimiting for name, _ in self.raw_headers)

    def pause_writing(self) -> None:  # request bodies are small; the OS buffer absorbs them
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            raise _UnsolicitedResponse  # stops the parser: see data_received

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # after the head, these are chunked trailers: not headers
            self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
            self.interim_responses += 1
            self.raw_headers = []
            if status == 101 or self.interim_responses > MAX_INTERIM_RESPONSES:
                raise httptools.HttpParserError(f"unexpected interim response {status}")
            return
        self.status = status
        self.headers_done = True
        if not self.headers_future.done():
            self.headers_future.set_result(None)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None and not self.body:
            if not sink(body):  # the consumer wants its task back
                self.sink = None
                waiter = self.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(_HANDOFF)
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER_BYTES and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if not self.headers_done:
            return  # the end of an interim response
        self.complete = True
        self.keep_alive = not self.closed and self.parser.should_keep_alive()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        if not self.headers_future.done():
            self.headers_future.set_exception(exc)
            self.headers_future.exception()  # mark retrieved: callers may have gone
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    # consumer side
    def take_buffered(self) -> bytes:
        chunk = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    @overload
    async def read(self, deadline: float | None = None, sink: None = None) -> bytes: ...
    @overload
    async def read(
        self, deadline: float | None, sink: Callable[[bytes], bool] | None
    ) -> bytes | None: ...
    async def read(
        self, deadline: float | None = None, sink: Callable[[bytes], bool] | None = None
    ) -> bytes | None:
        """The next body bytes; b"" at the end of the response. deadline: loop.time() based.

        With a `sink`, bytes arriving while waiting go to sink(bytes) from the protocol
        callback instead; when it returns False, read returns None (the sink took them all).

        The timer is lazy: a deadline that moved later since it was armed (the usual case, the
        gap deadline follows each chunk) re-arms it when it fires, instead of one timer per read.
        """
        while True:
            if self.body:
                return self.take_buffered()
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self.deadline = deadline
            if deadline is not None and (self.timer is None or self.timer_at > deadline):
                if self.timer is not None:
                    self.timer.cancel()
                self.timer_at = deadline
                self.timer = self.loop.call_at(deadline, self._on_timer)
            waiter = self.loop.create_future()
            self.waiter = waiter
            self.sink = sink
            try:
                await waiter
            finally:
                self.waiter = None
                self.sink = None
            result = waiter.result()
            if result is _HANDOFF:
                return None
            if result is _EXPIRED and not self.body and not self.complete:
                raise UpstreamReadTimeout("no data from upstream before the deadline")

    def _on_timer(self) -> None:
        self.timer = None
        deadline, waiter = self.deadline, self.waiter
        if waiter is None or deadline is None or waiter.done():
            return  # not waiting now: the next read arms a timer if it needs one
        if self.loop.time() + 0.001 < deadline:  # the deadline moved later since arming
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)
            return
        waiter.set_result(_EXPIRED)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_EXPIRED = object()
_HANDOFF = object()


class LeanResponseStream(httpx2.AsyncByteStream):
    """The body of one upstream response; `read(deadline)` is the fast path for the relay."""

    def __init__(self, pool: LeanTransport, key: tuple, connection: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._connection: _Connection | None = connection

    @property
    def connection(self) -> _Connection | None:
        """The connection while the body is being read (the relay reads it directly)."""
        return self._connection

    async def read(self, deadline: float | None = None) -> bytes:
        connection = self._connection
        if connection is None:
            return b""
        chunk = await connection.read(deadline)
        if not chunk:
            self._release()
        return chunk

    async def __aiter__(self):
        while chunk := await self.read():
            yield chunk

    def release(self) -> None:
        """The body was read to its end (or abandoned): pool or close the connection."""
        self._release()

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.complete and connection.keep_alive and not connection.closed:
            self._pool.put_idle(self._key, connection)
        else:
            connection.abort()

    async def aclose(self) -> None:
        # Not finished means the caller gave up (client gone, timeout): closing the socket is
        # what tells the LLM server to stop generating.
        self._release()


class LeanTransport(httpx2.AsyncBaseTransport):
    """httpx2 transport: HTTP/1.1 over asyncio protocols, LIFO keep-alive pool per origin."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[tuple, list[_Connection]] = {}
        # (origin, target) -> (request head the client sent, when): see learned_head().
        self._learned: dict[tuple, tuple[bytes, float]] = {}
        self._ssl_context = ssl_context
        self._closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = upstream_ssl_context()
        return self._ssl_context

    def put_idle(self, key: tuple, connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_ORIGIN:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        connection.cancel_timer()
        connection._start_response()
        connection.idle = True
        idle.append(connection)

    def _take_idle(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < _IDLE_REUSE_S:
                connection.reused = True
                connection.idle = False
                return connection
            connection.abort()
        return None

    async def _connect(self, key: tuple, connect_timeout: float | None) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        use_tls = scheme == "https"
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop),
                    host,
                    port,
                    ssl=self._ssl() if use_tls else None,
                    server_hostname=host if use_tls else None,
                )
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"connect to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx2.ConnectError(f"connect to {host}:{port} failed: {exc}") from exc
        return connection

    # Headers that are per request (or ours to set), never part of a learned request head.
    _PER_REQUEST_HEADERS = (
        b"accept-encoding",
        b"transfer-encoding",
        b"content-length",
        b"x-request-id",
    )

    def _head_of(self, request: httpx2.Request) -> bytes:
        """The request line and the headers that stay the same from one request to the next."""
        lines = [request.method.encode() + b" " + request.url.raw_path + b" HTTP/1.1"]
        for name, value in request.headers.raw:
            if name.lower() not in self._PER_REQUEST_HEADERS:
                lines.append(name + b": " + value)
        # Identity: a compressed stream would be held back by the decompressor.
        lines.append(b"Accept-Encoding: identity")
        return b"\r\n".join(lines) + b"\r\n"

    @staticmethod
    def encode(head: bytes, body: bytes, request_id: bytes | None) -> bytes:
        extra = b"X-Request-ID: " + request_id + b"\r\n" if request_id else b""
        return head + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body

    @staticmethod
    def origin(url: httpx2.URL) -> tuple[str, str, int]:
        scheme = url.scheme
        return scheme, url.host, url.port or (443 if scheme == "https" else 80)

    def learned_head(self, origin: tuple, target: bytes, max_age_s: float) -> bytes | None:
        """The head the client's own last POST to `target` used, if recent enough."""
        learned = self._learned.get((origin, target))
        if learned is None or time.monotonic() - learned[1] > max_age_s:
            return None
        return learned[0]

    async def exchange(
        self,
        origin: tuple,
        payload: bytes,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> _Connection:
        """Send one request; return its connection once the response headers are in."""
        if self._closed:
            raise httpx2.ConnectError("transport is closed")
        # A reused connection may have been closed by the server while idle; such a failure
        # (nothing received) is retried once on a fresh connection, never another idle one: a
        # server that closes after every answer (llama.cpp's does, while promising keep-alive)
        # leaves every idle connection stale at once.
        for attempt in range(2):
            connection = self._take_idle(origin) if attempt == 0 else None
            fresh = connection is None
            if connection is None:
                connection = await self._connect(origin, connect_timeout)
            assert connection.transport is not None
            connection.transport.write(payload)
            try:
                async with asyncio.timeout(read_timeout):
                    await connection.headers_future
            except TimeoutError as exc:
                connection.abort()
                raise httpx2.ReadTimeout("upstream sent no response headers in time") from exc
            except (httpx2.ReadError, httpx2.RemoteProtocolError):
                if fresh or connection.got_bytes:
                    raise
                continue
            except BaseException:
                connection.abort()  # cancelled while waiting: the upstream must hear it
                raise
            return connection
        raise httpx2.RemoteProtocolError("upstream closed reused connections")  # pragma: no cover

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        origin = self.origin(request.url)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        head = self._head_of(request)
        if request.method == "POST":
            self._learned[(origin, request.url.raw_path)] = (head, time.monotonic())
        request_id = request.headers.get("x-request-id")
        payload = self.encode(head, body, request_id.encode("latin-1") if request_id else None)
        connection = await self.exchange(
            origin, payload, timeouts.get("connect"), timeouts.get("read")
        )
        return httpx2.Response(
            status_code=connection.status,
            headers=connection.raw_headers,
            stream=LeanResponseStream(self, origin, connection),
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.abort()
        self._idle.clear()
