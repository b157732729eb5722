"""Invalid requests get a 4xx with a JSON error that names what is wrong, on the real server,
and never reach the upstream."""

from __future__ import annotations

import json

import pytest
from support import chat, stream_probe

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
    ("unknown granularity", chat.TEXT, {"prompt": "hi", "granularity": "sentence"}, 400,
     "granularity"),
    ("max_tokens not an integer", chat.SSE, {"prompt": "hi", "max_tokens": "ten"}, 400,
     "max_tokens"),
    ("max_tokens zero", chat.TEXT, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("temperature not a number", chat.TEXT, {"prompt": "hi", "temperature": "hot"}, 400,
     "temperature"),
    ("messages not a list", chat.OPENAI, {"messages": "hi", "stream": True}, 400, "messages"),
    ("messages empty", chat.OPENAI, {"messages": [], "stream": True}, 400, "messages"),
    ("message without role", chat.OPENAI, {"messages": [{"content": "hi"}]}, 400, "role"),
    ("stream not a boolean", chat.OPENAI,
     {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "named"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_a_json_error_naming_the_problem(gateway, simulator, route, body, status,
                                                          named):
    started_before = simulator.stats()["started"]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    trace = stream_probe.request(
        "127.0.0.1", gateway.port, chat.ROUTES[route], raw, headers={"Content-Type":
                                                                     "application/json"}
    )

    assert trace.status == status, (trace.status, trace.body[:300])
    error = chat.json_body(trace).get("error")
    assert isinstance(error, dict) and named.lower() in error.get("message", "").lower(), error
    assert simulator.stats()["started"] == started_before, "an invalid request reached upstream"
