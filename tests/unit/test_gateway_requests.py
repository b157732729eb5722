"""Invalid requests get a 4xx JSON body that names the problem; valid ones reach the upstream."""

from __future__ import annotations

import httpx
import orjson
import pytest

pytestmark = pytest.mark.anyio  # coroutine tests run on asyncio via anyio's plugin

ROUTES = ["/v1/chat/stream", "/v1/chat/stream-sse", "/v1/chat/completions"]

BAD_INPUTS = [
    # (body, status, words the message must contain)
    (b"", 400, "empty"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"{}", 400, "prompt is required"),
    (b'{"prompt": ""}', 400, "prompt is empty"),
    (b'{"prompt": "   "}', 400, "prompt is empty"),
    (b'{"prompt": 42}', 400, "prompt must be a string"),
    (b'{"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}', 400, "not both"),
    (b'{"messages": []}', 400, "non-empty list"),
    (b'{"messages": [{"content": "x"}]}', 400, "string role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "content must be"),
    (b'{"prompt": "hi", "max_tokens": "10"}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": true}', 400, "max_tokens"),
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "hi", "temperature": 3}', 400, "temperature"),
    (b'{"prompt": "hi", "model": 7}', 400, "model"),
    (b'{"prompt": "hi", "granularity": "sentence"}', 400, "unknown granularity"),
    (b'{"prompt": "' + b"x" * 101 + b'"}', 413, "too long"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("body", "status", "words"), BAD_INPUTS)
async def test_bad_input_gets_4xx_json_saying_what_is_wrong(make_app, fake_upstream, route, body,
                                                            status, words):
    app = make_app(max_prompt_chars=100)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        response = await client.post(route, content=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]["message"]
    assert fake_upstream.requests == []  # nothing invalid goes upstream


async def test_openai_route_rejects_non_boolean_stream(make_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(make_app()),
                                 base_url="http://t") as client:
        response = await client.post("/v1/chat/completions",
                                     json={"prompt": "hi", "stream": "yes"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


async def test_valid_request_streams_with_headers_and_passes_request_id(make_app, fake_upstream):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(make_app()),
                                 base_url="http://t") as client:
        response = await client.post("/v1/chat/stream", json={"prompt": "hi", "max_tokens": 7},
                                     headers={"X-Request-ID": "req-123"})
    assert response.status_code == 200
    assert response.text == "Hello world"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-request-id"] == "req-123"
    sent = fake_upstream.requests[0]
    assert sent.headers["x-request-id"] == "req-123"
    payload = orjson.loads(sent.content)
    assert payload["max_tokens"] == 7 and payload["stream"] is True
    assert payload["messages"] == [{"role": "user", "content": "hi"}]


async def test_unsafe_request_id_is_replaced(make_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(make_app()),
                                 base_url="http://t") as client:
        response = await client.post("/v1/chat/stream", json={"prompt": "hi"},
                                     headers={"X-Request-ID": "bad id\twith spaces"})
    assert response.headers["x-request-id"] != "bad id\twith spaces"
    assert len(response.headers["x-request-id"]) == 32


@pytest.mark.parametrize(("upstream_status", "client_status"),
                         [(400, 400), (401, 401), (404, 404), (429, 429), (500, 502), (503, 502)])
async def test_upstream_status_before_first_byte_is_a_real_status(make_app, fake_upstream,
                                                                  upstream_status, client_status):
    fake_upstream.status = upstream_status
    async with httpx.AsyncClient(transport=httpx.ASGITransport(make_app()),
                                 base_url="http://t") as client:
        response = await client.post("/v1/chat/stream-sse", json={"prompt": "hi"})
    assert response.status_code == client_status
    assert "error" in response.json()
