"""The three chat routes, as pure ASGI endpoints.

Pure ASGI rather than StreamingResponse: one coroutine per request sends each chunk itself, so
a chunk costs one `send` and no per-chunk task switches, and a client disconnect is seen by a
watcher on `receive` that cancels the relay at once (the upstream connection closes in its
`finally`), whether the relay is waiting for the first token or mid-stream.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import orjson

from .. import framing, metrics
from ..auth import Unauthorized
from ..chat_request import (
    OPENAI,
    SSE,
    TEXT,
    ChatRequest,
    InvalidRequest,
    parse_chat_request,
)
from ..logs import LOGGER, log_request
from ..settings import Settings
from ..upstream import (
    ChatStream,
    UpstreamError,
    UpstreamReadTimeout,
    complete_chat,
    open_chat_stream,
)
from ..worker import SEND_TIMED_OUT

ROUTES = {
    "/v1/chat/stream": TEXT,
    "/v1/chat/stream-sse": SSE,
    "/v1/chat/completions": OPENAI,
}
MEDIA_TYPES = {
    TEXT: b"text/plain; charset=utf-8",
    SSE: b"text/event-stream; charset=utf-8",
    OPENAI: b"text/event-stream; charset=utf-8",
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
TOTAL_TIMEOUT_GRACE_S = 1.0


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is over `limit` bytes."""
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


class _ClientGone(Exception):
    """The client left before its request body arrived: nobody to answer."""


def _request_id(scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _REQUEST_ID.fullmatch(value.decode("latin-1")):
                return value
            break
    return uuid.uuid4().hex.encode()


class Outcome:
    """What happened to one request, for the access log and the request counter."""

    __slots__ = ("client", "duration_s", "error", "finish_reason", "outcome", "status", "tokens",
                 "ttft_s", "usage")

    def __init__(self) -> None:
        self.client: str | None = None  # the client key's name, when keys are configured
        self.status = 200
        self.outcome = "ok"
        self.ttft_s: float | None = None
        self.tokens = 0
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.duration_s = 0.0


class ChatEndpoint:
    """ASGI app for one chat route; settings and the upstream client come from app.state."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.route_label = {TEXT: "stream", SSE: "stream-sse", OPENAI: "completions"}[route]
        self.ttft_metric = metrics.TTFT.labels(self.route_label)
        self.tokens_metric = metrics.TOKENS.labels(self.route_label)

    async def __call__(self, scope, receive, send) -> None:
        state = scope["app"].state
        settings: Settings = state.settings
        loop = asyncio.get_running_loop()
        started_at, started_perf = loop.time(), time.perf_counter()
        request_id = _request_id(scope)
        outcome = Outcome()
        relay: _Relay | None = None
        try:
            if state.client_keys:  # before the body: a stranger's upload costs us nothing
                try:
                    outcome.client = state.client_keys.identify(scope["headers"])
                except Unauthorized as exc:
                    outcome.status, outcome.outcome = 401, "unauthorized"
                    outcome.error = exc.message
                    await _send_json(send, 401, framing.error_body(
                        exc.message, code="invalid_api_key"), request_id,
                        [(b"www-authenticate", exc.challenge)])
                    return
            try:
                try:
                    async with asyncio.timeout(settings.request_body_timeout_s):
                        body = await _read_body(receive, settings.max_prompt_chars * 6 + 65536)
                except TimeoutError:
                    raise InvalidRequest("request body not received in time", status=408) from None
                if body is None:
                    raise InvalidRequest("request body too large", status=413)
                request = parse_chat_request(body, settings, self.route)
            except InvalidRequest as exc:
                outcome.status, outcome.outcome, outcome.error = exc.status, "invalid", exc.message
                # The rest of a body that timed out may still come: not on this connection.
                close = [(b"connection", b"close")] if exc.status == 408 else None
                await _send_json(send, exc.status, framing.error_body(
                    exc.message, param=exc.param, code=exc.code), request_id, close)
                return
            relay = _Relay(self, state, settings, request, request_id, send, outcome, started_at,
                           started_perf)
            run = relay.run_non_stream if self.route == OPENAI and not request.stream else relay.run
            await _until_disconnect(relay, run, receive)
        except _ClientGone:
            outcome.outcome = "client_disconnect"
        except Exception as exc:
            # A bug of ours, never the client's: a JSON 500 if nothing was sent yet, and the log
            # and the metrics record what the client really got.
            outcome.outcome, outcome.error = "internal_error", f"{type(exc).__name__}: {exc}"
            LOGGER.exception("request %s failed", request_id.decode())
            if relay is None or not relay.response_started:
                outcome.status = 500
                await _send_json(send, 500, framing.error_body(
                    "internal error in the gateway", "server_error"), request_id)
        finally:
            if scope.get("extensions", {}).get(SEND_TIMED_OUT):
                outcome.outcome = "send_timeout"  # the worker cut a client that read nothing
            outcome.duration_s = time.perf_counter() - started_perf
            metrics.REQUESTS.labels(self.route_label, str(outcome.status)).inc()
            log_request(scope, request_id, self.route_label, outcome)


async def _until_disconnect(relay: _Relay, run, receive) -> None:
    """await run() (one of relay's); if the client leaves first, cancel it (closing the upstream)
    at once."""
    outcome = relay.outcome
    task = asyncio.current_task()
    assert task is not None

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not relay.finished:
            relay.client_gone = True
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        # The relay times its reads itself; this bounds the rest (sends to a client that reads
        # slowly), a moment later so that the relay's own timeout, with its error, comes first.
        async with asyncio.timeout_at(relay.started_at + relay.settings.total_timeout_s
                                      + TOTAL_TIMEOUT_GRACE_S):
            await run()
    except TimeoutError:
        outcome.outcome, outcome.error = "timeout", "total time, sending to the client"
        if not relay.response_started:
            outcome.status = 504
            await _send_json(relay.send, 504, framing.error_body(
                "upstream timeout: total time", "upstream_error", code="timeout"),
                relay.request_id)
    except asyncio.CancelledError:
        # Our own cancellation (the client left) ends here; any other one goes on up.
        if not relay.client_gone or task.uncancel() > 0:
            raise
        outcome.outcome = "client_disconnect"
        phase = "first_token" if outcome.ttft_s is None else "streaming"
        metrics.DISCONNECTS.labels(relay.endpoint.route_label, phase).inc()
    finally:
        relay.finished = True
        watcher.cancel()


async def _send_json(send, status: int, body: bytes, request_id: bytes,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache"),
        (b"x-request-id", request_id),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Relay:
    """One stream: upstream events in, framed chunks out, every rule about time in one loop."""

    def __init__(self, endpoint: ChatEndpoint, state, settings: Settings, request: ChatRequest,
                 request_id: bytes, send, outcome: Outcome, started_at: float,
                 started_perf: float) -> None:
        self.endpoint = endpoint
        self.client = state.upstream_client
        self.settings = settings
        self.request = request
        self.request_id = request_id
        self.send = send
        self.outcome = outcome
        self.started_at = started_at
        self.response_started = False
        self.finished = False
        self.client_gone = False
        # Heartbeats only on SSE (comments are part of that format), only before the first token.
        self.next_ping = (started_at + settings.heartbeat_s if endpoint.route == SSE
                          else float("inf"))
        self.started_perf = started_perf  # metrics and logs use perf_counter (sub-ms)

    async def _start(self) -> None:
        self.response_started = True
        await self.send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", MEDIA_TYPES[self.endpoint.route]),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-request-id", self.request_id),
            ],
        })

    def _upstream_payload(self) -> dict[str, Any]:
        return self.request.upstream_payload(self.settings.upstream_include_usage)

    async def _fail_before_start(self, error: UpstreamError) -> None:
        self.outcome.status, self.outcome.outcome = error.status, "upstream_error"
        self.outcome.error = str(error)
        extra = [(b"retry-after", error.retry_after.encode())] if error.retry_after else None
        await _send_json(self.send, error.status, orjson.dumps(error.to_body()), self.request_id,
                         extra)

    async def run_non_stream(self) -> None:
        deadline = self.started_at + self.settings.total_timeout_s
        try:
            status, body, content_type = await complete_chat(
                self.client, self.settings, self._upstream_payload(), self.request_id.decode(),
                deadline)
        except UpstreamError as error:
            await self._fail(error)
            return
        self.outcome.status = status
        self.finished = self.response_started = True  # a hang-up from here on is no cancellation
        await self.send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", self.request_id),
        ]})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def run(self) -> None:
        settings, outcome = self.settings, self.outcome
        total_deadline = self.started_at + settings.total_timeout_s
        try:
            async with asyncio.timeout_at(total_deadline):
                stream = await self._open()
        except TimeoutError:
            await self._fail(UpstreamError("timeout", 504, "upstream timeout: total time"))
            return
        except UpstreamError as error:
            await self._fail(error)
            return
        metrics.ACTIVE_STREAMS.inc()
        try:
            await self._pump(stream, total_deadline)
        except UpstreamError as error:
            await self._fail(error)
        finally:
            metrics.ACTIVE_STREAMS.dec()
            self.endpoint.tokens_metric.inc(outcome.tokens)
            await stream.aclose()

    async def _open(self) -> ChatStream:
        """Start the upstream request; SSE clients get heartbeats if its headers are slow."""
        opening = open_chat_stream(self.client, self.settings, self._upstream_payload(),
                                   self.request_id.decode())
        if self.endpoint.route != SSE:
            return await opening
        task = asyncio.ensure_future(opening)
        loop = asyncio.get_running_loop()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=max(0.0, self.next_ping - loop.time()))
                if done:
                    return task.result()
                await self._ping(loop.time())
        finally:
            if not task.done():
                task.cancel()  # its own cleanup closes the upstream connection

    async def _ping(self, now: float) -> None:
        self.next_ping = now + self.settings.heartbeat_s
        if not self.response_started:
            await self._start()
        await self.send({"type": "http.response.body", "body": framing.SSE_PING,
                         "more_body": True})

    async def _fail(self, error: UpstreamError) -> None:
        outcome = self.outcome
        outcome.outcome, outcome.error = "upstream_error", str(error)
        metrics.UPSTREAM_ERRORS.labels(error.kind).inc()
        # The answer is complete after this: a client that leaves now (e.g. while the upstream
        # connection is being closed, which can wait on the SDK transport) is no hang-up.
        self.finished = True
        if not self.response_started:
            await self._fail_before_start(error)
            return
        route = self.endpoint.route
        if route == SSE:
            body = framing.sse_error(error.kind, error.message)
        elif route == OPENAI:
            body = framing.openai_error(error.kind, error.message)
        else:
            # Plain text has no in-band error: end without the final chunk, so the client's
            # HTTP library reports an incomplete body instead of a short answer.
            outcome.outcome = "aborted"
            return
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _pump(self, stream: ChatStream, total_deadline: float) -> None:
        self.gaps = metrics.GapRecorder()
        try:
            await self._pump_events(stream, total_deadline)
        finally:
            self.gaps.flush()

    async def _pump_events(self, stream: ChatStream, total_deadline: float) -> None:
        settings, outcome, send = self.settings, self.outcome, self.send
        route = self.endpoint.route
        loop = asyncio.get_running_loop()
        self.word = word = (
            framing.WordCoalescer() if self.request.granularity == "word" else None
        )
        flush_s = settings.word_flush_ms / 1000
        self.gap_s = gap_s = settings.token_gap_timeout_s
        self.total_deadline = total_deadline
        first_deadline = min(self.started_at + settings.first_token_timeout_s, total_deadline)
        self.include_usage = self.request.include_usage
        self.last_event_at = loop.time()
        self.last_sent_at: float | None = None
        self.held_since: float | None = None
        self.chunk_meta: dict[str, Any] | None = None  # id/created/model for rebuilt chunks
        self.blocked_send = None
        self.sink_error: BaseException | None = None
        self.content_seen = False  # TTFT counts content, not a role-only first chunk
        self.stream = stream
        self.loop = loop
        # Once the first token is out, token-granularity chunks are relayed straight from the
        # upstream connection's callback (no task wake-up per chunk); see _relay_now.
        sink = self._relay_now if word is None else None

        while True:
            if outcome.ttft_s is None:
                hard_deadline, why = first_deadline, "first token"
                wake_at = min(first_deadline, self.next_ping)
            else:
                hard_deadline = min(self.last_event_at + gap_s, total_deadline)
                why = "gap between tokens"
                wake_at = hard_deadline
            held_since = self.held_since
            if held_since is not None and held_since + flush_s < wake_at:
                wake_at = held_since + flush_s
            try:
                events = await stream.read_events(
                    wake_at, sink if self.response_started and outcome.ttft_s is not None
                    else None)
            except UpstreamReadTimeout:
                now = loop.time()
                hard_deadline = (first_deadline if outcome.ttft_s is None
                                 else min(self.last_event_at + gap_s, total_deadline))
                if now >= hard_deadline:
                    if hard_deadline >= total_deadline:
                        why = "total time"
                    raise UpstreamError("timeout", 504, f"upstream timeout: {why}") from None
                if self.held_since is not None and now >= self.held_since + flush_s:
                    self.held_since = None
                    text = word.flush()
                    if text:
                        await self._send_out([self._frame(text)])
                if now >= self.next_ping:
                    await self._ping(now)
                continue
            if self.blocked_send is not None:  # the callback path met a slow client
                await self._finish_blocked_send()
            if self.sink_error is not None:
                error, self.sink_error = self.sink_error, None
                raise error
            if events is None:
                if outcome.finish_reason is None:
                    raise UpstreamError("midstream", 502, "upstream stream ended before [DONE]")
                break
            if events:
                now = loop.time()
                self.last_event_at = now
                out = self._frames_of(events, now)
                if out:
                    await self._send_out(out)
            if stream.finished:
                break

        tail = word.flush() if word is not None else ""
        self.finished = True
        end = self._frame(tail) if tail else b""
        if route == SSE:
            end += framing.sse_done(outcome.usage, outcome.finish_reason)
        elif route == OPENAI:
            if word is not None:
                meta = self.chunk_meta or {}
                chunk_id, created = meta.get("id", ""), meta.get("created", 0)
                model = meta.get("model", self.request.model)
                end += framing.openai_chunk(chunk_id, created, model, None, outcome.finish_reason)
                if self.include_usage and outcome.usage:
                    end += framing.openai_chunk(chunk_id, created, model, None,
                                                usage=outcome.usage)
            end += framing.OPENAI_DONE
        if not self.response_started:
            await self._start()
        await send({"type": "http.response.body", "body": end, "more_body": False})

    def _frames_of(self, events: list[dict[str, Any]], now: float) -> list[bytes]:
        """The framed bytes for a batch of upstream events (shared by both relay paths)."""
        outcome, route, word = self.outcome, self.endpoint.route, self.word
        out: list[bytes] = []
        for event in events:
            choices = event.get("choices")
            usage = event.get("usage")
            if usage:
                outcome.usage = usage
            content = None
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content")
                if choice.get("finish_reason"):
                    outcome.finish_reason = choice["finish_reason"]
            if content:
                outcome.tokens += 1
                self.content_seen = True
            if route == OPENAI and word is None:
                # Token granularity: the upstream chunk as it came (every field kept).
                if not choices and usage and not self.include_usage:
                    continue
                if not self.include_usage and "usage" in event:
                    del event["usage"]
                out.append(framing.openai_data(orjson.dumps(event)))
                continue
            if not content:
                if route == OPENAI and self.chunk_meta is None:
                    self.chunk_meta = event
                continue
            if word is not None:
                if self.chunk_meta is None:
                    self.chunk_meta = event
                was_holding = bool(word.pending)
                content = word.push(content)
                if word.pending and not was_holding:
                    self.held_since = now
                elif not word.pending:
                    self.held_since = None
                if not content:
                    continue
            out.append(self._frame(content))
        return out

    def _note_sent(self) -> None:
        outcome, now = self.outcome, time.perf_counter()
        if outcome.ttft_s is None:
            if not self.content_seen:
                return  # e.g. OpenAI's role-only first chunk: the first token is still due
            outcome.ttft_s = now - self.started_perf
            self.endpoint.ttft_metric.observe(outcome.ttft_s)
        elif self.last_sent_at is not None:
            self.gaps.add(now - self.last_sent_at)
        self.last_sent_at = now

    async def _send_out(self, out: list[bytes]) -> None:
        self._note_sent()
        if not self.response_started:
            await self._start()
        await self.send({"type": "http.response.body",
                         "body": out[0] if len(out) == 1 else b"".join(out), "more_body": True})

    def _relay_now(self, chunk: bytes) -> bool:
        """Relay upstream bytes from inside the connection's callback; False wakes the task.

        Runs only while the relay task is parked on the upstream read, after the first token,
        at token granularity: parse, frame, and drive the server's `send` coroutine to its
        end right here. If `send` has to wait (a slow client), or the stream ends or fails,
        the task is woken to take over; nothing is lost or reordered either way.
        """
        try:
            return self._relay_now_unguarded(chunk)
        except BaseException as error:  # never into the protocol callback: the task re-raises
            self.sink_error = error
            return False

    def _relay_now_unguarded(self, chunk: bytes) -> bool:
        events = self.stream.parse(chunk)
        if events:
            now = self.loop.time()
            self.last_event_at = now
            out = self._frames_of(events, now)
            if out:
                self._note_sent()
                message = {"type": "http.response.body",
                           "body": out[0] if len(out) == 1 else b"".join(out),
                           "more_body": True}
                coroutine = self.send(message)
                try:
                    waiting_on = coroutine.send(None)
                except StopIteration:
                    pass
                else:
                    self.blocked_send = (coroutine, waiting_on)
                    return False
            self.stream.extend_deadline(min(now + self.gap_s, self.total_deadline))
        return not self.stream.finished

    async def _finish_blocked_send(self) -> None:
        """Drive a send the callback path started to its end, in the task (it may wait)."""
        coroutine, waiting_on = self.blocked_send
        self.blocked_send = None
        try:
            while True:
                if waiting_on is None:  # a bare yield: just let the loop run once
                    await asyncio.sleep(0)
                else:
                    # It was yielded to us, not to a task: clear the flag a task would clear.
                    waiting_on._asyncio_future_blocking = False
                    await waiting_on
                waiting_on = coroutine.send(None)
        except StopIteration:
            pass
        finally:
            coroutine.close()  # no-op when finished; stops it if we were cancelled

    def _frame(self, content: str) -> bytes:
        route = self.endpoint.route
        if route == TEXT:
            return framing.text_chunk(content)
        if route == SSE:
            return framing.sse_delta(content)
        meta = self.chunk_meta or {}
        return framing.openai_chunk(meta.get("id", ""), meta.get("created", int(time.time())),
                                    meta.get("model", self.request.model), content)
