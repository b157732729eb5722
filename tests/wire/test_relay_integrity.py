"""What is relayed is exactly what was generated, framed as promised, traceable by request id."""

from __future__ import annotations

import pytest
from streamgate.simulator.script import expected_text, expected_tokens
from support import chat

CONTENT_TYPES = {
    chat.TEXT: "text/plain",
    chat.SSE: "text/event-stream",
    chat.OPENAI: "text/event-stream",
}


@pytest.fixture(params=["direct", "nginx"])
def target(request, gateway):
    return gateway if request.param == "direct" else request.getfixturevalue("nginx")


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_every_token_is_delivered_exactly_once_in_order(gateway, simulator, route):
    """The simulator's opening tokens hold newlines, "\\r\\n", "data:" and ":" line starts,
    non-Latin text and an emoji: each must survive its framing unchanged."""
    trace = chat.request(gateway, route, timeout_s=20)
    relay = chat.decode(route, trace)

    assert trace.status == 200 and relay.ended_properly, (trace.status, trace.error, relay.error)
    assert relay.content == expected_text(simulator.tokens)
    if route != chat.TEXT:  # event framings keep token boundaries: one event per token
        assert relay.texts == expected_tokens(simulator.tokens)
    assert not relay.unparsed, f"bytes after the last complete event: {relay.unparsed!r}"
    assert trace.headers["content-type"].startswith(CONTENT_TYPES[route]), trace.headers
    assert trace.headers.get("x-accel-buffering") == "no", trace.headers
    assert "no-cache" in trace.headers.get("cache-control", ""), trace.headers


def test_sse_done_event_carries_the_usage(gateway):
    trace = chat.request(gateway, chat.SSE, chat.body(chat.SSE, max_tokens=7))
    relay = chat.decode(chat.SSE, trace)

    assert relay.done_marker and relay.usage, (relay.done_marker, relay.usage, trace.body[-300:])
    assert relay.usage.get("completion_tokens") == 7, relay.usage


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_client_request_id_reaches_the_upstream_and_comes_back(target, simulator, route):
    request_id, trace = chat.tagged_request(
        target,
        route,
        chat.body(route, max_tokens=3),
        tag="wire-rid",
    )

    assert trace.status == 200, (trace.status, trace.body[:300])
    assert trace.headers.get("x-request-id") == request_id, trace.headers
    assert request_id in simulator.stats()["recent_request_ids"]


def test_a_request_id_is_made_when_the_client_sends_none(target, simulator):
    trace = chat.request(target, chat.SSE, chat.body(chat.SSE, max_tokens=3))

    made = trace.headers.get("x-request-id", "")
    assert trace.status == 200 and made, trace.headers
    assert made in simulator.stats()["recent_request_ids"]
