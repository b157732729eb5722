"""gixy-ng, the nginx configuration analyser (pinned in requirements-dev.lock), on one config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

GIXY = Path(sys.executable).with_name("gixy")


def findings(main_config: Path) -> list[dict]:
    """What gixy reports on `main_config` and the files it includes (empty: nothing)."""
    completed = subprocess.run(
        [str(GIXY), "--format", "json", str(main_config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # gixy exits non-zero when it finds something; anything but JSON means it did not run.
    try:
        return json.loads(completed.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"gixy did not report (rc {completed.returncode}):\n{completed.stderr[-2000:]}")
