"""Pure encoders for the three stream formats: plain text, SSE events, OpenAI chunks.

No I/O here, so every rule can be property-tested. SSE follows the WHATWG parsing rules: a
`data:` field cannot hold a line break, so text with "\\n", "\\r\\n" or "\\r" becomes several
`data:` lines, which a conforming parser joins back with "\\n". A line break is only ever
"\\r\\n", "\\r" or "\\n" (str.splitlines would also split on \\x0b, \\u2028... and corrupt text).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

SSE_PING = b": ping\n\n"
OPENAI_DONE = b"data: [DONE]\n\n"


def text_chunk(delta: str) -> bytes:
    return delta.encode("utf-8", "surrogatepass")


def sse_event(data: str, event: str | None = None) -> bytes:
    """One SSE event whose data a conforming parser returns as `data`.

    A parser returns every line end ("\\r\\n", "\\r", "\\n") as "\\n": the spec cannot carry a
    CR. That is why model text travels as JSON (`sse_delta`), which is exact for any text.
    """
    head = b"event: " + event.encode() + b"\n" if event else b""
    if "\n" not in data and "\r" not in data:
        return head + b"data: " + data.encode("utf-8", "surrogatepass") + b"\n\n"
    lines = _LINE_BREAK.split(data)
    body = b"".join(b"data: " + line.encode("utf-8", "surrogatepass") + b"\n" for line in lines)
    return head + body + b"\n"


def sse_delta(content: str) -> bytes:
    """A content delta: `data: {"content": "..."}`. JSON escapes CR and LF, so the text is
    byte-exact after any conforming parser, and one `data:` line is all it ever takes."""
    return b"data: " + orjson.dumps({"content": content}) + b"\n\n"


def sse_comment(text: str = "ping") -> bytes:
    """A comment line: parsers ignore it, proxies see traffic (idle timeouts reset)."""
    safe = _LINE_BREAK.sub(" ", text)
    return b": " + safe.encode() + b"\n\n"


def sse_error(kind: str, message: str) -> bytes:
    return sse_event(
        orjson.dumps({"error": {"type": kind, "message": message}}).decode(), event="error"
    )


def sse_done(usage: dict[str, Any] | None, finish_reason: str | None) -> bytes:
    return sse_event(
        orjson.dumps({"usage": usage, "finish_reason": finish_reason}).decode(), event="done"
    )


def openai_data(payload: bytes) -> bytes:
    """Frame an upstream chunk's JSON, byte for byte as received (one line: JSON has no raw LF)."""
    return b"data: " + payload + b"\n\n"


def openai_chunk(
    completion_id: str,
    created: int,
    model: str,
    content: str | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> bytes:
    """A `chat.completion.chunk` event as OpenAI sends it."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage
    else:
        delta = {"content": content} if content is not None else {}
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def openai_error(kind: str, message: str) -> bytes:
    """The in-band error the openai SDK raises as APIError, then the stream still ends [DONE]."""
    body = {"error": {"message": message, "type": kind, "code": kind}}
    return b"data: " + orjson.dumps(body) + b"\n\n" + OPENAI_DONE


def error_body(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """JSON error body for a real HTTP error status, in OpenAI's shape."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


class WordCoalescer:
    """Holds sub-word pieces until a word ends, so each chunk ends on a word boundary.

    The caller flushes what is held once it has waited long enough (the latency bound); text
    without spaces (CJK, long identifiers) still moves on that timer.
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = ""

    def push(self, delta: str) -> str:
        """Text ready to send now ("" if the word is still open)."""
        text = self.pending + delta if self.pending else delta
        cut = len(text) - 1
        while cut >= 0 and not text[cut].isspace():
            cut -= 1
        if cut < 0:
            self.pending = text
            return ""
        self.pending = text[cut + 1 :]
        return text[: cut + 1]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
