"""The central claim, measured at the client's socket: tokens arrive one by one, as generated.

Simulator: 50 tokens, 20 ms apart, 50 ms to the first. A client must see at least 45 separate
reads spread over at least 0.8 s, the first within TTFT + 50 ms: directly from gunicorn, and
through nginx rendered from the project's template. The negative control runs the same check
through an nginx that buffers, and the detector must say so.
"""

from __future__ import annotations

import pytest
from support import chat, stream_probe
from support.word_by_word import CLIENT_HEADERS, assert_buffered, assert_word_by_word


def probe(target, route: str) -> stream_probe.Trace:
    return chat.request(target, route, headers=CLIENT_HEADERS, timeout_s=20)


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
    assert_word_by_word(probe(target, route), route, simulator)


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_negative_control_buffering_nginx_is_detected(buffering_nginx, route):
    """Same request, same detector, through an nginx that buffers: the verdict must flip."""
    assert "proxy_buffering on;" in buffering_nginx.site_config
    assert_buffered(probe(buffering_nginx, route))
