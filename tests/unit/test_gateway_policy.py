"""The operator's request policy: allowed models (and aliases), caps on max_tokens and n.

Each control both ways: what it refuses is refused with a status and the param named, nothing of
it goes upstream; what it allows reaches the upstream as the policy says; and with the policy
unset the same request passes (the control is what refuses it).
"""

from __future__ import annotations

import httpx
import orjson
import pytest
from pydantic import ValidationError
from streamgate.chat_request import (
    OPENAI,
    SSE,
    TEXT,
    InvalidRequest,
    parse_chat_request,
)
from streamgate.settings import Settings, parse_model_map

pytestmark = pytest.mark.anyio

POLICY = {
    "allowed_models": {"gpt-4o-mini": "gpt-4o-mini", "fast": "gpt-4.1-nano"},
    "max_tokens_limit": 256,
    "max_n": 2,
}
PATHS = {TEXT: "/v1/chat/stream", SSE: "/v1/chat/stream-sse", OPENAI: "/v1/chat/completions"}


def body(**extra) -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": "hi"}], **extra})


REFUSED = [
    ("a model not allowed", (TEXT, SSE, OPENAI), {"model": "gpt-4o"}, 403, "model"),
    ("an upstream name behind an alias", (OPENAI,), {"model": "gpt-4.1-nano"}, 403, "model"),
    ("max_tokens over the cap", (TEXT, SSE, OPENAI), {"max_tokens": 257}, 400, "max_tokens"),
    (
        "max_completion_tokens over the cap",
        (OPENAI,),
        {"max_completion_tokens": 10_000},
        400,
        "max_completion_tokens",
    ),
    ("n over the cap", (OPENAI,), {"n": 3}, 400, "n"),
]


@pytest.mark.parametrize(
    ("route", "extra", "status", "param"),
    [
        (route, extra, status, param)
        for _, routes, extra, status, param in REFUSED
        for route in routes
    ],
    ids=[f"{case}-{route}" for case, routes, *_ in REFUSED for route in routes],
)
def test_the_policy_refuses_naming_the_param(settings, route, extra, status, param):
    with pytest.raises(InvalidRequest) as raised:
        parse_chat_request(body(**extra), settings.model_copy(update=POLICY), route)
    assert (raised.value.status, raised.value.param) == (status, param)
    # Control: without the policy the same body is a valid request.
    parse_chat_request(body(**extra), settings, route)


@pytest.mark.parametrize(
    ("extra", "upstream"),
    [
        ({"model": "gpt-4o-mini", "max_tokens": 256}, {"model": "gpt-4o-mini", "max_tokens": 256}),
        ({"model": "fast", "max_tokens": 1}, {"model": "gpt-4.1-nano", "max_tokens": 1}),
        ({}, {"model": "gpt-4o-mini", "max_tokens": 256}),  # the default model; the cap applied
        (
            {"max_completion_tokens": 100, "n": 2},
            {"max_completion_tokens": 100, "n": 2},
        ),  # nothing added beside the client's own limit
    ],
)
def test_what_the_policy_allows_goes_upstream_as_it_says(settings, extra, upstream):
    request = parse_chat_request(body(**extra), settings.model_copy(update=POLICY), OPENAI)
    payload = request.upstream_payload(ask_usage=False)
    assert {key: payload.get(key) for key in upstream} == upstream
    if "max_completion_tokens" in extra:
        assert "max_tokens" not in payload


@pytest.mark.parametrize("route", (TEXT, SSE))
def test_stream_routes_get_the_cap_too(settings, route):
    request = parse_chat_request(
        orjson.dumps({"prompt": "hi"}), settings.model_copy(update=POLICY), route
    )
    assert request.upstream_payload(ask_usage=False)["max_tokens"] == 256
    unset = parse_chat_request(orjson.dumps({"prompt": "hi"}), settings, route)
    assert "max_tokens" not in unset.upstream_payload(ask_usage=False)  # control


async def test_a_refused_model_is_a_403_json_error_and_nothing_goes_upstream(
    make_app, fake_upstream
):
    app = make_app(**POLICY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        refused = await client.post(PATHS[OPENAI], content=body(model="gpt-4o", stream=True))
        too_many = await client.post(PATHS[OPENAI], content=body(n=3, stream=True))
        assert fake_upstream.requests == []
        allowed = await client.post(PATHS[OPENAI], content=body(model="fast", stream=True))
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_allowed"
    assert "fast" in error["message"] and "gpt-4.1-nano" not in error["message"]
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    assert allowed.status_code == 200
    assert orjson.loads(fake_upstream.requests[0].content)["model"] == "gpt-4.1-nano"


def test_the_settings_parse_and_check_the_model_list():
    assert parse_model_map(" a, b = up-b ,") == {"a": "a", "b": "up-b"}
    settings = Settings(
        allowed_models="gpt-4o-mini,fast=gpt-4.1-nano", max_tokens_limit="", _env_file=None
    )  # type: ignore[call-arg]
    assert settings.allowed_models == POLICY["allowed_models"]
    assert settings.max_tokens_limit is None  # an empty line in the env file: unset
    for bad, words in [
        ("a,a", "entry 2"),
        ("a=", "entry 1"),
        ("=b", "entry 1"),
        ("other", "STREAMGATE_DEFAULT_MODEL 'gpt-4o-mini' must be one of"),
    ]:
        with pytest.raises(ValidationError, match=words):
            Settings(allowed_models=bad, _env_file=None)  # type: ignore[call-arg]
    for name in ("max_tokens_limit", "max_n"):
        with pytest.raises(ValidationError, match=name):
            Settings(**{name: 0}, _env_file=None)  # type: ignore[arg-type]
