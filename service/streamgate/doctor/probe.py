"""One streaming request, and the time and content of every socket read of its answer.

Standard library only, one file, runnable as a script: the doctor pipes it to hosts over SSH
(`python3 - URL [options] < probe.py`) and reads the one JSON object it prints. A raw socket on
purpose: HTTP client libraries re-chunk what they read, and the question is when bytes reach the
client. HTTP/1.1 only; over HTTPS, ALPN offers http/1.1 alone (an HTTP/2 hop is then seen as its
HTTP/1.1 fallback; the JSON says what was negotiated).

Also the home of the stdlib wire readers the tests share: the chunked decoder (RFC 9112 7.1) and
the server-sent events parser (WHATWG HTML), one definition each.

Times in the JSON: `t_connect_ms` and `t_request_sent_ms` count from the start of the connection
attempt; `t_headers_ms`, `t_first_body_ms` and each read's time count from the moment the request
was sent (the clock TTFT uses). `reads` holds every recv(): [t_ms, bytes on the wire, tokens that
read completed]. The response is treated as hostile: head, body and decompressed sizes, read count
and total time are bounded, and any violation ends the probe with `error` set.
"""

from __future__ import annotations

import argparse
import codecs
import json
import re
import socket
import ssl
import sys
import time
import urllib.parse
import zlib
from dataclasses import dataclass

RECV_SIZE = 65536
MAX_HEAD_BYTES = 65536  # status line and header fields together
MAX_HEADER_FIELDS = 200
MAX_BODY_BYTES = 16 << 20  # decoded payload, after decompression
MAX_READS = 200_000
BODY_SAMPLE_CHARS = 2000
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_TOKENS = 200
# A prompt that makes models write at length: a short answer proves nothing about streaming.
PROMPT = (
    "Write a long, detailed story about a lighthouse keeper and a storm, in plain prose, "
    "at least four paragraphs."
)
USER_AGENT = "streamgate-doctor/1"
# Routes recognised by path: the request body each needs (OpenAI chat by default).
OPENAI, SSE, TEXT = "openai", "sse", "text"


class ProtocolError(ValueError):
    pass


# --- chunked transfer coding ---------------------------------------------------------------

# Read from servers that may be hostile on purpose: every line and size is bounded, so a bad
# peer costs a ProtocolError, never memory.
MAX_CHUNK_LINE_BYTES = 4096  # a size line with its extensions, or one trailer field line
MAX_CHUNK_BYTES = 1 << 30  # 16 hex digits would parse; no test streams a GiB in one chunk
MAX_TRAILER_BYTES = 16384  # all trailer field lines together
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXTENSION = (
    rb"[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
)
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:" + _EXTENSION + rb")*)")
_TRAILER_LINE = re.compile(_TOKEN + rb":[ \t]*[\t -~\x80-\xff]*")
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class ChunkedDecoder:
    """Incremental, byte-exact decoder of the chunked transfer coding, one read at a time.

    `feed(raw)` returns the payload `raw` completed; `done` is set once the last chunk, the
    trailer section and its empty line have arrived. Sizes are hex digits only (no sign, no
    "0x", no "_", no spaces: int(x, 16) alone would take them all), extensions and trailer
    fields must match the grammar, every CRLF is checked. After the end, further bytes are kept
    in `rest` (the next response on the connection, or junk), never taken as payload.
    """

    def __init__(
        self,
        *,
        max_line_bytes: int = MAX_CHUNK_LINE_BYTES,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        max_trailer_bytes: int = MAX_TRAILER_BYTES,
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.max_trailer_bytes = max_trailer_bytes
        self._state = _SIZE
        self._pending = b""  # an unfinished line, or a partial CRLF after a chunk's payload
        self._left = 0  # payload bytes still due in the current chunk
        self.extensions: list[bytes] = []  # each chunk's extensions, as sent (b"" for none)
        self.payload_chunks = 0  # with payload: a relaying hop writes one per read it made
        self.trailers: list[tuple[str, str]] = []  # (lower-case name, value)
        self._trailer_bytes = 0
        self.rest = b""
        self.done = False

    def feed(self, raw: bytes) -> bytes:
        if self.done:
            self.rest += raw
            return b""
        buffer = self._pending + raw if self._pending else raw
        self._pending = b""
        out = []
        position, size = 0, len(buffer)
        while position < size:
            state = self._state
            if state == _DATA:
                end = position + self._left
                if end > size:
                    end = size
                out.append(buffer[position:end])
                self._left -= end - position
                position = end
                if not self._left:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if buffer.startswith(b"\r\n", position):
                    position += 2
                    self._state = _SIZE
                elif buffer[position:] == b"\r":
                    self._pending = b"\r"
                    break
                else:
                    raise ProtocolError(
                        f"chunk not followed by CRLF: {buffer[position : position + 20]!r}"
                    )
            else:
                line_end = buffer.find(b"\r\n", position, position + self.max_line_bytes + 2)
                if line_end < 0:
                    if size - position > self.max_line_bytes + 1:
                        raise ProtocolError(f"chunk line longer than {self.max_line_bytes} bytes")
                    self._pending = buffer[position:]
                    break
                line = buffer[position:line_end]
                position = line_end + 2
                if state == _SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
                    if self.done:
                        self.rest = buffer[position:]
                        break
        return out[0] if len(out) == 1 else b"".join(out)

    def _size_line(self, line: bytes) -> None:
        if 0 < len(line) <= 16 and not line.translate(None, _HEX_DIGITS):
            chunk_size, extensions = int(line, 16), b""  # hex digits alone: the usual line
        else:
            match = _SIZE_LINE.fullmatch(line)
            if match is None:
                raise ProtocolError(f"bad chunk size line {line[:80]!r}")
            chunk_size, extensions = int(match[1], 16), match[2]
        if chunk_size > self.max_chunk_bytes:
            raise ProtocolError(f"chunk of {chunk_size} bytes, over {self.max_chunk_bytes}")
        self.extensions.append(extensions)
        self.payload_chunks += 1 if chunk_size else 0
        self._left = chunk_size
        self._state = _DATA if chunk_size else _TRAILERS

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state, self.done = _DONE, True
            return
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > self.max_trailer_bytes:
            raise ProtocolError(f"trailer section longer than {self.max_trailer_bytes} bytes")
        if _TRAILER_LINE.fullmatch(line) is None:
            raise ProtocolError(f"bad trailer field line {line[:80]!r}")
        name, _, value = line.decode("latin-1").partition(":")
        self.trailers.append((name.lower(), value.strip(" \t")))


def decode_chunked(body: bytes) -> bytes:
    """The payload of a whole chunked body; ProtocolError when it is malformed, cut short, or
    followed by anything."""
    decoder = ChunkedDecoder()
    payload = decoder.feed(body)
    if not decoder.done:
        raise ProtocolError("chunked body cut short before its last chunk")
    if decoder.rest:
        raise ProtocolError(f"bytes after the chunked body: {decoder.rest[:80]!r}")
    return payload


# --- server-sent events --------------------------------------------------------------------

# The WHATWG HTML "event stream interpretation" rules to the letter, one read at a time: UTF-8
# (invalid sequences become U+FFFD); one leading BOM is dropped; lines end in CRLF, LF or CR (a CR
# ending one read and an LF starting the next are one line end); ":" starts a comment; "name:
# value" loses one leading space of the value; a line without a colon is a field with an empty
# value; data lines join with "\n"; a blank line dispatches the event unless no data line came;
# unknown fields are ignored; an event cut off by the end of the stream is never dispatched.
_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str = ""  # the stream's last event ID when this event was dispatched

    def json(self) -> object:
        return json.loads(self.data)


class SSEParser:
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


# --- tokens: what one read carried ---------------------------------------------------------


class WordCounter:
    """Plain text (and any type that is not an event stream): a token is a word, counted in the
    read where it starts (a word split across reads counts once)."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._in_word = False
        self.usage: dict | None = None
        self.stream_error: str | None = None
        self.ended = False  # the format's own end marker arrived (plain text has none)

    def feed(self, payload: bytes) -> tuple[int, str]:
        text = self._utf8.decode(payload)
        starts = 0
        for char in text:
            if char.isspace():
                self._in_word = False
            elif not self._in_word:
                self._in_word = True
                starts += 1
        return starts, text


class EventCounter(WordCounter):
    """text/event-stream: a token is an event with content: an OpenAI chunk's non-empty delta
    (chat or completions), the gateway's {"content": ...}, any other event's data. The end
    (`data: [DONE]`, `event: done`), in-band errors and usage are noted, not counted."""

    def __init__(self) -> None:
        super().__init__()
        self._parser = SSEParser()

    def feed(self, payload: bytes) -> tuple[int, str]:
        tokens, texts = 0, []
        for event in self._parser.feed(payload):
            text = self._content(event)
            if text:
                tokens += 1
                texts.append(text)
        return tokens, "".join(texts)

    def _content(self, event: Event) -> str:
        if event.event == "error":
            self.stream_error = event.data[:300]
            return ""
        if event.event in ("done", "end") or event.data == "[DONE]":
            self.ended = True
            self._payload(event.data)  # the gateway's done event carries the usage
            return ""
        if not event.data.startswith("{"):
            return event.data
        return self._payload(event.data)

    def _payload(self, data: str) -> str:
        try:
            payload = json.loads(data)
        except ValueError:
            return ""
        if not isinstance(payload, dict):
            return ""
        if "error" in payload:
            self.stream_error = json.dumps(payload["error"])[:300]
            return ""
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        choices = payload.get("choices")
        if isinstance(choices, list):
            first = choices[0] if choices and isinstance(choices[0], dict) else {}
            delta = first.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            text = delta.get("content") or delta.get("reasoning_content") or first.get("text")
            return text if isinstance(text, str) else ""
        for key in ("content", "text", "token", "delta"):
            if isinstance(payload.get(key), str):
                return payload[key]
        return ""


# --- the request ---------------------------------------------------------------------------


def route_of(path: str) -> str | None:
    """The route a path names, for the request body it needs; None: unknown (GET unless a body
    is given). The kit's routes (service formats.CHAT_ROUTES) and OpenAI's."""
    path = path.rstrip("/")
    if path.endswith("/completions"):
        return OPENAI
    if path.endswith("/chat/stream-sse"):
        return SSE
    if path.endswith("/chat/stream"):
        return TEXT
    return None


def default_body(route: str | None, max_tokens: int, model: str | None) -> dict | None:
    if route is None:
        return None
    body: dict
    if route == OPENAI:
        body = {
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "max_tokens": max_tokens,
            "stream_options": {"include_usage": True},
        }
    else:
        body = {"prompt": PROMPT, "max_tokens": max_tokens}
    if model:
        body["model"] = model
    return body


def build_request(
    url: urllib.parse.SplitResult, body: bytes | None, key: str | None, headers: dict[str, str]
) -> bytes:
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    default_port = 443 if url.scheme == "https" else 80
    host = url.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if url.port and url.port != default_port:
        host = f"{host}:{url.port}"
    fields = {
        "Host": host,
        "User-Agent": USER_AGENT,
        "Accept": "text/event-stream, text/plain, */*",
        # As browsers do: a compressing hop then shows (and is undone here, to count tokens).
        "Accept-Encoding": "gzip",
        "Connection": "close",
    }
    if body is not None:
        fields["Content-Type"] = "application/json"
        fields["Content-Length"] = str(len(body))
    if key:
        fields["Authorization"] = f"Bearer {key}"
    fields.update(headers)
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in fields.items())]
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"a request line or header holds a line break: {line[:60]!r}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")


# --- the response --------------------------------------------------------------------------

_STATUS_LINE = re.compile(r"HTTP/1\.[01] ([1-5][0-9][0-9])(?: (.*))?")
_FIELD_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


def parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """Status, reason and header fields (lower-case names; repeated fields joined by ", ")."""
    lines = head.decode("latin-1").split("\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_HEADER_FIELDS:
        raise ProtocolError(f"more than {MAX_HEADER_FIELDS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            raise ProtocolError(f"bad header field line {line[:80]!r}")
        key, value = name.lower(), value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(match[1]), match[2] or "", headers


class Decompressor:
    """Undoes a gzip or deflate content coding, read by read, within MAX_BODY_BYTES."""

    def __init__(self, coding: str) -> None:
        # gzip: a gzip header (wbits 16+); deflate: a zlib stream (raw deflate is tried on error).
        self._coding = coding
        self._zlib = zlib.decompressobj(31 if coding in ("gzip", "x-gzip") else 15)
        self._first = True

    def feed(self, data: bytes, budget: int) -> bytes:
        try:
            out = self._zlib.decompress(data, budget + 1)
        except zlib.error as exc:
            if self._coding == "deflate" and self._first:
                self._zlib = zlib.decompressobj(-15)
                self._first = False
                return self.feed(data, budget)
            raise ProtocolError(f"{self._coding} body does not decompress: {exc}") from None
        self._first = False
        if len(out) > budget or self._zlib.unconsumed_tail:
            raise ProtocolError(f"body over {MAX_BODY_BYTES} bytes once decompressed")
        return out


@dataclass
class Options:
    url: str
    key: str | None = None
    body: bytes | None = None  # None: the route's default body (or GET for an unknown route)
    cacert: str | None = None
    insecure: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_tokens: int = DEFAULT_MAX_TOKENS
    model: str | None = None
    headers: dict[str, str] | None = None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class _Probe:
    """The state of one exchange; `run` returns the JSON-ready result."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.result: dict = {
            "url": options.url,
            "route": None,
            "http_version": None,
            "alpn": None,
            "tls": None,
            "status": None,
            "reason": None,
            "headers": {},
            "t_connect_ms": None,
            "t_request_sent_ms": None,
            "t_headers_ms": None,
            "t_first_body_ms": None,
            "t_end_ms": None,
            "reads": [],
            "tokens": 0,
            "body_bytes": 0,
            "complete": False,
            "usage": None,
            "stream_error": None,
            "error": None,
            "body_sample": "",
        }

    def run(self) -> dict:
        options = self.options
        url = urllib.parse.urlsplit(options.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            self.result["error"] = "the URL must start with http:// or https:// and name a host"
            return self.result
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            self.result["error"] = "the URL's port is not a number from 0 to 65535"
            return self.result
        route = route_of(url.path)
        self.result["route"] = route
        body = options.body
        if body is None:
            default = default_body(route, options.max_tokens, options.model)
            body = json.dumps(default).encode() if default is not None else None
        try:
            wire = build_request(url, body, options.key, options.headers or {})
        except ValueError as exc:
            self.result["error"] = str(exc)
            return self.result
        started = time.perf_counter()
        deadline = started + options.timeout_s
        sock = self._connect(url.hostname, port, url.scheme == "https", deadline, started)
        if sock is None:
            return self.result
        try:
            sock.settimeout(max(deadline - time.perf_counter(), 0.001))
            sock.sendall(wire)
            sent = time.perf_counter()
            self.result["t_request_sent_ms"] = _ms(sent - started)
            self._receive(sock, sent, deadline)
        except ProtocolError as exc:
            self.result["error"] = f"the response breaks HTTP/1.1: {exc}"
        except TimeoutError:
            self.result["error"] = (
                f"no complete answer within {options.timeout_s:g} s "
                "(raise --timeout, or something holds the stream open)"
            )
        except OSError as exc:
            self.result["error"] = f"the connection failed mid-answer: {exc}"
        finally:
            sock.close()
        return self.result

    def _connect(
        self, host: str, port: int, tls: bool, deadline: float, started: float
    ) -> socket.socket | None:
        where = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=deadline - time.perf_counter())
        except socket.gaierror as exc:
            self.result["error"] = f"cannot resolve {host}: {exc.strerror} (check the host name)"
            return None
        except ConnectionRefusedError:
            self.result["error"] = (
                f"connection to {where} refused: nothing listens there (is the server running, "
                "is the port right?)"
            )
            return None
        except TimeoutError:
            self.result["error"] = f"no TCP connection to {where} (a firewall, or the wrong host)"
            return None
        except OSError as exc:
            self.result["error"] = f"cannot connect to {where}: {exc}"
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.result["t_connect_ms"] = _ms(time.perf_counter() - started)
        if not tls:
            self.result["http_version"] = "HTTP/1.1"
            return sock
        context = ssl.create_default_context(cafile=self.options.cacert)
        if self.options.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        try:
            tls_sock = context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            self.result["error"] = (
                f"TLS: {where}'s certificate is not trusted ({exc.verify_message}): "
                "pass --cacert FILE with its CA, or --insecure to look anyway"
            )
            return None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            self.result["error"] = f"TLS handshake with {where} failed: {exc}"
            return None
        cipher = tls_sock.cipher()
        self.result["tls"] = {
            "version": tls_sock.version(),
            "cipher": cipher[0] if cipher else None,
        }
        self.result["alpn"] = tls_sock.selected_alpn_protocol()
        self.result["http_version"] = "HTTP/1.1"
        self.result["t_tls_ms"] = _ms(time.perf_counter() - started)
        return tls_sock

    def _receive(self, sock: socket.socket, sent: float, deadline: float) -> None:
        result = self.result
        reads = result["reads"]
        head = b""
        payload_reader = None  # set once the head is known: bytes on the wire -> payload
        counter: WordCounter | None = None
        decompressor: Decompressor | None = None
        sample: list[str] = []
        sample_chars = 0
        while True:
            if len(reads) >= MAX_READS:
                raise ProtocolError(f"more than {MAX_READS} reads")
            sock.settimeout(max(deadline - time.perf_counter(), 0.001))
            raw = sock.recv(RECV_SIZE)
            at = time.perf_counter() - sent
            if not raw:
                result["t_end_ms"] = _ms(at)
                if payload_reader is None:
                    raise ProtocolError(
                        "the server closed the connection before the end of the head"
                    )
                if payload_reader.until_close:
                    result["complete"] = True
                elif not result["complete"]:
                    raise ProtocolError(
                        "the server closed the connection before the end of the body"
                    )
                return
            read = [_ms(at), len(raw), 0]
            reads.append(read)
            if payload_reader is None:
                head += raw
                parsed = self._final_head(head)
                if parsed is None:
                    continue
                (status, reason, headers), raw = parsed
                head = b""
                result.update(status=status, reason=reason, headers=headers)
                result["t_headers_ms"] = _ms(at)
                payload_reader = _PayloadReader(headers, status)
                coding = headers.get("content-encoding", "identity").strip().lower()
                if coding in ("gzip", "x-gzip", "deflate"):
                    decompressor = Decompressor(coding)
                elif coding not in ("", "identity"):
                    raise ProtocolError(f"content coding {coding!r} was not asked for")
                is_events = "text/event-stream" in headers.get("content-type", "").lower()
                counter = EventCounter() if is_events else WordCounter()
            payload = payload_reader.feed(raw)
            if payload:
                if decompressor is not None:
                    payload = decompressor.feed(payload, MAX_BODY_BYTES - result["body_bytes"])
                result["body_bytes"] += len(payload)
                if result["body_bytes"] > MAX_BODY_BYTES:
                    raise ProtocolError(f"body over {MAX_BODY_BYTES} bytes")
                if payload and result["t_first_body_ms"] is None:
                    result["t_first_body_ms"] = _ms(at)
                assert counter is not None
                tokens, text = counter.feed(payload)
                read[2] = tokens
                result["tokens"] += tokens
                if sample_chars < BODY_SAMPLE_CHARS:
                    sample.append(text[: BODY_SAMPLE_CHARS - sample_chars])
                    sample_chars += len(sample[-1])
                    result["body_sample"] = "".join(sample)
                result["usage"] = counter.usage
                result["stream_error"] = counter.stream_error
            if payload_reader.done:
                result["complete"] = True
                result["t_end_ms"] = _ms(at)
                return

    @staticmethod
    def _final_head(received: bytes) -> tuple[tuple[int, str, dict[str, str]], bytes] | None:
        """The final response head and the bytes after it; None until it is complete. Interim
        answers (100 Continue, 103 Early Hints) before it are skipped."""
        while True:
            end = received.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(received) > MAX_HEAD_BYTES:
                    raise ProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
                return None
            status, reason, headers = parse_head(received[:end])
            received = received[end + 4 :]
            if status == 101:
                raise ProtocolError("the server switched protocols (101)")
            if status >= 200:
                return (status, reason, headers), received


class _PayloadReader:
    """The body framing the head announced: chunked, a Content-Length, none, or until close."""

    def __init__(self, headers: dict[str, str], status: int) -> None:
        self.chunked: ChunkedDecoder | None = None
        self.left: int | None = None
        self.until_close = False
        self.done = False
        encoding = headers.get("transfer-encoding", "").lower()
        if status in (204, 304):
            self.done = True
        elif encoding:
            if [part.strip() for part in encoding.split(",")][-1] != "chunked":
                raise ProtocolError(f"transfer-encoding {encoding!r} does not end in chunked")
            self.chunked = ChunkedDecoder()
        elif "content-length" in headers:
            value = headers["content-length"].strip()
            if not value.isdigit() or len(value) > 15:
                raise ProtocolError(f"bad content-length {value[:40]!r}")
            self.left = int(value)
            self.done = self.left == 0
        else:
            self.until_close = True

    def feed(self, raw: bytes) -> bytes:
        if self.chunked is not None:
            payload = self.chunked.feed(raw)
            self.done = self.chunked.done
            return payload
        if self.left is not None:
            if len(raw) > self.left:
                raise ProtocolError("more body bytes than the content-length said")
            self.left -= len(raw)
            self.done = self.left == 0
        return raw


def probe(options: Options) -> dict:
    """Send one request as `options` say; the JSON-ready record of how its answer arrived."""
    return _Probe(options).run()


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="probe.py", description="Time every read of one streamed HTTP answer (JSON out)."
    )
    add_arguments(parser)
    return options_from(parser, parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser, *, url_required: bool = True) -> None:
    """The probe's options, shared with the doctor's command line (where hop mode needs no
    URL)."""
    parser.add_argument(
        "url", nargs=None if url_required else "?", help="http(s)://host[:port]/path of the stream"
    )
    parser.add_argument("--key", help="sent as Authorization: Bearer KEY")
    parser.add_argument(
        "--body", help="JSON request body (default: one that asks the route for a long answer)"
    )
    parser.add_argument("--cacert", help="HTTPS: trust this CA file (default: the system store)")
    parser.add_argument("--insecure", action="store_true", help="HTTPS: do not verify the server")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for the whole exchange"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="max_tokens of the default body"
    )
    parser.add_argument("--model", help="model of the default body (default: the server's)")
    parser.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'", help="repeatable"
    )


def options_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Options:
    body = None
    if args.body is not None:
        try:
            json.loads(args.body)
        except ValueError as exc:
            parser.error(f"--body is not JSON: {exc}")
        body = args.body.encode("utf-8")
    headers = {}
    for field in args.header:
        name, colon, value = field.partition(":")
        if not colon or _FIELD_NAME.fullmatch(name.strip()) is None:
            parser.error(f"--header {field!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    if args.timeout <= 0 or args.max_tokens <= 0:
        parser.error("--timeout and --max-tokens must be positive")
    return Options(
        url=args.url,
        key=args.key,
        body=body,
        cacert=args.cacert,
        insecure=args.insecure,
        timeout_s=args.timeout,
        max_tokens=args.max_tokens,
        model=args.model,
        headers=headers,
    )


def main(argv: list[str] | None = None) -> int:
    result = probe(parse_args(argv))
    json.dump(result, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
