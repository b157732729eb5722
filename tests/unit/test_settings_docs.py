"""One source per setting: the Settings class, and what tools/settings_docs.py writes from it.

Every list of the gateway's settings (the README's table, the app role's defaults, argument
specs, env template and README) must be exactly what the generator writes from
service/streamgate/settings.py; the fix for a failure is `make settings-docs`. The env template,
rendered with the role's defaults, must then give the service its own defaults.

Controls: one changed default, choice or line in any of the five files is reported; a role
default changed in the rendered env file is seen as a different setting.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import jinja2
import pytest
import yaml
from streamgate.settings import Settings

REPO = Path(__file__).resolve().parents[2]
APP_ROLE = REPO / "ansible" / "roles" / "app"


def load_generator():
    path = REPO / "tools" / "settings_docs.py"
    spec = importlib.util.spec_from_file_location("settings_docs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


generator = load_generator()
TARGETS = {str(target.path.relative_to(REPO)): target for target in generator.TARGETS}

# One edit per file, each of a kind that drifted before: a default, a choice, a missing line.
DRIFTS = {
    "README.md": ("| `STREAMGATE_KEEPALIVE_S` | 75 |", "| `STREAMGATE_KEEPALIVE_S` | 60 |"),
    "ansible/roles/app/defaults/main.yml": (
        'streamgate_log_level: "info"',
        'streamgate_log_level: "warning"',
    ),
    "ansible/roles/app/meta/argument_specs.yml": (
        'choices: ["debug", "info", "warning", "error", "critical"]',
        'choices: ["debug", "info", "warning", "error"]',
    ),
    "ansible/roles/app/templates/streamgate.env.j2": (
        "{{ line('STREAMGATE_MAX_N', streamgate_max_n if streamgate_max_n is not none"
        " else '') }}\n",
        "",
    ),
    "ansible/roles/app/README.md": ("    streamgate_workers: 0\n", "    streamgate_workers: 1\n"),
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_each_list_of_settings_is_what_settings_py_says(name):
    text = TARGETS[name].path.read_text()
    assert generator.rendered(TARGETS[name], text) == text, (
        f"{name} differs from {generator.SOURCE}: run make settings-docs"
    )


@pytest.mark.parametrize("name", list(TARGETS))
def test_negative_control_a_drift_in_any_file_is_seen(name):
    old, new = DRIFTS[name]
    text = TARGETS[name].path.read_text()
    assert text.count(old) == 1, old
    drifted = text.replace(old, new)
    assert generator.rendered(TARGETS[name], drifted) != drifted
    assert generator.rendered(TARGETS[name], drifted) == text  # and the generator repairs it


def test_the_check_command_fails_on_drift_and_passes_when_repaired(tmp_path, monkeypatch, capsys):
    target = TARGETS["ansible/roles/app/defaults/main.yml"]
    copy = tmp_path / "main.yml"
    copy.write_text(target.path.read_text().replace(*DRIFTS["ansible/roles/app/defaults/main.yml"]))
    monkeypatch.setattr(generator, "REPO", tmp_path)
    monkeypatch.setattr(
        generator, "TARGETS", [generator.Target(copy, target.begin, target.end, target.body)]
    )
    assert generator.main(["--check"]) == 1
    assert "main.yml" in capsys.readouterr().err
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0


def test_every_setting_has_a_description():
    assert [
        name
        for name, field in Settings.model_fields.items()
        if not field.exclude and not (field.description or "").strip()
    ] == []


def render_env_file(defaults: dict) -> str:
    """The env template as Ansible renders it (trim_blocks), with the filters it uses."""
    environment = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined)
    environment.filters.update(
        bool=lambda value: (
            value if isinstance(value, bool) else str(value).lower() in ("true", "yes", "1", "on")
        ),
        hash=lambda value, algorithm: hashlib.new(algorithm, value.encode()).hexdigest(),
        zip=lambda left, right: list(zip(left, right, strict=False)),
    )
    template = (APP_ROLE / "templates" / "streamgate.env.j2").read_text()
    return environment.from_string(template).render(**defaults)


def settings_from_role_defaults(tmp_path: Path, **changed) -> Settings:
    """Settings read from the env file the role writes with its defaults; the two defaults that
    are the role's own (Jinja of the inventory) set to the service's."""
    defaults = yaml.safe_load((APP_ROLE / "defaults" / "main.yml").read_text())
    service = Settings(_env_file=None)  # type: ignore[call-arg]
    defaults.update(
        streamgate_upstream_base_url=service.upstream_base_url,
        streamgate_bind=service.bind,
        **changed,
    )
    env_file = tmp_path / "streamgate.env"
    env_file.write_text(render_env_file(defaults))
    return Settings(_env_file=env_file)  # type: ignore[call-arg]


def test_the_role_defaults_give_the_service_its_defaults(tmp_path, monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"STREAMGATE_{name.upper()}", raising=False)
    service = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings_from_role_defaults(tmp_path, streamgate_client_auth=False) == service
    # Control: one role default changed reaches the service.
    changed = settings_from_role_defaults(
        tmp_path, streamgate_client_auth=False, streamgate_keepalive_s=76
    )
    assert changed != service and changed.keepalive_s == 76


def test_the_env_file_has_a_line_for_every_setting(tmp_path):
    settings_from_role_defaults(
        tmp_path,
        streamgate_client_auth=False,
        streamgate_upstream_api_key="sk-written-only-when-set",
    )
    lines = (tmp_path / "streamgate.env").read_text().splitlines()
    written = {line.partition("=")[0] for line in lines if line and not line.startswith("#")}
    wanted = {
        f"STREAMGATE_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if not field.exclude
    }
    assert wanted - written == set()
