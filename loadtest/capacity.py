#!/usr/bin/env python3
"""How many streams can one Locust process drive before it distorts what it measures?

Starts the simulator on loopback (fixed timing: --ttft-ms 50 --gap-ms 20, no jitter), then runs
loadtest/run.py against it with rising user counts. The simulator's gaps are exact, so any
inflation of the measured inter-token gap, or reads merging ("buffered"), is the generator's (or
the host's) doing. Per step: generator CPU (all Locust processes), simulator CPU, measured gap
p50/p99, TTFT p95, buffered ratio.

    loadtest/capacity.py --users 50,100,200,400 --run-time 15s
    loadtest/capacity.py --users 400 --processes 2      # the same load over two workers
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

# The simulator as the tests start it (tests/support/services.py: one launcher).
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from support import services

HERE = Path(__file__).resolve().parent
SIM_GAP_MS = 20.0
SIM_TOKENS = 50
# A step is "clean" while the measured gap stays near the simulator's and no read merges
# (neither judged buffered nor excused as the generator's own lag).
CLEAN_ITL_P99_MS = SIM_GAP_MS + 10
CLEAN_BUFFERED_RATIO = 0.0


class CpuSampler(threading.Thread):
    """Mean CPU % (100 = one core) of a process tree, sampled once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.samples: list[float] = []
        self.first_wait_ns: dict[int, int] = {}
        self.waited_ns: dict[int, int] = {}
        self.stopping = threading.Event()

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def run(self) -> None:
        known: dict[int, psutil.Process] = {}
        while not self.stopping.wait(1.0):
            total = 0.0
            for process in self.tree():
                tracked = known.setdefault(process.pid, process)
                try:
                    total += tracked.cpu_percent(None)
                except psutil.NoSuchProcess:
                    continue
                self.note_run_queue_wait(process.pid)
            self.samples.append(total)

    def note_run_queue_wait(self, pid: int) -> None:
        """Linux schedstat: ns spent runnable but waiting for a CPU (a busy host's share)."""
        try:
            with open(f"/proc/{pid}/schedstat") as stat:
                waited_ns = int(stat.read().split()[1])
        except (OSError, IndexError, ValueError):
            return
        first = self.first_wait_ns.setdefault(pid, waited_ns)
        self.waited_ns[pid] = waited_ns - first

    def run_queue_wait_pct(self, seconds: float) -> float:
        """Summed over the tree, as % of one CPU for `seconds` of wall time."""
        return sum(self.waited_ns.values()) / 1e9 / seconds * 100 if seconds else 0.0

    def mean(self, skip_first: int = 3) -> float:
        steady = self.samples[skip_first:-3] or self.samples  # the end: Locust stops, run.py plots
        return sum(steady) / len(steady) if steady else 0.0


def itl_percentiles(report: Path) -> tuple[float, float]:
    """Gap p50/p99 over every route, from Locust's stats CSV."""
    with (report / "stats_stats.csv").open(newline="") as source:
        rows = [row for row in csv.DictReader(source) if row["Type"] == "itl_ms"]
    if not rows:
        return float("nan"), float("nan")
    weights = [int(row["Request Count"]) for row in rows]

    def weighted(column: str) -> float:
        return sum(float(r[column]) * w for r, w in zip(rows, weights, strict=True)) / sum(weights)

    return weighted("50%"), weighted("99%")


def loop_lag_p99(report: Path) -> float | None:
    """The generator's own worst event-loop lag per half second, 99th percentile (all workers)."""
    with (report / "stats_stats.csv").open(newline="") as source:
        for row in csv.DictReader(source):
            if row["Type"] == "generator_loop_lag_ms":
                return float(row["99%"])
    return None


def run_seconds(run_time: str) -> float:
    """Locust's --run-time ("15s", "2m") in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return float(run_time[:-1]) * units[run_time[-1]] if run_time[-1] in units else float(run_time)


def run_step(target: str, users: int, args, reports: Path, sim: psutil.Process) -> dict:
    command = [
        sys.executable,
        str(HERE / "run.py"),
        "--target",
        target,
        "--routes",
        "openai",
        "--users",
        str(users),
        "--spawn-rate",
        str(max(users / 5, 1)),
        "--run-time",
        args.run_time,
        "--reports-dir",
        str(reports / "runs"),
        "--processes",
        str(args.processes),
    ]
    sim.cpu_percent(None)
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = CpuSampler(runner.pid)
    sampler.start()
    started = time.monotonic()
    output, _ = runner.communicate(timeout=600)
    sampler.stopping.set()
    wall_s = time.monotonic() - started
    sim_cpu = sim.cpu_percent(None)
    report = max((reports / "runs").iterdir())  # run.py names its folders by time
    gates = {g["name"]: g for g in json.loads((report / "gates.json").read_text())["gates"]}
    p50, p99 = itl_percentiles(report)
    responses = json.loads((report / "gates.json").read_text())["responses"]
    chunks_per_s = responses * SIM_TOKENS / run_seconds(args.run_time)
    return {
        "users": users,
        "processes": args.processes or 1,
        "exit": runner.returncode,
        "generator_cpu_pct": round(sampler.mean(), 1),
        "sim_cpu_pct": round(sim_cpu, 1),
        "generator_cpu_wait_pct": round(sampler.run_queue_wait_pct(wall_s), 1),
        "itl_p50_ms": p50,
        "itl_p99_ms": p99,
        "ttft_p95_ms": gates["ttft_p95"]["value"],
        "buffered_ratio": gates["buffered_ratio"]["value"],
        "generator_lagged": gates["generator_lagged"]["value"],
        "loop_lag_p99_ms": loop_lag_p99(report),
        "responses": responses,
        "chunks_per_s": round(chunks_per_s),
        # CPU cost of measuring one chunk: what a quiet core's capacity follows from
        "cpu_us_per_chunk": round(sampler.mean() / 100 * 1e6 / chunks_per_s, 1)
        if chunks_per_s
        else None,
        "report": str(report),
        "tail": output[-300:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default="50,100,200,400", help="comma-separated steps")
    parser.add_argument("--run-time", default="15s")
    parser.add_argument("--processes", type=int, default=0, help="Locust workers (0: one process)")
    parser.add_argument("--reports-dir", type=Path, default=HERE / "reports" / "capacity")
    args = parser.parse_args()
    args.reports_dir.mkdir(parents=True, exist_ok=True)
    simulator = services.start_simulator(
        args.reports_dir, ttft_ms=50, gap_ms=SIM_GAP_MS, jitter_ms=0, tokens=SIM_TOKENS
    )
    target = simulator.base_url
    results = []
    try:
        sim = psutil.Process(simulator.process.pid)
        for users in (int(step) for step in args.users.split(",")):
            result = run_step(target, users, args, args.reports_dir, sim)
            results.append(result)
            clean = (
                result["itl_p99_ms"] <= CLEAN_ITL_P99_MS
                and (result["buffered_ratio"] or 0) <= CLEAN_BUFFERED_RATIO
                and (result["generator_lagged"] or 0) <= CLEAN_BUFFERED_RATIO
            )
            result["clean"] = clean
            print(
                f"users {users:5d} x{result['processes']}  generator CPU "
                f"{result['generator_cpu_pct']:6.1f}% (waited for a CPU "
                f"{result['generator_cpu_wait_pct']:5.1f}%)  "
                f"sim CPU {result['sim_cpu_pct']:6.1f}%  "
                f"gap p50 {result['itl_p50_ms']:6.1f} p99 {result['itl_p99_ms']:6.1f} ms  "
                f"TTFT p95 {result['ttft_p95_ms']} ms  buffered {result['buffered_ratio']}  "
                f"generator lagged {result['generator_lagged']}  "
                f"loop lag p99 {result['loop_lag_p99_ms']} ms  "
                f"{result['chunks_per_s']} chunks/s  {result['cpu_us_per_chunk']} us/chunk  "
                f"{'clean' if clean else 'DISTORTED'}",
                flush=True,
            )
            time.sleep(2)  # let sockets from the last step close
    finally:
        simulator.stop()
    summary = args.reports_dir / f"capacity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    summary.write_text(json.dumps(results, indent=2))
    print(f"results in {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
