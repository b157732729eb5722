"""Every simulator fault, on every chat route, as the client sees it.

Before the first byte: a real HTTP status and a JSON error. After it: the status is already
200, so the failure is reported in-band (SSE `event: error`; OpenAI `{"error": ...}` then
`[DONE]`; plain text aborted without the terminating chunk), and what was relayed before is
exactly the model's text: never error text dressed up as output.
"""

from __future__ import annotations

import json

import pytest
from streamgate.simulator.script import expected_text, expected_tokens
from support import chat, stream_probe
from support.nginx import LocalNginx, replace_all, require_nginx
from support.procs import free_port

TOKENS = 10
HALF = TOKENS // 2
FIRST_TOKEN_TIMEOUT_S = 1.0
TOKEN_GAP_TIMEOUT_S = 0.5
# The fault gateways' settings: short timeouts so stalls end fast, no retries so each fault is
# met exactly once (here and in test_faults_under_load).
FAULT_SETTINGS = {
    "first_token_timeout_s": FIRST_TOKEN_TIMEOUT_S,
    "token_gap_timeout_s": TOKEN_GAP_TIMEOUT_S,
    "upstream_retries": 0,
}
# Timeouts fire on the event loop of a shared machine: allow lateness, never earliness.
TIMEOUT_EARLY_TOLERANCE_S = 0.05
TIMEOUT_LATE_TOLERANCE_S = 1.5

BEFORE_FIRST_BYTE = {
    "429": 429,  # rate limited upstream: passed on, so clients back off
    "500": 502,  # upstream failure
    "stall-first": 504,  # first-token timeout
}
MID_STREAM = ["error-midstream", "stall-midstream", "close-midstream"]


@pytest.fixture(scope="module")
def fault_gateway(gateway_factory, simulator):
    gateway = gateway_factory(simulator, workers=1, **FAULT_SETTINGS)
    yield gateway
    gateway.stop()


def send(gateway, route: str, fault: str) -> stream_probe.Trace:
    return chat.request(
        gateway,
        route,
        chat.body(route, max_tokens=TOKENS, model=f"sim-fault-{fault}"),
        timeout_s=15,
    )


def in_band_events(route: str, trace: stream_probe.Trace) -> list[str]:
    """The order of what arrived: 'token', 'error', 'done' (SSE and OpenAI framings);
    events that carry none of these (OpenAI's opening role chunk) are left out."""
    kinds = []
    for _, event in chat.timed_events(trace)[0]:
        if route == chat.SSE:
            kinds.append({"message": "token"}.get(event.event, event.event))
        elif event.data == "[DONE]":
            kinds.append("done")
        else:
            chunk = json.loads(event.data)
            if "error" in chunk:
                kinds.append("error")
            elif any((choice.get("delta") or {}).get("content") for choice in chunk["choices"]):
                kinds.append("token")
    return kinds


def check_failed_before_the_first_byte(route: str, fault: str, trace: stream_probe.Trace) -> None:
    """The form of a BEFORE_FIRST_BYTE fault as the client sees it (also used under load)."""
    assert trace.status == BEFORE_FIRST_BYTE[fault], (trace.status, trace.error, trace.body[:300])
    error = chat.json_body(trace).get("error")
    assert error, trace.body
    if route == chat.OPENAI:  # the shape the openai SDK parses
        assert isinstance(error, dict) and error.get("message"), error
    if fault == "stall-first":
        assert trace.headers_at_s >= FIRST_TOKEN_TIMEOUT_S - TIMEOUT_EARLY_TOLERANCE_S
        assert trace.headers_at_s <= FIRST_TOKEN_TIMEOUT_S + TIMEOUT_LATE_TOLERANCE_S


def check_failed_in_band(route: str, fault: str, trace: stream_probe.Trace) -> None:
    """The form of a MID_STREAM fault as the client sees it (also used under load)."""
    relay = chat.decode(route, trace)
    assert trace.status == 200, (trace.status, trace.body[:300])
    assert relay.content == expected_text(HALF), relay.content
    assert not relay.ended_properly
    if route == chat.TEXT:
        assert not trace.complete, "plain text must be aborted: no terminating zero-length chunk"
    elif route == chat.SSE:
        assert isinstance(relay.error, dict), relay.error
        assert in_band_events(route, trace)[: HALF + 1] == ["token"] * HALF + ["error"]
    else:
        assert isinstance(relay.error, dict) and relay.error.get("message"), relay.error
        assert in_band_events(route, trace) == ["token"] * HALF + ["error", "done"]
        assert trace.complete
    if fault == "stall-midstream":
        silence_s = trace.ended_at_s - relay.deltas[-1].at_s
        assert silence_s >= TOKEN_GAP_TIMEOUT_S - TIMEOUT_EARLY_TOLERANCE_S, silence_s
        assert silence_s <= TOKEN_GAP_TIMEOUT_S + TIMEOUT_LATE_TOLERANCE_S, silence_s


@pytest.mark.parametrize("route", list(chat.ROUTES))
@pytest.mark.parametrize("fault", list(BEFORE_FIRST_BYTE))
def test_failure_before_the_first_byte_is_an_http_status_with_a_json_error(
    fault_gateway, route, fault
):
    check_failed_before_the_first_byte(route, fault, send(fault_gateway, route, fault))


@pytest.mark.parametrize("route", list(chat.ROUTES))
@pytest.mark.parametrize("fault", MID_STREAM)
def test_failure_mid_stream_is_reported_in_band_after_the_relayed_text(fault_gateway, route, fault):
    check_failed_in_band(route, fault, send(fault_gateway, route, fault))


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_a_dropped_token_passes_through_as_received(fault_gateway, route):
    """The gateway relays; it does not invent: the gap the upstream left stays a gap."""
    trace = send(fault_gateway, route, "drop-token")
    relay = chat.decode(route, trace)

    tokens = expected_tokens(TOKENS)
    assert trace.status == 200 and relay.ended_properly, (trace.status, trace.error, relay.error)
    assert relay.content == "".join(tokens[:HALF] + tokens[HALF + 1 :]), relay.content


# --- nginx's own failures ------------------------------------------------------------------


def nothing_listening() -> str:
    """An address on loopback where nothing listens (the app servers are all down)."""
    return f"127.0.0.1:{free_port()}"


def post_through(proxy: LocalNginx) -> stream_probe.Trace:
    return chat.request(proxy, chat.OPENAI, timeout_s=20)


def test_nginx_answers_no_reachable_app_with_a_json_error():
    """No app server takes the request: nginx's own 502 in the API's error form, not HTML."""
    proxy = LocalNginx([nothing_listening()]).start(require_nginx())
    try:
        trace = post_through(proxy)
    finally:
        proxy.stop()
    assert trace.status == 502, trace.status
    assert trace.headers.get("content-type", "").startswith("application/json"), trace.headers
    assert json.loads(trace.body)["error"]["code"] == "service_unavailable"


def test_control_without_the_error_page_nginx_answers_html():
    """The check above tells nginx's HTML page from the JSON one."""
    proxy = LocalNginx(
        [nothing_listening()],
        site_edits=[
            lambda site: replace_all(
                site,
                "error_page 502 @streamgate_unavailable;",
                "# no JSON error page (negative control)",
            )
        ],
    ).start(require_nginx())
    try:
        trace = post_through(proxy)
    finally:
        proxy.stop()
    assert trace.status == 502
    assert trace.headers.get("content-type", "").startswith("text/html"), trace.headers
