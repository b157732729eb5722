"""A local nginx rendered from the project's own templates (what is tested is what is deployed).

The templates are rendered with the nginx role's defaults; only the Debian internals that need
root (pid, logs, temp dirs, include paths, worker user, certificate paths) and the addresses are
overridden. `tls=True` renders the HTTPS edge (nginx_tls) with a certificate from a test CA
(support.tls): `port` then serves the app over HTTPS (HTTP/1.1 and HTTP/2), `plain_port` is the
plain-HTTP server that redirects.

Limits: the shared fixtures stand for many users on many addresses (load tests, streams one after
another from one loopback address), so their per-client limits are lifted (LIFTED_LIMITS; the
limit directives are still rendered and evaluated). `role_limits=True` keeps the role's own
limits: tests/wire/test_edge_security.py tests those.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from support.ci import skip_unless_ci
from support.procs import ManagedProcess, ProcessFailed, free_port, on_a_free_port
from support.tls import LocalPKI

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "nginx"
ROLE = REPO / "ansible" / "roles" / "nginx"

UNBUFFERED = "proxy_buffering off;"
# Negative control: a proxy where nobody turned buffering off, the app's X-Accel-Buffering
# header is ignored, and gzip covers the stream types (a common server-wide setting).
# Measured on nginx 1.22: buffering on alone still passes each chunk of a chunked response on
# at once; what it does is drop the flush after each upstream read, so a body filter that
# holds data until flushed (gzip here) then holds the whole answer. With buffering off, the
# same gzip streams (it flushes per read). Applied to the rendered text only, so the production
# template carries no switch that could break streaming.
BUFFERED = "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"
UNCOMPRESSED = "gzip off;"
COMPRESSED = "gzip on; gzip_types text/plain text/event-stream application/json; gzip_min_length 1;"

MIME_TYPES = "types {\n    text/plain txt;\n    application/json json;\n}\n"

# Per-client limits high enough never to bind in tests that are not about them.
LIFTED_LIMITS = {
    "nginx_limit_rate_per_key": 100000,
    "nginx_limit_rate_per_ip_unauthenticated": 100000,
    "nginx_limit_burst": 100000,
    "nginx_limit_streams_per_key": 65535,
}


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def require_nginx() -> str:
    """The nginx binary; a skip when it is missing, except under CI where it is a failure."""
    binary = nginx_binary()
    if binary:
        return binary
    skip_unless_ci(
        "nginx binary not found (Debian: apt-get install nginx-light; `make deps` as root)"
    )


def role_variables() -> dict:
    """The nginx role's defaults plus its Debian internals, as Ansible would see them."""
    variables: dict = {}
    for path in (ROLE / "defaults" / "main.yml", ROLE / "vars" / "Debian.yml"):
        variables.update(yaml.safe_load(path.read_text()) or {})
    return variables


def local_variables(
    workdir: Path,
    *,
    listen: str,
    upstream_servers: list[str],
    listen_tls: str | None = None,
    pki: LocalPKI | None = None,
) -> dict:
    """The role's variables with the root-only paths moved into `workdir` and the addresses set:
    what the wire tests and the benchmark render. `pki` turns TLS on (nginx_tls)."""
    variables = role_variables()
    variables.update(
        nginx_listen=listen,
        nginx_upstream_servers=upstream_servers,
        __nginx_user="",
        __nginx_pid_file=str(workdir / "nginx.pid"),
        __nginx_error_log=str(workdir / "error.log"),
        __nginx_access_log=str(workdir / "access.log"),
        __nginx_mime_types=str(workdir / "mime.types"),
        __nginx_modules_include="",
        __nginx_site_include=str(workdir / "streamgate.conf"),
        __nginx_temp_dir=str(workdir / "temp"),
        __nginx_acme_challenge_root=str(workdir / "acme"),
    )
    # The role's default is HTTPS; without a test CA these renderings serve plain HTTP.
    variables.update(nginx_tls=False)
    if pki is not None:
        assert listen_tls, "TLS needs an address for nginx_listen_tls"
        variables.update(
            nginx_tls=True,
            nginx_listen_tls=listen_tls,
            __nginx_tls_certificate_path=str(pki.certificate_chain),
            __nginx_tls_certificate_key_path=str(pki.private_key),
        )
    return variables


def render(variables: dict) -> dict[str, str]:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,  # as Ansible's template module renders
    )
    return {
        name: env.get_template(f"{name}.j2").render(**variables)
        for name in ("nginx.conf", "streamgate.conf")
    }


def replace_all(text: str, old: str, new: str) -> str:
    count = text.count(old)
    # Nothing to edit would make the negative control prove nothing.
    assert count >= 1, f"rendered site config has no {old!r} to replace"
    replaced = text.replace(old, new)
    assert old not in replaced and replaced.count(new) == count
    return replaced


def break_buffering(site_text: str) -> str:
    """The negative control's edit of the rendered site config (see BUFFERED)."""
    return replace_all(replace_all(site_text, UNBUFFERED, BUFFERED), UNCOMPRESSED, COMPRESSED)


@dataclass
class LocalNginx:
    upstream_servers: list[str]
    buffering_fault: bool = False
    overrides: dict = field(default_factory=dict)
    # HTTPS edge (nginx_tls) with this test CA's certificate; None: plain HTTP serves the app.
    pki: LocalPKI | None = None
    # Keep the role's per-client limits (else LIFTED_LIMITS).
    role_limits: bool = False
    # Edits of the rendered site text, in order (negative controls: a control removed).
    site_edits: list[Callable[[str], str]] = field(default_factory=list)
    port: int = 0  # the port that serves the app (HTTPS when tls)
    plain_port: int = 0  # plain HTTP (== port without TLS)
    workdir: Path | None = None
    process: ManagedProcess | None = None

    @property
    def tls(self) -> bool:
        return self.pki is not None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def plain_url(self) -> str:
        return f"http://127.0.0.1:{self.plain_port}"

    @property
    def acme_root(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "acme"

    @property
    def site_config(self) -> str:
        assert self.workdir is not None
        return (self.workdir / "streamgate.conf").read_text()

    def logs(self) -> str:
        assert self.workdir is not None
        parts = []
        for name in ("error.log", "access.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- nginx {name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def start(self, binary: str, *, timeout_s: float = 10.0) -> LocalNginx:
        # Not pytest's tmp dir: when run as root, nginx's workers run as nobody and must be
        # able to reach the temp dirs, and pytest's base dir is private to the user.
        self.workdir = Path(tempfile.mkdtemp(prefix="streamgate-nginx-"))
        self.workdir.chmod(0o755)
        (self.workdir / "temp").mkdir(mode=0o755)
        (self.workdir / "mime.types").write_text(MIME_TYPES)
        (self.workdir / "acme").mkdir(mode=0o755)
        return on_a_free_port(lambda port: self._start_on(binary, port, timeout_s))

    def _start_on(self, binary: str, port: int, timeout_s: float) -> LocalNginx:
        assert self.workdir is not None
        self.plain_port = port
        self.port = free_port() if self.tls else port
        variables = local_variables(
            self.workdir,
            listen=f"127.0.0.1:{self.plain_port}",
            listen_tls=f"127.0.0.1:{self.port}" if self.tls else None,
            upstream_servers=self.upstream_servers,
            pki=self.pki,
        )
        variables["nginx_worker_processes"] = 1
        if not self.role_limits:
            variables.update(LIFTED_LIMITS)
        variables.update(self.overrides)
        rendered = render(variables)
        if self.buffering_fault:
            rendered["streamgate.conf"] = break_buffering(rendered["streamgate.conf"])
        for edit in self.site_edits:
            rendered["streamgate.conf"] = edit(rendered["streamgate.conf"])
        for name, text in rendered.items():
            (self.workdir / name).write_text(text)

        base = [binary, "-p", str(self.workdir), "-e", str(self.workdir / "error.log")]
        base += ["-c", str(self.workdir / "nginx.conf")]
        check = subprocess.run(
            [*base, "-t"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        assert check.returncode == 0, (
            f"nginx -t rejected the rendered config:\n{check.stderr}\n"
            f"--- nginx.conf ---\n{rendered['nginx.conf']}\n"
            f"--- streamgate.conf ---\n{rendered['streamgate.conf']}"
        )
        self.process = ManagedProcess(
            "nginx-buffering-fault" if self.buffering_fault else "nginx",
            [*base, "-g", "daemon off;"],
            log_dir=self.workdir,
        ).start()
        # Any answer at all means nginx is listening (the upstream may answer 404 on /); with TLS,
        # the plain server answers /healthz itself, and both ports were bound before it.
        try:
            self.process.wait_http(
                f"{self.plain_url}/healthz", timeout_s=timeout_s, ok=tuple(range(100, 600))
            )
        except ProcessFailed as exc:
            raise ProcessFailed(f"{exc}\n{self.logs()}") from None  # bind errors are logged there
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
