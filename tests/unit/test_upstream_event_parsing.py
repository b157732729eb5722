"""The gateway's own reader of the upstream's events (upstream.ChatStream.parse) against the
tests' spec-faithful parser (support/sse.py): any split of any stream into reads, with LF, CRLF
or CR line ends, comments, multi-line data and a leading byte order mark, gives the same
payloads. The two regressions found by that comparison are pinned as examples."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from streamgate.upstream import ChatStream
from support import sse

BOM = "\ufeff".encode()


def fresh_stream() -> ChatStream:
    async def make() -> ChatStream:
        return ChatStream(None)

    return asyncio.run(make())


def gateway_reads(reads: list[bytes]) -> list[object]:
    stream, events = fresh_stream(), []
    for read in reads:
        events += stream.parse(read)
    return events


def spec_reads(body: bytes) -> list[object]:
    return [json.loads(event.data) for event in sse.parse(body).events if event.data != "[DONE]"]


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(body)) for cut in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


payloads = st.lists(
    st.dictionaries(st.sampled_from(["content", "role", "n"]), st.text(max_size=8), max_size=3),
    min_size=1,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    payloads=payloads,
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    bom=st.booleans(),
    comments=st.booleans(),
    multiline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_any_split_of_any_event_stream_reads_as_the_specification_says(
    payloads, line_end, bom, comments, multiline, cuts
):
    body = BOM if bom else b""
    for payload in payloads:
        text = json.dumps(payload).encode()
        if comments:
            body += b": keep-alive" + line_end
        if multiline:  # a JSON object over two data lines (joined with LF)
            head, tail = text[:1], text[1:]
            body += b"data: " + head + line_end + b"data:" + tail + line_end + line_end
        else:
            body += b"data: " + text + line_end + line_end
    body += b"data: [DONE]" + line_end + line_end
    assert gateway_reads(split(body, cuts)) == spec_reads(body) == payloads


def test_a_crlf_cut_between_reads_is_one_line_end():
    reads = [b'data: {"a":\r', b"\ndata: 1}\r\n\r\n"]
    assert gateway_reads(reads) == [{"a": 1}]  # was "an unparsable chunk": the CR ended the event


def test_a_byte_order_mark_before_the_first_event_is_dropped():
    reads = [BOM[:1], BOM[1:] + b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n']
    assert gateway_reads(reads) == [{"a": 1}, {"b": 2}]  # the first event was lost
