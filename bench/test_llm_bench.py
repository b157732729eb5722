"""The real-engine benchmark's own logic, without an engine: the protocol judge, the load
generator's judged path against a small local server, the ratios and what fails a run.
Run with `pytest bench`."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest
from llm_bench import (
    ERROR_EVENT,
    MALFORMED,
    NO_DONE,
    add_ratios,
    failed_rows,
    judge_openai_stream,
    parse_args,
    request_body,
    summarize,
)
from loadgen import Outcome, Schedule, run_clients

WORDS = [" the", " stream", " flows"]


def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1,
        "id": "chatcmpl-1",
        "model": "test-llama",
        "object": "chat.completion.chunk",
        **extra,
    }


def llama_cpp_events(words: list[str] = WORDS) -> list[bytes]:
    """A stream as llama.cpp's server sends it: a role chunk with `content: null`, one chunk per
    token, a finish chunk with `timings`, a usage chunk (asked for), `data: [DONE]`."""
    events = [chunk({"role": "assistant", "content": None})]
    events += [chunk({"content": word}) for word in words]
    events.append(chunk({}, "length", timings={"predicted_n": len(words)}))
    events.append(
        {
            "choices": [],
            "object": "chat.completion.chunk",
            "usage": {"completion_tokens": len(words), "prompt_tokens": 9, "total_tokens": 12},
        }
    )
    return [b"data: " + json.dumps(event).encode() + b"\n\n" for event in events] + [
        b"data: [DONE]\n\n"
    ]


def without_usage(events: list[bytes]) -> list[bytes]:
    return [event for event in events if b'"usage"' not in event]


def without_finish_reason(events: list[bytes]) -> list[bytes]:
    return [
        event.replace(b'"finish_reason": "length"', b'"finish_reason": null') for event in events
    ]


def test_judge_passes_a_whole_llama_cpp_stream_and_counts_its_tokens():
    assert judge_openai_stream(b"".join(llama_cpp_events())) == ("", 3)


def test_judge_counts_content_chunks_when_no_usage_came():
    assert judge_openai_stream(b"".join(without_usage(llama_cpp_events(WORDS * 2)))) == ("", 6)


@pytest.mark.parametrize(
    ("broken", "kind"),
    [
        (lambda events: events[:-1], NO_DONE),  # cut before its end
        (without_finish_reason, "corrupt: no finish_reason"),
        (lambda events: events[1:], "corrupt: the first chunk carries role None"),  # no role
        (
            lambda events: [*events[:2], b'data: {"error": {"message": "boom"}}\n\n', *events[2:]],
            ERROR_EVENT,
        ),
        (lambda events: [*events[:2], b"data: {not json\n\n", *events[2:]], MALFORMED),
    ],
    ids=["no-done", "no-finish-reason", "no-role-chunk", "error-event", "malformed"],
)
def test_judge_refuses_a_stream_whose_protocol_is_not_whole(broken, kind):
    found, _tokens = judge_openai_stream(b"".join(broken(llama_cpp_events())))
    assert found.startswith(kind)


async def serve_streams(events: list[bytes], close_after: bool = False, answer: bool = True):
    """A keep-alive HTTP/1.1 server answering every POST with `events`, one chunk each;
    `close_after`: it closes the connection after each answer all the same (as llama.cpp's
    server does after a stream); `answer` False: it closes on every request, answering none."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1000):  # bounded: one request per round
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if not answer:
                    break
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                for event in events:
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    await asyncio.sleep(0.002)  # tokens apart, as a model sends them
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def run_load(events: list[bytes], streams: int = 2, **server_options) -> Outcome:
    async def main() -> Outcome:
        server = await serve_streams(events, **server_options)
        port = server.sockets[0].getsockname()[1]
        start = time.monotonic() + 0.05
        schedule = Schedule(
            start=start, stagger_s=0.0, warm=start, end=start + 0.4, stream_timeout_s=5.0
        )
        async with server:
            return await run_clients(
                "127.0.0.1",
                port,
                "/v1/chat/completions",
                request_body(3),
                True,
                None,
                0,
                streams,
                streams,
                schedule,
                judge=judge_openai_stream,
            )

    return asyncio.run(main())


def test_judged_streams_keep_their_tokens_and_decode_time():
    outcome = run_load(llama_cpp_events())
    assert outcome.completed >= 2 and outcome.errors == {}
    assert list(outcome.tokens) == [3] * outcome.completed
    # Three tokens sent 2 ms apart: first to last is about the two gaps (a late read may shorten
    # one stream's, so the typical one is checked).
    assert len(outcome.token_spans_s) == outcome.completed
    assert 0.004 <= statistics.median(outcome.token_spans_s) < 0.1


def test_negative_control_judged_streams_without_finish_reason_are_errors():
    outcome = run_load(without_finish_reason(llama_cpp_events()))
    assert outcome.completed == 0 and len(outcome.tokens) == 0
    assert sum(outcome.errors.values()) >= 2
    assert set(outcome.errors) == {"corrupt: no finish_reason"}


def test_a_server_closing_after_each_stream_costs_a_new_connection_not_an_error():
    outcome = run_load(llama_cpp_events(), close_after=True)
    assert outcome.completed >= 4 and outcome.errors == {}


def test_negative_control_a_server_that_answers_nothing_is_an_error_every_time():
    outcome = run_load(llama_cpp_events(), answer=False)
    assert outcome.completed == 0
    assert outcome.errors.get("closed-midstream", 0) >= 2


def test_tokens_per_second_per_stream_is_the_decode_pace():
    outcome = Outcome(completed=3)
    outcome.tokens.extend([11, 21, 1])
    outcome.token_spans_s.extend([0.5, 1.0, 0.0])  # a one-token stream has no pace
    row = summarize("engine", 1, 10.0, outcome, {"engine": 5.0})
    assert row["tokens_per_s_per_stream_p50"] == 20.0
    assert (row["tokens_per_stream_mean"], row["tokens_per_stream_min"]) == (11.0, 1)
    assert row["tokens_per_s"] == 3.3
    assert row["cpu_us_per_token"]["engine"] == round(5.0 / 33 * 1e6, 1)


def row(target: str, level: int, ttft: float, gap: float, rate: float) -> dict:
    return {
        "target": target,
        "level": level,
        "ttft_p50_ms": ttft,
        "ttft_p99_ms": ttft * 2,
        "gap_p50_ms": gap,
        "gap_p99_ms": gap * 3,
        "tokens_per_s_per_stream_p50": rate,
        "completed": 10,
        "error_count": 0,
    }


def test_ratios_are_against_the_engine_at_the_same_level():
    rows = [
        row("engine", 1, 20.0, 10.0, 80.0),
        row("gateway", 1, 21.0, 10.5, 76.0),
        row("engine", 4, 40.0, 20.0, 40.0),
        row("nginx", 4, 50.0, 20.0, 40.0),
        row("gateway", 8, 30.0, 12.0, 50.0),  # no engine row at 8: no ratio
    ]
    add_ratios(rows)
    gateway, nginx, orphan = rows[1], rows[3], rows[4]
    assert (gateway["added_ttft_p50_ms"], gateway["ttft_p50_x_engine"]) == (1.0, 1.05)
    assert (gateway["added_gap_p99_ms"], gateway["gap_p99_x_engine"]) == (1.5, 1.05)
    assert gateway["tokens_per_s_per_stream_vs_engine"] == 0.95
    assert (nginx["added_ttft_p99_ms"], nginx["ttft_p99_x_engine"]) == (20.0, 1.25)
    assert "added_ttft_p50_ms" not in orphan


def test_a_row_with_errors_or_no_stream_fails_the_run():
    clean = row("engine", 1, 20.0, 10.0, 80.0)
    erred = row("gateway", 1, 20.0, 10.0, 80.0) | {"error_count": 1}
    empty = row("nginx", 1, 20.0, 10.0, 80.0) | {"completed": 0}
    assert failed_rows([clean, erred, empty]) == ["gateway @1", "nginx @1"]


def test_the_engine_gets_a_slot_per_stream_and_is_always_measured():
    args = parse_args(["--levels", "1,4,8,16", "--targets", "gateway,nginx"])
    assert args.parallel == 16 and args.targets[0] == "engine"
    with pytest.raises(SystemExit):
        parse_args(["--levels", "1,16", "--parallel", "8"])
    with pytest.raises(SystemExit):
        parse_args(["--targets", "engine,vllm"])
