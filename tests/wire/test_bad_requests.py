"""Invalid requests get a 4xx with a JSON error that names what is wrong, on the real server,
and never reach the upstream; no malformed body is a 500, and the access log and
streamgate_requests_total record the status the client really got."""

from __future__ import annotations

import json
import uuid

import pytest
from support import chat
from support.procs import wait_until

OVERSIZED_PROMPT = "x" * 32_001  # one over the default STREAMGATE_MAX_PROMPT_CHARS

# (case, route, raw body, status, a word the error message must contain)
BAD_REQUESTS = [
    ("not json", chat.TEXT, b"{prompt: hi", 400, "JSON"),
    ("empty body", chat.TEXT, b"", 400, "empty"),
    ("json array", chat.SSE, b'["hi"]', 400, "object"),
    ("no prompt", chat.TEXT, {"max_tokens": 5}, 400, "prompt"),
    ("blank prompt", chat.SSE, {"prompt": "  \n "}, 400, "prompt"),
    ("prompt not a string", chat.TEXT, {"prompt": 42}, 400, "prompt"),
    ("prompt over the maximum", chat.SSE, {"prompt": OVERSIZED_PROMPT}, 413, "long"),
    (
        "unknown granularity",
        chat.TEXT,
        {"prompt": "hi", "granularity": "sentence"},
        400,
        "granularity",
    ),
    (
        "max_tokens not an integer",
        chat.SSE,
        {"prompt": "hi", "max_tokens": "ten"},
        400,
        "max_tokens",
    ),
    ("max_tokens zero", chat.TEXT, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (
        "temperature not a number",
        chat.TEXT,
        {"prompt": "hi", "temperature": "hot"},
        400,
        "temperature",
    ),
    ("messages not a list", chat.OPENAI, {"messages": "hi", "stream": True}, 400, "messages"),
    ("messages empty", chat.OPENAI, {"messages": [], "stream": True}, 400, "messages"),
    ("message without role", chat.OPENAI, {"messages": [{"content": "hi"}]}, 400, "role"),
    (
        "stream not a boolean",
        chat.OPENAI,
        {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        400,
        "stream",
    ),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "named"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_a_json_error_naming_the_problem(
    gateway, simulator, route, body, status, named
):
    started_before = simulator.stats()["started"]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    trace = chat.request(
        gateway,
        route,
        raw,
        headers={"Content-Type": "application/json"},
    )

    assert trace.status == status, (trace.status, trace.body[:300])
    error = chat.json_body(trace).get("error")
    assert isinstance(error, dict) and named.lower() in error.get("message", "").lower(), error
    assert simulator.stats()["started"] == started_before, "an invalid request reached upstream"


ROUTE_LABELS = {chat.TEXT: "stream", chat.SSE: "stream-sse", chat.OPENAI: "completions"}
ALL = (chat.TEXT, chat.SSE, chat.OPENAI)
HUGE = "g" * 200_000  # a value the error message and the log must not echo whole


def _raw(body: dict) -> bytes:
    return json.dumps(body).encode()


def _with_parts(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], "stream": True}


# (case, routes, raw body, status): a sample of tests/unit/test_gateway_requests.py's table.
MALFORMED = [
    ("text part not a string", ALL, _raw(_with_parts({"type": "text", "text": 5})), 400),
    ("text part a list", ALL, _raw(_with_parts({"type": "text", "text": ["x" * 40_000]})), 400),
    (
        "image part not an object",
        ALL,
        _raw(_with_parts({"type": "image_url", "image_url": "https://x.test/a"})),
        400,
    ),
    ("content part without type", ALL, _raw(_with_parts({"text": "hi"})), 400),
    ("unknown role", ALL, _raw({"messages": [{"role": "robot", "content": "hi"}]}), 400),
    (
        "tool_calls not a list",
        ALL,
        _raw({"messages": [{"role": "assistant", "content": None, "tool_calls": "call"}]}),
        400,
    ),
    ("huge granularity", ALL, _raw({"prompt": "hi", "granularity": HUGE}), 400),
    ("max_tokens true", ALL, _raw({"prompt": "hi", "max_tokens": True}), 400),
    ("temperature NaN", ALL, b'{"prompt": "hi", "temperature": NaN}', 400),
    ("nested 300 deep", ALL, b'{"prompt": "hi", "model": ' + b"[" * 300 + b"]" * 300 + b"}", 400),
    ("prompt over the maximum", ALL, _raw({"prompt": OVERSIZED_PROMPT}), 413),
    ("unknown field", (chat.TEXT, chat.SSE), _raw({"prompt": "hi", "top_k": 40}), 400),
    ("unknown field with a huge name", (chat.TEXT, chat.SSE), _raw({"prompt": "hi", HUGE: 1}), 400),
    ("top_p over 1", (chat.OPENAI,), _raw({"prompt": "hi", "top_p": 1.5}), 400),
    ("stop of five strings", (chat.OPENAI,), _raw({"prompt": "hi", "stop": list("abcde")}), 400),
    (
        "nested extension field",
        (chat.OPENAI,),
        b'{"prompt": "hi", "stream": true, "kwargs": ' + b"[" * 300 + b"]" * 300 + b"}",
        400,
    ),
]


def requests_counted(scraped: dict, route: str, status: int) -> float:
    labels = frozenset({"route": ROUTE_LABELS[route], "status": str(status)}.items())
    return scraped.get(("streamgate_requests_total", labels), 0.0)


@pytest.mark.parametrize(
    ("route", "raw", "status"),
    [
        pytest.param(route, raw, status, id=f"{route}: {case}")
        for case, routes, raw, status in MALFORMED
        for route in routes
    ],
)
def test_malformed_body_is_a_4xx_that_the_log_and_metrics_record(
    gateway, simulator, route, raw, status
):
    started_before = simulator.stats()["started"]
    counted_before = requests_counted(gateway.metrics(), route, status)
    request_id = f"bad-{uuid.uuid4().hex}"
    trace = chat.request(
        gateway,
        route,
        raw,
        headers={"X-Request-ID": request_id},
        timeout_s=20,
    )

    assert trace.status == status, (trace.status, trace.body[:300])
    assert trace.headers.get("x-request-id") == request_id
    payload = chat.json_body(trace)
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and 0 < len(error["message"]) < 200, error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] is None or len(error["param"]) < 80, error

    record = wait_until(
        lambda: gateway.access_record(request_id),
        timeout_s=5,
        what=f"the access-log line of {request_id}",
    )
    assert record["status"] == trace.status, record
    assert record["outcome"] == "invalid", record
    assert len(json.dumps(record)) < 1000, "the log echoed the client's value"
    wait_until(
        lambda: requests_counted(gateway.metrics(), route, status) == counted_before + 1,
        timeout_s=5,
        what=f"streamgate_requests_total{{status={status}}} to count it",
    )
    assert simulator.stats()["started"] == started_before, "an invalid request reached upstream"
