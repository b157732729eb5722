"""Short headless Locust runs through real local processes (loadtest/run.py, as `make loadtest`).

One run through the whole chain must pass every gate; each negative control must fail its own
gate: nginx with buffering on -> buffered_ratio, a simulator stalling mid-stream -> itl_p99,
a simulator dropping a token -> corrupt_ratio. The same with an upstream that is not the
simulator (--upstream-kind openai-compatible: no text compared): llama.cpp's server on a
generated model passes every gate through the chain, and buffering nginx still fails
buffered_ratio. Tens of users, seconds each, every run bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from streamgate.simulator.faults import FAULT_MODEL_PREFIX
from support import services

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "loadtest" / "run.py"
ALL_ROUTES = "text,sse,openai"
# Bound on a whole run: run time + spawn + stop-timeout + plotting, with room for a busy host.
RUN_BOUND_S = 120
ANY_UPSTREAM = ["--upstream-kind", "openai-compatible"]

pytestmark = pytest.mark.timeout(240)


@dataclass
class LoadResult:
    exit_code: int
    responses: int
    gates: dict[str, dict]
    output: str
    report: Path

    def failed_gates(self) -> set[str]:
        return {name for name, gate in self.gates.items() if not gate["passed"]}

    def explain(self) -> str:
        return f"exit {self.exit_code}, {self.responses} responses\n{self.output[-4000:]}"


def run_load(
    target: str,
    tmp_path: Path,
    *,
    users=20,
    run_time="8s",
    routes="openai",
    extra=(),
    env=None,
    during=None,
) -> LoadResult:
    """run.py to the end; `during(popen)` runs meanwhile (to disturb the generator)."""
    command = [
        sys.executable,
        str(RUN),
        "--target",
        target,
        "--routes",
        routes,
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        run_time,
        "--reports-dir",
        str(tmp_path),
        *extra,
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as runner:
        try:
            if during is not None:
                during(runner)
            output, _ = runner.communicate(timeout=RUN_BOUND_S)
        finally:
            if runner.poll() is None:
                runner.kill()
    reports = sorted(tmp_path.iterdir())
    assert reports, f"run.py made no report folder\n{output}"
    gates_file = reports[-1] / "gates.json"
    assert gates_file.exists(), f"no gates.json\n{output}"
    summary = json.loads(gates_file.read_text())
    return LoadResult(
        exit_code=runner.returncode,
        responses=summary["responses"],
        gates={gate["name"]: gate for gate in summary["gates"]},
        output=output,
        report=reports[-1],
    )


def run_passing(target: str, tmp_path: Path, **options) -> LoadResult:
    """A run that must pass: exit 0 and every gate passed."""
    result = run_load(target, tmp_path, **options)
    assert result.exit_code == 0, result.explain()
    assert result.failed_gates() == set(), result.explain()
    return result


def run_failing(target: str, tmp_path: Path, gate: str, **options) -> LoadResult:
    """A run that must fail, with `gate` among the gates it failed."""
    result = run_load(target, tmp_path, **options)
    assert result.exit_code != 0, result.explain()
    assert gate in result.failed_gates(), result.explain()
    return result


def run_with_fault(target: str, tmp_path: Path, gate: str, fault: str, **options) -> LoadResult:
    """A run whose every request asks the simulator for `fault` (its model sim-fault-<fault>):
    it must fail `gate`."""
    return run_failing(
        target, tmp_path, gate, extra=["--model", FAULT_MODEL_PREFIX + fault], **options
    )


def assert_buffering_is_caught(buffering_proxy, tmp_path: Path, **options) -> None:
    """A run through nginx with buffering on fails buffered_ratio, most responses merged, while
    the text still arrives whole: the verdict is about timing, not content."""
    result = run_failing(
        buffering_proxy.base_url, tmp_path, "buffered_ratio", run_time="6s", **options
    )
    assert result.gates["buffered_ratio"]["value"] > 0.5, result.explain()
    assert result.gates["corrupt_ratio"]["passed"], result.explain()


@pytest.fixture(scope="module")
def chain(simulator_factory, gateway_factory, nginx_factory):
    """(nginx in front of the gateway, routes to load), or nginx in front of the simulator
    alone (OpenAI route only) while the gateway is not in the tree yet."""
    simulator = simulator_factory()
    try:
        upstream = gateway_factory(simulator, workers=2)
        routes = ALL_ROUTES
    except FileNotFoundError:
        upstream, routes = simulator, "openai"
    return nginx_factory(upstream), routes


def test_run_through_the_chain_passes_every_gate(chain, tmp_path):
    proxy, routes = chain
    result = run_passing(proxy.base_url, tmp_path, users=30, run_time="10s", routes=routes)
    assert result.responses >= 30, result.explain()
    for artifact in ("report.html", "stats_stats.csv", "stats_stats_history.csv", "latency.png"):
        assert (result.report / artifact).stat().st_size > 0, artifact
    assert "gate itl_p99" in result.output and "PASS" in result.output
    stats = (result.report / "stats_stats.csv").read_text()
    for route in routes.split(","):
        path = {
            "text": "/v1/chat/stream",
            "sse": "/v1/chat/stream-sse",
            "openai": "/v1/chat/completions",
        }[route]
        for metric in ("POST", "ttft_ms", "itl_ms", "tokens_per_s", "buffered", "corrupt"):
            assert f"{metric},{path}," in stats, (metric, path)
    assert "itl_ms" in (result.report / "report.html").read_text()  # Locust's report carries it


def test_nginx_with_buffering_on_fails_buffered(simulator_factory, nginx_factory, tmp_path):
    buffering_proxy = nginx_factory(simulator_factory(), buffering_fault=True)
    assert_buffering_is_caught(buffering_proxy, tmp_path, users=10)


def test_simulator_stalling_midstream_fails_the_gap_gate(simulator_factory, tmp_path):
    stalling = simulator_factory(stall_s=2)
    result = run_with_fault(
        stalling.base_url, tmp_path, "itl_p99", "stall-midstream", users=10, run_time="8s"
    )
    assert result.gates["itl_p99"]["value"] >= 1500, result.explain()
    # the stream resumes after the stall: complete and in order, only late
    assert {"corrupt_ratio", "failure_ratio"}.isdisjoint(result.failed_gates()), result.explain()


def test_simulator_dropping_a_token_fails_corrupt(simulator, tmp_path):
    result = run_with_fault(
        simulator.base_url, tmp_path, "corrupt_ratio", "drop-token", users=10, run_time="5s"
    )
    assert result.gates["corrupt_ratio"]["value"] == 1, result.explain()
    assert result.gates["failure_ratio"]["passed"], result.explain()  # complete, only wrong


def test_errors_fail_the_failure_gate(simulator, tmp_path):
    result = run_with_fault(
        simulator.base_url, tmp_path, "failure_ratio", "error-midstream", users=5, run_time="4s"
    )
    assert "in-band error event" in (result.report / "stats_failures.csv").read_text()


def test_limits_come_from_env_and_command_line_wins(simulator, tmp_path):
    env = {**services.clean_environ(), "STREAMGATE_LOAD_SLO_TTFT_P95_MS": "1"}
    from_env = run_load(simulator.base_url, tmp_path / "env", users=5, run_time="3s", env=env)
    assert from_env.failed_gates() == {"ttft_p95"}, from_env.explain()
    assert from_env.gates["ttft_p95"]["limit"] == 1
    overridden = run_load(
        simulator.base_url,
        tmp_path / "cli",
        users=5,
        run_time="3s",
        env=env,
        extra=["--slo-ttft-p95-ms", "5000"],
    )
    assert overridden.exit_code == 0, overridden.explain()
    assert overridden.gates["ttft_p95"]["limit"] == 5000


def test_distributed_mode_master_judges_the_workers_streams(simulator, tmp_path):
    result = run_load(
        simulator.base_url, tmp_path, users=20, run_time="8s", extra=["--processes", "2"]
    )
    assert result.exit_code == 0, result.explain()
    assert result.responses >= 20, result.explain()
    # The master spread the users over both worker processes (Locust's own log line).
    assert "to 2 ready workers" in (result.report / "locust.log").read_text(), result.explain()


def stall_the_generator(runner: subprocess.Popen, *, stalls=12, stall_s=0.3, between_s=0.3):
    """SIGSTOP/SIGCONT the Locust process run.py started: a host that does not run the generator."""
    run_py = psutil.Process(runner.pid)
    deadline = time.monotonic() + 20
    while not run_py.children() and time.monotonic() < deadline:
        time.sleep(0.1)
    locust = run_py.children()[0]
    time.sleep(2)  # streams under way
    for _ in range(stalls):
        os.kill(locust.pid, signal.SIGSTOP)
        try:
            time.sleep(stall_s)
        finally:
            os.kill(locust.pid, signal.SIGCONT)
        time.sleep(between_s)


def test_a_stalled_generator_fails_validity_not_the_target(simulator, tmp_path):
    result = run_failing(
        simulator.base_url,
        tmp_path,
        "generator_lagged",
        users=10,
        run_time="10s",
        during=stall_the_generator,
    )
    # the merged reads are the generator's: not blamed on the (healthy) simulator
    assert result.gates["buffered_ratio"]["passed"], result.explain()


# ------------------------------------------------------- an upstream that is not the simulator


@pytest.fixture(scope="module")
def llama_server(llama_factory) -> services.Service:
    """llama.cpp's server (streamgate-llm-server) on the generated paced model, on loopback."""
    return llama_factory("paced")


def test_run_through_the_chain_from_llama_cpp_passes_every_gate(
    llama_server, gateway_factory, nginx_factory, tmp_path
):
    proxy = nginx_factory(gateway_factory(llama_server, workers=2))
    result = run_passing(
        proxy.base_url, tmp_path, users=6, run_time="10s", routes=ALL_ROUTES, extra=ANY_UPSTREAM
    )
    assert result.responses >= 30, result.explain()
    assert result.gates["corrupt_ratio"]["value"] == 0, result.explain()  # judged: protocol


def test_any_upstream_nginx_with_buffering_on_fails_buffered(
    llama_server, gateway_factory, nginx_factory, tmp_path
):
    buffering_proxy = nginx_factory(gateway_factory(llama_server, workers=2), buffering_fault=True)
    assert_buffering_is_caught(buffering_proxy, tmp_path, users=8, extra=ANY_UPSTREAM)
