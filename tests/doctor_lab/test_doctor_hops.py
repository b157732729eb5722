"""streamgate-doctor --inventory on the split lab: on the healthy deployment it names no hop;
with a real buffering fault injected at one hop it names exactly that hop and its cause.

Faults, each injected over the SSH access Ansible uses and taken back out in a `finally` (and
checked gone) before the next:
- the edge's nginx site with gzip on for the stream types: streams still (nginx flushes gzip
  per upstream read while proxy buffering is off), so no hop may be named, but the answer must
  show it was compressed;
- the edge's nginx with proxy buffering on and the app's X-Accel-Buffering ignored: over TLS
  nginx then holds the whole answer (no flush per read: the TLS record buffer fills instead);
- both (a server-wide gzip where buffering is on): the answer arrives compressed, at once;
- a buffering relay in front of the LAST app host's gateway (nftables redirects its port to the
  relay on that host): that app host's hop, not the app host probed before it;
- a buffering relay in front of the edge, given to the doctor with --front: named, and not
  blamed on nginx, whose Server header it passes on from the streamed hop behind it.
Measured on the split lab (bookworm, nginx 1.22, 2026-11-30): the healthy run and the five
faults above, with the restores, take about 50 s.
The nginx edits are made to the rendered site file and reloaded (never a playbook run: too slow);
the file is written back byte for byte afterwards. Run as `pytest tests/doctor_lab
--ansible-inventory=INVENTORY` (the lab only, never real hosts: it injects faults).
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from streamgate.doctor import hops
from support.nginx import BUFFERED, COMPRESSED, UNBUFFERED, UNCOMPRESSED

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RELAY = HERE / "holding_relay.py"
# The nginx role's own path of the site it renders (one definition: the role's Debian vars).
EDGE_SITE = yaml.safe_load((REPO / "ansible/roles/nginx/vars/Debian.yml").read_text())[
    "__nginx_site_file"
]
NGINX_PID_FILE = "/run/nginx.pid"
# The relay on an app host: a transient systemd unit, and an nftables table of its own that sends
# the gateway's port to it (connections the relay itself opens are local, so not redirected).
RELAY_UNIT = "sgdoctor-relay"
RELAY_FILE = "/run/sgdoctor-relay.py"
RELAY_PORT = 18001
NFT_TABLE = "sgdoctor"
# The wheel's command, as a user runs it.
DOCTOR = Path(sys.executable).with_name("streamgate-doctor")
DOCTOR_TIMEOUT_S = 120
# The simulator's 20 ms apart: a second of stream per probe, enough to judge (verdict.MIN_TOKENS).
PROBE_TOKENS = 50

pytestmark = pytest.mark.timeout(300)


def redirect_rules(port: str) -> str:
    """nftables: connections from other hosts to `port` go to the relay instead."""
    return (
        f"table ip {NFT_TABLE} {{\n    chain prerouting {{\n"
        "        type nat hook prerouting priority dstnat;\n"
        f"        tcp dport {port} redirect to :{RELAY_PORT}\n    }}\n}}\n"
    )


class Lab:
    """The deployment as the doctor sees it, and root commands on its hosts over Ansible's SSH."""

    def __init__(self, inventory: Path) -> None:
        self.path = inventory
        self.inventory = hops.read_inventory(inventory)
        self.edge = self.inventory.groups["edge"][0]
        self.app_hosts = self.inventory.groups["app"]

    def sudo(self, host: str, script: str, stdin: str | None = None) -> str:
        command = [*hops.ssh_command(self.inventory, host), f"sudo -n sh -c {shlex.quote(script)}"]
        result = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{host}: {script!r} failed: {result.stderr[-1000:]}"
        return result.stdout

    def doctor(self, *arguments: str) -> tuple[int, dict]:
        command = [
            str(DOCTOR),
            "--inventory",
            str(self.path),
            "--json",
            "--max-tokens",
            str(PROBE_TOKENS),
            *arguments,
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=DOCTOR_TIMEOUT_S, check=False
        )
        try:
            return result.returncode, json.loads(result.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"the doctor printed no JSON (exit {result.returncode}): {result.stderr}")


@pytest.fixture(scope="module")
def lab(inventory) -> Lab:
    found = Lab(inventory)
    if len(found.app_hosts) < 2 or found.edge in found.app_hosts:
        pytest.skip("needs the split lab: an edge host and two app hosts")
    return found


def timelines(report: dict) -> str:
    """Each hop's verdict and reads, for a failure message."""
    return "\n".join(
        f"  {hop['name']:<22} {hop['verdict']:<12} ttft={hop.get('ttft_ms')} "
        f"reads={hop.get('reads')} tokens={hop.get('tokens')} cause={hop.get('cause')} "
        f"error={hop.get('error')}"
        for hop in report["hops"]
    )


def assert_named(lab: Lab, outcome: tuple[int, dict], hop: str | None, cause: str | None) -> dict:
    """The doctor's exit code and first buffering hop are `hop`'s, that hop's cause is `cause`,
    and every hop before it streamed. Returns the report."""
    code, report = outcome
    names = [entry["name"] for entry in report["hops"]]
    assert report["first_buffering_hop"] == hop, timelines(report)
    assert code == (0 if hop is None else 1), timelines(report)
    before = names if hop is None else names[: names.index(hop)]
    for entry in report["hops"]:
        if entry["name"] in before:
            assert entry["verdict"] == "streamed", timelines(report)
    if hop is not None:
        named = report["hops"][names.index(hop)]
        assert named["verdict"] != "streamed", timelines(report)
        if cause is not None:
            assert named["cause"] == cause, timelines(report)
    return report


def wait_for_nginx_reload(lab: Lab) -> None:
    """Reload nginx and return once every worker of the old configuration has exited."""
    lab.sudo(
        lab.edge,
        f"master=$(cat {NGINX_PID_FILE}); old=$(cat /proc/$master/task/*/children); "
        "nginx -t -q && systemctl reload nginx && "
        "for i in $(seq 100); do alive=; for p in $old; do [ -d /proc/$p ] && alive=1; done; "
        '[ -z "$alive" ] && exit 0; sleep 0.1; done; echo old workers still alive >&2; exit 1',
    )


@contextmanager
def edge_site_edited(lab: Lab, replacements: dict[str, str]) -> Iterator[None]:
    """The edge's site with each text replaced (each must occur exactly once), live until exit;
    then the original, byte for byte, live again."""
    original = lab.sudo(lab.edge, f"cat {EDGE_SITE}")
    edited = original
    for old, new in replacements.items():
        assert original.count(old) == 1, f"{old!r} is not once in {EDGE_SITE}"
        edited = edited.replace(old, new)
    try:
        lab.sudo(lab.edge, f"cat > {EDGE_SITE}", stdin=edited)
        wait_for_nginx_reload(lab)
        yield
    finally:
        lab.sudo(lab.edge, f"cat > {EDGE_SITE}", stdin=original)
        wait_for_nginx_reload(lab)
        assert lab.sudo(lab.edge, f"cat {EDGE_SITE}") == original


@contextmanager
def relay_in_front_of_gateway(lab: Lab, app_host: str) -> Iterator[None]:
    """The buffering relay on `app_host`, and its gateway's port redirected to it."""
    gateway = hops.gateway_address(lab.inventory, app_host)
    port = gateway.rsplit(":", 1)[1]
    relay = f"python3 {RELAY_FILE} 0.0.0.0:{RELAY_PORT} {gateway}"
    try:
        lab.sudo(app_host, f"cat > {RELAY_FILE}", stdin=RELAY.read_text())
        lab.sudo(
            app_host,
            f"systemd-run --quiet --collect --unit={RELAY_UNIT} {relay} && "
            f"for i in $(seq 50); do ss -ltnH 'sport = :{RELAY_PORT}' | grep -q . && break; "
            "sleep 0.1; done",
        )
        lab.sudo(app_host, "nft -f -", stdin=redirect_rules(port))
        yield
    finally:
        lab.sudo(
            app_host,
            f"nft delete table ip {NFT_TABLE} 2>/dev/null; "
            f"systemctl stop {RELAY_UNIT} 2>/dev/null; rm -f {RELAY_FILE}; true",
        )
        left = lab.sudo(
            app_host,
            f"nft list tables; systemctl is-active {RELAY_UNIT}; ls {RELAY_FILE} 2>&1; true",
        )
        assert f"table ip {NFT_TABLE}" not in left and "\nactive" not in f"\n{left}", left


@contextmanager
def relay_in_front_of_edge(lab: Lab) -> Iterator[str]:
    """The buffering relay on this machine's loopback, in front of the edge's HTTPS; yields the
    URL a client would use through it."""
    public = hops.public_url(lab.inventory, lab.edge)
    host_port = public.split("/")[2]
    edge_address = host_port if ":" in host_port else f"{host_port}:443"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    relay = subprocess.Popen(
        [sys.executable, str(RELAY), f"127.0.0.1:{port}", edge_address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(50):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert relay.poll() is None, relay.stderr.read() if relay.stderr else ""
            time.sleep(0.1)
        yield f"https://127.0.0.1:{port}{hops.CHAT_PATH}"
    finally:
        relay.terminate()
        relay.wait(timeout=10)


def test_healthy_lab_no_hop_is_named(lab):
    report = assert_named(lab, lab.doctor(), None, None)

    assert [hop["name"] for hop in report["hops"]] == [
        "upstream",
        *(f"gateway:{host}" for host in lab.app_hosts),
        f"nginx:{lab.edge}",
        "public",
    ]
    for hop in report["hops"]:
        assert hop["tokens"] >= 20 and hop["reads"] >= 20, timelines(report)


def test_gzip_alone_at_the_edge_still_streams_compressed(lab):
    with edge_site_edited(lab, {UNCOMPRESSED: COMPRESSED}):
        report = assert_named(lab, lab.doctor(), None, None)

    by_name = {hop["name"]: hop for hop in report["hops"]}
    assert by_name[f"nginx:{lab.edge}"]["headers"].get("content-encoding") == "gzip"
    assert by_name["public"]["headers"].get("content-encoding") == "gzip"
    assert by_name[f"gateway:{lab.app_hosts[0]}"]["headers"].get("content-encoding") is None


def test_edge_buffering_with_the_header_ignored_is_named(lab):
    with edge_site_edited(lab, {UNBUFFERED: BUFFERED}):
        assert_named(lab, lab.doctor(), f"nginx:{lab.edge}", "nginx-buffering-body")


def test_edge_gzip_where_buffering_is_on_is_named(lab):
    with edge_site_edited(lab, {UNBUFFERED: BUFFERED, UNCOMPRESSED: COMPRESSED}):
        report = assert_named(lab, lab.doctor(), f"nginx:{lab.edge}", "nginx-proxy-buffering")

    edge = next(hop for hop in report["hops"] if hop["name"] == f"nginx:{lab.edge}")
    assert edge["headers"].get("content-encoding") == "gzip"


def test_buffering_layer_in_front_of_one_app_host_is_named(lab):
    last = lab.app_hosts[-1]
    with relay_in_front_of_gateway(lab, last):
        assert_named(lab, lab.doctor(), f"gateway:{last}", "whole-answer")


@pytest.fixture(scope="module")
def front_outcome(lab) -> tuple[int, dict]:
    """The doctor's exit code and report with the relay in front of the edge (--front)."""
    ca_file = lab.path.parent / hops.CA_FILE_NAME
    with relay_in_front_of_edge(lab) as front:
        code, report = lab.doctor("--front", front, "--cacert", str(ca_file))
    assert report["hops"][-1]["url"] == front
    return code, report


def test_buffering_proxy_in_front_of_the_edge_is_named(lab, front_outcome):
    report = assert_named(lab, front_outcome, "front", None)

    assert report["hops"][-1]["verdict"] == "buffered", timelines(report)


def test_buffering_proxy_in_front_of_the_edge_is_not_blamed_on_nginx(front_outcome):
    """nginx's Server header reaches the doctor through the relay, but nginx's own hop streamed:
    the header is no evidence against the relay (cli.judge_hop)."""
    _, report = front_outcome
    assert report["hops"][-1]["cause"] == "whole-answer", timelines(report)
