"""llama.cpp's server on the llm hosts (the llm role)."""

from __future__ import annotations

import json
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

testinfra_hosts = ["ansible://llm"]

MODEL_DIR = "/var/lib/streamgate-llm"


@pytest.fixture(scope="module")
def llm_port(hostvars) -> int:
    return int(setting(hostvars, "streamgate_llm_port"))


@pytest.fixture(scope="module")
def llm_address(hostvars) -> str:
    """The only address the server may listen on: loopback when every app host is this host."""
    return served_address(hostvars, "app")


def test_server_is_running_and_enabled(host):
    service = host.service("streamgate-llm")
    assert service.is_running
    assert service.is_enabled


def test_server_listens_on_its_private_address_only(host, llm_address, llm_port):
    assert host.socket(f"tcp://{llm_address}:{llm_port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{llm_port}").is_listening


def test_server_has_loaded_the_model(host, llm_address, llm_port):
    """/health answers 200 only once the model is loaded (503 before)."""
    status = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 http://{llm_address}:{llm_port}/health"
    )
    assert status == "200"


def test_server_serves_the_model_under_its_alias(host, hostvars, llm_address, llm_port):
    """The alias the inventory gives, else the role's: test-llama for the generated model."""
    own_model = any(hostvars.get(f"streamgate_llm_model_{way}") for way in ("file", "url"))
    alias = hostvars.get("streamgate_llm_model_alias", "local-gguf" if own_model else "test-llama")
    models = json.loads(
        host.check_output(f"curl -s --max-time 5 http://{llm_address}:{llm_port}/v1/models")
    )
    assert [model["id"] for model in models["data"]] == [alias], models


def test_the_model_is_root_owned_and_read_only_to_the_server(host):
    listing = check_output_as_root(host, f"find {MODEL_DIR} -name '*.gguf' -printf '%u %m %s\\n'")
    files = listing.split("\n")
    assert files and files[0], f"no GGUF model in {MODEL_DIR}"
    for owner, mode, size in (line.split() for line in files if line):
        assert (owner, mode) == ("root", "644"), listing
        assert int(size) > 0, listing
    unit = host.check_output("systemctl show -p ReadOnlyPaths --value streamgate-llm")
    assert MODEL_DIR in unit, unit


def test_firewall_table_guards_the_server_port(host, llm_port):
    ruleset = check_output_as_root(host, "nft list table inet streamgate_llm")
    assert re.search(rf"tcp dport {llm_port} .*reject with tcp reset", ruleset), ruleset


def test_only_the_app_hosts_reach_the_server(host, hostvars, llm_address, inventory_host, llm_port):
    """Every app host connects; the edge, other hosts and the controller are refused."""
    if llm_address == "127.0.0.1":
        pytest.skip("the server serves only this host, on loopback")
    assert_only_group_reaches(hostvars, inventory_host, "app", llm_address, llm_port)


@pytest.mark.parametrize(
    ("unit_property", "pattern"),
    [
        ("MemoryMax", r"^[0-9]+$"),
        ("TasksMax", r"^[0-9]+$"),
        ("Wants", r"streamgate-firewall@llm\.service"),
        ("DynamicUser", r"^yes$"),
    ],
)
def test_unit_resource_bounds_firewall_and_user(host, unit_property, pattern):
    value = host.check_output(f"systemctl show -p {unit_property} --value streamgate-llm")
    assert re.search(pattern, value), (unit_property, value)


def test_server_security_exposure_is_at_most_two(host):
    assert security_exposure(host, "streamgate-llm.service") <= MAX_EXPOSURE
