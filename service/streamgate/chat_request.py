"""What a chat request may hold: the body parsed and validated once, before anything is relayed.

parse_chat_request either returns a ChatRequest or raises InvalidRequest, whose message and
param become the client's 4xx (an OpenAI-shaped error body, see framing.error_body): 400 for a
bad value, 413 for a prompt over STREAMGATE_MAX_PROMPT_CHARS. No malformed body raises anything
else. A value the client sent is never echoed whole (messages also go to the access log): it
is shown as its repr cut to about 40 characters (`_shown`).

The rules, where OpenAI's API leaves a choice:

- `prompt` (a string) or `messages` (OpenAI form), not both. A message is an object with a
  `role` among ROLES and a `content` that is a string or a list of content parts. `content` may
  be null or left out only on an assistant message that has `tool_calls` or `function_call`
  (OpenAI: "required unless tool_calls or function_call is specified"). A content part is an
  object with a string `type`: `text` and `refusal` parts need a string of that name, media
  parts (MEDIA_PARTS) an object with their string fields. The characters counted against
  max_prompt_chars are those of string contents and of text and refusal parts. `name`,
  `tool_call_id`, `tool_calls` and `function_call` are type-checked; other message keys are
  not looked at.
- null for an optional field is the same as leaving it out (OpenAI accepts null there).
- The two stream routes (TEXT, SSE: this kit's own formats) take only STREAM_ROUTE_KEYS: any
  other top-level field is refused with a 400 that names it, as OpenAI refuses an unrecognized
  argument, instead of being silently dropped. They always stream: `stream`, if sent, must be
  true. Content parts of an unknown type are refused there too.
- The OpenAI route checks the OpenAI parameters it knows (OPENAI_CHECKS, RANGES) and passes
  every other top-level field to the upstream unchanged: vLLM, llama.cpp and Ollama accept
  extensions such as top_k, min_p or repetition_penalty. Content parts of a type it does not
  know (e.g. vLLM's video_url) pass too, as long as they are objects with a string type.
- Nesting deeper than MAX_DEPTH levels is refused: orjson reads up to 1024 levels, but encoding
  the upstream payload stops at 255, which would be our error instead of the client's.

The operator's policy (`_apply_policy`), checked after the body is known to be well formed:

- STREAMGATE_ALLOWED_MODELS: when set, the model (the request's, or STREAMGATE_DEFAULT_MODEL)
  must be one of its names, else 403 `model_not_allowed` naming `model`: the request is well
  formed, this gateway just does not serve that model to anyone. An `alias=upstream-model` entry
  sends the upstream model in the alias's place.
- STREAMGATE_MAX_TOKENS_LIMIT: `max_tokens` and `max_completion_tokens` above it are a 400 naming
  the param. A request that names neither gets `max_tokens` set to the limit upstream: otherwise
  leaving the field out would be the way around the cap (the upstream's own default is the
  model's whole output length). `max_tokens` because every OpenAI-compatible server takes it and
  the stream routes already send it; a client of a model that wants `max_completion_tokens`
  (OpenAI's o-series) sends that one, and nothing is added.
- STREAMGATE_MAX_N: `n` above it is a 400 naming `n` (the stream routes take no `n`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from .formats import OPENAI, SSE, TEXT
from .settings import Settings

__all__ = ["OPENAI", "SSE", "TEXT", "ChatRequest", "InvalidRequest", "parse_chat_request"]

GRANULARITIES = ("token", "word")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Top-level fields of the two stream routes; any other one is refused there.
STREAM_ROUTE_KEYS = (
    "prompt",
    "messages",
    "model",
    "max_tokens",
    "temperature",
    "granularity",
    "stream",
)
# Fields the gateway consumes itself (never passed upstream as sent).
_CONSUMED = {"prompt", "messages", "model", "granularity", "stream", "stream_options"}
TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens")
MAX_DEPTH = 64
MAX_MODEL_CHARS = 256
MAX_TOKENS = 1_000_000
_SHOWN_CHARS = 40
# Numeric parameters: (lowest, highest, integers only). Booleans are never numbers here.
RANGES: dict[str, tuple[int, int, bool]] = {
    "max_tokens": (1, MAX_TOKENS, True),
    "max_completion_tokens": (1, MAX_TOKENS, True),
    "temperature": (0, 2, False),
    "top_p": (0, 1, False),
    "n": (1, 128, True),
    "presence_penalty": (-2, 2, False),
    "frequency_penalty": (-2, 2, False),
    "seed": (-(2**63), 2**63 - 1, True),
}
# Media content parts: part type -> (required string fields, optional string fields) of the
# object under the part's type name, e.g. {"type": "image_url", "image_url": {"url": "..."}}.
MEDIA_PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "image_url": (("url",), ("detail",)),
    "input_audio": (("data", "format"), ()),
    "file": ((), ("file_data", "file_id", "filename")),  # file_data or file_id, see _part
}


class InvalidRequest(Exception):
    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


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


def _shown(value: Any) -> str:
    """A client's value as a message may show it: its repr, cut to about 40 characters."""
    text = repr(value[:_SHOWN_CHARS] if isinstance(value, str) else value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _cut(name: str) -> str:
    """A client's key as a param may name it."""
    return name if len(name) <= _SHOWN_CHARS else name[: _SHOWN_CHARS - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _depth(value: Any, limit: int) -> int:
    """How many levels of objects and lists `value` has, counted without recursion, up to
    limit + 1."""
    level, depth = [value], 0
    while level and depth <= limit:
        depth += 1
        inner: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                inner.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                inner.extend(v for v in item if isinstance(v, dict | list))
        level = inner
    return depth


# --- messages -----------------------------------------------------------------------------


def _string_fields(
    value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`value` must be an object whose `required` fields (and `optional` ones, when present and
    not null) are strings."""
    names = ", ".join(required + optional)
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be an object with string fields ({names})", where)
    for name in required + optional:
        if (name in required or value.get(name) is not None) and not isinstance(
            value.get(name), str
        ):
            raise InvalidRequest(f"{where}.{name} must be a string", f"{where}.{name}")
    return value


def _part(part: Any, where: str, route: str) -> tuple[int, bool]:
    """(text characters, whether it holds anything) of one content part."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidRequest(f"{where} must be a content part: an object with a string type", where)
    kind = part["type"]
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.{kind} must be a string", f"{where}.{kind}")
        return len(text), bool(text)
    if kind in MEDIA_PARTS:
        media = _string_fields(part.get(kind), f"{where}.{kind}", *MEDIA_PARTS[kind])
        if kind == "file" and media.get("file_data") is None and media.get("file_id") is None:
            raise InvalidRequest(f"{where}.file needs file_data or file_id", f"{where}.file")
        return 0, True
    if route != OPENAI:
        raise InvalidRequest(
            f"{where}.type {_shown(kind)} is not one of text, refusal, {', '.join(MEDIA_PARTS)}",
            f"{where}.type",
        )
    return 0, True  # an upstream's own part type (e.g. video_url): its business


def _tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where} must be a list of tool calls", where)
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        _string_fields(call, at, ("id", "type"))
        if call["type"] == "function":
            _string_fields(call.get("function"), f"{at}.function", ("name", "arguments"))


def _messages(messages: Any, route: str) -> int:
    """The text characters of `messages`, checked as the module docstring says."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of message objects", "messages")
    chars, anything = 0, False
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object with a string role", where)
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(
                f"{where} must be an object with a string role: one of {', '.join(ROLES)}",
                f"{where}.role",
            )
        if role not in ROLES:
            raise InvalidRequest(
                f"{where}.role {_shown(role)} is not one of {', '.join(ROLES)}", f"{where}.role"
            )
        for name in ("name", "tool_call_id"):
            if message.get(name) is not None and not isinstance(message[name], str):
                raise InvalidRequest(f"{where}.{name} must be a string", f"{where}.{name}")
        if message.get("tool_calls") is not None:
            _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if message.get("function_call") is not None:
            _string_fields(
                message["function_call"], f"{where}.function_call", ("name", "arguments")
            )
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
            anything = anything or bool(content)
        elif isinstance(content, list):
            for number, part in enumerate(content):
                part_chars, holds = _part(part, f"{where}.content[{number}]", route)
                chars += part_chars
                anything = anything or holds
        elif content is not None:
            raise InvalidRequest(
                f"{where}.content must be a string or a list of content parts", f"{where}.content"
            )
        elif role != "assistant" or not (message.get("tool_calls") or message.get("function_call")):
            raise InvalidRequest(
                f"{where}.content must be a string or a list of content parts "
                "(null only on an assistant message with tool_calls)",
                f"{where}.content",
            )
    if not anything:
        raise InvalidRequest("messages hold no text", "messages")
    return chars


# --- other OpenAI parameters ----------------------------------------------------------------


def _check_range(key: str, value: Any) -> None:
    low, high, integer = RANGES[key]
    if (
        not _is_number(value)
        or (integer and not isinstance(value, int))
        or not (low <= value <= high)
    ):
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"{key} must be {kind} from {low} to {high}", key)


def _check_stop(value: Any) -> None:
    if isinstance(value, str):
        return
    if (
        not isinstance(value, list)
        or len(value) > 4
        or not all(isinstance(item, str) for item in value)
    ):
        raise InvalidRequest("stop must be a string or a list of at most 4 strings", "stop")


def _check_user(value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidRequest("user must be a string", "user")


def _check_logit_bias(value: Any) -> None:
    if not isinstance(value, dict) or not all(
        _is_number(bias) and -100 <= bias <= 100 for bias in value.values()
    ):
        raise InvalidRequest(
            "logit_bias must be an object of token id to a number from -100 to 100", "logit_bias"
        )


def _check_response_format(value: Any) -> None:
    _string_fields(value, "response_format", ("type",))


def _check_tools(value: Any) -> None:
    if not isinstance(value, list):
        raise InvalidRequest("tools must be a list of tool objects", "tools")
    for index, tool in enumerate(value):
        _string_fields(tool, f"tools[{index}]", ("type",))
        if tool["type"] == "function":
            _string_fields(tool.get("function"), f"tools[{index}].function", ("name",))


def _check_tool_choice(value: Any) -> None:
    if not isinstance(value, str | dict):
        raise InvalidRequest("tool_choice must be a string or an object", "tool_choice")


OPENAI_CHECKS: dict[str, Callable[[Any], None]] = {
    **{key: partial(_check_range, key) for key in RANGES},
    "stop": _check_stop,
    "user": _check_user,
    "logit_bias": _check_logit_bias,
    "response_format": _check_response_format,
    "tools": _check_tools,
    "tool_choice": _check_tool_choice,
}


# --- the operator's policy -----------------------------------------------------------------


def _apply_policy(data: dict[str, Any], model: str, settings: Settings) -> str:
    """The model to ask the upstream for; InvalidRequest for what the policy refuses."""
    limit = settings.max_tokens_limit
    if limit is not None:
        for key in TOKEN_LIMIT_KEYS:
            value = data.get(key)
            if value is not None and value > limit:  # a number: the range checks ran first
                raise InvalidRequest(f"{key} must be at most {limit} on this gateway", key)
    max_n = settings.max_n
    if max_n is not None and data.get("n") is not None and data["n"] > max_n:
        raise InvalidRequest(f"n must be at most {max_n} on this gateway", "n")
    allowed = settings.allowed_models
    if not allowed:
        return model
    upstream = allowed.get(model)
    if upstream is None:
        raise InvalidRequest(
            f"model {_shown(model)} is not available on this gateway: use one "
            f"of {', '.join(allowed)}",
            "model",
            status=403,
            code="model_not_allowed",
        )
    return upstream


def _cap_tokens(extra: dict[str, Any], settings: Settings) -> None:
    """A request that names no token limit gets the gateway's (see the module docstring)."""
    limit = settings.max_tokens_limit
    if limit is not None and not any(key in extra for key in TOKEN_LIMIT_KEYS):
        extra["max_tokens"] = limit


# --- the whole body -------------------------------------------------------------------------


def _load(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequest("request body is empty: send a JSON object with a prompt")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # its message names a position, never the content
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidRequest(f"request body nests deeper than {MAX_DEPTH} levels")
    return data


def parse_chat_request(body: bytes, settings: Settings, route: str) -> ChatRequest:
    """Validate a chat body for the format named `route` (formats.py: TEXT, SSE, OPENAI);
    InvalidRequest says exactly what is wrong."""
    data = _load(body)
    if route != OPENAI:
        for key in data:
            if key not in STREAM_ROUTE_KEYS:
                raise InvalidRequest(
                    f"unrecognized request argument {_shown(key)}: this route "
                    f"takes {', '.join(STREAM_ROUTE_KEYS)}",
                    _cut(key),
                )

    prompt, messages = data.get("prompt"), data.get("messages")
    if prompt is not None and messages is not None:
        raise InvalidRequest("give either prompt or messages, not both", "prompt")
    if messages is not None:
        chars = _messages(messages, route)
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

    model = data.get("model")
    if model is None:
        model = settings.default_model
    elif not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(
            f"model must be a non-empty string of at most {MAX_MODEL_CHARS} characters", "model"
        )
    granularity = data.get("granularity")
    if granularity is None:
        granularity = "token"
    elif granularity not in GRANULARITIES:  # a list or object is simply not among them
        raise InvalidRequest(
            f"unknown granularity {_shown(granularity)}: use one of {', '.join(GRANULARITIES)}",
            "granularity",
        )
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false", "stream")
    for key, check in OPENAI_CHECKS.items():  # on the stream routes, only their own keys
        if data.get(key) is not None:
            check(data[key])

    model = _apply_policy(data, model, settings)

    if route != OPENAI:
        if stream is False:
            raise InvalidRequest(
                "stream must be true on this route: it always streams "
                "(/v1/chat/completions can answer in one piece)",
                "stream",
            )
        extra = {
            key: data[key] for key in ("max_tokens", "temperature") if data.get(key) is not None
        }
        _cap_tokens(extra, settings)
        return ChatRequest(messages, model, granularity, True, True, extra)

    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(
            options.get("include_usage", False), bool | None
        ):
            raise InvalidRequest(
                'stream_options must be {"include_usage": true or false}', "stream_options"
            )
        include_usage = bool(options.get("include_usage"))
    # Every other field goes upstream as sent; a null one of ours counts as left out.
    extra = {
        key: value
        for key, value in data.items()
        if key not in _CONSUMED and not (value is None and key in OPENAI_CHECKS)
    }
    _cap_tokens(extra, settings)
    return ChatRequest(messages, model, granularity, bool(stream), include_usage, extra)
