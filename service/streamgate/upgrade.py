"""In-place code upgrade of the gateway under systemd, no stream lost: gunicorn's USR2 re-exec.

    python -m streamgate.upgrade --ready-url http://ADDRESS:PORT/readyz [--unit streamgate.service]
                                 [--timeout 60]

(`streamgate-upgrade` is the same, as a console script of the wheel.) Install the new wheel into
the venv first, then run this as root on the host; it

1. reads the unit's main process (the gunicorn master) from systemd and checks that /readyz
   answers 200 (the URL of the gateway itself, not of nginx);
2. sends the master USR2: gunicorn forks and executes a new master from the same command line, a
   fresh interpreter that imports the code now in the venv, whose workers bind their own
   SO_REUSEPORT listeners on the same port next to the old workers';
3. waits, at most --timeout seconds, until the new generation serves: systemd names the new
   master the unit's MainPID (its workers tell systemd once their server has started, see
   post_worker_init in gunicorn_conf.py; the unit needs NotifyAccess=all), it has live workers
   that stayed the same for a second, and /readyz answers 200;
4. sends TERM to the old master: it stops accepting and drains its open streams (up to
   graceful_timeout) while the new master serves. The command does not wait for that.

Exit status:
  0  upgraded: the new master is the unit's main process, the old one is draining.
  1  failed, rolled back: the old master still serves and is still the main process (the new
     master never appeared, exited while starting, or systemd never took it as the main process:
     it was sent TERM). The journal of the unit says why.
  2  nothing done: the unit is not running, /readyz is not 200, an earlier upgrade is not
     finished (its old master still drains), or no permission to inspect the processes.
  3  half-way, needs a person: systemd already names the new master the main process, but it
     did not serve in time or died; both generations may be running. `systemctl status` shows
     them; the old master is the new one's parent.
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
from collections.abc import Callable, Sequence
from pathlib import Path

UPGRADED, ROLLED_BACK, NOTHING_DONE, HALF_WAY = 0, 1, 2, 3
POLL_S = 0.2
# The new master's workers are all forked within about 0.1 s each of one another; a second with
# the same live workers means none is failing to start (gunicorn halts the master when one does).
STABLE_S = 1.0


class Abort(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- processes, from /proc (the wheel has no psutil) -------------------------------------------
def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def parent(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[0]


def children(pid: int) -> list[int]:
    """Live (not zombie) children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] == pid and stat[1] not in ("Z", "X"):
                found.append(int(entry))
    return sorted(found)


def started_by_usr2_of(pid: int) -> int | None:
    """The master whose USR2 started `pid` (GUNICORN_PID in the environment it was executed
    with: gunicorn sets it for the new master only), None for any other process."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for item in raw.split(b"\0"):
        if item.startswith(b"GUNICORN_PID="):
            value = item.partition(b"=")[2]
            return int(value) if value.isdigit() else None
    return None


def new_master_of(old: int) -> int | None:
    """The child of the old master that its USR2 started (its other children are workers)."""
    for child in children(old):
        if started_by_usr2_of(child) == old:
            return child
    return None


# -- systemd and the gateway -------------------------------------------------------------------
def main_pid(unit: str) -> int:
    """systemd's MainPID of the unit (0 when it is not running)."""
    result = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "--value", unit],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        raise Abort(NOTHING_DONE, f"systemctl show {unit} failed: {result.stderr.strip()}")
    value = result.stdout.strip()
    return int(value) if value.isdigit() else 0


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors
        return False


# -- the upgrade -------------------------------------------------------------------------------
def check_before(unit: str, old: int, ready_url: str) -> None:
    if old <= 0 or not alive(old):
        raise Abort(NOTHING_DONE, f"{unit} is not running (no MainPID): nothing to upgrade")
    try:
        usr2_parent = started_by_usr2_of(old)
        earlier_new_master = new_master_of(old)
    except PermissionError:
        raise Abort(
            NOTHING_DONE, f"cannot read the environment of {unit}'s processes: run as root"
        ) from None
    if usr2_parent is not None and usr2_parent == parent(old) and alive(usr2_parent):
        raise Abort(
            NOTHING_DONE,
            f"the old master {usr2_parent} of an earlier upgrade still "
            f"drains its streams; gunicorn ignores USR2 until it exits",
        )
    if earlier_new_master is not None:
        raise Abort(
            NOTHING_DONE,
            f"a new master {earlier_new_master} of an earlier USR2 runs next "
            f"to the main process {old}: finish or stop that one first",
        )
    if not ready(ready_url):
        raise Abort(
            NOTHING_DONE,
            f"{ready_url} does not answer 200 before the upgrade: is it "
            "the gateway's own address and port?",
        )


def wait_for_new_generation(
    unit: str, old: int, ready_url: str, timeout_s: float, say: Callable[[str], None]
) -> int:
    """The new master's pid once it is the unit's main process and serves."""
    deadline = time.monotonic() + timeout_s
    new: int | None = None
    workers: list[int] = []
    stable_since = 0.0
    handed_over = False
    for _ in range(int(timeout_s / POLL_S) + 2):  # and bounded by the deadline
        if new is None:
            new = new_master_of(old)
            if new is not None:
                say(f"new master {new} started")
        elif not alive(new):
            if handed_over:
                raise Abort(
                    HALF_WAY,
                    f"the new master {new} died after systemd took it as "
                    f"{unit}'s main process: systemd stops the unit and "
                    "restarts it (Restart=on-failure); see its journal",
                )
            raise Abort(
                ROLLED_BACK,
                f"the new master {new} exited while starting (see the "
                f"journal of {unit}); the old master {old} still serves",
            )
        else:
            if not handed_over and main_pid(unit) == new:
                handed_over = True
                say(f"systemd names {new} the main process of {unit}")
            now_workers = children(new)
            if now_workers != workers:
                workers, stable_since = now_workers, time.monotonic()
            if (
                handed_over
                and workers
                and time.monotonic() - stable_since >= STABLE_S
                and ready(ready_url)
            ):
                say(f"new master {new} serves with workers {', '.join(map(str, workers))}")
                return new
        if not alive(old) and not handed_over:
            raise Abort(
                HALF_WAY,
                f"the old master {old} exited during the upgrade (stopped by "
                "someone else?); see `systemctl status "
                f"{unit}`",
            )
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    if new is None:
        raise Abort(
            ROLLED_BACK,
            f"no new master appeared within {timeout_s:.0f} s of USR2 (see "
            f"the journal of {unit}); the old master {old} still serves",
        )
    if handed_over:
        raise Abort(
            HALF_WAY,
            f"the new master {new} is {unit}'s main process but did not serve "
            f"within {timeout_s:.0f} s (live workers: {workers or 'none'}); "
            f"the old master {old} still serves too",
        )
    os.kill(new, signal.SIGTERM)  # still a child of the old one, not the main process: harmless
    reason = (
        "systemd never took it as the main process: does the unit have NotifyAccess=all?"
        if workers
        else "it started no worker"
    )
    raise Abort(
        ROLLED_BACK,
        f"the new master {new} did not take over within {timeout_s:.0f} s: "
        f"{reason}; it was sent TERM, the old master {old} still serves",
    )


def upgrade(unit: str, ready_url: str, timeout_s: float, say: Callable[[str], None] = print) -> int:
    old = main_pid(unit)
    check_before(unit, old, ready_url)
    say(f"USR2 to {unit}'s master {old}")
    os.kill(old, signal.SIGUSR2)
    new = wait_for_new_generation(unit, old, ready_url, timeout_s, say)
    os.kill(old, signal.SIGTERM)
    say(f"TERM to the old master {old}: it drains its open streams while {new} serves")
    return UPGRADED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamgate.upgrade",
        description="Upgrade the running gateway to the code now in its venv without losing a "
        "stream (gunicorn USR2, systemd MainPID handed over, then TERM to the old "
        "master). Exit 0 upgraded, 1 failed and rolled back, 2 nothing done, "
        "3 half-way (needs a person).",
    )
    parser.add_argument(
        "--ready-url",
        required=True,
        help="the gateway's own /readyz, e.g. http://10.0.0.5:8000/readyz",
    )
    parser.add_argument("--unit", default="streamgate.service", help="default: %(default)s")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds for the new generation to serve (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        return upgrade(
            args.unit, args.ready_url, args.timeout, say=lambda line: print(line, flush=True)
        )
    except Abort as exc:
        print(f"upgrade failed: {exc}", file=sys.stderr, flush=True)
        return exc.status
    except PermissionError as exc:
        print(f"upgrade failed: {exc}: run as root", file=sys.stderr, flush=True)
        return NOTHING_DONE


if __name__ == "__main__":
    sys.exit(main())
