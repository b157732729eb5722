"""The chat routes in /openapi.json, although they are pure ASGI endpoints FastAPI never sees.

The models here only describe (chat_request.py is what validates): StreamGateApp.openapi() adds
their JSON schemas, the three paths, their responses and, when client keys are configured, the
Bearer security scheme to what FastAPI generates for the other routes. The schema follows the
settings: the allowed models as an enum, the caps as maxima.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.config import JsonDict

from .chat_request import MAX_TOKENS, RANGES, ROLES, STREAM_ROUTE_KEYS
from .formats import CHAT_ROUTES, OPENAI, SSE, TEXT
from .settings import Settings

SECURITY_SCHEME = "clientKey"
REF = "#/components/schemas/{model}"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    """OpenAI's message; `content` may also be null on an assistant message with tool_calls."""

    model_config = ConfigDict(extra="allow")
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart | ImagePart] = Field(min_length=1)
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """OpenAI's error shape, for every 4xx/5xx the gateway sends."""

    error: ErrorDetail


def _request_models(settings: Settings) -> tuple[type[BaseModel], type[BaseModel]]:
    """(the stream routes' body, the OpenAI route's body), with the policy's bounds."""
    allowed = list(settings.allowed_models)
    model_type: Any = Literal[tuple(allowed)] if allowed else str
    max_tokens = settings.max_tokens_limit or MAX_TOKENS
    max_n = settings.max_n or RANGES["n"][1]
    tokens: tuple[Any, Any] = (int | None, Field(None, ge=1, le=max_tokens))
    temperature = (float | None, Field(None, ge=0, le=2))
    xor: JsonDict = {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}
    common: dict[str, Any] = {
        "prompt": (
            str,
            Field(
                None, min_length=1, pattern=r"\S", description="a user message; or send messages"
            ),
        ),
        "messages": (list[Message], Field(None, min_length=1)),
        "model": (model_type | None, Field(None, description="default: the gateway's")),
        "max_tokens": tokens,
        "temperature": temperature,
        "granularity": (
            Literal["token", "word"] | None,
            Field(None, description="word: each chunk ends on a word boundary"),
        ),
    }
    stream_request = create_model(
        "StreamRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra=xor),
        stream=(Literal[True] | None, None),
        **common,
    )
    assert set(stream_request.model_fields) == set(STREAM_ROUTE_KEYS)
    completion_request = create_model(
        "ChatCompletionRequest",
        __config__=ConfigDict(
            extra="allow",
            json_schema_extra={
                **xor,
                "description": (
                    "OpenAI's chat completion request; fields not listed pass to the upstream "
                    "as sent"
                ),
            },
        ),
        stream=(bool | None, None),
        stream_options=(StreamOptions | None, None),
        max_completion_tokens=tokens,
        top_p=(float | None, Field(None, ge=0, le=1)),
        n=(int | None, Field(None, ge=1, le=max_n)),
        stop=(str | list[str] | None, Field(None, max_length=4)),
        presence_penalty=(float | None, Field(None, ge=-2, le=2)),
        frequency_penalty=(float | None, Field(None, ge=-2, le=2)),
        seed=(int | None, None),
        user=(str | None, None),
        **common,
    )
    return stream_request, completion_request


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


ERROR_STATUSES = {
    "400": "invalid request: the message and `param` say what is wrong",
    "401": "no client key, or a wrong one (`WWW-Authenticate: Bearer`)",
    "403": "a model this gateway does not serve (`model_not_allowed`)",
    "404": "the upstream does not know the model",
    "408": "the request body did not arrive in time",
    "413": "the prompt or the body is too long",
    "429": "the upstream's rate limit (`Retry-After` passed on)",
    "500": "a bug in the gateway",
    "502": "the upstream failed or is unreachable",
    "504": "the upstream timed out before the first byte",
}


def add_chat_routes(schema: dict[str, Any], settings: Settings, keys_required: bool) -> None:
    """Describe the chat routes in `schema` (FastAPI's generated OpenAPI document)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    stream_request, completion_request = _request_models(settings)
    stream_body, completion_body = (
        _schema(stream_request, components),
        _schema(completion_request, components),
    )
    error = {"application/json": {"schema": _schema(Error, components)}}
    text = {"schema": {"type": "string"}}
    # Each event as a client's SSE parser reads it (schemathesis checks them one by one).
    events = {
        "schema": {
            "type": "object",
            "properties": {
                "event": {
                    "type": "string",
                    "description": "message, or error / done on stream-sse",
                },
                "data": {
                    "type": "string",
                    "description": "a JSON object, or [DONE] on completions",
                },
            },
            "required": ["data"],
        }
    }
    errors = {
        status: {"description": text_, "content": error} for status, text_ in ERROR_STATUSES.items()
    }
    if not keys_required:
        del errors["401"]
    # What each format answers; the paths come from the one route table.
    by_format = {
        TEXT: (
            "Stream an answer as plain text",
            stream_body,
            {"text/plain": text},
            "each delta written the moment it arrives; an upstream failure "
            "mid-stream ends the body early",
        ),
        SSE: (
            "Stream an answer as server-sent events",
            stream_body,
            {"text/event-stream": events},
            'data: {"content": ...} per delta, event: error, event: done',
        ),
        OPENAI: (
            "OpenAI-compatible chat completion",
            completion_body,
            {"text/event-stream": events, "application/json": {"schema": {"type": "object"}}},
            "stream: true: OpenAI's chunks and data: [DONE]; "
            "otherwise the upstream's chat.completion object",
        ),
    }
    for route in CHAT_ROUTES:
        path = route.path
        summary, body, content, answer = by_format[route.format.name]
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": "chat_" + path.rsplit("/", 1)[1].replace("-", "_"),
            "tags": ["chat"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {"description": answer, "content": content}, **errors},
        }
        if keys_required:
            operation["security"] = [{SECURITY_SCHEME: []}]
        schema.setdefault("paths", {})[path] = {"post": operation}
    if keys_required:
        schema["components"].setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "a client key: `Authorization: Bearer <key>`",
        }
