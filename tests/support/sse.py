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

Stdlib only: the load tests import it from their own process (loadtest/streamcheck.py).
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field

_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str = ""  # the stream's last event ID when this event was dispatched

    def json(self) -> object:
        return json.loads(self.data)


@dataclass
class Stream:
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    # Text after the last blank line: an event cut off mid-way (the stream ended early).
    unterminated: str = ""

    def of_type(self, name: str) -> list[Event]:
        return [event for event in self.events if event.event == name]


class Parser:
    """Incremental: `feed(read)` returns the events that read completed, in order."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True  # the BOM may come only before anything else
        self._skip_lf = False  # the last read ended in CR: an LF first in the next is its pair
        self._partial = ""  # the text after the last line end
        self._since_blank: list[str] = []  # lines after the last blank line
        self._event_type = ""
        self._data: list[str] = []
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self.comments: list[str] = []

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for line in self._lines(self._utf8.decode(data)):
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self, text: str) -> list[str]:
        """The lines `text` completes, without their line ends."""
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            text = text.removeprefix(_BOM)
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        self._skip_lf = text.endswith("\r")
        lines = _LINE_END.split(self._partial + text)
        self._partial = lines.pop()
        return lines

    def _line(self, line: str) -> Event | None:
        if not line:
            self._since_blank = []
            return self._dispatch()
        self._since_blank.append(line)
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        event_type, data = self._event_type, self._data
        self._event_type, self._data = "", []
        if not data:
            return None
        return Event(event=event_type or "message", data="\n".join(data), id=self.last_event_id)

    @property
    def unterminated(self) -> str:
        """The lines since the last blank line and the unfinished one ("" when none)."""
        if not self._since_blank and not self._partial:
            return ""
        return "\n".join([*self._since_blank, self._partial])


def parse(body: bytes | str) -> Stream:
    """A whole body at once."""
    parser = Parser()
    events = parser.feed(body.encode() if isinstance(body, str) else body)
    return Stream(events=events, comments=parser.comments, unterminated=parser.unterminated)
