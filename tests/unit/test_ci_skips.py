"""support.ci: a skip on a developer's machine is a failure under CI=true."""

from __future__ import annotations

import pytest
from support.ci import skip_unless_ci


def test_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no ca\.pem"):
        skip_unless_ci("no ca.pem")


def test_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no ca\.pem \(CI=true"):
        skip_unless_ci("no ca.pem")
