"""Bad input stops site.yml at its first play, with a message naming the variable.

Runs validate.yml (the play site.yml imports first) against a made-up inventory: the play
never connects to a host, so nothing anywhere changes. The good inventory must pass
(negative control: the check does not fail everything).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"

SPLIT_INVENTORY = {
    "all": {
        "children": {
            "edge": {"hosts": {"edge1": {"ansible_host": "192.0.2.10"}}},
            "app": {
                "hosts": {
                    "app1": {"ansible_host": "192.0.2.11"},
                    "app2": {"ansible_host": "192.0.2.12"},
                }
            },
            "simulator": {"hosts": {"sim1": {"ansible_host": "192.0.2.13"}}},
        }
    }
}


def run_validation(tmp_path: Path, inventory: dict, extra_vars: dict | None = None):
    inventory_file = tmp_path / "hosts.json"
    inventory_file.write_text(json.dumps(inventory))
    command = [str(PLAYBOOK_BIN), "-i", str(inventory_file), "validate.yml"]
    if extra_vars:
        command += ["--extra-vars", json.dumps(extra_vars)]
    return subprocess.run(
        command,
        check=False,
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"},
    )


def test_good_inventory_passes(tmp_path):
    result = run_validation(tmp_path, SPLIT_INVENTORY)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize(
    ("extra_vars", "expected_message"),
    [
        ({"streamgate_port": "80x"}, "argument 'streamgate_port' is of type str"),
        ({"streamgate_port": 70000}, "streamgate_port must be a TCP port number from 1 to 65535"),
        ({"streamgate_sim_port": 0}, "streamgate_sim_port must be a TCP port number"),
        ({"streamgate_upstream_base_url": "api.openai.com/v1"}, "streamgate_upstream_base_url must be an http:// or https:// URL"),
        ({"streamgate_bind": "0.0.0.0:9000"}, 'streamgate_bind must be "ADDRESS:8000"'),
        ({"streamgate_keepalive_s": 30}, "streamgate_keepalive_s (30) must be greater than nginx_upstream_keepalive_timeout"),
        ({"streamgate_graceful_timeout_s": 60}, "streamgate_graceful_timeout_s (60) must be at least streamgate_total_timeout_s"),
        ({"streamgate_log_level": "loud"}, "value of streamgate_log_level must be one of"),
        ({"streamgate_upstream_transport": "fast"}, "value of streamgate_upstream_transport must be one of"),
        ({"streamgate_proxy_env": "http://proxy:3128"}, "argument 'streamgate_proxy_env' is of type str"),
        ({"nginx_listen": "everywhere"}, 'nginx_listen must be "PORT" or "ADDRESS:PORT"'),
        ({"nginx_upstream_servers": ["app1"]}, 'each nginx_upstream_servers item must be "HOST:PORT"'),
        ({"nginx_worker_connections": "many"}, "argument 'nginx_worker_connections' is of type str"),
        ({"common_extra_ca_certificates": {"a": 1}}, "argument 'common_extra_ca_certificates' is of type dict"),
    ],
)
def test_bad_variable_fails_with_a_message_naming_it(tmp_path, extra_vars, expected_message):
    result = run_validation(tmp_path, SPLIT_INVENTORY, extra_vars)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert expected_message in output, output[-3000:]


def test_inventory_without_app_hosts_is_refused(tmp_path):
    inventory = {"all": {"children": {"edge": {"hosts": {"edge1": {}}}}}}
    result = run_validation(tmp_path, inventory)
    assert result.returncode != 0
    assert "needs at least one host in group 'app'" in result.stdout + result.stderr


def test_no_upstream_at_all_is_refused(tmp_path):
    inventory = json.loads(json.dumps(SPLIT_INVENTORY))
    del inventory["all"]["children"]["simulator"]
    result = run_validation(tmp_path, inventory)
    assert result.returncode != 0
    assert "streamgate_upstream_api_key is empty" in result.stdout + result.stderr
    # ... and a key (or a base URL) is enough.
    assert run_validation(tmp_path, inventory, {"streamgate_upstream_api_key": "sk-test"}).returncode == 0
