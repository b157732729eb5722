"""The central claim as a client's socket checks it, for a stream from the default simulator
(50 tokens 20 ms apart, 50 ms to the first): at least 45 separate reads spread over at least
0.8 s, the first byte within TTFT + 50 ms, the simulator's text whole. One definition for every
path that must stream (gunicorn directly, nginx, the TLS edge over HTTP/1.1 and HTTP/2), and the
same detector for their buffering controls."""

from __future__ import annotations

from streamgate.simulator.script import expected_text

from support import chat, stream_probe
from support.stream_probe import BUFFERED, STREAMED, Trace

MIN_SEPARATE_READS = 45
MIN_ARRIVAL_SPAN_S = 0.8
FIRST_BYTE_MARGIN_S = 0.050
# What a browser sends: the path must not compress (and so buffer) the stream anyway.
CLIENT_HEADERS = {"Accept-Encoding": "gzip"}


def describe(trace: Trace) -> str:
    reads = [f"{read.at_s * 1000:.0f}ms:{len(read.data)}B" for read in trace.reads]
    return f"{stream_probe.summarize(trace)} error={trace.error!r} reads={reads}"


def verdict(trace: Trace) -> str:
    return stream_probe.streaming_verdict(
        trace, min_reads=MIN_SEPARATE_READS, min_span_s=MIN_ARRIVAL_SPAN_S
    )


def assert_word_by_word(trace: Trace, route: str, simulator) -> None:
    """Whole, in separate reads over time, the first soon after the simulator's first token."""
    assert trace.status == 200 and trace.complete, (trace.status, trace.error, trace.body[:300])
    assert verdict(trace) == STREAMED, describe(trace)
    first_byte_limit_s = simulator.ttft_ms / 1000 + FIRST_BYTE_MARGIN_S
    assert stream_probe.first_byte_s(trace) <= first_byte_limit_s, describe(trace)
    relay = chat.decode(route, trace)
    assert relay.content == expected_text(simulator.tokens), relay.content


def assert_buffered(trace: Trace) -> None:
    """Whole, but held back on the way: the verdict of a buffering hop."""
    assert trace.status == 200 and trace.complete, (trace.status, trace.error)
    assert verdict(trace) == BUFFERED, describe(trace)
