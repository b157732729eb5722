"""Pacing of what the client receives: heartbeats while the first token is slow, and word
granularity (chunks end on word boundaries, nothing held longer than the flush bound)."""

from __future__ import annotations

import asyncio
import itertools

import openai
import pytest
from streamgate.simulator.script import expected_text
from support import chat, sse, stream_probe
from support.services import API_KEY_PLACEHOLDER

SLOW_TTFT_MS = 1200
HEARTBEAT_S = 0.2
# Pings expected before a 1.2 s first token at 0.2 s intervals: 5; a loaded machine may lose one
# or two to timer lateness, none may go missing entirely.
MIN_PINGS = 3
PACING_MARGIN_S = 0.3
WORD_FLUSH_S = 0.150  # the gateway's default STREAMGATE_WORD_FLUSH_MS
# A forced (bound-reached) flush comes at least the bound after the previous one, less noise.
FORCED_FLUSH_NOISE_S = 0.060


@pytest.fixture(scope="module")
def slow_simulator(simulator_factory):
    simulator = simulator_factory(ttft_ms=SLOW_TTFT_MS, tokens=5)
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def heartbeat_gateway(gateway_factory, slow_simulator):
    gateway = gateway_factory(slow_simulator, workers=1, heartbeat_s=HEARTBEAT_S)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module", params=["direct", "nginx"])
def heartbeat_target(request, heartbeat_gateway, nginx_factory):
    """The heartbeat gateway, directly and through nginx (pings must not be held there)."""
    if request.param == "direct":
        yield heartbeat_gateway
        return
    proxy = nginx_factory(heartbeat_gateway)
    yield proxy
    proxy.stop()


def pings_before_first_token(trace: stream_probe.Trace) -> list[float]:
    """Arrival times of `: ping` comments that came before any data event."""
    times: list[float] = []
    parser = sse.Parser()
    for read in trace.reads:
        if parser.feed(read.data):
            break
        times += [read.at_s] * (len(parser.comments) - len(times))
    return times


def test_sse_sends_pings_while_the_first_token_is_slow(heartbeat_target, slow_simulator):
    trace = chat.request(
        heartbeat_target,
        chat.SSE,
        timeout_s=15,
    )
    relay = chat.decode(chat.SSE, trace)

    assert trace.status == 200 and relay.ended_properly, (trace.status, trace.error)
    assert relay.content == expected_text(slow_simulator.tokens)
    assert all(comment.strip() == "ping" for comment in relay.comments), relay.comments
    pings = pings_before_first_token(trace)
    assert len(pings) >= MIN_PINGS, (pings, stream_probe.summarize(trace))
    assert pings[0] <= HEARTBEAT_S + PACING_MARGIN_S, pings
    gaps = [later - earlier for earlier, later in zip([0.0, *pings], pings, strict=False)]
    assert max(gaps) <= HEARTBEAT_S + PACING_MARGIN_S, gaps


def test_negative_control_no_pings_at_the_default_interval(gateway):
    """The ping detector reads zero where no ping is due (default 15 s, client leaves at 1.2 s)."""
    trace = chat.request(
        gateway,
        chat.SSE,
        chat.body(chat.SSE, model="sim-fault-stall-first"),
        stop_after_s=SLOW_TTFT_MS / 1000,
        timeout_s=10,
    )
    assert trace.client_closed
    assert pings_before_first_token(trace) == []


def test_openai_sdk_streams_through_heartbeats(heartbeat_gateway, slow_simulator):
    async def stream() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{heartbeat_gateway.base_url}/v1",
            api_key=API_KEY_PLACEHOLDER,
            max_retries=0,
            timeout=15,
        ) as sdk:
            chunks = await sdk.chat.completions.create(
                model="streamgate-sim", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    assert asyncio.run(stream()) == expected_text(slow_simulator.tokens)


# --- word granularity ------------------------------------------------------------------------


def splits_inside_words(deltas: list[chat.TimedDelta]) -> list[str]:
    """Chunk boundaries that cut a word (a letter or digit on both sides) although the chunk
    had not been held for the flush bound: what word granularity must never produce."""
    found = []
    for previous, before, after in zip([None, *deltas], deltas, deltas[1:], strict=False):
        cut_a_word = before.text[-1:].isalnum() and after.text[:1].isalnum()
        held_s = before.at_s - previous.at_s if previous else before.at_s
        if cut_a_word and held_s < WORD_FLUSH_S - FORCED_FLUSH_NOISE_S:
            found.append(f"{before.text!r}|{after.text!r} after {held_s * 1000:.0f} ms")
    return found


def longest_hold_s(deltas: list[chat.TimedDelta]) -> float:
    times = [delta.at_s for delta in deltas]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.mark.parametrize("route", [chat.TEXT, chat.SSE])
def test_word_granularity_ends_chunks_on_word_boundaries_within_the_bound(
    gateway, simulator, route
):
    trace = chat.request(
        gateway,
        route,
        chat.body(route, granularity="word"),
        timeout_s=20,
    )
    relay = chat.decode(route, trace)

    assert trace.status == 200 and relay.ended_properly, (trace.status, trace.error)
    assert relay.content == expected_text(simulator.tokens)
    assert len(relay.deltas) < simulator.tokens, "no sub-word token was coalesced"
    assert splits_inside_words(relay.deltas) == [], relay.texts
    token_gap_s = simulator.gap_ms / 1000
    assert longest_hold_s(relay.deltas) <= WORD_FLUSH_S + token_gap_s + PACING_MARGIN_S, [
        (round(d.at_s, 3), d.text) for d in relay.deltas
    ]


def test_negative_control_token_granularity_splits_words(gateway):
    """The word-boundary detector must be able to fail: token mode cuts words ("Stream|ing")."""
    trace = chat.request(gateway, chat.SSE, chat.body(chat.SSE, max_tokens=20))
    relay = chat.decode(chat.SSE, trace)

    assert trace.status == 200, trace.status
    assert splits_inside_words(relay.deltas) != []
