"""The LLM simulator on the simulator hosts."""

from __future__ import annotations

import re

import pytest
from support.upstream import setting

from infra.helpers import (
    MAX_EXPOSURE,
    assert_only_group_reaches,
    check_output_as_root,
    security_exposure,
    served_address,
)

testinfra_hosts = ["ansible://simulator"]


@pytest.fixture(scope="module")
def sim_port(hostvars) -> int:
    return int(setting(hostvars, "streamgate_sim_port"))


@pytest.fixture(scope="module")
def sim_address(hostvars) -> str:
    """The only address the simulator may listen on: loopback when every app host is this host."""
    return served_address(hostvars, "app")


def test_simulator_is_running_and_enabled(host):
    service = host.service("streamgate-sim")
    assert service.is_running
    assert service.is_enabled


def test_simulator_listens_on_its_private_address_only(host, sim_address, sim_port):
    assert host.socket(f"tcp://{sim_address}:{sim_port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{sim_port}").is_listening


def test_simulator_answers_health_check(host, sim_address, sim_port):
    status = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 http://{sim_address}:{sim_port}/healthz"
    )
    assert status == "200"


def test_firewall_table_guards_the_simulator_port(host, sim_port):
    ruleset = check_output_as_root(host, "nft list table inet streamgate_simulator")
    assert re.search(rf"tcp dport {sim_port} .*reject with tcp reset", ruleset), ruleset


def test_only_the_app_hosts_reach_the_simulator(
    host, hostvars, sim_address, inventory_host, sim_port
):
    """Every app host connects; the edge, other hosts and the controller are refused."""
    if sim_address == "127.0.0.1":
        pytest.skip("the simulator serves only this host, on loopback")
    assert_only_group_reaches(hostvars, inventory_host, "app", sim_address, sim_port)


@pytest.mark.parametrize(
    ("unit_property", "pattern"),
    [
        ("MemoryMax", r"^[0-9]+$"),
        ("TasksMax", r"^[0-9]+$"),
        ("Wants", r"streamgate-firewall@simulator\.service"),
    ],
)
def test_unit_resource_bounds_and_firewall(host, unit_property, pattern):
    value = host.check_output(f"systemctl show -p {unit_property} --value streamgate-sim")
    assert re.search(pattern, value), (unit_property, value)


def test_simulator_runs_as_a_dynamic_user(host):
    assert host.check_output("systemctl show -p DynamicUser --value streamgate-sim") == "yes"


def test_simulator_security_exposure_is_at_most_two(host):
    assert security_exposure(host, "streamgate-sim.service") <= MAX_EXPOSURE
