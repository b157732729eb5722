"""The gunicorn worker: uvicorn's, with the client-side deadlines uvicorn does not have.

uvicorn times out idle keep-alive connections and nothing else: a client that sends half a
request head, or that stops reading its answer, holds a connection (and, for a stream, the
upstream request behind it) for as long as it likes. This protocol adds two timers, both armed
and cancelled by asyncio's own flow-control callbacks, so a relayed chunk costs nothing extra:

- request head: from a connection's start, or a request's first byte, to the end of its head
  (STREAMGATE_REQUEST_HEAD_TIMEOUT_S); then a 408 and the connection is closed;
- send: while the socket's write buffer is full, if the client takes no byte of it for
  STREAMGATE_SEND_TIMEOUT_S; then the connection is aborted, the app sees a disconnect and
  releases the upstream, and the request is logged with outcome `send_timeout`.

The request body has its own deadline in the app (routes/chat.py), which answers 408 itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import sys
import termios
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from .framing import error_body
from .settings import get_settings

# The kernel's send buffer per client socket (it doubles this). Left to autotuning it grows to
# megabytes (tcp_wmem) for a client that does not read, held for as long as the stream lasts, and
# the send deadline cannot see a client fall behind until all of it is full. A stream needs a few
# KiB per second.
CLIENT_SEND_BUFFER_BYTES = 64 * 1024
# Set in a request's scope["extensions"] when its client was cut for not reading.
SEND_TIMED_OUT = "streamgate.send_timed_out"
_HEAD_TIMEOUT_BODY = error_body("request head not received in time")
_HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_HEAD_TIMEOUT_BODY), _HEAD_TIMEOUT_BODY)
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the request-head and send deadlines."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.head_timeout_s = settings.request_head_timeout_s
        self.send_timeout_s = settings.send_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None
        self.send_timer: asyncio.TimerHandle | None = None
        self.head_started = False
        self.unsent_at_arming = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SEND_BUFFER_BYTES)
        self._arm_head_timer()  # a connection that never sends a byte is cut too

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.send_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.send_timer = None
        super().connection_lost(exc)

    # request head
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_started = True
        if self.head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.head_started = False
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head behind a running answer: cut it later
            return
        if self.head_started:
            self.transport.write(_HEAD_TIMEOUT_RESPONSE)
        self.transport.close()

    # send
    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None:
            self._arm_send_timer()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _unsent_bytes(self) -> int:
        """Bytes the client has not taken yet: ours, plus the kernel's send queue (bytes its
        TCP has not acknowledged: with its receive window full, it acknowledges what it reads)."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                unsent += int.from_bytes(queued, sys.byteorder)
            except OSError:  # not a TCP socket (unix:): our own buffer tells enough
                pass
        return unsent

    def _arm_send_timer(self) -> None:
        self.unsent_at_arming = self._unsent_bytes()
        self.send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def _send_timed_out(self) -> None:
        self.send_timer = None
        if self._unsent_bytes() < self.unsent_at_arming:
            self._arm_send_timer()  # the client took some bytes meanwhile: slow, not gone
            return
        if self.cycle is not None:
            # asgiref types every extension as a dict; ours is a flag the route reads.
            extensions: dict[str, Any] = self.cycle.scope.setdefault("extensions", {})
            extensions[SEND_TIMED_OUT] = True
        self.transport.abort()  # close() would wait for the client to read the buffer


class StreamgateWorker(UvicornWorker):
    """gunicorn's worker_class (see gunicorn_conf.py): uvloop, httptools, and the deadlines."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "http": GuardedHttpToolsProtocol,
    }
