"""What a deployment's inventory says about the LLM server its app hosts stream from, and the
ports and paths its roles give the hosts: read by testinfra and the load test alike.

The kind decides what a check may expect: only the simulator's text is known in advance, so
only against the simulator is the text compared; from any other OpenAI-compatible server
(OpenAI, vLLM, Ollama, llama.cpp) the checks judge completeness, protocol and timing.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import yaml

# One reader of an inventory (`ansible-inventory --list`), the doctor's; re-exported here for the
# tests and the load test.
from streamgate.doctor.hops import groups_of
from streamgate.doctor.hops import inventory_listing as inventory_listing

SIMULATOR = "simulator"
OPENAI_COMPATIBLE = "openai-compatible"
UPSTREAM_KINDS = (SIMULATOR, OPENAI_COMPATIBLE)
# The inventory variable an operator (or the lab) sets to say which; see upstream_kind().
KIND_VARIABLE = "streamgate_upstream_kind"

ROLES = Path(__file__).resolve().parents[2] / "ansible" / "roles"


# A default that only names other variables, such as "{{ streamgate_install_dir }}/venv".
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@cache
def role_variables() -> dict:
    """Every role's defaults and vars (names carry their role's prefix, so they do not clash)."""
    found: dict = {}
    for path in sorted(ROLES.glob("*/defaults/main.yml")) + sorted(ROLES.glob("*/vars/main.yml")):
        found |= yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return found


def setting(hostvars: dict, name: str):
    """A role variable as the inventory sets it, else as the roles define it; placeholders that
    only name other variables are filled the same way. Anything more (filters, conditions) is
    refused rather than guessed."""
    value = hostvars[name] if name in hostvars else role_variables()[name]
    if not isinstance(value, str) or "{" not in value:
        return value
    resolved = PLACEHOLDER.sub(lambda match: str(setting(hostvars, match[1])), value)
    if "{{" in resolved or "{%" in resolved:
        raise ValueError(f"{name} is a template this reader does not evaluate: {value!r}")
    return resolved


def upstream_kind(hostvars: dict, groups: dict) -> str:
    """An app host's upstream: `streamgate_upstream_kind` when the inventory sets it, else as the
    app role picks its default: the simulator when the inventory names no upstream URL and no
    key and has simulator hosts but no llm hosts, otherwise another server."""
    kind = hostvars.get(KIND_VARIABLE)
    if kind is None:
        names_one = hostvars.get("streamgate_upstream_base_url") or hostvars.get(
            "streamgate_upstream_api_key"
        )
        simulator_picked = groups.get(SIMULATOR) and not groups.get("llm") and not names_one
        kind = SIMULATOR if simulator_picked else OPENAI_COMPATIBLE
    if kind not in UPSTREAM_KINDS:
        raise ValueError(f"{KIND_VARIABLE} is {kind!r}: must be one of {', '.join(UPSTREAM_KINDS)}")
    return kind


def deployment_upstream_kind(listing: dict) -> str:
    """The simulator only when every app host streams from it (a load through the edge reaches
    them all); otherwise another server."""
    groups = groups_of(listing)
    hostvars = listing.get("_meta", {}).get("hostvars", {})
    app_hosts = groups.get("app") or []
    if not app_hosts:
        raise ValueError("the inventory has no app hosts")
    kinds = {upstream_kind(hostvars.get(host, {}), groups) for host in app_hosts}
    return SIMULATOR if kinds == {SIMULATOR} else OPENAI_COMPATIBLE
