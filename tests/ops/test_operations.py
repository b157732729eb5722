"""Operations on the split lab under load: what each one costs the users, counted per stream.

30 closed-loop streams (3 s each: 150 tokens 20 ms apart) run through the edge (HTTPS, client
key) while site.yml runs again with a changed setting, then with a new build of the code, and
while an app host's gateway is killed. Every stream open during an operation is judged whole
(tests/support/stream_load.py): 0 lost where the README's operations table says 0. The same
counter must see the loss of the old way (every app host restarted at once).

Both lab topologies: with two app hosts a new build rolls across them (out of the pool, drained,
restarted, back in); a single host hands over to a new gunicorn master (streamgate-upgrade).
Tests for the other topology skip, saying so. A release of the gateway's code leaves the
simulator (the lab's stand-in for the LLM server) running: its own code did not change.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid

import pytest
from streamgate.simulator.script import expected_text
from support.stream_load import StreamLoad, WindowReport, assert_nothing_lost

CLIENTS = 30
TOKENS = 150  # 3 s a stream: a host leaving the pool still has streams open
REST_S = 5.0  # load before an operation: the "at rest" figures
AFTER_S = 4.0  # load after it: streams that started during it end inside the window
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": "operations"}],
    }
).encode()


@pytest.fixture(scope="module")
def app_hosts(groups) -> list[str]:
    return sorted(groups["app"])


@pytest.fixture
def several_app_hosts(app_hosts) -> list[str]:
    if len(app_hosts) < 2:
        pytest.skip("needs two app hosts (LAB_TOPOLOGY=split)")
    return app_hosts


@pytest.fixture
def one_app_host(app_hosts) -> str:
    if len(app_hosts) != 1:
        pytest.skip("needs a single app host (LAB_TOPOLOGY=single)")
    return app_hosts[0]


def under_load(
    edge_url: str, load_options: dict, operate
) -> tuple[WindowReport, WindowReport, object]:
    """(at rest, during the operation, what operate() returned)."""
    load = StreamLoad(
        edge_url, BODY, clients=CLIENTS, expected_text=expected_text(TOKENS), **load_options
    ).start()
    try:
        time.sleep(REST_S)
        started = time.monotonic()
        returned = operate()
        ended = time.monotonic()
        time.sleep(AFTER_S)
    finally:
        load.stop()
    rest = load.report((started - REST_S + 1.0, started - 0.1))
    during = load.report((started, ended))
    print(f"at rest: {rest}\nduring: {during}")
    return rest, during, returned


def main_pid(host) -> int:
    return int(host.check_output("systemctl show -p MainPID --value streamgate.service"))


def installed_build(host) -> str:
    result = host.run(
        "/opt/streamgate/venv/bin/python -c 'import streamgate.build_marker as m; print(m.BUILD)'"
    )
    return result.stdout.strip() if result.rc == 0 else "(none)"


def drain_waits(play_output: str, hosts: list[str]) -> dict[str, int]:
    """Per app host, how many times the play looked again at its open streams after the host
    left the pool (1+: streams were open when its turn came), from the play's output."""
    return {
        host: len(
            re.findall(
                rf"^FAILED - RETRYING: \[{re.escape(host)}\]: Wait until the "
                r"streams on this host have ended",
                play_output,
                re.MULTILINE,
            )
        )
        for host in hosts
    }


def test_a_changed_setting_reloads_gateway_and_nginx_without_losing_a_stream(
    edge_url, load_options, run_site, lab_host, app_hosts
):
    """A gateway setting (HUP of gunicorn) and an nginx variable (nginx reload), in one run;
    values unlike the last run's, so that the test can run again on the same lab."""
    word_flush_ms, upstream_keepalive = random.randint(100, 199), random.randint(32, 63)
    before = {name: main_pid(lab_host(name)) for name in app_hosts}
    rest, during, play = under_load(
        edge_url,
        load_options,
        lambda: run_site(
            "setting-change",
            "-e",
            f"streamgate_word_flush_ms={word_flush_ms}",
            "-e",
            f"nginx_upstream_keepalive={upstream_keepalive}",
        ),
    )
    assert "RUNNING HANDLER [app : Reload streamgate]" in play.stdout
    assert "RUNNING HANDLER [nginx : Reload the nginx service]" in play.stdout
    assert {name: main_pid(lab_host(name)) for name in app_hosts} == before, "not a reload"
    assert_nothing_lost(rest, during, min_streams=CLIENTS)


def test_a_new_build_rolls_across_the_app_hosts_without_losing_a_stream(
    edge_url, load_options, run_site, changed_build, lab_host, several_app_hosts
):
    app_hosts = several_app_hosts
    before = {name: main_pid(lab_host(name)) for name in app_hosts}
    build = f"rolling-{uuid.uuid4().hex[:8]}"
    rest, during, play = under_load(
        edge_url,
        load_options,
        lambda: run_site(
            "rolling-upgrade", "-v", "-e", f"streamgate_source_dir={changed_build(build)}"
        ),
    )
    for name in app_hosts:
        assert installed_build(lab_host(name)) == build, name
        assert main_pid(lab_host(name)) != before[name], f"{name} was not restarted"
    waits = drain_waits(play.stdout, app_hosts)
    assert all(count >= 1 for count in waits.values()), (
        f"a host had no stream open when it left the pool: {waits}"
    )
    assert_nothing_lost(rest, during, min_streams=CLIENTS)


def test_a_new_build_on_the_only_app_host_is_taken_over_without_losing_a_stream(
    edge_url, load_options, run_site, changed_build, lab_host, one_app_host
):
    """A new gunicorn master beside the old one (USR2), MainPID handed over, the old drains."""
    host = lab_host(one_app_host)
    before = main_pid(host)
    build = f"in-place-{uuid.uuid4().hex[:8]}"
    rest, during, play = under_load(
        edge_url,
        load_options,
        lambda: run_site("upgrade-in-place", "-e", f"streamgate_source_dir={changed_build(build)}"),
    )
    assert re.search(
        r"TASK \[app : Upgrade the only app host in place\][^\n]*\nchanged:", play.stdout
    ), "the play did not upgrade in place"
    assert installed_build(host) == build
    assert main_pid(host) != before, "the main process is still the old master"
    assert host.run("systemctl is-active streamgate.service").rc == 0
    assert_nothing_lost(rest, during, min_streams=CLIENTS)


def test_stop_after_an_upgrade_in_place_drains_the_open_streams(
    edge_url, load_options, lab_host, one_app_host
):
    """The master that took over (not started by systemd) drains on `systemctl stop` too: the
    unit's ExecStop waits for it. Without, systemd SIGKILLed the unit at once (10 of 10 open
    streams cut, measured). The only app host refuses new streams until it is started again."""
    host = lab_host(one_app_host)
    assert host.check_output("systemctl show -p MainPID --value streamgate.service") != "0"
    load = StreamLoad(
        edge_url, BODY, clients=CLIENTS, expected_text=expected_text(TOKENS), **load_options
    ).start()
    try:
        time.sleep(REST_S)
        with host.sudo():
            stopped_at = time.monotonic()
            host.run_expect([0], "systemctl stop streamgate.service")
            stop_s = time.monotonic() - stopped_at
            host.run_expect([0], "systemctl start streamgate.service")
        time.sleep(AFTER_S)
    finally:
        load.stop()
    open_at_stop = [r for r in load.results if r.started < stopped_at < r.ended]
    print(f"stop took {stop_s:.1f} s; open at the stop: {[r.outcome for r in open_at_stop]}")
    assert len(open_at_stop) >= CLIENTS // 2, open_at_stop
    assert all(r.outcome == "completed" for r in open_at_stop), "streams cut by the stop"
    assert stop_s > 1.0, f"stop took {stop_s:.1f} s: the streams were not waited for"


def test_control_restarting_every_app_host_at_once_loses_streams(
    edge_url, load_options, run_site, changed_build, lab_host, app_hosts
):
    """The old way (streamgate_rolling_restart false): the counter sees what it cost."""
    build = f"at-once-{uuid.uuid4().hex[:8]}"
    _, during, _ = under_load(
        edge_url,
        load_options,
        lambda: run_site(
            "restart-at-once",
            "-e",
            f"streamgate_source_dir={changed_build(build)}",
            "-e",
            "streamgate_rolling_restart=false",
        ),
    )
    for name in app_hosts:
        assert installed_build(lab_host(name)) == build, name
    assert during.lost > 0, during


def requests_served(host) -> float:
    """The gateway's count of chat requests answered since it started (0 while it does not
    answer), from its /metrics on the address it binds (its env file), asked on the host."""
    with host.sudo():  # the env file is the service's own (0600)
        result = host.run(
            'curl -fsS --max-time 5 http://$(sed -n \'s/^STREAMGATE_BIND="*\\([^"]*\\)"*$/\\1/p\' '
            "/etc/streamgate/streamgate.env)/metrics"
        )
    if result.rc != 0:
        return 0.0  # not answering (yet)
    text = result.stdout
    return sum(
        float(value)
        for value in re.findall(
            r'^streamgate_requests_total\{[^}]*route="completions"[^}]*\} ([0-9.e+]+)$',
            text,
            flags=re.MULTILINE,
        )
    )


def test_stop_drains_the_streams_of_a_host_and_the_others_take_the_new_ones(
    edge_url, load_options, lab_host, several_app_hosts
):
    """`systemctl stop` under load: the streams on the host end whole (gunicorn's graceful stop,
    which systemd waits for), new streams go to the other host; nothing is lost."""
    host = lab_host(several_app_hosts[0])

    def stop_then_start() -> float:
        with host.sudo():
            started = time.monotonic()
            host.run_expect([0], "systemctl stop streamgate.service")
            stopped_after = time.monotonic() - started
            host.run_expect([0], "systemctl start streamgate.service")
        return stopped_after

    rest, during, stopped_after = under_load(edge_url, load_options, stop_then_start)
    # Its open streams (up to 3 s left) were waited for, not cut.
    assert stopped_after > 1.0, f"stop took {stopped_after:.1f} s: the streams were not drained"
    assert_nothing_lost(rest, during, min_streams=CLIENTS)


def test_a_killed_app_host_fails_only_its_streams_and_rejoins_by_itself(
    edge_url, load_options, lab_host, several_app_hosts
):
    """SIGKILL to every process of one host's gateway: its open streams end aborted (never as a
    clean end), new streams go to the other host at once, and the host is serving again within
    30 s (systemd restarts it, nginx tries it again after its fail_timeout)."""
    victim = lab_host(several_app_hosts[-1])
    served_before = requests_served(victim)
    assert served_before > 0, "the host to kill must have been serving"
    killed_at = {}

    def kill() -> None:
        with victim.sudo():
            killed_at["t"] = time.monotonic()
            victim.run_expect([0], "systemctl kill --signal=SIGKILL streamgate.service")

    load = StreamLoad(
        edge_url, BODY, clients=CLIENTS, expected_text=expected_text(TOKENS), **load_options
    ).start()
    try:
        time.sleep(REST_S)
        kill()
        deadline = time.monotonic() + 60
        rejoined_after = None
        while time.monotonic() < deadline:  # bounded: 60 s
            time.sleep(2)
            active = victim.run("systemctl is-active streamgate.service").rc == 0
            if active and requests_served(victim) > 0:
                rejoined_after = time.monotonic() - killed_at["t"]
                break
        time.sleep(AFTER_S)
    finally:
        load.stop()
    t = killed_at["t"]
    cut = load.report((t, t + 0.2))
    later = load.report((t + 1.0, time.monotonic()))
    later_starts = [r for r in load.results if r.started > t + 1.0]
    print(f"cut: {cut}\nlater: {later}\nrejoined after {rejoined_after} s")
    assert set(cut.failed) <= {"aborted"}, f"the killed host's streams must end aborted: {cut}"
    assert cut.failed.get("aborted", 0) > 0, f"no stream was on the killed host: {cut}"
    assert later_starts, f"no stream started 1 s after the kill: {later}"  # all() of none passes
    assert all(r.outcome == "completed" for r in later_starts), (
        f"streams started 1 s after the kill failed: {later}"
    )
    assert rejoined_after is not None and rejoined_after <= 30, (
        f"the host did not serve again within 30 s ({rejoined_after}); "
        f"it had served {served_before} before"
    )
