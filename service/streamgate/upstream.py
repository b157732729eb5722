"""The only code that talks to the LLM server.

The openai SDK makes the request (base URL, auth, headers, status errors); the response body
is read here as raw SSE bytes and each `data:` payload parsed once with orjson. Building the
SDK's pydantic objects for every chunk cost ~100 us per chunk on this kit's benchmark: more
than the whole relay budget. The HTTP client underneath is `transport.LeanTransport`, or the
SDK's own httpx2 transport when the upstream must be reached through a proxy (see
choose_transport): the relay reads both the same way, the lean one faster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2
import openai
import orjson
from httpx2._utils import URLPattern, get_environment_proxies

from .settings import Settings
from .transport import (
    LeanResponseStream,
    LeanTransport,
    UpstreamReadTimeout,
    upstream_ssl_context,
)

T = TypeVar("T")

__all__ = [
    "ChatStream",
    "TransportChoice",
    "UpstreamError",
    "UpstreamReadTimeout",
    "choose_transport",
    "complete_chat",
    "make_client",
    "open_chat_stream",
]

# Upstream statuses the client can act on are passed on; anything else is our upstream failing.
# Not 401/403: the upstream's credentials are the operator's, never the client's (clients have
# their own keys, checked by the gateway): a refusal there is a gateway fault, 502.
_PASSED_ON_STATUSES = {
    400: "bad_request",
    404: "not_found",
    413: "bad_request",
    422: "bad_request",
    429: "rate_limited",
}
_RETRYABLE_STATUSES = {500, 502, 503}
# One SSE event from the upstream larger than this is refused (502), not buffered: a chunk of
# a chat completion is a few hundred bytes.
MAX_EVENT_BYTES = 1024 * 1024
# A whole non-streamed completion, and an error body, at most (then 502).
MAX_COMPLETION_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
# How long a finished stream waits for its body's end so that the connection can be reused.
END_AFTER_DONE_S = 0.5
# An upstream's own error message, passed on to the client for a 4xx about its request, is cut.
MAX_PASSED_ON_MESSAGE_CHARS = 500


@dataclass(slots=True)
class UpstreamError(Exception):
    """A failure talking to the LLM server, with the status the client should see.

    `message` is for the client, in its terms ("upstream unreachable"); `detail` is for the log
    only (addresses, the transport's own words), next to the request id.
    """

    kind: str  # metrics label: connect, timeout, status_<n>, rate_limited, midstream, protocol...
    status: int
    message: str
    retryable: bool = False
    retry_after: str | None = None
    detail: str | None = None

    def __str__(self) -> str:
        text = f"{self.kind}: {self.message}"
        return f"{text} ({self.detail})" if self.detail else text

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "upstream_error", "code": self.kind}}


@dataclass(frozen=True, slots=True)
class TransportChoice:
    name: str  # "lean" or "sdk"
    reason: str  # for the startup log


def environment_proxy(url: str) -> str | None:
    """The proxy the SDK's httpx2 client would take from the environment for `url` (None:
    direct), by httpx2's own rules: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY."""
    mounts = {URLPattern(pattern): proxy for pattern, proxy in get_environment_proxies().items()}
    target = httpx2.URL(url)
    for pattern in sorted(mounts):  # most specific first, as httpx2's client matches them
        if pattern.matches(target):
            return mounts[pattern]
    return None


def choose_transport(settings: Settings) -> TransportChoice:
    """lean (no proxy support) unless set otherwise or a proxy applies to the upstream."""
    if settings.upstream_transport != "auto":
        return TransportChoice(settings.upstream_transport, "STREAMGATE_UPSTREAM_TRANSPORT")
    proxy = environment_proxy(settings.upstream_base_url or "")
    if proxy is None:
        return TransportChoice("lean", "auto: no proxy applies to the upstream")
    shown = httpx2.URL(proxy).copy_with(username=None, password=None)  # never its credentials
    return TransportChoice("sdk", f"auto: proxy {shown} applies to the upstream")


def make_client(settings: Settings, transport: str | None = None) -> openai.AsyncOpenAI:
    """One client per worker (made in the lifespan): one connection pool, deliberate timeouts."""
    name = transport or choose_transport(settings).name
    lean = name == "lean"
    timeout = httpx2.Timeout(
        connect=settings.connect_timeout_s,
        # Lean: until the response headers (the relay times the body). The SDK's transport
        # applies it to every socket read: there it must not cut a gap the relay allows.
        read=settings.first_token_timeout_s
        if lean
        else max(settings.first_token_timeout_s, settings.token_gap_timeout_s),
        write=settings.connect_timeout_s,
        pool=settings.connect_timeout_s,
    )
    trusted = upstream_ssl_context()
    if lean:
        http_client = httpx2.AsyncClient(
            transport=LeanTransport(trusted), timeout=timeout, follow_redirects=False
        )
    elif name == "aiohttp":
        http_client = openai.DefaultAioHttpClient(
            timeout=timeout, follow_redirects=False, verify=trusted
        )
    else:
        # The SDK's default client: its pool limits, and proxies from the environment.
        http_client = openai.DefaultAsyncHttpxClient(
            timeout=timeout, follow_redirects=False, verify=trusted
        )
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else ""
    return openai.AsyncOpenAI(
        base_url=settings.upstream_base_url,
        api_key=api_key or "not-needed",  # vLLM, Ollama and the simulator take any key
        timeout=timeout,
        max_retries=0,  # our own retry, and only before the first byte reaches the client
        http_client=http_client,
    )


def _error_from_status(status: int, body: Any, retry_after: str | None) -> UpstreamError:
    upstream_says = _upstream_message(body)
    detail = f"upstream answered HTTP {status}: {upstream_says or 'no message'}"[:1000]
    if status in _PASSED_ON_STATUSES:
        # About the client's own request (bad model, rate limit): the upstream's words help it.
        client_status = {429: 429, 404: 404}.get(status, 400)
        message = upstream_says or f"upstream refused the request (HTTP {status})"
        return UpstreamError(
            _PASSED_ON_STATUSES[status],
            client_status,
            message[:MAX_PASSED_ON_MESSAGE_CHARS],
            retry_after=retry_after,
            detail=detail,
        )
    if status in (408, 504):
        return UpstreamError("timeout", 504, "upstream timed out", detail=detail)
    if status in (401, 403):
        return UpstreamError(
            "upstream_auth", 502, "upstream refused the gateway's credentials", detail=detail
        )
    return UpstreamError(
        f"status_{status}",
        502,
        f"upstream failed (HTTP {status})",
        retryable=status in _RETRYABLE_STATUSES,
        detail=detail,
    )


def _error_from_sdk(exc: Exception) -> UpstreamError:
    if isinstance(exc, openai.APIStatusError):
        return _error_from_status(
            exc.status_code, exc.body, exc.response.headers.get("retry-after")
        )
    cause = exc.__cause__ if isinstance(exc, openai.APIConnectionError) and exc.__cause__ else exc
    detail = f"{type(cause).__name__}: {cause}"[:1000]
    if isinstance(exc, openai.APITimeoutError) or isinstance(cause, httpx2.TimeoutException):
        return UpstreamError("timeout", 504, "upstream timed out", detail=detail)
    if isinstance(cause, httpx2.RemoteProtocolError):  # bad HTTP, an oversized head
        return _invalid_response(detail)
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return UpstreamError("connect", 502, "upstream unreachable", retryable=True, detail=detail)
    return _invalid_response(detail)


def _upstream_message(body: Any) -> str | None:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
        if isinstance(body.get("message"), str):
            return body["message"]
    return None


async def _with_retries(settings: Settings, attempt: Callable[[], Awaitable[T]]) -> T:
    """Retry failures that happen before anything was relayed, and only those."""
    attempts = settings.upstream_retries + 1
    for number in range(attempts):
        try:
            return await attempt()
        except UpstreamError as error:
            if not error.retryable or number == attempts - 1:
                raise
        await asyncio.sleep(min(0.1 * 2**number, 1.0))
    raise AssertionError("unreachable")  # pragma: no cover


async def _post(
    client: openai.AsyncOpenAI, settings: Settings, payload: dict[str, Any], request_id: str
) -> httpx2.Response:
    """POST /chat/completions through the SDK (with retries before anything was relayed)."""

    async def attempt() -> httpx2.Response:
        try:
            return await client.post(
                "/chat/completions",
                body=payload,
                cast_to=httpx2.Response,
                stream=True,
                options={"headers": {"X-Request-ID": request_id}},
            )
        except (openai.APIError, httpx2.HTTPError) as exc:
            raise _error_from_sdk(exc) from exc

    return await _with_retries(settings, attempt)


# The request head the SDK sent last is reused this long; then the SDK sends one itself again,
# so a rotated key or changed header reaches the upstream within this time.
LEARNED_HEAD_MAX_AGE_S = 60.0


def _chat_endpoint(client: openai.AsyncOpenAI) -> tuple[LeanTransport, tuple, bytes] | None:
    """(lean transport, origin, target) for chat completions, if the client uses our transport."""
    transport = getattr(client._client, "_transport", None)
    if not isinstance(transport, LeanTransport):
        return None
    base = client.base_url
    return transport, transport.origin(base), base.raw_path.rstrip(b"/") + b"/chat/completions"


async def _post_learned(
    transport: LeanTransport,
    origin: tuple,
    head: bytes,
    settings: Settings,
    payload: dict[str, Any],
    request_id: str,
) -> ChatStream:
    """The SDK's request, replayed: its head (auth, headers) with this request's body.

    The SDK spends ~170 us of CPU building each request (pydantic options, URL and header
    objects); with 50-token answers that alone is 3-4 us per relayed chunk.
    """
    message = LeanTransport.encode(head, orjson.dumps(payload), request_id.encode())
    try:
        connection = await transport.exchange(
            origin, message, settings.connect_timeout_s, settings.first_token_timeout_s
        )
    except httpx2.HTTPError as exc:
        raise _error_from_sdk(exc) from exc
    stream = LeanResponseStream(transport, origin, connection)
    status, raw_headers = connection.status, connection.raw_headers  # reset when pooled
    if status >= 300:
        deadline = asyncio.get_running_loop().time() + settings.connect_timeout_s
        parts, size = [], 0
        try:
            while (chunk := await stream.read(deadline)) and size < MAX_ERROR_BODY_BYTES:
                parts.append(chunk)
                size += len(chunk)
        except httpx2.HTTPError:
            pass
        finally:
            await stream.aclose()
        try:
            body = orjson.loads(b"".join(parts))
        except orjson.JSONDecodeError:
            body = None
        retry_after = next(
            (
                value.decode("latin-1")
                for name, value in raw_headers
                if name.lower() == b"retry-after"
            ),
            None,
        )
        raise _error_from_status(status, body, retry_after)
    return ChatStream(None, stream)


class ChatStream:
    """One streaming chat completion, read as raw SSE and parsed one `data:` payload at a time."""

    __slots__ = (
        "_buffer",
        "_fallback_iter",
        "_fallback_next",
        "_lean",
        "_loop",
        "_started",
        "finished",
        "response",
    )

    def __init__(
        self, response: httpx2.Response | None, lean: LeanResponseStream | None = None
    ) -> None:
        self.response = response
        self._loop = asyncio.get_running_loop()
        self._buffer = b""
        self._started = False  # a first byte not a byte order mark has been seen
        self.finished = False  # "data: [DONE]" seen
        if lean is None and response is not None:
            # httpx2's client wraps the transport's stream (to time it): unwrap to reach ours.
            stream = getattr(response.stream, "_stream", response.stream)
            lean = stream if isinstance(stream, LeanResponseStream) else None
        self._lean = lean
        self._fallback_iter = (
            None if lean is not None or response is None else response.aiter_raw().__aiter__()
        )
        self._fallback_next: asyncio.Future[bytes] | None = None

    async def _read(self, deadline: float | None, sink=None) -> bytes | None:
        lean = self._lean
        if lean is not None:
            connection = lean.connection
            if connection is None:
                return b""
            chunk = await connection.read(deadline, sink)
            if chunk == b"":
                lean.release()
            return chunk
        # Any other httpx2 transport (tests, custom clients): slower, same semantics, no sink.
        if self._fallback_next is None:
            assert self._fallback_iter is not None  # set whenever there is no lean stream
            self._fallback_next = asyncio.ensure_future(self._fallback_iter.__anext__())
        timeout = None if deadline is None else max(0.0, deadline - self._loop.time())
        done, _ = await asyncio.wait({self._fallback_next}, timeout=timeout)
        if not done:
            raise UpstreamReadTimeout("no data from upstream before the deadline")
        future, self._fallback_next = self._fallback_next, None
        try:
            return future.result()
        except StopAsyncIteration:
            return b""

    def extend_deadline(self, deadline: float) -> None:
        """Move the pending read's deadline (used by a sink, which sees data arrive)."""
        if self._lean is not None and self._lean.connection is not None:
            self._lean.connection.deadline = deadline

    async def read_events(
        self, deadline: float | None = None, sink: Callable[[bytes], bool] | None = None
    ) -> list[dict[str, Any]] | None:
        """Parsed payloads from the next bytes ([] if no event completed yet); None at the end.

        After `data: [DONE]` the events before it are returned and `finished` is set. Raises
        UpstreamReadTimeout at `deadline` (loop.time() based) and UpstreamError for an error
        event or a broken stream. With a `sink` (lean transport only), bytes that arrive are
        handed to it from the connection's callback; [] is returned when it hands back.
        """
        try:
            chunk = await self._read(deadline, sink)
        except UpstreamReadTimeout:
            raise
        except httpx2.HTTPError as exc:
            raise UpstreamError(
                "midstream", 502, "upstream stream broke", detail=f"{type(exc).__name__}: {exc}"
            ) from exc
        if chunk is None:
            return []
        if not chunk:
            if self._buffer.strip():
                raise _invalid_response("stream ended mid-event")
            return None
        return self.parse(chunk)

    def parse(self, chunk: bytes) -> list[dict[str, Any]]:
        """Events completed by `chunk` (the rest is kept for the next call)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if not self._started:  # one byte order mark may open the stream (WHATWG rules)
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer
                return []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        held = b""
        if b"\r" in buffer:  # servers may end lines with CRLF or CR; the events split on LF
            if buffer.endswith(b"\r"):  # may be the first half of a CRLF cut between reads
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n\n" not in buffer:
            buffer += held
            if len(buffer) > MAX_EVENT_BYTES:
                raise _invalid_response(f"one event over {MAX_EVENT_BYTES} bytes")
            self._buffer = buffer
            return []
        *complete, rest = buffer.split(b"\n\n")
        self._buffer = rest + held
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise _invalid_response(f"one event over {MAX_EVENT_BYTES} bytes")
        events: list[dict[str, Any]] = []
        for block in complete:
            payload, event_name = _data_of(block)
            if payload is None:
                continue
            if payload == b"[DONE]":
                self.finished = True
                self._buffer = b""
                return events
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                raise _invalid_response("an unparsable chunk") from exc
            if event_name == b"error" or (isinstance(event, dict) and "error" in event):
                raise UpstreamError(
                    "midstream", 502, "upstream error mid-stream", detail=_midstream_message(event)
                )
            events.append(event)
        return events

    async def aclose(self) -> None:
        """Closing before the end closes the upstream connection: the LLM server stops.

        After `data: [DONE]` only the body's end (a last empty chunk) is left, often in a later
        read: waiting a moment for it lets the connection be pooled instead of closed, which
        saves a connection (and a TLS handshake) per stream. The client has its answer by then.
        """
        try:
            if self.finished:
                await self._read_to_the_end()
        finally:
            if self._fallback_next is not None:
                self._fallback_next.cancel()
            if self.response is not None:
                await self.response.aclose()
            elif self._lean is not None:
                await self._lean.aclose()

    async def _read_to_the_end(self) -> None:
        deadline = self._loop.time() + END_AFTER_DONE_S
        try:
            for _ in range(4):  # the end, or a few stray bytes: then the connection is closed
                if not await self._read(deadline):
                    return
        except (UpstreamReadTimeout, httpx2.HTTPError):
            pass


_BOM = "\ufeff".encode()


def _data_of(block: bytes) -> tuple[bytes | None, bytes | None]:
    """The data and event name of one SSE event block (per the WHATWG parsing rules)."""
    if block.startswith(b"data: ") and b"\n" not in block:  # the common case, one line
        return block[6:], None
    data_lines: list[bytes] = []
    event_name = None
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data_lines.append(value)
        elif field == b"event":
            event_name = value
    if not data_lines:
        return None, event_name
    return b"\n".join(data_lines), event_name


def _invalid_response(detail: str) -> UpstreamError:
    """The upstream answered, but not in a form we relay (bad HTTP, an oversized or unparsable
    event): the client reads this, the log the detail. Not retried: retrying won't mend it."""
    return UpstreamError("protocol", 502, "upstream sent an invalid response", detail=detail)


def _midstream_message(event: Any) -> str:
    """What the upstream's error event says, for the log."""
    if isinstance(event, dict):
        inner = event.get("error", event)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:1000]
        if isinstance(inner, str):
            return inner[:1000]
    return "an error event without a message"


async def open_chat_stream(
    client: openai.AsyncOpenAI, settings: Settings, payload: dict[str, Any], request_id: str
) -> ChatStream:
    """Start a streaming completion; raises UpstreamError (status for the client) on failure."""
    payload = {**payload, "stream": True}
    endpoint = _chat_endpoint(client)
    if endpoint is not None:
        transport, origin, target = endpoint
        head = transport.learned_head(origin, target, LEARNED_HEAD_MAX_AGE_S)
        if head is not None:
            return await _with_retries(
                settings,
                lambda: _post_learned(transport, origin, head, settings, payload, request_id),
            )
    return ChatStream(await _post(client, settings, payload, request_id))


async def complete_chat(
    client: openai.AsyncOpenAI,
    settings: Settings,
    payload: dict[str, Any],
    request_id: str,
    deadline: float,
) -> tuple[int, bytes, str]:
    """A non-streaming completion: (status, body, content type) from the upstream, verbatim."""
    response = await _post(client, settings, {**payload, "stream": False}, request_id)
    stream = ChatStream(response)
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = await stream._read(deadline)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_COMPLETION_BYTES:
                raise _invalid_response(f"completion over {MAX_COMPLETION_BYTES} bytes")
    except UpstreamReadTimeout as exc:
        raise UpstreamError(
            "timeout", 504, "upstream timed out", detail="completion not finished in time"
        ) from exc
    except httpx2.HTTPError as exc:
        raise UpstreamError(
            "midstream", 502, "upstream stream broke", detail=f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        await stream.aclose()
    content_type = response.headers.get("content-type", "application/json")
    return response.status_code, b"".join(parts), content_type
