"""The lean transport on its own: TLS (the default upstream is https), close-delimited bodies,
and a read deadline that fires (with a negative control that data in time does not); and the
choice between it and the SDK's transport (which honours proxies)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import httpx2
import openai
import pytest
from streamgate.settings import Settings
from streamgate.transport import LeanTransport, UpstreamReadTimeout
from streamgate.upstream import ChatStream, choose_transport, make_client
from support.ci import skip_unless_ci

pytestmark = pytest.mark.anyio

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi "},"finish_reason":null}]}\n\n'


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


STREAMED_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n\r\n" + chunked(EVENT, b"data: [DONE]\n\n")
)


async def serve(response: bytes, pause_s: float = 0.0, ssl_context=None):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        head, _, body = response.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        await asyncio.sleep(pause_s)
        writer.write(body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    return server, server.sockets[0].getsockname()[1]


async def read_all(base_url: str, transport: LeanTransport, deadline_s: float = 2.0):
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="k",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport),
    )
    response = await client.post(
        "/chat/completions",
        body={"model": "m", "messages": []},
        cast_to=httpx2.Response,
        stream=True,
    )
    stream, events = ChatStream(response), []
    try:
        deadline = asyncio.get_running_loop().time() + deadline_s
        while (batch := await stream.read_events(deadline)) is not None:
            events += batch
            if stream.finished:
                break
    finally:
        await stream.aclose()
    return events


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        skip_unless_ci("openssl not installed")
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(directory / "key.pem"),
            "-out",
            str(directory / "cert.pem"),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return directory / "cert.pem", directory / "key.pem"


@pytest.fixture(scope="module")
def server_tls(certificate) -> ssl.SSLContext:
    """The test server's side of TLS, with the self-signed certificate."""
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_tls_upstream(certificate, server_tls):
    cert, _ = certificate
    server, port = await serve(STREAMED_ANSWER, ssl_context=server_tls)
    async with server:
        trusting = LeanTransport(ssl.create_default_context(cafile=str(cert)))
        events = await read_all(f"https://localhost:{port}/v1", trusting)
        assert events[0]["choices"][0]["delta"]["content"] == "hi "
        # Negative control: an untrusted certificate must fail, not be accepted.
        with pytest.raises(openai.APIConnectionError):
            await read_all(f"https://localhost:{port}/v1", LeanTransport())


async def test_close_delimited_body_ends_cleanly():
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        + EVENT
        + b"data: [DONE]\n\n"
    )
    server, port = await serve(response)
    async with server:
        events = await read_all(f"http://127.0.0.1:{port}/v1", LeanTransport())
    assert len(events) == 1


@pytest.mark.parametrize(("pause_s", "times_out"), [(0.5, True), (0.0, False)])
async def test_read_deadline(pause_s, times_out):
    server, port = await serve(STREAMED_ANSWER, pause_s=pause_s)
    async with server:
        if times_out:
            with pytest.raises(UpstreamReadTimeout):
                await read_all(f"http://127.0.0.1:{port}/v1", LeanTransport(), deadline_s=0.2)
        else:
            assert (
                len(await read_all(f"http://127.0.0.1:{port}/v1", LeanTransport(), deadline_s=0.2))
                == 1
            )


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.mark.parametrize(
    ("upstream", "environment", "expected"),
    [
        ("https://api.openai.com/v1", {}, "lean"),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://proxy.corp:3128"}, "sdk"),
        (
            "https://api.openai.com/v1",
            {"HTTP_PROXY": "http://proxy.corp:3128"},
            "lean",
        ),  # http only
        ("http://vllm.lan:8000/v1", {"HTTP_PROXY": "http://proxy.corp:3128"}, "sdk"),
        ("http://vllm.lan:8000/v1", {"ALL_PROXY": "http://proxy.corp:3128"}, "sdk"),
        ("http://vllm.lan:8000/v1", {"ALL_PROXY": "http://p:3128", "NO_PROXY": "vllm.lan"}, "lean"),
        ("http://10.0.0.7:8000/v1", {"ALL_PROXY": "http://p:3128", "NO_PROXY": "10.0.0.7"}, "lean"),
        ("http://vllm.lan:8000/v1", {"ALL_PROXY": "http://p:3128", "NO_PROXY": "other.lan"}, "sdk"),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"}, "lean"),
    ],
)
def test_auto_takes_the_sdk_transport_only_when_a_proxy_applies(
    monkeypatch, upstream, environment, expected
):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings(upstream_base_url=upstream, _env_file=None)  # type: ignore[call-arg]
    assert choose_transport(settings).name == expected


def test_explicit_transport_wins_and_proxy_credentials_stay_out_of_the_log(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://user:s3cret@proxy.corp:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    auto = choose_transport(Settings(_env_file=None))  # type: ignore[call-arg]
    assert auto.name == "sdk" and "proxy.corp:3128" in auto.reason
    assert "s3cret" not in auto.reason and "user" not in auto.reason
    pinned = Settings(upstream_transport="lean", _env_file=None)  # type: ignore[call-arg]
    assert choose_transport(pinned).name == "lean"


@pytest.mark.parametrize("transport", ["lean", "sdk"])
async def test_one_ca_policy_for_every_transport_system_store_or_ssl_cert_file(
    certificate, server_tls, monkeypatch, transport
):
    """A private CA named by SSL_CERT_FILE is trusted by both clients; without it, neither
    trusts the certificate (no bundled CA list of their own decides instead)."""
    cert, _ = certificate

    async def one_request() -> httpx2.Response:
        settings = Settings(
            upstream_base_url=f"https://localhost:{port}/v1", upstream_api_key="k", _env_file=None
        )  # type: ignore[call-arg]
        client = make_client(settings, transport)
        try:
            answer = await client.post(
                "/chat/completions",
                body={"model": "m", "messages": []},
                cast_to=httpx2.Response,
                stream=True,
            )
            await answer.aread()
            return answer
        finally:
            await client.close()

    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    server, port = await serve(STREAMED_ANSWER, ssl_context=server_tls)
    async with server:
        with pytest.raises(openai.APIConnectionError):
            await one_request()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert (await one_request()).status_code == 200


async def test_a_request_dropped_on_reused_connections_is_retried_on_a_fresh_one():
    """llama.cpp's server closes after each streamed answer while its headers promise keep-alive:
    every idle connection may be stale at once, so the one retry must not take another idle one
    (control: taking an idle connection on the retry fails this test with a 502-class error)."""
    answered = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    both_in = asyncio.Event()
    connections = 0

    async def first_request_only(reader, writer):
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections == 2:
            both_in.set()
        await both_in.wait()  # two requests in flight: two connections end up idle
        writer.write(answered)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on it is dropped unanswered
        writer.close()

    server = await asyncio.start_server(first_request_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = LeanTransport()
    try:
        async with httpx2.AsyncClient(transport=transport) as client:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            first = await asyncio.gather(*(client.post(url, content=b"{}") for _ in range(2)))
            assert [response.content for response in first] == [b"ok", b"ok"]
            assert len(transport._idle[LeanTransport.origin(httpx2.URL(url))]) == 2
            third = await asyncio.wait_for(client.post(url, content=b"{}"), 5)
            assert third.content == b"ok"
        assert connections == 3  # the two pooled ones were dropped, the retry connected anew
    finally:
        server.close()
        await transport.aclose()
