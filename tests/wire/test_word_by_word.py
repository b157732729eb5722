"""The central claim, measured at the client's socket: tokens arrive one by one, as generated.

Simulator: 50 tokens, 20 ms apart, 50 ms to the first. A client must see at least 45 separate
reads spread over at least 0.8 s, the first within TTFT + 50 ms: directly from gunicorn, and
through nginx rendered from the project's template. The negative control runs the same check
through an nginx that buffers, and the detector must say so.
"""

from __future__ import annotations

import pytest
from streamgate.simulator.script import expected_text
from support import chat, stream_probe
from support.stream_probe import BUFFERED, STREAMED

MIN_SEPARATE_READS = 45
MIN_ARRIVAL_SPAN_S = 0.8
FIRST_BYTE_MARGIN_S = 0.050
# What a browser sends: the path must not compress (and so buffer) the stream anyway.
CLIENT_HEADERS = {"Accept-Encoding": "gzip"}


def probe(target, route: str) -> stream_probe.Trace:
    return stream_probe.request(
        "127.0.0.1",
        target.port,
        chat.ROUTES[route],
        chat.body(route),
        headers=CLIENT_HEADERS,
        timeout_s=20,
    )


def describe(trace: stream_probe.Trace) -> str:
    reads = [f"{read.at_s * 1000:.0f}ms:{len(read.data)}B" for read in trace.reads]
    return f"{stream_probe.summarize(trace)} reads={reads}"


@pytest.fixture(scope="module")
def buffering_nginx(nginx_factory, gateway):
    proxy = nginx_factory(gateway, buffering_fault=True)
    yield proxy
    proxy.stop()


@pytest.fixture(params=["direct", "nginx"])
def target(request, gateway):
    return gateway if request.param == "direct" else request.getfixturevalue("nginx")


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_each_token_reaches_the_client_in_its_own_read(target, route, simulator):
    trace = probe(target, route)

    assert trace.status == 200 and trace.complete, (trace.status, trace.error, trace.body[:300])
    assert stream_probe.separate_reads(trace) >= MIN_SEPARATE_READS, describe(trace)
    assert stream_probe.arrival_span_s(trace) >= MIN_ARRIVAL_SPAN_S, describe(trace)
    assert (
        stream_probe.streaming_verdict(
            trace, min_reads=MIN_SEPARATE_READS, min_span_s=MIN_ARRIVAL_SPAN_S
        )
        == STREAMED
    )
    first_byte_limit_s = simulator.ttft_ms / 1000 + FIRST_BYTE_MARGIN_S
    assert stream_probe.first_byte_s(trace) <= first_byte_limit_s, describe(trace)
    relay = chat.decode(route, trace)
    assert relay.content == expected_text(simulator.tokens), relay.content


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_negative_control_buffering_nginx_is_detected(buffering_nginx, route):
    """Same request, same detector, through an nginx that buffers: the verdict must flip."""
    assert "proxy_buffering on;" in buffering_nginx.site_config
    trace = probe(buffering_nginx, route)

    assert trace.status == 200 and trace.complete, (trace.status, trace.error)
    assert (
        stream_probe.streaming_verdict(
            trace, min_reads=MIN_SEPARATE_READS, min_span_s=MIN_ARRIVAL_SPAN_S
        )
        == BUFFERED
    ), describe(trace)
