"""Watch one HTTP response arrive on the wire: every recv() after the headers, with its time.

Standard library only: testinfra runs it on lab hosts with their python3 as one program
(standalone_program(), with the chunked decoder of streamgate/doctor/probe.py; `--url
http://127.0.0.1/v1/chat/stream --body '{"prompt": "hi"}'` prints the trace as JSON). A raw
socket is used on purpose: HTTP client libraries re-chunk what they read, and the claim under
test is about when bytes reach the client.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

# The one chunked decoder lives in the doctor's probe (standard library only, in the wheel);
# standalone_program() ships it to hosts with this file.
from streamgate.doctor import probe as doctor_probe
from streamgate.doctor.probe import ChunkedDecoder, ProtocolError

RECV_SIZE = 65536

STREAMED = "streamed"
BUFFERED = "buffered"


@dataclass
class Read:
    """One recv() after the end of the headers."""

    at_s: float  # seconds since the request was sent
    raw_bytes: int  # bytes on the wire, chunk framing included
    data: bytes  # body payload decoded from this read (empty for framing-only reads)


@dataclass
class Trace:
    status: int = 0
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    reads: list[Read] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False
    # The terminating zero-length chunk (or the full Content-Length) arrived.
    complete: bool = False
    # The client hung up on purpose (stop_after_s / stop_when), like a user closing the tab.
    client_closed: bool = False
    client_closed_at: float | None = None  # time.monotonic() of the close
    client_closed_wall: float | None = None  # time.time() of the close (to match server logs)
    error: str = ""  # socket trouble or a protocol violation, empty when none
    sent_at: float = 0.0  # time.monotonic() when the request was fully sent
    headers_at_s: float | None = None  # seconds from sent_at to the end of the headers
    ended_at_s: float | None = None  # seconds from sent_at to the end (complete, closed, error)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "reason": self.reason,
            "headers": self.headers,
            "chunked": self.chunked,
            "complete": self.complete,
            "client_closed": self.client_closed,
            "error": self.error,
            "headers_at_s": self.headers_at_s,
            "ended_at_s": self.ended_at_s,
            "reads": [
                {"at_s": r.at_s, "raw_bytes": r.raw_bytes, "data_bytes": len(r.data)}
                for r in self.reads
            ],
            "body": self.body.decode("utf-8", "replace"),
            "body_b64": base64.b64encode(self.body).decode("ascii"),
            "verdict": summarize(self),
        }


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def encode_body(body: object | bytes | None) -> bytes:
    """A request body as sent: bytes as they are, anything else JSON-encoded, None empty."""
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    return json.dumps(body).encode("utf-8")


def request(
    host: str,
    port: int,
    path: str,
    body: object | bytes | None = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    stop_after_s: float | None = None,
    stop_when=None,
    tls: ssl.SSLContext | None = None,
) -> Trace:
    """Send one HTTP/1.1 request over a fresh connection and record how the answer arrives.

    With `tls`, over HTTPS (the context decides what is trusted): each read is then the
    plaintext of at most one TLS record, so a burst of records shows as many reads close
    together, and the arrival span tells it from a stream.

    `body` is JSON-encoded unless it is bytes. `timeout_s` bounds the whole exchange.
    The client hangs up on purpose when `stop_after_s` seconds have passed since sending, or
    when `stop_when(trace)` returns true after a read (the trace's `client_closed` is then set).
    """
    payload = encode_body(body)
    head_lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Connection: close",
        "Accept: */*",
    ]
    all_headers = {"Content-Type": "application/json"} if payload else {}
    all_headers.update(headers or {})
    head_lines += [f"{name}: {value}" for name, value in all_headers.items()]
    if payload or method in ("POST", "PUT", "PATCH"):
        head_lines.append(f"Content-Length: {len(payload)}")
    wire = ("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1") + payload

    trace = Trace()
    started = time.monotonic()
    deadline = started + timeout_s
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        sock.sendall(wire)
        trace.sent_at = time.monotonic()
        stop_at = trace.sent_at + stop_after_s if stop_after_s is not None else None
        _receive(sock, trace, deadline, stop_at, stop_when)
    except ProtocolError as exc:
        trace.error = f"protocol: {exc}"
    except OSError as exc:  # resets, timeouts
        trace.error = f"{type(exc).__name__}: {exc}"
    finally:
        if trace.sent_at:
            trace.ended_at_s = time.monotonic() - trace.sent_at
        sock.close()
        if trace.client_closed:
            trace.client_closed_at = time.monotonic()
            trace.client_closed_wall = time.time()
    return trace


def _receive(sock: socket.socket, trace: Trace, deadline: float, stop_at, stop_when) -> None:
    buffered = b""
    decoder: ChunkedDecoder | None = None
    content_length: int | None = None
    body = bytearray()
    while True:
        now = time.monotonic()
        wait = deadline - now
        if stop_at is not None:
            if now >= stop_at:
                trace.client_closed = True
                return
            wait = min(wait, stop_at - now)
        if wait <= 0:
            trace.error = "timeout: the response did not finish in time"
            return
        sock.settimeout(wait)
        try:
            raw = sock.recv(RECV_SIZE)
        except TimeoutError:
            continue  # the loop head decides: deadline (error) or stop_at (client closes)
        at_s = time.monotonic() - trace.sent_at
        if not raw:
            if trace.headers_at_s is None:
                trace.error = "closed before the end of the headers"
            elif decoder is None and content_length is None:
                trace.complete = True  # body delimited by the close
            return
        if trace.headers_at_s is None:
            buffered += raw
            end = buffered.find(b"\r\n\r\n")
            if end < 0:
                continue
            trace.status, trace.reason, trace.headers = _parse_head(buffered[:end])
            trace.headers_at_s = at_s
            raw = buffered[end + 4 :]
            trace.chunked = "chunked" in trace.headers.get("transfer-encoding", "").lower()
            if trace.chunked:
                decoder = ChunkedDecoder()
            elif "content-length" in trace.headers:
                content_length = int(trace.headers["content-length"])
            if not raw:
                if content_length == 0:
                    trace.complete = True
                    return
                continue
        data = decoder.feed(raw) if decoder is not None else raw
        body += data
        trace.body = bytes(body)
        trace.reads.append(Read(at_s=at_s, raw_bytes=len(raw), data=data))
        if decoder is not None and decoder.done:
            trace.complete = True
            return
        if content_length is not None and len(body) >= content_length:
            trace.complete = True
            return
        if stop_when is not None and stop_when(trace):
            trace.client_closed = True
            return


# --- verdicts --------------------------------------------------------------------------------


def data_reads(trace: Trace) -> list[Read]:
    """The reads that carried body payload (framing-only reads do not count)."""
    return [read for read in trace.reads if read.data]


def separate_reads(trace: Trace) -> int:
    return len(data_reads(trace))


def arrival_span_s(trace: Trace) -> float:
    """Seconds between the first and the last read that carried payload."""
    reads = data_reads(trace)
    return reads[-1].at_s - reads[0].at_s if reads else 0.0


def first_byte_s(trace: Trace) -> float | None:
    """Seconds from sending the request to the first payload byte."""
    reads = data_reads(trace)
    return reads[0].at_s if reads else None


def longest_gap_s(trace: Trace) -> float:
    """Longest silence between two reads that carried payload."""
    times = [read.at_s for read in data_reads(trace)]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def streaming_verdict(trace: Trace, *, min_reads: int, min_span_s: float) -> str:
    """STREAMED when the payload came in at least `min_reads` separate reads spread over at
    least `min_span_s` seconds, else BUFFERED (held back somewhere and delivered in bursts)."""
    if separate_reads(trace) >= min_reads and arrival_span_s(trace) >= min_span_s:
        return STREAMED
    return BUFFERED


def summarize(trace: Trace) -> dict:
    first = first_byte_s(trace)
    return {
        "separate_reads": separate_reads(trace),
        "arrival_span_s": round(arrival_span_s(trace), 4),
        "first_byte_s": round(first, 4) if first is not None else None,
        "longest_gap_s": round(longest_gap_s(trace), 4),
        "body_bytes": len(trace.body),
    }


def standalone_program() -> str:
    """This file as one `python3 -c` program for a host without the streamgate package: the
    doctor's probe module (standard library only) is registered under its import name first."""
    modules = ("streamgate", "streamgate.doctor", "streamgate.doctor.probe")
    return "\n".join(
        [
            "import sys, types",
            f"for name in {modules!r}:",
            "    sys.modules[name] = types.ModuleType(name)",
            "sys.modules['streamgate'].doctor = sys.modules['streamgate.doctor']",
            "sys.modules['streamgate.doctor'].probe = sys.modules['streamgate.doctor.probe']",
            f"exec(compile({Path(doctor_probe.__file__).read_text()!r}, 'probe.py', 'exec'),"
            " sys.modules['streamgate.doctor.probe'].__dict__)",
            f"exec(compile({Path(__file__).read_text()!r}, 'stream_probe.py', 'exec'))",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://host:port/path")
    parser.add_argument("--body", default=None, help="JSON request body (POST); none = GET")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for the whole exchange"
    )
    parser.add_argument("--cafile", help="https: trust this CA file (default: the system store)")
    args = parser.parse_args(argv)
    url = urllib.parse.urlsplit(args.url)
    if url.scheme not in ("http", "https"):
        parser.error("only http:// and https:// URLs (the probe speaks HTTP/1.1)")
    tls = ssl.create_default_context(cafile=args.cafile) if url.scheme == "https" else None
    headers = {
        name.strip(): value.strip() for name, _, value in (h.partition(":") for h in args.header)
    }
    trace = request(
        url.hostname or "127.0.0.1",
        url.port or (443 if tls else 80),
        (url.path or "/") + (f"?{url.query}" if url.query else ""),
        json.loads(args.body) if args.body is not None else None,
        method="POST" if args.body is not None else "GET",
        headers=headers,
        timeout_s=args.timeout,
        tls=tls,
    )
    json.dump(trace.to_json(), sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")
    return 0 if trace.status and not trace.error else 1


if __name__ == "__main__":
    sys.exit(main())
