"""The doctor's hops from an inventory: which hops, in which order, probed from where
(streamgate/doctor/hops.py). Probing them on a real deployment: tests/doctor_lab."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from streamgate.doctor import cli, hops
from support.upstream import role_variables

SSH_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


def listing(
    edge: list[str],
    app: list[str],
    simulator: list[str],
    hostvars: dict | None = None,
    llm: tuple[str, ...] = (),
) -> dict:
    """An `ansible-inventory --list` answer like the lab's."""
    everyone = dict.fromkeys([*edge, *app, *simulator, *llm])
    common = {
        "ansible_user": "lab",
        "ansible_ssh_private_key_file": "/keys/id",
        "ansible_ssh_common_args": SSH_ARGS,
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    return {
        "_meta": {
            "hostvars": {
                host: {
                    **common,
                    "ansible_host": f"10.0.0.{index}",
                    **(hostvars or {}).get(host, {}),
                }
                for index, host in enumerate(everyone, start=10)
            }
        },
        "all": {"children": ["ungrouped", "edge", "app", "simulator", "llm"]},
        "llm": {"hosts": list(llm)},
        "edge": {"hosts": edge},
        "app": {"hosts": app},
        "simulator": {"hosts": simulator},
    }


def inventory_of(answer: dict, directory: Path = Path("/nonexistent")) -> hops.Inventory:
    return hops.Inventory(
        directory / "hosts.yml", hops.groups_of(answer), answer["_meta"]["hostvars"]
    )


SPLIT = listing(
    ["edge"],
    ["app1", "app2"],
    ["sim"],
    {"app1": {"streamgate_upstream_base_url": "{{ __streamgate_simulator_url }}"}},
)


@pytest.mark.parametrize("name", sorted(hops.ROLE_DEFAULTS))
def test_role_defaults_are_the_roles_own(name):
    assert hops.ROLE_DEFAULTS[name] == role_variables()[name]


def test_split_deployment_hops_in_path_order_each_from_its_client():
    found = hops.build_hops(inventory_of(SPLIT))

    assert [(hop.name, hop.url, hop.via, hop.key) for hop in found] == [
        ("upstream", "http://10.0.0.13:8100/v1/chat/completions", "app1", "upstream"),
        ("gateway:app1", "http://10.0.0.11:8000/v1/chat/completions", "edge", "client"),
        ("gateway:app2", "http://10.0.0.12:8000/v1/chat/completions", "edge", "client"),
        ("nginx:edge", "https://127.0.0.1:443/v1/chat/completions", "edge", "client"),
        ("public", "https://10.0.0.10/v1/chat/completions", None, "client"),
    ]


def test_the_public_hop_verifies_with_the_ca_next_to_the_inventory(tmp_path):
    (tmp_path / hops.CA_FILE_NAME).write_text("a CA")
    public = hops.build_hops(inventory_of(SPLIT, tmp_path))[-1]

    assert public.options == ("--cacert", str(tmp_path / hops.CA_FILE_NAME))


def test_a_front_url_is_the_last_hop():
    found = hops.build_hops(inventory_of(SPLIT), front="https://cdn.example/v1/chat/completions")

    assert (found[-1].name, found[-1].url, found[-1].via) == (
        "front",
        "https://cdn.example/v1/chat/completions",
        None,
    )


def test_single_host_gateway_is_reached_on_loopback():
    single = listing(["one"], ["one"], ["one"])
    by_name = {hop.name: hop for hop in hops.build_hops(inventory_of(single))}

    assert by_name["gateway:one"].url == "http://127.0.0.1:8000/v1/chat/completions"
    assert by_name["upstream"].url == "http://127.0.0.1:8100/v1/chat/completions"


@pytest.mark.parametrize(
    ("app_vars", "llm", "upstream"),
    [
        # The role's default: the kit's llm host first...
        ({}, ("llm",), "http://10.0.0.13:8080/v1"),
        # ...the simulator only without an upstream key...
        ({}, (), "http://10.0.0.12:8100/v1"),
        ({"streamgate_upstream_api_key": "{{ vault_key }}"}, (), "https://api.openai.com/v1"),
        # ...unless the URL names it (the lab's group_vars), whatever else the inventory has.
        (
            {
                "streamgate_upstream_api_key": "{{ vault_key }}",
                "streamgate_upstream_base_url": "{{ __streamgate_simulator_url }}",
            },
            ("llm",),
            "http://10.0.0.12:8100/v1",
        ),
        (
            {"streamgate_upstream_base_url": "{{ __streamgate_llm_url }}"},
            ("llm",),
            "http://10.0.0.13:8080/v1",
        ),
    ],
)
def test_the_upstream_is_the_one_the_app_role_picks(app_vars, llm, upstream):
    answer = listing(["edge"], ["app"], ["sim"], {"app": app_vars}, llm=llm)

    assert hops.upstream_url(inventory_of(answer), "app") == upstream


def test_each_distinct_upstream_is_a_hop_and_plain_http_edges_are_probed_so():
    answer = listing(
        ["edge"],
        ["app1", "app2"],
        [],
        {
            "app1": {"streamgate_upstream_base_url": "http://vllm.internal:8000/v1/"},
            "app2": {"streamgate_upstream_base_url": "http://ollama.internal:11434/v1"},
            "edge": {"nginx_tls": False, "nginx_listen": "0.0.0.0:8080"},
        },
    )
    by_name = {hop.name: hop for hop in hops.build_hops(inventory_of(answer))}

    assert by_name["upstream"].url == "http://vllm.internal:8000/v1/chat/completions"
    assert by_name["upstream:app2"].url == "http://ollama.internal:11434/v1/chat/completions"
    assert by_name["nginx:edge"].url == "http://127.0.0.1:8080/v1/chat/completions"
    assert by_name["public"].url == "http://10.0.0.10:8080/v1/chat/completions"


def test_an_upstream_template_without_a_simulator_is_refused_not_guessed():
    answer = listing(["edge"], ["app"], [], {"app": {"streamgate_upstream_base_url": "{{ x }}/v1"}})

    with pytest.raises(ValueError, match="template"):
        hops.build_hops(inventory_of(answer))


def test_remote_probes_go_over_ansibles_ssh_with_the_probe_on_stdin_and_no_key_in_argv():
    inventory = inventory_of(SPLIT)
    gateway = next(hop for hop in hops.build_hops(inventory) if hop.name == "gateway:app2")
    command = hops.probe_command(gateway, inventory, ["--timeout", "5"])

    assert command[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    assert ["-i", "/keys/id"] == command[5:7]
    assert command[7:11] == SSH_ARGS.split()
    assert command[11] == "lab@10.0.0.10"
    assert command[12] == (
        "/usr/bin/python3 - http://10.0.0.12:8000/v1/chat/completions --timeout 5"
    )


def test_a_probe_that_cannot_run_is_a_result_with_its_error(tmp_path):
    answer = listing(
        ["edge"],
        ["app"],
        [],
        {
            "edge": {"ansible_host": "127.0.0.1", "ansible_port": 1},
            "app": {"streamgate_upstream_base_url": "http://127.0.0.1:9/v1"},
        },
    )
    inventory = inventory_of(answer, tmp_path)
    hop = next(hop for hop in hops.build_hops(inventory) if hop.via == "edge")
    result = hops.probe_hop(hop, inventory, [], keys={}, timeout_s=1)

    assert result["url"] == hop.url
    assert "ssh edge failed" in result["error"]


def test_the_remote_script_runs_the_probe_with_the_key_from_stdin():
    """What a host runs (`python3 - URL`): the probe's JSON, the key only on standard input."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "-", f"http://127.0.0.1:{port}/v1/chat/completions", "--timeout", "2"],
            input=hops.remote_script("sk-the-key"),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        connection, _ = server.accept()
        with connection:
            request = connection.recv(65536)

    assert b"Authorization: Bearer sk-the-key" in request
    assert json.loads(completed.stdout)["url"] == f"http://127.0.0.1:{port}/v1/chat/completions"


def test_hop_mode_with_an_inventory_without_an_edge_exits_2_saying_so(tmp_path, capsys):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  children:\n    app:\n      hosts:\n        app1:\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["--inventory", str(inventory)])

    assert exited.value.code == 2
    assert "needs hosts in the groups 'app' and 'edge'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "authorization"),
    [
        (hops.CLIENT_KEY, b"Bearer the-client-key"),
        (hops.UPSTREAM_KEY, b"Bearer sk-upstream"),
        (None, None),
    ],
)
def test_each_hop_gets_only_the_key_its_server_checks(kind, authorization):
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/chat/completions"
        hop = hops.Hop("hop", url, key=kind)
        keys = {hops.CLIENT_KEY: "the-client-key", hops.UPSTREAM_KEY: "sk-upstream"}
        received: list[bytes] = []

        def answer() -> None:
            connection, _ = server.accept()
            with connection:
                received.append(connection.recv(65536))
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        result = hops.probe_hop(hop, inventory_of(SPLIT), ["--timeout", "5"], keys, timeout_s=5)
        thread.join(timeout=5)

    assert result["status"] == 200
    found = [line for line in received[0].split(b"\r\n") if line.startswith(b"Authorization:")]
    assert found == ([b"Authorization: " + authorization] if authorization else [])
