"""Skips that CI may not take: what a developer's machine can lack, CI's must have."""

from __future__ import annotations

import os

import pytest


def skip_unless_ci(reason: str) -> None:
    """Skip with `reason`; under CI=true fail instead, so a missing tool, key or file on the
    machine that must run everything is a red run, not a quietly smaller one."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this test must run)", pytrace=False)
    pytest.skip(reason)
