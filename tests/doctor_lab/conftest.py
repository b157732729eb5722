"""The doctor on a deployed split lab: `pytest tests/doctor_lab --ansible-inventory=INVENTORY`.

These tests inject faults into the running deployment (and take each back out), so they run on
the lab only (tests/e2e/lab_e2e.sh, split topology), never against real hosts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support.ci import skip_unless_ci

# ansible-inventory (which the doctor runs) is the one next to this Python (the venv).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def inventory_path(request) -> Path:
    path = request.config.option.ansible_inventory
    if not path:
        skip_unless_ci("needs --ansible-inventory (the split lab's)")
    return Path(path).resolve()
