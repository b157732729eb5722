"""A server-sent events parser that follows the WHATWG HTML event-stream rules to the letter.

Written out rather than borrowed so the tests check the gateway against the specification,
not against another implementation's leniencies: lines end in CRLF, LF or CR; a line starting
with ":" is a comment; "field: value" loses one leading space of the value; data lines join
with "\n"; a blank line dispatches the event (none when the data buffer is empty).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None

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


def parse(text: str) -> Stream:
    stream = Stream()
    lines = _LINE_END.split(text)
    # The piece after the last line ending is not a line yet.
    tail = lines.pop()
    event_type, data_lines, last_id = "", [], None
    since_blank: list[str] = []
    for line in lines:
        since_blank.append(line)
        if not line:
            since_blank = []
            if data_lines:
                stream.events.append(
                    Event(event=event_type or "message", data="\n".join(data_lines), id=last_id)
                )
            event_type, data_lines = "", []
            continue
        if line.startswith(":"):
            stream.comments.append(line[1:])
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data_lines.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
        # "retry" and unknown fields are ignored, as the specification says.
    stream.unterminated = "\n".join([*since_blank, tail]) if since_blank or tail else ""
    return stream
