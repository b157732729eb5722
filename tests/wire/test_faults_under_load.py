"""Faults under load, each with the exact result its clients see, and nothing left held after.

Real gunicorn (two workers), the real simulator, a local nginx rendered from the templates;
tens of concurrent streams over the three routes:

- a gateway worker killed (SIGKILL) mid-stream: the streams it held are aborted where the client
  can see it (no terminating chunk, no end marker), directly and through nginx; the other
  worker's streams end whole; gunicorn replaces the worker and new streams succeed within a
  bound. Which worker held which stream: the simulator lists each answer in flight with the
  port of its connection, and psutil names the worker process that owns that port;
- upstream faults (429, 500, stalls, an error or a close mid-stream) on a share of the streams:
  each faulted stream gets the form tests/wire/test_faults.py defines for one request, the
  others end whole;
- clients that stop reading next to clients that read: the readers' streams end whole, the
  silent ones are cut after the send timeout and their upstreams released, memory stays bounded;
- an nginx reload with a short worker_shutdown_timeout: streams shorter than it end whole, a
  longer one is cut at it and its client sees an aborted response, never a clean-looking end.

After each: leaks() finds nothing held (the gateway's active-stream gauge, the simulator's
answers in flight, the workers' connections to the simulator beyond an idle pool). Each
detector has its negative control here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import psutil
import pytest
from streamgate.simulator.script import expected_text, expected_tokens
from support import chat, services, stream_probe
from support.procs import wait_until

from wire.test_client_deadlines import cancelled, connect, logged, request_bytes
from wire.test_faults import (
    BEFORE_FIRST_BYTE,
    FAULT_SETTINGS,
    MID_STREAM,
    TOKENS,
    check_failed_before_the_first_byte,
    check_failed_in_band,
)
from wire.test_harness import ScriptedServer, chunk
from wire.test_metrics_and_reload import workers_started

ROUTES = list(chat.ROUTES)
# Long enough that a worker is killed well inside every stream (2 s at 20 ms a token).
LONG_TOKENS = 100
KILL_STREAMS = 24
# Each client has had this many reads with text when the worker is killed.
TOKENS_BEFORE_THE_KILL = 5
SHORT_TOKENS = 10
NEW_STREAMS = 12
# From the kill: a new stream succeeds, and gunicorn's replacement worker has started.
NEW_STREAM_WITHIN_S = 5.0
REPLACED_WITHIN_S = 10.0
# Everything a stream held is released within this (the gauge, the upstream request, its socket).
RELEASE_WITHIN_S = 10.0
IN_FLIGHT_WITHIN_S = 10.0
CLIENT_TIMEOUT_S = 30.0

# Per route: clean streams beside one stream of each fault (36 streams in all).
CLEAN_PER_ROUTE = 6
CLEAN_TOKENS = 60
FAULT_MIX = [None] * CLEAN_PER_ROUTE + list(BEFORE_FIRST_BYTE) + MID_STREAM
# Faults whose upstream answer still ends whole (its connection may be pooled afterwards).
ENDS_WHOLE_UPSTREAM = {"429", "500", "error-midstream"}


# --- streams in flight ---------------------------------------------------------------------


@dataclass
class Planned:
    """One client stream: what it asks for, and the trace of what it got."""

    route: str
    body: dict
    fault: str | None = None
    request_id: str = field(default_factory=lambda: f"wire-load-{uuid.uuid4().hex[:12]}")
    trace: stream_probe.Trace | None = None
    payload_reads: int = 0  # reads with body bytes so far, while it runs

    def note(self, trace: stream_probe.Trace) -> bool:
        """The probe's stop_when hook: counts what arrived, never stops the stream."""
        self.payload_reads = stream_probe.separate_reads(trace)
        return False

    @property
    def tokens(self) -> int:
        return self.body["max_tokens"]

    def describe(self) -> str:
        trace = self.trace
        state = (
            "not run"
            if trace is None
            else (
                f"status {trace.status}, complete {trace.complete}, error {trace.error!r}, "
                f"{len(trace.body)} body bytes"
            )
        )
        return f"{self.route} {self.request_id} fault={self.fault}: {state}"


def plan(route: str, tokens: int, fault: str | None = None) -> Planned:
    model = f"sim-fault-{fault}" if fault else None
    return Planned(route, chat.body(route, max_tokens=tokens, model=model), fault)


class Load:
    """Streams run concurrently, one thread each, every one bounded by its own timeout."""

    def __init__(
        self, port: int, streams: list[Planned], *, timeout_s: float = CLIENT_TIMEOUT_S
    ) -> None:
        self.streams = streams
        self.timeout_s = timeout_s
        self.threads = [
            threading.Thread(target=self._run, args=(port, s), daemon=True) for s in streams
        ]

    def _run(self, port: int, stream: Planned) -> None:
        stream.trace = stream_probe.request(
            "127.0.0.1",
            port,
            chat.ROUTES[stream.route],
            stream.body,
            headers={"X-Request-ID": stream.request_id},
            timeout_s=self.timeout_s,
            stop_when=stream.note,
        )

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> list[Planned]:
        deadline = time.monotonic() + self.timeout_s + 10
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [
            s.describe() for s, t in zip(self.streams, self.threads, strict=True) if t.is_alive()
        ]
        assert not stuck, f"client threads still running: {stuck}"
        return self.streams


def in_flight(
    simulator, streams: list[Planned] | list[str], *, min_tokens: int = 1
) -> dict[str, dict]:
    """Wait until the simulator is answering every one of `streams` (or request ids) and has
    sent each at least `min_tokens`; its active_streams entries by request id."""
    wanted = {s if isinstance(s, str) else s.request_id for s in streams}

    def all_in_flight():
        listed = {s["request_id"]: s for s in simulator.stats()["active_streams"]}
        if wanted <= listed.keys() and all(listed[r]["tokens_sent"] >= min_tokens for r in wanted):
            return listed
        return None

    return wait_until(
        all_in_flight,
        timeout_s=IN_FLIGHT_WITHIN_S,
        interval_s=0.05,
        what=f"{len(streams)} streams in flight upstream",
    )


def holders(gateway, simulator, streams: list[Planned]) -> dict[str, int]:
    """request id -> pid of the gateway worker whose upstream connection carries that stream
    now (the simulator names the connection's port, psutil the process that owns it)."""
    listed = in_flight(simulator, streams)
    owner = {sock.laddr.port: pid for pid, sock in gateway.connections_to(simulator.port)}
    held = {s.request_id: owner.get(listed[s.request_id]["peer_port"]) for s in streams}
    unowned = [request_id for request_id, pid in held.items() if pid is None]
    assert not unowned, f"no worker owns the upstream connection of {unowned}"
    return held


# --- what is left held afterwards ----------------------------------------------------------


def leaks(gateway, simulator, *, idle_allowed: int) -> list[str]:
    """What the gateway still holds, from three sides; empty when nothing is.

    - its gauge streamgate_active_streams (summed over workers; a missing series fails);
    - answers the simulator is still writing (an upstream request nobody released);
    - the workers' sockets to the simulator: none half-closed (CLOSE_WAIT: the simulator closed,
      the worker never did), and no more open than `idle_allowed`, the upstream answers that
      ended whole and whose connection the pool may keep idle.
    """
    problems = []
    active = services.sample(gateway.metrics(), "streamgate_active_streams")
    if active:
        problems.append(f"gateway: streamgate_active_streams = {active:g}")
    stats = simulator.stats()
    if stats["active"]:
        ids = [entry["request_id"] for entry in stats["active_streams"]]
        problems.append(f"simulator: {stats['active']} answers still being written: {ids}")
    return problems + socket_problems(gateway.connections_to(simulator.port), idle_allowed)


def socket_problems(sockets: list[tuple[int, object]], idle_allowed: int) -> list[str]:
    """leaks() on (pid, psutil socket) pairs: half-closed ones, and more open than may idle."""
    problems = []
    half_closed = [
        (pid, sock.laddr.port, sock.status)
        for pid, sock in sockets
        if sock.status != psutil.CONN_ESTABLISHED
    ]
    if half_closed:
        problems.append(f"gateway: sockets to the simulator not closed: {half_closed}")
    established = len(sockets) - len(half_closed)
    if established > idle_allowed:
        problems.append(
            f"gateway: {established} upstream connections open, more than the "
            f"{idle_allowed} an idle pool may keep"
        )
    return problems


def open_upstream_connections(gateway, simulator) -> int:
    """The workers' established connections to the simulator (busy or idle in the pool)."""
    return sum(
        1
        for _, sock in gateway.connections_to(simulator.port)
        if sock.status == psutil.CONN_ESTABLISHED
    )


def assert_nothing_held(gateway, simulator, *, idle_allowed: int) -> None:
    found: list[str] = []

    def released() -> bool:
        found[:] = leaks(gateway, simulator, idle_allowed=idle_allowed)
        return not found

    try:
        wait_until(released, timeout_s=RELEASE_WITHIN_S, interval_s=0.1, what="release")
    except TimeoutError:
        pytest.fail(f"still held {RELEASE_WITHIN_S:g} s after the load: {found}")


# --- judging a stream ----------------------------------------------------------------------


def decoded(stream: Planned) -> tuple[chat.Relay | None, str]:
    """The stream's events (None unless it was a 200) and how it ended."""
    relay = chat.decode(stream.route, stream.trace) if stream.trace.status == 200 else None
    return relay, chat.ending(stream.route, stream.trace, relay)


def judge_whole(stream: Planned) -> str | None:
    """None when the stream ended cleanly with exactly the model's text, else why not."""
    relay, ended = decoded(stream)
    if ended != chat.CLEAN_END:
        return f"{stream.describe()}: {ended}"
    if relay.content != expected_text(stream.tokens):
        return f"{stream.describe()}: text differs ({len(relay.content)} chars)"
    if stream.route != chat.TEXT and relay.texts != expected_tokens(stream.tokens):
        return f"{stream.describe()}: token boundaries differ"
    return None


def judge_aborted(stream: Planned) -> str | None:
    """None when the stream was aborted visibly after relaying a true beginning of the text."""
    relay, ended = decoded(stream)
    if ended != chat.ABORTED:
        return f"{stream.describe()}: {ended}, not aborted"
    content = relay.content
    whole = expected_text(stream.tokens)
    if not content or len(content) >= len(whole) or not whole.startswith(content):
        return f"{stream.describe()}: relayed {content[:80]!r}, not a beginning of the answer"
    return None


def failures(judge, streams: list[Planned]) -> list[str]:
    return [verdict for stream in streams if (verdict := judge(stream)) is not None]


# --- the ending detector and its controls ---------------------------------------------------


@pytest.fixture(scope="module")
def load_simulator(simulator_factory):
    """This module's own: its /stats count only this module's streams."""
    return simulator_factory()


@pytest.fixture(scope="module")
def load_gateway(gateway_factory, load_simulator):
    """Two workers, test_faults' settings (short timeouts, no retries)."""
    return gateway_factory(load_simulator, workers=2, **FAULT_SETTINGS)


SCRIPTED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


@pytest.mark.parametrize("route", ROUTES)
def test_control_the_ending_detector_tells_a_clean_end_from_a_cut(load_gateway, route):
    """A real stream classifies as clean; the same bytes replayed without the terminating chunk
    as aborted; with the terminator but cut before the route's end marker, as terminated early
    (plain text has no end marker: there the terminator is all a client can go by)."""
    stream = plan(route, SHORT_TOKENS)
    Load(load_gateway.port, [stream]).start().join()
    assert judge_whole(stream) is None, judge_whole(stream)
    body = stream.trace.body
    half = body[: len(body) // 2]

    def ending_of(wire: bytes) -> str:
        with ScriptedServer([(0.0, SCRIPTED_HEAD + wire)]) as server:
            trace = stream_probe.request("127.0.0.1", server.port, "/", {}, timeout_s=10)
        return chat.ending(route, trace)

    assert ending_of(chunk(body) + LAST_CHUNK) == chat.CLEAN_END
    assert ending_of(chunk(half)) == chat.ABORTED
    assert ending_of(chunk(half) + LAST_CHUNK) == (
        chat.CLEAN_END if route == chat.TEXT else chat.TERMINATED_EARLY
    )


def test_control_a_plain_text_stream_the_gateway_cuts_is_aborted(load_gateway):
    """The real service's own cut (the upstream closed mid-stream; plain text has no in-band
    error) classifies as aborted."""
    stream = plan(chat.TEXT, SHORT_TOKENS, "close-midstream")
    Load(load_gateway.port, [stream]).start().join()
    assert chat.ending(chat.TEXT, stream.trace) == chat.ABORTED


# --- a gateway worker killed mid-stream ----------------------------------------------------


def first_clean_stream(port: int, started: float, within_s: float) -> tuple[float, list[str]]:
    """Short streams one after another until one ends clean: (seconds from `started`, the
    failures before it)."""
    failed: list[str] = []
    while time.monotonic() - started < within_s:
        probe = plan(chat.OPENAI, SHORT_TOKENS)
        Load(port, [probe], timeout_s=5).start().join()
        verdict = judge_whole(probe)
        if verdict is None:
            return time.monotonic() - started, failed
        failed.append(verdict)
        time.sleep(0.05)
    pytest.fail(f"no new stream succeeded within {within_s:g} s of the kill: {failed}")


@pytest.mark.parametrize("path", ["direct", "nginx"])
def test_a_worker_killed_mid_stream_aborts_its_own_streams_only(
    gateway_factory, nginx_factory, load_simulator, path, capsys
):
    gateway = gateway_factory(load_simulator, workers=2)
    proxy = None
    try:
        # Ready means one worker answers: both must, or one would take every stream.
        wait_until(
            lambda: len(workers_started(gateway)) == 2, timeout_s=20, what="both workers to start"
        )
        target = gateway
        if path == "nginx":
            proxy = target = nginx_factory(gateway)
        streams = [plan(ROUTES[n % 3], LONG_TOKENS) for n in range(KILL_STREAMS)]
        load = Load(target.port, streams).start()
        # Every client has text (so a cut shows as a cut, not as a stream that never began).
        wait_until(
            lambda: all(s.payload_reads >= TOKENS_BEFORE_THE_KILL for s in streams),
            timeout_s=IN_FLIGHT_WITHIN_S,
            what="every stream to be under way",
        )
        held = holders(gateway, load_simulator, streams)
        per_worker = Counter(held.values())
        assert len(per_worker) == 2, f"one worker holds every stream: {per_worker}"
        victim = held[streams[0].request_id]

        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        first_ok_s, failed_first = first_clean_stream(target.port, killed_at, NEW_STREAM_WITHIN_S)
        wait_until(
            lambda: (
                len(workers_started(gateway)) == 3
                and victim not in gateway.worker_pids()
                and len(gateway.worker_pids()) == 2
            ),
            timeout_s=REPLACED_WITHIN_S,
            what="gunicorn to replace the killed worker",
        )
        replaced_s = time.monotonic() - killed_at
        load.join()

        victims = [s for s in streams if held[s.request_id] == victim]
        others = [s for s in streams if held[s.request_id] != victim]
        assert not failures(judge_aborted, victims)
        assert not failures(judge_whole, others)
        assert gateway.process.is_running(), "the gunicorn master died with its worker"

        # New streams through the same path end whole.
        (replacement,) = set(gateway.worker_pids()) - set(per_worker)
        new_streams = [plan(ROUTES[n % 3], CLEAN_TOKENS) for n in range(NEW_STREAMS)]
        running = Load(target.port, new_streams).start()
        via_path = Counter(holders(gateway, load_simulator, new_streams).values())
        running.join()
        assert not failures(judge_whole, new_streams)
        # The replacement serves: connections made to the gateway now land on it too. (Through
        # nginx, its idle upstream connections, all to the surviving worker, are used first.)
        reached_replacement = 0
        for _ in range(3):  # each batch lands on both workers but for a 2**-12 chance
            batch = [plan(ROUTES[n % 3], SHORT_TOKENS) for n in range(NEW_STREAMS)]
            running = Load(gateway.port, batch).start()
            reached_replacement = list(holders(gateway, load_simulator, batch).values()).count(
                replacement
            )
            new_streams += running.join()
            if reached_replacement:
                break
        assert reached_replacement, "no new connection reached the replacement worker"
        assert not failures(judge_whole, new_streams)
        with capsys.disabled():
            print(
                f"\n{path}: killed worker held {len(victims)} of {len(streams)} streams; "
                f"first new stream ok {first_ok_s:.2f} s after the kill "
                f"({len(failed_first)} failed before: {failed_first}), replacement up after "
                f"{replaced_s:.2f} s; {via_path[replacement]} of {NEW_STREAMS} new streams "
                f"on it via {path}"
            )

        idle = len(others) + len(new_streams) + len(failed_first) + 1
        assert_nothing_held(gateway, load_simulator, idle_allowed=idle)
    finally:
        if proxy is not None:
            proxy.stop()
        gateway.stop()


# --- upstream faults under load ------------------------------------------------------------


def test_upstream_faults_under_load_give_each_client_its_form_and_hold_nothing(
    load_gateway, load_simulator
):
    """36 concurrent streams, half of them faulted upstream (each fault on each route): every
    faulted stream gets the form test_faults.py defines for one request (a status and a JSON
    error before the first byte; in-band after it, per route), every other stream ends whole,
    and afterwards the gateway holds nothing."""
    pooled_before = open_upstream_connections(load_gateway, load_simulator)
    assert_nothing_held(load_gateway, load_simulator, idle_allowed=pooled_before)
    load_simulator.reset_stats()
    streams = [
        plan(route, CLEAN_TOKENS if fault is None else TOKENS, fault)
        for fault in FAULT_MIX
        for route in ROUTES
    ]
    Load(load_gateway.port, streams).start().join()

    problems = failures(judge_whole, [s for s in streams if s.fault is None])
    for stream in streams:
        check = (
            check_failed_before_the_first_byte
            if stream.fault in BEFORE_FIRST_BYTE
            else check_failed_in_band
            if stream.fault in MID_STREAM
            else None
        )
        if check is not None:
            try:
                check(stream.route, stream.fault, stream.trace)
            except AssertionError as exc:
                problems.append(f"{stream.describe()}: {exc}")
    assert not problems
    stats = load_simulator.stats()
    assert stats["peak_active"] >= len(streams) // 2, "the streams did not overlap"
    assert stats["faults"] == {kind: len(ROUTES) for kind in FAULT_MIX if kind}, stats["faults"]

    whole_upstream = sum(1 for s in streams if s.fault is None or s.fault in ENDS_WHOLE_UPSTREAM)
    assert_nothing_held(load_gateway, load_simulator, idle_allowed=pooled_before + whole_upstream)


def test_control_the_leak_detector_sees_streams_held_open(load_gateway, load_simulator):
    """While streams run, leaks() reports them from every side; once they end, nothing; and a
    gauge that is not exported fails instead of reading 0."""
    held = [plan(ROUTES[n % 3], LONG_TOKENS // 2) for n in range(6)]
    load = Load(load_gateway.port, held).start()
    in_flight(load_simulator, held)
    wait_until(
        lambda: services.sample(load_gateway.metrics(), "streamgate_active_streams") == 6,
        timeout_s=5,
        what="the gauge to count the streams",
    )
    problems = leaks(load_gateway, load_simulator, idle_allowed=0)
    load.join()
    pooled = open_upstream_connections(load_gateway, load_simulator)

    assert any("streamgate_active_streams = 6" in p for p in problems), problems
    assert any("simulator: 6 answers" in p for p in problems), problems
    # At least the six busy ones (idle connections from earlier tests may be open beside them).
    assert any("upstream connections open, more than the 0 an idle" in p for p in problems)
    assert not failures(judge_whole, held)
    assert_nothing_held(load_gateway, load_simulator, idle_allowed=pooled)
    with pytest.raises(AssertionError, match="no series streamgate_active_stream "):
        services.sample(load_gateway.metrics(), "streamgate_active_stream")


def test_control_the_leak_detector_sees_a_socket_its_peer_closed(load_simulator):
    """A socket the simulator closed (close-midstream) that its owner keeps is half-closed
    (CLOSE_WAIT): reported, as it would be in a gateway worker; once closed, gone."""
    body = json.dumps(
        {
            "model": "sim-fault-close-midstream",
            "stream": True,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()

    def mine() -> list[tuple[int, object]]:
        return [
            (os.getpid(), sock)
            for sock in psutil.Process().net_connections(kind="tcp")
            if sock.raddr and sock.raddr.port == load_simulator.port
        ]

    with connect(load_simulator.port) as sock:
        sock.sendall(request_bytes(load_simulator.port, f"wire-load-{uuid.uuid4().hex}", body))
        while sock.recv(65536):  # until the simulator closes its side
            pass
        kept = wait_until(
            lambda: [p for p in socket_problems(mine(), idle_allowed=1) if "not closed" in p],
            timeout_s=5,
            what="CLOSE_WAIT",
        )
    assert "CLOSE_WAIT" in kept[0], kept
    assert not socket_problems(mine(), idle_allowed=0)


# --- clients that stop reading, beside clients that read -----------------------------------

SILENT_CLIENTS = 6
READERS = 6
READER_TOKENS = 100
READER_ROUNDS_AT_MOST = 40
SEND_TIMEOUT_S = 1.0
# Timers fire on a shared machine's event loop (late, never early); buffers fill first.
CUT_LATE_TOLERANCE_S = 5.0
MAX_BYTES_PER_SILENT_STREAM = 1024 * 1024


@pytest.fixture(scope="module")
def fast_simulator(simulator_factory):
    """Long, fast answers (16 s at 1 ms a token): a client that does not read falls behind at
    once and its answer is still running upstream when the gateway cuts it."""
    return simulator_factory(ttft_ms=10, gap_ms=1, tokens=16384)


def workers_rss_bytes(gateway) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in gateway.worker_pids())


def test_clients_that_stop_reading_are_cut_while_readers_beside_them_stream_whole(
    gateway_factory, fast_simulator, capsys
):
    gateway = gateway_factory(fast_simulator, workers=2, send_timeout_s=SEND_TIMEOUT_S)
    sockets = []
    try:
        wait_until(
            lambda: len(workers_started(gateway)) == 2, timeout_s=20, what="both workers to start"
        )
        warm_up = [plan(ROUTES[n % 3], READER_TOKENS) for n in range(READERS)]
        assert not failures(judge_whole, Load(gateway.port, warm_up).start().join())
        baseline = workers_rss_bytes(gateway)

        done = threading.Event()
        read: list[Planned] = []

        def reader(route: str) -> None:
            for _ in range(READER_ROUNDS_AT_MOST):
                if done.is_set():
                    return
                stream = plan(route, READER_TOKENS)
                read.append(stream)
                Load(gateway.port, [stream]).start().join()

        readers = [
            threading.Thread(target=reader, args=(ROUTES[n % 3],), daemon=True)
            for n in range(READERS)
        ]
        for thread in readers:
            thread.start()
        silent_ids = [f"wire-load-silent-{n}-{uuid.uuid4().hex[:8]}" for n in range(SILENT_CLIENTS)]
        sent_at = time.time()
        for request_id in silent_ids:
            sock = connect(gateway.port)
            sockets.append(sock)
            sock.sendall(request_bytes(gateway.port, request_id))
        in_flight(fast_simulator, silent_ids)
        time.sleep(SEND_TIMEOUT_S / 2)  # their buffers are full by now, not yet cut
        held = workers_rss_bytes(gateway)
        assert not any(cancelled(fast_simulator, r) for r in silent_ids), "cut too early"

        cuts = {}
        for request_id in silent_ids:
            cuts[request_id] = (
                wait_until(
                    lambda r=request_id: cancelled(fast_simulator, r),
                    timeout_s=max(
                        0.0, sent_at + SEND_TIMEOUT_S + CUT_LATE_TOLERANCE_S - time.time()
                    ),
                    interval_s=0.05,
                    what=f"the cancel of {request_id}",
                )["at"]
                - sent_at
            )
            assert logged(gateway, request_id)["outcome"] == "send_timeout"
        done.set()
        for thread in readers:
            thread.join(timeout=CLIENT_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in readers)

        assert len(read) >= READERS, "the readers never streamed"
        assert not failures(judge_whole, read)
        assert min(cuts.values()) >= SEND_TIMEOUT_S, cuts
        per_stream = max(0, held - baseline) / SILENT_CLIENTS
        with capsys.disabled():
            print(
                f"\n{SILENT_CLIENTS} silent clients cut {min(cuts.values()):.2f} to "
                f"{max(cuts.values()):.2f} s after sending; {len(read)} streams read whole "
                f"beside them; workers' RSS {baseline / 2**20:.1f} -> {held / 2**20:.1f} MiB "
                f"({per_stream / 1024:.0f} KiB per silent stream)"
            )
        assert per_stream <= MAX_BYTES_PER_SILENT_STREAM
        assert_nothing_held(gateway, fast_simulator, idle_allowed=len(read) + len(warm_up))
    finally:
        for sock in sockets:
            sock.close()
        gateway.stop()


# --- an nginx reload with a short worker_shutdown_timeout ----------------------------------

SHUTDOWN_TIMEOUT_S = 2.0
RELOAD_LONG_TOKENS = 300  # 6 s: outlives the old nginx worker
RELOAD_SHORT_TOKENS = 40  # under 1 s: ends before the old worker is stopped
CUT_EARLY_TOLERANCE_S = 0.2
RELOAD_STREAMS = 6


def test_an_nginx_reload_cuts_streams_longer_than_worker_shutdown_timeout_visibly(
    nginx_factory, load_gateway, load_simulator, capsys
):
    proxy = nginx_factory(load_gateway, nginx_worker_shutdown_timeout=f"{SHUTDOWN_TIMEOUT_S:g}s")
    pooled_before = open_upstream_connections(load_gateway, load_simulator)
    try:
        long = [plan(ROUTES[n % 3], RELOAD_LONG_TOKENS) for n in range(RELOAD_STREAMS)]
        short = [plan(ROUTES[n % 3], RELOAD_SHORT_TOKENS) for n in range(RELOAD_STREAMS)]
        long_load = Load(proxy.port, long).start()
        in_flight(load_simulator, long)
        short_load = Load(proxy.port, short).start()
        in_flight(load_simulator, short)
        old_workers = psutil.Process(proxy.process.pid).children()
        os.kill(proxy.process.pid, signal.SIGHUP)  # nginx -s reload
        hup_at = time.monotonic()
        short_load.join()
        long_load.join()

        assert not failures(judge_whole, short)
        assert all(s.trace.sent_at + s.trace.ended_at_s > hup_at for s in short), "not across"
        assert not failures(judge_aborted, long)
        cut_after = [s.trace.sent_at + s.trace.ended_at_s - hup_at for s in long]
        assert min(cut_after) >= SHUTDOWN_TIMEOUT_S - CUT_EARLY_TOLERANCE_S, cut_after
        assert max(cut_after) <= SHUTDOWN_TIMEOUT_S + CUT_LATE_TOLERANCE_S, cut_after
        wait_until(
            lambda: not any(w.is_running() for w in old_workers),
            timeout_s=5,
            what="the old nginx worker to exit",
        )
        after = plan(chat.OPENAI, SHORT_TOKENS)  # the new worker serves
        assert judge_whole(Load(proxy.port, [after]).start().join()[0]) is None
        with capsys.disabled():
            print(
                f"\nnginx reload: {len(short)} short streams ended whole across it, "
                f"{len(long)} long ones cut {min(cut_after):.2f} to {max(cut_after):.2f} s "
                f"after the HUP (worker_shutdown_timeout {SHUTDOWN_TIMEOUT_S:g}s)"
            )
        # nginx closed the cut streams' upstream connections: the gateway released theirs.
        assert_nothing_held(
            load_gateway, load_simulator, idle_allowed=pooled_before + len(short) + 1
        )
    finally:
        proxy.stop()
