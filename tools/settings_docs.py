"""Write every list of the gateway's settings from the one Settings class.

service/streamgate/settings.py is the source: each field's name, type, default and docstring.
From it this writes the block between the `BEGIN settings` and `END settings` markers of

  README.md                                      the settings table
  ansible/roles/app/defaults/main.yml            one role variable per setting, with its comment
  ansible/roles/app/meta/argument_specs.yml      type, default, choices, description
  ansible/roles/app/templates/streamgate.env.j2  one env file line per setting
  ansible/roles/app/README.md                    each variable, its default and a paragraph

`make settings-docs` (python tools/settings_docs.py) rewrites them; `--check` writes nothing and
exits 1 naming each file that differs (tests/unit/test_settings_docs.py runs it). What the app
role does differently from the service (a default of its own, a list instead of a comma-separated
string, a value written from other variables) is declared once, in ROLE below.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from streamgate.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ROLE_DIR = REPO / "ansible" / "roles" / "app"
SOURCE = "service/streamgate/settings.py"
WIDTH = 100


@dataclass(frozen=True)
class RoleSpecific:
    """How the app role writes a setting when it is not simply its own variable with the
    service's default."""

    default: Any = PydanticUndefined  # the role's default, when not the service's
    shown_default: str | None = None  # argument_specs' words for a templated default
    note: str = ""  # what the role adds to the description
    left_out: tuple[str, ...] = ()  # choices the role does not offer
    entries: bool = False  # a YAML list in the role, comma-separated in the env file
    variable: bool = True  # False: written from other variables, by env_lines
    env_lines: str = ""  # template lines of a setting that is no variable


ROLE: dict[str, RoleSpecific] = {
    "upstream_base_url": RoleSpecific(
        default="{{ __streamgate_default_upstream_base_url }}",
        shown_default="the first llm host, else the first simulator host without a key, "
        "else https://api.openai.com/v1",
        note="The role's default: the first host of the `llm` group (the llm role's llama.cpp "
        "server), else the first simulator host when no key is set and the inventory has a "
        "`simulator` group, else OpenAI.",
    ),
    "upstream_api_key": RoleSpecific(
        default="",
        note="Keep it in a vault: the role writes it with `no_log`, to the env file only when set.",
    ),
    "upstream_transport": RoleSpecific(
        left_out=("aiohttp",), note="The role does not install the `aiohttp` extra."
    ),
    "client_key_hashes": RoleSpecific(
        variable=False,
        note="Written from `streamgate_client_auth` and `streamgate_client_keys`.",
        env_lines=(
            "{# name:sha256 of each key: the keys themselves never leave the controller. #}\n"
            "{% set clients = streamgate_client_keys if streamgate_client_auth | bool else [] %}\n"
            "{{ line('STREAMGATE_CLIENT_KEY_HASHES', clients | map(attribute='name')\n"
            "        | zip(clients | map(attribute='key') | map('string')"
            " | map('hash', 'sha256'))\n"
            "        | map('join', ':') | join(',')) }}\n"
        ),
    ),
    "allowed_models": RoleSpecific(default=[], entries=True, note="A list, one entry per item."),
    "bind": RoleSpecific(
        default="{{ streamgate_advertise_host }}:{{ streamgate_port }}",
        note="The role's default: only the address the edge uses (`streamgate_advertise_host`), "
        "on `streamgate_port` (`validate.yml` requires that port).",
    ),
}


@dataclass(frozen=True)
class Setting:
    name: str
    field: FieldInfo
    role: RoleSpecific

    @property
    def env_name(self) -> str:
        return f"{Settings.model_config['env_prefix']}{self.name.upper()}"

    @property
    def variable(self) -> str:
        return f"streamgate_{self.name}"

    @property
    def base_type(self) -> Any:
        """The annotation without `| None` and `Annotated[...]`."""
        annotation = self.field.annotation
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        return annotation

    @property
    def choices(self) -> list[str]:
        if typing.get_origin(self.base_type) is not typing.Literal:
            return []
        return [c for c in typing.get_args(self.base_type) if c not in self.role.left_out]

    @property
    def description(self) -> str:
        text = " ".join((self.field.description or "").split())
        if not text:
            raise SystemExit(f"{SOURCE}: {self.name} has no docstring (its description)")
        missing = [c for c in typing.get_args(self.base_type) if f"`{c}`" not in text]
        if typing.get_origin(self.base_type) is typing.Literal and missing:
            raise SystemExit(f"{SOURCE}: the docstring of {self.name} must name {missing}")
        return text

    @property
    def role_description(self) -> str:
        return f"{self.description} {self.role.note}".strip()

    @property
    def default(self) -> Any:
        if self.field.default_factory is not None:
            return self.field.default_factory()  # type: ignore[call-arg]
        return self.field.default

    @property
    def role_default(self) -> Any:
        if self.role.default is not PydanticUndefined:
            return self.role.default
        return self.default

    @property
    def ansible_type(self) -> str:
        if self.role.entries:
            return "list"
        kind = self.base_type
        if typing.get_origin(kind) is typing.Literal or kind in (str, SecretStr):
            return "str"
        return {bool: "bool", int: "int", float: "float"}[kind]

    @property
    def env_value(self) -> str:
        """The Jinja expression of the env file's value."""
        name = self.variable
        if self.role.entries:
            return f"{name} | join(',')"
        if self.base_type is bool:
            return f"{name} | bool | lower"
        if self.role_default is None:
            return f"{name} if {name} is not none else ''"
        return name


def settings() -> list[Setting]:
    return [
        Setting(name, field, ROLE.get(name, RoleSpecific()))
        for name, field in Settings.model_fields.items()
        if not field.exclude
    ]


def role_settings() -> list[Setting]:
    return [setting for setting in settings() if setting.role.variable]


def yaml_value(value: Any) -> str:
    """A YAML flow value: JSON is YAML, strings double-quoted as the roles write them."""
    return json.dumps(value, ensure_ascii=False)


def wrap(text: str, indent: str, width: int = WIDTH) -> list[str]:
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=False,
    )


def shown_default(setting: Setting) -> str:
    """The README's default column."""
    value = setting.default
    if value is None:
        return "unset"
    if value == {}:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else f"`{value}`"


def readme_table() -> list[str]:
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    for setting in settings():
        meaning = setting.description.replace("|", "\\|")
        lines.append(f"| `{setting.env_name}` | {shown_default(setting)} | {meaning} |")
    return lines


def role_defaults() -> list[str]:
    lines = []
    for setting in role_settings():
        lines += wrap(setting.role_description, "# ")
        lines.append(f"{setting.variable}: {yaml_value(setting.role_default)}")
    return lines


def argument_specs() -> list[str]:
    lines = []
    for setting in role_settings():
        lines += [f"      {setting.variable}:", f"        type: {setting.ansible_type}"]
        if setting.role.entries:
            lines.append("        elements: str")
        if setting.role.shown_default is not None:
            lines.append(f"        default: {yaml_value(setting.role.shown_default)}")
        elif setting.role_default is not None:
            lines.append(f"        default: {yaml_value(setting.role_default)}")
        if setting.choices:
            lines.append(f"        choices: {yaml_value(setting.choices)}")
        if setting.base_type is SecretStr:
            lines.append("        no_log: true")
        lines += ["        description: >-", *wrap(setting.role_description, " " * 10)]
    return lines


def env_template() -> list[str]:
    lines = []
    for setting in settings():
        if not setting.role.variable:
            lines += setting.role.env_lines.splitlines()
            continue
        line = f"{{{{ line('{setting.env_name}', {setting.env_value}) }}}}"
        if setting.base_type is SecretStr:  # only when set: the SDK's own variable may be used
            lines += [f"{{% if {setting.variable} | length > 0 %}}", line, "{% endif %}"]
        else:
            lines.append(line)
    return lines


def role_readme() -> list[str]:
    lines = []
    for setting in role_settings():
        default = setting.role_default
        lines += [f"    {setting.variable}: {yaml_value(default)}", ""]
        lines += wrap(f"`{setting.env_name}`: {setting.role_description}", "")
        lines.append("")
    return lines[:-1]


@dataclass(frozen=True)
class Target:
    path: Path
    begin: str
    end: str
    body: Callable[[], list[str]]


NOTE = f"generated from {SOURCE} by tools/settings_docs.py (make settings-docs): edit it there"
TARGETS = [
    Target(
        REPO / "README.md",
        f"<!-- BEGIN settings: {NOTE} -->",
        "<!-- END settings -->",
        readme_table,
    ),
    Target(
        ROLE_DIR / "defaults" / "main.yml",
        f"# BEGIN settings: {NOTE}",
        "# END settings",
        role_defaults,
    ),
    Target(
        ROLE_DIR / "meta" / "argument_specs.yml",
        f"      # BEGIN settings: {NOTE}",
        "      # END settings",
        argument_specs,
    ),
    Target(
        ROLE_DIR / "templates" / "streamgate.env.j2",
        f"{{# BEGIN settings: {NOTE} #}}",
        "{# END settings #}",
        env_template,
    ),
    Target(
        ROLE_DIR / "README.md",
        f"<!-- BEGIN settings: {NOTE} -->",
        "<!-- END settings -->",
        role_readme,
    ),
]


def rendered(target: Target, text: str) -> str:
    """`text` with the block between the target's markers as the generator writes it."""
    lines = text.split("\n")
    try:
        start, stop = lines.index(target.begin), lines.index(target.end)
    except ValueError:
        raise SystemExit(
            f"{target.path.relative_to(REPO)}: no line {target.begin!r} followed by {target.end!r}"
        ) from None
    return "\n".join([*lines[: start + 1], *target.body(), *lines[stop:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 naming each file that differs"
    )
    args = parser.parse_args(argv)
    stale = []
    for target in TARGETS:
        text = target.path.read_text()
        wanted = rendered(target, text)
        if wanted != text:
            stale.append(str(target.path.relative_to(REPO)))
            if not args.check:
                target.path.write_text(wanted)
    if stale and args.check:
        print(f"not as {SOURCE} says: {', '.join(stale)}; run make settings-docs", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
