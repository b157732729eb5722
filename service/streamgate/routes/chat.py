"""The three chat routes, as pure ASGI endpoints.

Pure ASGI rather than StreamingResponse: one coroutine per request sends each chunk itself, so
a chunk costs one `send` and no per-chunk task switches, and a client disconnect is seen by a
watcher on `receive` that cancels the relay at once (the upstream connection closes in its
`finally`), whether the relay is waiting for the first token or mid-stream.

A request goes: client key (auth.py), body and validation (incoming.py), then the relay
(relay.py), watched for a disconnect until it ends.
"""

from __future__ import annotations

import asyncio
import time

from .. import framing, metrics
from ..auth import Unauthorized
from ..chat_request import InvalidRequest
from ..formats import OPENAI, ChatRoute
from ..logs import LOGGER, log_request
from ..settings import Settings
from ..worker import SEND_TIMED_OUT
from .incoming import ClientGone, read_chat_request, request_id
from .relay import Outcome, Relay, send_json

# The relay times its own reads; the total timeout bounds the rest (sends to a slow reader) this
# much later, so that the relay's own timeout, with its error, comes first.
TOTAL_TIMEOUT_GRACE_S = 1.0


class ChatEndpoint:
    """ASGI app for one chat route; settings and the upstream client come from app.state."""

    def __init__(self, route: ChatRoute) -> None:
        self.route = route

    async def __call__(self, scope, receive, send) -> None:
        state = scope["app"].state
        settings: Settings = state.settings
        started_at, started_perf = asyncio.get_running_loop().time(), time.perf_counter()
        request_key = request_id(scope)
        outcome = Outcome()
        relay: Relay | None = None
        try:
            if state.client_keys:  # before the body: a stranger's upload costs us nothing
                try:
                    outcome.client = state.client_keys.identify(scope["headers"])
                except Unauthorized as exc:
                    outcome.status, outcome.outcome = 401, "unauthorized"
                    outcome.error = exc.message
                    await send_json(
                        send,
                        401,
                        framing.error_body(exc.message, code="invalid_api_key"),
                        request_key,
                        [(b"www-authenticate", exc.challenge)],
                    )
                    return
            try:
                request = await read_chat_request(receive, settings, self.route.format.name)
            except InvalidRequest as exc:
                outcome.status, outcome.outcome, outcome.error = exc.status, "invalid", exc.message
                # The rest of a body that timed out may still come: not on this connection.
                close = [(b"connection", b"close")] if exc.status == 408 else None
                await send_json(
                    send,
                    exc.status,
                    framing.error_body(exc.message, param=exc.param, code=exc.code),
                    request_key,
                    close,
                )
                return
            relay = Relay(
                self.route,
                state.upstream_client,
                settings,
                request,
                request_key,
                send,
                outcome,
                started_at,
                started_perf,
            )
            whole = self.route.format.name == OPENAI and not request.stream
            await _until_disconnect(relay, relay.run_non_stream if whole else relay.run, receive)
        except ClientGone:
            outcome.outcome = "client_disconnect"
        except Exception as exc:
            # A bug of ours, never the client's: a JSON 500 if nothing was sent yet, and the log
            # and the metrics record what the client really got.
            outcome.outcome, outcome.error = "internal_error", f"{type(exc).__name__}: {exc}"
            LOGGER.exception("request %s failed", request_key.decode())
            if relay is None or not relay.response_started:
                outcome.status = 500
                await send_json(
                    send,
                    500,
                    framing.error_body("internal error in the gateway", "server_error"),
                    request_key,
                )
        finally:
            if scope.get("extensions", {}).get(SEND_TIMED_OUT):
                outcome.outcome = "send_timeout"  # the worker cut a client that read nothing
            outcome.duration_s = time.perf_counter() - started_perf
            metrics.REQUESTS.labels(self.route.label, str(outcome.status)).inc()
            log_request(scope, request_key, self.route.label, outcome)


async def _until_disconnect(relay: Relay, run, receive) -> None:
    """await run() (one of relay's); if the client leaves first, cancel it (closing the upstream)
    at once."""
    outcome = relay.outcome
    task = asyncio.current_task()
    assert task is not None

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not relay.finished:
            relay.client_gone = True
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        async with asyncio.timeout_at(relay.total_deadline + TOTAL_TIMEOUT_GRACE_S):
            await run()
    except TimeoutError:
        outcome.outcome, outcome.error = "timeout", "total time, sending to the client"
        if not relay.response_started:
            outcome.status = 504
            await send_json(
                relay.send,
                504,
                framing.error_body(
                    "upstream timeout: total time", "upstream_error", code="timeout"
                ),
                relay.request_id,
            )
    except asyncio.CancelledError:
        # Our own cancellation (the client left) ends here; any other one goes on up.
        if not relay.client_gone or task.uncancel() > 0:
            raise
        outcome.outcome = "client_disconnect"
        phase = "first_token" if outcome.ttft_s is None else "streaming"
        metrics.DISCONNECTS.labels(relay.label, phase).inc()
    finally:
        relay.finished = True
        watcher.cancel()
