"""On each app host that streams from the llm host: the gateway relays llama.cpp's stream
exactly. The same greedy answer is asked from the engine directly and through this host's
gateway, from this host (the only place both answer: the engine's firewall lets app hosts in,
the gateway's only the edge), and every event must match field for field (support/passthrough.py
says what may differ between two requests). Control: the gateway's word granularity, which
rebuilds the chunks, must be seen as different.
"""

from __future__ import annotations

import pytest
from support import passthrough, stream_probe
from support.upstream import SIMULATOR, setting, upstream_kind

from infra.helpers import LLM_SERVICE, check_output_as_root, probe_from, service_url

testinfra_hosts = ["ansible://app"]

COMPLETIONS = "/v1/chat/completions"


@pytest.fixture(scope="module")
def llm_base_url(host, hostvars, inventory_host) -> str:
    """The llm host's URL, which this app host's gateway must stream from; skipped when the
    inventory points the app hosts at the simulator."""
    groups = hostvars["groups"]
    if not groups.get("llm"):
        pytest.skip("no llm host in the inventory")
    if upstream_kind(hostvars, groups) == SIMULATOR:
        pytest.skip("the app hosts stream from the simulator")
    llm_name = groups["llm"][0]
    llm_vars = inventory_host(llm_name).ansible.get_variables()
    url = f"{service_url(llm_vars, LLM_SERVICE)}/v1"
    # The inventory says openai-compatible: the gateway must really be on the llm host, or every
    # check below would be a check of some other server.
    # Only that line is read: the file also holds the upstream's key, which no log may show.
    env_file = setting(hostvars, "streamgate_env_file")
    line = check_output_as_root(host, f"grep '^STREAMGATE_UPSTREAM_BASE_URL=' {env_file}").strip()
    assert line.split("=", 1)[1].strip('"') == url, (line, url)
    return url


def answer(host, url: str, body: dict, key: str | None = None) -> list[str]:
    headers = (f"Authorization: Bearer {key}",) if key else ()
    trace = probe_from(host, url, body, headers)
    assert trace.status == 200 and trace.complete, stream_probe.summarize(trace)
    return passthrough.comparable_events(trace.body)


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_gateway_relays_the_engine_stream_exactly(
    host, llm_base_url, bind_address, gateway_port, client_key, include_usage
):
    body = passthrough.request_body(include_usage, max_tokens=24)
    direct = answer(host, f"{llm_base_url}/chat/completions", body)
    assert passthrough.protocol_problems(direct, include_usage) == []
    relayed = answer(host, f"http://{bind_address}:{gateway_port}{COMPLETIONS}", body, client_key)
    assert relayed == direct


def test_negative_control_rebuilt_chunks_are_seen(
    host, llm_base_url, bind_address, gateway_port, client_key
):
    body = passthrough.request_body(include_usage=True, max_tokens=24)
    direct = answer(host, f"{llm_base_url}/chat/completions", body)
    gateway = f"http://{bind_address}:{gateway_port}{COMPLETIONS}"
    assert answer(host, gateway, {**body, "granularity": "word"}, client_key) != direct
