"""The three chat routes as a client sees them: request bodies, and what a trace says.

One decoder per framing (plain text, SSE, OpenAI chunks) turns a wire trace into the same
`Relay`: the deltas in order, the in-band error if any, and whether the stream ended properly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from streamgate.formats import CHAT_ROUTES, OPENAI, SSE, TEXT

from support import sse, stream_probe
from support.stream_probe import Trace

# Format name -> path, from the service's one route table.
ROUTES = {route.format.name: route.path for route in CHAT_ROUTES}
PROMPT = "Say something worth streaming."


def body(route: str, *, max_tokens: int | None = None, model: str | None = None, **extra) -> dict:
    """A request body for `route`; `model` picks a simulator fault (sim-fault-<kind>)."""
    if route == OPENAI:
        payload: dict = {"messages": [{"role": "user", "content": PROMPT}], "stream": True}
    else:
        payload = {"prompt": PROMPT}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if model is not None:
        payload["model"] = model
    payload.update(extra)
    return payload


def request(
    target,
    route: str,
    payload: dict | bytes | None = None,
    *,
    client=stream_probe.request,
    **options,
) -> Trace:
    """One request of `route` to a service on loopback (a gateway, nginx: anything with a `port`)
    with `payload` or else the route's own body; `client` is stream_probe.request (HTTP/1.1) or
    h2_probe.request, `options` its own (headers, timeout_s, stop_when, tls, ...)."""
    sent = body(route) if payload is None else payload
    return client("127.0.0.1", target.port, ROUTES[route], sent, **options)


def tagged_request(
    target, route: str, payload: dict | bytes | None = None, *, tag: str, **options
) -> tuple[str, Trace]:
    """request() with an X-Request-ID of its own, `tag`-<12 hex digits>, by which the
    simulator's and the gateway's records of it are found: (that id, the trace)."""
    request_id = f"{tag}-{uuid.uuid4().hex[:12]}"
    trace = request(target, route, payload, headers={"X-Request-ID": request_id}, **options)
    return request_id, trace


@dataclass
class TimedDelta:
    at_s: float
    text: str


@dataclass
class Relay:
    deltas: list[TimedDelta] = field(default_factory=list)
    error: object = None  # the in-band error payload, when the stream reported one
    ended_properly: bool = False  # the route's own end marker arrived and no error
    done_marker: bool = False  # SSE `event: done` / OpenAI `data: [DONE]` seen
    usage: dict | None = None
    comments: list[str] = field(default_factory=list)
    unparsed: str = ""  # framing left over after the last complete event

    @property
    def content(self) -> str:
        return "".join(delta.text for delta in self.deltas)

    @property
    def texts(self) -> list[str]:
        return [delta.text for delta in self.deltas]


def decode(route: str, trace: Trace) -> Relay:
    if route == TEXT:
        return _decode_text(trace)
    return _decode_events(trace, {SSE: _take_sse, OPENAI: _take_openai}[route])


def _decode_text(trace: Trace) -> Relay:
    relay = Relay()
    received = b""
    shown = 0
    for read in trace.reads:
        if not read.data:
            continue
        received += read.data
        # A read may end inside a multi-byte character: show only what is complete.
        text = received.decode("utf-8", "ignore")
        if len(text) > shown:
            relay.deltas.append(TimedDelta(read.at_s, text[shown:]))
            shown = len(text)
    relay.ended_properly = trace.complete
    return relay


def timed_events(trace: Trace) -> tuple[list[tuple[float, sse.Event]], sse.Stream]:
    """SSE events, each with the time of the read that completed it."""
    timed: list[tuple[float, sse.Event]] = []
    parser = sse.Parser()
    for read in trace.reads:
        timed += [(read.at_s, event) for event in parser.feed(read.data)]
    events = [event for _, event in timed]
    return timed, sse.Stream(events, parser.comments, parser.unterminated)


def _decode_events(trace: Trace, take: Callable[[Relay, float, sse.Event], None]) -> Relay:
    """An event framing: `take` reads each event into the relay, at the time it completed."""
    relay = Relay()
    timed, stream = timed_events(trace)
    relay.comments, relay.unparsed = stream.comments, stream.unterminated
    for at_s, event in timed:
        take(relay, at_s, event)
    relay.ended_properly = trace.complete and relay.done_marker and relay.error is None
    return relay


def _take_sse(relay: Relay, at_s: float, event: sse.Event) -> None:
    if event.event == "message":
        relay.deltas.append(TimedDelta(at_s, _sse_content(event.data)))
    elif event.event == "error":
        relay.error = _json_or_text(event.data)
    elif event.event == "done":
        relay.done_marker = True
        payload = _json_or_text(event.data)
        if isinstance(payload, dict):
            relay.usage = payload.get("usage")


def _take_openai(relay: Relay, at_s: float, event: sse.Event) -> None:
    if event.data == "[DONE]":
        relay.done_marker = True
        return
    chunk = json.loads(event.data)
    if "error" in chunk:
        relay.error = chunk["error"]
        return
    if chunk.get("usage"):
        relay.usage = chunk["usage"]
    for choice in chunk.get("choices", []):
        content = (choice.get("delta") or {}).get("content")
        if content:
            relay.deltas.append(TimedDelta(at_s, content))


def _sse_content(data: str) -> str:
    """The gateway's SSE deltas are `{"content": ...}` (JSON keeps CR and LF exact)."""
    payload = _json_or_text(data)
    if isinstance(payload, dict) and isinstance(payload.get("content"), str):
        return payload["content"]
    return data


def _json_or_text(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return data


def json_body(trace: Trace) -> dict:
    """The JSON object of a non-streamed (error) answer; fails loudly when it is not one."""
    assert "application/json" in trace.headers.get("content-type", ""), trace.headers
    payload = json.loads(trace.body)
    assert isinstance(payload, dict), payload
    return payload


# How a 200 stream ended, as the client can tell (see ending()).
CLEAN_END = "clean end"
ABORTED = "aborted"
TERMINATED_EARLY = "terminated without the route's end"
DONE_WITHOUT_TERMINATOR = "end marker without the terminating chunk"


def ending(route: str, trace: Trace, relay: Relay | None = None) -> str:
    """How a stream ended, from the client's side of the wire.

    CLEAN_END: the terminating zero-length chunk arrived and the route's own end (SSE
    `event: done`, OpenAI `data: [DONE]`) with no in-band error; plain text has no end marker of
    its own, so there the terminating chunk alone is a clean end. ABORTED: the connection ended
    (closed or reset) before the terminating chunk and before any end marker: what a client must
    see when the server side died mid-stream. TERMINATED_EARLY: the terminating chunk came, the
    route's end marker did not (or an in-band error did): HTTP calls it finished, the framing
    says the answer is short. Anything that is not a 200 is named by its status. `relay`:
    decode(route, trace) when the caller has it already.
    """
    if trace.status != 200:
        return f"status {trace.status}"
    relay = relay if relay is not None else decode(route, trace)
    if relay.ended_properly:
        return CLEAN_END
    if trace.complete:
        return TERMINATED_EARLY
    if relay.done_marker:
        return DONE_WITHOUT_TERMINATOR
    return ABORTED
