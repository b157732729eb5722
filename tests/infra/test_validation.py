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

# Two client keys of 32+ characters: a good inventory has keys (auth is on by default).
GOOD_KEYS = [
    {"name": "web", "key": "k" * 32},
    {"name": "batch-jobs.v2", "key": "a-second-key-that-is-long-enough-0123"},
]
# A PEM-shaped stand-in: validate.yml checks the form, never the content.
CERTIFICATE = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
SPLIT_INVENTORY = {
    "all": {
        "vars": {"streamgate_client_keys": GOOD_KEYS},
        "children": {
            "edge": {"hosts": {"edge1": {"ansible_host": "192.0.2.10"}}},
            "app": {
                "hosts": {
                    "app1": {"ansible_host": "192.0.2.11"},
                    "app2": {"ansible_host": "192.0.2.12"},
                }
            },
            "simulator": {"hosts": {"sim1": {"ansible_host": "192.0.2.13"}}},
            "llm": {"hosts": {"llm1": {"ansible_host": "192.0.2.14"}}},
        },
    }
}


def run_validation(
    tmp_path: Path, inventory: dict, extra_vars: dict | None = None, verbose: bool = False
):
    inventory_file = tmp_path / "hosts.json"
    inventory_file.write_text(json.dumps(inventory))
    command = [
        str(PLAYBOOK_BIN),
        "-i",
        str(inventory_file),
        "validate.yml",
        *(["-vv"] if verbose else []),
    ]
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


def test_good_cors_origins_pass(tmp_path):
    """The control of the origin check below: origins as browsers send them."""
    origins = ["https://chat.example.org", "http://localhost:3000", "https://[2001:db8::1]:8443"]
    result = run_validation(tmp_path, SPLIT_INVENTORY, {"nginx_cors_allowed_origins": origins})
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize(
    ("extra_vars", "expected_message"),
    [
        ({"streamgate_port": "80x"}, "argument 'streamgate_port' is of type str"),
        ({"streamgate_port": 70000}, "streamgate_port must be a TCP port number from 1 to 65535"),
        ({"streamgate_sim_port": 0}, "streamgate_sim_port must be a TCP port number"),
        (
            {"streamgate_upstream_base_url": "api.openai.com/v1"},
            "streamgate_upstream_base_url must be an http:// or https:// URL",
        ),
        ({"streamgate_bind": "0.0.0.0:9000"}, 'streamgate_bind must be "ADDRESS:8000"'),
        (
            {"streamgate_keepalive_s": 30},
            "streamgate_keepalive_s (30) must be greater than nginx_upstream_keepalive_timeout",
        ),
        (
            {"streamgate_graceful_timeout_s": 60},
            "streamgate_graceful_timeout_s (60) must be at least streamgate_total_timeout_s",
        ),
        ({"streamgate_log_level": "loud"}, "value of streamgate_log_level must be one of"),
        (
            {"streamgate_upstream_transport": "fast"},
            "value of streamgate_upstream_transport must be one of",
        ),
        (
            {"streamgate_proxy_env": "http://proxy:3128"},
            "argument 'streamgate_proxy_env' is of type str",
        ),
        (
            {"streamgate_proxy_env": {"HTTPS PROXY": "http://proxy:3128"}},
            "streamgate_proxy_env: each name must be an environment variable name",
        ),
        (
            {"streamgate_proxy_env": {"HTTPS_PROXY": "http://a\nb"}},
            "streamgate_proxy_env: each name must be",
        ),
        (
            {"streamgate_firewall_sources": ["edge.example.org"]},
            "streamgate_firewall_sources must list IP addresses or CIDR networks",
        ),
        (
            {"streamgate_sim_firewall_sources": "10.0.0.0/8"},
            "streamgate_sim_firewall_sources must list IP addresses or CIDR networks",
        ),
        ({"streamgate_llm_port": 0}, "streamgate_llm_port must be a TCP port number"),
        ({"streamgate_llm_threads": "many"}, "argument 'streamgate_llm_threads' is of type str"),
        ({"streamgate_llm_server": "docker"}, "value of streamgate_llm_server must be one of"),
        (
            {"streamgate_llm_firewall_sources": ["app1.example.org"]},
            "streamgate_llm_firewall_sources must list IP addresses or CIDR networks",
        ),
        (
            {"streamgate_llm_model_file": "/nonexistent/model.gguf"},
            'streamgate_llm_model_file names "/nonexistent/model.gguf", which is not a file',
        ),
        (
            {"streamgate_llm_model_url": "http://files.internal/models/m.gguf"},
            'streamgate_llm_model_checksum must be "sha256:" and 64 hex digits',
        ),
        (
            {
                "streamgate_llm_model_url": "files.internal/m.gguf",
                "streamgate_llm_model_checksum": "sha256:" + "0" * 64,
            },
            "streamgate_llm_model_url must be an http:// or https:// URL of a file",
        ),
        (
            {
                "streamgate_llm_model_url": "http://files.internal/m.gguf",
                "streamgate_llm_model_file": "/etc/hostname",
            },
            "streamgate_llm_model_file and streamgate_llm_model_url are both set",
        ),
        ({"nginx_cors_allowed_origins": ["*"]}, "each nginx_cors_allowed_origins item must be"),
        (
            {"nginx_cors_allowed_origins": ["https://chat.example.org/app"]},
            "each nginx_cors_allowed_origins item must be",
        ),
        (
            {"nginx_cors_allowed_origins": ["chat.example.org"]},
            "each nginx_cors_allowed_origins item must be",
        ),
        ({"nginx_listen": "everywhere"}, 'nginx_listen must be "PORT" or "ADDRESS:PORT"'),
        (
            {"nginx_upstream_servers": ["app1"]},
            'each nginx_upstream_servers item must be "HOST:PORT"',
        ),
        (
            {"nginx_worker_connections": "many"},
            "argument 'nginx_worker_connections' is of type str",
        ),
        (
            {"common_extra_ca_certificates": {"a": 1}},
            "argument 'common_extra_ca_certificates' is of type dict",
        ),
        (
            {"streamgate_client_keys": []},
            "streamgate_client_auth is on (the default) and streamgate_client_keys is empty",
        ),
        (
            {"streamgate_client_keys": [{"name": "web", "key": "short-key-31-characters-long-xx"}]},
            'streamgate_client_keys item 0 ("web"): each item needs a name',
        ),
        (
            {"streamgate_client_keys": [{"name": "has space", "key": "k" * 40}]},
            "streamgate_client_keys item 0",
        ),
        (
            {
                "streamgate_client_keys": [
                    {"name": "web", "key": "k" * 40},
                    {"name": "web", "key": "j" * 40},
                ]
            },
            "streamgate_client_keys: each name and each key may appear once",
        ),
        (
            {
                "streamgate_client_keys": [
                    {"name": "web", "key": "k" * 40},
                    {"name": "other", "key": "k" * 40},
                ]
            },
            "streamgate_client_keys: each name and each key may appear once",
        ),
        ({"streamgate_client_keys": [{"name": "web"}]}, "streamgate_client_keys"),
        (
            {"streamgate_allowed_models": ["sim"]},
            "must list each name once and include streamgate_default_model",
        ),
        ({"streamgate_max_tokens_limit": 0}, "streamgate_max_tokens_limit (0) and"),
        ({"streamgate_max_n": -1}, "streamgate_max_n (-1) must be null or a whole"),
        (
            {"nginx_worker_connections": 0},
            "nginx_worker_connections must be a whole number above 0",
        ),
        (
            {"nginx_limit_rate_per_key": 0},
            "nginx_limit_rate_per_key must be a whole number above 0",
        ),
        (
            {"nginx_limit_streams_per_key": 0},
            "nginx_limit_streams_per_key must be a whole number above 0",
        ),
        ({"nginx_limit_burst": 0}, "nginx_limit_burst must be a whole number above 0"),
        (
            {"nginx_limit_rate_per_ip_unauthenticated": 0},
            "nginx_limit_rate_per_ip_unauthenticated must be a whole number above 0",
        ),
        (
            {"nginx_tls_certificate": CERTIFICATE},
            "nginx_tls_certificate is set without nginx_tls_certificate_key",
        ),
        (
            {"nginx_tls_certificate_key_file": "/etc/hostname"},
            "nginx_tls_certificate_file is set without nginx_tls_certificate_key_file",
        ),
        (
            {
                "nginx_tls_certificate_file": "/nonexistent/fullchain.pem",
                "nginx_tls_certificate_key_file": "/nonexistent/privkey.pem",
            },
            'nginx_tls_certificate_file names "/nonexistent/fullchain.pem", which is not a file',
        ),
        (
            {
                "nginx_tls_certificate": "not a pem",
                "nginx_tls_certificate_key": "-----BEGIN PRIVATE KEY-----\nx",
            },
            "nginx_tls_certificate must be PEM text",
        ),
    ],
)
def test_bad_variable_fails_with_a_message_naming_it(tmp_path, extra_vars, expected_message):
    result = run_validation(tmp_path, SPLIT_INVENTORY, extra_vars)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert expected_message in output, output[-3000:]


def test_edge_given_by_name_is_refused_for_the_firewall(tmp_path):
    """The gateway's firewall default is built from the edge hosts' addresses: names cannot go
    in."""
    inventory = json.loads(json.dumps(SPLIT_INVENTORY))
    inventory["all"]["children"]["edge"]["hosts"]["edge1"] = {"ansible_host": "edge1.example.org"}
    result = run_validation(tmp_path, inventory)
    assert result.returncode != 0
    assert "streamgate_firewall_sources must list IP addresses" in result.stdout + result.stderr
    # ... and its private address (or the firewall's own list) is enough.
    inventory["all"]["children"]["edge"]["hosts"]["edge1"]["streamgate_private_address"] = (
        "10.0.0.10"
    )
    assert run_validation(tmp_path, inventory).returncode == 0


def test_a_certificate_with_its_key_passes_and_the_key_is_never_printed(tmp_path):
    key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----"
    good = {"nginx_tls_certificate": CERTIFICATE, "nginx_tls_certificate_key": key}
    result = run_validation(tmp_path, SPLIT_INVENTORY, good, verbose=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "c2VjcmV0LWtleS1ieXRlcw" not in result.stdout + result.stderr


def test_client_auth_off_needs_no_keys(tmp_path):
    assert (
        run_validation(
            tmp_path,
            SPLIT_INVENTORY,
            {"streamgate_client_auth": False, "streamgate_client_keys": []},
        ).returncode
        == 0
    )


def test_policy_that_lists_the_default_model_passes(tmp_path):
    extra = {
        "streamgate_allowed_models": ["gpt-4o-mini", "fast=gpt-4o-mini"],
        "streamgate_max_tokens_limit": 4096,
        "streamgate_max_n": 2,
    }
    result = run_validation(tmp_path, SPLIT_INVENTORY, extra)
    assert result.returncode == 0, result.stdout[-3000:]


def test_client_keys_never_reach_the_output(tmp_path):
    """Neither a good key (verbose run) nor a refused one is ever printed."""
    short = "s3cret-but-short"
    result = run_validation(
        tmp_path,
        SPLIT_INVENTORY,
        {"streamgate_client_keys": [*GOOD_KEYS, {"name": "x", "key": short}]},
        verbose=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for secret in [short, *(client["key"] for client in GOOD_KEYS)]:
        assert secret not in output
    # Negative control: the same output does carry what is not secret (the names).
    assert '"x"' in output


def test_proxy_values_never_reach_the_output(tmp_path):
    secret = "http://user:s3cret-proxy-password@proxy:3128"
    result = run_validation(
        tmp_path, SPLIT_INVENTORY, {"streamgate_proxy_env": {"BAD NAME": secret}}
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "s3cret-proxy-password" not in output
    # Control: the run failed on the proxy check, which names the variable (not its value).
    assert "streamgate_proxy_env: each name must be" in output and '"BAD NAME" is not' in output


def test_inventory_without_app_hosts_is_refused(tmp_path):
    inventory = {"all": {"children": {"edge": {"hosts": {"edge1": {}}}}}}
    result = run_validation(tmp_path, inventory)
    assert result.returncode != 0
    assert "needs at least one host in group 'app'" in result.stdout + result.stderr


def test_no_upstream_at_all_is_refused(tmp_path):
    inventory = json.loads(json.dumps(SPLIT_INVENTORY))
    del inventory["all"]["children"]["simulator"]
    del inventory["all"]["children"]["llm"]
    result = run_validation(tmp_path, inventory)
    assert result.returncode != 0
    assert "streamgate_upstream_api_key is empty" in result.stdout + result.stderr
    # ... and an llm host, a key (or a base URL) is enough.
    inventory["all"]["children"]["llm"] = SPLIT_INVENTORY["all"]["children"]["llm"]
    assert run_validation(tmp_path, inventory).returncode == 0
    del inventory["all"]["children"]["llm"]
    assert (
        run_validation(tmp_path, inventory, {"streamgate_upstream_api_key": "sk-test"}).returncode
        == 0
    )
