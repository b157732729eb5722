"""The roles' rule for where a host's service listens and who may reach it (the filters in
ansible/filter_plugins/streamgate_addresses.py), on made-up inventories, against the expected
addresses and against the two other statements of it: helpers.served_address, which the host
checks use, and the doctor's hops.advertised_address, which picks the address it probes.
Runs on the controller; no host is touched.

Negative control: a rule that serves on loopback whenever this host is one of its clients (not
the only one) is told apart by the same table.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from streamgate.doctor.hops import Inventory, advertised_address

from infra.helpers import served_address

FILTERS_FILE = (
    Path(__file__).resolve().parents[2] / "ansible/filter_plugins/streamgate_addresses.py"
)
_spec = importlib.util.spec_from_file_location("streamgate_addresses", FILTERS_FILE)
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)

# host -> its inventory variables; the groups as an inventory lists them.
SINGLE_HOST_WITH_LLM = (
    {"one": {"ansible_host": "10.231.0.10"}, "llm": {"ansible_host": "10.231.0.11"}},
    {"edge": ["one"], "app": ["one"], "simulator": ["one"], "llm": ["llm"]},
)
SPLIT = (
    {
        "edge": {"ansible_host": "10.231.0.20"},
        "app1": {"ansible_host": "10.231.0.21"},
        "app2": {"ansible_host": "192.0.2.22", "streamgate_private_address": "10.0.0.22"},
        "sim": {},
    },
    {"edge": ["edge"], "app": ["app1", "app2"], "simulator": ["sim"], "llm": []},
)
# An app host that is also the edge, beside a second app host: not the only client any more.
EDGE_ON_AN_APP_HOST = (
    {"app1": {"ansible_host": "10.231.0.31"}, "app2": {"ansible_host": "10.231.0.32"}},
    {"edge": ["app1"], "app": ["app1", "app2"], "simulator": ["app1", "app2"]},
)

# (inventory, host, clients' group) -> where it serves, who may reach it.
CASES = [
    (SINGLE_HOST_WITH_LLM, "one", "edge", "127.0.0.1", []),
    (SINGLE_HOST_WITH_LLM, "one", "app", "127.0.0.1", []),
    (SINGLE_HOST_WITH_LLM, "llm", "app", "10.231.0.11", ["10.231.0.10"]),
    (SPLIT, "app1", "edge", "10.231.0.21", ["10.231.0.20"]),
    (SPLIT, "app2", "edge", "10.0.0.22", ["10.231.0.20"]),
    (SPLIT, "sim", "app", "sim", ["10.231.0.21", "10.0.0.22"]),
    (EDGE_ON_AN_APP_HOST, "app1", "edge", "127.0.0.1", []),
    (EDGE_ON_AN_APP_HOST, "app1", "app", "10.231.0.31", ["10.231.0.32"]),
    (EDGE_ON_AN_APP_HOST, "app2", "app", "10.231.0.32", ["10.231.0.31"]),
]


def own_private_address(inventory, host: str) -> str:
    """The roles' default of streamgate_private_address: ansible_host, else the host's name."""
    hostvars, _ = inventory
    return hostvars[host].get("streamgate_private_address") or filters.private_address(
        host, hostvars
    )


def helpers_view(inventory, host: str) -> dict:
    """What testinfra's host.ansible.get_variables() gives the host checks."""
    hostvars, groups = inventory
    return {**hostvars[host], "inventory_hostname": host, "groups": groups}


@pytest.mark.parametrize(("inventory", "host", "clients", "served", "sources"), CASES)
def test_where_a_service_listens_and_who_reaches_it(inventory, host, clients, served, sources):
    hostvars, groups = inventory
    address = own_private_address(inventory, host)
    assert filters.served_address(groups[clients], host, address) == served
    assert filters.client_addresses(groups[clients], host, hostvars) == sources
    assert served_address(helpers_view(inventory, host), clients) == served
    doctors_view = Inventory(Path("hosts.yml"), groups, hostvars)
    assert advertised_address(doctors_view, host, clients) == served


def loopback_when_among_the_clients(clients, host, own_address):
    return "127.0.0.1" if host in clients else own_address


def test_negative_control_a_rule_with_loopback_among_several_clients_is_told_apart():
    wrong = [
        (host, clients)
        for inventory, host, clients, served, _ in CASES
        if loopback_when_among_the_clients(
            inventory[1][clients], host, own_private_address(inventory, host)
        )
        != served
    ]
    assert wrong == [("app1", "app"), ("app2", "app")]
