"""Load-test suite: the locustfile's modules and the shared test support on the import path."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO / "loadtest", REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
