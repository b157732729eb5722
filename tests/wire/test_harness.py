"""The measuring instruments themselves: the probe's decoding and verdicts against a scripted
server, the probe as a stdlib-only script, and the nginx helper's guards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import pytest
from streamgate.simulator.script import expected_text
from support import chat, nginx, procs, services, stream_probe
from support.stream_probe import BUFFERED, STREAMED

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ScriptedServer:
    """Accepts one connection and plays (delay_s, bytes) writes, then closes."""

    def __init__(self, writes: list[tuple[float, bytes]]) -> None:
        self.writes = writes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.listener.settimeout(10)
        connection, _ = self.listener.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.recv(65536)  # the request (small, one segment on loopback)
            for delay_s, data in self.writes:
                time.sleep(delay_s)
                connection.sendall(data)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(timeout=10)
        self.listener.close()


def probe(server: ScriptedServer) -> stream_probe.Trace:
    return stream_probe.request("127.0.0.1", server.port, "/", {"prompt": "hi"}, timeout_s=10)


def test_probe_sees_spread_writes_as_streamed():
    writes = [(0.0, HEAD)] + [(0.03, chunk(b"tok%d " % i)) for i in range(10)] + [(0, b"0\r\n\r\n")]
    with ScriptedServer(writes) as server:
        trace = probe(server)

    assert trace.status == 200 and trace.complete and trace.body.startswith(b"tok0 tok1 ")
    assert stream_probe.separate_reads(trace) >= 9
    assert stream_probe.streaming_verdict(trace, min_reads=9, min_span_s=0.2) == STREAMED


def test_negative_control_probe_sees_one_late_write_as_buffered():
    body = b"".join(chunk(b"tok%d " % i) for i in range(10)) + b"0\r\n\r\n"
    with ScriptedServer([(0.3, HEAD + body)]) as server:
        trace = probe(server)

    assert trace.complete and trace.body.startswith(b"tok0 tok1 ")
    assert stream_probe.separate_reads(trace) == 1
    assert stream_probe.first_byte_s(trace) >= 0.25
    assert stream_probe.streaming_verdict(trace, min_reads=9, min_span_s=0.2) == BUFFERED


def test_probe_reports_a_stream_cut_without_its_last_chunk():
    with ScriptedServer([(0.0, HEAD + chunk(b"half an ans"))]) as server:
        trace = probe(server)

    assert trace.body == b"half an ans" and not trace.complete and not trace.error


def test_probe_runs_as_a_stdlib_only_script_and_prints_json(gateway):
    """What lab hosts run (the probe with the doctor's probe module it imports, as one program):
    no site-packages at all (-I -S), output parsed as JSON."""
    body = json.dumps({"prompt": "hi", "max_tokens": 5})
    url = f"{gateway.base_url}{chat.ROUTES[chat.TEXT]}"
    program = stream_probe.standalone_program()
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", program, "--url", url, "--body", body],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    assert printed["status"] == 200 and printed["complete"], printed
    assert printed["body"] == expected_text(5)
    assert printed["verdict"]["separate_reads"] >= 4, printed["verdict"]


def test_missing_nginx_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(nginx, "nginx_binary", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nginx binary not found"):
        nginx.require_nginx()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        nginx.require_nginx()


def test_buffering_fault_refuses_a_config_it_cannot_break():
    rendered = nginx.render(nginx.role_variables() | {"nginx_upstream_servers": ["127.0.0.1:1"]})
    site = rendered["streamgate.conf"]
    assert nginx.break_buffering(site).count(nginx.BUFFERED) == site.count(nginx.UNBUFFERED)
    with pytest.raises(AssertionError, match="no 'proxy_buffering off;'"):
        nginx.break_buffering(site.replace(nginx.UNBUFFERED, ""))


def test_a_port_taken_before_the_bind_is_retried_on_another(monkeypatch, process_logs):
    """Shared machine: another run may grab the port between free_port() and the bind."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        offered = iter([taken])
        real_free_port = procs.free_port
        monkeypatch.setattr(procs, "free_port", lambda: next(offered, None) or real_free_port())
        simulator = services.start_simulator(process_logs)
        try:
            assert simulator.port != taken
            log = (process_logs / f"simulator-{taken}.log").read_text()
            assert "address already in use" in log.lower()
        finally:
            simulator.stop()


# --- the process harness (support/procs.py) ---------------------------------------------------

# A parent that ignores TERM and leaves a child in its group that ignores it too (a master and
# a worker that do not stop when asked); it prints the child's PID, then serves nothing.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print("child", child.pid, flush=True)
time.sleep(60)
"""


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_harness_waits_for_a_logged_line_a_port_and_a_url(tmp_path):
    port = procs.free_port()
    server = procs.ManagedProcess(
        "http",
        [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        log_dir=tmp_path,
        cwd=tmp_path,
    )
    with server:
        server.wait_port(port, timeout_s=10)
        server.wait_http(f"http://127.0.0.1:{port}/", timeout_s=10)
        assert server.wait_output(r"Serving HTTP on \S+ port (\d+)", timeout_s=10)[1] == str(port)
    assert not server.is_running()


def test_harness_reports_a_process_that_dies_while_starting_with_its_output(tmp_path):
    process = procs.ManagedProcess(
        "dies", [sys.executable, "-c", "print('bad config line 3')"], log_dir=tmp_path
    ).start()
    with pytest.raises(procs.ProcessFailed, match=r"(?s)exited while starting.*bad config line 3"):
        process.wait_port(procs.free_port(), timeout_s=10)


def test_harness_gives_up_at_its_deadline_and_stops_the_process(tmp_path):
    process = procs.ManagedProcess(
        "mute", [sys.executable, "-c", "print('up'); import time; time.sleep(60)"], log_dir=tmp_path
    ).start()
    started = time.monotonic()
    with pytest.raises(procs.ProcessFailed, match=r"(?s)gave up after 0\.5 s.*up"):
        process.wait_port(procs.free_port(), timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert not process.is_running()


class SignalsTheLeaderOnly(procs.ManagedProcess):
    """Negative control: TERM and KILL by the leader's PID alone, not its group."""

    def _signal_group(self, signum: int) -> None:
        os.kill(self.pid, signum)


@pytest.mark.parametrize("harness", [procs.ManagedProcess, SignalsTheLeaderOnly])
def test_harness_stop_kills_what_ignores_term_with_its_whole_group(tmp_path, harness):
    process = harness("stubborn", [sys.executable, "-c", STUBBORN], log_dir=tmp_path).start()
    child = int(process.wait_output(r"child (\d+)", timeout_s=10)[1])
    started = time.monotonic()
    process.stop(term_timeout_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5  # TERM, the bound, then KILL
    try:
        procs.wait_until(lambda: not pid_alive(child), timeout_s=3, what="the child to die")
        assert harness is procs.ManagedProcess
    except TimeoutError:
        assert harness is SignalsTheLeaderOnly, "the group's other process survived the stop"
        os.kill(child, signal.SIGKILL)  # the control's leftover: a process this test started


def test_harness_gives_the_process_its_open_files_limit(tmp_path):
    script = (
        "import resource, time; print('nofile', *resource.getrlimit(resource.RLIMIT_NOFILE),"
        " flush=True); time.sleep(60)"
    )
    with procs.ManagedProcess(
        "limited", [sys.executable, "-c", script], log_dir=tmp_path, nofile=256
    ) as process:
        assert process.wait_output(r"nofile (\d+) (\d+)", timeout_s=10).groups()[0] == "256"
