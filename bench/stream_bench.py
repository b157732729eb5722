"""Streaming benchmark: the simulator alone, the gateway direct, the gateway behind nginx and the
seed article's design, side by side in one run on loopback (what `make bench` runs).

    .venv/bin/python bench/stream_bench.py [--quick] [--levels 10,200] [--targets sim,nginx]

`nginx-tls` is the same nginx with nginx_tls on (HTTPS, a certificate from a test CA made for the
run; the load generator speaks HTTP/1.1 over TLS to it) in front of the same gateway: the run ends
with the nginx CPU per chunk TLS adds (nginx-tls minus nginx, same run, same level).
When the gateway has client keys (STREAMGATE_CLIENT_KEY_HASHES), every gateway is started with
one key and the load generator sends it to the gateway targets, so keys are on in their rows.

The gateway's upstream HTTP client (STREAMGATE_UPSTREAM_TRANSPORT) is the lean transport in the
`gateway`/`nginx` targets; `gateway-sdk`/`nginx-sdk` and `gateway-aiohttp`/`nginx-aiohttp` run
one more gunicorn each with the SDK's httpx2 client and its aiohttp client, and the run ends
with their CPU per chunk as multiples of the lean one's (what `make bench-transports` runs).

Closed loop: at each level N, N virtual clients each stream one answer after another (50 tokens,
20 ms apart, 50 ms to the first) for --duration seconds after a warm-up. Every figure that the
shared, noisy machine moves is also given as a ratio to the simulator alone at the same level,
measured minutes apart in the same run. Prints a Markdown table, writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Outcome, Schedule, collect_outcome, start_process
from profile_summary import report as profile_report
from stack import (
    REPO,
    VENV_BIN,
    Service,
    busy_cpu_seconds,
    cpu_seconds,
    free_port,
    http_json,
    render_nginx,
    scheduled_runs,
    tcp_connections,
)

TOKENS = 50
TTFT_MS = 50
GAP_MS = 20
STAGGER_S = 1.0  # one stream's length: spreads the clients' phases
STREAM_TIMEOUT_S = 30.0
SETTLE_S = 1.0
PROFILE_RATE_HZ = 250
PROFILER_EXIT_S = 15.0
RESULTS_DIR = REPO / "bench" / "results"
PROMPT_BODY = json.dumps({"prompt": "Tell me about streaming.", "max_tokens": TOKENS}).encode()
SIM_BODY = json.dumps(
    {
        "model": "sim",
        "messages": [{"role": "user", "content": "Tell me about streaming."}],
        "stream": True,
        "max_tokens": TOKENS,
    }
).encode()

# Issue 2 targets (2-core machine, load generator included).
TARGET_CPU_US_PER_CHUNK = 40.0
TARGET_LEVEL = 500
TARGET_THROUGHPUT_RATIO = 0.90
TARGET_GAP_P99_MS = 40.0
TARGET_TTFT_P99_MS = 150.0
TARGET_ADDED_TTFT_P50_MS = 2.0
TARGET_ADDED_TTFT_LEVEL = 10
NOISY_OTHERS_CORES = 0.5
# The one client key of the gateway targets (keys on), when the gateway has client keys.
BENCH_CLIENT_KEY = "sk-bench-client-not-secret"
BENCH_CLIENT_KEY_SHA256 = hashlib.sha256(BENCH_CLIENT_KEY.encode()).hexdigest()


@dataclass
class Target:
    """One way of reaching the simulator's tokens, and which process trees it costs."""

    name: str
    title: str
    service: str  # the service the client talks to
    path: str
    sse: bool
    relay: str | None  # the relaying process tree whose CPU per chunk is the headline
    also_costs: tuple[str, ...] = ()


# One gunicorn per upstream HTTP client measured (STREAMGATE_UPSTREAM_TRANSPORT), by service.
GATEWAY_TRANSPORTS = {
    "gateway": "lean",
    "gateway-plain": "lean",
    "gateway-sdk": "sdk",
    "gateway-aiohttp": "aiohttp",
}
# Gateways that run another app than the product's: gateway-plain sends every chunk from its
# relay task, no callback send (bench/plain_send_app.py), to measure what that path saves.
GATEWAY_APPS = {"gateway-plain": "bench.plain_send_app:create_app()"}
# The gateway each nginx proxies to.
NGINX_UPSTREAMS = {
    "nginx": "gateway",
    "nginx-plain": "gateway-plain",
    "nginx-tls": "gateway",
    "nginx-buffered": "gateway",
    "nginx-sdk": "gateway-sdk",
    "nginx-aiohttp": "gateway-aiohttp",
}
COMPARED_TRANSPORTS = ("sdk", "aiohttp")  # each as a multiple of "lean"

TARGETS = {
    "sim": Target("sim", "(a) simulator alone", "sim", "/v1/chat/completions", True, None),
    "gateway": Target(
        "gateway", "(b) gateway direct", "gateway", "/v1/chat/stream", False, "gateway"
    ),
    "nginx": Target(
        "nginx", "(c) nginx -> gateway", "nginx", "/v1/chat/stream", False, "gateway", ("nginx",)
    ),
    # The gateway with every chunk sent by its relay task (a plain `await send`).
    "gateway-plain": Target(
        "gateway-plain",
        "(b) gateway direct [plain send]",
        "gateway-plain",
        "/v1/chat/stream",
        False,
        "gateway-plain",
    ),
    "nginx-plain": Target(
        "nginx-plain",
        "(c) nginx -> gateway [plain send]",
        "nginx-plain",
        "/v1/chat/stream",
        False,
        "gateway-plain",
        ("nginx-plain",),
    ),
    # The same gateway behind the HTTPS edge (nginx_tls on; HTTP/1.1 over TLS from the client).
    "nginx-tls": Target(
        "nginx-tls",
        "(c) nginx TLS -> gateway",
        "nginx-tls",
        "/v1/chat/stream",
        False,
        "gateway",
        ("nginx-tls",),
    ),
    # The same gateway with the SDK's own HTTP clients instead of the lean transport.
    **{
        f"{path}-{transport}": Target(
            f"{path}-{transport}",
            f"({letter}) {title} [{transport}]",
            f"{path}-{transport}",
            "/v1/chat/stream",
            False,
            f"gateway-{transport}",
            () if path == "gateway" else (f"nginx-{transport}",),
        )
        for transport in COMPARED_TRANSPORTS
        for path, letter, title in (
            ("gateway", "b", "gateway direct"),
            ("nginx", "c", "nginx -> gateway"),
        )
    },
    # Negative control, not run by default: the wire tests' broken nginx (buffering on, the
    # app's X-Accel-Buffering ignored, gzip on): reads per response must collapse.
    "nginx-buffered": Target(
        "nginx-buffered",
        "(c-) control: nginx buffering+gzip",
        "nginx-buffered",
        "/v1/chat/stream",
        False,
        "gateway",
        ("nginx-buffered",),
    ),
    "article": Target(
        "article", "(d) article design", "article", "/v1/chat/stream", False, "article"
    ),
}


def expected_text() -> bytes | None:
    """The simulator's deterministic answer, to count lost/doubled/reordered tokens as errors."""
    try:
        from streamgate.simulator.script import expected_tokens
    except ImportError:
        return None
    return "".join(expected_tokens(TOKENS)).encode()


def needed_services(targets: list[str]) -> list[str]:
    """The services the chosen targets reach or cost (always the simulator), in start order:
    simulator, gateways, the nginx in front of them, the article's app."""
    wanted = {"sim"}
    for name in targets:
        target = TARGETS[name]
        wanted.update(n for n in (target.service, target.relay, *target.also_costs) if n)
    wanted.update(NGINX_UPSTREAMS[name] for name in list(wanted) if name in NGINX_UPSTREAMS)
    order = ["sim", *GATEWAY_TRANSPORTS, *NGINX_UPSTREAMS, "article"]
    return [name for name in order if name in wanted]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--levels", default="10,200,500,1000", help="concurrent streams, comma list"
    )
    parser.add_argument(
        "--targets",
        default="sim,gateway,nginx,article",
        help=f"comma list of {', '.join(TARGETS)} (nginx-buffered: the negative control)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="load-generator processes (0: 1 below 200 streams, else 2)",
    )
    parser.add_argument("--gateway-workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument(
        "--nginx-workers", help="nginx worker_processes (default: the role's default, auto)"
    )
    parser.add_argument(
        "--no-content-check",
        action="store_true",
        help="do not compare answers with the simulator's script (another simulator)",
    )
    parser.add_argument(
        "--profile-with",
        metavar="PY_SPY",
        help="py-spy binary: after the run, measure --profile-target at --profile-level once "
        "more with py-spy recording each relay worker (collapsed stacks in the run dir)",
    )
    parser.add_argument(
        "--profile-target", default="nginx", choices=["gateway", "nginx", "article"]
    )
    parser.add_argument("--profile-level", type=int, default=500)
    parser.add_argument(
        "--no-client-key",
        dest="client_key",
        action="store_false",
        help="start the gateways without a client key and send none (keys off)",
    )
    parser.add_argument("--quick", action="store_true", help="levels 10,200, 4 s each")
    parser.add_argument(
        "--simulator", default=str(VENV_BIN / "streamgate-sim"), help="simulator command"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.duration, args.warmup = "10,200", 4.0, 2.0
    args.levels = [int(level) for level in args.levels.split(",")]
    args.targets = [name.strip() for name in args.targets.split(",")]
    args.tls_cafile = None
    if args.client_key and not gateway_has_client_keys():
        print("note: this gateway has no client keys (STREAMGATE_CLIENT_KEY_HASHES): keys off")
        args.client_key = False
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {sorted(TARGETS)}")
    if "sim" not in args.targets:
        args.targets.insert(0, "sim")  # every ratio is against it
    if shutil.which("nginx") is None and set(NGINX_UPSTREAMS) & set(args.targets):
        print("note: no nginx binary (Debian: apt-get install nginx-light): nginx rows skipped")
        args.targets = [name for name in args.targets if not name.startswith("nginx")]
    if "gateway-aiohttp" in needed_services(args.targets) and (
        importlib.util.find_spec("aiohttp") is None
    ):
        parser.error(
            "the aiohttp targets need the SDK's aiohttp client: make venv, or "
            "pip install -e 'service[aiohttp]'"
        )
    return args


def gateway_has_client_keys() -> bool:
    try:
        from streamgate.settings import Settings
    except ImportError:
        return False
    return "client_key_hashes" in Settings.model_fields


def build_services(
    args: argparse.Namespace,
    run_dir: Path,
    pace: tuple[float, float, int] = (TTFT_MS, GAP_MS, TOKENS),
) -> dict[str, Service]:
    """Only the services the chosen targets need (see needed_services), not started yet.
    `pace`: the simulator's first-token delay and gap (ms) and tokens per answer."""
    needed = needed_services(args.targets)
    ttft_ms, gap_ms, tokens = pace
    sim_port = free_port()
    upstream = f"http://127.0.0.1:{sim_port}/v1"
    services = {
        "sim": Service(
            "sim",
            sim_port,
            [
                *args.simulator.split(),
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--ttft-ms",
                str(ttft_ms),
                "--gap-ms",
                str(gap_ms),
                "--tokens",
                str(tokens),
            ],
            log_dir=run_dir,
        )
    }
    for name, transport in GATEWAY_TRANSPORTS.items():
        if name in needed:
            services[name] = gateway_service(
                name,
                upstream,
                run_dir,
                workers=args.gateway_workers,
                client_key=args.client_key,
                transport=transport,
                app=GATEWAY_APPS.get(name, PRODUCT_APP),
            )
    for name, gateway in NGINX_UPSTREAMS.items():
        if name not in needed:
            continue
        pki = run_pki(run_dir) if name == "nginx-tls" else None
        if pki is not None:
            args.tls_cafile = str(pki.ca_certificate)
        services[name] = nginx_service(
            name,
            services[gateway],
            run_dir,
            workers=args.nginx_workers,
            buffering_fault=name == "nginx-buffered",
            pki=pki,
        )
    if "article" in needed:
        port = free_port()
        services["article"] = Service(
            "article",
            port,
            [
                str(VENV_BIN / "gunicorn"),
                "bench.article_app:app",
                "-w",
                "2",
                "-k",
                "uvicorn_worker.UvicornWorker",
                "-b",
                f"127.0.0.1:{port}",
            ],
            env={"OPENAI_BASE_URL": upstream, "OPENAI_API_KEY": "sk-bench-not-secret"},
            ready_path="/openapi.json",
            log_dir=run_dir,
        )
    return services


PRODUCT_APP = "streamgate.app:create_app()"


def gateway_service(
    name: str,
    upstream: str,
    run_dir: Path,
    *,
    workers: int,
    client_key: bool,
    transport: str = "lean",
    app: str = PRODUCT_APP,
) -> Service:
    """The gateway as deployed (gunicorn with the repo's config, uvicorn workers) on a free
    port, streaming from `upstream` (an OpenAI-compatible base URL), not started yet. With
    `client_key`, it asks for the benchmark's one client key."""
    port = free_port()
    key_env = (
        {"STREAMGATE_CLIENT_KEY_HASHES": f"bench:{BENCH_CLIENT_KEY_SHA256}"} if client_key else {}
    )
    return Service(
        name,
        port,
        [str(VENV_BIN / "gunicorn"), "-c", "python:streamgate.gunicorn_conf", app],
        env={
            "STREAMGATE_BIND": f"127.0.0.1:{port}",
            "STREAMGATE_WORKERS": str(workers),
            "STREAMGATE_UPSTREAM_BASE_URL": upstream,
            "STREAMGATE_UPSTREAM_API_KEY": "sk-bench-not-secret",
            # Explicit, so a proxy variable in the environment cannot turn "auto" into sdk
            # and mislabel the rows; every other setting is the product's default.
            "STREAMGATE_UPSTREAM_TRANSPORT": transport,
            **key_env,
        },
        ready_path="/readyz",
        log_dir=run_dir,
    )


def nginx_service(
    name: str,
    gateway: Service,
    run_dir: Path,
    *,
    workers: str | None = None,
    buffering_fault: bool = False,
    pki=None,
) -> Service:
    """nginx rendered from the templates (stack.render_nginx) in front of `gateway`, on a free
    port, not started yet; with `pki`, the HTTPS edge (its clients use the TLS port)."""
    port = free_port()
    tls_port = free_port() if pki is not None else None
    conf = render_nginx(
        run_dir,
        port,
        gateway.port,
        buffering_fault=buffering_fault,
        worker_processes=workers,
        name=name,
        tls_port=tls_port,
        pki=pki,
    )
    return Service(
        name,
        tls_port or port,
        ["nginx", "-c", str(conf), "-p", str(conf.parent), "-g", "daemon off;"],
        ready_path="/healthz",
        ready_port=port,  # plain HTTP answers /healthz in both modes
        log_dir=run_dir,
    )


def run_pki(run_dir: Path):
    """The run's test CA and server certificate (tests/support/tls.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.tls import make_test_pki

    return make_test_pki(run_dir / "pki")


def start_profilers(
    args: argparse.Namespace, relay: Service, profile_dir: Path
) -> list[subprocess.Popen]:
    """py-spy on every worker of the relay (not the idle master) for the measured window.
    Non-blocking sampling so the workers are not paused; idle (waiting) stacks are left out,
    so the samples follow CPU time."""
    workers = [pid for pid in relay.refresh_pids() if pid != relay.pids[0]]
    return [
        subprocess.Popen(
            [
                args.profile_with,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(PROFILE_RATE_HZ),
                "--duration",
                str(int(args.duration)),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(profile_dir / f"{relay.name}-worker-{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in workers
    ]


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def measure(
    target: Target,
    level: int,
    args: argparse.Namespace,
    services: dict[str, Service],
    expected: bytes | None,
    profile_dir: Path | None = None,
) -> dict:
    """One closed-loop measurement of one target at one level (optionally under py-spy)."""
    procs = args.client_procs or (1 if level < 200 else 2)
    procs = min(procs, level)
    schedule = Schedule.from_now(
        warmup_s=args.warmup,
        duration_s=args.duration,
        stagger_s=STAGGER_S,
        stream_timeout_s=STREAM_TIMEOUT_S,
    )
    service = services[target.service]
    key = BENCH_CLIENT_KEY if args.client_key and target.relay in GATEWAY_TRANSPORTS else None
    cafile = args.tls_cafile if target.service == "nginx-tls" else None
    body = SIM_BODY if target.sse else PROMPT_BODY
    check = None if target.sse else expected
    workers = []
    first = 0
    for proc_index in range(procs):
        count = level // procs + (1 if proc_index < level % procs else 0)
        workers.append(
            start_process(
                "127.0.0.1",
                service.port,
                target.path,
                body,
                target.sse,
                check,
                first,
                count,
                level,
                schedule,
                key,
                cafile,
            )
        )
        first += count
    costed = [name for name in ("sim", target.relay, *target.also_costs) if name]
    sleep_until(schedule.warm)
    cpu_before = {name: services[name].cpu_by_pid() for name in costed}
    wait_before = {name: services[name].runqueue_wait() for name in costed}
    runs_before = {name: services[name].scheduled_runs() for name in costed}
    client_runs_before = sum(scheduled_runs(process.pid) for process, _ in workers)
    busy_before = busy_cpu_seconds()
    clients_before = sum(cpu_seconds(process.pid) for process, _ in workers)
    sim_conns_before = tcp_connections(services["sim"].port)
    http_json(services["sim"].port, "/stats/reset", method="POST")  # its clock's lag, from here
    profilers = start_profilers(args, services[target.relay], profile_dir) if profile_dir else []
    sleep_until(schedule.end)
    cpu_after = {name: services[name].cpu_by_pid() for name in costed}
    wait = {name: services[name].runqueue_wait() - wait_before[name] for name in costed}
    runs = {name: services[name].scheduled_runs() - runs_before[name] for name in costed}
    runs["client"] = sum(scheduled_runs(process.pid) for process, _ in workers) - client_runs_before
    busy = busy_cpu_seconds() - busy_before
    clients_cpu = sum(cpu_seconds(process.pid) for process, _ in workers) - clients_before
    sim_conns_after = tcp_connections(services["sim"].port)
    sim_stats = http_json(services["sim"].port, "/stats") or {}
    for profiler in profilers:
        try:
            profiler.wait(PROFILER_EXIT_S)
        except subprocess.TimeoutExpired:
            profiler.kill()  # by PID: the py-spy we started
            profiler.wait(PROFILER_EXIT_S)
    outcome = collect_outcome(workers, schedule.results_due)
    window = schedule.end - schedule.warm
    chunks = outcome.completed * TOKENS
    # Per process, to show whether one worker ran hot while the other idled.
    cpu_by_pid = {
        name: {
            pid: after - cpu_before[name].get(pid, 0.0) for pid, after in cpu_after[name].items()
        }
        for name in costed
    }
    row = summarize(target, level, procs, window, outcome, chunks, cpu_by_pid)
    ours = sum(sum(per_pid.values()) for per_pid in cpu_by_pid.values()) + clients_cpu
    # The machine is shared: how much CPU others used, and how long ours waited for a core.
    row["other_processes_cores"] = round(max(0.0, busy - ours) / window, 2)
    row["runqueue_wait_s"] = {name: round(seconds, 2) for name, seconds in wait.items()}
    # Where a response lost reads (two tokens in one): merged by a hop before the load generator
    # (fewer body chunks than tokens: each hop writes what one read of its upstream brought),
    # or read late by the load generator itself (more chunks than reads). The simulator's token
    # clock running a gap late would send two tokens back to back; its lag and the load
    # generator's own say whether the harness, rather than the relay, had the stall.
    body_chunks = np.asarray(outcome.chunks)
    reads = np.asarray(outcome.arrivals)
    counted = len(body_chunks) > 0 and len(body_chunks) == len(reads)
    row["reads_lost"] = {
        "merged_before_client": int((body_chunks < TOKENS).sum()) if counted else None,
        "read_late_by_client": int((reads < body_chunks).sum()) if counted else None,
    }
    sim_lag_ms = sim_stats.get("clock_lag_ms", {}).get("max")
    row["harness_lag_max_ms"] = {
        "sim": None if sim_lag_ms is None else round(sim_lag_ms, 1),
        "client": round(outcome.loop_lag_max_s * 1000, 1),
    }
    # Times each process tree was put on a CPU (about its wake-ups), per relayed chunk: fewer
    # means more chunks handled per wake-up.
    row["cpu_runs_per_chunk"] = {
        name: round(count / chunks, 3) if chunks else None for name, count in runs.items()
    }
    # Connections into the simulator (from the relay, or the load generator for `sim`): open at
    # the end of the window, and closed during it (new TIME_WAIT pairs): a pool that keeps too
    # few idle connections opens a new one for many streams.
    closed = len(sim_conns_after["time_wait"] - sim_conns_before["time_wait"])
    row["upstream_connections"] = {
        "open_at_end": len(sim_conns_after["established"]),
        "closed_in_window": closed,
        "closed_per_stream": round(closed / outcome.completed, 2) if outcome.completed else None,
    }
    return row


def percentile_ms(values, q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)) * 1000, 2) if len(values) else None


def summarize(
    target: Target,
    level: int,
    procs: int,
    window: float,
    outcome: Outcome,
    chunks: int,
    cpu_by_pid: dict[str, dict[int, float]],
) -> dict:
    arrivals = np.asarray(outcome.arrivals)
    cpu = {name: sum(per_pid.values()) for name, per_pid in cpu_by_pid.items()}
    return {
        "target": target.name,
        "level": level,
        "window_s": round(window, 2),
        "completed": outcome.completed,
        "streams_per_s": round(outcome.completed / window, 1),
        "ttft_p50_ms": percentile_ms(outcome.ttft_s, 50),
        "ttft_p99_ms": percentile_ms(outcome.ttft_s, 99),
        "gap_p50_ms": percentile_ms(outcome.gaps_s, 50),
        "gap_p99_ms": percentile_ms(outcome.gaps_s, 99),
        "reads_mean": round(float(arrivals.mean()), 1) if len(arrivals) else None,
        "reads_min": int(arrivals.min()) if len(arrivals) else None,
        "errors": dict(sorted(outcome.errors.items())),
        "error_count": sum(outcome.errors.values()),
        "chunks": chunks,
        "cpu_s": {name: round(seconds, 2) for name, seconds in cpu.items()},
        "cpu_s_by_process": {
            name: [round(seconds, 2) for seconds in per_pid.values()]
            for name, per_pid in cpu_by_pid.items()
        },
        "cpu_us_per_chunk": {
            name: round(seconds / chunks * 1e6, 1) if chunks else None
            for name, seconds in cpu.items()
        },
        "client_procs": procs,
        "client_cpu_cores": round(outcome.cpu_s / window, 2),
        "client_saturated": outcome.cpu_s / window / procs > 0.9,
    }


def add_ratios(rows: list[dict]) -> None:
    """Compare every row with the simulator alone at the same level (the noise-robust view)."""
    baseline = {row["level"]: row for row in rows if row["target"] == "sim"}
    for row in rows:
        sim = baseline.get(row["level"])
        if sim is None:
            continue
        row["throughput_vs_sim"] = (
            round(row["streams_per_s"] / sim["streams_per_s"], 3) if sim["streams_per_s"] else None
        )
        for q in ("p50", "p99"):
            ours, theirs = row[f"ttft_{q}_ms"], sim[f"ttft_{q}_ms"]
            row[f"added_ttft_{q}_ms"] = (
                round(ours - theirs, 2) if ours is not None and theirs is not None else None
            )


def relay_cpu(row: dict) -> float | None:
    target = TARGETS[row["target"]]
    return row["cpu_us_per_chunk"].get(target.relay) if target.relay else None


def proxy_cpu(row: dict) -> float | None:
    proxies = TARGETS[row["target"]].also_costs
    return row["cpu_us_per_chunk"].get(proxies[0]) if proxies else None


def relay_wait(row: dict) -> str | None:
    """Runqueue wait of the relay (or the simulator alone) as a share of the window."""
    name = TARGETS[row["target"]].relay or "sim"
    seconds = row["runqueue_wait_s"].get(name)
    return None if seconds is None else f"{100 * seconds / row['window_s']:.0f}%"


def verdicts(rows: list[dict]) -> list[dict]:
    """Pass/fail against the issue's targets; `None` when the run did not measure it. Each
    check carries how busy the machine was during its row: a FAIL under heavy foreign load
    says little about the gateway."""

    def row_of(target: str, level: int) -> dict | None:
        return next((r for r in rows if r["target"] == target and r["level"] == level), None)

    checks = []

    def check(name: str, row: dict | None, value, limit, ok) -> None:
        checks.append(
            {
                "check": name,
                "value": None if row is None else value(row),
                "limit": limit,
                "pass": None if row is None or value(row) is None else ok(value(row), limit),
                "others_cores": row and row["other_processes_cores"],
            }
        )

    def at_most(value, limit) -> bool:
        return value <= limit

    # The lean gateway's checks are always listed ("not measured" when absent); the SDK clients'
    # only when the run measured them.
    measured = {row["target"] for row in rows}
    relays = [
        name
        for suffix in ("", "-plain", *(f"-{t}" for t in COMPARED_TRANSPORTS))
        for name in (f"gateway{suffix}", f"nginx{suffix}")
        if not suffix or name in measured
    ]
    for target in relays:
        check(
            f"gateway CPU per chunk, {target} @{TARGET_LEVEL} (us)",
            row_of(target, TARGET_LEVEL),
            relay_cpu,
            TARGET_CPU_US_PER_CHUNK,
            at_most,
        )
    nginxes = [name for name in relays if name.startswith("nginx")]
    nginxes += [name for name in ("nginx-tls",) if name in measured]
    for nginx in nginxes:
        at = row_of(nginx, TARGET_LEVEL)
        check(
            f"{nginx} @{TARGET_LEVEL}: streams/s vs simulator alone",
            at,
            lambda r: r.get("throughput_vs_sim"),
            TARGET_THROUGHPUT_RATIO,
            lambda v, lim: v >= lim,
        )
        check(
            f"{nginx} @{TARGET_LEVEL}: p99 inter-chunk gap (ms)",
            at,
            lambda r: r["gap_p99_ms"],
            TARGET_GAP_P99_MS,
            at_most,
        )
        check(
            f"{nginx} @{TARGET_LEVEL}: p99 TTFT (ms)",
            at,
            lambda r: r["ttft_p99_ms"],
            TARGET_TTFT_P99_MS,
            at_most,
        )
        check(f"{nginx} @{TARGET_LEVEL}: errors", at, lambda r: r["error_count"], 0, at_most)
        check(
            f"{nginx} @{TARGET_LEVEL}: fewest reads per response (every token its own read)",
            at,
            lambda r: r["reads_min"],
            TOKENS,
            lambda v, lim: v >= lim,
        )
    for target in ("gateway", "nginx"):
        check(
            f"{target} @{TARGET_ADDED_TTFT_LEVEL}: added TTFT p50 (ms)",
            row_of(target, TARGET_ADDED_TTFT_LEVEL),
            lambda r: r.get("added_ttft_p50_ms"),
            TARGET_ADDED_TTFT_P50_MS,
            at_most,
        )
    return checks


def tls_cost(rows: list[dict]) -> list[dict]:
    """What TLS adds to nginx per chunk: nginx-tls minus nginx at the same level, same run (the
    same gateway behind both). Only where both rows were measured."""
    by_key = {(row["target"], row["level"]): row for row in rows}
    entries = []
    for level in sorted({row["level"] for row in rows}):
        plain, tls = by_key.get(("nginx", level)), by_key.get(("nginx-tls", level))
        if plain is None or tls is None:
            continue
        plain_us, tls_us = proxy_cpu(plain), proxy_cpu(tls)
        if plain_us is None or tls_us is None:
            continue
        entries.append(
            {
                "level": level,
                "nginx_us": plain_us,
                "nginx_tls_us": tls_us,
                "tls_adds_us": round(tls_us - plain_us, 1),
                "vs_sim": {
                    "nginx": plain.get("throughput_vs_sim"),
                    "nginx-tls": tls.get("throughput_vs_sim"),
                },
                "others_cores": {
                    "nginx": plain["other_processes_cores"],
                    "nginx-tls": tls["other_processes_cores"],
                },
            }
        )
    return entries


def tls_cost_lines(entries: list[dict]) -> list[str]:
    return [
        f"TLS adds {entry['tls_adds_us']} us of nginx CPU per chunk @{entry['level']} "
        f"(nginx-tls {entry['nginx_tls_us']} vs nginx {entry['nginx_us']} us; vs sim "
        f"{fmt(entry['vs_sim']['nginx-tls'])} vs {fmt(entry['vs_sim']['nginx'])}; others' cores "
        f"{entry['others_cores']['nginx-tls']} / {entry['others_cores']['nginx']})"
        for entry in entries
    ]


def transport_comparison(rows: list[dict]) -> list[dict]:
    """The gateway's CPU per chunk with each SDK client as a multiple of the lean transport's,
    per path (direct, via nginx) and level, from rows of the same run. Only where both the lean
    row and at least one SDK-client row were measured."""
    by_key = {(row["target"], row["level"]): row for row in rows}
    entries = []
    for path in ("gateway", "nginx"):
        for level in sorted({row["level"] for row in rows}):
            found = {
                transport: by_key.get(
                    (path if transport == "lean" else f"{path}-{transport}", level)
                )
                for transport in ("lean", *COMPARED_TRANSPORTS)
            }
            cpu = {t: relay_cpu(row) if row else None for t, row in found.items()}
            lean = cpu["lean"]
            if lean is None or all(cpu[t] is None for t in COMPARED_TRANSPORTS):
                continue
            entry = {
                "path": "direct" if path == "gateway" else "nginx",
                "level": level,
                "lean_us": lean,
            }
            for transport in COMPARED_TRANSPORTS:
                value = cpu[transport]
                entry[f"{transport}_us"] = value
                entry[f"{transport}_x_lean"] = round(value / lean, 2) if value is not None else None
            entry["vs_sim"] = {
                t: row.get("throughput_vs_sim") if row else None for t, row in found.items()
            }
            entry["upstream_connections"] = {
                t: row.get("upstream_connections") if row else None for t, row in found.items()
            }
            entries.append(entry)
    return entries


def comparison_markdown(entries: list[dict]) -> list[str]:
    def cell(entry: dict, transport: str) -> str:
        value, ratio = entry[f"{transport}_us"], entry[f"{transport}_x_lean"]
        return "-" if value is None else f"{value} ({ratio}x)"

    def conns(entry: dict) -> str:
        shown = []
        for transport in ("lean", *COMPARED_TRANSPORTS):
            conn = entry["upstream_connections"].get(transport)
            shown.append(
                "-" if not conn else f"{conn['open_at_end']} / {fmt(conn['closed_per_stream'])}"
            )
        return " ; ".join(shown)

    lines = [
        "",
        (
            "| gateway upstream client | streams | lean us/chunk | sdk us/chunk (x lean) "
            "| aiohttp us/chunk (x lean) | vs sim: lean / sdk / aiohttp "
            "| upstream conns open / closed per stream: lean ; sdk ; aiohttp |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        ratios = " / ".join(fmt(entry["vs_sim"].get(t)) for t in ("lean", *COMPARED_TRANSPORTS))
        lines.append(
            f"| {entry['path']} | {entry['level']} | {entry['lean_us']} | {cell(entry, 'sdk')} "
            f"| {cell(entry, 'aiohttp')} | {ratios} | {conns(entry)} |"
        )
    return [*lines, "", *comparison_lines(entries)]


def comparison_lines(entries: list[dict]) -> list[str]:
    """One line per measured client and row pair: "sdk/lean CPU per chunk = 3.1x (...)"."""
    return [
        f"{transport}/lean gateway CPU per chunk = {entry[f'{transport}_x_lean']}x "
        f"({entry['path']} @{entry['level']}: {entry[f'{transport}_us']} vs "
        f"{entry['lean_us']} us)"
        for entry in entries
        for transport in COMPARED_TRANSPORTS
        if entry.get(f"{transport}_x_lean") is not None
    ]


def fmt(value, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def reads_lost_lines(rows: list[dict]) -> list[str]:
    """For each row where a response had two tokens in one read: where they merged."""
    lines = []
    for row in rows:
        lost, lag = row.get("reads_lost"), row.get("harness_lag_max_ms")
        if row["reads_min"] is None or row["reads_min"] >= TOKENS or not lost or not lag:
            continue
        lines.append(
            f"{TARGETS[row['target']].title} @{row['level']}: tokens merged before the load "
            f"generator in {fmt(lost['merged_before_client'])} responses, read late by it in "
            f"{fmt(lost['read_late_by_client'])}; longest lag of the simulator's token clock "
            f"{fmt(lag['sim'])} ms, of the load generator {fmt(lag['client'])} ms "
            f"(tokens are {GAP_MS} ms apart)."
        )
    return ["", *lines] if lines else []


def markdown(rows: list[dict], checks: list[dict], comparison: list[dict] | None = None) -> str:
    lines = [
        (
            "| target | streams | done/s | vs sim | TTFT p50 / p99 ms | added p50 / p99 ms "
            "| gap p99 ms | reads/resp mean / min | errors | relay us/chunk | nginx us/chunk "
            "| sim us/chunk | client cores | others' cores | relay CPU wait |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        per_chunk = row["cpu_us_per_chunk"]
        client = f"{row['client_cpu_cores']} /{row['client_procs']}"
        if row["client_saturated"]:
            client += " SATURATED"
        lines.append(
            f"| {TARGETS[row['target']].title} | {row['level']} | {row['streams_per_s']} "
            f"| {fmt(row.get('throughput_vs_sim'))} "
            f"| {fmt(row['ttft_p50_ms'])} / {fmt(row['ttft_p99_ms'])} "
            f"| {fmt(row.get('added_ttft_p50_ms'))} / {fmt(row.get('added_ttft_p99_ms'))} "
            f"| {fmt(row['gap_p99_ms'])} | {fmt(row['reads_mean'])} / {fmt(row['reads_min'])} "
            f"| {row['error_count'] or 0}{' ' + str(row['errors']) if row['errors'] else ''} "
            f"| {fmt(relay_cpu(row))} | {fmt(proxy_cpu(row))} "
            f"| {fmt(per_chunk.get('sim'))} | {client} | {row['other_processes_cores']} "
            f"| {fmt(relay_wait(row))} |"
        )
    noisy = [row for row in rows if row["other_processes_cores"] > NOISY_OTHERS_CORES]
    if noisy:
        warning = (
            f"{len(noisy)} of {len(rows)} rows ran while other processes used more than "
            f"{NOISY_OTHERS_CORES} of the {os.cpu_count()} cores: their latency figures say more "
            "about the machine than about the target."
        )
        lines += ["", warning]
    lines += reads_lost_lines(rows)
    lines += [
        "",
        "| target (issue 2) | measured | limit | verdict | others' cores then |",
        "|---|---:|---:|---|---:|",
    ]
    for item in checks:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[item["pass"]]
        lines.append(
            f"| {item['check']} | {fmt(item['value'])} | {item['limit']} | {verdict} "
            f"| {fmt(item['others_cores'])} |"
        )
    if comparison:
        lines += comparison_markdown(comparison)
    return "\n".join(lines)


LOGGED_TRANSPORT = re.compile(rb'"event":\s*"worker_started".*?"upstream_transport":\s*"(\w+)"')


def logged_transports(services: dict[str, Service]) -> dict[str, list[str]]:
    """The upstream client each gateway worker said it uses at start (its log), so a row is
    never labelled with a client the gateway did not run."""
    found = {}
    for name in GATEWAY_TRANSPORTS:
        if name in services:
            log = services[name].log_dir / f"{name}.log"
            text = log.read_bytes() if log.exists() else b""
            found[name] = [m.group(1).decode() for m in LOGGED_TRANSPORT.finditer(text)]
    return found


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown",
        ),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = RESULTS_DIR / f"run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    expected = None if args.no_content_check else expected_text()
    if expected is None:
        print("note: answers not compared with the simulator's script", flush=True)
    info = machine()
    services = build_services(args, run_dir)
    rows: list[dict] = []
    try:
        for service in services.values():
            service.start()
        for level in args.levels:
            for name in args.targets:
                time.sleep(SETTLE_S)
                row = measure(TARGETS[name], level, args, services, expected)
                rows.append(row)
                print(
                    f"{name:15} @{level:5}: {row['streams_per_s']:7} streams/s, "
                    f"TTFT p99 {row['ttft_p99_ms']} ms, gap p99 {row['gap_p99_ms']} ms, "
                    f"reads min {row['reads_min']}, errors {row['error_count']}, "
                    f"CPU us/chunk {row['cpu_us_per_chunk']}, client {row['client_cpu_cores']}",
                    flush=True,
                )
        if args.profile_with:
            profile_dir = run_dir / "profile"
            profile_dir.mkdir(exist_ok=True)
            target = TARGETS[args.profile_target]
            row = measure(target, args.profile_level, args, services, expected, profile_dir)
            profile = profile_report(
                sorted(profile_dir.glob("*.txt")), top=30, us_per_chunk=relay_cpu(row)
            )
            (profile_dir / "summary.txt").write_text(profile + "\n")
            print(
                f"\nprofile of {target.relay} workers, {target.name} @{args.profile_level} "
                f"(under py-spy: {row['streams_per_s']} streams/s, "
                f"{row['cpu_us_per_chunk']} us/chunk)\n{profile}",
                flush=True,
            )
        transports = logged_transports(services)
    finally:
        for service in reversed(services.values()):
            service.stop()
    add_ratios(rows)
    checks = verdicts(rows)
    comparison = transport_comparison(rows)
    tls = tls_cost(rows)
    table = markdown(rows, checks, comparison)
    if tls:
        table += "\n\n" + "\n".join(tls_cost_lines(tls))
    wrong = {
        name: seen
        for name, seen in transports.items()
        if not seen or set(seen) != {GATEWAY_TRANSPORTS[name]}
    }
    if wrong:
        table += (
            f"\n\nWARNING: gateway workers logged other upstream clients than asked: "
            f"{wrong} (asked {GATEWAY_TRANSPORTS}): their rows are mislabelled."
        )
    print()
    print(table)
    report = {
        "command": " ".join(["bench/stream_bench.py", *(argv or sys.argv[1:])]),
        "started_utc": stamp,
        "machine": info,
        "load": {
            "tokens": TOKENS,
            "ttft_ms": TTFT_MS,
            "gap_ms": GAP_MS,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        },
        "content_checked": expected is not None,
        "rows": rows,
        "checks": checks,
        "gateway_transports_logged": transports,
        "transport_comparison": comparison,
        "tls_cost": tls,
        "client_key": args.client_key,
    }
    out = RESULTS_DIR / f"stream-bench-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    (run_dir / "table.md").write_text(table + "\n")
    print(f"\nJSON: {out.relative_to(REPO)}; process logs: {run_dir.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
