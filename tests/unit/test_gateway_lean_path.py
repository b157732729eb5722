"""The production read paths against the real simulator (in a thread): the lean transport,
and the SDK's own httpx2 transport (used when the upstream is behind a proxy).

The MockTransport tests elsewhere exercise the generic path; these make sure the callback
relay (chunks sent from the upstream connection's callback) keeps every token, in order,
also when the client is slow, and that errors, stalls, timeouts and disconnects behave the
same on both transports.
"""

from __future__ import annotations

import asyncio
import json
import time

import orjson
import pytest
from streamgate import metrics
from streamgate.app import create_app
from streamgate.simulator.config import SimConfig
from streamgate.simulator.script import expected_tokens
from streamgate.transport import LeanTransport
from streamgate.upstream import make_client
from support import sse
from support.simulator_thread import SimulatorThread

from .conftest import body_bytes, call

pytestmark = pytest.mark.anyio
TOKENS = 120


@pytest.fixture(scope="module")
def simulator():
    with SimulatorThread(SimConfig(port=0, ttft_ms=5, gap_ms=1, tokens=TOKENS, stall_s=5)) as sim:
        yield sim


@pytest.fixture(params=["lean", "sdk"])
def transport(request) -> str:
    """Which transport the app's upstream client uses (tests of lean internals pin "lean")."""
    return request.param


@pytest.fixture
def lean_app(settings, simulator, transport):
    def make(**overrides):
        app = create_app(
            settings.model_copy(update={"upstream_base_url": simulator.url + "/v1", **overrides})
        )
        app.state.upstream_client = make_client(app.state.settings, transport)
        http_transport = app.state.upstream_client._client._transport
        assert isinstance(http_transport, LeanTransport) == (transport == "lean")
        return app

    return make


def sse_events(text: str) -> list[tuple[str, str]]:
    return [(event.event, event.data) for event in sse.parse(text).events]


def content_of(route: str, text: str) -> str:
    if route.endswith("/stream"):
        return text
    parts = []
    for name, data in sse_events(text):
        if name != "message" or data == "[DONE]":
            continue
        payload = json.loads(data)
        if route.endswith("stream-sse"):
            parts.append(payload["content"])
        elif payload.get("choices"):
            parts.append(payload["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


async def slow_sometimes(message):
    # Every fifth chunk the "server" makes the sender wait, as a full socket buffer would.
    if message["type"] == "http.response.body" and len(message.get("body", b"")) % 5 == 0:
        await asyncio.sleep(0.002)


@pytest.mark.parametrize(
    "route", ["/v1/chat/stream", "/v1/chat/stream-sse", "/v1/chat/completions"]
)
@pytest.mark.parametrize("send_hook", [None, slow_sometimes], ids=["fast-client", "slow-client"])
async def test_every_token_arrives_once_and_in_order(lean_app, route, send_hook):
    app = lean_app()
    sent = await call(app, route, {"prompt": "x", "stream": True}, send_hook=send_hook)
    text = body_bytes(sent).decode()
    assert content_of(route, text) == "".join(expected_tokens(TOKENS))
    assert sent[-1][1]["more_body"] is False
    await app.state.upstream_client.close()


@pytest.mark.parametrize("transport", ["lean"])
async def test_upstream_connections_are_reused(lean_app):
    app = lean_app()
    for _ in range(3):
        await call(app, "/v1/chat/stream", {"prompt": "x", "max_tokens": 3})
    transport = app.state.upstream_client._client._transport
    assert sum(len(idle) for idle in transport._idle.values()) == 1
    await app.state.upstream_client.close()


async def sse_events_of_fault(app, fault_model: str) -> list[tuple[str, str]]:
    """The SSE route's events while the simulator plays `fault_model` (sim-fault-<kind>)."""
    sent = await call(app, "/v1/chat/stream-sse", {"prompt": "x", "model": fault_model})
    return sse_events(body_bytes(sent).decode())


async def test_error_midstream_becomes_an_sse_error_event(lean_app):
    events = await sse_events_of_fault(lean_app(), "sim-fault-error-midstream")
    assert events[-1][0] == "error"
    # The client reads what failed in its terms; the upstream's own words go to the log.
    assert orjson.loads(events[-1][1])["error"]["message"] == "upstream error mid-stream"
    assert sum(1 for name, _ in events if name == "message") == TOKENS // 2


async def test_stall_midstream_hits_the_gap_timeout(lean_app):
    started = time.monotonic()
    events = await sse_events_of_fault(
        lean_app(token_gap_timeout_s=0.2), "sim-fault-stall-midstream"
    )
    assert events[-1][0] == "error"
    assert "gap between tokens" in events[-1][1]
    assert time.monotonic() - started < 2


async def test_stall_before_the_first_token_is_a_504(lean_app):
    started = time.monotonic()
    sent = await call(
        lean_app(first_token_timeout_s=0.3),
        "/v1/chat/stream",
        {"prompt": "x", "model": "sim-fault-stall-first"},
    )
    start = next(m for _, m in sent if m["type"] == "http.response.start")
    assert start["status"] == 504
    assert b"first token" in body_bytes(sent)
    assert 0.3 <= time.monotonic() - started < 2


async def test_client_disconnect_closes_the_upstream_at_once(lean_app, simulator):
    app = lean_app()
    disconnects = metrics.DISCONNECTS.labels("stream", "streaming")
    disconnects_before = disconnects._value.get()
    before = simulator.call(lambda: simulator.stats.snapshot()["cancelled"])
    body = orjson.dumps({"prompt": "x", "max_tokens": 5000})
    disconnect = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    chunks = 0

    async def send(message):
        nonlocal chunks
        chunks += message["type"] == "http.response.body"
        if chunks == 20:
            disconnect.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/stream",
        "headers": [],
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
        "raw_path": b"/v1/chat/stream",
        "client": None,
        "server": None,
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline:
        if simulator.call(lambda: simulator.stats.snapshot()["cancelled"]) > before:
            break
        await asyncio.sleep(0.005)
    assert simulator.call(lambda: simulator.stats.snapshot()["cancelled"]) == before + 1
    assert disconnects._value.get() == disconnects_before + 1


@pytest.mark.parametrize("transport", ["lean"])
async def test_replayed_sdk_request_keeps_ids_faults_and_text(lean_app, simulator):
    """After the SDK's first request, later ones replay its head: same results as the SDK's."""
    app = lean_app()
    transport = app.state.upstream_client._client._transport
    await call(app, "/v1/chat/stream", {"prompt": "x", "max_tokens": 3})  # through the SDK
    assert transport._learned, "the SDK's request head was not recorded"

    headers = [(b"x-request-id", b"replayed-42")]
    sent = await call(app, "/v1/chat/stream", {"prompt": "x"}, headers=headers)
    assert body_bytes(sent).decode() == "".join(expected_tokens(TOKENS))
    recent = simulator.call(lambda: simulator.stats.snapshot()["recent_request_ids"])
    assert recent[-1] == "replayed-42"

    sent = await call(app, "/v1/chat/stream", {"prompt": "x", "model": "sim-fault-429"})
    start = next(m for _, m in sent if m["type"] == "http.response.start")
    assert start["status"] == 429
    await app.state.upstream_client.close()


@pytest.mark.parametrize("ask_usage", [True, False], ids=["usage-asked", "usage-not-asked"])
async def test_usage_is_asked_upstream_only_when_configured(lean_app, ask_usage):
    app = lean_app(upstream_include_usage=ask_usage)
    sent = await call(app, "/v1/chat/stream-sse", {"prompt": "x", "max_tokens": 7})
    text = body_bytes(sent).decode()
    assert content_of("/v1/chat/stream-sse", text) == "".join(expected_tokens(7))
    name, data = sse_events(text)[-1]
    assert name == "done"
    usage = orjson.loads(data)["usage"]
    assert (usage["completion_tokens"] == 7) if ask_usage else (usage is None), usage

    # An OpenAI client asking for usage gets it only when the upstream was asked for it.
    sent = await call(
        app,
        "/v1/chat/completions",
        {"prompt": "x", "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}},
    )
    text = body_bytes(sent).decode()
    chunks = [json.loads(data) for _, data in sse_events(text) if data != "[DONE]"]
    assert content_of("/v1/chat/completions", text) == "".join(expected_tokens(7))
    assert any(chunk.get("usage") for chunk in chunks) == ask_usage
    assert text.endswith("data: [DONE]\n\n")
    await app.state.upstream_client.close()
