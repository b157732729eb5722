"""A local nginx rendered from the project's own templates (what is tested is what is deployed).

The templates are rendered with the nginx role's defaults; only the Debian internals that need
root (pid, logs, temp dirs, include paths, worker user) and the addresses are overridden.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pytest
import yaml

from support.procs import ManagedProcess, ProcessFailed, on_a_free_port

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


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def require_nginx() -> str:
    """The nginx binary; a skip when it is missing, except under CI where it is a failure."""
    binary = nginx_binary()
    if binary:
        return binary
    reason = "nginx binary not found (Debian: apt-get install nginx-light; `make deps` as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI=true requires the nginx wire tests to run", pytrace=False)
    pytest.skip(reason)


def role_variables() -> dict:
    """The nginx role's defaults plus its Debian internals, as Ansible would see them."""
    variables: dict = {}
    for path in (ROLE / "defaults" / "main.yml", ROLE / "vars" / "Debian.yml"):
        variables.update(yaml.safe_load(path.read_text()) or {})
    return variables


def render(variables: dict) -> dict[str, str]:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return {
        name: env.get_template(f"{name}.j2").render(**variables)
        for name in ("nginx.conf", "streamgate.conf")
    }


def _replace_all(text: str, old: str, new: str) -> str:
    count = text.count(old)
    # Nothing to edit would make the negative control prove nothing.
    assert count >= 1, f"rendered site config has no {old!r} to replace"
    replaced = text.replace(old, new)
    assert old not in replaced and replaced.count(new) == count
    return replaced


def break_buffering(site_text: str) -> str:
    """The negative control's edit of the rendered site config (see BUFFERED)."""
    return _replace_all(_replace_all(site_text, UNBUFFERED, BUFFERED), UNCOMPRESSED, COMPRESSED)


@dataclass
class LocalNginx:
    upstream_servers: list[str]
    buffering_fault: bool = False
    overrides: dict = field(default_factory=dict)
    port: int = 0
    workdir: Path | None = None
    process: ManagedProcess | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        return on_a_free_port(lambda port: self._start_on(binary, port, timeout_s))

    def _start_on(self, binary: str, port: int, timeout_s: float) -> LocalNginx:
        assert self.workdir is not None
        self.port = port
        variables = role_variables()
        variables.update(
            nginx_listen=f"127.0.0.1:{self.port}",
            nginx_upstream_servers=self.upstream_servers,
            nginx_worker_processes=1,
            __nginx_user="",
            __nginx_pid_file=str(self.workdir / "nginx.pid"),
            __nginx_error_log=str(self.workdir / "error.log"),
            __nginx_access_log=str(self.workdir / "access.log"),
            __nginx_mime_types=str(self.workdir / "mime.types"),
            __nginx_modules_include="",
            __nginx_site_include=str(self.workdir / "streamgate.conf"),
            __nginx_temp_dir=str(self.workdir / "temp"),
        )
        variables.update(self.overrides)
        rendered = render(variables)
        if self.buffering_fault:
            rendered["streamgate.conf"] = break_buffering(rendered["streamgate.conf"])
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
        # Any answer at all means nginx is listening (the upstream may answer 404 on /).
        try:
            self.process.wait_http(
                f"{self.base_url}/healthz", timeout_s=timeout_s, ok=tuple(range(100, 600))
            )
        except ProcessFailed as exc:
            raise ProcessFailed(f"{exc}\n{self.logs()}") from None  # bind errors are logged there
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
