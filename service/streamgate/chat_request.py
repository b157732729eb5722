"""What a chat request may hold: the body parsed and validated once, before anything is relayed.

parse_chat_request either returns a ChatRequest or raises InvalidRequest, whose message and
param become the client's 4xx (an OpenAI-shaped error body, see framing.error_body).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .settings import Settings

# The output formats, by route (routes/chat.py maps paths to them).
TEXT, SSE, OPENAI = "text", "sse", "openai"
GRANULARITIES = ("token", "word")
# Body keys the gateway itself understands; the OpenAI route passes any other key upstream.
_OWN_KEYS = {"prompt", "messages", "model", "max_tokens", "temperature", "granularity",
             "stream", "stream_options"}


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass(slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    model: str
    granularity: str = "token"
    stream: bool = True
    include_usage: bool = False
    upstream_extra: dict[str, Any] = field(default_factory=dict)

    def upstream_payload(self, ask_usage: bool) -> dict[str, Any]:
        """ask_usage: STREAMGATE_UPSTREAM_INCLUDE_USAGE (off for servers that reject it)."""
        payload = {**self.upstream_extra, "model": self.model, "messages": self.messages}
        if self.stream and ask_usage:  # servers reject stream_options on a non-streaming request
            payload["stream_options"] = {"include_usage": True}  # usage feeds logs and metrics
        return payload


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _content_chars(content: Any, where: str) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    if content is None:
        return 0
    raise InvalidRequest(f"{where}.content must be a string or a list of content parts", where)


def parse_chat_request(body: bytes, settings: Settings, route: str) -> ChatRequest:
    """Validate a chat body; InvalidRequest says exactly what is wrong."""
    if not body.strip():
        raise InvalidRequest("request body is empty: send a JSON object with a prompt")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")

    prompt, messages = data.get("prompt"), data.get("messages")
    if prompt is not None and messages is not None:
        raise InvalidRequest("give either prompt or messages, not both", "prompt")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", "messages")
        chars = 0
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(f"{where} must be an object with a string role", where)
            chars += _content_chars(message.get("content"), where)
        if chars == 0:
            raise InvalidRequest("messages hold no text", "messages")
    elif prompt is None:
        raise InvalidRequest("prompt is required (or messages)", "prompt")
    elif not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", "prompt")
    elif not prompt.strip():
        raise InvalidRequest("prompt is empty", "prompt")
    else:
        chars = len(prompt)
        messages = [{"role": "user", "content": prompt}]
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(
            f"prompt too long: {chars} characters, the maximum is {settings.max_prompt_chars}",
            "prompt" if prompt is not None else "messages",
            status=413,
        )

    model = data.get("model", settings.default_model)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a non-empty string", "model")
    granularity = data.get("granularity", "token")
    if granularity not in GRANULARITIES:
        raise InvalidRequest(
            f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}",
            "granularity",
        )
    extra: dict[str, Any] = {}
    max_tokens = data.get("max_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequest("max_tokens must be a positive integer", "max_tokens")
        extra["max_tokens"] = max_tokens
    temperature = data.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise InvalidRequest("temperature must be a number from 0 to 2", "temperature")
        extra["temperature"] = temperature

    stream, include_usage = True, route != OPENAI
    if route == OPENAI:
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("stream must be true or false", "stream")
        options = data.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or not isinstance(
                options.get("include_usage", False), bool
            ):
                raise InvalidRequest("stream_options must be {\"include_usage\": bool}",
                                     "stream_options")
            include_usage = options.get("include_usage", False)
        extra.update((key, value) for key, value in data.items() if key not in _OWN_KEYS)
    return ChatRequest(messages, model, granularity, stream, include_usage, extra)
