"""A loopback HTTP server that gives every GET the same answer: another site's page, an app that
is up but not ready. Runs in a thread until the caller's ExitStack closes."""

from __future__ import annotations

import http.server
import threading
from contextlib import ExitStack


class _FixedAnswer(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, str, bytes] = (204, "text/plain", b"")

    def do_GET(self) -> None:
        status, content_type, body = self.answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve_fixed_answer(stack: ExitStack, status: int, content_type: str, body: bytes) -> int:
    """Serve (status, content type, body) to every GET on a free loopback port: the port."""
    handler = type("FixedAnswer", (_FixedAnswer,), {"answer": (status, content_type, body)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    # Closed in reverse: stop serving, close the socket, then wait for the thread.
    stack.callback(thread.join, 5)
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return server.server_address[1]
