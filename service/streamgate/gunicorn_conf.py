"""gunicorn settings for the gateway, shipped in the wheel:
`gunicorn -c python:streamgate.gunicorn_conf` (app from wsgi_app below).

Values come from streamgate.settings (environment + STREAMGATE_ENV_FILE), so the env file that
Ansible templates is the single source. gunicorn loads a `python:` config by importing it, and
an import runs once per process: forget_this_config() makes every HUP run it again, as it would
re-read a config file, so a reload applies the env file's workers, timeouts and log level too.
"""

import os
import shutil
import sys
import tempfile

from streamgate.settings import load_settings

_settings = load_settings()

# uvicorn-worker (uvicorn.workers is deprecated) with the client deadlines of streamgate.worker.
# Its "auto" loop picks uvloop when installed (uvicorn[standard]); on_starting refuses to run
# without uvloop and httptools.
worker_class = "streamgate.worker.StreamgateWorker"
workers = _settings.effective_workers()
bind = [_settings.bind]
# Each worker gets its own SO_REUSEPORT listener and the kernel spreads connections evenly.
# With one shared listener, whichever worker wakes first accepts the whole queue: measured
# here, 500 connections split 394/106, and the busy worker's streams stall while the other
# idles (keep-alive clients and nginx's upstream pool stay on the worker that accepted them).
# Linux balances TCP only, so a unix: bind keeps the shared listener.
reuse_port = not _settings.bind.startswith("unix:")
# A master started by USR2 (an in-place upgrade) reads its listeners from GUNICORN_FD, but with
# reuse_port the old master has none and passes "", which gunicorn 27 dies on (int("")). Any
# number will do: with reuse_port the new master never uses them, each worker binds its own.
if reuse_port and os.environ.get("GUNICORN_FD") == "":
    os.environ["GUNICORN_FD"] = "-1"
wsgi_app = "streamgate.app:create_app()"

# Must cover the longest stream: on stop/reload the arbiter kills what is still open after it.
graceful_timeout = int(_settings.graceful_timeout_s)
# Longer than nginx's upstream keepalive_timeout (60 s): nginx must close idle connections first.
keepalive = _settings.keepalive_s
# Accept queue of each worker's listener (gunicorn's default is 2048). 10,000 streams opened
# through nginx within half a second overflowed it (~10,000 connection attempts dropped, each
# retried a second later; nginx gives up connecting after 5 s with a 502); none at 4096. Linux
# caps it at net.core.somaxconn (4096 since kernel 5.4). bench/held_streams.py measures it.
backlog = 4096
# For async workers this is a heartbeat, not a request limit: leave it at gunicorn's default.
timeout = 30
loglevel = _settings.log_level
accesslog = None  # the app writes one JSON line per request
errorlog = "-"
proc_name = "streamgate"
# gunicorn 24+ opens a control socket at one fixed path per user: several instances (tests, a
# dev run next to a service) would fight over it, and systemd's signals are all we need.
control_socket_disable = True


def on_starting(server):
    import httptools  # noqa: F401  (fail here, loudly, rather than silently run h11/asyncio)
    import uvloop  # noqa: F401

    # Prometheus counts per process: a shared directory lets /metrics sum all workers.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        directory = tempfile.mkdtemp(prefix="streamgate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        server._streamgate_metrics_dir = directory
    # After the metrics directory is set: prometheus_client picks its mode at import.
    import_app_code()
    forget_this_config()


def on_reload(server):
    forget_this_config()


def forget_this_config() -> None:
    """The next load of `python:streamgate.gunicorn_conf` (the next HUP) imports it afresh and
    reads the settings again; the hooks gunicorn holds stay valid. (Under a file config, as
    some tests load it, gunicorn runs the file anew each time anyway.)"""
    sys.modules.pop(__name__, None)


def import_app_code() -> None:
    """The app's code, imported once in the master: every worker forked later, on a HUP reload
    too, serves at once instead of spending about 0.7 s of CPU importing it while the old
    workers stop accepting (measured through nginx: p99 TTFT across a reload 585 ms, 57 ms at
    rest). Each worker still builds its app with create_app(), so a reload applies a changed
    env file; new code needs a new master (a restart, or streamgate-upgrade)."""
    import streamgate.app  # noqa: F401


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    # In-place upgrade (streamgate.upgrade): a master started by USR2 has GUNICORN_PID until its
    # old master is gone, and systemd must take it as the service's main process before then,
    # or the old master's exit stops the service, new master included. Its workers say so once
    # they serve: uvicorn calls the heartbeat first right after its server started. Not in the
    # master's when_ready: a release whose workers cannot start would be the main process by
    # then, and its death would take the old, still serving, master down with it.
    if os.environ.get("GUNICORN_PID"):
        heartbeat = worker.config.callback_notify
        announced = False

        async def announce_then_heartbeat():
            nonlocal announced
            if not announced:
                announced = True
                announce_main_process(worker.ppid, worker.log)
            await heartbeat()

        worker.config.callback_notify = announce_then_heartbeat


def announce_main_process(master_pid: int, log) -> None:
    """systemd's MAINPID for the unit (a no-op without NOTIFY_SOCKET). The sender is a worker,
    not the unit's main process: the unit needs NotifyAccess=all."""
    from gunicorn.systemd import sd_notify

    sd_notify(f"MAINPID={master_pid}\nREADY=1", log)


def on_exit(server):
    directory = getattr(server, "_streamgate_metrics_dir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
