"""testinfra checks of deployed hosts: `make testinfra` (hosts from the inventory).

Each module names its group in `testinfra_hosts`; tests that take no `host` (the validation
play, parser checks) run once on the controller. Commands that need root run in
`host.sudo()`: the inventory's SSH user is an ordinary sudo-capable user, as on cloud VMs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# testinfra's ansible backend runs `ansible-inventory`: take the one next to this Python
# (the project venv) even when the venv is not activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "infra" in item.path.parts and item.get_closest_marker("timeout") is None:
            # A host that stops answering must fail the run, not hang it.
            item.add_marker(pytest.mark.timeout(120))
