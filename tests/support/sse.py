"""The one server-sent events parser of the tests, the benchmark and the load tests: the WHATWG
HTML "event stream interpretation" rules to the letter, fed one read at a time.

Written out rather than borrowed so the checks hold the gateway to the specification, not to
another implementation's leniencies (httpx-sse, in the dev requirements, dispatches events that
carry no data and keeps a leading byte order mark; its incremental decoder is private API).
The rules: the bytes are UTF-8 (invalid sequences become U+FFFD); one leading BOM is dropped;
lines end in CRLF, LF or CR (a CR at the end of one read and an LF at the start of the next are
one line end); a line starting with ":" is a comment; "name: value" loses one leading space of
the value, a line without a colon is a field with an empty value; data lines join with "\n";
a blank line dispatches the event, unless no data line came; an unknown field is ignored; the
event cut off by the end of the stream is never dispatched.

The parser itself is streamgate.doctor.probe.SSEParser (the doctor counts events with it; stdlib
only); this module names it Parser and adds whole-body parsing. The load tests import it from
their own process (loadtest/streamcheck.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The parser lives in the doctor's probe (standard library only, in the wheel): one definition.
from streamgate.doctor.probe import Event
from streamgate.doctor.probe import SSEParser as Parser


@dataclass
class Stream:
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    # Text after the last blank line: an event cut off mid-way (the stream ended early).
    unterminated: str = ""

    def of_type(self, name: str) -> list[Event]:
        return [event for event in self.events if event.event == name]


def parse(body: bytes | str) -> Stream:
    """A whole body at once."""
    parser = Parser()
    events = parser.feed(body.encode() if isinstance(body, str) else body)
    return Stream(events=events, comments=parser.comments, unterminated=parser.unterminated)
