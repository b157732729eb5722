"""The relay: one stream from the LLM server to the client, framed in its route's format.

The path of one chunk, from the upstream socket to the client socket:

1. The lean transport's protocol (transport.py) receives the upstream's bytes in
   `data_received`; httptools decodes the chunked body and calls `on_body` with them.
2. Task path. Before the first token, at word granularity, and on the SDK's own transport,
   `on_body` wakes the relay's task, parked in `ChatStream.read_events` (upstream.py), which
   parses the SSE `data:` events; `_frames_of` frames each delta in the route's format
   (formats.py) and `_send_frames` awaits the ASGI server's `send`.
3. Callback path. After the first token at token granularity (the common case), `on_body`
   calls `_relay_in_callback` instead, still inside the protocol callback: the same parse and
   `_frames_of`, then EagerSend (eager_send.py) runs uvicorn's `send` there, so the task
   is not woken. If the send must wait for a slow client, or the stream ends or fails, the
   callback returns False and the task takes over: it finishes that send, then goes on as in 2.
4. uvicorn's `send` writes the bytes as one HTTP chunk to the client's socket: one `write()`
   per chunk, nothing held in between (nginx passes it on with proxy buffering off).

Every rule about time (first token, gap, total, word flush, heartbeats) is in `_pump`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import orjson

from .. import framing, metrics
from ..chat_request import ChatRequest
from ..formats import ChatRoute, ChunkIdentity
from ..settings import Settings
from ..upstream import (
    ChatStream,
    UpstreamError,
    UpstreamReadTimeout,
    complete_chat,
    open_chat_stream,
)
from .eager_send import EagerSend


class Outcome:
    """What happened to one request, for the access log and the request counter."""

    __slots__ = (
        "client",
        "duration_s",
        "error",
        "finish_reason",
        "outcome",
        "status",
        "tokens",
        "ttft_s",
        "usage",
    )

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


async def send_json(
    send,
    status: int,
    body: bytes,
    request_id: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole JSON answer (errors before the first byte, a non-streamed completion's kin)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache"),
        (b"x-request-id", request_id),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Relay:
    """One request's answer: upstream events in, framed chunks out."""

    # False: every chunk takes the task path (2 above). Only the benchmark sets it, to measure
    # what the callback path saves (bench/plain_send_app.py).
    relays_from_callback: ClassVar[bool] = True

    def __init__(
        self,
        route: ChatRoute,
        upstream_client,
        settings: Settings,
        request: ChatRequest,
        request_id: bytes,
        send,
        outcome: Outcome,
        started_at: float,
        started_perf: float,
    ) -> None:
        self.format = route.format
        self.label = route.label
        self.upstream_client = upstream_client
        self.settings = settings
        self.request = request
        self.request_id = request_id
        self.send = send
        self.outcome = outcome
        self.loop = asyncio.get_running_loop()
        # Deadlines are loop.time() based; metrics and logs use perf_counter (sub-ms).
        self.started_at = started_at
        self.started_perf = started_perf
        self.total_deadline = started_at + settings.total_timeout_s
        self.first_token_deadline = min(
            started_at + settings.first_token_timeout_s, self.total_deadline
        )
        self.gap_s = settings.token_gap_timeout_s
        self.word_flush_s = settings.word_flush_ms / 1000
        # Heartbeats only where the format has them, only before the first token.
        self.next_ping = (
            started_at + settings.heartbeat_s if self.format.heartbeat else float("inf")
        )
        # Progress.
        self.response_started = False
        self.finished = False  # the answer is complete: a hang-up now is no cancellation
        self.client_gone = False  # set by the disconnect watcher before it cancels the relay
        self.content_seen = False  # TTFT counts content, not a role-only first chunk
        self.last_event_at = started_at
        self.last_sent_at: float | None = None
        self.gaps = metrics.GapRecorder()
        # Word granularity: text held until a word ends, and since when.
        self.words = framing.WordCoalescer() if request.granularity == "word" else None
        self.held_since: float | None = None
        # At token granularity OpenAI chunks pass whole; otherwise the format builds them.
        self.passes_upstream_chunks = self.format.passes_upstream_chunks and self.words is None
        self.identity: ChunkIdentity | None = None  # of the upstream's first chunk
        # The callback path (3 above) and what it hands back to the task.
        self.stream: ChatStream | None = None
        self.eager_send = EagerSend(send)
        self.callback_error: BaseException | None = None

    # --- whole answers --------------------------------------------------------------------

    async def run_non_stream(self) -> None:
        try:
            status, body, content_type = await complete_chat(
                self.upstream_client,
                self.settings,
                self._upstream_payload(),
                self.request_id.decode(),
                self.total_deadline,
            )
        except UpstreamError as error:
            await self._fail(error)
            return
        self.outcome.status = status
        self.finished = self.response_started = True  # a hang-up from here on is no cancellation
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", self.request_id),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    # --- streams --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.timeout_at(self.total_deadline):
                stream = await self._open()
        except TimeoutError:
            await self._fail(UpstreamError("timeout", 504, "upstream timeout: total time"))
            return
        except UpstreamError as error:
            await self._fail(error)
            return
        self.stream = stream
        metrics.ACTIVE_STREAMS.inc()
        try:
            await self._pump(stream)
        except UpstreamError as error:
            await self._fail(error)
        finally:
            self.gaps.flush()
            metrics.ACTIVE_STREAMS.dec()
            metrics.TOKENS.labels(self.label).inc(self.outcome.tokens)
            await stream.aclose()

    def _upstream_payload(self) -> dict[str, Any]:
        return self.request.upstream_payload(self.settings.upstream_include_usage)

    async def _open(self) -> ChatStream:
        """Start the upstream request; heartbeats go out if its headers are slow."""
        opening = open_chat_stream(
            self.upstream_client, self.settings, self._upstream_payload(), self.request_id.decode()
        )
        if self.format.heartbeat is None:
            return await opening
        task = asyncio.ensure_future(opening)
        try:
            while True:
                done, _ = await asyncio.wait(
                    {task}, timeout=max(0.0, self.next_ping - self.loop.time())
                )
                if done:
                    return task.result()
                await self._ping(self.loop.time())
        finally:
            if not task.done():
                task.cancel()  # its own cleanup closes the upstream connection

    async def _pump(self, stream: ChatStream) -> None:
        """Read, frame and send until the end, enforcing every deadline."""
        outcome, loop, words = self.outcome, self.loop, self.words
        callback = self._relay_in_callback if self.relays_from_callback and words is None else None
        while True:
            if outcome.ttft_s is None:
                wake_at = min(self.first_token_deadline, self.next_ping)
            else:
                wake_at = min(self.last_event_at + self.gap_s, self.total_deadline)
            if self.held_since is not None:
                wake_at = min(wake_at, self.held_since + self.word_flush_s)
            try:
                # The callback path only once the response has begun and the first token is out.
                events = await stream.read_events(
                    wake_at,
                    callback if self.response_started and outcome.ttft_s is not None else None,
                )
            except UpstreamReadTimeout:
                await self._on_wake_up(loop.time())
                continue
            if self.eager_send.blocked:  # the callback path met a slow client
                await self.eager_send.finish()
            if self.callback_error is not None:
                error, self.callback_error = self.callback_error, None
                raise error
            if events is None:
                if outcome.finish_reason is None:
                    raise UpstreamError("midstream", 502, "upstream stream ended before [DONE]")
                break
            if events:
                now = loop.time()
                self.last_event_at = now
                frames = self._frames_of(events, now)
                if frames:
                    await self._send_frames(frames)
            if stream.finished:
                break
        await self._end()

    async def _on_wake_up(self, now: float) -> None:
        """No upstream bytes by `wake_at`: a deadline passed, a word is due, or a heartbeat."""
        if self.outcome.ttft_s is None:
            hard_deadline, why = self.first_token_deadline, "first token"
        else:
            hard_deadline = min(self.last_event_at + self.gap_s, self.total_deadline)
            why = "gap between tokens"
        if now >= hard_deadline:
            if hard_deadline >= self.total_deadline:
                why = "total time"
            raise UpstreamError("timeout", 504, f"upstream timeout: {why}")
        if self.held_since is not None and now >= self.held_since + self.word_flush_s:
            self.held_since = None
            text = self.words.flush() if self.words is not None else ""
            if text:
                await self._send_frames([self._delta(text)])
        if now >= self.next_ping:
            await self._ping(now)

    async def _end(self) -> None:
        outcome = self.outcome
        tail = self.words.flush() if self.words is not None else ""
        self.finished = True
        end = self._delta(tail) if tail else b""
        end += self.format.end(
            outcome.usage,
            outcome.finish_reason,
            self._identity(),
            rebuilt=self.words is not None,
            include_usage=self.request.include_usage,
        )
        if not self.response_started:
            await self._start()
        await self.send({"type": "http.response.body", "body": end, "more_body": False})

    def _frames_of(self, events: list[dict[str, Any]], now: float) -> list[bytes]:
        """The framed bytes for a batch of upstream events (both paths)."""
        outcome, words = self.outcome, self.words
        frames: list[bytes] = []
        for event in events:
            if self.identity is None:
                self.identity = ChunkIdentity.of(event, self.request.model)
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
            if self.passes_upstream_chunks:
                frame = self.format.upstream_chunk(event, self.request.include_usage)
                if frame is not None:
                    frames.append(frame)
                continue
            if not content:
                continue
            if words is not None:
                was_holding = bool(words.pending)
                content = words.push(content)
                if words.pending and not was_holding:
                    self.held_since = now
                elif not words.pending:
                    self.held_since = None
                if not content:
                    continue
            frames.append(self._delta(content))
        return frames

    def _identity(self) -> ChunkIdentity:
        return self.identity or ChunkIdentity("", 0, self.request.model)

    def _delta(self, content: str) -> bytes:
        return self.format.delta(content, self._identity())

    def _note_sent(self) -> None:
        outcome, now = self.outcome, time.perf_counter()
        if outcome.ttft_s is None:
            if not self.content_seen:
                return  # e.g. OpenAI's role-only first chunk: the first token is still due
            outcome.ttft_s = now - self.started_perf
            metrics.TTFT.labels(self.label).observe(outcome.ttft_s)
        elif self.last_sent_at is not None:
            self.gaps.add(now - self.last_sent_at)
        self.last_sent_at = now

    @staticmethod
    def _body(frames: list[bytes]) -> dict[str, Any]:
        return {
            "type": "http.response.body",
            "body": frames[0] if len(frames) == 1 else b"".join(frames),
            "more_body": True,
        }

    async def _send_frames(self, frames: list[bytes]) -> None:
        self._note_sent()
        if not self.response_started:
            await self._start()
        await self.send(self._body(frames))

    def _relay_in_callback(self, chunk: bytes) -> bool:
        """Relay upstream bytes from inside the connection's callback; False wakes the task.

        Never raises into the protocol callback: an error is kept for the task to raise.
        """
        try:
            stream = self.stream
            assert stream is not None
            events = stream.parse(chunk)
            if events:
                now = self.loop.time()
                self.last_event_at = now
                frames = self._frames_of(events, now)
                if frames:
                    self._note_sent()
                    if not self.eager_send.start(self._body(frames)):
                        return False  # a slow client: the task finishes this send
                stream.extend_deadline(min(now + self.gap_s, self.total_deadline))
            return not stream.finished
        except BaseException as error:
            self.callback_error = error
            return False

    # --- response head, heartbeats, errors ------------------------------------------------

    async def _start(self) -> None:
        self.response_started = True
        await self.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", self.format.media_type),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    (b"x-request-id", self.request_id),
                ],
            }
        )

    async def _ping(self, now: float) -> None:
        self.next_ping = now + self.settings.heartbeat_s
        if not self.response_started:
            await self._start()
        await self.send(
            {"type": "http.response.body", "body": self.format.heartbeat, "more_body": True}
        )

    async def _fail(self, error: UpstreamError) -> None:
        outcome = self.outcome
        outcome.outcome, outcome.error = "upstream_error", str(error)
        metrics.UPSTREAM_ERRORS.labels(error.kind).inc()
        # The answer is complete after this: a client that leaves now (e.g. while the upstream
        # connection is being closed, which can wait on the SDK transport) is no hang-up.
        self.finished = True
        if not self.response_started:
            outcome.status = error.status
            extra = [(b"retry-after", error.retry_after.encode())] if error.retry_after else None
            await send_json(
                self.send, error.status, orjson.dumps(error.to_body()), self.request_id, extra
            )
            return
        body = self.format.error(error.kind, error.message)
        if body is None:
            outcome.outcome = "aborted"  # no in-band error: the stream ends incomplete
            return
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
