"""OpenAI's chat-completions format as the simulator speaks it: the request fields it reads,
the chunks, events and bodies it answers with, and errors in OpenAI's shape.

Tokens are encoded once, at import: a streamed token is one concatenation of pre-encoded bytes
(``CompletionFrames.token``), no JSON encoding per token.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson

from streamgate.simulator.script import MAX_TOKENS, expected_tokens

DEFAULT_MODEL = "streamgate-sim"
SYSTEM_FINGERPRINT = "fp_streamgate_sim"
TOKENS: tuple[str, ...] = tuple(expected_tokens(MAX_TOKENS))
# The same bytes orjson would write, but compact: each orjson.dumps result keeps a ~4 KiB
# allocation, which for 16,384 long-lived tokens would cost 64 MiB of resident memory.
TOKEN_JSON: tuple[bytes, ...] = tuple(
    json.dumps(token, ensure_ascii=False).encode() for token in TOKENS
)
DONE_EVENT = b"data: [DONE]\n\n"


def error_body(message: str, error_type: str, code: str | None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    )


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


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the simulator reads from a chat-completions body."""

    model: str
    stream: bool
    include_usage: bool
    n_tokens: int
    prompt_tokens: int


def read_chat_request(raw: bytes, default_tokens: int) -> ChatRequest:
    """The body's fields, checked in this order; RequestError (400) names the first bad one."""
    try:
        body = orjson.loads(raw)
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
    return ChatRequest(
        model=model,
        stream=stream,
        include_usage=stream and bool(options and options.get("include_usage") is True),
        n_tokens=_token_count(body, default_tokens),
        prompt_tokens=_prompt_tokens(body),
    )


def _token_count(body: dict[str, Any], default: int) -> int:
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(400, f"{field} must be a positive integer", param=field)
        return min(value, MAX_TOKENS)
    return default


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


def models_list(names: list[str], created: int) -> dict[str, Any]:
    """GET /v1/models."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "streamgate"}
            for name in names
        ],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class CompletionFrames:
    """The bytes of one answer: its SSE events (``chat.completion.chunk``) or, not streamed, its
    ``chat.completion`` body; one id and creation time for all of them."""

    __slots__ = ("completion_id", "created", "include_usage", "model", "prefix", "suffix")

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.completion_id = "chatcmpl-sim" + os.urandom(10).hex()
        self.created = int(time.time())
        head = orjson.dumps(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        # A token's event is prefix + its pre-encoded JSON string + suffix.
        self.prefix = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        self.suffix = b'},"logprobs":null,"finish_reason":null}]'
        self.suffix += b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def token(self, index: int) -> bytes:
        """The event carrying token `index` of the fixed answer."""
        return self.prefix + TOKEN_JSON[index] + self.suffix

    def chunk_event(self, choices: list[Any], usage: dict[str, int] | None = None) -> bytes:
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

    def role_event(self) -> bytes:
        """The first chunk: the assistant's role, empty content."""
        return self.chunk_event(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def stop_event(self) -> bytes:
        return self.chunk_event(
            [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
        )

    def usage_event(self, usage: dict[str, int]) -> bytes:
        return self.chunk_event([], usage)

    def completion(self, content: str, usage: dict[str, int]) -> bytes:
        """A non-streamed answer."""
        return orjson.dumps(
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
                            "content": content,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )


def error_event(body: bytes) -> bytes:
    """An error after the stream began: one `data:` event holding OpenAI's error object."""
    return b"data: " + body + b"\n\n"
