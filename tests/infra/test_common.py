"""What every host of the stack has (common role)."""

from __future__ import annotations

import pytest

testinfra_hosts = ["ansible://all"]


@pytest.mark.parametrize("package", ["ca-certificates", "curl"])
def test_base_package_is_installed(host, package):
    assert host.package(package).is_installed


def test_system_ca_bundle_exists(host):
    bundle = host.file("/etc/ssl/certs/ca-certificates.crt")
    assert bundle.is_file and bundle.size > 0
