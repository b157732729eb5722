"""Measuring one streamed response and judging it: no Locust, no sockets, so it is unit-testable.

A `StreamRecord` is fed every read of the body with its arrival time (`perf_counter`). A decoder
per wire format turns bytes into content text, the upstream's token count, in-band errors and the
protocol's markers (role chunk, finish reason, end event). The judges then say whether the
response arrived buffered, and whether it is corrupt: against the simulator its text must be the
simulator's exactly; from any other upstream (whose words nobody knows) its protocol must be whole.
"""

from __future__ import annotations

import codecs
import itertools
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# The two streaming rules, defined once with the doctor's verdicts (stdlib only, in the wheel).
from streamgate.doctor.verdict import MIN_SEPARATE_READS_RATIO, MIN_SPAN_RATIO

# One SSE parser for the tests, the benchmark and the load tests: tests/support/sse.py (stdlib
# only). The load test runs from the repository (run.py, make loadtest), never alone.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from support import sse

# Error kinds: the start of every failure message, so Locust's error table groups by kind.
HTTP_STATUS = "http status"
ABORTED = "aborted stream"
ERROR_EVENT = "in-band error event"
MALFORMED = "malformed stream"
NO_END = "aborted stream: no end event"
BUFFERED = "buffered"
CORRUPT = "corrupt"
GENERATOR_LAGGED = "generator lagged"


class TextDecoder:
    """text/plain: the body is the content (UTF-8, a character may be split across reads)."""

    # Whether the format marks its own end (then a body that stops without it was cut short).
    has_end_event = False

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens_reported: int | None = None
        self.error: str | None = None
        self.done = False

    def feed(self, data: bytes) -> tuple[str, int]:
        """New content text in `data`, and how many protocol units (tokens) carried it."""
        text = self._utf8.decode(data)
        return text, 0


class SSEDecoder(TextDecoder):
    """text/event-stream, parsed by the WHATWG parser the tests and the benchmark use too.

    Subclasses say what an event means (`on_event`); this base treats the data as content.
    """

    has_end_event = True

    def __init__(self) -> None:
        super().__init__()
        self._parser = sse.Parser()

    def feed(self, data: bytes) -> tuple[str, int]:
        content, units = [], 0
        for event in self._parser.feed(data):
            text = self.on_event(event.event, event.data)
            if text:
                content.append(text)
                units += 1
        return "".join(content), units

    def on_event(self, event_type: str, data: str) -> str:
        """Content carried by one event ("" for none); records errors and the end."""
        if event_type == "error":
            self.error = data[:200]
            return ""
        if event_type in ("done", "end") or data == "[DONE]":
            self.done = True
            if data.startswith("{"):
                self.on_json(json.loads(data))  # the gateway's done event carries the usage
            return ""
        if data.startswith("{"):
            return self.on_json(json.loads(data))
        return data

    def on_json(self, payload: dict) -> str:
        if "error" in payload:
            self.error = str(payload["error"])[:200]
            return ""
        usage = payload.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.tokens_reported = int(usage["completion_tokens"])
        for key in ("content", "text", "token", "delta"):
            if isinstance(payload.get(key), str):
                return payload[key]
        return ""


class OpenAIDecoder(SSEDecoder):
    """`chat.completion.chunk` events: a role chunk, delta content, a finish reason, a usage
    chunk, `data: [DONE]`."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks = 0
        self.first_role: str | None = None
        self.finish_reason: str | None = None
        self.not_chunks = 0  # events whose `object` is not chat.completion.chunk

    def on_json(self, payload: dict) -> str:
        super().on_json({key: payload[key] for key in ("error", "usage") if key in payload})
        if self.error:
            return ""
        if payload.get("object") != "chat.completion.chunk":
            self.not_chunks += 1
        self.chunks += 1
        choices = payload.get("choices") or []
        if not choices:
            return ""
        delta = choices[0].get("delta") or {}
        if self.chunks == 1:
            self.first_role = delta.get("role")
        self.finish_reason = choices[0].get("finish_reason") or self.finish_reason
        return delta.get("content") or ""


@dataclass
class StreamTiming:
    """The upstream's pace when it is known (the simulator's flags), and when a response counts
    as buffered. `gap_ms` None: a real model's pace, unknown in advance."""

    ttft_ms: float = 50.0
    gap_ms: float | None = 20.0
    tokens: int = 50
    # At least this share of the tokens must arrive in reads of their own...
    min_separate_reads_ratio: float = MIN_SEPARATE_READS_RATIO
    # ...and the first-to-last content span must be at least this share of the generation time.
    min_span_ratio: float = MIN_SPAN_RATIO

    def pace_ms(self, record: StreamRecord) -> float:
        """The gap between two tokens: the known one, else the response's own typical (median)
        gap between two content reads."""
        if self.gap_ms is not None:
            return self.gap_ms
        gaps = sorted(record.gaps_ms())
        return gaps[len(gaps) // 2] if gaps else 0.0

    def expected_span_ms(self, tokens: int, record: StreamRecord) -> float:
        """How long the content should take to arrive: (tokens - 1) gaps at the known pace; at
        an unknown pace, its reads at their typical gap. Either way, content held back and then
        flushed arrives in a burst that spans much less."""
        if self.gap_ms is None:
            return max(len(record.content_times) - 1, 0) * self.pace_ms(record)
        return max(tokens - 1, 0) * self.gap_ms


@dataclass
class StreamRecord:
    """One response as the client saw it. Times are `perf_counter()` seconds."""

    started: float
    content_times: list[float] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    units: int = 0
    ended: float | None = None
    error: str | None = None

    def add_read(self, at: float, content: str, units: int) -> None:
        if content:
            self.content_times.append(at)
            self.parts.append(content)
            self.units += units

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def ttft_ms(self) -> float | None:
        return (self.content_times[0] - self.started) * 1000 if self.content_times else None

    def gaps_ms(self) -> list[float]:
        """Every gap between two content reads; a stream that ends badly adds its last silence."""
        times = self.content_times
        gaps = [(later - earlier) * 1000 for earlier, later in itertools.pairwise(times)]
        if self.error and times and self.ended is not None:
            gaps.append((self.ended - times[-1]) * 1000)
        return gaps

    def span_ms(self) -> float:
        times = self.content_times
        return (times[-1] - times[0]) * 1000 if len(times) > 1 else 0.0

    def duration_ms(self) -> float:
        end = self.ended if self.ended is not None else self.started
        return (end - self.started) * 1000


def count_tokens(record: StreamRecord, decoder: TextDecoder, expected: list[str] | None) -> int:
    """Tokens received: what the upstream reported, else protocol units, else the expected text.

    Reads are never counted as tokens (a read may hold several, a token may span two reads).
    """
    if decoder.tokens_reported is not None:
        return decoder.tokens_reported
    if record.units:
        return record.units
    if expected is not None:
        return matched_token_prefix(record.text, expected)
    return len(record.text.split())


def matched_token_prefix(text: str, expected: list[str]) -> int:
    """How many expected tokens the text starts with, in order."""
    position = 0
    for count, token in enumerate(expected):
        if not text.startswith(token, position):
            return count
        position += len(token)
    return len(expected)


def judge_buffered(record: StreamRecord, tokens: int, timing: StreamTiming) -> str | None:
    """A failure message if the response arrived in too few reads or over too short a span."""
    if tokens < 2:
        return None
    separate = min(len(record.content_times), tokens)
    if separate < timing.min_separate_reads_ratio * tokens:
        return f"{BUFFERED}: too few separate reads"
    if span_too_short(record, tokens, timing):
        return f"{BUFFERED}: arrival span too short"
    return None


def span_too_short(
    record: StreamRecord, tokens: int, timing: StreamTiming, slack_ms: float = 0.0
) -> bool:
    """At a known pace: the content arrived over less than `min_span_ratio` of the time its
    tokens take. At an unknown pace: its reads at their typical gap would cover less than that
    share of the span they did cover, i.e. most of them came in a burst after a long hold.
    `slack_ms`: time the generator itself stalled meanwhile, forgiven."""
    expected = timing.expected_span_ms(tokens, record)
    if timing.gap_ms is None:
        return expected < timing.min_span_ratio * (record.span_ms() - slack_ms)
    return expected > 0 and record.span_ms() + slack_ms < timing.min_span_ratio * expected


def judge_protocol(record: StreamRecord, decoder: TextDecoder) -> str | None:
    """Without a known text: a failure message if the answer is empty or its protocol is not
    whole (OpenAI chunks: the role first, a finish reason, usage matching the content chunks).
    Completeness (the end event, no error event) is judged while reading, like every route."""
    if not record.text:
        return f"{CORRUPT}: no content"
    if not isinstance(decoder, OpenAIDecoder):
        return None
    if decoder.not_chunks:
        return f"{CORRUPT}: {decoder.not_chunks} events are not chat.completion.chunk"
    if decoder.first_role != "assistant":
        return f"{CORRUPT}: the first chunk carries role {decoder.first_role!r}, not 'assistant'"
    if decoder.finish_reason is None:
        return f"{CORRUPT}: no finish_reason"
    if decoder.tokens_reported is not None and decoder.tokens_reported < record.units:
        return (
            f"{CORRUPT}: usage says {decoder.tokens_reported} tokens, "
            f"{record.units} content chunks arrived"
        )
    return None


def judge_corrupt(record: StreamRecord, expected: list[str]) -> str | None:
    """A failure message if the text is not exactly the simulator's deterministic text."""
    if record.text == "".join(expected):
        return None
    if len(record.text) < len("".join(expected)):
        return f"{CORRUPT}: text shorter than expected"
    return f"{CORRUPT}: text differs from expected"


class LagLog:
    """When this generator process was away from its sockets for long enough to merge reads.

    A sentinel greenlet sleeps briefly in a loop and reports how late it woke (`note`); a late
    wake means every socket waited as long (busy loop, or the host did not run the process).
    A response streamed during such a period cannot be judged "buffered": its merged reads may be
    the generator's. Episodes are kept for `keep_s`, ordered by their end.
    """

    def __init__(self, threshold_s: float, keep_s: float = 300.0) -> None:
        self.threshold_s = threshold_s
        self.keep_s = keep_s
        self.episodes: deque[tuple[float, float]] = deque()

    def note(self, due: float, woke: float) -> float:
        """Record a wake-up that was due at `due`; returns the lag in seconds."""
        lag = woke - due
        if lag >= self.threshold_s:
            self.episodes.append((due, woke))
        while self.episodes and self.episodes[0][1] < woke - self.keep_s:
            self.episodes.popleft()
        return lag

    def within(self, start: float, end: float) -> tuple[float, int]:
        """(seconds of stall inside [start, end], how many stalls touched it)."""
        stalled_s, count = 0.0, 0
        for episode_start, episode_end in reversed(self.episodes):
            if episode_end <= start:
                break  # every earlier episode ended earlier still
            overlap = min(episode_end, end) - max(episode_start, start)
            if overlap > 0:
                stalled_s += overlap
                count += 1
        return stalled_s, count


def excused_by_lag(
    record: StreamRecord, tokens: int, timing: StreamTiming, stalled_s: float, stalls: int
) -> bool:
    """Would the response have passed as streamed, had the generator not stalled?

    A stall of L seconds can merge up to L / gap + 1 tokens into one read and shorten the
    arrival span by at most L: only that much is forgiven, so a response that arrived in one
    piece is still judged buffered when the generator hiccuped meanwhile.
    """
    if not stalls:
        return False
    # At an unknown pace, the response's average gap (its TTFT included: never smaller than its
    # real gap, so never more forgiving); its median gap would be none for a single read.
    gap_ms = timing.gap_ms or record.duration_ms() / max(tokens, 1)
    mergeable = stalls + stalled_s * 1000 / gap_ms if gap_ms > 0 else tokens
    reads_ok = min(len(record.content_times) + mergeable, tokens) >= (
        timing.min_separate_reads_ratio * tokens
    )
    return reads_ok and not span_too_short(record, tokens, timing, slack_ms=stalled_s * 1000)
