"""Watch one HTTP/2 response arrive on the wire: every TLS read after the request, with its time.

The HTTP/2 counterpart of stream_probe.request (same Trace, same verdicts): one request on a
fresh TLS connection that negotiated `h2` by ALPN, driven by the h2 state machine directly so
nothing re-chunks what arrives. A read is one recv() of the TLS socket (at most one record);
the DATA frames it carried for our stream are its payload. Framing-only reads (SETTINGS, PING,
WINDOW_UPDATE, HEADERS) carry none and do not count.
"""

from __future__ import annotations

import socket
import ssl
import time

import h2.config
import h2.connection
import h2.events

from support.stream_probe import RECV_SIZE, Read, Trace, encode_body


class NotHTTP2(Exception):
    pass


def request(
    host: str,
    port: int,
    path: str,
    body: object | bytes | None = None,
    *,
    tls: ssl.SSLContext,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Trace:
    """Send one request over HTTP/2 (TLS, ALPN h2) and record how the answer arrives.
    Raises NotHTTP2 when the server does not choose h2. `timeout_s` bounds the exchange."""
    payload = encode_body(body)
    tls.set_alpn_protocols(["h2"])
    trace = Trace()
    deadline = time.monotonic() + timeout_s
    raw_sock = socket.create_connection((host, port), timeout=timeout_s)
    raw_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with tls.wrap_socket(raw_sock, server_hostname=host) as sock:
        if sock.selected_alpn_protocol() != "h2":
            raise NotHTTP2(f"server chose {sock.selected_alpn_protocol()!r}, not h2")
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        request_headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", f"{host}:{port}"),
            (":path", path),
            ("accept", "*/*"),
        ]
        if payload:
            request_headers += [
                ("content-type", "application/json"),
                ("content-length", str(len(payload))),
            ]
        request_headers += [(name.lower(), value) for name, value in (headers or {}).items()]
        conn.send_headers(stream_id, request_headers, end_stream=not payload)
        if payload:
            conn.send_data(stream_id, payload, end_stream=True)
        sock.sendall(conn.data_to_send())
        trace.sent_at = time.monotonic()
        body_so_far = bytearray()
        try:
            while not trace.complete and not trace.error:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    trace.error = "timeout: the response did not finish in time"
                    break
                sock.settimeout(wait)
                raw = sock.recv(RECV_SIZE)
                at_s = time.monotonic() - trace.sent_at
                if not raw:
                    trace.error = "connection closed before the stream ended"
                    break
                data = bytearray()
                for event in conn.receive_data(raw):
                    if getattr(event, "stream_id", stream_id) != stream_id:
                        continue
                    if isinstance(event, h2.events.ResponseReceived):
                        fields = dict(event.headers)
                        trace.status = int(fields.pop(":status"))
                        trace.headers = fields
                        trace.headers_at_s = at_s
                    elif isinstance(event, h2.events.DataReceived):
                        data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        trace.complete = True
                    elif isinstance(event, h2.events.StreamReset):
                        trace.error = f"stream reset by the server (code {event.error_code})"
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        trace.error = f"GOAWAY (code {event.error_code})"
                if data:
                    body_so_far += data
                    trace.body = bytes(body_so_far)
                    trace.reads.append(Read(at_s=at_s, raw_bytes=len(raw), data=bytes(data)))
                outgoing = conn.data_to_send()
                if outgoing:
                    sock.sendall(outgoing)
        except OSError as exc:
            trace.error = f"{type(exc).__name__}: {exc}"
        finally:
            trace.ended_at_s = time.monotonic() - trace.sent_at
    return trace
