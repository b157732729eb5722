"""Sending from a callback: the one place that drives the ASGI server's `send` by hand.

The relay's fast path (routes/relay.py) sends a chunk from inside the upstream connection's
data callback, so a chunk costs no task wake-up. A callback cannot `await`, so EagerSend runs
the `send` coroutine with `coroutine.send(None)`: it relies on two facts about the installed
uvicorn and Python, which tests/unit/test_gateway_eager_send_contract.py checks on the real
server and fails loudly when an upgrade changes them:

1. uvicorn's `send` of a body message finishes without suspending while the socket's write
   buffer has room (it only waits, on flow control, when the transport paused writing), and
   needs no running task (no `asyncio.timeout`, no `current_task()`) to do so;
2. when it does suspend, what it yields is an asyncio future (or a bare `yield`), which the
   relay's task can await in its place once it has cleared the future's private
   `_asyncio_future_blocking` flag (as a task would have), then resume the coroutine.

Anything else it raises comes back to the caller; nothing is lost or reordered: while a send
is blocked the relay's task owns the stream until `finish` has driven it to its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]


class EagerSend:
    """send(message) run to its end at once when it can; else left for the task to finish."""

    __slots__ = ("_blocked", "_send")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._blocked: tuple[Coroutine[Any, Any, None], Any] | None = None

    @property
    def blocked(self) -> bool:
        return self._blocked is not None

    def start(self, message: dict[str, Any]) -> bool:
        """Run send(message) now; True if it finished, False if it waits (call `finish`)."""
        coroutine = self._send(message)
        try:
            waiting_on = coroutine.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            return True
        self._blocked = (coroutine, waiting_on)  # type: ignore[assignment]
        return False

    async def finish(self) -> None:
        """In the task: drive the send that `start` left waiting to its end."""
        assert self._blocked is not None
        coroutine, waiting_on = self._blocked
        self._blocked = None
        try:
            while True:
                if waiting_on is None:  # a bare yield: let the loop run once
                    await asyncio.sleep(0)
                else:
                    # A task clears this flag on what a coroutine yields to it; this one was
                    # yielded to us, and asyncio's C future refuses an await while it is set.
                    waiting_on._asyncio_future_blocking = False
                    await waiting_on
                waiting_on = coroutine.send(None)
        except StopIteration:
            pass
        finally:
            coroutine.close()  # no-op when finished; stops it if we were cancelled
