"""Decoders and verdicts on synthetic arrivals: each verdict is shown to fire and to stay quiet."""

from __future__ import annotations

import json

import pytest
from streamcheck import (
    BUFFERED,
    CORRUPT,
    LagLog,
    OpenAIDecoder,
    SSEDecoder,
    StreamRecord,
    StreamTiming,
    TextDecoder,
    count_tokens,
    excused_by_lag,
    judge_buffered,
    judge_corrupt,
    judge_protocol,
    matched_token_prefix,
)

TOKENS = ["Stream", "ing ", "wo", "rd ", "日本", "🙂", "\r\n", "data:", " end"]
TIMING = StreamTiming(ttft_ms=50, gap_ms=20, tokens=len(TOKENS))


def record_of(arrivals: list[tuple[float, str]], decoder=None) -> StreamRecord:
    """A record fed one read per (seconds after start, content)."""
    record = StreamRecord(started=0.0)
    for at, content in arrivals:
        record.add_read(at, content, 1)
    record.ended = arrivals[-1][0] if arrivals else 0.0
    return record


def streamed(tokens: list[str], gap_s: float = 0.02) -> StreamRecord:
    return record_of([(0.05 + i * gap_s, token) for i, token in enumerate(tokens)])


def test_token_by_token_stream_is_neither_buffered_nor_corrupt():
    record = streamed(TOKENS)
    assert judge_buffered(record, len(TOKENS), TIMING) is None
    assert judge_corrupt(record, TOKENS) is None
    assert record.ttft_ms == pytest.approx(50)
    assert record.gaps_ms() == pytest.approx([20] * (len(TOKENS) - 1))


def test_whole_answer_in_one_read_is_buffered():
    record = record_of([(0.25, "".join(TOKENS))])
    assert judge_buffered(record, len(TOKENS), TIMING).startswith(BUFFERED)


def test_reads_in_a_burst_are_buffered_by_span():
    # every token in its own read, but all within 2 ms: a proxy that flushed its buffer late
    record = streamed(TOKENS, gap_s=0.00025)
    assert judge_buffered(record, len(TOKENS), TIMING) == f"{BUFFERED}: arrival span too short"


def test_separate_reads_threshold_is_configurable():
    halves = [(0.05, "".join(TOKENS[:5])), (0.2, "".join(TOKENS[5:]))]
    strict = judge_buffered(record_of(halves), len(TOKENS), TIMING)
    lenient = StreamTiming(gap_ms=20, min_separate_reads_ratio=0.2)
    assert strict == f"{BUFFERED}: too few separate reads"
    assert judge_buffered(record_of(halves), len(TOKENS), lenient) is None


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (TOKENS[:4] + TOKENS[5:], "shorter"),  # lost
        ([*TOKENS[:4], TOKENS[4], *TOKENS[4:]], "differs"),  # doubled
        ([*TOKENS[:3], TOKENS[4], TOKENS[3], *TOKENS[5:]], "differs"),  # swapped
    ],
)
def test_lost_doubled_or_swapped_token_is_corrupt(tokens, message):
    verdict = judge_corrupt(streamed(tokens), TOKENS)
    assert verdict is not None and verdict.startswith(CORRUPT) and message in verdict


def test_broken_stream_adds_its_last_silence_as_a_gap():
    record = streamed(TOKENS[:3])
    record.error = "aborted stream: read timeout"
    record.ended = 3.09
    assert record.gaps_ms()[-1] == pytest.approx(3000)


def test_text_decoder_joins_a_character_split_across_reads():
    encoded = "".join(TOKENS).encode()
    split_inside_emoji = encoded.index("🙂".encode()) + 2
    decoder = TextDecoder()
    text = (
        decoder.feed(encoded[:split_inside_emoji])[0]
        + decoder.feed(encoded[split_inside_emoji:])[0]
    )
    assert text == "".join(TOKENS)


def test_sse_decoder_multiline_data_comments_and_done():
    wire = b": ping\n\ndata: line one\ndata: line two\n\nevent: done\ndata: {}\n\n"
    decoder = SSEDecoder()
    content = "".join(decoder.feed(wire[i : i + 7])[0] for i in range(0, len(wire), 7))
    assert content == "line one\nline two"
    assert decoder.done and decoder.error is None


def test_sse_decoder_reports_error_event():
    decoder = SSEDecoder()
    decoder.feed(b'data: a\n\nevent: error\ndata: {"message": "upstream gone"}\n\n')
    assert decoder.error is not None and "upstream gone" in decoder.error


def openai_chunk(**payload) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_openai_decoder_counts_the_upstream_usage_not_chunks():
    decoder = OpenAIDecoder()
    wire = openai_chunk(choices=[{"delta": {"role": "assistant", "content": ""}}])
    wire += b"".join(openai_chunk(choices=[{"delta": {"content": t}}]) for t in TOKENS)
    wire += openai_chunk(choices=[], usage={"completion_tokens": len(TOKENS)}) + b"data: [DONE]\n\n"
    record = StreamRecord(started=0.0)
    content, units = decoder.feed(wire)  # one read holding everything
    record.add_read(0.1, content, units)
    assert content == "".join(TOKENS) and decoder.done
    assert count_tokens(record, decoder, None) == len(TOKENS)
    assert len(record.content_times) == 1


def test_openai_decoder_reports_in_band_error():
    decoder = OpenAIDecoder()
    decoder.feed(openai_chunk(error={"message": "boom", "type": "server_error"}))
    assert decoder.error is not None and "boom" in decoder.error


def test_plain_text_tokens_counted_from_the_expected_text():
    record = streamed(TOKENS[:5])
    record.units = 0  # plain text carries no token boundaries
    assert count_tokens(record, TextDecoder(), TOKENS) == 5
    assert matched_token_prefix("Streaming wo", TOKENS) == 3


def test_sse_decoder_reads_the_usage_of_the_done_event():
    decoder = SSEDecoder()
    wire = (
        b'data: {"content": "a\\r\\nb"}\n\n'
        b'event: done\ndata: {"usage": {"completion_tokens": 2}}\n\n'
    )
    assert decoder.feed(wire) == ("a\r\nb", 1)
    assert decoder.done and decoder.tokens_reported == 2


def test_lag_log_marks_only_responses_that_overlap_a_late_wake_up():
    log = LagLog(threshold_s=0.010)
    assert log.note(due=1.000, woke=1.002) == pytest.approx(0.002)  # on time: not kept
    log.note(due=2.000, woke=2.300)  # away 300 ms
    log.note(due=5.000, woke=5.050)
    assert list(log.episodes) == [(2.0, 2.3), (5.0, 5.05)]
    assert log.within(1.9, 2.1) == (pytest.approx(0.1), 1)
    assert log.within(0.0, 9.0) == (pytest.approx(0.35), 2)
    assert log.within(0.5, 1.9) == (0.0, 0) and log.within(2.3, 4.9) == (0.0, 0)


def test_a_generator_stall_excuses_only_the_reads_it_can_explain():
    # 50 tokens 20 ms apart; the generator away 300 ms: 16 tokens land in one read
    arrivals = [(0.05 + i * 0.02, "t") for i in range(50)]
    merged = record_of([*arrivals[:10], (0.56, "t" * 16), *arrivals[26:]])
    timing = StreamTiming(gap_ms=20, tokens=50)
    assert judge_buffered(merged, 50, timing) is not None  # 35 reads: under 80% of 50
    assert excused_by_lag(merged, 50, timing, stalled_s=0.3, stalls=1)
    assert not excused_by_lag(merged, 50, timing, stalled_s=0.0, stalls=0)
    # the whole answer in one read is not explained by a 300 ms hiccup
    whole = record_of([(1.03, "t" * 50)])
    assert not excused_by_lag(whole, 50, timing, stalled_s=0.3, stalls=1)


def test_lag_log_forgets_old_episodes():
    log = LagLog(threshold_s=0.010, keep_s=60)
    log.note(due=1.0, woke=1.5)
    log.note(due=100.0, woke=100.001)
    assert not log.episodes


# ------------------------------------------------------- any upstream: no known text or pace

UNKNOWN_PACE = StreamTiming(gap_ms=None)


def test_unknown_pace_token_by_token_stream_is_not_buffered():
    """A fast real model (4 ms a token): judged against its own time, not the simulator's 20 ms."""
    record = streamed(TOKENS, gap_s=0.004)
    assert judge_buffered(record, len(TOKENS), UNKNOWN_PACE) is None
    assert judge_buffered(record, len(TOKENS), TIMING) == f"{BUFFERED}: arrival span too short"


def test_unknown_pace_whole_answer_in_one_read_is_buffered():
    record = record_of([(0.25, "".join(TOKENS))])
    assert (
        judge_buffered(record, len(TOKENS), UNKNOWN_PACE) == f"{BUFFERED}: too few separate reads"
    )


def test_unknown_pace_first_token_then_a_late_burst_is_buffered():
    """The first token passed at once, the rest held and flushed together 1 s later."""
    arrivals = [(0.05, TOKENS[0])] + [
        (1.0 + i * 0.0002, token) for i, token in enumerate(TOKENS[1:])
    ]
    record = record_of(arrivals)
    record.ended = 1.01
    assert (
        judge_buffered(record, len(TOKENS), UNKNOWN_PACE) == f"{BUFFERED}: arrival span too short"
    )


def openai_events(*payloads: dict, done: bool = True) -> bytes:
    events = [f"data: {json.dumps(payload)}\n\n" for payload in payloads]
    return ("".join(events) + ("data: [DONE]\n\n" if done else "")).encode()


def chunk(delta: dict, finish_reason=None) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


WHOLE_OPENAI_STREAM = [
    chunk({"role": "assistant", "content": None}),  # llama.cpp's first chunk
    chunk({"content": " light"}),
    chunk({"content": " river"}),
    chunk({}, finish_reason="length"),
    {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": 2}},
]


def decoded(payloads: list[dict]) -> tuple[StreamRecord, OpenAIDecoder]:
    decoder = OpenAIDecoder()
    record = StreamRecord(started=0.0)
    record.add_read(0.01, *decoder.feed(openai_events(*payloads)))
    return record, decoder


def test_a_whole_openai_stream_passes_the_protocol_verdict():
    record, decoder = decoded(WHOLE_OPENAI_STREAM)
    assert record.text == " light river" and decoder.done
    assert judge_protocol(record, decoder) is None


@pytest.mark.parametrize(
    ("payloads", "message"),
    [
        (WHOLE_OPENAI_STREAM[1:], "role"),  # no role chunk first
        (WHOLE_OPENAI_STREAM[:3] + WHOLE_OPENAI_STREAM[4:], "finish_reason"),
        (
            [
                *WHOLE_OPENAI_STREAM[:4],
                {**WHOLE_OPENAI_STREAM[4], "usage": {"completion_tokens": 1}},
            ],
            "usage",
        ),
        (
            [
                WHOLE_OPENAI_STREAM[0],
                {**WHOLE_OPENAI_STREAM[1], "object": "chat.completion"},
                *WHOLE_OPENAI_STREAM[2:],
            ],
            "not chat.completion.chunk",
        ),
        ([WHOLE_OPENAI_STREAM[0], WHOLE_OPENAI_STREAM[3]], "no content"),
    ],
    ids=["no-role", "no-finish-reason", "usage-short", "wrong-object", "empty"],
)
def test_a_broken_openai_stream_fails_the_protocol_verdict(payloads, message):
    verdict = judge_protocol(*decoded(payloads))
    assert verdict is not None and verdict.startswith(CORRUPT) and message in verdict, verdict


def test_unknown_pace_one_read_is_not_excused_by_a_short_stall():
    """A whole answer in one read after 1 s, while the generator stalled 10 ms: still buffered
    (at an unknown pace, a stall merges what the response's average gap allows)."""
    record = record_of([(1.0, "".join(TOKENS))])
    assert not excused_by_lag(record, len(TOKENS), UNKNOWN_PACE, stalled_s=0.010, stalls=1)
    spread = streamed(TOKENS, gap_s=0.02)
    merged = record_of(
        [
            (at, text)
            for at, text in zip(
                spread.content_times[::2],
                ["".join(TOKENS[i : i + 2]) for i in range(0, len(TOKENS), 2)],
                strict=True,
            )
        ]
    )
    assert excused_by_lag(merged, len(TOKENS), UNKNOWN_PACE, stalled_s=0.1, stalls=4)
