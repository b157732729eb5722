"""Held streams at scale: how many streams waiting on a slow first token one box holds.

Reasoning models take tens of seconds to their first token, so an edge must hold many idle
streams. This starts the simulator with a first-token delay of --ttft-s (30 s), the gateway with
the product's defaults (heartbeats on, workers = CPUs) and nginx rendered from the templates
with the role's defaults (as stream_bench does), each process with the open-files limit its
systemd unit gives it; opens --streams streams through nginx spread over --open-s seconds, one
per keep-alive connection; waits until the simulator holds them all; samples the memory (RSS and
PSS) of nginx, the gateway and the simulator at rest and while held; then lets the tokens come
and checks every stream: 200, every token in order, the end ([DONE]), no error.

    .venv/bin/python bench/held_streams.py                  # 10,000 streams (make bench-held)
    .venv/bin/python bench/held_streams.py --streams 2000 --route stream-sse

Prints a Markdown summary, writes JSON to bench/results/ (and process logs to its run dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import sys
import time
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent / "loadtest")]

from loadgen import ResponseError, StreamConnection, build_request
from stack import (
    REPO,
    VENV_BIN,
    busy_cpu_seconds,
    http_json,
    kernel_tcp,
    open_files,
    render_nginx,
)
from stream_bench import (
    BENCH_CLIENT_KEY,
    build_services,
    gateway_has_client_keys,
    machine,
)
from streamcheck import OpenAIDecoder, SSEDecoder
from support import capacity

ROUTES = {"completions": "/v1/chat/completions", "stream-sse": "/v1/chat/stream-sse"}
CONNECT_TIMEOUT_S = 30.0
# How long after its first token is due a stream may take to end before it counts as a timeout.
DRAIN_TIMEOUT_S = 120.0
POLL_S = 0.25
SETTLE_S = 2.0  # after the last stream reached the simulator, before the held sample
PING = b": ping"
RESULTS_DIR = REPO / "bench" / "results"


def request_body(route: str, tokens: int) -> bytes:
    prompt = "Think hard, then answer."
    if route == "completions":
        return json.dumps(
            {
                "model": "sim",
                "stream": True,
                "max_tokens": tokens,
                "messages": [{"role": "user", "content": prompt}],
            }
        ).encode()
    return json.dumps({"prompt": prompt, "max_tokens": tokens}).encode()


@dataclass
class HeldOutcome:
    """What one load-generator process saw (picklable, mergeable)."""

    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft_s: array = field(default_factory=lambda: array("d"))
    connected_at: float = 0.0  # monotonic: when this process's last connection was made
    pings: int = 0  # SSE heartbeats received (stream-sse route)
    cpu_s: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def merge(self, other: HeldOutcome) -> None:
        self.completed += other.completed
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count
        self.ttft_s.extend(other.ttft_s)
        self.connected_at = max(self.connected_at, other.connected_at)
        self.pings += other.pings
        self.cpu_s += other.cpu_s


def judge(conn: StreamConnection, route: str, expected: str) -> str:
    """'' for a complete, exact stream, else the kind of error."""
    decoder = OpenAIDecoder() if route == "completions" else SSEDecoder()
    text, _ = decoder.feed(conn.body())
    if decoder.error:
        return "error-event"
    if not decoder.done:
        return "no-end"
    if text != expected:
        return "content"
    return ""


async def held_stream(
    index: int,
    streams: int,
    port: int,
    request: bytes,
    route: str,
    expected: str,
    start: float,
    open_s: float,
    timeout_s: float,
    outcome: HeldOutcome,
) -> None:
    """One stream on its own keep-alive connection, opened at its slot of the open window."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + open_s * index / streams - time.monotonic()))
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: StreamConnection(sse=True), "127.0.0.1", port),
            CONNECT_TIMEOUT_S,
        )
    except (OSError, TimeoutError):
        outcome.error("connect")
        return
    outcome.connected_at = max(outcome.connected_at, time.monotonic())
    sent = time.monotonic()
    kind = ""
    try:
        if conn.closed:  # accepted and closed at once (e.g. a proxy out of connections)
            raise ResponseError("closed-at-connect")
        await conn.exchange(request, timeout_s)
    except ResponseError as exc:
        kind = exc.kind
    if not kind:
        kind = judge(conn, route, expected)
    body = conn.body() if route == "stream-sse" else b""
    outcome.pings += body.count(PING)
    conn.transport.close()
    if kind:
        outcome.error(kind)
        return
    outcome.completed += 1
    outcome.ttft_s.append(conn.t_first - sent)


async def run_streams(
    port: int,
    route: str,
    tokens: int,
    key: str | None,
    expected: str,
    first: int,
    count: int,
    streams: int,
    start: float,
    open_s: float,
    timeout_s: float,
) -> HeldOutcome:
    outcome = HeldOutcome()
    request = build_request("127.0.0.1", port, ROUTES[route], request_body(route, tokens), key)
    cpu_start = time.process_time()
    await asyncio.gather(
        *(
            held_stream(
                first + i,
                streams,
                port,
                request,
                route,
                expected,
                start,
                open_s,
                timeout_s,
                outcome,
            )
            for i in range(count)
        )
    )
    outcome.cpu_s = time.process_time() - cpu_start
    return outcome


def run_process(conn, *args) -> None:
    """Entry of one load-generator process (forked): its share of the streams."""
    import uvloop

    conn.send(uvloop.run(run_streams(*args)))
    conn.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=capacity.HELD_STREAMS_TARGET)
    parser.add_argument("--ttft-s", type=float, default=30.0, help="first-token delay")
    parser.add_argument("--open-s", type=float, default=5.0, help="spread the opens over this")
    parser.add_argument("--tokens", type=int, default=10, help="tokens per answer")
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=1000.0,
        help="between tokens (10,000 streams x 1 per s = 10,000 chunks/s)",
    )
    parser.add_argument(
        "--route",
        choices=sorted(ROUTES),
        default="completions",
        help="completions: the OpenAI route; stream-sse: heartbeats are sent",
    )
    parser.add_argument("--client-procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--nginx-workers", help="nginx worker_processes (default: auto)")
    parser.add_argument(
        "--nginx-set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="render nginx with this role variable changed (integers as such), "
        "e.g. nginx_worker_connections=4096 to see the old default bind",
    )
    parser.add_argument("--no-client-key", dest="client_key", action="store_false")
    parser.add_argument("--simulator", default=str(VENV_BIN / "streamgate-sim"))
    args = parser.parse_args(argv)
    args.nginx_overrides = {}
    for item in args.nginx_set:
        name, _, value = item.partition("=")
        args.nginx_overrides[name] = int(value) if value.isdigit() else value
    if args.client_key and not gateway_has_client_keys():
        args.client_key = False
    return args


@dataclass
class Snapshot:
    """Memory and CPU of every service, the kernel's TCP side, at one moment."""

    at: float
    memory: dict[str, dict[str, int]]
    cpu: dict[str, float]
    tcp: dict[str, int]
    busy: float

    @classmethod
    def take(cls, services: dict) -> Snapshot:
        return cls(
            at=time.monotonic(),
            memory={name: service.memory_kib() for name, service in services.items()},
            cpu={name: sum(service.cpu_by_pid().values()) for name, service in services.items()},
            tcp=kernel_tcp(),
            busy=busy_cpu_seconds(),
        )


def wait_until_held(sim_port: int, streams: int, deadline: float) -> tuple[float | None, int]:
    """Poll the simulator until it holds `streams` answers (or the deadline): (when, active)."""
    active = 0
    for _ in range(int((deadline - time.monotonic()) / POLL_S) + 2):
        stats = http_json(sim_port, "/stats")
        active = stats["active"] if stats else active
        if active >= streams:
            return time.monotonic(), active
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return None, active


def phase(before: Snapshot, after: Snapshot) -> dict:
    seconds = after.at - before.at
    cpu = {name: round(after.cpu[name] - before.cpu[name], 2) for name in after.cpu}
    return {
        "seconds": round(seconds, 2),
        "cpu_s": cpu,
        "cores": {
            name: round(value / seconds, 2) if seconds > 0 else None for name, value in cpu.items()
        },
        "machine_cores": round((after.busy - before.busy) / seconds, 2) if seconds else None,
    }


def per_stream(rest: Snapshot, held: Snapshot, streams: int) -> dict:
    """Memory added per held stream: (held - rest) / the streams held at the sample."""
    streams = max(streams, 1)
    out = {}
    for name in held.memory:
        out[name] = (
            {
                f"{kind}_mib_rest": round(rest.memory[name].get(kind, 0) / 1024, 1)
                for kind in ("rss", "pss")
            }
            | {
                f"{kind}_mib_held": round(held.memory[name].get(kind, 0) / 1024, 1)
                for kind in ("rss", "pss")
            }
            | {
                f"{kind}_kib_per_stream": round(
                    (held.memory[name].get(kind, 0) - rest.memory[name].get(kind, 0)) / streams, 2
                )
                for kind in ("rss", "pss")
            }
        )
    out["kernel"] = {
        "tcp_buffers_kib_per_stream": round(
            (held.tcp["tcp_mem_kib"] - rest.tcp["tcp_mem_kib"]) / streams, 2
        ),
        "slab_kib_per_stream": round((held.tcp["slab_kib"] - rest.tcp["slab_kib"]) / streams, 2),
        "tcp_sockets_added": held.tcp["tcp_inuse"] - rest.tcp["tcp_inuse"],
    }
    return out


def percentile_s(values, q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 2) if len(values) else None


def log_problems(run_dir: Path) -> list[str]:
    """nginx error-log lines above warn and gateway tracebacks/open-file errors, first few."""
    found = []
    for path in sorted(run_dir.rglob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if any(
                word in line
                for word in (
                    "[alert]",
                    "[crit]",
                    "[emerg]",
                    "[error]",
                    "Too many open files",
                    "Traceback",
                )
            ):
                found.append(f"{path.relative_to(run_dir)}: {line[:200]}")
                if len(found) >= 20:
                    return found
    return found


def markdown(report: dict) -> str:
    r = report
    lines = [
        (
            f"held streams: {r['streams']} via nginx on {r['route']} ({ROUTES[r['route']]}), "
            f"first token after {r['ttft_s']} s, {r['tokens']} tokens {r['gap_ms']:.0f} ms apart, "
            f"opened over {r['open_s']} s"
        ),
        "",
        (
            "| streams | completed | errors | all held at the simulator after "
            "| TTFT p50 / p99 / max s | listen overflows | nginx KiB / stream (PSS) "
            "| gateway KiB / stream (PSS) | simulator KiB / stream (PSS) "
            "| kernel slab KiB / stream |"
        ),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mem = r["memory"]
    held_after = "-" if r["held_after_s"] is None else f"{r['held_after_s']} s"
    lines.append(
        f"| {r['streams']} (held {r['held_at_sample']}) | {r['completed']} | {r['error_count']}"
        f"{' ' + str(r['errors']) if r['errors'] else ''} | {held_after} "
        f"| {r['ttft_p50_s']} / {r['ttft_p99_s']} / {r['ttft_max_s']} "
        f"| {r['listen_overflows']} | {mem['nginx']['pss_kib_per_stream']} "
        f"| {mem['gateway']['pss_kib_per_stream']} | {mem['sim']['pss_kib_per_stream']} "
        f"| {mem['kernel']['slab_kib_per_stream']} |"
    )
    lines += [
        "",
        (
            "| process tree | RSS MiB rest / held | PSS MiB rest / held "
            "| RSS KiB / stream | PSS KiB / stream |"
        ),
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("nginx", "gateway", "sim"):
        m = mem[name]
        lines.append(
            f"| {name} | {m['rss_mib_rest']} / {m['rss_mib_held']} "
            f"| {m['pss_mib_rest']} / {m['pss_mib_held']} | {m['rss_kib_per_stream']} "
            f"| {m['pss_kib_per_stream']} |"
        )
    lines += [
        "",
        (
            "| phase | seconds | nginx | gateway | simulator | load generator "
            "| whole machine (cores) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in r["phases"].items():
        cpu = p["cpu_s"]
        client = f"{r['client_cpu_s']} s" if name == "whole run" else ""
        lines.append(
            f"| {name} (CPU s) | {p['seconds']} | {cpu['nginx']} | {cpu['gateway']} "
            f"| {cpu['sim']} | {client} | {p['machine_cores']} |"
        )
    if r["route"] == "stream-sse":
        lines += ["", f"heartbeats received: {r['pings']} ({r['pings_per_stream']} per stream)"]
    lines += [
        "",
        (f"open files / limit per process while held (master first): {r['open_files_held']}"),
        "",
        f"deployed limits: {r['limits']}",
    ]
    if r["deployed_shortfalls"]:
        lines += ["", f"deployed defaults do NOT fit {r['streams']}: {r['deployed_shortfalls']}"]
    if r["log_problems"]:
        lines += ["", "log lines:", *(f"    {line}" for line in r["log_problems"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the load generator inherits it
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = RESULTS_DIR / f"held-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    from streamgate.simulator.script import expected_tokens

    expected = "".join(expected_tokens(args.tokens))
    config = argparse.Namespace(
        targets=["nginx"],
        client_key=args.client_key,
        simulator=args.simulator,
        gateway_workers=0,  # the product's default: one per CPU
        nginx_workers=args.nginx_workers,
        tls_cafile=None,
    )
    services = build_services(config, run_dir, pace=(args.ttft_s * 1000, args.gap_ms, args.tokens))
    # Each process with the open-files limit its unit gives it (nginx sets its own from
    # worker_rlimit_nofile).
    services["gateway"].nofile = capacity.unit_nofile(capacity.GATEWAY_UNIT)
    services["sim"].nofile = capacity.unit_nofile(capacity.SIMULATOR_UNIT)
    if args.nginx_overrides:  # the same nginx, rendered again with the variables changed
        render_nginx(
            run_dir,
            services["nginx"].port,
            services["gateway"].port,
            worker_processes=args.nginx_workers,
            name="nginx",
            overrides=args.nginx_overrides,
        )
    limits = capacity.deployed_limits(args.nginx_overrides)
    key = BENCH_CLIENT_KEY if args.client_key else None
    procs = max(1, min(args.client_procs, args.streams))
    outcome = HeldOutcome()
    timeout_s = args.ttft_s + args.open_s + DRAIN_TIMEOUT_S
    held_at, held_active = None, 0
    try:
        for service in services.values():
            service.start()
        nginx_port = services["nginx"].port
        time.sleep(1.0)
        rest = Snapshot.take(services)
        start = time.monotonic() + 0.5
        context = multiprocessing.get_context("fork")
        workers, first = [], 0
        for index in range(procs):
            count = args.streams // procs + (1 if index < args.streams % procs else 0)
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=run_process,
                daemon=True,
                args=(
                    sender,
                    nginx_port,
                    args.route,
                    args.tokens,
                    key,
                    expected,
                    first,
                    count,
                    args.streams,
                    start,
                    args.open_s,
                    timeout_s,
                ),
            )
            process.start()
            sender.close()
            workers.append((process, receiver))
            first += count
        first_token_due = start + args.ttft_s
        held_at, held_active = wait_until_held(
            services["sim"].port, args.streams, first_token_due - 1.0
        )
        print(
            f"held at the simulator: {held_active} of {args.streams}"
            + (f" after {held_at - start:.1f} s" if held_at else " (not all)"),
            flush=True,
        )
        if held_at is not None:
            time.sleep(max(0.0, min(SETTLE_S, first_token_due - 1.0 - time.monotonic())))
        held = Snapshot.take(services)
        # Open files and the limit in effect, per process (master first): how evenly the
        # streams spread over the workers, and how close each came to its limit.
        files = {
            name: [open_files(pid) for pid in service.refresh_pids()]
            for name, service in services.items()
        }
        stats = http_json(services["sim"].port, "/stats")
        held_at_sample = stats["active"] if stats else held_active
        time.sleep(max(0.0, first_token_due - 0.5 - time.monotonic()))
        held_end = Snapshot.take(services)
        deadline = start + timeout_s + 15.0
        for process, receiver in workers:
            try:
                if not receiver.poll(max(0.0, deadline - time.monotonic())):
                    raise EOFError
                outcome.merge(receiver.recv())
            except EOFError:  # it crashed (its log is on stderr) or never answered
                outcome.error("loadgen-lost")
            process.join(max(0.0, deadline - time.monotonic()) + 1.0)
            if process.is_alive():
                process.kill()  # by PID: only our own forked load generator
                process.join(5.0)
        done = Snapshot.take(services)
    finally:
        for service in reversed(services.values()):
            service.stop()
    lost = args.streams - outcome.completed - sum(outcome.errors.values())
    if lost > 0:  # a load-generator process that never reported
        outcome.errors["unaccounted"] = lost
    report = {
        "command": " ".join(["bench/held_streams.py", *(argv or sys.argv[1:])]),
        "started_utc": stamp,
        "machine": machine(),
        "streams": args.streams,
        "route": args.route,
        "ttft_s": args.ttft_s,
        "open_s": args.open_s,
        "tokens": args.tokens,
        "gap_ms": args.gap_ms,
        "client_key": args.client_key,
        "nginx_overrides": args.nginx_overrides,
        "completed": outcome.completed,
        "errors": dict(sorted(outcome.errors.items())),
        "error_count": sum(outcome.errors.values()),
        "held_at_sample": held_at_sample,
        "held_after_s": round(held_at - start, 2) if held_at else None,
        "connected_after_s": round(outcome.connected_at - start, 2)
        if outcome.connected_at
        else None,
        "ttft_p50_s": percentile_s(outcome.ttft_s, 50),
        "ttft_p99_s": percentile_s(outcome.ttft_s, 99),
        "ttft_max_s": round(max(outcome.ttft_s), 2) if outcome.ttft_s else None,
        "pings": outcome.pings,
        "pings_per_stream": round(outcome.pings / args.streams, 2),
        "memory": per_stream(rest, held, held_at_sample),
        "memory_after_kib": done.memory,
        "open_files_held": {
            name: [f"{count}/{limit}" for count, limit in found if limit]
            for name, found in files.items()
        },
        "listen_overflows": done.tcp["listen_overflows"] - rest.tcp["listen_overflows"],
        "listen_drops": done.tcp["listen_drops"] - rest.tcp["listen_drops"],
        "phases": {
            "open": phase(rest, held),
            "held": phase(held, held_end),
            "tokens": phase(held_end, done),
            "whole run": phase(rest, done),
        },
        "client_cpu_s": round(outcome.cpu_s, 2),
        "limits": {
            "nginx_worker_connections": limits.nginx_worker_connections,
            "nginx_worker_rlimit_nofile": limits.nginx_worker_rlimit_nofile,
            "nginx_listen_backlogs": limits.nginx_listen_backlogs,
            "gunicorn_backlog": limits.gateway_backlog,
            "gateway_nofile": services["gateway"].nofile,
            "sim_nofile": services["sim"].nofile,
            "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text()),
            "cpus": os.cpu_count(),
        },
        "deployed_shortfalls": capacity.shortfalls(limits, args.streams),
        "log_problems": log_problems(run_dir),
    }
    table = markdown(report)
    print()
    print(table)
    out = RESULTS_DIR / f"held-streams-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    (run_dir / "table.md").write_text(table + "\n")
    print(f"\nJSON: {out.relative_to(REPO)}; process logs: {run_dir.relative_to(REPO)}/")
    return 0 if report["error_count"] == 0 and outcome.completed == args.streams else 1


if __name__ == "__main__":
    sys.exit(main())
