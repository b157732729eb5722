"""The tests' SSE parser (support/sse.py) against the WHATWG event-stream rules: the
specification's own examples, any split of the bytes into reads, any choice of line ends, and an
independent implementation (httpx-sse, through its public API). Each property has a negative
control: a parser with one of the usual shortcuts breaks it, and hypothesis finds where."""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import HealthCheck, Phase, assume, find, given, settings
from hypothesis import strategies as st
from support import sse

LINE_ENDS = ["\n", "\r", "\r\n"]
# For the negative controls: search for a counterexample, keep the first one (no shrinking).
SEARCH = settings(max_examples=5000, database=None, phases=[Phase.generate])
FIELD_NAMES = ["data", "event", "id", "retry", "dat", "x"]
SEPARATORS = [":", ": ", ":  ", ""]  # "" makes the line a field without a colon
# Line text: no line ends; NUL, a BOM, multi-byte and separator-like characters on purpose.
line_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(["\0", "\ufeff", ":", " ", "日", "🙂", "\u2028", "é"]),
        st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
    ),
    max_size=12,
)
field_line = st.builds(
    lambda name, separator, value: name + separator + value,
    st.sampled_from(FIELD_NAMES),
    st.sampled_from(SEPARATORS),
    line_text,
)
line = st.one_of(st.just(""), st.just(""), line_text.map(lambda text: ":" + text), field_line)


@st.composite
def streams(draw, *, bom: bool = True) -> bytes:
    """An event stream: lines of every kind, each with a line end of its own, maybe a BOM."""
    lines = draw(st.lists(line, max_size=16))
    text = "".join(one + draw(st.sampled_from(LINE_ENDS)) for one in lines)
    text += draw(st.one_of(st.just(""), field_line))  # a last line cut off
    if bom and draw(st.booleans()):
        text = "\ufeff" + text
    body = text.encode()
    at = draw(st.integers(0, len(body)))  # maybe a broken UTF-8 sequence (read as U+FFFD)
    return body[:at] + draw(st.sampled_from([b"", b"\xff", b"\xf0\x9f", b"\xc3"])) + body[at:]


@st.composite
def reads(draw, body: bytes) -> list[bytes]:
    """`body` cut into reads at any points (inside characters and CRLF pairs too)."""
    cuts = sorted(draw(st.sets(st.integers(0, len(body)), max_size=8)))
    return [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def outcome(parser: sse.Parser, pieces: list[bytes]) -> tuple:
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events, parser.comments, parser.unterminated, parser.last_event_id, parser.retry_ms


# --- the shortcuts the repository's parsers took, as negative controls ------------------------


class LineFeedOnly(sse.Parser):
    """Lines end at LF only (a CR before it is dropped): a lone CR ends no line."""

    def _lines(self, text: str) -> list[str]:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return [one.removesuffix("\r") for one in lines]


class ForgetsTheCarry(sse.Parser):
    """Each read parsed on its own: a line split across two reads is lost."""

    def feed(self, data: bytes) -> list[sse.Event]:
        self._partial = ""
        return super().feed(data)


class UnpairedCR(sse.Parser):
    """A CR at the end of a read and the LF starting the next count as two line ends."""

    def feed(self, data: bytes) -> list[sse.Event]:
        self._skip_lf = False
        return super().feed(data)


class KeepsTheBOM(sse.Parser):
    def __init__(self) -> None:
        super().__init__()
        self._at_start = False


# --- the specification's examples -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("data: YHOO\ndata: +2\ndata: 10\n\n", [("message", "YHOO\n+2\n10", "")]),
        (
            ": test stream\n\ndata: first event\nid: 1\n\n"
            "data:second event\nid\n\ndata:  third event\n",
            [("message", "first event", "1"), ("message", "second event", "")],
        ),
        ("data\n\ndata\ndata\n\ndata:", [("message", "", ""), ("message", "\n", "")]),
        ("data:test\n\ndata: test\n\n", [("message", "test", ""), ("message", "test", "")]),
        (
            "event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\n",
            [("add", "73857293", ""), ("remove", "2153", "")],
        ),
        ("event: done\n\nid: x\0y\ndata: a\n\n", [("message", "a", "")]),  # no data: no event
        ("\ufeffdata: a\n\n", [("message", "a", "")]),
        ("\ufeff\ufeffdata: a\n\ndata: b\n\n", [("message", "b", "")]),  # one BOM only
        (
            "data: a\r\rdata: b\r\n\r\ndata: c\n\n",
            [("message", "a", ""), ("message", "b", ""), ("message", "c", "")],
        ),
    ],
)
def test_the_specification_examples(body, expected):
    events = sse.parse(body).events
    assert [(event.event, event.data, event.id) for event in events] == expected


def test_comments_retry_and_the_unterminated_tail():
    parser = sse.Parser()
    parser.feed(b": ping\nretry: 1500\nretry: 1.5\n\ndata: cut")
    assert parser.comments == [" ping"] and parser.retry_ms == 1500
    assert parser.unterminated == "data: cut"


# --- properties, each with its negative control -----------------------------------------------


@given(st.data())
def test_any_split_into_reads_gives_the_same_events(data):
    body = data.draw(streams())
    pieces = data.draw(reads(body))
    assert outcome(sse.Parser(), pieces) == outcome(sse.Parser(), [body])


@pytest.mark.parametrize("shortcut", [ForgetsTheCarry, UnpairedCR])
def test_negative_control_a_parser_that_loses_state_between_reads_is_caught(shortcut):
    def differs(case) -> bool:
        body, cuts = case
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        return outcome(shortcut(), pieces) != outcome(sse.Parser(), [body])

    cases = streams().flatmap(
        lambda body: st.tuples(
            st.just(body), st.lists(st.integers(0, len(body)), max_size=4).map(sorted)
        )
    )
    assert find(cases, differs, settings=SEARCH)  # raises NoSuchExample when none is found


@given(lines=st.lists(line, max_size=12), ends=st.lists(st.sampled_from(LINE_ENDS), min_size=12))
def test_every_line_end_means_the_same(lines, ends):
    with_lf = "".join(one + "\n" for one in lines)
    with_any = "".join(one + end for one, end in zip(lines, ends, strict=False))
    # A CR ending one line and an LF ending an empty next one are a single CRLF.
    assume(with_any.count("\r\n") == ends[: len(lines)].count("\r\n"))
    assert sse.parse(with_any).events == sse.parse(with_lf).events


def test_negative_control_a_parser_that_knows_only_lf_is_caught():
    def differs(case) -> bool:
        lines, ends = case
        with_lf = "".join(one + "\n" for one in lines).encode()
        with_any = "".join(one + end for one, end in zip(lines, ends, strict=False)).encode()
        if with_any.count(b"\r\n") != ends[: len(lines)].count("\r\n"):
            return False  # a CR and the next empty line's LF: one line end, not two
        return outcome(LineFeedOnly(), [with_any])[0] != outcome(sse.Parser(), [with_lf])[0]

    cases = st.tuples(
        st.lists(line, max_size=8), st.lists(st.sampled_from(LINE_ENDS), min_size=8, max_size=8)
    )
    assert find(cases, differs, settings=SEARCH)


def test_negative_control_a_parser_that_keeps_the_bom_is_caught():
    body = "\ufeffdata: a\n\n".encode()
    assert outcome(KeepsTheBOM(), [body])[0] != outcome(sse.Parser(), [body])[0]


# --- an independent implementation agrees where it follows the specification -----------------


@st.composite
def events_with_data(draw) -> bytes:
    """Streams on which httpx-sse follows the specification: every event has a data line (it
    dispatches data-less ones) and no BOM (it keeps one); no retry (it takes any int())."""
    blocks = []
    for _ in range(draw(st.integers(0, 5))):
        fields = draw(
            st.lists(
                st.builds(
                    lambda name, separator, value: name + separator + value,
                    st.sampled_from(["event", "id", "x"]),
                    st.sampled_from(SEPARATORS),
                    line_text,
                ),
                max_size=3,
            )
        )
        fields.append(
            draw(
                st.one_of(
                    st.just("data"),
                    st.builds(
                        lambda separator, value: "data" + separator + value,
                        st.sampled_from(SEPARATORS[:-1]),
                        line_text,
                    ),
                )
            )
        )
        fields += draw(
            st.lists(
                st.one_of(
                    field_line.filter(lambda f: not f.startswith("retry")),
                    line_text.map(lambda text: ":" + text),
                ),
                max_size=3,
            )
        )
        blocks.append([*draw(st.permutations(fields)), ""])
    return (
        "".join(one + draw(st.sampled_from(LINE_ENDS)) for block in blocks for one in block)
        .lstrip("\ufeff")
        .encode()
    )


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_httpx_sse_agrees_on_streams_where_it_follows_the_specification(data):
    body = data.draw(events_with_data())
    pieces = data.draw(reads(body))
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=iter(pieces)
    )
    theirs = [
        (event.event or "message", event.data, event.id)
        for event in EventSource(response).iter_sse()
    ]
    ours = [(event.event, event.data, event.id) for event in sse.parse(body).events]
    assert ours == theirs
