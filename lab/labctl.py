#!/usr/bin/env python3
"""Throwaway lab hosts: systemd-nspawn system containers, one network namespace each.

Each host boots a real systemd, has its own address on a private bridge, sshd and a
sudo user `lab`, so Ansible and testinfra treat it like a small VM. Run as root.

    labctl.py create --topology single|split --release bookworm|trixie [--llm llamacpp]
                     [--upstream simulator|llm]
    labctl.py inventory --upstream simulator|llm --output FILE
    labctl.py destroy [--purge-images]
    labctl.py status
    labctl.py address HOST_OR_GROUP
    labctl.py ssh HOST [COMMAND...]

Everything the lab makes on the machine carries the `sglab-` prefix (namespaces, links,
the NAT rule's comment, process names) or lives under lab/.state/, so `destroy` can
clear what an interrupted run left without touching anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

# The lab's only network settings: every address is derived from here.
LAB_SUBNET = ipaddress.ip_network("10.231.0.0/24")
GATEWAY_ADDRESS = LAB_SUBNET.network_address + 1
FIRST_HOST_OFFSET = 10

NAME_PREFIX = "sglab-"
BRIDGE_NAME = f"{NAME_PREFIX}br0"
NAT_COMMENT = f"{NAME_PREFIX}lab"
LAB_USER = "lab"

TOPOLOGIES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "single": [(f"{NAME_PREFIX}single", ("edge", "app", "simulator"))],
    "split": [
        (f"{NAME_PREFIX}edge", ("edge",)),
        (f"{NAME_PREFIX}app1", ("app",)),
        (f"{NAME_PREFIX}app2", ("app",)),
        (f"{NAME_PREFIX}sim", ("simulator",)),
    ],
}
# `--llm llamacpp` adds this host to either topology: llama.cpp's server (the llm role).
LLM_HOST = (f"{NAME_PREFIX}llm", ("llm",))
LLM_SERVERS = ("llamacpp",)
INVENTORY_GROUPS = ("edge", "app", "simulator", "llm")
# What the app hosts stream from: the simulator host, or the llm host (when there is one).
UPSTREAMS = ("simulator", "llm")
RELEASES = ("bookworm", "trixie")
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "openssh-server",
    "sudo",
    "iproute2",
    "ca-certificates",
)
# The base image's tarball, made and unpacked with numeric owners and every extended attribute
# (file capabilities) kept.
TAR = ("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*")

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = REPO_ROOT / "lab" / ".state"
IMAGES_DIR = STATE_DIR / "images"
HOSTS_DIR = STATE_DIR / "hosts"
SSH_KEY = STATE_DIR / "ssh" / "id_ed25519"
STATE_FILE = STATE_DIR / "lab.json"
# Machine-wide, not per checkout: the lab's names and subnet are global, so a create from a
# second checkout (a CI workspace, a copy of the repo) replaces this one's lab; never both at once.
LOCK_FILE = Path("/run") / f"{NAME_PREFIX}labctl.lock"
# The lab switches IPv4 forwarding on; the value it found is kept (machine-wide, for the same
# reason) until destroy puts it back.
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IP_FORWARD_BEFORE_FILE = Path("/run") / f"{NAME_PREFIX}ip_forward.before"
INVENTORY_FILE = REPO_ROOT / "ansible" / "inventories" / "lab" / "hosts.yml"
# Secrets of one lab, next to its inventory (mode 0600, git-ignored), read by the lab's
# group_vars: the client key every test and load test sends, and a stand-in upstream API key
# (the simulator ignores it) that no log may ever show. The generated CA lives there too.
CLIENT_KEY_FILE = INVENTORY_FILE.parent / "client-key"
UPSTREAM_KEY_FILE = INVENTORY_FILE.parent / "upstream-key"
LAB_GENERATED_FILES = (
    CLIENT_KEY_FILE,
    UPSTREAM_KEY_FILE,
    INVENTORY_FILE.parent / "ca.pem",
    INVENTORY_FILE.parent / "ca-key.pem",
    INVENTORY_FILE.parent / "ca.srl",
)
# Ansible's SSH multiplexing sockets, one directory per lab: a new lab reuses the old lab's
# addresses, and a master left attached to a hard-killed host could stall the next connection.
# Under /tmp because a socket path must stay short (108 bytes).
SSH_CONTROL_GLOB = f"{NAME_PREFIX}ssh-*"

# Trust and name resolution are copied from the controller: HTTPS from the hosts may pass
# a TLS-intercepting egress proxy whose CA only the controller's store knows.
CONTROLLER_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTROLLER_EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
CONTROLLER_RESOLV_CONF = Path("/etc/resolv.conf")
# Where systemd-resolved lists the real servers when /etc/resolv.conf points at its stub.
RESOLVED_UPSTREAM_CONF = Path("/run/systemd/resolve/resolv.conf")

BOOT_TIMEOUT_S = 90
SSH_TIMEOUT_S = 60
STOP_GRACE_S = 10
# Throwaway hosts get fresh host keys on every create: no prompts, no known_hosts entries.
SSH_HOST_KEY_OPTIONS = (
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
)


class LabError(Exception):
    """A step failed; the message says which and why."""


@dataclass
class LabHost:
    name: str
    address: str
    groups: tuple[str, ...]
    nspawn_pid: int = 0

    @property
    def root(self) -> Path:
        return HOSTS_DIR / self.name / "rootfs"

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"


def log(message: str) -> None:
    print(f"[labctl] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, check=False, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LabError(
            f"`{shlex.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}"
        )
    if not quiet and result.returncode != 0:
        log(f"ignored: `{shlex.join(argv)}`: {result.stderr.strip()}")
    return result


def plan_hosts(topology: str, llm: str | None = None) -> list[LabHost]:
    planned = TOPOLOGIES[topology] + ([LLM_HOST] if llm else [])
    return [
        LabHost(name, str(LAB_SUBNET.network_address + FIRST_HOST_OFFSET + index), groups)
        for index, (name, groups) in enumerate(planned)
    ]


@contextlib.contextmanager
def lab_lock():
    """Serialise labctl runs: two creates interleaving would tear each other's hosts down."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another labctl run to finish ({LOCK_FILE})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------- base image


def image_tarball(release: str) -> Path:
    # The package list is part of the name so a changed list never reuses a stale image.
    digest = hashlib.sha256(",".join(BASE_PACKAGES).encode()).hexdigest()[:8]
    return IMAGES_DIR / f"{release}-{digest}.tar"


def ensure_base_image(release: str) -> Path:
    tarball = image_tarball(release)
    if tarball.exists():
        log(f"base image {release}: cached ({tarball.name})")
        return tarball
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    build_dir = IMAGES_DIR / f"{release}.build"
    build_log = IMAGES_DIR / f"{release}.debootstrap.log"
    remove_tree(build_dir)
    log(f"base image {release}: debootstrap (first run only, about a minute)")
    started = time.monotonic()
    # No mirror argument: debootstrap's default mirror, never a host name in the repo.
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        release,
        str(build_dir),
    ]
    with open(build_log, "w") as out:
        if subprocess.run(argv, check=False, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            tail = build_log.read_text(errors="replace").splitlines()[-15:]
            remove_tree(build_dir)
            raise LabError(f"debootstrap {release} failed:\n" + "\n".join(tail))
    prepare_base_image(build_dir)
    partial = tarball.with_suffix(".partial")
    run([*TAR, "-C", str(build_dir), "-cpf", str(partial), "."])
    partial.rename(tarball)
    remove_tree(build_dir)
    log(f"base image {release}: built in {time.monotonic() - started:.0f} s")
    return tarball


def unpack(tarball: Path, directory: Path) -> None:
    run([*TAR, "-C", str(directory), "-xpf", str(tarball)])


def prepare_base_image(root: Path) -> None:
    """What every host shares: the sudo user, no shared SSH host keys, no package cache."""
    run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash", LAB_USER])
    sudoers = root / "etc" / "sudoers.d" / LAB_USER
    sudoers.write_text(f"{LAB_USER} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    for host_key in (root / "etc" / "ssh").glob("ssh_host_*"):
        host_key.unlink()
    for package in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        package.unlink()
    # Makes sure sshd starts at boot whatever the package's postinst did in the chroot.
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    ssh_link = wants / "ssh.service"
    if not ssh_link.exists() and not ssh_link.is_symlink():
        ssh_link.symlink_to("/lib/systemd/system/ssh.service")


# ---------------------------------------------------------------- per host


def ensure_ssh_key() -> Path:
    if not SSH_KEY.exists():
        SSH_KEY.parent.mkdir(parents=True, exist_ok=True)
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"{NAME_PREFIX}lab",
                "-f",
                str(SSH_KEY),
            ]
        )
    return SSH_KEY


def ensure_image_tree(tarball: Path) -> Path:
    """The unpacked base image, shared read-only by every host as its overlay's lower layer."""
    tree = tarball.with_suffix(".rootfs")
    if not tree.is_dir():
        partial = tarball.with_suffix(".rootfs-partial")
        remove_tree(partial)
        partial.mkdir()
        unpack(tarball, partial)
        partial.rename(tree)
    return tree


def mount_host_root(host: LabHost, tarball: Path) -> str:
    """An overlay over the shared image (instant, small); a full unpacked copy where overlays
    fail."""
    host.root.mkdir(parents=True)
    upper, work = host.root.with_name("upper"), host.root.with_name("work")
    upper.mkdir()
    work.mkdir()
    layers = f"lowerdir={ensure_image_tree(tarball)},upperdir={upper},workdir={work}"
    if (
        run(
            ["mount", "-t", "overlay", "overlay", "-o", layers, str(host.root)], check=False
        ).returncode
        == 0
    ):
        return "overlay"
    unpack(tarball, host.root)
    return "copy"


def populate_host_root(host: LabHost, tarball: Path, hosts: list[LabHost]) -> None:
    log(f"{host.name}: root file system ({mount_host_root(host, tarball)})")
    etc = host.root / "etc"
    (etc / "hostname").write_text(f"{host.name}\n")
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    # Every lab host by name; a host's own name resolves to its lab address, as on a VM.
    lab_names = "".join(f"{other.address}\t{other.name}\n" for other in hosts)
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{lab_names}")
    resolv = etc / "resolv.conf"
    resolv.unlink(missing_ok=True)  # may be a symlink into the image
    resolv.write_text(controller_resolv_conf())
    copy_trust_store(host.root)
    run(["ssh-keygen", "-A", "-f", str(host.root)])
    ssh_dir = host.root / "home" / LAB_USER / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(SSH_KEY.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    owner = (host.root / "home" / LAB_USER).stat()
    for path in (ssh_dir, authorized):
        os.chown(path, owner.st_uid, owner.st_gid)


def controller_resolv_conf() -> str:
    """The controller's resolvers, minus loopback stubs (127.0.0.53 means nothing inside a host)."""
    for candidate in (CONTROLLER_RESOLV_CONF, RESOLVED_UPSTREAM_CONF):
        if not candidate.exists():
            continue
        text = candidate.read_text()
        servers = [
            line.split()[1]
            for line in text.splitlines()
            if line.startswith("nameserver") and len(line.split()) > 1
        ]
        if any(not ipaddress.ip_address(server.split("%")[0]).is_loopback for server in servers):
            return text
    log("warning: the controller has no non-loopback nameserver; hosts will not resolve names")
    return CONTROLLER_RESOLV_CONF.read_text() if CONTROLLER_RESOLV_CONF.exists() else ""


def copy_trust_store(root: Path) -> None:
    """The controller's CA bundle, plus its extra CAs so a later update-ca-certificates keeps
    them."""
    bundle = root / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONTROLLER_CA_BUNDLE, bundle)
    if CONTROLLER_EXTRA_CA_DIR.is_dir():
        shutil.copytree(
            CONTROLLER_EXTRA_CA_DIR,
            root / "usr" / "local" / "share" / "ca-certificates",
            dirs_exist_ok=True,
        )


def setup_network(hosts: list[LabHost]) -> None:
    prefix = LAB_SUBNET.prefixlen
    run(["ip", "link", "add", BRIDGE_NAME, "type", "bridge"])
    run(["ip", "addr", "add", f"{GATEWAY_ADDRESS}/{prefix}", "dev", BRIDGE_NAME])
    run(["ip", "link", "set", BRIDGE_NAME, "up"])
    for host in hosts:
        netns = ["ip", "-n", host.name]
        run(["ip", "netns", "add", host.name])
        run(
            [
                "ip",
                "link",
                "add",
                host.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.name,
            ]
        )
        run(["ip", "link", "set", host.name, "master", BRIDGE_NAME, "up"])
        run([*netns, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0"])
        run([*netns, "link", "set", "lo", "up"])
        run([*netns, "link", "set", "eth0", "up"])
        run([*netns, "route", "add", "default", "via", str(GATEWAY_ADDRESS)])
    if not IP_FORWARD_BEFORE_FILE.exists():  # a lab from another checkout may have switched it on
        IP_FORWARD_BEFORE_FILE.write_text(IP_FORWARD.read_text())
    IP_FORWARD.write_text("1\n")
    for table, chain, *match in lab_rules():
        # Inserted first: a DROP further up (another tool's FORWARD rules) must not hide them.
        run(["iptables", "-t", table, "-I", chain, *match])


def lab_rules() -> list[list[str]]:
    """Table, chain and match of each iptables rule the lab adds; all tagged with NAT_COMMENT."""
    subnet = str(LAB_SUBNET)
    tag = ["-m", "comment", "--comment", NAT_COMMENT]
    return [
        ["nat", "POSTROUTING", "-s", subnet, "!", "-d", subnet, *tag, "-j", "MASQUERADE"],
        # Only matter where FORWARD drops by default (CI runners with a container engine). What
        # the lab needs and nothing more: its hosts reach out (apt, pip) through the bridge, and
        # the answers come back. Nothing routed through the controller may open a connection
        # to a lab host: only the controller itself (OUTPUT, not FORWARD) and the hosts do.
        ["filter", "FORWARD", "-i", BRIDGE_NAME, "-s", subnet, *tag, "-j", "ACCEPT"],
        [
            "filter",
            "FORWARD",
            "-o",
            BRIDGE_NAME,
            "-d",
            subnet,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            *tag,
            "-j",
            "ACCEPT",
        ],
    ]


def cgroup_roots() -> list[Path]:
    """Mount points of the cgroup v2 hierarchy and of the v1 name=systemd one (hybrid hosts)."""
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        after = fields[fields.index("-") + 1 :]
        fstype, super_options = after[0], after[2].split(",")
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in super_options):
            roots.append(Path(fields[4]))
    return list(dict.fromkeys(roots))


def host_cgroups(host_name: str) -> list[Path]:
    return [root / host_name for root in cgroup_roots()]


def boot_host(host: LabHost) -> None:
    # Without a systemd on the controller, nspawn nests the container under the cgroup it was
    # started from: hosts started from the same cgroup would share one ("payload") and their
    # systemds would remove each other's unit cgroups. So each host gets its own cgroup first.
    cgroups = host_cgroups(host.name)
    for cgroup in cgroups:
        cgroup.mkdir(exist_ok=True)

    def enter_own_cgroup() -> None:
        for cgroup in cgroups:
            (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

    with open(HOSTS_DIR / host.name / "console.log", "w") as console_log:
        process = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                str(host.root),
                "-b",
                "-M",
                host.name,
                "--register=no",
                "--keep-unit",
                f"--network-namespace-path={host.netns_path}",
                # A VM's root may change its own firewall: nftables in the host's own namespace.
                "--capability=CAP_NET_ADMIN",
                "--console=read-only",
                "--resolv-conf=off",
                "--link-journal=no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # setsid: the host outlives this command
            preexec_fn=enter_own_cgroup,  # safe: the controller is single-threaded here
        )
    host.nspawn_pid = process.pid
    (HOSTS_DIR / host.name / "nspawn.pid").write_text(f"{process.pid}\n")


def remove_cgroups() -> None:
    """Our sglab-* cgroups, deepest first (a cgroup directory only goes once it is empty)."""
    for root in cgroup_roots():
        for top in root.glob(f"{NAME_PREFIX}*"):
            for directory, _, _ in sorted(os.walk(top), key=lambda item: -len(item[0])):
                try:
                    os.rmdir(directory)
                except OSError as error:
                    log(f"ignored: cannot remove cgroup {directory}: {error.strerror}")


def container_leader(nspawn_pid: int) -> int | None:
    """The container's PID 1, seen from the controller: the nspawn process's child."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def system_state(host: LabHost) -> str:
    leader = container_leader(host.nspawn_pid)
    if leader is None:
        return "no-leader"
    result = run(
        ["nsenter", "-t", str(leader), "-a", "systemctl", "is-system-running"],
        check=False,
        quiet=True,
    )
    return result.stdout.strip() or "unknown"


def wait_until(description: str, timeout_s: float, probe) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        last = probe()
        if last is True:
            return
        if time.monotonic() > deadline:
            raise LabError(f"{description}: not ready after {timeout_s:.0f} s (last: {last})")
        time.sleep(0.5)


def wait_for_boot(host: LabHost) -> None:
    def probe():
        if not Path(f"/proc/{host.nspawn_pid}").exists():
            tail = (HOSTS_DIR / host.name / "console.log").read_text(errors="replace")[-800:]
            raise LabError(f"{host.name}: systemd-nspawn exited during boot:\n{tail}")
        state = system_state(host)
        return True if state in ("running", "degraded") else state

    wait_until(f"{host.name} boot", BOOT_TIMEOUT_S, probe)
    state = system_state(host)
    if state == "degraded":
        failed = run(
            [
                "nsenter",
                "-t",
                str(container_leader(host.nspawn_pid)),
                "-a",
                "systemctl",
                "--failed",
                "--no-legend",
                "--plain",
            ],
            check=False,
            quiet=True,
        )
        log(f"{host.name}: degraded, failed units: {failed.stdout.strip()}")


def ssh_argv(host_address: str, command: list[str] | None = None, *extra_options: str) -> list[str]:
    return [
        "ssh",
        "-i",
        str(SSH_KEY),
        *SSH_HOST_KEY_OPTIONS,
        "-o",
        "BatchMode=yes",
        *extra_options,
        f"{LAB_USER}@{host_address}",
        *(command or []),
    ]


def wait_for_ssh(host: LabHost) -> None:
    def probe():
        argv = ssh_argv(host.address, ["sudo", "-n", "true"], "-o", "ConnectTimeout=3")
        result = run(argv, check=False, quiet=True)
        return True if result.returncode == 0 else result.stderr.strip()[-200:]

    wait_until(f"{host.name} ssh", SSH_TIMEOUT_S, probe)


# ---------------------------------------------------------------- inventory


def write_inventory(
    hosts: list[LabHost],
    topology: str,
    release: str,
    control_dir: Path,
    upstream: str,
    path: Path | None = None,
) -> None:
    """The lab's inventory; `upstream` llm points the app hosts at the llm host (host variables,
    which win over group_vars/all.yml)."""
    quote = json.dumps  # a JSON string is a valid YAML scalar
    lines = [
        "# Generated by lab/labctl.py for throwaway lab hosts; `make lab-destroy` removes it.",
        "all:",
        "  vars:",
        f"    ansible_user: {LAB_USER}",
        f"    ansible_ssh_private_key_file: {quote(str(SSH_KEY))}",
        f"    ansible_ssh_common_args: {quote(' '.join(SSH_HOST_KEY_OPTIONS))}",
        "    ansible_python_interpreter: /usr/bin/python3",
        f"    ansible_control_path_dir: {quote(str(control_dir))}",
        f"    lab_topology: {topology}",
        f"    lab_release: {release}",
        "  children:",
    ]
    for group in INVENTORY_GROUPS:
        members = [host for host in hosts if group in host.groups]
        lines += [f"    {group}:", "      hosts:" if members else "      hosts: {}"]
        for host in members:
            lines += [f"        {host.name}:", f"          ansible_host: {host.address}"]
            if group == "app" and upstream == "llm":
                lines += [
                    '          streamgate_upstream_base_url: "{{ __streamgate_llm_url }}"',
                    "          streamgate_upstream_kind: openai-compatible",
                ]
    path = path or INVENTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_secret(path: Path, text: str) -> None:
    """A file only root can read, created with that mode (never readable for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as secret_file:
        secret_file.write(text + "\n")


def write_lab_secrets() -> None:
    # 43 URL-safe characters (256 bits): above the role's 32-character minimum.
    write_secret(CLIENT_KEY_FILE, secrets.token_urlsafe(32))
    write_secret(UPSTREAM_KEY_FILE, "sk-lab-" + secrets.token_urlsafe(32))


# ---------------------------------------------------------------- destroy


def process_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def nspawn_machine_name(argv: list[str]) -> str | None:
    if not argv or os.path.basename(argv[0]) != "systemd-nspawn":
        return None
    for index, arg in enumerate(argv):
        if arg in ("-M", "--machine") and index + 1 < len(argv):
            return argv[index + 1]
        for flag in ("--machine=", "-M"):
            if arg.startswith(flag) and len(arg) > len(flag):
                return arg[len(flag) :]
    return None


def nspawn_directory(argv: list[str]) -> str:
    for index, arg in enumerate(argv):
        if arg in ("-D", "--directory") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--directory="):
            return arg.removeprefix("--directory=")
    return "?"


def lab_processes() -> tuple[list[int], list[int]]:
    """Our nspawn processes (by -M sglab-*) and processes whose root is one of our host dirs."""
    nspawns, rooted = [], []
    hosts_prefix = str(HOSTS_DIR) + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        name = nspawn_machine_name(process_cmdline(pid))
        if name and name.startswith(NAME_PREFIX):
            nspawns.append(pid)
            continue
        try:
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            continue
        if root.startswith(hosts_prefix):
            rooted.append(pid)
    return nspawns, rooted


def send_signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def stop_processes() -> None:
    recorded = [
        int(p.read_text())
        for p in HOSTS_DIR.glob(f"{NAME_PREFIX}*/nspawn.pid")
        if p.read_text().strip().isdigit()
    ]
    nspawns, _ = lab_processes()
    # A recorded PID counts only while it still is one of our nspawn processes (PIDs get reused).
    targets = sorted({pid for pid in recorded if pid in nspawns} | set(nspawns))
    for pid in targets:
        argv = process_cmdline(pid)
        origin = nspawn_directory(argv)
        elsewhere = (
            ""
            if origin.startswith(str(HOSTS_DIR) + "/")
            else f", started from another checkout: {origin}"
        )
        log(f"stopping systemd-nspawn {pid} ({nspawn_machine_name(argv)}{elsewhere})")
        send_signal(pid, signal.SIGTERM)  # nspawn asks the container's systemd to power off
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in targets):
        time.sleep(0.3)
    nspawns, rooted = lab_processes()
    for pid in nspawns + rooted:
        log(f"killing leftover process {pid}")
        send_signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(lab_processes()):
        time.sleep(0.3)


def remove_network() -> None:
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(NAME_PREFIX):
            run(["ip", "netns", "del", name], check=False)
    for line in run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(NAME_PREFIX):
            # quiet: a veth may vanish by itself once its namespace is gone
            run(["ip", "link", "del", name], check=False, quiet=True)
    for table, chain in dict.fromkeys((table, chain) for table, chain, *_ in lab_rules()):
        listing = run(["iptables", "-t", table, "-S", chain], check=False, quiet=True).stdout
        for rule in tagged_rules(listing):
            run(["iptables", "-t", table, "-D", *rule], check=False)


def tagged_rules(listing: str) -> list[list[str]]:
    """Chain and match of each rule in an `iptables -S` listing that carries the lab's tag."""
    rules = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if words[:1] == ["-A"] and ("--comment", NAT_COMMENT) in itertools.pairwise(words):
            rules.append(words[1:])
    return rules


def mounts_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...)
    mount_points = [
        re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), line.split()[4])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    return sorted((m for m in mount_points if m.startswith(prefix)), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf that never reaches through a mount point left inside (an overlay, or the /proc,
    /sys and /dev an interrupted debootstrap leaves in its target)."""
    if not path.exists():
        return
    for mount_point in mounts_below(path):
        run(["umount", "-l", mount_point], check=False)
    if mounts_below(path):
        raise LabError(f"{path}: still has mounts inside {mounts_below(path)}; not deleting it")
    shutil.rmtree(path)


def destroy(purge_images: bool = False) -> None:
    stop_processes()
    remove_network()
    remove_cgroups()
    if IP_FORWARD_BEFORE_FILE.exists():
        IP_FORWARD.write_text(IP_FORWARD_BEFORE_FILE.read_text())
        IP_FORWARD_BEFORE_FILE.unlink()
    if HOSTS_DIR.exists():
        for host_dir in HOSTS_DIR.glob(f"{NAME_PREFIX}*"):
            remove_tree(host_dir)
    for control_dir in Path(tempfile.gettempdir()).glob(SSH_CONTROL_GLOB):
        shutil.rmtree(control_dir, ignore_errors=True)
    if purge_images:
        remove_tree(IMAGES_DIR)
    STATE_FILE.unlink(missing_ok=True)
    INVENTORY_FILE.unlink(missing_ok=True)
    for generated in LAB_GENERATED_FILES:
        generated.unlink(missing_ok=True)
    shutil.rmtree(INVENTORY_FILE.parent / "tls", ignore_errors=True)  # the edge certificates
    log("lab destroyed (nothing named sglab-* left)")


# ---------------------------------------------------------------- commands


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("run as root: the lab makes network namespaces and boots containers")


def create(topology: str, release: str, llm: str | None, upstream: str | None) -> None:
    upstream = upstream or ("llm" if llm else "simulator")
    if upstream == "llm" and not llm:
        raise LabError("--upstream llm needs an llm host: add --llm llamacpp")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "iptables", "ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` not found: `make deps` installs the controller's packages")
    started = time.monotonic()
    destroy()
    tarball = ensure_base_image(release)
    ensure_ssh_key()
    hosts = plan_hosts(topology, llm)
    phase_started = time.monotonic()
    timings = {}
    for host in hosts:
        populate_host_root(host, tarball, hosts)
    timings["copy"] = time.monotonic() - phase_started
    control_dir = Path(tempfile.gettempdir()) / SSH_CONTROL_GLOB.replace("*", uuid.uuid4().hex[:8])
    state = {
        "topology": topology,
        "release": release,
        "control_dir": str(control_dir),
        "hosts": [],
    }
    setup_network(hosts)
    STATE_FILE.write_text(json.dumps(state, indent=2))
    for host in hosts:
        boot_host(host)
    state["hosts"] = [asdict(host) for host in hosts]
    STATE_FILE.write_text(json.dumps(state, indent=2))
    for host in hosts:
        wait_for_boot(host)
    timings["boot"] = time.monotonic() - phase_started - timings["copy"]
    for host in hosts:
        wait_for_ssh(host)
    write_lab_secrets()
    write_inventory(hosts, topology, release, control_dir, upstream)
    done = time.monotonic()
    timings["ssh"] = done - phase_started - timings["copy"] - timings["boot"]
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    log(
        f"{topology} lab on {release} up: hosts in {done - phase_started:.1f} s ({phases}), "
        f"total {done - started:.1f} s; inventory {INVENTORY_FILE.relative_to(REPO_ROOT)}"
    )
    for host in hosts:
        print(f"{host.name}\t{host.address}\t{','.join(host.groups)}")


def load_hosts() -> list[LabHost]:
    if not STATE_FILE.exists():
        raise LabError("no lab: `make lab` creates one")
    state = json.loads(STATE_FILE.read_text())
    return [
        LabHost(h["name"], h["address"], tuple(h["groups"]), h["nspawn_pid"])
        for h in state["hosts"]
    ]


def write_other_inventory(upstream: str, path: Path) -> None:
    """The running lab's inventory with the app hosts on another upstream."""
    if not STATE_FILE.exists():
        raise LabError("no lab: `make lab` creates one")
    state = json.loads(STATE_FILE.read_text())
    hosts = load_hosts()
    if upstream == "llm" and not any("llm" in host.groups for host in hosts):
        raise LabError("this lab has no llm host: create it with --llm llamacpp")
    write_inventory(
        hosts, state["topology"], state["release"], Path(state["control_dir"]), upstream, path
    )


def find_host(name_or_group: str) -> LabHost:
    hosts = load_hosts()
    for host in hosts:
        if name_or_group in (host.name, host.name.removeprefix(NAME_PREFIX)):
            return host
    for host in hosts:
        if name_or_group in host.groups:
            return host
    raise LabError(
        f"no lab host or group {name_or_group!r}; hosts: {', '.join(h.name for h in hosts)}"
    )


def status() -> None:
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else None
    if state is None:
        print("no lab")
        return
    print(f"topology {state['topology']}, release {state['release']}")
    for host in load_hosts():
        print(f"{host.name}\t{host.address}\t{','.join(host.groups)}\t{system_state(host)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    create_parser = commands.add_parser("create", help="destroy any old lab, then create one")
    create_parser.add_argument("--topology", choices=sorted(TOPOLOGIES), default="split")
    create_parser.add_argument("--release", choices=RELEASES, default="bookworm")
    create_parser.add_argument("--llm", choices=LLM_SERVERS, help="add an llm host (llama.cpp)")
    create_parser.add_argument(
        "--upstream", choices=UPSTREAMS, help="what the app hosts stream from (default: llm if any)"
    )
    inventory_parser = commands.add_parser(
        "inventory", help="write the running lab's inventory with another upstream"
    )
    inventory_parser.add_argument("--upstream", choices=UPSTREAMS, required=True)
    inventory_parser.add_argument("--output", type=Path, required=True)
    destroy_parser = commands.add_parser(
        "destroy", help="remove hosts, namespaces, links, NAT rules"
    )
    destroy_parser.add_argument(
        "--purge-images", action="store_true", help="also drop cached base images"
    )
    commands.add_parser("status", help="list hosts and their systemd state")
    address_parser = commands.add_parser(
        "address", help="print the address of a host or of a group's first host"
    )
    address_parser.add_argument("host")
    ssh_parser = commands.add_parser("ssh", help="ssh into a lab host as the lab user")
    ssh_parser.add_argument("host")
    ssh_parser.add_argument("remote_command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    try:
        if args.command == "address":
            print(find_host(args.host).address)
            return 0
        if args.command == "ssh":
            os.execvp("ssh", ssh_argv(find_host(args.host).address, args.remote_command))
        if args.command == "inventory":
            write_other_inventory(args.upstream, args.output)
            return 0
        require_root()
        # A TERM (CI timeout, make interrupted) unwinds like Ctrl-C, so a failed create cleans up.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        with lab_lock():
            if args.command == "create":
                try:
                    create(args.topology, args.release, args.llm, args.upstream)
                except BaseException:
                    log("create failed: tearing the partial lab down")
                    destroy()
                    raise
            elif args.command == "destroy":
                destroy(args.purge_images)
            elif args.command == "status":
                status()
    except LabError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
