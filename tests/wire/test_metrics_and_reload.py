"""Operations on the wire, with real gunicorn: /metrics counts what really happened, a HUP
reload keeps in-flight streams whole and applies the changed env file, and an egress proxy in
the environment makes the gateway relay through it (STREAMGATE_UPSTREAM_TRANSPORT=auto takes
the SDK's transport), with the same exactness, timeouts and disconnect cancel as direct.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.metrics import MetricWrapperBase
from streamgate import metrics as gateway_metrics
from streamgate.simulator.script import expected_text, expected_tokens
from support import chat, services, stream_probe
from support.procs import wait_until

from wire.test_disconnect import CANCEL_WITHIN_S, cancel_record

ROUTE_LABELS = {chat.TEXT: "stream", chat.SSE: "stream-sse", chat.OPENAI: "completions"}
# A different length per route, so tokens counted under the wrong route would show.
TOKENS_BY_ROUTE = {chat.TEXT: 7, chat.SSE: 11, chat.OPENAI: 13}
HANG_UP_AFTER_READS = 5


def stream(service, route: str, **body) -> tuple[stream_probe.Trace, chat.Relay]:
    trace = chat.request(service, route, chat.body(route, **body), timeout_s=20)
    return trace, chat.decode(route, trace)


# --- /metrics ------------------------------------------------------------------------------


def value(scraped: dict, name: str, **labels: str) -> float:
    """A series' value; a missing series fails (services.sample), it never reads as 0."""
    return services.sample(scraped, name, **labels)


# The sample names each metric type exposes (prometheus_client's text format).
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_count", "_sum")}


def gateway_metric(name: str) -> MetricWrapperBase:
    """The gateway's metric (streamgate.metrics) that exposes the series `name`."""
    for metric in vars(gateway_metrics).values():
        if isinstance(metric, MetricWrapperBase):
            family = metric.describe()[0]
            if name in {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}:
                return metric
    raise AssertionError(f"streamgate.metrics defines no series {name}")


def moved(after: dict, before: dict, name: str, **labels: str) -> float:
    """A counter's increase. A labelled counter appears on first use, so a series absent from
    both scrapes has counted nothing yet, provided the gateway defines it with these labels: a
    renamed metric or label must fail here, not read as 'did not move'."""
    key = (name, frozenset(labels.items()))
    if key not in after and key not in before:
        metric = gateway_metric(name)
        if labels:
            metric.labels(**labels)  # ValueError unless these are exactly its label names
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def metrics_gateway(gateway_factory, simulator):
    """Its own gateway (two workers: /metrics must sum them), so no other test's traffic counts."""
    gateway = gateway_factory(simulator, workers=2)
    yield gateway
    gateway.stop()


def test_metrics_count_the_streams_errors_and_hang_ups_that_happened(metrics_gateway):
    gateway = metrics_gateway
    before = gateway.metrics()
    for route, tokens in TOKENS_BY_ROUTE.items():
        trace, relay = stream(gateway, route, max_tokens=tokens)
        assert relay.ended_properly and relay.content == expected_text(tokens), trace.error
    invalid = chat.request(gateway, chat.SSE, {"prompt": ""})
    assert invalid.status == 400
    fault, _ = stream(gateway, chat.SSE, model="sim-fault-500")
    assert fault.status == 502
    streamed = gateway.metrics()

    for route, tokens in TOKENS_BY_ROUTE.items():
        label = ROUTE_LABELS[route]
        assert (
            moved(streamed, before, "streamgate_requests_total", route=label, status="200") == 1
        ), label
        assert moved(streamed, before, "streamgate_tokens_relayed_total", route=label) == tokens
        assert moved(streamed, before, "streamgate_ttft_seconds_count", route=label) == 1, label
    for name, labels, expected in [
        ("streamgate_requests_total", {"route": "stream-sse", "status": "400"}, 1),
        ("streamgate_requests_total", {"route": "stream-sse", "status": "502"}, 1),
        ("streamgate_upstream_errors_total", {"kind": "status_500"}, 1),
        # Negative controls: what did not happen did not move.
        ("streamgate_requests_total", {"route": "completions", "status": "502"}, 0),
        ("streamgate_upstream_errors_total", {"kind": "timeout"}, 0),
        ("streamgate_client_disconnects_total", {"route": "stream", "phase": "streaming"}, 0),
    ]:
        assert moved(streamed, before, name, **labels) == expected, (name, labels)
    assert moved(streamed, before, "streamgate_inter_chunk_gap_seconds_count") > 0
    assert moved(streamed, before, "streamgate_inter_chunk_gap_seconds_sum") > 0
    assert value(streamed, "streamgate_active_streams") == 0

    # A client that hangs up mid-stream: the gauge shows its stream while it runs, the
    # disconnect is counted once the gateway notices, and the gauge returns to 0.
    active_while_streaming = []

    def hang_up(trace):
        if stream_probe.separate_reads(trace) < HANG_UP_AFTER_READS:
            return False
        active_while_streaming.append(value(gateway.metrics(), "streamgate_active_streams"))
        return True

    hung_up = chat.request(
        gateway,
        chat.TEXT,
        timeout_s=20,
        stop_when=hang_up,
    )
    assert hung_up.client_closed, hung_up.error
    assert active_while_streaming == [1]

    def hang_up_counted():
        scraped = gateway.metrics()
        counted = moved(
            scraped,
            streamed,
            "streamgate_client_disconnects_total",
            route="stream",
            phase="streaming",
        )
        # The request itself is counted when the endpoint returns, a moment after the relay
        # noticed the hang-up: wait for both, then check each moved exactly once.
        finished = moved(
            scraped, streamed, "streamgate_requests_total", route="stream", status="200"
        )
        idle = value(scraped, "streamgate_active_streams") == 0
        return scraped if counted and finished and idle else None

    after = wait_until(
        hang_up_counted, timeout_s=5, what="the hang-up and its request to be counted"
    )
    for name, labels, expected in [
        ("streamgate_client_disconnects_total", {"route": "stream", "phase": "streaming"}, 1),
        ("streamgate_client_disconnects_total", {"route": "stream", "phase": "first_token"}, 0),
        ("streamgate_requests_total", {"route": "stream", "status": "200"}, 1),
    ]:
        assert moved(after, streamed, name, **labels) == expected, (name, labels)
    relayed = moved(after, streamed, "streamgate_tokens_relayed_total", route="stream")
    assert HANG_UP_AFTER_READS <= relayed < 50, relayed  # what it relayed before it stopped


# --- graceful reload -----------------------------------------------------------------------


def workers_started(service) -> list[dict]:
    """The `worker_started` log events of a gateway so far."""
    return [
        json.loads(line)
        for line in service.process.log_path.read_text().splitlines()
        if line.startswith('{"event":"worker_started"')
    ]


def default_model(service) -> str:
    """The model the upstream was asked for when the request names none (the simulator echoes
    it): STREAMGATE_DEFAULT_MODEL as the worker that answered has it."""
    request = urllib.request.Request(
        f"{service.base_url}/v1/chat/completions",
        data=json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["model"]


def test_hup_reload_finishes_in_flight_streams_and_applies_the_env_file(
    gateway_factory, simulator, tmp_path
):
    env_file = tmp_path / "streamgate.env"
    env_file.write_text("STREAMGATE_DEFAULT_MODEL=model-before-reload\n")
    gateway = gateway_factory(simulator, workers=2, env_file=env_file)
    try:
        # Ready means one worker answers; each worker reads the file when it boots, so all
        # must be up before the file changes.
        wait_until(
            lambda: len(workers_started(gateway)) == 2, timeout_s=20, what="both workers to start"
        )
        assert default_model(gateway) == "model-before-reload"
        tokens = 100  # 2 s at 20 ms a token: in flight across the reload
        finished: dict[str, stream_probe.Trace] = {}
        in_flight = threading.Thread(
            target=lambda: finished.update(
                trace=chat.request(
                    gateway,
                    chat.SSE,
                    chat.body(chat.SSE, max_tokens=tokens),
                    timeout_s=30,
                )
            )
        )
        in_flight.start()
        wait_until(
            lambda: simulator.stats()["active"] >= 1, timeout_s=5, what="the stream to be in flight"
        )

        env_file.write_text("STREAMGATE_DEFAULT_MODEL=model-after-reload\n")
        # Negative control: a changed file alone changes nothing; the reload applies it.
        assert default_model(gateway) == "model-before-reload"
        os.kill(gateway.process.pid, signal.SIGHUP)  # the gunicorn master (our child)
        hup_at = time.monotonic()
        wait_until(
            lambda: default_model(gateway) == "model-after-reload",
            timeout_s=20,
            interval_s=0.1,
            what="new workers with the changed env file",
        )
        assert {default_model(gateway) for _ in range(6)} == {"model-after-reload"}

        in_flight.join(timeout=30)
        trace = finished["trace"]
        relay = chat.decode(chat.SSE, trace)
        assert trace.sent_at < hup_at < trace.sent_at + trace.ended_at_s, "not across the HUP"
        assert relay.ended_properly, (trace.error, relay.error)
        assert relay.texts == expected_tokens(tokens)
        assert gateway.process.is_running()
    finally:
        gateway.stop()


# --- through an egress proxy ---------------------------------------------------------------


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass


class ForwardProxy:
    """A minimal HTTP forward proxy in a thread, standing in for an estate's egress proxy.

    Takes absolute-form requests (what clients send a proxy for http:// URLs), one per
    connection, records their heads, and closes the upstream side as soon as the client's
    side closes, as real proxies do (so a client's hang-up still reaches the LLM server).
    """

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ForwardProxy:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop
        ).result(timeout=5)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def saw(self, text: str) -> bool:
        return any(text.encode() in head for head in list(self.heads))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, _, fields = head.partition(b"\r\n")
            method, target, version = request_line.split(b" ")
            url = urllib.parse.urlsplit(target.decode("latin-1"))
            self.heads.append(head)
            kept = [
                field
                for field in fields.split(b"\r\n")
                if field
                and not field.lower().startswith(
                    (b"connection:", b"proxy-connection:", b"keep-alive:")
                )
            ]
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            upstream_reader, upstream_writer = await asyncio.open_connection(
                url.hostname, url.port or 80
            )
            upstream_writer.write(
                b"\r\n".join(
                    [
                        b" ".join([method, path.encode(), version]),
                        *kept,
                        b"Connection: close",
                        b"",
                        b"",
                    ]
                )
            )
            pipes = [
                asyncio.ensure_future(_pipe(reader, upstream_writer)),
                asyncio.ensure_future(_pipe(upstream_reader, writer)),
            ]
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            for side in (writer, upstream_writer):
                if side is not None:
                    side.close()


@pytest.fixture(scope="module")
def proxy():
    forward_proxy = ForwardProxy().start()
    yield forward_proxy
    forward_proxy.stop()


FIRST_TOKEN_TIMEOUT_S = 1.0
TOKEN_GAP_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def proxied_gateway(gateway_factory, simulator, proxy):
    """Default transport setting (auto), with HTTP_PROXY in the gateway's environment only
    (this test process must not start using the proxy itself)."""
    plain_environment = services.clean_environ

    def with_proxy() -> dict[str, str]:
        environment = {
            name: value
            for name, value in plain_environment().items()
            if name.lower() not in ("http_proxy", "all_proxy", "no_proxy")
        }
        return {**environment, "HTTP_PROXY": proxy.url}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(services, "clean_environ", with_proxy)
        gateway = gateway_factory(
            simulator,
            workers=1,
            upstream_retries=0,
            first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S,
            token_gap_timeout_s=TOKEN_GAP_TIMEOUT_S,
        )
    yield gateway
    gateway.stop()


def test_auto_takes_the_sdk_transport_when_a_proxy_applies_and_logs_it(proxied_gateway, proxy):
    started = workers_started(proxied_gateway)
    assert started, proxied_gateway.describe()
    assert {entry["upstream_transport"] for entry in started} == {"sdk"}
    assert proxy.url in started[0]["upstream_transport_reason"]


def test_default_gateway_logs_the_lean_transport(gateway):
    """Negative control: without a proxy, auto stays on the lean transport."""
    log = gateway.process.log_path.read_text()
    assert '"upstream_transport":"lean"' in log and '"upstream_transport":"sdk"' not in log


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_every_token_arrives_exactly_through_the_proxy(proxied_gateway, proxy, route):
    request_id, trace = chat.tagged_request(
        proxied_gateway,
        route,
        tag="wire-proxy",
        timeout_s=20,
    )
    relay = chat.decode(route, trace)
    assert trace.status == 200 and relay.ended_properly, (trace.status, trace.error, relay.error)
    assert relay.content == expected_text(50)
    if route != chat.TEXT:
        assert relay.texts == expected_tokens(50)
    assert stream_probe.separate_reads(trace) >= 45  # still word by word
    assert proxy.saw(request_id), "the request did not go through the proxy"


def test_non_streamed_completion_through_the_proxy(proxied_gateway, proxy):
    assert default_model(proxied_gateway) == "gpt-4o-mini"
    assert proxy.saw("/v1/chat/completions")


# (request body extras, how the client hangs up)
HANG_UPS = {
    "mid-stream": (
        {},
        {"stop_when": lambda t: stream_probe.separate_reads(t) >= HANG_UP_AFTER_READS},
    ),
    "before-first-token": ({"model": "sim-fault-stall-first"}, {"stop_after_s": 0.4}),
}


@pytest.mark.parametrize("when", list(HANG_UPS))
def test_hanging_up_through_the_proxy_cancels_the_upstream(proxied_gateway, simulator, when):
    body, hang_up = HANG_UPS[when]
    request_id, trace = chat.tagged_request(
        proxied_gateway,
        chat.SSE,
        chat.body(chat.SSE, **body),
        tag="wire-proxy-hangup",
        timeout_s=10,
        **hang_up,
    )
    assert trace.client_closed and not trace.error, (trace.status, trace.error)
    cancel = cancel_record(simulator, request_id)
    if when == "mid-stream":
        assert 0 < cancel["tokens_sent"] < simulator.tokens, cancel
    else:
        assert cancel["tokens_sent"] == 0, cancel
    assert cancel["at"] - trace.client_closed_wall <= CANCEL_WITHIN_S, cancel


def test_timeouts_through_the_proxy(proxied_gateway):
    before = proxied_gateway.metrics()
    stalled_first, _ = stream(proxied_gateway, chat.SSE, model="sim-fault-stall-first")
    assert stalled_first.status == 504, (stalled_first.status, stalled_first.body[:200])
    assert (
        FIRST_TOKEN_TIMEOUT_S - 0.05 <= stalled_first.headers_at_s <= FIRST_TOKEN_TIMEOUT_S + 1.5
    ), stalled_first.headers_at_s

    stalled_mid, relay = stream(
        proxied_gateway, chat.SSE, model="sim-fault-stall-midstream", max_tokens=10
    )
    assert stalled_mid.status == 200 and relay.content == expected_text(5)
    assert isinstance(relay.error, dict), relay.error
    assert "gap between tokens" in relay.error["error"]["message"], relay.error
    silence_s = stalled_mid.ended_at_s - relay.deltas[-1].at_s
    assert TOKEN_GAP_TIMEOUT_S - 0.05 <= silence_s <= TOKEN_GAP_TIMEOUT_S + 1.5, silence_s

    after = proxied_gateway.metrics()
    for name, labels, expected in [
        ("streamgate_upstream_errors_total", {"kind": "timeout"}, 2),
        # The clients stayed to the end: neither answer may count as a hang-up.
        ("streamgate_client_disconnects_total", {"route": "stream-sse", "phase": "first_token"}, 0),
        ("streamgate_client_disconnects_total", {"route": "stream-sse", "phase": "streaming"}, 0),
    ]:
        assert moved(after, before, name, **labels) == expected, (name, labels)
