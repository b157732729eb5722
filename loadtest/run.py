#!/usr/bin/env python3
"""Headless load test of a streamgate deployment: Locust, SLO gates, CSV + HTML + PNG report.

    loadtest/run.py --inventory ansible/inventories/lab/hosts.yml      # nginx on the lab's edge
    loadtest/run.py --target http://127.0.0.1:8080 --users 50 --run-time 20s
    loadtest/run.py --target http://127.0.0.1:8100 --routes openai    # the simulator alone

With --inventory, what the app hosts stream from (the simulator, or another OpenAI-compatible
server) is read from it too (support/upstream.py), and decides whether the text is compared;
with --target alone, the simulator is assumed unless --upstream-kind says otherwise.

Options not listed here go to Locust unchanged (e.g. --slo-itl-p99-ms 150, --model ...).
The exit code is Locust's, which the gates in locustfile.py set: 0 only if every gate passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "tests"))
from support.upstream import deployment_upstream_kind, inventory_listing  # noqa: E402

# Streams one generator process measures without distorting them (20 ms gaps; see README).
USERS_PER_PROCESS = 100
ROUTE_USERS = {"text": "TextStreamUser", "sse": "SSEStreamUser", "openai": "OpenAIStreamUser"}
# Written next to the inventory: the CA that signed the edge's certificate (by the play, when
# it made one) and the client key (by the lab).
CA_FILE_NAME = "ca.pem"
CLIENT_KEY_FILE_NAME = "client-key"


def find_group(node: dict, group: str) -> dict | None:
    """The inventory group `group`, searched through nested `children`."""
    for name, value in (node or {}).items():
        if not isinstance(value, dict):
            continue
        if name == group:
            return value
        found = find_group(value.get("children") or {}, group)
        if found is not None:
            return found
    return None


def edge_url(inventory: Path) -> str:
    """https://<ansible_host of the first host of group edge>/ when the inventory has a CA
    file next to it (the play's own CA: nginx serves TLS), else http://..."""
    if not inventory.is_file():
        raise SystemExit(f"no inventory at {inventory}: create the lab (make lab) or give a target")
    data = yaml.safe_load(inventory.read_text(encoding="utf-8"))
    edge = find_group(data, "edge")
    if not edge or not edge.get("hosts"):
        raise SystemExit(f"no hosts in group 'edge' of {inventory}: give --target")
    name, host_vars = next(iter(edge["hosts"].items()))
    scheme = "https" if (inventory.parent / CA_FILE_NAME).is_file() else "http"
    return f"{scheme}://{(host_vars or {}).get('ansible_host', name)}/"


def inventory_file(inventory: Path | None, name: str) -> Path | None:
    """A file the play or the lab wrote next to the inventory (CA, client key), if present."""
    path = inventory.parent / name if inventory else None
    return path if path and path.is_file() else None


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--inventory", type=Path, help="Ansible inventory: target its edge host")
    parser.add_argument("--target", help="base URL (wins over --inventory)")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--spawn-rate", type=float, default=50.0, help="users started per second")
    parser.add_argument("--run-time", default="60s")
    parser.add_argument(
        "--routes", default="text,sse,openai", help=f"comma-separated, of {','.join(ROUTE_USERS)}"
    )
    parser.add_argument(
        "--processes",
        default="auto",
        help="Locust worker processes on this host: a number (0: one process, "
        f"no master) or auto (one per {USERS_PER_PROCESS} users, at most "
        "one per CPU)",
    )
    parser.add_argument("--reports-dir", type=Path, default=HERE / "reports")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the client key to send (default: client-key next to "
        "the inventory; STREAMGATE_LOAD_API_KEY also works)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="CA file to verify HTTPS with (default: ca.pem next to the inventory, "
        "else the system store)",
    )
    return parser.parse_known_args(argv)


def worker_processes(setting: str, users: int) -> int:
    """0 for a single Locust process, else how many workers to fork."""
    if setting != "auto":
        return int(setting)
    wanted = -(-users // USERS_PER_PROCESS)
    return 0 if wanted <= 1 else min(wanted, os.cpu_count() or 1)


def locust_command(
    args: argparse.Namespace, target: str, report: Path, extra: list[str]
) -> list[str]:
    users = [ROUTE_USERS[route.strip()] for route in args.routes.split(",") if route.strip()]
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--config",
        str(HERE / "locust.conf"),
        "--headless",
        "--host",
        target.rstrip("/"),
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--csv",
        str(report / "stats"),
        "--csv-full-history",
        "--html",
        str(report / "report.html"),
        "--gates-json",
        str(report / "gates.json"),
        "--logfile",
        str(report / "locust.log"),
    ]
    processes = worker_processes(args.processes, args.users)
    if processes:
        command += ["--processes", str(processes)]
    return [*command, *extra, *users]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if args.target:
        target = args.target
    elif args.inventory:
        target = edge_url(args.inventory)
    else:
        raise SystemExit("give --target URL or --inventory PATH")
    report = args.reports_dir / time.strftime("%Y%m%d-%H%M%S")
    report.mkdir(parents=True, exist_ok=True)
    ca_file = args.ca_file or inventory_file(args.inventory, CA_FILE_NAME)
    key_file = args.api_key_file or inventory_file(args.inventory, CLIENT_KEY_FILE_NAME)
    env = dict(os.environ)
    if key_file:  # through the environment: a key on the command line shows in `ps`
        env["STREAMGATE_LOAD_API_KEY"] = key_file.read_text(encoding="utf-8").strip()
    if ca_file:
        extra = ["--ca-file", str(ca_file), *extra]
    if args.inventory and not any(option.startswith("--upstream-kind") for option in extra):
        ansible_inventory = str(Path(sys.executable).with_name("ansible-inventory"))
        extra = [
            "--upstream-kind",
            deployment_upstream_kind(inventory_listing(args.inventory, ansible_inventory)),
            *extra,
        ]
    command = locust_command(args, target, report, extra)
    kind = (
        extra[extra.index("--upstream-kind") + 1] if "--upstream-kind" in extra else "as configured"
    )
    print(
        f"load test: {args.users} users for {args.run_time} against {target} (upstream: {kind})"
        f"{' with a client key' if env.get('STREAMGATE_LOAD_API_KEY') else ''}"
        f"{f', CA {ca_file}' if ca_file else ''}",
        flush=True,
    )
    exit_code = subprocess.run(command, check=False, env=env).returncode

    # Plot only after Locust has exited: matplotlib stays out of the generator's process.
    from reportplot import plot_history

    history = report / "stats_stats_history.csv"
    try:
        plot_history(history, report / "latency.png")
    except (OSError, ValueError) as error:  # a run that died early has no history: say so
        print(f"no plot: {error}")
    print(f"reports in {report}: report.html, stats_*.csv, latency.png, gates.json, locust.log")
    print(f"load test {'PASSED' if exit_code == 0 else f'FAILED (exit code {exit_code})'}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
