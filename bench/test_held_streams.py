"""The held-streams benchmark's judge of one stream, without starting anything (the wire test
tests/wire/test_held_streams.py and make bench-held count on it). Run with `pytest bench`."""

from __future__ import annotations

import json

import pytest
from held_streams import judge
from loadgen import StreamConnection
from streamgate.simulator.script import expected_tokens

TOKENS = list(expected_tokens(8))


def openai_body(tokens: list[str], *, done: bool = True, error: bool = False) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"content": token}}]} for token in tokens]
    if error:
        events.append({"error": {"message": "upstream error mid-stream"}})
    body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def sse_body(tokens: list[str], *, done: bool = True) -> bytes:
    body = b": ping\n\n" + b"".join(
        b"data: " + json.dumps({"content": token}).encode() + b"\n\n" for token in tokens
    )
    return body + (b'event: done\ndata: {"finish_reason": "stop"}\n\n' if done else b"")


def connection(body: bytes) -> StreamConnection:
    conn = StreamConnection(sse=True)
    conn.parts = [body[:7], body[7:]]  # as two reads
    return conn


@pytest.mark.parametrize(
    ("route", "make"), [("completions", openai_body), ("stream-sse", sse_body)]
)
def test_a_whole_exact_stream_passes_and_each_flaw_is_named(route, make):
    expected = "".join(TOKENS)
    assert judge(connection(make(TOKENS)), route, expected) == ""
    # negative controls
    assert judge(connection(make(TOKENS, done=False)), route, expected) == "no-end"
    assert judge(connection(make(TOKENS[:3] + TOKENS[4:])), route, expected) == "content"
    assert judge(connection(make(TOKENS[:3])), route, expected) == "content"


def test_an_in_band_error_is_an_error_even_with_done():
    expected = "".join(TOKENS)
    assert judge(connection(openai_body(TOKENS, error=True)), "completions", expected) == (
        "error-event"
    )
