"""testinfra checks of deployed hosts: `make testinfra` (hosts from the inventory).

Each module names its group in `testinfra_hosts`. `make testinfra` passes `--hosts=ansible://all`,
which testinfra lets override every module's own list, so the collection hook below keeps each
host test only for the hosts of its module's groups (a test parametrized with a `service`: of
that service's group). Tests that take no `host` (the validation
play, parser checks) run once on the controller. Commands that need root run in `host.sudo()`:
the inventory's SSH user is an ordinary sudo-capable user, as on cloud VMs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import testinfra
from support import upstream
from testinfra.utils.ansible_runner import AnsibleRunner

from infra.helpers import Service, served_address

# A host that stops answering must fail the run, not hang it.
HOST_TEST_TIMEOUT_S = 120


def hosts_in(runner: AnsibleRunner, specs: list[str]) -> set[str]:
    """Inventory hosts named by testinfra specs such as "ansible://app" or "ansible://all"."""
    names: set[str] = set()
    for spec in specs:
        for pattern in spec.removeprefix("ansible://").split(":"):
            names.update(runner.get_hosts(pattern))
    return names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    inventory = config.option.ansible_inventory
    runner = AnsibleRunner(inventory) if inventory else None
    kept, deselected = [], []
    for item in items:
        if "infra" in item.path.parts and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(HOST_TEST_TIMEOUT_S))
        params = item.callspec.params if hasattr(item, "callspec") else {}
        host = params.get("_testinfra_host")
        # A test of one of the kit's services (test_services.py) runs on that service's hosts.
        service = params.get("service")
        specs = (
            [f"ansible://{service.group}"]
            if isinstance(service, Service)
            else getattr(item.module, "testinfra_hosts", None)
        )
        if runner is None or host is None or specs is None:
            kept.append(item)
            continue
        name = host.backend.get_pytest_id().split("://", 1)[-1]
        (kept if name in hosts_in(runner, specs) else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(scope="session")
def inventory_host(request):
    """Another host of the inventory by name (to look at a host from its neighbours)."""
    inventory = request.config.option.ansible_inventory
    cache: dict[str, testinfra.host.Host] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def hostvars(host) -> dict:
    """The inventory variables of the host under test (groups, ansible_host, ...)."""
    return host.ansible.get_variables()


@pytest.fixture(scope="module")
def gateway_port(hostvars) -> int:
    return int(upstream.setting(hostvars, "streamgate_port"))


@pytest.fixture(scope="module")
def bind_address(hostvars) -> str:
    """The only address an app host's gateway may listen on: loopback when this host is the
    only edge."""
    return served_address(hostvars, "edge")


@pytest.fixture(scope="session")
def client_key(request) -> str | None:
    """The client key the tests send: STREAMGATE_CLIENT_KEY, else the `client-key` file next to
    the inventory (the lab writes one); None when neither exists (a gateway without keys)."""
    if os.environ.get("STREAMGATE_CLIENT_KEY"):
        return os.environ["STREAMGATE_CLIENT_KEY"]
    inventory = request.config.option.ansible_inventory
    key_file = Path(inventory).parent / "client-key" if inventory else None
    return key_file.read_text().strip() if key_file and key_file.is_file() else None


@pytest.fixture(scope="session")
def upstream_kind(request) -> str:
    """What the app hosts stream from, as the inventory says (support/upstream.py): the
    simulator's text is compared only when it is the simulator."""
    inventory = request.config.option.ansible_inventory
    if not inventory:
        pytest.skip("no inventory: the upstream's kind is unknown")
    return upstream.deployment_upstream_kind(upstream.inventory_listing(Path(inventory)))
