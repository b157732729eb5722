"""The project's own processes for tests: the simulator and the gateway under real gunicorn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families
from streamgate.auth import hash_key

from support.procs import ManagedProcess, on_a_free_port

REPO = Path(__file__).resolve().parents[2]
# The gateway's gunicorn config as the unit names it (a module of the package), and its source
# file, for tests that run it with changes of their own.
GUNICORN_CONFIG = "python:streamgate.gunicorn_conf"
GUNICORN_CONF = Path(find_spec("streamgate.gunicorn_conf").origin)
APP = "streamgate.app:create_app()"
# A placeholder: the simulator takes any key, and a real-looking one must never leak into logs.
API_KEY_PLACEHOLDER = "sk-test-placeholder"

SIM_DEFAULTS = {"ttft_ms": 50, "gap_ms": 20, "jitter_ms": 0, "tokens": 50}


def clean_environ() -> dict[str, str]:
    """The parent's environment minus every setting that would leak into a test instance."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("STREAMGATE_", "OPENAI_"))
    }


def sample(scraped: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """One series of a Service.metrics() scrape. A series that is not there fails, naming the
    series of that name that are: a renamed or unregistered gauge must never read as 0."""
    key = (name, frozenset(labels.items()))
    if key not in scraped:
        present = sorted(str(dict(series)) for metric, series in scraped if metric == name)
        raise AssertionError(f"/metrics has no series {name} {labels}; of that name: {present}")
    return scraped[key]


@dataclass
class Service:
    name: str
    process: ManagedProcess
    port: int
    host: str = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def describe(self) -> str:
        return self.process.describe()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics, keyed by (name, labels), parsed by prometheus_client itself."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def worker_pids(self) -> list[int]:
        """The live worker processes of a gunicorn master (children not yet reaped excluded)."""
        workers = []
        for child in psutil.Process(self.process.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    workers.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return workers

    def connections_to(self, port: int) -> list[tuple[int, Any]]:
        """(worker pid, socket) for each TCP socket of this gateway's workers whose peer is
        127.0.0.1:`port` (e.g. the upstream's): established, and half-closed ones (CLOSE_WAIT:
        the peer closed, the worker never did)."""
        found = []
        for pid in self.worker_pids():
            try:
                sockets = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            found += [(pid, sock) for sock in sockets if sock.raddr and sock.raddr.port == port]
        return found

    def access_record(self, request_id: str) -> dict | None:
        """The gateway's access-log record of the request with this X-Request-ID, once written."""
        for line in self.process.log_path.read_text(errors="replace").splitlines():
            if line.startswith('{"event":"request"') and request_id in line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # being written right now: the next poll sees it
                    return None
                if record.get("request_id") == request_id:
                    return record
        return None

    def stop(self) -> None:
        self.process.stop()


@dataclass
class Simulator(Service):
    ttft_ms: float = 50
    gap_ms: float = 20
    tokens: int = 50

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/stats", timeout=5) as response:
            return json.load(response)

    def reset_stats(self) -> None:
        request = urllib.request.Request(f"{self.base_url}/stats/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()


def start_simulator(log_dir: Path, **options) -> Simulator:
    """streamgate-sim on a free loopback port; options are its flags (ttft_ms=..., stall_s=...)."""
    return on_a_free_port(lambda port: _start_simulator(log_dir, port, {**SIM_DEFAULTS, **options}))


def _start_simulator(log_dir: Path, port: int, settings: dict) -> Simulator:
    argv = [
        sys.executable,
        "-m",
        "streamgate.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for option, value in settings.items():
        argv += [f"--{option.replace('_', '-')}", str(value)]
    process = ManagedProcess(f"simulator-{port}", argv, log_dir=log_dir, env=clean_environ())
    process.start()
    simulator = Simulator(
        name="simulator",
        process=process,
        port=port,
        ttft_ms=settings["ttft_ms"],
        gap_ms=settings["gap_ms"],
        tokens=settings["tokens"],
    )
    process.wait_http(f"{simulator.base_url}/healthz", timeout_s=20)
    return simulator


def client_keys_env_line(**keys: str) -> str:
    """The gateway's env-file line that accepts these client keys (name=key), as hashes."""
    hashes = ",".join(f"{name}:{hash_key(key)}" for name, key in keys.items())
    return f"STREAMGATE_CLIENT_KEY_HASHES={hashes}\n"


def start_gateway(
    log_dir: Path,
    upstream: Simulator,
    *,
    workers: int = 2,
    gunicorn_conf: Path | str = GUNICORN_CONFIG,
    script: bool = False,
    port: int | None = None,
    **settings,
) -> Service:
    """The gateway as deployed: gunicorn -c python:streamgate.gunicorn_conf, uvicorn workers.

    `settings` are Settings fields (first_token_timeout_s=1 -> STREAMGATE_FIRST_TOKEN_TIMEOUT_S).
    script=True starts the venv's gunicorn script, as the unit does: a USR2 re-exec runs the
    master's argv again, and under `python -m gunicorn` that is gunicorn/__main__.py, whose
    directory then shadows the standard library's `http`. port: that one (a restart in place)
    instead of a free one.
    """
    if port is not None:
        return _start_gateway(log_dir, port, upstream, workers, gunicorn_conf, settings, script)
    return on_a_free_port(
        lambda free: _start_gateway(
            log_dir, free, upstream, workers, gunicorn_conf, settings, script
        )
    )


def _start_gateway(
    log_dir: Path,
    port: int,
    upstream: Simulator,
    workers: int,
    gunicorn_conf: Path | str,
    settings: dict,
    script: bool = False,
) -> Service:
    env = clean_environ()
    env.update(
        STREAMGATE_BIND=f"127.0.0.1:{port}",
        STREAMGATE_WORKERS=str(workers),
        STREAMGATE_UPSTREAM_BASE_URL=f"{upstream.base_url}/v1",
        STREAMGATE_UPSTREAM_API_KEY=API_KEY_PLACEHOLDER,
        STREAMGATE_LOG_LEVEL="info",
    )
    env.update({f"STREAMGATE_{name.upper()}": str(value) for name, value in settings.items()})
    launcher = [str(Path(sys.executable).with_name("gunicorn"))] if script else ["-m", "gunicorn"]
    argv = [sys.executable, *launcher, "-c", str(gunicorn_conf), APP]
    process = ManagedProcess(f"gateway-{port}", argv, log_dir=log_dir, env=env, cwd=REPO)
    process.start()
    gateway = Service(name="gateway", process=process, port=port)
    process.wait_http(f"{gateway.base_url}/readyz", timeout_s=30)
    return gateway


# ---------------------------------------------------- an upstream that is not the simulator

TEST_MODEL_TOOL = REPO / "tools" / "llm" / "make_test_model.py"


def make_test_model(directory: Path, size: str) -> Path:
    """The generated llama GGUF (tools/llm/make_test_model.py): `tiny` or `paced`."""
    model = directory / f"test-llama-{size}.gguf"
    if not model.exists():
        subprocess.run(
            [sys.executable, str(TEST_MODEL_TOOL), str(model), "--size", size],
            check=True,
            timeout=120,
            capture_output=True,
        )
    return model


def start_llama(log_dir: Path, model: Path, **options: int) -> Service:
    """llama.cpp's server as the llm role runs it (streamgate-llm-server, the xllamacpp wheel)
    on a free port; options are its own (parallel=4 -> --parallel 4)."""

    def start(port: int) -> Service:
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
        process = ManagedProcess(
            f"llama-{port}",
            [
                sys.executable,
                "-m",
                "streamgate.llm_server",
                "--model",
                str(model),
                "--port",
                str(port),
                *flags,
            ],
            log_dir=log_dir,
            env=clean_environ(),
        )
        process.start()
        process.wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60)
        return Service(name="llama", process=process, port=port)

    return on_a_free_port(start)
