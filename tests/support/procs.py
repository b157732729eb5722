"""The one process harness of the tests, the benchmark and the load tests' tools: free ports,
start with a log file, wait (bounded) until a URL answers, a port accepts or a line is logged,
stop by process group with TERM then KILL, and the log's tail in every failure message.

Stdlib only: loadtest/capacity.py imports it from its own process.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOG_TAIL_CHARS = 4000
# How a server says its port is taken (Python/nginx: EADDRINUSE's text; gunicorn its own).
PORT_TAKEN_MESSAGES = ("address already in use", "connection in use")


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_a_free_port(start: Callable[[int], T], *, attempts: int = 3) -> T:
    """start(port) on a fresh free port; again on another one if the port was taken meanwhile
    (another test run on this machine can grab it between free_port() and the bind)."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except ProcessFailed as exc:
            taken = any(mark in str(exc).lower() for mark in PORT_TAKEN_MESSAGES)
            if not taken or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def wait_until(
    condition: Callable[[], object], *, timeout_s: float, interval_s: float = 0.02, what: str
) -> object:
    """Poll `condition` until it returns something truthy; raise TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up after {timeout_s:.1f} s waiting for {what}")
        time.sleep(interval_s)


def accepts(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to host:port is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    """The status code of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class ProcessFailed(RuntimeError):
    pass


class ManagedProcess:
    """A child process in its own session (so its workers can be signalled with it), its output
    in a log file, stopped by its process-group id: SIGTERM, then SIGKILL after a bound.
    `nofile`: its open-files limit (soft and hard, as a systemd unit's LimitNOFILE gives it;
    above our hard limit only as root)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        nofile: int | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.nofile = nofile
        self.popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                # Only when asked: a preexec_fn is unsafe once the caller runs threads.
                preexec_fn=None if self.nofile is None else self._limit_open_files,
            )
        return self

    def _limit_open_files(self) -> None:
        """In the child, before exec."""
        assert self.nofile is not None
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        except (ValueError, OSError):  # not root: up to our hard limit only
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.nofile, hard), hard))

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def logs(self, tail_chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return text[-tail_chars:]

    def describe(self) -> str:
        """For failure messages: what ran, how it ended, the end of its log."""
        state = "running" if self.is_running() else f"exited rc={self.popen and self.popen.poll()}"
        return f"{self.name} ({state}): {' '.join(self.argv)}\n--- log tail ---\n{self.logs()}"

    def wait_http(self, url: str, *, timeout_s: float = 20.0, ok=(200,)) -> None:
        """Wait until GET url answers with a status in `ok`."""
        self.wait_for(lambda: http_status(url) in ok, timeout_s=timeout_s, what=url)

    def wait_port(self, port: int, *, host: str = "127.0.0.1", timeout_s: float = 20.0) -> None:
        """Wait until host:port accepts a TCP connection."""
        self.wait_for(lambda: accepts(port, host), timeout_s=timeout_s, what=f"{host}:{port}")

    def wait_output(self, pattern: str, *, timeout_s: float = 20.0) -> re.Match:
        """Wait until a line of the log matches `pattern`; the first match."""
        compiled = re.compile(pattern, re.MULTILINE)
        return self.wait_for(
            lambda: compiled.search(self.logs(tail_chars=1 << 20)),
            timeout_s=timeout_s,
            what=f"a log line matching {pattern!r}",
        )

    def wait_for(self, condition: Callable[[], T], *, timeout_s: float, what: str) -> T:
        """Poll `condition` until it returns something truthy (returned); fail early if the
        process dies. On any failure (or interrupt) the process is stopped first: no caller
        keeps a process that never came up, and none leaks one. ProcessFailed carries the
        process's state and the tail of its log."""

        def ready() -> T:
            if not self.is_running():
                raise ProcessFailed(f"{self.name} exited while starting\n{self.describe()}")
            return condition()

        try:
            return wait_until(
                ready, timeout_s=timeout_s, interval_s=0.05, what=f"{self.name}: {what}"
            )
        except TimeoutError as exc:
            message = f"{exc}\n{self.describe()}"  # its state before we stop it
            self.stop()
            raise ProcessFailed(message) from None
        except BaseException:
            self.stop()
            raise

    def stop(self, *, term_timeout_s: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it if still alive after term_timeout_s."""
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self._signal_group(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=term_timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            return self.popen.wait(timeout=5.0)

    def _signal_group(self, signum: int) -> None:
        # Only while the leader is unreaped: its PID (the group id) cannot have been reused.
        try:
            os.killpg(self.pid, signum)  # the group id is the child's PID (start_new_session)
        except ProcessLookupError:
            pass
