"""Hop by hop: the doctor's probe at every hop of a deployment made by this kit, in path order,
each taken from where that hop's client really sits.

    upstream          the LLM server (or the simulator), probed from the first app host using it
    gateway:<host>    each app host's gateway, probed from the edge host (as nginx reaches it)
    nginx:<host>      the edge's nginx, probed on the edge itself (loopback)
    public            the edge's public URL, probed from this machine (the controller)
    front             optional: a URL in front of the edge (a CDN, a load balancer), from here

The inventory is read through `ansible-inventory --list` (so group_vars apply) and the hosts are
reached over the SSH access Ansible uses (ansible_host, ansible_user, key, SSH arguments). On a
host the probe runs as `python3 -` with probe.py on its standard input (the client key travels
there too): nothing is copied to the host and no key appears in any command line. Probes from
this machine run in this process. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from streamgate.doctor import probe

PROBE_SOURCE = Path(probe.__file__)
CHAT_PATH = "/v1/chat/completions"
# The roles' defaults, for hosts whose inventory does not set them (a unit test compares them
# with ansible/roles/*/defaults, so they cannot drift).
ROLE_DEFAULTS = {
    "streamgate_port": 8000,
    "streamgate_sim_port": 8100,
    "streamgate_llm_port": 8080,
    "nginx_tls": True,
    "nginx_listen": "80",
    "nginx_listen_tls": "443",
    "nginx_server_name": "_",
    "streamgate_default_model": "gpt-4o-mini",
}
# The model servers the kit deploys itself: group -> (the URL its role publishes as a fact, the
# variable of its port).
KIT_SERVERS = {
    "llm": ("streamgate_llm_url", "streamgate_llm_port"),
    "simulator": ("streamgate_sim_url", "streamgate_sim_port"),
}
# The app role's templates for streamgate_upstream_base_url that name those servers, and its
# default (ansible/roles/app/vars/main.yml).
ROLE_TEMPLATE = re.compile(r"\{\{\s*(\w+)\s*\}\}")
ROLE_URL_TEMPLATES = {"__streamgate_llm_url": "llm", "__streamgate_simulator_url": "simulator"}
ROLE_DEFAULT_URL_TEMPLATE = "__streamgate_default_upstream_base_url"
# Written next to the inventory by the play (the CA of the edge's certificate) and by the lab
# (the client key), as `make loadtest` and testinfra read them.
CA_FILE_NAME = "ca.pem"
CLIENT_KEY_FILE_NAME = "client-key"
# Where the doctor finds the client key when none is given (before the file next to the inventory).
KEY_VARIABLE = "STREAMGATE_DOCTOR_KEY"
# The LLM server's key, for the upstream hop: the gateway's own setting of that name (the
# inventory keeps it in a vault the doctor does not open). Unset: the upstream is asked without.
UPSTREAM_KEY_VARIABLE = "STREAMGATE_UPSTREAM_API_KEY"
CLIENT_KEY, UPSTREAM_KEY = "client", "upstream"
SSH_TIMEOUT_S = 10


@dataclass(frozen=True)
class Hop:
    """One place a stream passes, and where its client sits (`via`: an inventory host, or None
    for this machine)."""

    name: str
    url: str
    via: str | None = None
    # Which key the hop's server checks: the client key (gateways, nginx, the public URL), the
    # upstream key (the LLM server), or none.
    key: str | None = CLIENT_KEY
    # Probe options besides the key: --cacert, --insecure, --body.
    options: tuple[str, ...] = ()


@dataclass
class Inventory:
    """What `ansible-inventory --list` says: groups (children's hosts included) and host vars."""

    path: Path
    groups: dict[str, list[str]]
    hostvars: dict[str, dict] = field(default_factory=dict)

    def var(self, host: str, name: str):
        return self.hostvars.get(host, {}).get(name, ROLE_DEFAULTS.get(name))

    def address(self, host: str) -> str:
        return str(self.hostvars.get(host, {}).get("ansible_host", host))


def ansible_inventory_command() -> str:
    """The `ansible-inventory` next to this Python (the venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("ansible-inventory")
    return str(beside) if beside.exists() else "ansible-inventory"


def inventory_listing(inventory: Path, ansible_inventory: str = "ansible-inventory") -> dict:
    """`ansible-inventory --list`: every host's variables with the group_vars next to it."""
    return json.loads(
        subprocess.check_output(
            [ansible_inventory, "-i", str(inventory), "--list"], text=True, timeout=120
        )
    )


def groups_of(listing: dict) -> dict[str, list[str]]:
    """{group: its hosts, children's included} from an `ansible-inventory --list` answer."""

    def hosts(group: str) -> list[str]:
        node = listing.get(group) or {}
        found = list(node.get("hosts") or [])
        for child in node.get("children") or []:
            found += [host for host in hosts(child) if host not in found]
        return found

    return {group: hosts(group) for group in listing if group != "_meta"}


def read_inventory(path: Path) -> Inventory:
    listing = inventory_listing(path, ansible_inventory_command())
    return Inventory(path, groups_of(listing), listing.get("_meta", {}).get("hostvars", {}))


def is_template(value: object) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def port_of(listen: object) -> str:
    """nginx's listen forms: "443", "0.0.0.0:443", "[::]:443"."""
    return str(listen).rsplit(":", 1)[-1]


def advertised_address(inventory: Inventory, host: str, clients_group: str) -> str:
    """The address a server of the kit on `host` listens on for its clients (the roles' rule):
    loopback when the only client host is `host` itself, else its private address, else its
    ansible_host."""
    if inventory.groups.get(clients_group) == [host]:
        return "127.0.0.1"
    private = inventory.hostvars.get(host, {}).get("streamgate_private_address")
    return str(private) if private and not is_template(private) else inventory.address(host)


def kit_server_url(inventory: Inventory, group: str) -> str | None:
    """The base URL of the first host of a group the kit deploys a model server on (llm,
    simulator): the URL its role published if the inventory has it, else its address and port."""
    hosts = inventory.groups.get(group) or []
    if not hosts:
        return None
    published_variable, port_variable = KIT_SERVERS[group]
    published = inventory.hostvars.get(hosts[0], {}).get(published_variable)
    if published and not is_template(published):
        return str(published).rstrip("/")
    address = advertised_address(inventory, hosts[0], "app")
    return f"http://{address}:{inventory.var(hosts[0], port_variable)}/v1"


def upstream_url(inventory: Inventory, app_host: str) -> str:
    """The app host's upstream base URL, as the app role picks it: streamgate_upstream_base_url
    (a URL, or the role's own template naming the llm or simulator host), else the first llm
    host, else the first simulator host when no upstream key is set, else OpenAI."""
    hostvars = inventory.hostvars.get(app_host, {})
    url = hostvars.get("streamgate_upstream_base_url")
    if url and not is_template(url):
        return str(url).rstrip("/")
    if url:
        named = ROLE_TEMPLATE.fullmatch(str(url))
        group = ROLE_URL_TEMPLATES.get(named[1]) if named else None
        if group is not None and kit_server_url(inventory, group):
            return str(kit_server_url(inventory, group))
        if not named or named[1] != ROLE_DEFAULT_URL_TEMPLATE:
            raise ValueError(
                f"{app_host}: streamgate_upstream_base_url is a template the doctor does not "
                f"evaluate ({url!r}): probe the upstream by URL instead"
            )
    llm = kit_server_url(inventory, "llm")
    simulator = kit_server_url(inventory, "simulator")
    if llm:
        return llm
    if simulator and not hostvars.get("streamgate_upstream_api_key"):
        return simulator
    return "https://api.openai.com/v1"


def upstream_model(inventory: Inventory, app_host: str) -> str | None:
    """The model the gateway asks its upstream for by default: streamgate_default_model, through
    its alias in streamgate_allowed_models (`alias=upstream-model`) when it has one."""
    model = inventory.var(app_host, "streamgate_default_model")
    if not model or is_template(model):
        return None
    allowed = inventory.hostvars.get(app_host, {}).get("streamgate_allowed_models") or ""
    entries = allowed.split(",") if isinstance(allowed, str) else [str(e) for e in allowed]
    for entry in entries:
        alias, equals, target = entry.strip().partition("=")
        if equals and alias.strip() == model:
            return target.strip()
    return str(model)


def gateway_address(inventory: Inventory, app_host: str) -> str:
    """Where nginx reaches this app host (the nginx role's rule): streamgate_upstream_server,
    else loopback when it is the only edge host, else its private address, on its port."""
    server = inventory.hostvars.get(app_host, {}).get("streamgate_upstream_server")
    if server:
        return str(server)
    host = advertised_address(inventory, app_host, "edge")
    return f"{host}:{inventory.var(app_host, 'streamgate_port')}"


def public_url(inventory: Inventory, edge_host: str) -> str:
    name = inventory.var(edge_host, "nginx_server_name")
    host = inventory.address(edge_host) if name in ("_", "") else name
    if inventory.var(edge_host, "nginx_tls"):
        port = port_of(inventory.var(edge_host, "nginx_listen_tls"))
        return f"https://{host}{'' if port == '443' else ':' + port}{CHAT_PATH}"
    port = port_of(inventory.var(edge_host, "nginx_listen"))
    return f"http://{host}{'' if port == '80' else ':' + port}{CHAT_PATH}"


def build_hops(
    inventory: Inventory, front: str | None = None, cacert: str | None = None
) -> list[Hop]:
    """Every hop in path order: from the model to the user. `cacert` verifies the hops probed
    from this machine (default: the CA next to the inventory for the public URL)."""
    app_hosts = inventory.groups.get("app") or []
    edge_hosts = inventory.groups.get("edge") or []
    if not app_hosts or not edge_hosts:
        raise ValueError(f"{inventory.path}: needs hosts in the groups 'app' and 'edge'")
    edge = edge_hosts[0]
    hops: list[Hop] = []
    seen_upstreams: set[str] = set()
    for app_host in app_hosts:
        base = upstream_url(inventory, app_host)
        if base in seen_upstreams:
            continue
        seen_upstreams.add(base)
        model = upstream_model(inventory, app_host)
        hops.append(
            Hop(
                "upstream" if len(seen_upstreams) == 1 else f"upstream:{app_host}",
                f"{base}/chat/completions",
                via=app_host,
                key=UPSTREAM_KEY,
                options=("--model", model) if model else (),
            )
        )
    for app_host in app_hosts:
        address = gateway_address(inventory, app_host)
        hops.append(Hop(f"gateway:{app_host}", f"http://{address}{CHAT_PATH}", via=edge))
    if inventory.var(edge, "nginx_tls"):
        port = port_of(inventory.var(edge, "nginx_listen_tls"))
        # Loopback on the edge: the certificate is checked at the public hop, from here.
        edge_hop = Hop(
            f"nginx:{edge}",
            f"https://127.0.0.1:{port}{CHAT_PATH}",
            via=edge,
            options=("--insecure",),
        )
    else:
        port = port_of(inventory.var(edge, "nginx_listen"))
        edge_hop = Hop(f"nginx:{edge}", f"http://127.0.0.1:{port}{CHAT_PATH}", via=edge)
    hops.append(edge_hop)
    ca_file = inventory.path.parent / CA_FILE_NAME
    public_ca = cacert or (str(ca_file) if ca_file.is_file() else None)
    hops.append(
        Hop(
            "public",
            public_url(inventory, edge),
            options=("--cacert", public_ca) if public_ca else (),
        )
    )
    if front:
        hops.append(Hop("front", front, options=("--cacert", cacert) if cacert else ()))
    return hops


def ssh_command(inventory: Inventory, host: str) -> list[str]:
    """ssh as Ansible reaches the host: its address, user, port, key and SSH arguments."""
    hostvars = inventory.hostvars.get(host, {})
    command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}"]
    if hostvars.get("ansible_port"):
        command += ["-p", str(hostvars["ansible_port"])]
    if hostvars.get("ansible_ssh_private_key_file"):
        command += ["-i", str(hostvars["ansible_ssh_private_key_file"])]
    for name in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        command += shlex.split(str(hostvars.get(name) or ""))
    user = hostvars.get("ansible_user")
    command.append(f"{user}@{inventory.address(host)}" if user else inventory.address(host))
    return command


def probe_command(hop: Hop, inventory: Inventory, probe_arguments: list[str]) -> list[str]:
    """ssh HOST python3 - URL OPTIONS: the probe's source (and key) come on standard input."""
    assert hop.via is not None, "probes from this machine run in this process"
    python = str(inventory.var(hop.via, "ansible_python_interpreter") or "python3")
    remote = shlex.join([python, "-", hop.url, *hop.options, *probe_arguments])
    return [*ssh_command(inventory, hop.via), remote]


def remote_script(key: str | None) -> str:
    """probe.py run as __main__, with `--key KEY` added to its arguments inside the process."""
    source = PROBE_SOURCE.read_text(encoding="utf-8")
    key_arguments = ["--key", key] if key else []
    return (
        f"import sys\nsys.argv[1:1] = {key_arguments!r}\n"
        f"exec(compile({source!r}, 'probe.py', 'exec'), {{'__name__': '__main__'}})\n"
    )


def probe_hop(
    hop: Hop,
    inventory: Inventory,
    probe_arguments: list[str],
    keys: dict[str, str | None],
    timeout_s: float,
) -> dict:
    """One probe's JSON result; a probe that could not run is a result with its `error`.
    `keys`: {CLIENT_KEY: ..., UPSTREAM_KEY: ...}, each sent only to the hops that check it."""
    key = keys.get(hop.key) if hop.key else None
    if hop.via is None:
        parser = argparse.ArgumentParser(prog="probe")
        probe.add_arguments(parser)
        arguments = [hop.url, *hop.options, *probe_arguments, *(["--key", key] if key else [])]
        return probe.probe(probe.options_from(parser, parser.parse_args(arguments)))
    command = probe_command(hop, inventory, probe_arguments)
    try:
        completed = subprocess.run(
            command,
            input=remote_script(key),
            capture_output=True,
            text=True,
            timeout=timeout_s + SSH_TIMEOUT_S + 5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"url": hop.url, "error": f"the probe on {hop.via} did not end"}
    try:
        result = json.loads(completed.stdout)
    except json.JSONDecodeError:
        where = f"ssh {hop.via}" if hop.via else "the probe"
        detail = (completed.stderr or completed.stdout).strip()[-300:]
        return {"url": hop.url, "error": f"{where} failed (exit {completed.returncode}): {detail}"}
    return result if isinstance(result, dict) else {"url": hop.url, "error": "not a probe result"}


def client_key(inventory: Inventory, given: str | None) -> str | None:
    """The key given, else STREAMGATE_DOCTOR_KEY, else the client-key file next to the inventory."""
    if given or os.environ.get(KEY_VARIABLE):
        return given or os.environ[KEY_VARIABLE]
    key_file = inventory.path.parent / CLIENT_KEY_FILE_NAME
    return key_file.read_text(encoding="utf-8").strip() if key_file.is_file() else None


def probe_inventory(
    inventory_path: Path,
    front: str | None = None,
    key: str | None = None,
    cacert: str | None = None,
    probe_arguments: list[str] | None = None,
    timeout_s: float = probe.DEFAULT_TIMEOUT_S,
) -> list[tuple[str, dict]]:
    """(hop name, probe result) for every hop of the deployment, probed one after another in
    path order. `probe_arguments` go to every probe (--max-tokens, --body); the key and the CA
    only where they apply."""
    inventory = read_inventory(inventory_path)
    keys = {
        CLIENT_KEY: client_key(inventory, key),
        UPSTREAM_KEY: os.environ.get(UPSTREAM_KEY_VARIABLE) or None,
    }
    arguments = [*(probe_arguments or []), "--timeout", str(timeout_s)]
    return [
        (hop.name, probe_hop(hop, inventory, arguments, keys, timeout_s))
        for hop in build_hops(inventory, front, cacert)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Hop mode's options on the doctor's command line."""
    parser.add_argument(
        "--inventory",
        type=Path,
        help="an Ansible inventory of this kit: probe every hop of that deployment, each from "
        "where its client sits (the edge's hosts over Ansible's SSH access)",
    )
    parser.add_argument(
        "--front",
        metavar="URL",
        help="with --inventory: also probe this URL in front of the edge (a CDN, a load balancer)",
    )


def probe_from_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> list[tuple[str, dict]]:
    """Hop mode from the doctor's parsed options: --key and --cacert where they apply (the CA
    for the hops probed from here), --max-tokens, --body and --header at every hop. An inventory
    it cannot read ends the command with status 2 and what to fix."""
    if args.url is not None:
        parser.error("give a URL or --inventory, not both")
    arguments = ["--max-tokens", str(args.max_tokens)]
    if args.body is not None:
        arguments += ["--body", args.body]
    for header in args.header or []:
        arguments += ["--header", header]
    try:
        return probe_inventory(
            args.inventory,
            front=args.front,
            key=args.key,
            cacert=args.cacert,
            probe_arguments=arguments,
            timeout_s=args.timeout,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        parser.exit(2, f"streamgate-doctor: cannot probe the hops of {args.inventory}: {error}\n")
