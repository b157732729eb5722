"""A client that goes away must not leave the LLM call running: the upstream request is closed
within 100 ms, mid-stream and while still waiting for the first token.

Proof from the other end: the simulator records each cancelled stream with its request id and
the time it heard the close; the probe records when it hung up.
"""

from __future__ import annotations

import pytest
from support import chat, stream_probe
from support.procs import wait_until

CANCEL_WITHIN_S = 0.100
TOKENS_BEFORE_HANGING_UP = 5
WAIT_BEFORE_HANGING_UP_S = 0.4


@pytest.fixture(params=["direct", "nginx"])
def target(request, gateway):
    return gateway if request.param == "direct" else request.getfixturevalue("nginx")


def cancel_record(simulator, request_id: str, *, timeout_s: float = 3.0) -> dict:
    def recorded():
        cancels = simulator.stats()["recent_cancels"]
        return next((c for c in cancels if c["request_id"] == request_id), None)

    try:
        return wait_until(
            recorded, timeout_s=timeout_s, interval_s=0.01, what="the upstream cancel"
        )
    except TimeoutError:
        stats = simulator.stats()
        pytest.fail(
            f"the simulator never saw request {request_id} cancelled: "
            f"recent cancels {stats['recent_cancels'][-5:]}, "
            f"recent request ids {stats['recent_request_ids'][-5:]}, active {stats['active']}"
        )


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_hanging_up_mid_stream_cancels_the_upstream(target, route, simulator):
    request_id, trace = chat.tagged_request(
        target,
        route,
        tag="wire-hangup",
        timeout_s=10,
        stop_when=lambda t: stream_probe.separate_reads(t) >= TOKENS_BEFORE_HANGING_UP,
    )
    assert trace.status == 200 and trace.client_closed, (trace.status, trace.error)

    cancel = cancel_record(simulator, request_id)
    assert 0 < cancel["tokens_sent"] < simulator.tokens, cancel
    assert cancel["at"] - trace.client_closed_wall <= CANCEL_WITHIN_S, cancel


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_hanging_up_before_the_first_token_cancels_the_upstream(target, route, simulator):
    request_id, trace = chat.tagged_request(
        target,
        route,
        chat.body(route, model="sim-fault-stall-first"),
        tag="wire-hangup-early",
        timeout_s=10,
        stop_after_s=WAIT_BEFORE_HANGING_UP_S,
    )
    assert trace.client_closed and not trace.error, (trace.status, trace.error)

    cancel = cancel_record(simulator, request_id)
    assert cancel["tokens_sent"] == 0, cancel
    assert cancel["at"] - trace.client_closed_wall <= CANCEL_WITHIN_S, cancel


def test_negative_control_a_client_that_stays_sees_no_cancel(gateway, simulator):
    """The detector above must be able to fail: a stream read to its end is never 'cancelled'."""
    request_id, trace = chat.tagged_request(
        gateway,
        chat.SSE,
        chat.body(chat.SSE, max_tokens=5),
        tag="wire-stays",
        timeout_s=10,
    )
    assert trace.status == 200 and trace.complete, (trace.status, trace.error)
    assert request_id in simulator.stats()["recent_request_ids"]
    with pytest.raises(pytest.fail.Exception, match="never saw request"):
        cancel_record(simulator, request_id, timeout_s=0.5)


def test_hanging_up_on_a_non_streamed_request_cancels_the_upstream(target, simulator, gateway):
    """Non-streamed answers are produced the same way upstream: a hang-up stops them too, and
    the log says the client left (not 200 ok)."""
    request_id, trace = chat.tagged_request(
        target,
        chat.OPENAI,
        chat.body(chat.OPENAI, stream=False),
        tag="wire-hangup-whole",
        timeout_s=10,
        stop_after_s=WAIT_BEFORE_HANGING_UP_S,  # the whole answer takes about 1 s upstream
    )
    assert trace.client_closed and trace.status == 0, (trace.status, trace.error)

    cancel = cancel_record(simulator, request_id)
    assert cancel["at"] - trace.client_closed_wall <= CANCEL_WITHIN_S, cancel
    record = wait_until(
        lambda: gateway.access_record(request_id), timeout_s=5, what="the access-log line"
    )
    assert record["outcome"] == "client_disconnect", record
