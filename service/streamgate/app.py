"""The app factory: gunicorn runs `streamgate.app:create_app()` (one app per worker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route

from . import __version__
from .auth import ClientKeys
from .formats import CHAT_ROUTES
from .logs import configure as configure_logs
from .logs import log_event
from .openapi import add_chat_routes
from .routes import health
from .routes.chat import ChatEndpoint
from .settings import Settings, get_settings
from .upstream import choose_transport, make_client


class StreamGateApp(FastAPI):
    """FastAPI, except that the chat routes are called straight from the server.

    Their sends then skip the middleware stack (two wrappers per chunk) and the coroutine
    chain a chunk resumes is seven frames shorter; everything else (health, metrics, docs,
    405s on the chat paths) goes through FastAPI as usual.
    """

    chat_endpoints: dict[str, ChatEndpoint]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.chat_endpoints.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, with the chat routes it cannot see described (openapi.py)."""
        schema = self.openapi_schema
        if schema is None:
            schema = super().openapi()  # also kept as self.openapi_schema
            add_chat_routes(schema, self.state.settings, bool(self.state.client_keys))
        return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logs(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One upstream client (one connection pool) per worker, made inside its event loop.
        transport = choose_transport(settings)
        app.state.upstream_client = make_client(settings, transport.name)
        log_event(
            "worker_started",
            loop=type(asyncio.get_running_loop()).__module__,
            upstream_transport=transport.name,
            upstream_transport_reason=transport.reason,
            settings=settings.public_dict(),
        )
        try:
            yield
        finally:
            client, app.state.upstream_client = app.state.upstream_client, None
            await client.close()

    app = StreamGateApp(title="streamgate", version=__version__, lifespan=lifespan)
    app.chat_endpoints = {}
    app.state.settings = settings
    app.state.client_keys = ClientKeys(settings.client_key_hashes)  # hashed once per worker
    app.state.upstream_client = None
    app.include_router(health.router)
    for route in CHAT_ROUTES:
        # Starlette treats a non-function endpoint as a plain ASGI app: no StreamingResponse.
        endpoint = app.chat_endpoints[route.path] = ChatEndpoint(route)
        app.router.routes.append(Route(route.path, endpoint, methods=["POST"]))
    return app
