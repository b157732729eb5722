"""The gateway in front of a real inference engine: llama.cpp's server (streamgate-llm-server, as
the llm role runs it) on a GGUF model, alone, behind the gateway, and behind nginx -> gateway,
side by side in one run at a few concurrencies (what `make bench-llm` runs).

    .venv/bin/python bench/llm_bench.py [--levels 1,4,8,16] [--tokens 64] [--model M.gguf]

Without --model the run writes the generated `paced` model (tools/llm/make_test_model.py, seed 7:
random weights, 8 to 20 ms a token on one core, answers that always run to max_tokens). The
engine decodes with --threads (1) and has one slot per stream of the largest level (--parallel):
no stream waits for a slot. The gateway runs as deployed (gunicorn with the repo's config, 2
uvicorn workers, lean transport, one client key) and nginx is rendered from the role's templates
(stream_bench's starters); all three are reached on `/v1/chat/completions` with the same body, so
each answer is judged the same way: the text of a real model is not known in advance, so a
stream counts when its protocol is whole (role chunk, a finish_reason, usage not below the
content chunks, `data: [DONE]`, no error event; loadtest/streamcheck.py's judge), and its tokens
are counted (usage, else content chunks). Closed loop, one load-generator process (loadgen.py).
Every gateway figure is given against the engine alone at the same level, measured seconds
apart: added TTFT and gap (ms) and as multiples, tokens/s per stream as a ratio.
Prints a Markdown table, writes JSON to bench/results/; exit 1 when a row had an error or no
completed stream.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "loadtest"))

from loadgen import Outcome, Schedule, collect_outcome, start_process
from stack import REPO, Service, busy_cpu_seconds, cpu_seconds, free_port, tcp_connections
from stream_bench import (
    BENCH_CLIENT_KEY,
    gateway_has_client_keys,
    gateway_service,
    machine,
    nginx_service,
    percentile_ms,
    sleep_until,
)
from streamcheck import OpenAIDecoder, StreamRecord, count_tokens, judge_protocol
from support.services import make_test_model

RESULTS_DIR = REPO / "bench" / "results"
MODEL_ALIAS = "test-llama"
PROMPT = "Tell me about streaming."
STREAM_TIMEOUT_S = 60.0
STAGGER_S = 1.0  # spreads the clients' first requests
SETTLE_S = 1.0
NO_DONE = "no [DONE]"
ERROR_EVENT = "in-band error"
MALFORMED = "malformed event"


@dataclass(frozen=True)
class Target:
    """One way of reaching the engine's tokens, and which process trees it costs."""

    name: str
    title: str
    service: str  # the service the client talks to
    costs: tuple[str, ...]  # relaying process trees, beyond the engine


TARGETS = {
    "engine": Target("engine", "llama.cpp alone", "engine", ()),
    "gateway": Target("gateway", "gateway -> llama.cpp", "gateway", ("gateway",)),
    "nginx": Target("nginx", "nginx -> gateway -> llama.cpp", "nginx", ("gateway", "nginx")),
}


def request_body(tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL_ALIAS,
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "max_tokens": tokens,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def judge_openai_stream(body: bytes) -> tuple[str, int]:
    """(error kind or "", tokens) of one whole `/v1/chat/completions` stream, judged by its
    protocol (the load test's judge), not its words."""
    decoder = OpenAIDecoder()
    try:
        content, units = decoder.feed(body)
    except ValueError:  # an event whose data is not JSON
        return MALFORMED, 0
    record = StreamRecord(started=0.0)
    record.add_read(0.0, content, units)
    tokens = count_tokens(record, decoder, None)
    if decoder.error:
        return ERROR_EVENT, tokens
    if not decoder.done:
        return NO_DONE, tokens
    return judge_protocol(record, decoder) or "", tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,8,16", help="concurrent streams, comma list")
    parser.add_argument(
        "--targets", default="engine,gateway,nginx", help=f"comma list of {', '.join(TARGETS)}"
    )
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the generated paced one)")
    parser.add_argument("--threads", type=int, default=1, help="the engine's decoding threads")
    parser.add_argument(
        "--parallel", type=int, default=0, help="the engine's slots (0: the largest level)"
    )
    parser.add_argument("--gateway-workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--nginx-workers", help="nginx worker_processes (default: auto)")
    parser.add_argument(
        "--no-client-key",
        dest="client_key",
        action="store_false",
        help="start the gateway without a client key and send none",
    )
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",")]
    args.targets = [name.strip() for name in args.targets.split(",")]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {sorted(TARGETS)}")
    if "engine" not in args.targets:
        args.targets.insert(0, "engine")  # every ratio is against it
    args.parallel = args.parallel or max(args.levels)
    if args.parallel < max(args.levels):
        parser.error(
            f"--parallel {args.parallel} < {max(args.levels)} streams: streams would wait for a "
            "slot, and the rows would measure the engine's queue"
        )
    if args.client_key and not gateway_has_client_keys():
        args.client_key = False
    if shutil.which("nginx") is None and "nginx" in args.targets:
        print("note: no nginx binary (Debian: apt-get install nginx-light): nginx rows skipped")
        args.targets.remove("nginx")
    return args


def engine_service(model: Path, run_dir: Path, args: argparse.Namespace) -> Service:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "streamgate.llm_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--alias",
        MODEL_ALIAS,
        "--parallel",
        str(args.parallel),
        "--threads",
        str(args.threads),
    ]
    return Service("engine", port, command, ready_path="/health", log_dir=run_dir)


def build_services(model: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Service]:
    """The engine, and the gateway and nginx when a chosen target needs them; not started."""
    engine = engine_service(model, run_dir, args)
    services = {"engine": engine}
    if {"gateway", "nginx"} & set(args.targets):
        services["gateway"] = gateway_service(
            "gateway",
            f"http://127.0.0.1:{engine.port}/v1",
            run_dir,
            workers=args.gateway_workers,
            client_key=args.client_key,
        )
    if "nginx" in args.targets:
        services["nginx"] = nginx_service(
            "nginx", services["gateway"], run_dir, workers=args.nginx_workers
        )
    return services


def measure(
    target: Target, level: int, args: argparse.Namespace, services: dict[str, Service]
) -> dict:
    """One closed-loop row: `level` streams on one load-generator process."""
    schedule = Schedule.from_now(
        warmup_s=args.warmup,
        duration_s=args.duration,
        stagger_s=STAGGER_S,
        stream_timeout_s=STREAM_TIMEOUT_S,
    )
    key = BENCH_CLIENT_KEY if args.client_key and target.name != "engine" else None
    client, receiver = start_process(
        "127.0.0.1",
        services[target.service].port,
        "/v1/chat/completions",
        request_body(args.tokens),
        True,  # SSE: a read counts when it carries a non-empty content
        None,  # no known text: judged by protocol
        0,
        level,
        level,
        schedule,
        key,
        None,
        judge_openai_stream,
    )
    assert client.pid is not None  # started
    costed = ["engine", *target.costs]
    sleep_until(schedule.warm)
    cpu_before = {name: services[name].cpu_by_pid() for name in costed}
    busy_before = busy_cpu_seconds()
    client_before = cpu_seconds(client.pid)
    closed_before = tcp_connections(services["engine"].port)["time_wait"]
    sleep_until(schedule.end)
    closed = len(tcp_connections(services["engine"].port)["time_wait"] - closed_before)
    cpu = {
        name: sum(after - cpu_before[name].get(pid, 0.0) for pid, after in per_pid.items())
        for name, per_pid in ((n, services[n].cpu_by_pid()) for n in costed)
    }
    busy = busy_cpu_seconds() - busy_before
    client_cpu = cpu_seconds(client.pid) - client_before
    outcome = collect_outcome([(client, receiver)], schedule.results_due)
    window = schedule.end - schedule.warm
    row = summarize(target.name, level, window, outcome, cpu)
    others = busy - sum(cpu.values()) - client_cpu
    row["other_processes_cores"] = round(max(0.0, others) / window, 2)
    row["client_cpu_cores"] = round(client_cpu / window, 2)
    # Connections into the engine closed in the window (new TIME_WAIT pairs), per stream:
    # 1 when every stream needs a new one (llama.cpp's server closes after each stream).
    row["engine_connections_closed_per_stream"] = (
        round(closed / outcome.completed, 2) if outcome.completed else None
    )
    return row


def summarize(
    target: str, level: int, window: float, outcome: Outcome, cpu: dict[str, float]
) -> dict:
    tokens = np.asarray(outcome.tokens, dtype=float)
    spans = np.asarray(outcome.token_spans_s, dtype=float)
    # Decode pace of each stream: tokens after the first over first-to-last-token time.
    paced = spans > 0
    per_stream = (tokens[paced] - 1) / spans[paced]
    total_tokens = int(tokens.sum())
    return {
        "target": target,
        "level": level,
        "window_s": round(window, 2),
        "completed": outcome.completed,
        "ttft_p50_ms": percentile_ms(outcome.ttft_s, 50),
        "ttft_p99_ms": percentile_ms(outcome.ttft_s, 99),
        "gap_p50_ms": percentile_ms(outcome.gaps_s, 50),
        "gap_p99_ms": percentile_ms(outcome.gaps_s, 99),
        "tokens_per_s_per_stream_p50": (
            round(float(np.median(per_stream)), 1) if len(per_stream) else None
        ),
        "tokens_per_stream_mean": round(float(tokens.mean()), 1) if len(tokens) else None,
        "tokens_per_stream_min": int(tokens.min()) if len(tokens) else None,
        "tokens_per_s": round(total_tokens / window, 1),
        "errors": dict(sorted(outcome.errors.items())),
        "error_count": sum(outcome.errors.values()),
        "cpu_cores": {name: round(seconds / window, 2) for name, seconds in cpu.items()},
        "cpu_us_per_token": {
            name: round(seconds / total_tokens * 1e6, 1) if total_tokens else None
            for name, seconds in cpu.items()
        },
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row against the engine alone at the same level: added ms and multiples of TTFT and
    gap (p50, p99), and tokens/s per stream as a ratio."""
    engine = {row["level"]: row for row in rows if row["target"] == "engine"}
    for row in rows:
        base = engine.get(row["level"])
        if base is None:
            continue
        for figure in ("ttft_p50", "ttft_p99", "gap_p50", "gap_p99"):
            ours, theirs = row[f"{figure}_ms"], base[f"{figure}_ms"]
            both = ours is not None and theirs is not None
            row[f"added_{figure}_ms"] = round(ours - theirs, 2) if both else None
            row[f"{figure}_x_engine"] = round(ours / theirs, 2) if both and theirs else None
        ours, theirs = (r["tokens_per_s_per_stream_p50"] for r in (row, base))
        row["tokens_per_s_per_stream_vs_engine"] = (
            round(ours / theirs, 3) if ours is not None and theirs else None
        )


def fmt(value) -> str:
    return "-" if value is None else str(value)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| path | streams | done | TTFT p50 / p99 ms | added TTFT p50 / p99 ms (x engine) "
        "| gap p50 / p99 ms | added gap p50 / p99 ms (x engine) | tokens/s per stream (vs engine) "
        "| tokens per stream mean / min | errors | CPU us per token: gateway / nginx "
        "| engine cores | engine conns closed per stream | others' cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        is_engine = row["target"] == "engine"

        def added(figure: str, row: dict = row, is_engine: bool = is_engine) -> str:
            if is_engine:
                return "-"
            return (
                f"{fmt(row.get(f'added_{figure}_p50_ms'))} / "
                f"{fmt(row.get(f'added_{figure}_p99_ms'))} "
                f"({fmt(row.get(f'{figure}_p50_x_engine'))}x / "
                f"{fmt(row.get(f'{figure}_p99_x_engine'))}x)"
            )

        rate = fmt(row["tokens_per_s_per_stream_p50"])
        if not is_engine:
            rate += f" ({fmt(row.get('tokens_per_s_per_stream_vs_engine'))})"
        per_token = row["cpu_us_per_token"]
        errors = f"{row['error_count']}{' ' + str(row['errors']) if row['errors'] else ''}"
        lines.append(
            f"| {TARGETS[row['target']].title} | {row['level']} | {row['completed']} "
            f"| {fmt(row['ttft_p50_ms'])} / {fmt(row['ttft_p99_ms'])} | {added('ttft')} "
            f"| {fmt(row['gap_p50_ms'])} / {fmt(row['gap_p99_ms'])} | {added('gap')} "
            f"| {rate} | {fmt(row['tokens_per_stream_mean'])} / "
            f"{fmt(row['tokens_per_stream_min'])} | {errors} "
            f"| {fmt(per_token.get('gateway'))} / {fmt(per_token.get('nginx'))} "
            f"| {row['cpu_cores']['engine']} | {fmt(row['engine_connections_closed_per_stream'])} "
            f"| {row['other_processes_cores']} |"
        )
    return "\n".join(lines)


def failed_rows(rows: list[dict]) -> list[str]:
    """Rows that must fail the run: an error, or no stream completed."""
    return [
        f"{row['target']} @{row['level']}"
        for row in rows
        if row["error_count"] or not row["completed"]
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = RESULTS_DIR / f"llm-run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or make_test_model(run_dir, "paced")
    info = machine()
    services = build_services(model, run_dir, args)
    rows: list[dict] = []
    try:
        for service in services.values():
            service.start()
        for level in args.levels:
            for name in args.targets:
                time.sleep(SETTLE_S)
                row = measure(TARGETS[name], level, args, services)
                rows.append(row)
                print(
                    f"{name:8} @{level:3}: {row['completed']} streams, TTFT p50/p99 "
                    f"{row['ttft_p50_ms']} / {row['ttft_p99_ms']} ms, gap p50/p99 "
                    f"{row['gap_p50_ms']} / {row['gap_p99_ms']} ms, "
                    f"{row['tokens_per_s_per_stream_p50']} tokens/s per stream, "
                    f"errors {row['error_count']}",
                    flush=True,
                )
    finally:
        for service in reversed(services.values()):
            service.stop()
        if not args.model:
            model.unlink()  # 210 MB, written again in 2 s
    add_ratios(rows)
    table = markdown(rows)
    failed = failed_rows(rows)
    if failed:
        table += f"\n\nFAILED: errors or no completed stream in {', '.join(failed)}"
    print()
    print(table)
    report = {
        "command": " ".join(["bench/llm_bench.py", *(argv or sys.argv[1:])]),
        "started_utc": stamp,
        "machine": info,
        "model": str(model) if args.model else "generated paced (seed 7)",
        "engine": {"threads": args.threads, "parallel": args.parallel},
        "load": {
            "tokens": args.tokens,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "prompt": PROMPT,
        },
        "client_key": args.client_key,
        "rows": rows,
    }
    out = RESULTS_DIR / f"llm-bench-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    (run_dir / "table.md").write_text(table + "\n")
    print(f"\nJSON: {out.relative_to(REPO)}; process logs: {run_dir.relative_to(REPO)}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
