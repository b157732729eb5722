"""Every server the kit runs for other hosts, with the same checks: the gateway (on the app
hosts, for the edge), the simulator and llama.cpp's server (for the app hosts). Running and
enabled, listening only where its clients reach it (helpers.served_address), healthy, its port
guarded by its own nftables table and open to its clients' hosts only, bounded and sandboxed.

Each test runs on the hosts of its service's group only (conftest.py reads the `service`
parameter); what only one server has stays in its own module (test_app.py, test_llm.py).
"""

from __future__ import annotations

import re

import pytest
from support.upstream import setting

from infra.helpers import (
    MAX_EXPOSURE,
    SERVICES,
    assert_only_group_reaches,
    check_output_as_root,
    security_exposure,
    served_address,
)

testinfra_hosts = ["ansible://" + ":".join(sorted({service.group for service in SERVICES}))]


def by_service(cases):
    """pytest.param per (service, *rest) case, named after the service."""
    return [
        pytest.param(*case, id="-".join(str(part) for part in (case[0].name, *case[1:])))
        for case in cases
    ]


EACH_SERVICE = by_service((service,) for service in SERVICES)
HEALTH_CHECKS = by_service((service, path) for service in SERVICES for path in service.health_paths)
UNIT_PROPERTIES = by_service(
    (service, unit_property, pattern)
    for service in SERVICES
    for unit_property, pattern in (
        ("MemoryMax", r"^[0-9]+$"),
        ("TasksMax", r"^[0-9]+$"),
        ("Wants", rf"streamgate-firewall@{service.firewall}\.service"),
        *((("DynamicUser", r"^yes$"),) if service.dynamic_user else ()),
    )
)


@pytest.fixture
def address(hostvars, service) -> str:
    return served_address(hostvars, service.clients)


@pytest.fixture
def port(hostvars, service) -> int:
    return int(setting(hostvars, service.port_setting))


@pytest.mark.parametrize("service", EACH_SERVICE)
def test_service_is_running_and_enabled(host, service):
    unit = host.service(service.unit)
    assert unit.is_running
    assert unit.is_enabled


@pytest.mark.parametrize("service", EACH_SERVICE)
def test_service_listens_on_its_served_address_only(host, address, port):
    assert host.socket(f"tcp://{address}:{port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
    assert not host.socket(f"tcp://:::{port}").is_listening


@pytest.mark.parametrize(("service", "path"), HEALTH_CHECKS)
def test_service_answers_its_health_check_on_the_host(host, address, port, path):
    status = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 http://{address}:{port}{path}"
    )
    assert status == "200"


@pytest.mark.parametrize("service", EACH_SERVICE)
def test_firewall_table_guards_the_port(host, service, port):
    ruleset = check_output_as_root(host, f"nft list table inet streamgate_{service.firewall}")
    assert re.search(rf"tcp dport {port} .*reject with tcp reset", ruleset), ruleset
    assert host.service(f"streamgate-firewall@{service.firewall}").is_enabled


@pytest.mark.parametrize("service", EACH_SERVICE)
def test_only_the_clients_hosts_reach_the_service(hostvars, inventory_host, service, address, port):
    """Every host of the clients' group connects; every other host of the inventory and the
    controller are refused."""
    if address == "127.0.0.1":
        pytest.skip(f"every {service.clients} host is this host: {service.name} is on loopback")
    assert_only_group_reaches(hostvars, inventory_host, service.clients, address, port)


@pytest.mark.parametrize(("service", "unit_property", "pattern"), UNIT_PROPERTIES)
def test_unit_bounds_firewall_and_user(host, service, unit_property, pattern):
    value = host.check_output(f"systemctl show -p {unit_property} --value {service.unit}")
    assert re.search(pattern, value), (unit_property, value)


@pytest.mark.parametrize("service", EACH_SERVICE)
def test_security_exposure_is_at_most_two(host, service):
    assert security_exposure(host, f"{service.unit}.service") <= MAX_EXPOSURE
