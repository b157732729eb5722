"""Every role documents each of its variables once, with the value it has.

For each role under ansible/roles: every variable of defaults/main.yml is typed in
meta/argument_specs.yml (and nothing else is), of that type and with the same default unless
the default is a Jinja expression (argument_specs then says in words what it becomes); the
README's Role Variables section shows each variable as an indented `name: default` line, in
geerlingguy's form, with the value defaults/main.yml gives it, and shows no variable the role
does not have; the README has the sections a role's README needs and names the role's
dependencies.

Controls: a README missing a variable, showing a stale one or an old default, an argument spec
with another default or a type its default is not, and a README without its Dependencies
section are each reported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROLES_DIR = Path(__file__).resolve().parents[2] / "ansible" / "roles"
ROLES = sorted(
    path.name for path in ROLES_DIR.iterdir() if (path / "defaults" / "main.yml").exists()
)
SECTIONS = ("## Requirements", "## Role Variables", "## Dependencies", "## Example Playbook")


def section(readme: str, heading: str) -> str:
    start = readme.find(f"\n{heading}\n")
    if start < 0:
        return ""
    end = readme.find("\n## ", start + len(heading) + 2)
    return readme[start:] if end < 0 else readme[start:end]


def documented_variables(readme: str) -> dict[str, object]:
    """The `name: default` blocks (lines indented by four spaces, outside fenced examples) of
    the Role Variables section, parsed as YAML."""
    text = re.sub(r"(?ms)^```.*?^```$", "", section(readme, "## Role Variables"))
    found: dict[str, object] = {}
    for block in re.findall(r"(?m)(?:^    .*\S.*\n)+", text):
        variables = yaml.safe_load("\n".join(line[4:] for line in block.splitlines()))
        assert isinstance(variables, dict), block
        duplicated = set(found) & set(variables)
        assert not duplicated, f"documented twice: {sorted(duplicated)}"
        found.update(variables)
    return found


def templated(value: object) -> bool:
    return isinstance(value, str) and "{{" in value


# What each argument_specs type accepts as a default (a float option takes a whole number too).
SPEC_TYPES = {
    "str": str,
    "path": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "list": list,
    "dict": dict,
}


def of_type(value: object, kind: str) -> bool:
    if isinstance(value, bool) and kind != "bool":
        return False
    return value is None or isinstance(value, SPEC_TYPES[kind])


def problems(role: str, readme: str | None = None, specs: dict | None = None) -> list[str]:
    """What the role's README and argument specs say wrongly about its defaults."""
    directory = ROLES_DIR / role
    defaults = yaml.safe_load((directory / "defaults" / "main.yml").read_text()) or {}
    if specs is None:
        specs = yaml.safe_load((directory / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    if readme is None:
        readme = (directory / "README.md").read_text()
    found = []
    found += [f"{name}: not in argument_specs" for name in defaults if name not in options]
    found += [
        f"{name}: in argument_specs, not in defaults" for name in options if name not in defaults
    ]
    found += [
        f"{name}: argument_specs says {spec['default']!r}, defaults {defaults[name]!r}"
        for name, spec in options.items()
        if name in defaults
        and "default" in spec
        and not templated(defaults[name])
        and spec["default"] != defaults[name]
    ]
    found += [
        f"{name}: no description in argument_specs"
        for name, spec in options.items()
        if not spec.get("description")
    ]
    found += [
        f"{name}: {defaults[name]!r} is not of type {spec['type']}"
        for name, spec in options.items()
        if name in defaults
        and not templated(defaults[name])
        and not of_type(defaults[name], spec["type"])
    ]
    documented = documented_variables(readme)
    found += [f"{name}: not in the README" for name in defaults if name not in documented]
    found += [
        f"{name}: in the README, not a variable of the role"
        for name in documented
        if name not in defaults
    ]
    found += [
        f"{name}: the README says {documented[name]!r}, defaults {defaults[name]!r}"
        for name in defaults
        if name in documented and documented[name] != defaults[name]
    ]
    found += [
        f"README: no {heading!r} section" for heading in SECTIONS if not section(readme, heading)
    ]
    dependencies = yaml.safe_load((directory / "meta" / "main.yml").read_text()).get("dependencies")
    found += [
        f"README: dependency {item['role']} not named under Dependencies"
        for item in dependencies or []
        if f"`{item['role']}`" not in section(readme, "## Dependencies")
    ]
    return found


@pytest.mark.parametrize("role", ROLES)
def test_each_variable_is_typed_and_documented_with_its_default(role):
    assert problems(role) == []


def test_every_role_is_checked():
    roles = {"app", "common", "host_firewall", "nginx", "simulator", "streamgate_package"}
    assert roles <= set(ROLES)


def readme_of(role: str) -> str:
    return (ROLES_DIR / role / "README.md").read_text()


def test_negative_control_a_variable_missing_from_the_readme_is_reported():
    readme = readme_of("common")
    assert "    common_apt_cache_valid_time: 3600\n" in readme
    broken = readme.replace("    common_apt_cache_valid_time: 3600\n", "")
    assert problems("common", readme=broken) == ["common_apt_cache_valid_time: not in the README"]


def test_negative_control_a_stale_variable_or_an_old_default_is_reported():
    readme = readme_of("simulator")
    broken = readme.replace(
        "    streamgate_sim_port: 8100\n",
        "    streamgate_sim_port: 8000\n    streamgate_sim_threads: 4\n",
    )
    assert problems("simulator", readme=broken) == [
        "streamgate_sim_threads: in the README, not a variable of the role",
        "streamgate_sim_port: the README says 8000, defaults 8100",
    ]


def test_negative_control_another_default_in_argument_specs_is_reported():
    specs = yaml.safe_load((ROLES_DIR / "nginx" / "meta" / "argument_specs.yml").read_text())
    specs["argument_specs"]["main"]["options"]["nginx_listen_backlog"]["default"] = 511
    assert problems("nginx", specs=specs) == [
        "nginx_listen_backlog: argument_specs says 511, defaults 4096"
    ]


def test_negative_control_a_default_of_another_type_is_reported():
    specs = yaml.safe_load((ROLES_DIR / "app" / "meta" / "argument_specs.yml").read_text())
    specs["argument_specs"]["main"]["options"]["streamgate_keepalive_s"]["type"] = "str"
    specs["argument_specs"]["main"]["options"]["streamgate_firewall"]["type"] = "int"
    assert problems("app", specs=specs) == [
        "streamgate_firewall: True is not of type int",
        "streamgate_keepalive_s: 75 is not of type str",
    ]


def test_negative_control_a_readme_without_its_dependencies_is_reported():
    readme = readme_of("app").replace("## Dependencies", "## Needs")
    assert problems("app", readme=readme) == [
        "README: no '## Dependencies' section",
        "README: dependency streamgate_package not named under Dependencies",
    ]
