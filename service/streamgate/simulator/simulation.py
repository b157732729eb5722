"""The simulation: the process's shared state (settings, counters, the token clock) and one
chat answer played token by token on that clock, faults included.

Why not a coroutine per stream: the simulator must never be the bottleneck of a benchmark (one
process holds 5,000 concurrent streams on two cores). Here a stream is a small object on the
clock's timer wheel and a token is one write of pre-encoded bytes; the HTTP layer
(http_server.py) owns the connection an answer writes to.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import TYPE_CHECKING, Any

from streamgate.simulator.clock import TokenClock
from streamgate.simulator.config import SimConfig
from streamgate.simulator.faults import MIDSTREAM_END_FAULTS, MIDSTREAM_ERROR
from streamgate.simulator.openai_format import (
    DONE_EVENT,
    TOKENS,
    CompletionFrames,
    error_event,
    usage,
)
from streamgate.simulator.stats import RECENT_LIMIT, Stats

if TYPE_CHECKING:
    from streamgate.simulator.http_server import SimProtocol


class Simulator:
    """Shared state of one simulator process: settings, counters, the token clock."""

    def __init__(self, config: SimConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.stats = Stats()
        self.clock = TokenClock(loop)
        self.random = random.Random(0)  # jitter only; the text never varies
        self.connections: set[SimProtocol] = set()

    def snapshot(self) -> dict[str, Any]:
        """/stats: the counters plus how late the token clock has been running."""
        lags = sorted(self.clock.lags_ms)
        snapshot = self.stats.snapshot()
        # Which client connection (its port) carries which answer right now: a test can tell
        # which of a gateway's worker processes holds a stream (at most RECENT_LIMIT listed).
        in_flight = (c for c in self.connections if c.response is not None)
        snapshot["active_streams"] = [
            {
                "request_id": connection.response.request_id,
                "peer_port": connection.peer_port,
                "tokens_sent": connection.response.tokens_sent,
            }
            for connection in itertools.islice(in_flight, RECENT_LIMIT)
            if connection.response is not None
        ]
        snapshot["clock_lag_ms"] = {
            "p50": lags[len(lags) // 2] if lags else 0.0,
            "p99": lags[int(len(lags) * 0.99)] if lags else 0.0,
            "max": lags[-1] if lags else 0.0,
        }
        return snapshot

    def reset(self) -> None:
        self.stats.reset()
        self.clock.lags_ms.clear()

    def delay_s(self, base_ms: float) -> float:
        jitter = self.config.jitter_ms
        if jitter:
            return max(0.0, base_ms + self.random.uniform(-jitter, jitter)) / 1000.0
        return base_ms / 1000.0


class ChatResponse:
    """One /v1/chat/completions answer, stepped token by token by the TokenClock."""

    __slots__ = (
        "chunked",
        "conn",
        "content_parts",
        "due",
        "fault",
        "finished",
        "frames",
        "n_tokens",
        "next_index",
        "prompt_tokens",
        "request_id",
        "sim",
        "stalled",
        "stream",
        "tokens_sent",
    )

    def __init__(
        self,
        conn: SimProtocol,
        sim: Simulator,
        chunked: bool,
        request_id: str,
        model: str,
        fault: str | None,
        n_tokens: int,
        stream: bool,
        include_usage: bool,
        prompt_tokens: int,
    ) -> None:
        self.conn = conn
        self.sim = sim
        self.request_id = request_id
        self.fault = fault
        self.n_tokens = n_tokens
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.chunked = chunked  # HTTP/1.1: chunked framing; 1.0: the close ends the body
        self.frames = CompletionFrames(model, include_usage)
        self.next_index = 0
        self.tokens_sent = 0
        self.finished = False
        self.stalled = False
        self.content_parts: list[str] = []
        self.due = 0.0

    def start(self) -> None:
        """Send the headers (streaming) and schedule the first token."""
        if self.stream:
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-request-id", self.request_id.encode("latin-1")),
            ]
            if self.chunked:
                headers.append((b"transfer-encoding", b"chunked"))
            self.conn.send_head(200, headers, keep_alive=self.chunked and self.conn.keep_alive)
        self.due = self.sim.loop.time() + self.sim.delay_s(self.sim.config.ttft_ms)
        if self.fault == "stall-first":
            self.stalled = True
            self.due += self.sim.config.stall_s
        self.sim.clock.call_at(self.due, self)

    def step(self) -> None:
        """Send the next token (or play the fault due at this point) and schedule the next."""
        index = self.next_index
        half = self.n_tokens // 2
        if index == half and self.fault in MIDSTREAM_END_FAULTS:
            self._end_midstream()
            return
        if index == half and self.fault == "stall-midstream" and not self.stalled:
            self.stalled = True
            self.due += self.sim.config.stall_s
            self.sim.clock.call_at(self.due, self)
            return
        self.next_index = index + 1
        last = self.next_index == self.n_tokens
        dropped = self.fault == "drop-token" and index == half
        if self.stream:
            frames = self.frames
            events = []
            if index == 0:
                events.append(frames.role_event())
            if not dropped:
                events.append(frames.token(index))
            if last:
                events.append(frames.stop_event())
                if frames.include_usage:
                    events.append(frames.usage_event(self._usage()))
                events.append(DONE_EVENT)
            if events:
                self.conn.write_body(b"".join(events), self.chunked, end=last)
        elif not dropped:
            self.content_parts.append(TOKENS[index])
        if not dropped:
            self.tokens_sent += 1
            self.sim.stats.tokens_sent += 1
        if last:
            self._finish_normally()
            return
        self.due += self.sim.delay_s(self.sim.config.gap_ms)
        self.sim.clock.call_at(self.due, self)

    def _usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.n_tokens)

    def _finish_normally(self) -> None:
        if not self.stream:  # a stream's last write already ended the body
            body = self.frames.completion("".join(self.content_parts), self._usage())
            self.conn.send_json(200, body, self.request_id)
        self._mark_done(close=self.stream and not self.chunked)

    def _end_midstream(self) -> None:
        if self.fault == "close-midstream":
            self._mark_done(close=True)
            return
        # error-midstream
        if self.stream:
            self.conn.write_body(error_event(MIDSTREAM_ERROR), self.chunked, end=True)
            self._mark_done(close=not self.chunked)
        else:
            self.conn.send_json(500, MIDSTREAM_ERROR, self.request_id)
            self._mark_done(close=False)

    def _mark_done(self, close: bool) -> None:
        self.finished = True
        self.sim.stats.completed += 1
        self.conn.response_done(self, close=close)

    def cancel(self) -> None:
        """The client went away before the answer was complete."""
        if self.finished:
            return
        self.finished = True
        self.sim.stats.record_cancel(self.request_id, self.tokens_sent)
