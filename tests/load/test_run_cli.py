"""run.py without running Locust: the lab target from the inventory, the command it builds."""

from __future__ import annotations

import pytest
import run

LAB_INVENTORY = """\
all:
  vars:
    ansible_user: lab
  children:
    edge:
      hosts:
        sglab-edge:
          ansible_host: 10.231.0.10
        sglab-edge2:
          ansible_host: 10.231.0.11
    app:
      hosts:
        sglab-app1:
          ansible_host: 10.231.0.20
"""


def test_default_target_is_the_first_edge_host(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(LAB_INVENTORY)
    assert run.edge_url(inventory) == "http://10.231.0.10/"


def test_inventory_without_edge_hosts_is_refused(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  children:\n    app:\n      hosts: {a: {ansible_host: 1.2.3.4}}\n")
    with pytest.raises(SystemExit, match="edge"):
        run.edge_url(inventory)


def test_command_carries_reports_routes_and_unknown_options_to_locust(tmp_path):
    args, extra = run.parse_args(
        [
            "--target",
            "http://x",
            "--routes",
            "sse,openai",
            "--processes",
            "2",
            "--slo-itl-p99-ms",
            "150",
        ]
    )
    command = run.locust_command(args, "http://x/", tmp_path, extra)
    assert command[-2:] == ["SSEStreamUser", "OpenAIStreamUser"]
    assert ["--slo-itl-p99-ms", "150"] == command[command.index("--slo-itl-p99-ms") :][:2]
    assert ["--processes", "2"] == command[command.index("--processes") :][:2]
    assert str(tmp_path / "report.html") in command and "--csv-full-history" in command
    assert args.users == 200 and args.run_time == "60s"  # make loadtest's defaults


@pytest.mark.parametrize(
    ("setting", "users", "expected"),
    [("auto", 50, 0), ("auto", 100, 0), ("auto", 101, 2), ("0", 500, 0), ("3", 10, 3)],
)
def test_worker_processes(setting, users, expected, monkeypatch):
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    assert run.worker_processes(setting, users) == expected


def test_auto_processes_never_exceed_the_cpus(monkeypatch):
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    assert run.worker_processes("auto", 1000) == 2


def test_target_is_https_when_the_play_left_its_ca_next_to_the_inventory(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(LAB_INVENTORY)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert run.edge_url(inventory) == "https://10.231.0.10/"


# Not 0: a run.py that always exited 0 must not pass.
LOCUST_EXIT = 3


def locust_call(tmp_path, monkeypatch, inventory_text: str) -> dict:
    """What run.py hands Locust (command, env) for `--inventory` with this text; Locust is not
    run (ansible-inventory is: the upstream's kind is read through it)."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(inventory_text)
    seen = {}
    real_run = run.subprocess.run

    def fake_run(command, **kwargs):
        if "locust" not in command:
            return real_run(command, **kwargs)
        seen.update(command=command, env=kwargs["env"])
        return type("Done", (), {"returncode": LOCUST_EXIT})()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    monkeypatch.setattr(run, "time", type("T", (), {"strftime": staticmethod(lambda _: "r")}))
    exit_code = run.main(
        ["--inventory", str(inventory), "--reports-dir", str(tmp_path / "reports")]
    )
    assert exit_code == LOCUST_EXIT  # Locust's verdict is run.py's exit code
    return seen


SIMULATOR_GROUP = """\
    simulator:
      hosts:
        sglab-sim:
          ansible_host: 10.231.0.30
"""
APP_HOST_ON_LLAMA = """\
          streamgate_upstream_base_url: http://10.231.0.1:8080/v1
          streamgate_upstream_kind: openai-compatible
"""


@pytest.mark.parametrize(
    ("inventory_text", "kind"),
    [
        (LAB_INVENTORY + SIMULATOR_GROUP, "simulator"),  # the role's default upstream
        (LAB_INVENTORY, "openai-compatible"),  # no simulator: OpenAI
        (LAB_INVENTORY + APP_HOST_ON_LLAMA + SIMULATOR_GROUP, "openai-compatible"),
    ],
    ids=["simulator-by-default", "no-simulator", "kind-set"],
)
def test_upstream_kind_comes_from_the_inventory(tmp_path, monkeypatch, inventory_text, kind):
    command = locust_call(tmp_path, monkeypatch, inventory_text)["command"]
    assert command[command.index("--upstream-kind") + 1] == kind


def test_client_key_goes_to_locust_through_the_environment_only(tmp_path, monkeypatch):
    """The key file next to the inventory reaches Locust as STREAMGATE_LOAD_API_KEY, never argv."""
    (tmp_path / "client-key").write_text("a-lab-client-key-of-more-than-32-chars\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    seen = locust_call(tmp_path, monkeypatch, LAB_INVENTORY)
    assert seen["env"]["STREAMGATE_LOAD_API_KEY"] == "a-lab-client-key-of-more-than-32-chars"
    assert not any("a-lab-client-key" in part for part in seen["command"])
    assert ["--ca-file", str(tmp_path / "ca.pem")] == seen["command"][
        seen["command"].index("--ca-file") :
    ][:2]
    assert "--host" in seen["command"] and "https://10.231.0.10" in seen["command"]
