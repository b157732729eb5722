"""Unit-test fixtures for the gateway: the app in-process with a scripted fake upstream.

The fake upstream speaks OpenAI's streaming format through an httpx2 MockTransport, so the
gateway's SDK request path and raw-SSE reader run unchanged, without sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import httpx2
import openai
import orjson
import pytest
from streamgate.app import create_app
from streamgate.settings import Settings


def chunk_event(content: str | None, finish_reason: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    event = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


def stream_body(deltas: Sequence[str]) -> list[bytes]:
    usage = {"prompt_tokens": 1, "completion_tokens": len(deltas), "total_tokens": len(deltas) + 1}
    return [
        *(chunk_event(delta) for delta in deltas),
        chunk_event(None, "stop"),
        b"data: " + orjson.dumps({"id": "chatcmpl-test", "choices": [], "usage": usage}) + b"\n\n",
        b"data: [DONE]\n\n",
    ]


class FakeUpstream:
    """Answers every chat request with `parts` (bytes), sleeping `delays[i]` before part i."""

    def __init__(self) -> None:
        self.parts: list[bytes] = stream_body(["Hello", " world"])
        self.delays: list[float] = []
        self.status = 200
        self.header_delay = 0.0  # seconds before the response headers
        self.requests: list[httpx2.Request] = []

    async def _body(self):
        for index, part in enumerate(self.parts):
            if index < len(self.delays) and self.delays[index]:
                await asyncio.sleep(self.delays[index])
            yield part

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if self.header_delay:
            await asyncio.sleep(self.header_delay)
        if self.status != 200:
            body = orjson.dumps({"error": {"message": f"fake {self.status}"}})
            return httpx2.Response(
                self.status, content=body, headers={"content-type": "application/json"}
            )
        return httpx2.Response(
            200, content=self._body(), headers={"content-type": "text/event-stream"}
        )


async def call(
    app, path: str, body: dict, send_hook=None, headers: list[tuple[bytes, bytes]] | None = None
) -> list[tuple[float, dict]]:
    """Drive the ASGI app directly; returns (arrival time, message) for every send.

    `send_hook(message)`, if given, is awaited inside each send (to play a slow client)."""
    sent: list[tuple[float, dict]] = []
    request = {"type": "http.request", "body": orjson.dumps(body), "more_body": False}
    done = asyncio.Event()

    async def receive():
        nonlocal request
        if request is not None:
            message, request = request, None
            return message
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if send_hook is not None:
            await send_hook(message)
        sent.append((time.monotonic(), message))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *(headers or [])],
        "client": ("t", 1),
        "server": ("t", 80),
        "state": {},
    }
    await app(scope, receive, send)
    done.set()
    return sent


def bodies(sent) -> list[tuple[float, bytes]]:
    return [(at, m["body"]) for at, m in sent if m["type"] == "http.response.body" and m["body"]]


def body_bytes(sent) -> bytes:
    """The whole response body the client got."""
    return b"".join(body for _, body in bodies(sent))


@pytest.fixture
def settings() -> Settings:
    return Settings(upstream_base_url="http://upstream.test/v1", upstream_retries=0, _env_file=None)  # type: ignore[call-arg]


@pytest.fixture
def fake_upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def make_app(settings: Settings, fake_upstream: FakeUpstream) -> Callable[..., object]:
    def make(**overrides):
        app = create_app(settings.model_copy(update=overrides) if overrides else settings)
        app.state.upstream_client = openai.AsyncOpenAI(
            base_url=app.state.settings.upstream_base_url,
            api_key="test",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(fake_upstream.handle)),
        )
        return app

    return make


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
