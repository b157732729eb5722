"""Operations on a deployed lab, under load: `pytest tests/ops --ansible-inventory=INVENTORY`.

These tests change the deployment (they re-run site.yml with other settings and another build
of the code, stop and kill services), so they run on the lab only (`make test-lab`), never as
part of `make testinfra` against real hosts. Hosts are reached as testinfra reaches them (the
inventory's SSH access); the load goes through the edge as users' does (HTTPS, client key).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import testinfra
import yaml

REPO = Path(__file__).resolve().parents[2]
OPS_TEST_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(OPS_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def groups(inventory) -> dict[str, dict[str, dict]]:
    """group -> {host: its inventory variables} (the lab's inventory is one YAML file)."""
    children = yaml.safe_load(inventory.read_text())["all"]["children"]
    return {
        name: {host: values or {} for host, values in (group.get("hosts") or {}).items()}
        for name, group in children.items()
    }


@pytest.fixture(scope="session")
def edge_url(groups, inventory) -> str:
    name, values = next(iter(groups["edge"].items()))
    assert (inventory.parent / "ca.pem").is_file(), "the lab's edge serves HTTPS with its own CA"
    return f"https://{values.get('ansible_host', name)}/v1/chat/completions"


@pytest.fixture(scope="session")
def load_options(inventory) -> dict:
    """What the load needs to be let in: the lab's CA and client key."""
    return {
        "cafile": str(inventory.parent / "ca.pem"),
        "key": (inventory.parent / "client-key").read_text().strip(),
    }


@pytest.fixture(scope="session")
def lab_host(inventory) -> Callable[[str], testinfra.host.Host]:
    cache: dict[str, testinfra.host.Host] = {}

    def get(name: str) -> testinfra.host.Host:
        if name not in cache:
            cache[name] = testinfra.get_host(f"ansible://{name}", ansible_inventory=str(inventory))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def ops_log_dir(tmp_path_factory) -> Path:
    directory = os.environ.get("STREAMGATE_E2E_LOG_DIR")
    return Path(directory) if directory else tmp_path_factory.mktemp("ops-logs")


@pytest.fixture(scope="session")
def run_site(inventory, ops_log_dir) -> Callable[..., subprocess.CompletedProcess]:
    """run_site(name, *ansible-playbook arguments): site.yml against the lab, its output logged
    (to the e2e's log directory: the secret scan reads it too); fails on a failed play."""

    def run(name: str, *arguments: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
        command = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(inventory),
            "site.yml",
            *arguments,
        ]
        started = time.monotonic()
        result = subprocess.run(
            command,
            cwd=REPO / "ansible",
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        (ops_log_dir / f"ops-{name}.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, (
            f"site.yml ({name}) failed after {time.monotonic() - started:.0f} s:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
        )
        return result

    return run


@pytest.fixture(scope="session")
def changed_build(tmp_path_factory) -> Callable[[str], Path]:
    """changed_build(marker) -> a copy of service/ whose wheel differs by one module: a new
    version of the code, as a release would bring (streamgate_source_dir points the play at it)."""

    def make(marker: str) -> Path:
        source = tmp_path_factory.mktemp("build") / "service"
        shutil.copytree(
            REPO / "service",
            source,
            ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".venv"),
        )
        (source / "streamgate" / "build_marker.py").write_text(
            f'"""Which build of the code this is (the operations tests\' releases)."""\n'
            f"BUILD = {json.dumps(marker)}\n"
        )
        return source

    return make
