"""The contract the callback send (routes/eager_send.py) relies on, checked on the installed
uvicorn and Python with the gateway's own HTTP protocol on a real socket, on asyncio's loop and
on uvloop (the one deployed). If an upgrade breaks it, these fail, naming what changed:

1. uvicorn's `send` of a body message finishes inside a plain loop callback (no task running)
   without suspending while the client reads;
2. with a client that does not read, it suspends on an asyncio future, and EagerSend.finish,
   awaiting that future in the relay's task, completes it: every byte arrives, in order;
3. that needs EagerSend to clear the future's private `_asyncio_future_blocking` flag (the
   negative control: without it, asyncio refuses the await). If Python stops needing it, the
   control fails and the line can go.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import uvicorn
from streamgate.routes import eager_send
from streamgate.routes.eager_send import EagerSend
from streamgate.worker import GuardedHttpToolsProtocol
from uvicorn.server import ServerState

pytestmark = pytest.mark.anyio
CHUNKS = 40


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request):
    return request.param


def chunk(n: int, size: int) -> bytes:
    return (b"%06d" % n) + b"x" * (size - 6)


class EagerApp:
    """Sends CHUNKS body chunks with EagerSend from one loop callback, as the relay does; the
    rest (a send left waiting, the end) from the request's task."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.finished_at_once: list[bool] = []
        self.task_in_callback: object = "not run"
        self.error: BaseException | None = None

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        eager = EagerSend(send)
        loop = asyncio.get_running_loop()
        handed_back = loop.create_future()
        next_chunk = 0

        def from_callback() -> None:
            nonlocal next_chunk
            self.task_in_callback = asyncio.current_task()
            try:
                while next_chunk < CHUNKS:
                    message = {
                        "type": "http.response.body",
                        "body": chunk(next_chunk, self.chunk_size),
                        "more_body": True,
                    }
                    next_chunk += 1
                    done = eager.start(message)
                    self.finished_at_once.append(done)
                    if not done:
                        break
            except BaseException as error:  # e.g. a send that needs a running task
                handed_back.set_exception(error)
            else:
                handed_back.set_result(None)

        loop.call_soon(from_callback)
        try:
            await handed_back
            if eager.blocked:
                await eager.finish()
            for n in range(next_chunk, CHUNKS):
                await send(
                    {
                        "type": "http.response.body",
                        "body": chunk(n, self.chunk_size),
                        "more_body": True,
                    }
                )
        except BaseException as error:  # reported by the test, not lost in the server's log
            self.error = error
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def fetch(app: EagerApp, read_after_s: float) -> bytes:
    """GET from the gateway's uvicorn protocol on a real socket; the client reads only after
    `read_after_s`. Returns the decoded body."""
    config = uvicorn.Config(app, lifespan="off", log_level="critical", access_log=False)
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: GuardedHttpToolsProtocol(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        await asyncio.sleep(read_after_s)
        raw = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    finally:
        server.close()
        for connection in list(state.connections):
            connection.shutdown()
        await server.wait_closed()
    if app.error is not None:
        raise AssertionError(f"the app failed: {app.error!r}") from app.error
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    body, rest = bytearray(), chunked
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(body)
        body += rest[:size]
        rest = rest[size + 2 :]


def expected(size: int) -> bytes:
    return b"".join(chunk(n, size) for n in range(CHUNKS))


async def test_send_finishes_inside_a_callback_while_the_client_reads():
    app = EagerApp(chunk_size=200)
    body = await fetch(app, read_after_s=0)
    assert app.error is None, app.error
    assert app.task_in_callback is None  # really outside any task, as in a protocol callback
    assert app.finished_at_once == [True] * CHUNKS, (
        "uvicorn's send no longer finishes without suspending while the socket has room: the "
        "callback path (routes/eager_send.py) would hand every chunk back to the task"
    )
    assert body == expected(200)


async def test_a_send_to_a_client_that_does_not_read_is_finished_by_the_task():
    app = EagerApp(chunk_size=64 * 1024)  # 2.5 MiB: more than the socket buffers hold
    body = await fetch(app, read_after_s=0.3)
    assert app.error is None, f"finishing a blocked send failed: {app.error!r}"
    assert False in app.finished_at_once, "the client never made a send wait: nothing tested"
    assert body == expected(64 * 1024)  # every byte, in order, none twice


async def test_control_without_clearing_the_flag_the_blocked_send_fails(monkeypatch):
    """EagerSend.finish with the flag clearing taken out: asyncio refuses the await. If this
    stops failing, Python no longer needs the private flag written (remove it from finish)."""

    async def finish_without_clearing(self) -> None:
        coroutine, waiting_on = self._blocked
        self._blocked = None
        try:
            while True:
                if waiting_on is None:
                    await asyncio.sleep(0)
                else:
                    await waiting_on
                waiting_on = coroutine.send(None)
        except StopIteration:
            pass
        finally:
            coroutine.close()

    monkeypatch.setattr(eager_send.EagerSend, "finish", finish_without_clearing)
    app = EagerApp(chunk_size=64 * 1024)
    with contextlib.suppress(AssertionError):  # fetch reports the app's error
        await fetch(app, read_after_s=0.3)
    assert isinstance(app.error, RuntimeError), app.error
    assert "await wasn't used with future" in str(app.error)
