"""An OpenAI-compatible upstream that misbehaves at the HTTP level, on purpose, on loopback.

Each request's answer is the words of its own prompt, so a test can tell whose answer a client
got. The request's `model` picks the misbehaviour (see BEHAVIOURS); the rest of the answer is
a well-formed chunked `text/event-stream` of OpenAI chunks ending in `data: [DONE]`.
It runs in a thread of the test process with its own event loop; `prompts_seen` counts the
requests that reached it, by prompt.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from dataclasses import dataclass, field

STALE_TEXT = "STALE ANSWER FROM ANOTHER REQUEST"
HUGE_HEAD_BYTES = 1024 * 1024
HUGE_EVENT_BYTES = 2 * 1024 * 1024
SLOW_HEAD_S = 3.0

BEHAVIOURS = (
    "plain",
    "interim-100",  # an unasked 100 Continue before the response
    "interim-103",  # 103 Early Hints (CDNs and some proxies send it)
    "interim-several",
    "idle-bytes",  # a whole second response written on the connection once it is idle
    "trailing-junk",  # the same, in the same write as the real response
    "close-when-idle",  # the server closes the keep-alive connection soon after answering
    "drop-next",  # the next request on this connection is read and the connection closed
    "connection-close",  # Connection: close, then close
    "chunk-ext-trailers",  # chunk extensions and trailers
    "split-head",  # the response head one byte per write
    "huge-head",  # a 1 MiB header
    "huge-event",  # one 2 MiB SSE event
    "slow-head",  # no response head for SLOW_HEAD_S
    "head-then-close",  # the head, then the connection closes: must not be retried
    "late-end",  # the body's last empty chunk 50 ms after `data: [DONE]`, as real servers may
)


def sse_answer(prompt: str, model: str) -> list[bytes]:
    events = []
    for word in prompt.split(" "):
        chunk = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
        }
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    last = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    events.append(b"data: " + json.dumps(last).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def expected_text(prompt: str) -> str:
    return "".join(word + " " for word in prompt.split(" "))


def chunked(parts: list[bytes], extension: bytes = b"", trailers: bytes = b"") -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(part), extension, part) for part in parts)
    return body + b"0\r\n" + trailers + b"\r\n"


def response(
    prompt: str,
    model: str,
    *,
    head_extra: bytes = b"",
    extension: bytes = b"",
    trailers: bytes = b"",
) -> tuple[bytes, bytes]:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n" + head_extra + b"\r\n"
    )
    return head, chunked(sse_answer(prompt, model), extension, trailers)


@dataclass
class HostileUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    prompts_seen: Counter = field(default_factory=Counter)
    connections: int = 0  # accepted so far
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None
    _handlers: set = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HostileUpstream:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="hostile-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("hostile upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            for handler in self._handlers:
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def describe(self) -> str:
        return f"hostile upstream on {self.base_url}: requests by prompt {dict(self.prompts_seen)}"

    async def _read_request(self, reader: asyncio.StreamReader) -> dict | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await reader.readexactly(length) if length else b"{}"
        return json.loads(body)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        drop_next = False
        self.connections += 1
        handler = asyncio.current_task()
        self._handlers.add(handler)
        try:
            while (request := await self._read_request(reader)) is not None:
                prompt = request["messages"][-1]["content"]
                self.prompts_seen[prompt] += 1
                if drop_next:  # the stale-pool race: the request was written, nobody answers
                    return
                model = request.get("model", "plain")
                keep_open = await self._answer(writer, prompt, model)
                drop_next = model == "drop-next"
                if not keep_open:
                    return
        finally:
            self._handlers.discard(handler)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, prompt: str, model: str) -> bool:
        """Write the answer in the way `model` asks; False: close the connection after it."""
        interim = {
            "interim-100": b"HTTP/1.1 100 Continue\r\n\r\n",
            "interim-103": b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
            "interim-several": b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nlink: </b.js>; rel=preload\r\n\r\n",
        }.get(model, b"")
        if model == "huge-head":
            head, body = response(
                prompt, model, head_extra=b"x-padding: " + b"a" * HUGE_HEAD_BYTES + b"\r\n"
            )
        elif model == "huge-event":
            head, _ = response(prompt, model)
            body = chunked([b"data: " + b"x" * HUGE_EVENT_BYTES])
        elif model == "connection-close":
            head, body = response(prompt, model, head_extra=b"connection: close\r\n")
        elif model == "chunk-ext-trailers":
            head, body = response(
                prompt,
                model,
                head_extra=b"trailer: x-checksum\r\n",
                extension=b";name=value",
                trailers=b"x-checksum: abc\r\n",
            )
        else:
            head, body = response(prompt, model)

        if model == "slow-head":
            await asyncio.sleep(SLOW_HEAD_S)
        if interim:  # as a real server sends them: ahead of the final response, on their own
            writer.write(interim)
            await writer.drain()
            await asyncio.sleep(0.02)
            interim = b""
        if model == "split-head":
            for byte in range(len(head)):
                writer.write(head[byte : byte + 1])
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.write(body)
        elif model == "head-then-close":
            writer.write(interim + head)
            await writer.drain()
            return False
        elif model == "late-end":
            last_chunk = b"0\r\n\r\n"
            writer.write(head + body[: -len(last_chunk)])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(last_chunk)
        elif model == "trailing-junk":
            stale_head, stale_body = response(STALE_TEXT, "stale")
            writer.write(interim + head + body + stale_head + stale_body)
        else:
            writer.write(interim + head + body)
        await writer.drain()

        if model == "idle-bytes":
            await asyncio.sleep(0.05)
            stale_head, stale_body = response(STALE_TEXT, "stale")
            writer.write(stale_head + stale_body)
            await writer.drain()
        elif model == "close-when-idle":
            await asyncio.sleep(0.05)
            return False
        return model != "connection-close"
