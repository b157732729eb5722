"""The LLM simulator on the simulator hosts."""

from __future__ import annotations

import re

from infra.helpers import check_output_as_root

testinfra_hosts = ["ansible://simulator"]

SIMULATOR_PORT = 8100
MAX_EXPOSURE = 2.0


def test_simulator_is_running_and_enabled(host):
    service = host.service("streamgate-sim")
    assert service.is_running
    assert service.is_enabled


def test_simulator_listens_on_all_interfaces(host):
    assert host.socket(f"tcp://0.0.0.0:{SIMULATOR_PORT}").is_listening


def test_simulator_answers_health_check(host):
    status = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 http://127.0.0.1:{SIMULATOR_PORT}/healthz"
    )
    assert status == "200"


def test_simulator_runs_as_a_dynamic_user(host):
    assert host.check_output("systemctl show -p DynamicUser --value streamgate-sim") == "yes"


def test_simulator_security_exposure_is_at_most_two(host):
    report = check_output_as_root(host, "systemd-analyze security --no-pager streamgate-sim.service")
    match = re.search(r"Overall exposure level for streamgate-sim\.service:\s*([0-9.]+)", report)
    assert match, report[-500:]
    assert float(match[1]) <= MAX_EXPOSURE, report
