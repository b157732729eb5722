"""Framing: any text split into any deltas comes back exactly from the gateway's SSE stream
(parsed by the WHATWG parser of support/sse.py), and the word coalescer never drops or
reorders text."""

from __future__ import annotations

import re

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streamgate import framing
from support import sse

from .conftest import stream_body

pytestmark = pytest.mark.anyio

_LINE_END = re.compile(r"\r\n|\r|\n")
AWKWARD = [
    "\n\n",
    "\r\n",
    "\r",
    "data: x",
    ":",
    ": ping",
    "event: error",
    "{",
    "Grüße",
    "日本",
    "🙂",
    "\u2028",
    "\x0b",
    " ",
]
deltas_strategy = st.lists(
    st.one_of(st.sampled_from(AWKWARD), st.text(min_size=1, max_size=12)).filter(bool),
    min_size=1,
    max_size=12,
)


def parse_sse(body: str) -> list[sse.Event]:
    return sse.parse(body).events


@given(text=st.text(max_size=40))
def test_sse_event_data_round_trips_up_to_line_end_normalisation(text):
    events = parse_sse(framing.sse_event(text).decode())
    assert len(events) == 1
    assert events[0].data == _LINE_END.sub("\n", text)


@given(deltas=deltas_strategy)
def test_sse_deltas_reassemble_exactly(deltas):
    body = b"".join(framing.sse_delta(delta) for delta in deltas).decode()
    events = parse_sse(body)
    assert "".join(orjson.loads(event.data)["content"] for event in events) == "".join(deltas)


@settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(deltas=deltas_strategy)
async def test_gateway_sse_stream_reassembles_any_split_exactly(make_app, fake_upstream, deltas):
    fake_upstream.parts = stream_body(deltas)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(make_app()), base_url="http://t"
    ) as client:
        response = await client.post("/v1/chat/stream-sse", json={"prompt": "x"})
    events = parse_sse(response.text)
    content = [orjson.loads(e.data)["content"] for e in events if e.event == "message"]
    assert "".join(content) == "".join(deltas)
    assert events[-1].event == "done"
    assert orjson.loads(events[-1].data)["usage"]["completion_tokens"] == len(deltas)


def test_naive_article_framing_is_caught_by_the_parser():
    """Negative control: the article's f"data: {content}\\n\\n" loses a delta's line break."""
    deltas = ["line one\n\nline two"]
    naive = "".join(f"data: {delta}\n\n" for delta in deltas)
    assert "".join(e.data for e in parse_sse(naive)) != "".join(deltas)


@given(deltas=deltas_strategy)
def test_word_coalescer_keeps_text_and_cuts_after_whitespace(deltas):
    coalescer = framing.WordCoalescer()
    sent = [coalescer.push(delta) for delta in deltas]
    sent.append(coalescer.flush())
    assert "".join(sent) == "".join(deltas)
    for chunk in sent[:-1]:
        assert chunk == "" or chunk[-1].isspace()


def test_openai_error_is_followed_by_done():
    body = framing.openai_error("midstream", "boom").decode()
    events = parse_sse(body)
    assert orjson.loads(events[0].data)["error"]["message"] == "boom"
    assert events[-1].data == "[DONE]"
