"""No log the stack writes shows a secret: the upstream API key or a client key.

Also the private keys the play made for TLS (the CA's, each edge's), by their key material.

Read: the gateway's journal and `systemctl show` on every app host, the simulator's journal,
every nginx log on the edge hosts, and, when STREAMGATE_E2E_LOG_DIR names the end-to-end run's
log directory, the output of its `ansible-playbook -v` runs and load test. The secrets are those
the lab wrote next to the inventory (client-key, upstream-key) plus STREAMGATE_CLIENT_KEY.

Negative control: a canary sent as a request id through nginx and straight to a gateway must be
found by the same collection in the edge's access log and in a gateway journal, so a scan that
reads nothing (a wrong path, an empty journal) cannot pass.
"""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path

import pytest
from support.ci import skip_unless_ci
from support.upstream import setting
from testinfra.utils.ansible_runner import AnsibleRunner

from infra.helpers import check_output_as_root, private_address

SECRET_FILES = ("client-key", "upstream-key")


@pytest.fixture(scope="module")
def inventory_groups(request) -> dict[str, list[str]]:
    inventory = request.config.option.ansible_inventory
    if not inventory:
        skip_unless_ci("needs --ansible-inventory")
    runner = AnsibleRunner(inventory)
    return {group: sorted(runner.get_hosts(group)) for group in ("edge", "app", "simulator")}


@pytest.fixture(scope="module")
def known_secrets(request) -> dict[str, str]:
    found = {}
    inventory = request.config.option.ansible_inventory
    for name in SECRET_FILES:
        path = Path(inventory).parent / name if inventory else None
        if path and path.is_file() and path.read_text().strip():
            found[name] = path.read_text().strip()
    # Private keys the play made (the CA's, each edge's): their first line of key material.
    if inventory:
        for path in [
            Path(inventory).parent / "ca-key.pem",
            *sorted((Path(inventory).parent / "tls").glob("*.key")),
        ]:
            material = (
                [
                    line
                    for line in path.read_text().splitlines()
                    if line and not line.startswith("-----")
                ]
                if path.is_file()
                else []
            )
            if material:
                found[f"private key {path.name}"] = material[0]
    if os.environ.get("STREAMGATE_CLIENT_KEY"):
        found["STREAMGATE_CLIENT_KEY"] = os.environ["STREAMGATE_CLIENT_KEY"]
    if not found:
        skip_unless_ci(
            "no secrets known (client-key / upstream-key next to the inventory, "
            "STREAMGATE_CLIENT_KEY)"
        )
    return found


def collect_logs(inventory_host, groups: dict[str, list[str]]) -> dict[str, str]:
    """{where: text} of every log the stack writes, read as root on each host."""
    logs = {}
    for name in groups["app"]:
        app = inventory_host(name)
        logs[f"{name}: journal of streamgate"] = check_output_as_root(
            app, "journalctl -u streamgate --no-pager -o cat"
        )
        logs[f"{name}: systemctl show streamgate"] = app.check_output("systemctl show streamgate")
    for name in groups["simulator"]:
        logs[f"{name}: journal of streamgate-sim"] = check_output_as_root(
            inventory_host(name), "journalctl -u streamgate-sim --no-pager -o cat"
        )
    for name in groups["edge"]:
        edge = inventory_host(name)
        for path in check_output_as_root(edge, "ls /var/log/nginx").split():
            logs[f"{name}: /var/log/nginx/{path}"] = check_output_as_root(
                edge, f"cat /var/log/nginx/{shlex.quote(path)}"
            )
    run_logs = os.environ.get("STREAMGATE_E2E_LOG_DIR")
    if run_logs:
        for path in sorted(Path(run_logs).glob("*.log")):
            logs[f"controller: {path.name}"] = path.read_text(errors="replace")
    return logs


def leaks(logs: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """'<secret name> in <where>' for every secret found in every log."""
    return [
        f"{secret} in {where}"
        for secret, value in wanted.items()
        for where, text in logs.items()
        if value in text
    ]


def app_address(inventory_host, name: str, groups: dict[str, list[str]]) -> str:
    """Where the edge reaches this app host (loopback when it is the only edge host)."""
    if groups["edge"] == [name]:
        return "127.0.0.1"
    return private_address(inventory_host(name).ansible.get_variables())


def test_leak_finder_reports_a_secret_it_sees():
    assert leaks({"x": "a line with s3cret in it"}, {"key": "s3cret"}) == ["key in x"]
    assert leaks({"x": "a clean line"}, {"key": "s3cret"}) == []


def test_collection_sees_what_requests_put_in_the_logs(inventory_host, inventory_groups):
    """Negative control of the scan below: a canary in a request id shows in both kinds of log."""
    canary = f"canary-{secrets.token_hex(8)}"
    edge = inventory_host(inventory_groups["edge"][0])
    # Plain HTTP /healthz is proxied with TLS on or off; the app host is reached as nginx does.
    plain_port = setting(edge.ansible.get_variables(), "nginx_listen")
    edge.run_expect(
        [0],
        f"curl -s -o /dev/null --max-time 5 -H 'X-Request-ID: {canary}' "
        f"http://127.0.0.1:{plain_port}/healthz",
    )
    for name in inventory_groups["app"]:
        address = app_address(inventory_host, name, inventory_groups)
        port = setting(inventory_host(name).ansible.get_variables(), "streamgate_port")
        edge.run_expect(
            [0],
            f"curl -s -o /dev/null --max-time 5 -H 'X-Request-ID: {canary}' "
            f"-H 'Content-Type: application/json' -d '{{\"prompt\": \"hi\"}}' "
            f"http://{address}:{port}/v1/chat/stream",
        )
    logs = collect_logs(inventory_host, inventory_groups)
    seen = [where for where, text in logs.items() if canary in text]
    assert any("nginx" in where for where in seen), sorted(logs)
    # The gateway's own journal ("journal of streamgate" alone would also match the simulator's).
    assert any(where.endswith(": journal of streamgate") for where in seen), sorted(logs)


def test_no_log_shows_a_secret(inventory_host, inventory_groups, known_secrets):
    logs = collect_logs(inventory_host, inventory_groups)
    assert logs and all(isinstance(text, str) for text in logs.values())
    assert leaks(logs, known_secrets) == []
