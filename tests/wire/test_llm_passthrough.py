"""The gateway relays a real inference engine's stream exactly: llama.cpp's own server (the
xllamacpp wheel the llm role deploys) on the generated model, asked directly and through the
gateway for the same greedy answer; every event must match field for field (support/
passthrough.py says what may differ between two requests).

Control: the gateway's word granularity rebuilds the chunks instead of passing them, and the
same comparison must see it.
"""

from __future__ import annotations

import pytest
from support import passthrough, stream_probe

PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def llama(llama_factory):
    return llama_factory("tiny", parallel=2, threads=1)


@pytest.fixture(scope="module")
def llama_gateway(gateway_factory, llama):
    return gateway_factory(llama, workers=1)


def answer(service, body: dict) -> list[str]:
    trace = stream_probe.request(service.host, service.port, PATH, body, timeout_s=30)
    assert trace.status == 200 and trace.complete, stream_probe.summarize(trace)
    return passthrough.comparable_events(trace.body)


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_the_gateway_passes_the_engine_stream_through_exactly(llama, llama_gateway, include_usage):
    body = passthrough.request_body(include_usage)
    direct = answer(llama, body)
    assert passthrough.protocol_problems(direct, include_usage) == []
    relayed = answer(llama_gateway, body)
    assert relayed == direct


def test_negative_control_rebuilt_chunks_are_seen(llama, llama_gateway):
    body = passthrough.request_body(include_usage=True)
    direct = answer(llama, body)
    rebuilt = answer(llama_gateway, {**body, "granularity": "word"})
    assert rebuilt != direct
