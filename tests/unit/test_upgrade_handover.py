"""The gunicorn config's part of an in-place upgrade, in-process; and the upgrade command's
refusals.

- post_worker_init: in a worker of a master started by USR2 (GUNICORN_PID set), the first
  heartbeat (uvicorn calls it right after its server started) sends systemd "MAINPID=<the
  worker's master>\\nREADY=1" on NOTIFY_SOCKET, once; the heartbeat itself still runs each time.
  A worker of any other master leaves the heartbeat alone and sends nothing.
- A master started by USR2 with reuse_port gets GUNICORN_FD="" from the old one; the config turns
  it into a number gunicorn can parse (and then ignores).
- streamgate.upgrade does nothing, exit 2, when the unit is not running or /readyz does not
  answer 200.
The wire test (tests/wire/test_upgrade_in_place.py) runs all of it with real processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import runpy
import socket
from types import SimpleNamespace

import pytest
from streamgate import upgrade
from support.procs import free_port
from support.services import GUNICORN_CONF

MASTER_PID = 4242


@pytest.fixture
def notify_socket(monkeypatch, tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    receiver.bind(str(path))
    receiver.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield receiver
    receiver.close()


def received(receiver: socket.socket) -> list[str]:
    datagrams = []
    for _ in range(100):
        try:
            datagrams.append(receiver.recv(4096).decode())
        except BlockingIOError:
            return datagrams
    return datagrams


def load_conf(monkeypatch, **environ: str) -> dict:
    for name in ("GUNICORN_PID", "GUNICORN_FD", "STREAMGATE_BIND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)  # monkeypatch restores what the config changes
    return runpy.run_path(str(GUNICORN_CONF))


def booted_worker(conf: dict) -> tuple[SimpleNamespace, list[int]]:
    """A stand-in worker after post_worker_init, and the count of its real heartbeats."""
    beats = [0]

    async def heartbeat() -> None:
        beats[0] += 1

    worker = SimpleNamespace(
        ppid=MASTER_PID,
        log=logging.getLogger("test"),
        config=SimpleNamespace(callback_notify=heartbeat),
    )
    conf["post_worker_init"](worker)
    return worker, beats


async def beat(worker: SimpleNamespace, times: int) -> None:
    for _ in range(times):
        await worker.config.callback_notify()


def test_a_worker_of_a_master_started_by_usr2_names_it_main_pid_once_serving(
    monkeypatch, notify_socket
):
    conf = load_conf(monkeypatch, GUNICORN_PID="4000")
    worker, beats = booted_worker(conf)
    assert received(notify_socket) == []  # not before its server started
    asyncio.run(beat(worker, 3))
    assert received(notify_socket) == [f"MAINPID={MASTER_PID}\nREADY=1"]
    assert beats == [3]


def test_a_worker_of_any_other_master_announces_nothing(monkeypatch, notify_socket):
    conf = load_conf(monkeypatch)
    worker, beats = booted_worker(conf)
    asyncio.run(beat(worker, 2))
    assert received(notify_socket) == []
    assert beats == [2]


def test_the_empty_listener_list_of_a_reuse_port_master_is_made_parseable(monkeypatch):
    load_conf(monkeypatch, GUNICORN_FD="")
    assert [int(fd) for fd in os.environ["GUNICORN_FD"].split(",")]  # what gunicorn does


def test_a_unix_socket_master_keeps_the_listeners_it_is_given(monkeypatch):
    conf = load_conf(monkeypatch, GUNICORN_FD="5,6", STREAMGATE_BIND="unix:/tmp/sg.sock")
    assert conf["reuse_port"] is False
    assert os.environ["GUNICORN_FD"] == "5,6"


def test_upgrade_does_nothing_when_the_unit_is_not_running(monkeypatch, capsys):
    monkeypatch.setattr(upgrade, "main_pid", lambda unit: 0)
    assert upgrade.main(["--ready-url", "http://127.0.0.1:9/readyz"]) == upgrade.NOTHING_DONE
    assert "is not running" in capsys.readouterr().err


def test_upgrade_does_nothing_when_readyz_does_not_answer(monkeypatch, capsys):
    signals = []
    monkeypatch.setattr(upgrade, "main_pid", lambda unit: upgrade.os.getpid())
    monkeypatch.setattr(upgrade.os, "kill", lambda pid, signum: signals.append((pid, signum)))
    status = upgrade.main(["--ready-url", f"http://127.0.0.1:{free_port()}/readyz"])
    assert status == upgrade.NOTHING_DONE
    assert "does not answer 200" in capsys.readouterr().err
    assert signals == []
