"""nginx/*.j2 rendered with the nginx role's defaults, TLS off (the role's default today) and on:
gixy-ng finds nothing in either, nginx -t accepts both, the role's variables are documented and
typed in one place each, and no log format carries a request header such as the client's key.

gixy-ng's control: the same TLS config with one `add_header` added in /v1/ (which silently drops
the server's HSTS header there) must be reported, so a gixy that parses nothing cannot pass.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import gixy, nginx
from support.tls import make_test_pki

ARGUMENT_SPECS = nginx.ROLE / "meta" / "argument_specs.yml"
TLS_MODES = {"tls-off": False, "tls-on": True}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def render_to(directory: Path, *, tls: bool, pki, edit=None) -> Path:
    """The two templates with the role's defaults (only paths and the upstream set), written
    where nginx and gixy can read them; returns the main config."""
    (directory / "temp").mkdir(parents=True, exist_ok=True)
    (directory / "mime.types").write_text(nginx.MIME_TYPES)
    variables = nginx.local_variables(
        directory,
        listen="127.0.0.1:8080",
        listen_tls="127.0.0.1:8443" if tls else None,
        upstream_servers=["127.0.0.1:8000"],
        pki=pki if tls else None,
    )
    variables.update(nginx_worker_processes=1)
    rendered = nginx.render(variables)
    if edit is not None:
        rendered["streamgate.conf"] = edit(rendered["streamgate.conf"])
    for name, text in rendered.items():
        (directory / name).write_text(text)
    return directory / "nginx.conf"


@pytest.mark.parametrize("mode", list(TLS_MODES))
def test_gixy_finds_nothing_in_the_rendered_config(tmp_path, pki, mode):
    findings = gixy.findings(render_to(tmp_path, tls=TLS_MODES[mode], pki=pki))
    assert findings == [], json.dumps(findings, indent=1)


def test_negative_control_gixy_reports_hsts_dropped_by_a_nested_add_header(tmp_path, pki):
    def add_header_in_streams(site: str) -> str:
        assert site.count("    location /v1/ {\n") == 1
        return site.replace(
            "    location /v1/ {\n", "    location /v1/ {\n        add_header X-Probe 1;\n"
        )

    findings = gixy.findings(render_to(tmp_path, tls=True, pki=pki, edit=add_header_in_streams))
    assert [finding["plugin"] for finding in findings] == ["add_header_redefinition"], findings
    assert "strict-transport-security" in findings[0]["reason"]


@pytest.mark.parametrize("mode", list(TLS_MODES))
def test_nginx_accepts_the_rendered_config(tmp_path, pki, mode):
    binary = nginx.require_nginx()
    main = render_to(tmp_path, tls=TLS_MODES[mode], pki=pki)
    completed = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "warn" not in completed.stderr, completed.stderr  # e.g. rlimit below connections


def test_tls_is_on_by_default_now_that_the_role_places_certificates():
    assert nginx.role_variables()["nginx_tls"] is True


@pytest.mark.parametrize("mode", list(TLS_MODES))
def test_no_log_format_carries_a_request_header(tmp_path, pki, mode):
    render_to(tmp_path, tls=TLS_MODES[mode], pki=pki)
    site = (tmp_path / "streamgate.conf").read_text()
    formats = re.findall(r"log_format\s[^;]*;", site)
    assert formats and not any("$http_" in text for text in formats), formats


def test_every_default_of_the_role_is_typed_and_documented_with_the_same_value():
    defaults = yaml.safe_load((nginx.ROLE / "defaults" / "main.yml").read_text())
    options = yaml.safe_load(ARGUMENT_SPECS.read_text())["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    python_types = {"str": str, "int": int, "bool": bool, "list": list}
    for name, value in defaults.items():
        spec = options[name]
        assert isinstance(value, python_types[spec["type"]]), (name, value, spec["type"])
        assert spec["default"] == value, (name, spec["default"], value)
        assert spec.get("description"), name
    # The README's entry of each variable (with its value): tests/unit/test_role_docs.py.


def test_open_files_cover_the_connections():
    defaults = nginx.role_variables()
    assert defaults["nginx_worker_rlimit_nofile"] >= 2 * defaults["nginx_worker_connections"]


def test_the_gixy_binary_is_the_pinned_one():
    lock = (nginx.REPO / "requirements-dev.lock").read_text()
    pinned = re.search(r"^gixy-ng==([\d.]+)$", lock, re.MULTILINE)
    assert pinned, "gixy-ng is not pinned in requirements-dev.lock"
    version = subprocess.run(
        [str(gixy.GIXY), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert pinned.group(1) in version.stdout + version.stderr
    assert shutil.which(str(gixy.GIXY))
