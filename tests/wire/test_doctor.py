"""streamgate-doctor against real local stacks: the healthy chain streams; each injected fault is
named with its verdict and cause, and each detector has its negative control (the same layer
without the fault must be called streamed).

Faults: nginx rendered from the kit's templates with buffering on and the app's header ignored
(with and without gzip on the stream types), a small HTTP proxy that compresses without flushing,
flushes on a timer or on a size, or holds the response head until the first data; a closed port;
and, outside the kit's templates, the article's plain FastAPI StreamingResponse app behind a
hand-written nginx that compresses the stream. Judged by timing only, never by the text.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from streamgate.doctor import cli, verdict
from streamgate.doctor.probe import ChunkedDecoder, parse_head
from support import services
from support.nginx import (
    BUFFERED,
    UNBUFFERED,
    LocalNginx,
    break_buffering,
    replace_all,
    require_nginx,
)
from support.procs import ManagedProcess, free_port
from support.tls import make_test_pki

REPO = Path(__file__).resolve().parents[2]
OPENAI_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/chat/stream"
# The default simulator writes 50 tokens 20 ms apart: about 1 s of stream per probe.
PROBE_ARGS = ["--max-tokens", "50", "--timeout", "20", "--json"]


def doctor(url: str, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, dict]:
    """streamgate-doctor URL --json, in this process: (exit status, report)."""
    status = cli.main([url, *PROBE_ARGS, *extra])
    answer = json.loads(capsys.readouterr().out)
    return status, answer


def describe(answer: dict) -> str:
    hop = answer["hops"][0]
    return f"{answer['diagnosis']} timeline={hop['timeline']['reads'][:12]}..."


def diagnosed(url: str, capsys, verdict_and_cause: tuple[str, str], *extra: str) -> dict:
    """The doctor's report on a faulted layer, checked to exit 1 naming this verdict and cause."""
    status, answer = doctor(url, capsys, *extra)
    hop = answer["hops"][0]
    assert (status, hop["verdict"], hop["cause"]) == (1, *verdict_and_cause), describe(answer)
    return answer


def streamed(url: str, capsys, *extra: str) -> dict:
    """The doctor's report on a chain without a fault, checked to exit 0 saying streamed."""
    status, answer = doctor(url, capsys, *extra)
    assert (status, answer["verdict"]) == (0, "streamed"), describe(answer)
    return answer


# --------------------------------------------------------------- a proxy with one fault


class FaultProxy:
    """HTTP/1.1 in front of one upstream, one request per connection, the answer re-chunked.

    mode: "pass" (every piece at once), "hold-head" (the head waits for the first data),
    "gzip" (compressed; with `gzip_flush`, flushed after every piece, else only when the
    compressor fills a block), "coalesce" (held until `flush_bytes` are due or `flush_ms`
    passed). Runs its own event loop in a thread.
    """

    def __init__(
        self,
        upstream_port: int,
        mode: str,
        *,
        gzip_flush: bool = False,
        flush_ms: float | None = None,
        flush_bytes: int | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.gzip_flush = gzip_flush
        self.flush_s = flush_ms / 1000 if flush_ms else None
        self.flush_bytes = flush_bytes
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0), self.loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.loop.call_soon_threadsafe(self._server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(30):
                await self._exchange(client_r, client_w)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            client_w.close()

    async def _exchange(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        request_head = await client_r.readuntil(b"\r\n\r\n")
        _, _, fields = _request_fields(request_head)
        body = await client_r.readexactly(int(fields.get("content-length", "0")))
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            upstream_w.write(request_head + body)
            head = await upstream_r.readuntil(b"\r\n\r\n")
            status, reason, headers = parse_head(head[:-4])
            decoder = (
                ChunkedDecoder() if "chunked" in headers.get("transfer-encoding", "") else None
            )
            for name in ("transfer-encoding", "content-length", "connection"):
                headers.pop(name, None)
            headers.update({"transfer-encoding": "chunked", "connection": "close"})
            compressor = None
            if self.mode == "gzip":
                headers["content-encoding"] = "gzip"
                compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            out_head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(
                f"{name}: {value}\r\n" for name, value in headers.items()
            )
            pending_head = out_head.encode("latin-1") + b"\r\n"
            if self.mode != "hold-head":
                client_w.write(pending_head)
                pending_head = b""
            held = bytearray()
            loop = asyncio.get_running_loop()
            next_flush = loop.time() + self.flush_s if self.flush_s else None

            async def send(data: bytes) -> None:
                nonlocal pending_head
                if data:
                    client_w.write(pending_head + b"%x\r\n%s\r\n" % (len(data), data))
                    pending_head = b""
                    await client_w.drain()

            while True:
                wait = None if next_flush is None else max(next_flush - loop.time(), 0)
                try:
                    raw = await asyncio.wait_for(upstream_r.read(65536), wait)
                except TimeoutError:
                    await send(bytes(held))
                    held.clear()
                    next_flush = loop.time() + (self.flush_s or 0)
                    continue
                payload = decoder.feed(raw) if decoder is not None else raw
                if compressor is not None:
                    payload = compressor.compress(payload)
                    if self.gzip_flush:
                        payload += compressor.flush(zlib.Z_SYNC_FLUSH)
                if self.mode == "coalesce":
                    held += payload
                    while self.flush_bytes and len(held) >= self.flush_bytes:
                        await send(bytes(held[: self.flush_bytes]))
                        del held[: self.flush_bytes]
                else:
                    await send(payload)
                if not raw or (decoder is not None and decoder.done):
                    break
            tail = bytes(held) + (compressor.flush() if compressor is not None else b"")
            await send(tail)
            client_w.write(pending_head + b"0\r\n\r\n")
            await client_w.drain()
        finally:
            upstream_w.close()


def _request_fields(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            fields[name.strip().lower()] = value.strip()
    return lines[0], "", fields


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def stack() -> Iterator[ExitStack]:
    with ExitStack() as started:
        yield started


@pytest.fixture(scope="module")
def proxy_factory(stack: ExitStack) -> Callable[..., FaultProxy]:
    def start(upstream: services.Service, mode: str, **options) -> FaultProxy:
        proxy = FaultProxy(upstream.port, mode, **options).start()
        stack.callback(proxy.stop)
        return proxy

    return start


@pytest.fixture(scope="module")
def edited_nginx(stack: ExitStack) -> Callable[..., LocalNginx]:
    """nginx from the kit's templates with edits of the rendered site config."""

    def start(upstream: services.Service, *edits: Callable[[str], str]) -> LocalNginx:
        proxy = LocalNginx([f"{upstream.host}:{upstream.port}"], site_edits=list(edits))
        stack.callback(proxy.stop)
        return proxy.start(require_nginx())

    return start


@pytest.fixture(scope="module")
def slow_simulator(simulator_factory) -> services.Simulator:
    """The first token after 1.5 s (a long wait a held head shows in), then 30 tokens."""
    return simulator_factory(ttft_ms=1500, gap_ms=20, tokens=30)


def buffering_on(site: str) -> str:
    """proxy_buffering on with the app's X-Accel-Buffering ignored; gzip stays off."""
    return replace_all(site, UNBUFFERED, BUFFERED)


# ------------------------------------------------------------------- the healthy chain


def test_healthy_chain_streams_and_exits_0(nginx, capsys):
    status, answer = doctor(f"{nginx.base_url}{OPENAI_PATH}", capsys)
    hop = answer["hops"][0]
    assert (status, answer["verdict"], hop["confidence"]) == (0, "streamed", "high"), describe(
        answer
    )
    assert answer["first_buffering_hop"] is None
    assert hop["tokens"] >= 45 and hop["token_reads"] >= 40, describe(answer)
    assert hop["headers"]["server"].startswith("nginx")


def test_the_https_edge_streams_over_http_1_1(gateway, stack, capsys):
    """The role's default edge: HTTPS from the templates (HTTP/2 offered, ALPN picks http/1.1)."""
    pki = make_test_pki()
    edge = LocalNginx([f"{gateway.host}:{gateway.port}"], pki=pki)
    stack.callback(edge.stop)
    edge.start(require_nginx())
    url = f"{edge.base_url}{OPENAI_PATH}"
    status, answer = doctor(url, capsys, "--cacert", str(pki.ca_certificate))
    hop = answer["hops"][0]
    assert (status, hop["verdict"], hop["alpn"]) == (0, "streamed", "http/1.1"), describe(answer)


def test_plain_text_route_streams_through_the_chain(nginx, capsys):
    streamed(f"{nginx.base_url}{TEXT_PATH}", capsys)


# ----------------------------------------------------------------- nginx misconfigured


def test_nginx_buffering_with_gzip_is_buffered_by_nginx(gateway, edited_nginx, capsys):
    broken = edited_nginx(gateway, break_buffering)
    answer = diagnosed(
        f"{broken.base_url}{OPENAI_PATH}", capsys, ("buffered", "nginx-proxy-buffering")
    )
    hop = answer["hops"][0]
    assert hop["headers"]["content-encoding"] == "gzip"
    assert "proxy_buffering off" in hop["fix"]


def test_nginx_buffering_on_holds_the_head(slow_simulator, edited_nginx, capsys):
    """Measured on nginx 1.22: buffering on alone still passes each chunk at once, but the
    response head waits for the first body buffer."""
    held = edited_nginx(slow_simulator, buffering_on)
    diagnosed(
        f"{held.base_url}{OPENAI_PATH}",
        capsys,
        ("headers-held", "nginx-proxy-buffering"),
        "--max-tokens",
        "30",
    )


def test_nginx_from_the_templates_sends_the_head_at_once(slow_simulator, edited_nginx, capsys):
    """Negative control of the two above: the same nginx without the edits."""
    healthy = edited_nginx(slow_simulator)
    answer = streamed(f"{healthy.base_url}{OPENAI_PATH}", capsys, "--max-tokens", "30")
    assert answer["hops"][0]["head_wait_ms"] > 1000


# -------------------------------------------------------------- a layer with one fault


def test_compressing_layer_that_does_not_flush_is_named(gateway, proxy_factory, capsys):
    proxy = proxy_factory(gateway, "gzip")
    diagnosed(f"{proxy.base_url}{OPENAI_PATH}", capsys, ("buffered", "gzip"))


def test_compressing_layer_that_flushes_every_write_streams(gateway, proxy_factory, capsys):
    """Negative control: compression itself is no fault when each write is flushed."""
    proxy = proxy_factory(gateway, "gzip", gzip_flush=True)
    answer = streamed(f"{proxy.base_url}{OPENAI_PATH}", capsys)
    assert answer["hops"][0]["headers"]["content-encoding"] == "gzip"


def test_flush_interval_is_coalesced(gateway, proxy_factory, capsys):
    proxy = proxy_factory(gateway, "coalesce", flush_ms=200)
    answer = diagnosed(f"{proxy.base_url}{OPENAI_PATH}", capsys, ("coalesced", "flush-interval"))
    hop = answer["hops"][0]
    assert 150 <= hop["gap_p50_ms"] <= 260, describe(answer)


def test_size_buffer_is_coalesced(gateway, proxy_factory, capsys):
    proxy = proxy_factory(gateway, "coalesce", flush_bytes=4096)
    answer = diagnosed(f"{proxy.base_url}{OPENAI_PATH}", capsys, ("coalesced", "size-buffer"))
    assert "4.0 KiB" in answer["hops"][0]["reason"]


def test_proxy_that_passes_each_piece_streams(gateway, proxy_factory, capsys):
    """Negative control of the coalescing and compressing modes: the same proxy, no fault."""
    proxy = proxy_factory(gateway, "pass")
    streamed(f"{proxy.base_url}{OPENAI_PATH}", capsys)


def test_proxy_holding_the_head_until_the_first_data(slow_simulator, proxy_factory, capsys):
    proxy = proxy_factory(slow_simulator, "hold-head")
    answer = diagnosed(
        f"{proxy.base_url}{OPENAI_PATH}",
        capsys,
        ("headers-held", "held-head"),
        "--max-tokens",
        "30",
    )
    assert answer["hops"][0]["head_wait_ms"] <= verdict.HEAD_WITH_DATA_MS


def test_proxy_passing_the_head_at_once_streams(slow_simulator, proxy_factory, capsys):
    """Negative control: the same proxy and slow first token, the head passed on at once."""
    proxy = proxy_factory(slow_simulator, "pass")
    streamed(f"{proxy.base_url}{OPENAI_PATH}", capsys, "--max-tokens", "30")


# --------------------------------------------------------------- the probe cannot run


def test_closed_port_exits_2_saying_what_to_fix(tmp_path):
    port = free_port()  # nothing listens there
    html = tmp_path / "timeline.html"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "streamgate.doctor.cli"),
            *(f"http://127.0.0.1:{port}/v1/chat/stream", "--html", str(html)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "refused" in run.stdout and "is the server running" in run.stdout, run.stdout
    assert "failed" in html.read_text()


# ------------------------------------------------ a URL outside the kit: the article's app


NAIVE_NGINX = """
pid {work}/nginx.pid;
error_log {work}/error.log;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {work}/client; proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
    {compression}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{app_port}; }}
    }}
}}
"""
# A common server-wide setting: compress text, the stream types included.
GZIP_ON = "gzip on; gzip_types text/plain text/event-stream; gzip_min_length 1;"


@pytest.fixture(scope="module")
def article_app(simulator, process_logs, stack) -> services.Service:
    """bench/article_app.py as the article runs it: gunicorn, uvicorn worker, the SDK."""
    port = free_port()
    env = services.clean_environ()
    env.update(OPENAI_BASE_URL=f"{simulator.base_url}/v1", OPENAI_API_KEY="sk-test-placeholder")
    process = ManagedProcess(
        f"article-{port}",
        [
            str(Path(sys.executable).with_name("gunicorn")),
            "bench.article_app:app",
            "-w",
            "1",
            "-k",
            "uvicorn_worker.UvicornWorker",
            "-b",
            f"127.0.0.1:{port}",
        ],
        log_dir=process_logs,
        env=env,
        cwd=REPO,
    ).start()
    stack.callback(process.stop)
    process.wait_http(f"http://127.0.0.1:{port}/openapi.json", timeout_s=30)
    return services.Service(name="article", process=process, port=port)


def naive_nginx(app: services.Service, compression: str, stack: ExitStack) -> str:
    """A hand-written nginx (proxy_pass and nothing else, as in most guides); its base URL."""
    work = Path(tempfile.mkdtemp(prefix="streamgate-doctor-nginx-"))
    work.chmod(0o755)
    stack.callback(lambda: subprocess.run(["rm", "-rf", str(work)], check=False))
    port = free_port()
    config = work / "nginx.conf"
    config.write_text(
        NAIVE_NGINX.format(work=work, compression=compression, port=port, app_port=app.port)
    )
    paths = ["-p", str(work), "-e", str(work / "error.log"), "-c", str(config)]
    process = ManagedProcess(
        f"naive-nginx-{port}", [require_nginx(), *paths, "-g", "daemon off;"], log_dir=work
    ).start()
    stack.callback(process.stop)
    process.wait_port(port, timeout_s=10)
    return f"http://127.0.0.1:{port}"


def test_article_app_behind_a_compressing_nginx_is_buffered(article_app, stack, capsys):
    base = naive_nginx(article_app, GZIP_ON, stack)
    diagnosed(f"{base}{TEXT_PATH}", capsys, ("buffered", "nginx-proxy-buffering"))


def test_article_app_behind_the_same_nginx_without_gzip_streams(article_app, stack, capsys):
    """Negative control: the same hand-written nginx (buffering on by default) without gzip."""
    base = naive_nginx(article_app, "", stack)
    streamed(f"{base}{TEXT_PATH}", capsys)
