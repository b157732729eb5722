"""llama.cpp's server on the llm hosts (the llm role): its model. What every server of the kit
shares (running, bound where its clients reach it, healthy: the model loaded, firewall, bounds,
sandbox) is checked in test_services.py."""

from __future__ import annotations

import json

import pytest

from infra.helpers import LLM_SERVICE, check_output_as_root, service_url

testinfra_hosts = ["ansible://llm"]

MODEL_DIR = "/var/lib/streamgate-llm"


@pytest.fixture(scope="module")
def llm_url(hostvars) -> str:
    return service_url(hostvars, LLM_SERVICE)


def test_server_serves_the_model_under_its_alias(host, hostvars, llm_url):
    """The alias the inventory gives, else the role's: test-llama for the generated model."""
    own_model = any(hostvars.get(f"streamgate_llm_model_{way}") for way in ("file", "url"))
    alias = hostvars.get("streamgate_llm_model_alias", "local-gguf" if own_model else "test-llama")
    models = json.loads(host.check_output(f"curl -s --max-time 5 {llm_url}/v1/models"))
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
