"""A code upgrade in place (python -m streamgate.upgrade: gunicorn's USR2 re-exec) loses no stream.

A real gunicorn master runs without systemd; tests/support/systemd_stand_in.py plays systemd's
part: the NOTIFY_SOCKET the workers announce the new master on, the MainPID systemd keeps, and
the `systemctl show -p MainPID` the command asks. The "code" of a release is a marker file the
gunicorn config reads as each master starts (a fresh interpreter reads the venv's code from
disk the same way) and logs with its pid.

- Under 30 closed-loop streams through nginx, the command upgrades: no stream is lost or
  corrupted from the USR2 until the old master has exited, p99 TTFT stays within twice its value
  at rest, the serving workers are the new master's (which read the new release), systemd's
  MainPID was handed to it by its own workers, and a master not started by USR2 (the first one,
  the promoted one after a HUP) announces no MAINPID.
- Control: a plain stop-then-start under the same load is counted as lost streams.
- Failures leave the old master serving, as the main process: a release whose app cannot start
  (no MAINPID is announced for it, the command exits 1), and a systemd that refuses the
  handover (NotifyAccess=main: the command times out, stops the new master, exits 1).
Each run prints its figures (streams lost, p99 TTFT, the longest time without a new stream
served): `pytest tests/wire/test_upgrade_in_place.py -s` is the measurement in the README.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from streamgate.simulator.script import expected_text
from support import services
from support.procs import http_status, wait_until
from support.stream_load import (
    COMPLETED,
    StreamLoad,
    StreamResult,
    WindowReport,
    assert_nothing_lost,
    at_rest_before,
)
from support.systemd_stand_in import SystemdStandIn

UNIT = "streamgate.service"
CLIENTS = 30
TOKENS = 50  # 20 ms apart: about 1 s per stream
SETTLE_S = 3.0  # load running before the operation: the at-rest sample
AFTER_S = 1.0  # streams starting this long after the old gateway is gone still count
UPGRADE_TIMEOUT_S = 30.0
REFUSED_TIMEOUT_S = 4.0  # the command's bound when systemd never takes the new master
BODY = json.dumps(
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()
# The project's config, then the release: read from disk as the master starts, logged as
# "<pid> <release>". A release ending in "broken" has an app that fails at startup, as a release
# with a bug in its lifespan would: every worker exits, and gunicorn halts that master.
RELEASE_CONF = """\
exec(compile(open({conf!r}).read(), {conf!r}, "exec"))
_release = open({release!r}).read().strip()
with open({release_log!r}, "a") as _log:
    _log.write(f"{{os.getpid()}} {{_release}}\\n")
if _release.endswith("broken"):
    _project_post_worker_init = post_worker_init

    def post_worker_init(worker):
        _project_post_worker_init(worker)

        async def app_failing_at_startup(scope, receive, send):
            await receive()
            await send({{"type": "lifespan.startup.failed", "message": "broken release"}})

        worker.wsgi = app_failing_at_startup
"""


class Release:
    """The marker file a gateway's masters read as they start, and their log of it."""

    def __init__(self, directory: Path) -> None:
        self.marker = directory / "release"
        self.log = directory / "release.log"
        self.conf = directory / "gunicorn-release.conf.py"
        self.marker.write_text("release-1\n")
        self.conf.write_text(
            RELEASE_CONF.format(
                conf=str(services.GUNICORN_CONF),
                release=str(self.marker),
                release_log=str(self.log),
            )
        )

    def install(self, name: str) -> None:
        self.marker.write_text(f"{name}\n")

    def read_by(self) -> dict[int, str]:
        """pid -> the release that master read (its last read: a HUP reads it again)."""
        if not self.log.exists():
            return {}
        pairs = (line.split(" ", 1) for line in self.log.read_text().splitlines() if line)
        return {int(pid): release for pid, release in pairs}

    def master_of(self, name: str) -> int:
        found = [pid for pid, release in self.read_by().items() if release == name]
        assert len(found) == 1, f"masters that read {name}: {found} ({self.read_by()})"
        return found[0]


def start_release_gateway(
    gateway_factory, simulator, directory: Path, stand_in: SystemdStandIn
) -> tuple[services.Service, Release]:
    """A two-worker gateway launched as the unit launches it, announcing to the stand-in."""
    release = Release(directory)
    with pytest.MonkeyPatch.context() as patch:  # the gateway's environment is a copy of ours
        for name, value in stand_in.env().items():
            patch.setenv(name, value)
        gateway = gateway_factory(simulator, workers=2, gunicorn_conf=release.conf, script=True)
    stand_in.main_pid = gateway.process.pid
    # /readyz can answer before gunicorn has forked the second worker (up to 0.1 s apart).
    wait_until(
        lambda: len(live_children(gateway.process.pid)) == 2, timeout_s=10, what="both workers"
    )
    return gateway, release


def run_upgrade(
    stand_in: SystemdStandIn, gateway: services.Service, timeout_s: float
) -> subprocess.CompletedProcess:
    env = stand_in.command_env()
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "streamgate.upgrade",
            "--unit",
            UNIT,
            "--ready-url",
            f"{gateway.base_url}/readyz",
            "--timeout",
            str(timeout_s),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
        check=False,
    )


def live_children(pid: int) -> list[int]:
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    live = []
    for kid in kids:
        try:
            if kid.status() != psutil.STATUS_ZOMBIE:
                live.append(kid.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(live)


def is_gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_generation(master: int, timeout_s: float = 15.0) -> None:
    """Stop a gunicorn master that ManagedProcess does not track, by PID: a new master outlives
    the old one (the process the harness started) and is reparented. TERM, then KILL it and its
    workers if they are still there after timeout_s."""
    try:
        process = psutil.Process(master)
        group = [process, *process.children()]
        process.terminate()
    except psutil.NoSuchProcess:
        return
    try:
        wait_until(
            lambda: all(is_gone(each) for each in group),
            timeout_s=timeout_s,
            interval_s=0.05,
            what=f"master {master} and its workers to exit",
        )
    except TimeoutError:
        for each in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                each.kill()
        wait_until(
            lambda: all(is_gone(each) for each in group),
            timeout_s=5,
            what=f"master {master} and its workers to die",
        )


def longest_wait_for_a_new_stream(results: list[StreamResult], start: float, end: float) -> float:
    """The longest time within (start, end) in which no stream got its first token: while the
    gateway serves, 30 clients see one every few tens of ms."""
    firsts = sorted(
        result.first_token
        for result in results
        if result.outcome == COMPLETED and result.first_token is not None
    )
    marks = [start, *(moment for moment in firsts if start < moment < end), end]
    return max(later - earlier for earlier, later in itertools.pairwise(marks))


def before_and_during(
    what: str, load: StreamLoad, results: list[StreamResult], event_at: float, back_at: float
) -> tuple[WindowReport, WindowReport, str]:
    """The load's window at rest (the SETTLE_S before the event) against the one from the event
    until AFTER_S past `back_at` (service whole again), with the longest wait for a new stream in
    each; and a summary line, printed."""
    at_rest = at_rest_before(event_at, SETTLE_S)
    during = (event_at, back_at + AFTER_S)
    rest_report, during_report = load.report(at_rest), load.report(during)
    gap_at_rest_s = longest_wait_for_a_new_stream(results, *at_rest)
    gap_during_s = longest_wait_for_a_new_stream(results, *during)
    line = (
        f"{what}: at rest {rest_report}; during {during_report}; longest time without a new "
        f"stream served {gap_during_s * 1000:.0f} ms (at rest {gap_at_rest_s * 1000:.0f} ms)"
    )
    print(f"\n{line}")
    return rest_report, during_report, line


def start_load(proxy) -> StreamLoad:
    """CLIENTS closed-loop streams through `proxy`, each checked against the simulator's text."""
    return StreamLoad(
        f"{proxy.base_url}/v1/chat/completions",
        BODY,
        clients=CLIENTS,
        expected_text=expected_text(TOKENS),
    ).start()


@pytest.fixture
def stand_in():
    systemd = SystemdStandIn().start()
    yield systemd
    systemd.stop()


def test_upgrade_under_load_loses_no_stream_and_hands_systemd_the_new_master(
    gateway_factory, nginx_factory, simulator, stand_in, tmp_path
):
    gateway, release = start_release_gateway(gateway_factory, simulator, tmp_path, stand_in)
    old = gateway.process.pid
    old_workers = live_children(old)
    proxy = nginx_factory(gateway)
    try:
        load = start_load(proxy)
        try:
            time.sleep(SETTLE_S)
            release.install("release-2")
            usr2_at = time.monotonic()
            upgraded = run_upgrade(stand_in, gateway, UPGRADE_TIMEOUT_S)
            assert upgraded.returncode == 0, (upgraded.stdout, upgraded.stderr)
            new = stand_in.main_pid
            new_workers = live_children(new)
            gateway.process.popen.wait(timeout=20)  # the old master drains its streams, exits
            old_gone_at = time.monotonic()
            time.sleep(AFTER_S + 0.5)
        finally:
            results = load.stop()
        rest, during, _ = before_and_during(
            "upgrade in place (USR2)", load, results, usr2_at, old_gone_at
        )
        assert_nothing_lost(rest, during, min_streams=2 * CLIENTS)

        # The new code serves: the master that read release-2, and only its workers listen.
        assert release.read_by()[old] == "release-1"
        assert new != old and release.master_of("release-2") == new
        listening = {
            conn.pid
            for conn in psutil.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == gateway.port
        }
        assert listening == set(new_workers) == set(live_children(new)), (
            listening,
            new_workers,
            old_workers,
        )
        assert not set(old_workers) & listening
        assert http_status(f"{gateway.base_url}/readyz") == 200

        # systemd heard MAINPID=<new master> + READY=1, from its workers, after the USR2 only.
        announced = stand_in.main_pid_announcements()
        assert announced, stand_in.notifications
        for note in announced:
            assert note.fields == {"MAINPID": str(new), "READY": "1"}, note
            assert note.sender in new_workers and note.received > usr2_at, note

        # A master not started by USR2 announces nothing: the promoted one, across a HUP.
        wait_until(
            lambda: "Master has been promoted." in gateway.process.logs(20_000),
            timeout_s=5,
            what="the new master to be promoted",
        )
        os.kill(new, signal.SIGHUP)
        wait_until(
            lambda: (
                len(live_children(new)) == 2
                and not set(live_children(new)) & set(new_workers)
                and http_status(f"{gateway.base_url}/readyz") == 200
            ),
            timeout_s=15,
            what="the HUP's workers",
        )
        time.sleep(0.5)  # a worker announces right after its server starts
        assert stand_in.main_pid_announcements() == announced, stand_in.notifications
    finally:
        proxy.stop()
        # Whatever happened: the masters that read a release and outlive the one we started.
        for pid in release.read_by():
            if pid != old:
                stop_generation(pid)


def test_control_a_stop_then_start_is_counted_as_lost_streams(
    gateway_factory, nginx_factory, simulator
):
    """The same load and counter see what `systemctl restart` does: a gap with no gateway."""
    gateway = gateway_factory(simulator, workers=2)
    proxy = nginx_factory(gateway)
    load = start_load(proxy)
    restarted = None
    try:
        time.sleep(SETTLE_S)
        stop_at = time.monotonic()
        gateway.process.popen.send_signal(signal.SIGTERM)
        gateway.process.popen.wait(timeout=20)
        restarted = gateway_factory(simulator, workers=2, port=gateway.port)
        started_at = time.monotonic()
        time.sleep(AFTER_S + 0.5)
    finally:
        results = load.stop()
        proxy.stop()
        if restarted is not None:
            restarted.stop()
    rest, during, summary = before_and_during("stop then start", load, results, stop_at, started_at)
    assert rest.lost == 0, summary
    assert during.lost > 0, summary
    assert set(during.failed) <= {"connect", "http-502", "aborted"}, summary


@pytest.fixture(scope="module")
def rollback_gateway(gateway_factory, simulator, tmp_path_factory):
    """One gateway whose upgrades fail: each test leaves it as it found it, its first master
    serving as the main process."""
    systemd = SystemdStandIn().start()
    gateway, release = start_release_gateway(
        gateway_factory, simulator, tmp_path_factory.mktemp("rollback"), systemd
    )
    yield gateway, release, systemd
    gateway.stop()
    systemd.stop()


def assert_old_master_serves_as_before(gateway, stand_in, workers_before: list[int]) -> None:
    old = gateway.process.pid
    assert gateway.process.is_running()
    assert stand_in.main_pid == old
    # The same workers, and no new master beside them.
    assert live_children(old) == workers_before, (
        [(pid, psutil.Process(pid).cmdline()[-3:]) for pid in live_children(old)],
        workers_before,
    )
    assert http_status(f"{gateway.base_url}/readyz") == 200


def test_a_release_that_cannot_start_leaves_the_old_master_serving(rollback_gateway):
    gateway, release, stand_in = rollback_gateway
    workers_before = live_children(gateway.process.pid)
    announced_before = len(stand_in.main_pid_announcements())
    release.install("release-2-broken")
    upgraded = run_upgrade(stand_in, gateway, UPGRADE_TIMEOUT_S)
    assert upgraded.returncode == 1, (upgraded.stdout, upgraded.stderr)
    assert "exited while starting" in upgraded.stderr, upgraded.stderr
    broken = release.master_of("release-2-broken")
    assert not psutil.pid_exists(broken) or is_gone(psutil.Process(broken))
    # Its workers never served, so none announced it: systemd kept the old master as main.
    assert len(stand_in.main_pid_announcements()) == announced_before, stand_in.notifications
    assert_old_master_serves_as_before(gateway, stand_in, workers_before)


def test_a_systemd_refusing_the_handover_leaves_the_old_master_serving(rollback_gateway):
    gateway, release, stand_in = rollback_gateway
    workers_before = live_children(gateway.process.pid)
    stand_in.notify_access = "main"  # the unit as it was: MAINPID only from the main process
    release.install("release-3")
    try:
        upgraded = run_upgrade(stand_in, gateway, REFUSED_TIMEOUT_S)
        assert upgraded.returncode == 1, (upgraded.stdout, upgraded.stderr)
        assert "NotifyAccess=all" in upgraded.stderr, upgraded.stderr
        refused = release.master_of("release-3")
        assert any(
            note.fields.get("MAINPID") == str(refused) for note in stand_in.main_pid_announcements()
        ), stand_in.notifications
        # The command sent it TERM; a child of the old master, it is reaped by it.
        wait_until(
            lambda: refused not in live_children(gateway.process.pid),
            timeout_s=15,
            what=f"the refused master {refused} to exit",
        )
        assert_old_master_serves_as_before(gateway, stand_in, workers_before)
    finally:
        stand_in.notify_access = "all"
