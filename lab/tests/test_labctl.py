"""labctl's pure parts: addressing, what destroy recognises as the lab's own, DNS, inventory.

No root needed: nothing here touches namespaces, processes or iptables.
"""

import importlib.util
import ipaddress
import sys
from pathlib import Path

import pytest
import yaml

LABCTL_PATH = Path(__file__).resolve().parent.parent / "labctl.py"
spec = importlib.util.spec_from_file_location("labctl", LABCTL_PATH)
labctl = importlib.util.module_from_spec(spec)
sys.modules["labctl"] = labctl  # dataclasses look their module up while the class is made
spec.loader.exec_module(labctl)

IFNAMSIZ_MAX = 15  # longest Linux interface name: veths carry the host's name


@pytest.mark.parametrize("llm", [None, "llamacpp"])
@pytest.mark.parametrize("topology", sorted(labctl.TOPOLOGIES))
def test_hosts_get_distinct_addresses_inside_the_lab_subnet(topology, llm):
    hosts = labctl.plan_hosts(topology, llm)
    addresses = [ipaddress.ip_address(host.address) for host in hosts]
    assert len(set(addresses)) == len(hosts)
    assert all(address in labctl.LAB_SUBNET for address in addresses)
    assert labctl.GATEWAY_ADDRESS not in addresses
    assert labctl.LAB_SUBNET.broadcast_address not in addresses


@pytest.mark.parametrize("topology", sorted(labctl.TOPOLOGIES))
def test_every_group_has_a_host_and_names_fit_interfaces(topology):
    hosts = labctl.plan_hosts(topology, "llamacpp")
    for group in labctl.INVENTORY_GROUPS:
        assert any(group in host.groups for host in hosts), group
    assert not any("llm" in host.groups for host in labctl.plan_hosts(topology))
    for name in [host.name for host in hosts] + [labctl.BRIDGE_NAME]:
        assert name.startswith(labctl.NAME_PREFIX)
        assert len(name) <= IFNAMSIZ_MAX


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["systemd-nspawn", "-D", "/x", "-b", "-M", "sglab-edge"], "sglab-edge"),
        (["/usr/bin/systemd-nspawn", "--machine=sglab-app1", "-b"], "sglab-app1"),
        (["systemd-nspawn", "--machine", "sglab-sim"], "sglab-sim"),
        (["systemd-nspawn", "-Msglab-app2"], "sglab-app2"),
        (["systemd-nspawn", "-M", "build-box"], "build-box"),
        # Negative controls: other programs with the same flags are never taken for the lab's.
        (["sleep", "-M", "sglab-edge"], None),
        (["python3", "labctl.py", "--machine=sglab-edge"], None),
        (["systemd-nspawn", "-D", "/x", "-b"], None),
        ([], None),
    ],
)
def test_nspawn_machine_name_only_from_nspawn_command_lines(argv, expected):
    assert labctl.nspawn_machine_name(argv) == expected


def test_only_rules_tagged_with_the_lab_comment_are_removed():
    tag = labctl.NAT_COMMENT
    listing = "\n".join(
        [
            "-P POSTROUTING ACCEPT",
            f"-A POSTROUTING -s 10.231.0.0/24 ! -d 10.231.0.0/24 -m comment --comment {tag} "
            "-j MASQUERADE",
            # Same subnet, no tag: someone else's rule, must stay.
            "-A POSTROUTING -s 10.231.0.0/24 -j MASQUERADE",
            # A tag that merely starts with ours is not ours.
            f'-A POSTROUTING -s 10.9.0.0/24 -m comment --comment "{tag}-other" -j MASQUERADE',
            "-A POSTROUTING -s 10.9.0.0/24 -m comment --comment other -j MASQUERADE "
            f"-m comment --comment x{tag}",
        ]
    )
    assert labctl.tagged_rules(listing) == [
        [
            "POSTROUTING",
            "-s",
            "10.231.0.0/24",
            "!",
            "-d",
            "10.231.0.0/24",
            "-m",
            "comment",
            "--comment",
            tag,
            "-j",
            "MASQUERADE",
        ],
    ]


def test_every_rule_the_lab_adds_carries_the_tag():
    for table, chain, *match in labctl.lab_rules():
        listing = f"-A {chain} {' '.join(match)}"
        assert labctl.tagged_rules(listing) == [[chain, *match]], (table, chain)


def test_forward_rules_let_nothing_open_a_connection_into_the_lab():
    """Only the lab's own hosts start forwarded connections; into the subnet, answers only.

    Negative control: the rule the lab used to add (`FORWARD -d <subnet> -j ACCEPT`) is caught.
    """

    def opens_into_the_lab(match: list[str]) -> bool:
        words = list(match)
        into = "-d" in words and words[words.index("-d") + 1] == str(labctl.LAB_SUBNET)
        answers_only = "--ctstate" in words and set(
            words[words.index("--ctstate") + 1].split(",")
        ) <= {"ESTABLISHED", "RELATED"}
        return words[-2:] == ["-j", "ACCEPT"] and into and not answers_only

    forward = [
        match
        for table, chain, *match in labctl.lab_rules()
        if (table, chain) == ("filter", "FORWARD")
    ]
    assert forward, "no FORWARD rules: hosts behind a FORWARD DROP policy could not reach apt"
    assert [match for match in forward if opens_into_the_lab(match)] == []
    for match in forward:  # each rule names the bridge: nothing else routed here is accepted
        assert labctl.BRIDGE_NAME in match, match
    old_rule = [
        "-d",
        str(labctl.LAB_SUBNET),
        "-m",
        "comment",
        "--comment",
        labctl.NAT_COMMENT,
        "-j",
        "ACCEPT",
    ]
    assert opens_into_the_lab(old_rule)


def test_lab_secrets_are_root_only_long_and_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(labctl, "CLIENT_KEY_FILE", tmp_path / "client-key")
    monkeypatch.setattr(labctl, "UPSTREAM_KEY_FILE", tmp_path / "upstream-key")
    labctl.write_lab_secrets()
    first = (tmp_path / "client-key").read_text().strip()
    for path in (tmp_path / "client-key", tmp_path / "upstream-key"):
        assert path.stat().st_mode & 0o777 == 0o600
    assert len(first) >= 32
    labctl.write_lab_secrets()
    assert (tmp_path / "client-key").read_text().strip() != first


@pytest.fixture
def resolv_files(tmp_path, monkeypatch):
    controller, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    monkeypatch.setattr(labctl, "CONTROLLER_RESOLV_CONF", controller)
    monkeypatch.setattr(labctl, "RESOLVED_UPSTREAM_CONF", upstream)
    return controller, upstream


def test_resolv_conf_copied_when_it_names_a_reachable_server(resolv_files):
    controller, upstream = resolv_files
    controller.write_text("search example\nnameserver 10.255.255.53\n")
    upstream.write_text("nameserver 192.0.2.53\n")
    assert labctl.controller_resolv_conf() == controller.read_text()


def test_resolv_conf_skips_a_loopback_stub_for_the_upstream_servers(resolv_files):
    controller, upstream = resolv_files
    controller.write_text("nameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("nameserver 192.0.2.53\n")
    assert labctl.controller_resolv_conf() == upstream.read_text()


def test_resolv_conf_without_any_usable_server_falls_back_to_the_copy(resolv_files, capsys):
    controller, _ = resolv_files
    controller.write_text("nameserver 127.0.0.53\n")
    assert labctl.controller_resolv_conf() == controller.read_text()
    assert "no non-loopback nameserver" in capsys.readouterr().err


@pytest.mark.parametrize("llm", [None, "llamacpp"])
@pytest.mark.parametrize("topology", sorted(labctl.TOPOLOGIES))
def test_inventory_groups_and_connection_settings(topology, llm, tmp_path, monkeypatch):
    inventory = tmp_path / "hosts.yml"
    monkeypatch.setattr(labctl, "INVENTORY_FILE", inventory)
    hosts = labctl.plan_hosts(topology, llm)
    upstream = "llm" if llm else "simulator"
    labctl.write_inventory(hosts, topology, "bookworm", tmp_path / "sglab-ssh-0", upstream)
    parsed = yaml.safe_load(inventory.read_text())["all"]
    assert bool(parsed["children"]["llm"]["hosts"]) == bool(llm)
    for app_vars in parsed["children"]["app"]["hosts"].values():
        upstream_vars = {name: value for name, value in app_vars.items() if "upstream" in name}
        if llm:  # the app hosts stream from the llm host, and the checks judge without the text
            assert upstream_vars == {
                "streamgate_upstream_base_url": "{{ __streamgate_llm_url }}",
                "streamgate_upstream_kind": "openai-compatible",
            }
        else:
            assert upstream_vars == {}
    assert parsed["vars"]["lab_topology"] == topology
    assert parsed["vars"]["ansible_user"] == labctl.LAB_USER
    assert parsed["vars"]["ansible_python_interpreter"] == "/usr/bin/python3"
    assert Path(parsed["vars"]["ansible_ssh_private_key_file"]).is_absolute()
    ssh_args = parsed["vars"]["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=no" in ssh_args and "UserKnownHostsFile=/dev/null" in ssh_args
    assert parsed["vars"]["ansible_control_path_dir"] == str(tmp_path / "sglab-ssh-0")
    for group in labctl.INVENTORY_GROUPS:
        members = parsed["children"][group]["hosts"] or {}
        expected = {host.name: host.address for host in hosts if group in host.groups}
        assert {name: values["ansible_host"] for name, values in members.items()} == expected
