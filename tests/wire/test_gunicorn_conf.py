"""The gunicorn config ships in the wheel (streamgate/gunicorn_conf.py), and hosts run it as
`gunicorn --config python:streamgate.gunicorn_conf`:

- a wheel built as the play builds it and installed into a venv outside the checkout runs the
  gateway from that venv alone (no service/ directory, no source on the path), and streams;
- gunicorn imports a `python:` config once per process, yet a HUP still applies the env file's
  gunicorn settings (here the worker count), as it did when the config was a file gunicorn ran
  again on each reload.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest
from streamgate.simulator.script import expected_text
from support import services
from support.procs import ManagedProcess, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
CONFIG = "python:streamgate.gunicorn_conf"
APP = "streamgate.app:create_app()"


def start_gunicorn(python: Path, log_dir: Path, cwd: Path, **environ: str) -> services.Service:
    """gunicorn from `python`'s environment with the packaged config, as the unit starts it."""
    port = free_port()
    env = services.clean_environ() | {"STREAMGATE_BIND": f"127.0.0.1:{port}", **environ}
    env.pop("PYTHONPATH", None)
    argv = [str(python), "-m", "gunicorn", "--config", CONFIG, APP]
    process = ManagedProcess(f"gateway-{port}", argv, log_dir=log_dir, env=env, cwd=cwd)
    process.start()
    process.wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s=30)
    return services.Service(name="gateway", process=process, port=port)


def streamed_text(gateway: services.Service, tokens: int) -> str:
    request = urllib.request.Request(
        f"{gateway.base_url}/v1/chat/stream",
        data=json.dumps({"prompt": "hi", "max_tokens": tokens}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def build_wheel(directory: Path) -> Path:
    """The wheel from a scratch copy of service/, as the streamgate_package role builds it."""
    source = directory / "src"
    shutil.copytree(
        REPO / "service",
        source,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(directory / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (directory / "dist").glob("streamgate-*.whl")
    return wheel


def venv_with_wheel(directory: Path, wheel: Path) -> Path:
    """A new venv holding the wheel; its dependencies are borrowed from this venv (a path
    entry, so this venv's editable link to the checkout is not followed), to stay offline."""
    venv = directory / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


@pytest.mark.timeout(120)
def test_an_installed_wheel_runs_the_gateway_without_the_checkout(simulator, tmp_path):
    python = venv_with_wheel(tmp_path, build_wheel(tmp_path))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print(u.find_spec('streamgate.gunicorn_conf').origin)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=outside,
        env=services.clean_environ(),
    ).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where
    gateway = start_gunicorn(
        python,
        tmp_path / "logs",
        outside,
        STREAMGATE_WORKERS="1",
        STREAMGATE_UPSTREAM_BASE_URL=f"{simulator.base_url}/v1",
        STREAMGATE_UPSTREAM_API_KEY=services.API_KEY_PLACEHOLDER,
    )
    try:
        assert streamed_text(gateway, 20) == expected_text(20)
    finally:
        gateway.process.stop()


def test_a_hup_applies_the_env_files_worker_count(simulator, tmp_path):
    env_file = tmp_path / "streamgate.env"
    env_file.write_text("STREAMGATE_WORKERS=1\n")
    gateway = start_gunicorn(
        Path(sys.executable),
        tmp_path / "logs",
        REPO,
        STREAMGATE_ENV_FILE=str(env_file),
        STREAMGATE_UPSTREAM_BASE_URL=f"{simulator.base_url}/v1",
        STREAMGATE_UPSTREAM_API_KEY=services.API_KEY_PLACEHOLDER,
    )
    try:
        wait_until(lambda: len(gateway.worker_pids()) == 1, timeout_s=10, what="one worker")
        for workers in (3, 2):
            env_file.write_text(f"STREAMGATE_WORKERS={workers}\n")
            os.kill(gateway.process.pid, signal.SIGHUP)
            wait_until(
                lambda n=workers: len(gateway.worker_pids()) == n,
                timeout_s=15,
                interval_s=0.1,
                what=f"{workers} workers after the HUP",
            )
        assert streamed_text(gateway, 5) == expected_text(5)
    finally:
        gateway.process.stop()
