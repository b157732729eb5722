"""How many held streams the deployed defaults fit on one box, read from what is deployed.

A held stream (a client waiting on a slow first token) costs, on a box that runs the edge, the
gateway and an LLM server: two connections in one nginx worker (the client's and the one to the
gateway), two open files in one gateway worker (from nginx, to the LLM server) and one socket in
the LLM server (here the simulator). Each per-worker limit must fit every stream, not a share:
nothing makes nginx spread connections evenly over its workers, `worker_processes auto` and
`STREAMGATE_WORKERS=0` mean one worker on a one-core box, and reuse_port spreads the gateway's
connections by hash, not by count.

Read from the sources the play and the tests render: nginx/*.j2 with the nginx role's defaults
(TLS on, as deployed), the LimitNOFILE lines of systemd/*.service.j2, and the gunicorn config.
"""

from __future__ import annotations

import re
import runpy
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from support import nginx

REPO = Path(__file__).resolve().parents[2]
GATEWAY_UNIT = REPO / "systemd" / "streamgate.service.j2"
SIMULATOR_UNIT = REPO / "systemd" / "streamgate-sim.service.j2"
GUNICORN_CONF = Path(find_spec("streamgate.gunicorn_conf").origin)

# What the deployed defaults must hold on one box (issue 9: reasoning models, tens of seconds to
# the first token, measured with bench/held_streams.py).
HELD_STREAMS_TARGET = 10_000
# nginx's listen backlog when `listen` names none (NGX_LISTEN_BACKLOG on Linux).
NGINX_DEFAULT_BACKLOG = 511
# Accept queues at least this long: Linux's own cap (net.core.somaxconn) since 5.4. Shorter
# queues overflowed while 10,000 streams opened within seconds (bench/README.md).
MIN_LISTEN_BACKLOG = 4096
# Open files a process needs besides its connections: logs, listeners, libraries, pipes.
FILES_MARGIN = 128


@dataclass(frozen=True)
class DeployedLimits:
    nginx_worker_connections: int
    nginx_worker_rlimit_nofile: int
    nginx_listen_backlogs: tuple[int, ...]  # one per `listen` of the site
    nginx_upstream_keepalive: int  # idle connections to the gateway a worker keeps besides
    gateway_nofile: int
    gateway_backlog: int
    simulator_nofile: int


def _one(pattern: str, text: str, what: str) -> str:
    found = re.findall(pattern, text, re.MULTILINE)
    assert len(found) == 1, f"expected one {what}, found {found}"
    return found[0]


def unit_nofile(unit: Path) -> int:
    """LimitNOFILE of a systemd unit template (a literal number)."""
    return int(_one(r"^LimitNOFILE=(\d+)$", unit.read_text(), f"LimitNOFILE in {unit.name}"))


def gunicorn_backlog(conf: Path = GUNICORN_CONF) -> int:
    """The gunicorn config's `backlog`, else gunicorn's own default."""
    from gunicorn.config import Backlog

    return int(runpy.run_path(str(conf)).get("backlog", Backlog.default))


def rendered_nginx(overrides: dict | None = None) -> dict[str, str]:
    """nginx/*.j2 with the role's defaults as deployed (the Debian paths, TLS on)."""
    variables = nginx.role_variables() | {"nginx_upstream_servers": ["127.0.0.1:8000"]}
    return nginx.render(variables | (overrides or {}))


def nginx_limits(rendered: dict[str, str]) -> dict:
    main, site = rendered["nginx.conf"], rendered["streamgate.conf"]
    listens = re.findall(r"^\s*listen\s+([^;]+);", site, re.MULTILINE)
    assert listens, "the site has no listen directive"
    backlogs = []
    for listen in listens:
        backlog = re.search(r"\bbacklog=(\d+)", listen)
        backlogs.append(int(backlog.group(1)) if backlog else NGINX_DEFAULT_BACKLOG)
    return {
        "nginx_worker_connections": int(
            _one(r"^\s*worker_connections\s+(\d+);", main, "worker_connections")
        ),
        "nginx_worker_rlimit_nofile": int(
            _one(r"^worker_rlimit_nofile\s+(\d+);", main, "worker_rlimit_nofile")
        ),
        "nginx_listen_backlogs": tuple(backlogs),
        "nginx_upstream_keepalive": int(_one(r"^\s*keepalive\s+(\d+);", site, "keepalive")),
    }


def deployed_limits(nginx_overrides: dict | None = None, **replace) -> DeployedLimits:
    """The limits as deployed; `nginx_overrides` are role variables, `replace` sets fields
    directly (the negative controls)."""
    found = nginx_limits(rendered_nginx(nginx_overrides)) | {
        "gateway_nofile": unit_nofile(GATEWAY_UNIT),
        "gateway_backlog": gunicorn_backlog(),
        "simulator_nofile": unit_nofile(SIMULATOR_UNIT),
    }
    return DeployedLimits(**(found | replace))


def shortfalls(limits: DeployedLimits, streams: int = HELD_STREAMS_TARGET) -> list[str]:
    """Every limit that cannot hold `streams` held streams on one box ([] = they fit)."""
    problems = []
    listens = len(limits.nginx_listen_backlogs)
    nginx_connections = 2 * streams + listens + limits.nginx_upstream_keepalive
    if limits.nginx_worker_connections < nginx_connections:
        problems.append(
            f"nginx worker_connections {limits.nginx_worker_connections} < {nginx_connections} "
            f"(two per stream, the listeners, the idle upstream connections, in one worker)"
        )
    if limits.nginx_worker_rlimit_nofile < limits.nginx_worker_connections + FILES_MARGIN:
        problems.append(
            f"nginx worker_rlimit_nofile {limits.nginx_worker_rlimit_nofile} < worker_connections "
            f"{limits.nginx_worker_connections} + {FILES_MARGIN} (every connection is a file)"
        )
    short = [backlog for backlog in limits.nginx_listen_backlogs if backlog < MIN_LISTEN_BACKLOG]
    if short:
        problems.append(f"nginx listen backlog {short} < {MIN_LISTEN_BACKLOG}")
    if limits.gateway_backlog < MIN_LISTEN_BACKLOG:
        problems.append(f"gunicorn backlog {limits.gateway_backlog} < {MIN_LISTEN_BACKLOG}")
    if limits.gateway_nofile < 2 * streams + FILES_MARGIN:
        problems.append(
            f"gateway LimitNOFILE {limits.gateway_nofile} < {2 * streams + FILES_MARGIN} "
            f"(two sockets per stream, in one worker)"
        )
    if limits.simulator_nofile < streams + FILES_MARGIN:
        problems.append(
            f"simulator LimitNOFILE {limits.simulator_nofile} < {streams + FILES_MARGIN}"
        )
    return problems
