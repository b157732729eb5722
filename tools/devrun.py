"""`make run`: the simulator and the gateway (gunicorn, 2 workers) on loopback, no root.

    .venv/bin/python tools/devrun.py --gateway-port 8000 --sim-port 8100

When OPENAI_API_KEY or OPENAI_BASE_URL is set, the gateway streams from that upstream (OpenAI,
vLLM, Ollama...) and no simulator starts. Ctrl-C stops the children, by PID. A developer's
tool, so it is not in the wheel; the children's output stays on the terminal (the tests' process
harness, tests/support/procs.py, writes it to files instead).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0


def _wait_ready(url: str, process: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with code {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{name} not ready at {url} after {READY_TIMEOUT_S:.0f} s")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--sim-port", type=int, default=8100)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        STREAMGATE_BIND=f"{args.host}:{args.gateway_port}", STREAMGATE_WORKERS=str(args.workers)
    )
    external = bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"))
    processes: list[subprocess.Popen] = []
    try:
        if external:
            upstream = os.environ.get("OPENAI_BASE_URL") or "OpenAI (https://api.openai.com/v1)"
            print(f"upstream: {upstream} (from OPENAI_* variables; no simulator)")
        else:
            simulator = subprocess.Popen(
                [
                    str(bin_dir / "streamgate-sim"),
                    "--host",
                    args.host,
                    "--port",
                    str(args.sim_port),
                ],
                env=env,
            )
            processes.append(simulator)
            _wait_ready(f"http://{args.host}:{args.sim_port}/healthz", simulator, "simulator")
            env["STREAMGATE_UPSTREAM_BASE_URL"] = f"http://{args.host}:{args.sim_port}/v1"
            print(f"simulator: http://{args.host}:{args.sim_port} (pid {simulator.pid})")
        gateway = subprocess.Popen(
            [str(bin_dir / "gunicorn"), "-c", "python:streamgate.gunicorn_conf"],
            env=env,
            cwd=REPO,
        )
        processes.append(gateway)
        base = f"http://{args.host}:{args.gateway_port}"
        _wait_ready(f"{base}/readyz", gateway, "gateway")
        print(f"gateway:   {base} (gunicorn pid {gateway.pid}, {args.workers} workers)\n")
        print("Try (word by word; -N turns off curl's own buffering):")
        print(
            f"  curl -N {base}/v1/chat/stream -H 'Content-Type: application/json' "
            '-d \'{"prompt": "Tell me a story", "max_tokens": 60}\'\n'
        )
        print("Ctrl-C stops everything.", flush=True)
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        failed = next(process for process in processes if process.poll() is not None)
        print(
            f"a child exited (pid {failed.pid}, code {failed.returncode}); stopping",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(processes)


if __name__ == "__main__":
    sys.exit(main())
