"""systemd's side of a Type=notify unit, for a gunicorn master run without systemd.

`SystemdStandIn` binds a NOTIFY_SOCKET (a unix datagram socket; the sender's pid comes from
SCM_CREDENTIALS, as systemd reads it), records every notification, and keeps the unit's MainPID
as systemd does: MAINPID=<pid> is taken from any process with NotifyAccess=all, from the main
process only with NotifyAccess=main. Its `bin_dir` holds a `systemctl` that answers
`systemctl show -p MainPID --value UNIT` (what streamgate.upgrade asks) from that MainPID.
Not modelled: the control group (systemd takes notifications from the unit's processes only)
and what systemd does when the main process exits.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MAX_DATAGRAM = 4096


@dataclass(frozen=True)
class Notification:
    received: float  # time.monotonic()
    sender: int
    fields: dict[str, str]


class SystemdStandIn:
    def __init__(self, main_pid: int = 0, *, notify_access: str = "all") -> None:
        assert notify_access in ("all", "main"), notify_access
        self.notify_access = notify_access
        # A short path: unix socket paths are limited to 107 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="sg-systemd-"))
        self.socket_path = self.directory / "notify"
        self.bin_dir = self.directory / "bin"
        self._main_pid_file = self.directory / "MainPID"
        self.main_pid = main_pid
        self.notifications: list[Notification] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(self.socket_path))
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.settimeout(0.1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True, name="systemd-stand-in")
        self.bin_dir.mkdir()
        systemctl = self.bin_dir / "systemctl"
        systemctl.write_text(
            "#!/bin/sh\n"
            "# Only what streamgate.upgrade asks: systemctl show -p MainPID --value UNIT\n"
            'if [ "$1 $2 $3 $4" = "show -p MainPID --value" ]; then\n'
            f'    exec cat "{self._main_pid_file}"\n'
            "fi\n"
            'echo "systemctl stand-in: unsupported: $*" >&2\n'
            "exit 1\n"
        )
        systemctl.chmod(0o755)

    @property
    def main_pid(self) -> int:
        return int(self._main_pid_file.read_text())

    @main_pid.setter
    def main_pid(self, pid: int) -> None:
        staged = self._main_pid_file.with_suffix(".new")
        staged.write_text(f"{pid}\n")
        staged.replace(self._main_pid_file)  # systemctl never reads half a number

    def env(self) -> dict[str, str]:
        """For the unit's processes."""
        return {"NOTIFY_SOCKET": str(self.socket_path)}

    def command_env(self) -> dict[str, str]:
        """For a command that calls systemctl: os.environ with the stand-in first on PATH."""
        return {**os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def main_pid_announcements(self) -> list[Notification]:
        return [note for note in list(self.notifications) if "MAINPID" in note.fields]

    def start(self) -> SystemdStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _receive(self) -> None:
        # Bounded by stop() and by count (at most one datagram per 0.1 s timeout or faster).
        for _ in range(10_000_000):
            if self._stopping.is_set():
                return
            try:
                data, ancillary, _, _ = self._socket.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(struct.calcsize("iII"))
                )
            except TimeoutError:
                continue
            except OSError:
                return
            sender = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.notifications.append(Notification(time.monotonic(), sender, fields))
            allowed = self.notify_access == "all" or sender == self.main_pid
            if allowed and fields.get("MAINPID", "").isdigit():
                self.main_pid = int(fields["MAINPID"])
