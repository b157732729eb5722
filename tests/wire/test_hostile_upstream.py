"""No answer ever reaches the wrong request, whatever the upstream does at the HTTP level.

The gateway (real gunicorn, one worker, so every request shares one upstream connection pool)
streams from an upstream that misbehaves on purpose (support/hostile_upstream.py). Every answer
is the words of its own request's prompt, so each check is: this client got its own text, and
the request after the misbehaving one got its own text too (the pooled connection was not
poisoned). Where the upstream's answer cannot be used, the client gets a clear 502/504 JSON
error, never the bytes.
"""

from __future__ import annotations

import itertools
import json
import time

import pytest
from support import chat, stream_probe
from support.hostile_upstream import STALE_TEXT, HostileUpstream, expected_text

FIRST_TOKEN_TIMEOUT_S = 1.0
_prompt_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def hostile():
    upstream = HostileUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def hostile_gateway(gateway_factory, hostile):
    return gateway_factory(hostile, workers=1, first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S)


def ask(gateway, behaviour: str, *, stream: bool = True) -> tuple[str, stream_probe.Trace]:
    """One request whose prompt nobody else uses: (prompt, what came back)."""
    prompt = f"request {next(_prompt_numbers)} asks about {behaviour} here"
    body = {"model": behaviour, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    trace = stream_probe.request(
        gateway.host, gateway.port, "/v1/chat/completions", body, timeout_s=15
    )
    return prompt, trace


def assert_own_answer(prompt: str, trace: stream_probe.Trace) -> None:
    assert trace.status == 200, (trace.status, trace.body[:300])
    relay = chat.decode(chat.OPENAI, trace)
    assert STALE_TEXT.split()[0] not in relay.content
    assert relay.content == expected_text(prompt), relay.content
    assert relay.ended_properly, trace.body[-300:]


def assert_error(trace: stream_probe.Trace, status: int) -> dict:
    assert trace.status == status, (trace.status, trace.body[:300])
    error = chat.json_body(trace)["error"]
    assert STALE_TEXT.split()[0] not in json.dumps(error)
    return error


USABLE = [
    "plain",
    "interim-100",
    "interim-103",
    "interim-several",
    "idle-bytes",
    "trailing-junk",
    "close-when-idle",
    "drop-next",
    "connection-close",
    "chunk-ext-trailers",
    "split-head",
    "late-end",
]


@pytest.mark.parametrize("behaviour", USABLE)
def test_each_request_gets_its_own_answer(hostile_gateway, behaviour):
    for _ in range(2):  # twice: the second one meets what the first left on the connection
        prompt, trace = ask(hostile_gateway, behaviour)
        assert_own_answer(prompt, trace)
        time.sleep(0.15)  # idle-bytes and close-when-idle act while the connection is idle
        after, trace = ask(hostile_gateway, "plain")
        assert_own_answer(after, trace)


@pytest.mark.parametrize("behaviour", ["interim-103", "idle-bytes", "trailing-junk"])
def test_non_streamed_requests_get_their_own_answer_too(hostile_gateway, behaviour):
    # The hostile upstream answers every request as a stream; what matters here is whose
    # bytes come back: the next request's (a plain streamed one) must still be its own.
    ask(hostile_gateway, behaviour, stream=False)
    time.sleep(0.15)
    after, trace = ask(hostile_gateway, "plain")
    assert_own_answer(after, trace)


def test_a_body_that_ends_after_done_leaves_its_connection_reusable(hostile_gateway, hostile):
    ask(hostile_gateway, "plain")  # one connection in the pool
    opened = hostile.connections
    for _ in range(3):
        prompt, trace = ask(hostile_gateway, "late-end")
        assert_own_answer(prompt, trace)
        time.sleep(0.2)  # its end comes 50 ms after the client's: then it is back in the pool
    assert hostile.connections == opened  # each waited for its end and went back to the pool


def test_a_request_dropped_on_a_reused_connection_is_retried_once(hostile_gateway, hostile):
    ask(hostile_gateway, "drop-next")
    prompt, trace = ask(hostile_gateway, "plain")
    assert_own_answer(prompt, trace)
    assert hostile.prompts_seen[prompt] == 2  # dropped unanswered, then sent on a fresh one


def test_a_response_cut_after_its_head_is_not_retried(hostile_gateway, hostile):
    prompt, trace = ask(hostile_gateway, "head-then-close")
    assert_error(trace, 502)
    assert hostile.prompts_seen[prompt] == 1  # bytes came back: the request may have run


@pytest.mark.parametrize("behaviour", ["huge-head", "huge-event"])
def test_oversized_heads_and_events_are_refused_with_502(hostile_gateway, behaviour):
    started = time.monotonic()
    _, trace = ask(hostile_gateway, behaviour)
    error = assert_error(trace, 502)
    assert error["message"] == "upstream sent an invalid response"
    assert time.monotonic() - started < 5
    after, trace = ask(hostile_gateway, "plain")
    assert_own_answer(after, trace)


def test_a_slow_response_head_is_a_first_token_timeout(hostile_gateway):
    started = time.monotonic()
    _, trace = ask(hostile_gateway, "slow-head")
    assert_error(trace, 504)
    assert FIRST_TOKEN_TIMEOUT_S - 0.05 <= time.monotonic() - started < FIRST_TOKEN_TIMEOUT_S + 2
