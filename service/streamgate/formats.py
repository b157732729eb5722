"""The chat routes' output formats, one object each, and the route table.

A format knows its media type and how to frame a delta, an in-band error and the end of a
stream; the byte encoders themselves are in framing.py. The relay (routes/relay.py) asks the
format, never which route it serves. CHAT_ROUTES is the one list of chat paths: the app mounts
it, and tests and benchmarks may import it (`from streamgate.formats import CHAT_ROUTES`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from . import framing

# Format names: what the request rules (chat_request.py) and the tests call each format.
TEXT, SSE, OPENAI = "text", "sse", "openai"


@dataclass(frozen=True, slots=True)
class ChunkIdentity:
    """id, created and model of the upstream's first chunk: OpenAI chunks the gateway builds
    itself (word granularity, the end) carry them like the upstream's own."""

    id: str
    created: int
    model: str

    @classmethod
    def of(cls, event: dict[str, Any], model: str) -> ChunkIdentity:
        return cls(
            event.get("id", ""), event.get("created", int(time.time())), event.get("model", model)
        )


class StreamFormat:
    """How one route frames a stream. Subclasses override what differs."""

    name: str
    media_type = b"text/event-stream; charset=utf-8"
    # Sent while the first token is slow (None: nothing; only SSE has comments for it).
    heartbeat: bytes | None = None
    # True: at token granularity each upstream chunk is relayed whole (upstream_chunk).
    passes_upstream_chunks = False

    def upstream_chunk(self, event: dict[str, Any], include_usage: bool) -> bytes | None:
        """An upstream chunk relayed whole (formats that pass upstream chunks)."""
        raise NotImplementedError

    def delta(self, content: str, identity: ChunkIdentity) -> bytes:
        raise NotImplementedError

    def error(self, kind: str, message: str) -> bytes | None:
        """The in-band error after the first byte; None: the format has none (abort instead)."""
        raise NotImplementedError

    def end(
        self,
        usage: dict[str, Any] | None,
        finish_reason: str | None,
        identity: ChunkIdentity,
        rebuilt: bool,
        include_usage: bool,
    ) -> bytes:
        """The stream's last bytes. rebuilt: the deltas were the gateway's own chunks (word
        granularity), so the final chunks must be built too."""
        raise NotImplementedError


class PlainText(StreamFormat):
    name = TEXT
    media_type = b"text/plain; charset=utf-8"

    def delta(self, content: str, identity: ChunkIdentity) -> bytes:
        return framing.text_chunk(content)

    def error(self, kind: str, message: str) -> None:
        # No in-band error in plain text: the stream ends without its final chunk, so the
        # client's HTTP library reports an incomplete body instead of a short answer.
        return None

    def end(self, usage, finish_reason, identity, rebuilt, include_usage) -> bytes:
        return b""


class ServerSentEvents(StreamFormat):
    name = SSE
    heartbeat = framing.SSE_PING

    def delta(self, content: str, identity: ChunkIdentity) -> bytes:
        return framing.sse_delta(content)

    def error(self, kind: str, message: str) -> bytes:
        return framing.sse_error(kind, message)

    def end(self, usage, finish_reason, identity, rebuilt, include_usage) -> bytes:
        return framing.sse_done(usage, finish_reason)


class OpenAIChunks(StreamFormat):
    name = OPENAI
    passes_upstream_chunks = True

    def upstream_chunk(self, event: dict[str, Any], include_usage: bool) -> bytes | None:
        """An upstream chunk as it came (every field kept), minus the usage nobody asked for."""
        if not include_usage:
            if not event.get("choices") and event.get("usage"):
                return None  # the usage-only chunk we asked for the logs
            event.pop("usage", None)
        return framing.openai_data(orjson.dumps(event))

    def delta(self, content: str, identity: ChunkIdentity) -> bytes:
        return framing.openai_chunk(identity.id, identity.created, identity.model, content)

    def error(self, kind: str, message: str) -> bytes:
        return framing.openai_error(kind, message)

    def end(self, usage, finish_reason, identity, rebuilt, include_usage) -> bytes:
        end = b""
        if rebuilt:
            end += framing.openai_chunk(
                identity.id, identity.created, identity.model, None, finish_reason
            )
            if include_usage and usage:
                end += framing.openai_chunk(
                    identity.id, identity.created, identity.model, None, usage=usage
                )
        return end + framing.OPENAI_DONE


@dataclass(frozen=True, slots=True)
class ChatRoute:
    path: str
    format: StreamFormat
    label: str  # in metrics and the access log


CHAT_ROUTES = (
    ChatRoute("/v1/chat/stream", PlainText(), "stream"),
    ChatRoute("/v1/chat/stream-sse", ServerSentEvents(), "stream-sse"),
    ChatRoute("/v1/chat/completions", OpenAIChunks(), "completions"),
)
