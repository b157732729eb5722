"""Local processes under test: start on free loopback ports, wait until ready, read their CPU
time from /proc, stop them by PID."""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "tests"))
from support.procs import ManagedProcess, free_port  # noqa: F401 (free_port: for stream_bench)

VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (gunicorn workers, nginx workers), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _schedstat_sum(pid: int, field_index: int) -> int:
    """One field of /proc/<pid>/task/*/schedstat, summed over the process's threads."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
            total += int(fields[field_index])
        except (OSError, IndexError, ValueError):
            continue
    return total


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process's threads were runnable but waiting for a CPU (schedstat, field 2):
    how much a shared, busy machine held this process back."""
    return _schedstat_sum(pid, 1) / 1e9


def scheduled_runs(pid: int) -> int:
    """How many times the process's threads were put on a CPU (schedstat, field 3): each
    wake-up is at least one."""
    return _schedstat_sum(pid, 2)


def busy_cpu_seconds() -> float:
    """CPU time all processes on the machine used so far (every core, from /proc/stat): user,
    nice and system. Interrupt and softirq time are left out: on loopback most of it is the
    benchmark's own traffic, which the processes' own counters do not carry."""
    user, nice, system = (int(v) for v in Path("/proc/stat").read_text().split()[1:4])
    return (user + nice + system) / CLOCK_TICKS


TCP_STATES = {"01": "established", "06": "time_wait"}


def tcp_connections(port: int) -> dict[str, set[int]]:
    """Loopback TCP connections with one end on `port`, by state (ESTABLISHED, TIME_WAIT), each
    as the other end's port (on loopback both ends are listed; this counts the connection once),
    from /proc/net/tcp. A connection closed in a window shows as a TIME_WAIT that was not there
    before (it stays 60 s): how often a client's pool opened a new connection instead of
    reusing one."""
    found: dict[str, set[int]] = {state: set() for state in TCP_STATES.values()}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            state = TCP_STATES.get(fields[3])
            if state is None:
                continue
            local, remote = (int(end.rsplit(":", 1)[1], 16) for end in fields[1:3])
            if local == port:
                found[state].add(remote)
            elif remote == port:
                found[state].add(local)
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """Resident (Rss) and proportional (Pss: pages shared with N processes count 1/N) memory of one
    process, KiB, from /proc/PID/smaps_rollup; {} when it is gone. PSS is what a process costs:
    nginx workers share their master's pages, gunicorn workers theirs after the fork."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            found[name.lower()] = int(rest.split()[0])
    return found


def open_files(pid: int) -> tuple[int, int]:
    """(files open now, its soft RLIMIT_NOFILE) of one process; (0, 0) when it is gone."""
    try:
        count = len(os.listdir(f"/proc/{pid}/fd"))
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    except OSError:
        return 0, 0
    soft = next(line.split()[3] for line in limits if line.startswith("Max open files"))
    return count, int(soft) if soft.isdigit() else -1


def kernel_tcp() -> dict[str, int]:
    """The kernel's side of the sockets: TCP sockets in use and their buffer memory (KiB), from
    /proc/net/sockstat; the listen queues' overflows and drops so far (/proc/net/netstat: a
    backlog too short for the rate of new connections shows here, not as an error); the kernel's
    slab memory (/proc/meminfo; machine-wide, so other processes move it too)."""
    found = {}
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            values = dict(zip(fields[::2], (int(v) for v in fields[1::2]), strict=True))
            found["tcp_inuse"] = values["inuse"]
            found["tcp_mem_kib"] = values["mem"] * resource.getpagesize() // 1024
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:]), strict=True))
            found["listen_overflows"] = table.get("ListenOverflows", 0)
            found["listen_drops"] = table.get("ListenDrops", 0)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):  # socket structures live here, not in any process
            found["slab_kib"] = int(line.split()[1])
    return found


def http_json(port: int, path: str, timeout_s: float = 5.0, method: str = "GET") -> dict | None:
    """A small JSON answer on loopback (Connection: close); None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            parts = []
            for _ in range(1000):  # bounded: a /stats answer is a few KiB
                data = sock.recv(65536)
                if not data:
                    break
                parts.append(data)
    except OSError:
        return None
    head, _, body = b"".join(parts).partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


@dataclass
class Service:
    """One process tree we started (its master's PID is kept to read its CPU), by the tests'
    process harness (support/procs.py): log file, bounded wait until ready, stop by group."""

    name: str
    port: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/healthz"
    # Where readiness is polled (plain HTTP), when clients use another port (nginx's HTTPS).
    ready_port: int | None = None
    log_dir: Path = Path(".")
    # Open files (RLIMIT_NOFILE, soft and hard) to start it with, as its systemd unit's
    # LimitNOFILE gives it; None: inherit ours. Raising the hard limit needs root.
    # The benchmark starts its services before any thread of its own (the limit is set in the
    # child before exec).
    nofile: int | None = None
    process: ManagedProcess | None = None
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.process = ManagedProcess(
            self.name,
            self.command,
            log_dir=self.log_dir,
            env={**os.environ, **self.env},
            cwd=REPO,
            nofile=self.nofile,
        ).start()
        self.process.wait_http(
            f"http://127.0.0.1:{self.ready_port or self.port}{self.ready_path}",
            timeout_s=READY_TIMEOUT_S,
        )
        self.pids = [self.process.pid, *child_pids(self.process.pid)]

    def memory_kib(self) -> dict[str, int]:
        """Rss and Pss summed over the master and its workers (KiB)."""
        total = {"rss": 0, "pss": 0}
        for pid in self.refresh_pids():
            for name, value in memory_kib(pid).items():
                total[name] += value
        return total

    def refresh_pids(self) -> list[int]:
        """Master and current workers (a worker restarted under load has a new PID)."""
        if self.process is not None:
            known = set(self.pids)
            self.pids += [pid for pid in child_pids(self.process.pid) if pid not in known]
        return self.pids

    def cpu_by_pid(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) for pid in self.refresh_pids()}

    def runqueue_wait(self) -> float:
        return sum(runqueue_wait_seconds(pid) for pid in self.refresh_pids())

    def scheduled_runs(self) -> int:
        return sum(scheduled_runs(pid) for pid in self.refresh_pids())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(term_timeout_s=STOP_TIMEOUT_S)
            self.process = None


def render_nginx(
    run_dir: Path,
    listen_port: int,
    upstream_port: int,
    *,
    buffering_fault: bool = False,
    worker_processes: str | None = None,
    name: str | None = None,
    tls_port: int | None = None,
    pki=None,
    overrides: dict | None = None,
) -> Path:
    """Render nginx/*.j2 with the role defaults, the same way the wire tests do (their helper),
    overriding only root-only paths and the loopback addresses. Worker count stays the role's
    default ("auto"), as deployed. `name` is its directory under `run_dir` (one per nginx in a
    run). `buffering_fault` applies the wire tests' negative control
    (buffering on, X-Accel-Buffering ignored) so the reads-per-response figure is seen to fail.
    `tls_port` and `pki` (support.tls) render the HTTPS edge (nginx_tls) on `tls_port`.
    `overrides`: role variables set last (e.g. a limit put back to an old value, to show it bind).

    The per-client limits are lifted (the wire tests' LIFTED_LIMITS): the benchmark is hundreds
    of streams from one address with one key, which the role's limits exist to refuse. Their
    directives stay in the config, so their cost per request is in the figures."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.nginx import (
        LIFTED_LIMITS,
        MIME_TYPES,
        break_buffering,
        local_variables,
        render,
    )

    nginx_dir = run_dir / (name or ("nginx-buffered" if buffering_fault else "nginx"))
    (nginx_dir / "temp").mkdir(parents=True, exist_ok=True)
    for path in (run_dir, nginx_dir, nginx_dir / "temp"):
        path.chmod(0o755)  # nginx workers run as nobody when started by root
    (nginx_dir / "mime.types").write_text(MIME_TYPES)
    variables = (
        local_variables(
            nginx_dir,
            listen=f"127.0.0.1:{listen_port}",
            listen_tls=f"127.0.0.1:{tls_port}" if tls_port else None,
            upstream_servers=[f"127.0.0.1:{upstream_port}"],
            pki=pki,
        )
        | LIFTED_LIMITS
    )
    if worker_processes:
        variables["nginx_worker_processes"] = worker_processes
    variables.update(overrides or {})
    rendered = render(variables)
    if buffering_fault:
        rendered["streamgate.conf"] = break_buffering(rendered["streamgate.conf"])
    (nginx_dir / "streamgate.conf").write_text(rendered["streamgate.conf"])
    main = nginx_dir / "nginx.conf"
    main.write_text(rendered["nginx.conf"])
    return main
