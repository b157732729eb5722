"""The one chunked decoder (streamgate/doctor/probe.py) of the probe, the wire tests and the
benchmark's load generator: byte-exact under any split into reads, strict where a lenient reader
is a request-smuggling or memory hole. Each property has a negative control: a decoder with one
of the shortcuts the repository's decoders took, for which hypothesis finds a counterexample."""

from __future__ import annotations

import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from streamgate.doctor.probe import (
    _DATA,
    _DATA_END,
    _DONE,
    _SIZE,
    _TRAILERS,
    ChunkedDecoder,
    ProtocolError,
    decode_chunked,
)

SEARCH = settings(max_examples=3000, database=None, phases=[Phase.generate])
token = st.text(alphabet="abcXYZ019-_.!~", min_size=1, max_size=6)
extension = st.one_of(
    st.just(b""),
    st.builds(lambda name: b";" + name.encode(), token),
    st.builds(lambda name, value: b" ; %s=%s" % (name.encode(), value.encode()), token, token),
    st.builds(lambda name: b';%s="a \\" ;b"' % name.encode(), token),
)
trailer = st.builds(
    lambda name, value: (name.lower(), value),
    token,
    st.text(alphabet="ab 1;,", max_size=8).map(str.strip),
)


@st.composite
def messages(draw) -> tuple[bytes, dict]:
    """A chunked body (any chunk sizes, hex in either case, leading zeros, extensions, trailers)
    followed by whatever comes next on the connection; and what it must decode to."""
    parts = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    extensions = [draw(extension) for _ in range(len(parts) + 1)]
    trailers = draw(st.lists(trailer, max_size=3))
    wire = b""
    for part, ext in zip(parts, extensions, strict=False):
        size = draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % len(part)
        wire += size + ext + b"\r\n" + part + b"\r\n"
    wire += b"0" + extensions[-1] + b"\r\n"
    wire += b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in trailers)
    wire += b"\r\n"
    rest = draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"0\r\n\r\n"]))
    return wire + rest, {
        "payload": b"".join(parts),
        "extensions": extensions,
        "trailers": trailers,
        "rest": rest,
    }


def cut(body: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(cuts)
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def decoded(decoder: ChunkedDecoder, pieces: list[bytes]) -> dict:
    payload = b"".join(decoder.feed(piece) for piece in pieces)
    return {
        "payload": payload,
        "extensions": decoder.extensions,
        "trailers": decoder.trailers,
        "rest": decoder.rest,
        "done": decoder.done,
    }


# --- the shortcuts the repository's decoders took, as negative controls ----------------------


class LenientSize(ChunkedDecoder):
    """The size as int(text before ';', 16): takes '+5', '0x5', '5_0', ' 5 ' (the old probe,
    load generator and capacity check)."""

    def _size_line(self, line: bytes) -> None:
        size = int(line.split(b";", 1)[0].strip(), 16)
        self.extensions.append(b"")
        self._left, self._state = size, (_DATA if size else _TRAILERS)


class EndsAtTheZeroChunk(ChunkedDecoder):
    """Done at the '0' line: trailers and the last CRLF are left for whatever reads next (the
    old probe)."""

    def _size_line(self, line: bytes) -> None:
        super()._size_line(line)
        if not self._left:
            self._state, self.done = _DONE, True


class ForgetsThePartialLine(ChunkedDecoder):
    """A size line split across two reads is lost."""

    def feed(self, raw: bytes) -> bytes:
        if self._state == _SIZE:
            self._pending = b""
        return super().feed(raw)


class SkipsTheCRLF(LenientSize):
    """Skips the two bytes after a chunk's payload without looking at them, and reads sizes
    leniently (the old load generator): a chunk one byte longer than its size passes, the byte
    lost."""

    def __init__(self) -> None:
        super().__init__()
        self._skipped = 0

    def feed(self, raw: bytes) -> bytes:
        out = b""
        for at in range(len(raw)):
            if self._state == _DATA_END:
                self._skipped += 1
                if self._skipped == 2:
                    self._state, self._skipped = _SIZE, 0
                continue
            out += super().feed(raw[at : at + 1])
        return out


# --- properties -------------------------------------------------------------------------------


@given(st.data())
def test_any_split_into_reads_decodes_the_same_exactly(data):
    body, expected = data.draw(messages())
    pieces = cut(body, data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
    assert decoded(ChunkedDecoder(), pieces) == {**expected, "done": True}


@pytest.mark.parametrize("shortcut", [EndsAtTheZeroChunk, ForgetsThePartialLine])
def test_negative_control_a_decoder_that_loses_the_framing_is_caught(shortcut):
    def differs(case) -> bool:
        (body, expected), cuts = case
        try:
            return decoded(shortcut(), cut(body, cuts)) != {**expected, "done": True}
        except ProtocolError:
            return True

    cases = st.tuples(messages(), st.lists(st.integers(0, 200), max_size=6)).map(
        lambda case: (case[0], [min(c, len(case[0][0])) for c in case[1]])
    )
    assert find(cases, differs, settings=SEARCH)


BAD_SIZE_LINES = [
    b"+5",
    b"-5",
    b"0x5",
    b"5_0",
    b" 5",
    b"5 ",
    b"\t5",
    b"",
    b"g",
    b"5;",
    b"5;=x",
    b"5;a=",
    b'5;a="x',
    b"5 x",
    b"1" * 17,
    b"\xd9\xa5",
    b"5\n",
]


@pytest.mark.parametrize("line", BAD_SIZE_LINES)
def test_a_malformed_size_line_is_refused(line):
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(line + b"\r\nhello\r\n0\r\n\r\n")


def test_negative_control_a_lenient_size_takes_what_a_strict_one_refuses():
    def taken(line: bytes) -> bool:
        try:
            return LenientSize().feed(line + b"\r\nhello\r\n0\r\n\r\n") == b"hello"
        except (ProtocolError, ValueError):
            return False

    assert find(st.sampled_from(BAD_SIZE_LINES), taken, settings=SEARCH)


@given(
    parts=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=4),
    which=st.integers(0, 3),
    delta=st.sampled_from([-1, 1, 2]),
)
def test_a_chunk_of_the_wrong_size_is_refused(parts, which, delta):
    which %= len(parts)
    wire = (
        b"".join(
            b"%x\r\n%s\r\n" % (len(part) + (delta if i == which else 0), part)
            for i, part in enumerate(parts)
        )
        + b"0\r\n\r\n"
    )
    with pytest.raises(ProtocolError):
        decode_chunked(wire)


def test_negative_control_skipping_the_crlf_takes_a_chunk_longer_than_its_size():
    def taken(parts) -> bool:
        wire = b"".join(b"%x\r\n%s\r\n" % (len(part) - 1, part) for part in parts) + b"0\r\n\r\n"
        decoder = SkipsTheCRLF()
        try:
            decoder.feed(wire)
        except ProtocolError:
            return False
        return decoder.done

    assert find(
        st.lists(st.binary(min_size=2, max_size=4), min_size=1, max_size=2), taken, settings=SEARCH
    )


@pytest.mark.parametrize(
    ("wire", "what"),
    [
        (b"a" * 5000, "chunk line longer"),  # a size line that never ends
        (b"5;" + b"x" * 5000 + b"\r\n", "chunk line longer"),
        (b"40000001\r\n", "over"),  # a chunk over 1 GiB
        (b"0\r\n" + b"x-pad: 1234567890\r\n" * 1000, "trailer section longer"),
        (b"0\r\nno colon\r\n\r\n", "bad trailer"),
    ],
)
def test_limits_refuse_before_memory_grows(wire, what):
    decoder = ChunkedDecoder()
    with pytest.raises(ProtocolError, match=what):
        for start in range(0, len(wire), 7):  # in small reads: the bound holds across them
            decoder.feed(wire[start : start + 7])
            assert len(decoder._pending) <= decoder.max_line_bytes + 1


def test_decode_chunked_refuses_a_cut_body_and_bytes_after_it():
    with pytest.raises(ProtocolError, match="cut short"):
        decode_chunked(b"5\r\nhello\r\n")
    with pytest.raises(ProtocolError, match="after"):
        decode_chunked(b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1")
    assert decode_chunked(b"5\r\nhello\r\n0\r\n\r\n") == b"hello"
