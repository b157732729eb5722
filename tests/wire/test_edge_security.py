"""The edge's security controls, through a real nginx rendered from nginx/*.j2 with nginx_tls on
and the role's own limits, in front of real gunicorn and the simulator.

- Streams stay word by word over TLS, with HTTP/1.1 and with HTTP/2 (>= 45 separate reads over
  >= 0.8 s for 50 tokens 20 ms apart); control: a buffering nginx over TLS is judged buffered.
- TLS: 1.2 and 1.3 only, ECDHE with AES-GCM/ChaCha20 only, no session tickets, HSTS on every
  answer; control: the same checks against nginx's own defaults see weak ciphers accepted.
- Plain HTTP redirects to HTTPS except ACME challenges and /healthz.
- Limits: requests per key (burst, then 429 JSON + Retry-After), under the rate never; keys
  apart; clients without a key per address; concurrent streams per key; control: the limits
  removed, the same burst sees no 429.
- Exposure: /docs, /redoc, /openapi.json are 404; /metrics only from nginx_metrics_allow;
  /readyz says only ready or not ready; the client's key is in no log.

Each test uses its own key (or its own loopback source address, 127.0.0.0/8 is all local), so
the rate state one test leaves in nginx's zones never meets another's.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import ssl
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack

import pytest
from support import chat, h2_probe, stream_probe
from support.fixed_answer import serve_fixed_answer
from support.nginx import LocalNginx, require_nginx
from support.tls import LocalPKI
from support.word_by_word import CLIENT_HEADERS, assert_buffered, assert_word_by_word

MOZILLA_INTERMEDIATE_TLS12 = [
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
]
# Each outside the profile: no forward secrecy (RSA key exchange), or CBC, or both.
WEAK_TLS12 = ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"]

_key_numbers = itertools.count(1)
_addresses = (f"127.0.{n // 250}.{n % 250 + 2}" for n in itertools.count(40))


def client_key(purpose: str) -> str:
    """A key of this test's own (the app does not check keys in these tests' gateway)."""
    return f"sk-edge-{purpose}-{next(_key_numbers)}-{uuid.uuid4().hex[:8]}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def fresh_address() -> str:
    """A loopback source address no other test of this session used (per-address limits)."""
    return next(_addresses)


# --- fixtures -----------------------------------------------------------------------------------


def start_edge(running: ExitStack, upstream, pki: LocalPKI | None, **options) -> LocalNginx:
    proxy = LocalNginx([f"{upstream.host}:{upstream.port}"], pki=pki, **options)
    running.callback(proxy.stop)
    return proxy.start(require_nginx())


def without_lines(site: str, unwanted: Callable[[str], bool]) -> str:
    """The site config without the lines `unwanted` picks; a negative control's edit, so it
    must remove at least one (else the control would test the unchanged config)."""
    lines = site.splitlines(keepends=True)
    kept = [line for line in lines if not unwanted(line)]
    assert len(kept) < len(lines), "the edit found no line to remove"
    return "".join(kept)


@pytest.fixture(scope="module")
def edge(running, gateway, pki) -> LocalNginx:
    """The HTTPS edge as the role renders it: TLS on, the role's own limits."""
    return start_edge(running, gateway, pki, role_limits=True)


@pytest.fixture(scope="module")
def buffering_edge(running, gateway, pki):
    proxy = start_edge(running, gateway, pki, buffering_fault=True)
    yield proxy
    proxy.stop()


def tls_context(pki: LocalPKI, **limits) -> ssl.SSLContext:
    context = pki.client_context()
    for name, value in limits.items():
        setattr(context, name, value)
    return context


# --- streams over TLS ---------------------------------------------------------------------------


PROBES = {"http1.1": stream_probe.request, "http2": h2_probe.request}


def probe(proxy: LocalNginx, pki: LocalPKI, route: str, protocol: str) -> stream_probe.Trace:
    return chat.request(
        proxy,
        route,
        client=PROBES[protocol],
        headers={**CLIENT_HEADERS, **bearer(client_key(protocol))},
        timeout_s=20,
        tls=pki.client_context(),
    )


@pytest.mark.parametrize("protocol", list(PROBES))
@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_each_token_reaches_the_client_in_its_own_read_over_tls(
    edge, pki, simulator, protocol, route
):
    assert_word_by_word(probe(edge, pki, route, protocol), route, simulator)


@pytest.mark.parametrize("protocol", list(PROBES))
def test_negative_control_buffering_nginx_over_tls_is_detected(buffering_edge, pki, protocol):
    assert "proxy_buffering on;" in buffering_edge.site_config
    assert_buffered(probe(buffering_edge, pki, chat.TEXT, protocol))


# --- the TLS profile ----------------------------------------------------------------------------


def handshake(port: int, context: ssl.SSLContext) -> ssl.SSLSocket | None:
    """The TLS session nginx agrees to with this client context, or None when it refuses."""
    import socket

    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    except (ssl.SSLError, ConnectionResetError):
        raw.close()
        return None
    return tls


def accepts(
    port: int,
    pki: LocalPKI,
    *,
    version: ssl.TLSVersion,
    ciphers: str | None = None,
) -> str | None:
    """The cipher nginx chose when a client offers only `version` (and `ciphers`), else None.
    The client's own floor is lowered (SECLEVEL 0) so that only the server can refuse."""
    context = tls_context(pki, minimum_version=version, maximum_version=version)
    context.set_ciphers(f"{ciphers or 'ALL'}:@SECLEVEL=0")
    session = handshake(port, context)
    if session is None:
        return None
    with session:
        return session.cipher()[0]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"]
)
def test_tls_before_1_2_is_refused(edge, pki, version):
    assert accepts(edge.port, pki, version=version) is None


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
def test_tls_1_2_and_1_3_are_accepted(edge, pki, version):
    assert accepts(edge.port, pki, version=version)


@pytest.mark.parametrize("cipher", MOZILLA_INTERMEDIATE_TLS12)
def test_the_intermediate_ciphers_are_accepted(edge, pki, cipher):
    assert accepts(edge.port, pki, version=ssl.TLSVersion.TLSv1_2, ciphers=cipher) == cipher


@pytest.mark.parametrize("cipher", WEAK_TLS12)
def test_ciphers_without_ecdhe_or_with_cbc_are_refused(edge, pki, cipher):
    assert accepts(edge.port, pki, version=ssl.TLSVersion.TLSv1_2, ciphers=cipher) is None


def issues_a_session_ticket(port: int, pki: LocalPKI) -> bool:
    """One TLS 1.2 request: did the server hand out a session ticket?"""
    session = handshake(port, tls_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert session is not None
    with session:
        session.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        session.recv(4096)
        return session.session.has_ticket


def test_no_session_ticket_is_issued(edge, pki):
    assert not issues_a_session_ticket(edge.port, pki)


@pytest.fixture(scope="module")
def default_tls_edge(running, gateway, pki):
    """Negative control: the profile's lines replaced by nginx's defaults opened wide."""

    def nginx_defaults(site: str) -> str:
        text = without_lines(site, lambda line: "ssl_protocols" in line or "ssl_ciphers" in line)
        wide = (
            "    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;\n    ssl_ciphers ALL:@SECLEVEL=0;\n"
        )
        return text.replace(
            "    ssl_session_tickets off;\n", "    ssl_session_tickets on;\n" + wide
        )

    proxy = start_edge(running, gateway, pki, site_edits=[nginx_defaults])
    yield proxy
    proxy.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_negative_control_a_wide_open_tls_server_fails_the_profile_checks(default_tls_edge, pki):
    assert accepts(default_tls_edge.port, pki, version=ssl.TLSVersion.TLSv1_1)
    for cipher in WEAK_TLS12:
        assert (
            accepts(default_tls_edge.port, pki, version=ssl.TLSVersion.TLSv1_2, ciphers=cipher)
            == cipher
        )
    assert issues_a_session_ticket(default_tls_edge.port, pki)


# --- plain HTTP and HSTS ------------------------------------------------------------------------


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = {name.lower(): value for name, value in response.getheaders()}
        self.body = response.read()

    def json(self):
        return json.loads(self.body)


def call(
    proxy: LocalNginx,
    path: str,
    *,
    pki: LocalPKI | None = None,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
    plain: bool = False,
) -> Answer:
    """One request on a fresh connection from `source` (over HTTPS unless `plain`)."""
    address = (source, 0)
    if plain:
        conn = http.client.HTTPConnection(
            "127.0.0.1", proxy.plain_port, timeout=10, source_address=address
        )
    else:
        assert pki is not None
        conn = http.client.HTTPSConnection(
            "127.0.0.1",
            proxy.port,
            timeout=10,
            source_address=address,
            context=pki.client_context(),
        )
    try:
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers={**all_headers, **(headers or {})})
        return Answer(conn.getresponse())
    finally:
        conn.close()


HSTS = "strict-transport-security"


@pytest.mark.parametrize("path", ["/healthz", "/v1/chat/stream", "/docs", "/no-such-page"])
def test_every_https_answer_carries_hsts(edge, pki, path):
    method, body = ("POST", b"{}") if path.startswith("/v1/") else ("GET", None)
    answer = call(edge, path, pki=pki, method=method, body=body, headers=bearer(client_key("hsts")))
    assert answer.headers.get(HSTS) == "max-age=63072000", (answer.status, answer.headers)


def test_plain_http_redirects_to_https(edge):
    answer = call(edge, "/v1/chat/stream?x=1", plain=True)
    assert answer.status == 301
    assert answer.headers["location"] == f"https://127.0.0.1:{edge.port}/v1/chat/stream?x=1"
    assert HSTS not in answer.headers  # meaningless over plain HTTP


def test_plain_http_serves_acme_challenges_and_healthz(edge):
    (edge.acme_root / ".well-known" / "acme-challenge").mkdir(parents=True, exist_ok=True)
    (edge.acme_root / ".well-known" / "acme-challenge" / "token-123").write_text("token-123.thumb")
    challenge = call(edge, "/.well-known/acme-challenge/token-123", plain=True)
    assert (challenge.status, challenge.body) == (200, b"token-123.thumb")
    health = call(edge, "/healthz", plain=True)
    assert (health.status, health.json()) == (200, {"status": "ok"})


# --- limits -------------------------------------------------------------------------------------
# Requests the app answers at once without an upstream call (400: no prompt): limit_req counts
# every request before it reaches the app, whatever the app then answers.
CHEAP_PATH = chat.ROUTES[chat.TEXT]
CHEAP_BODY = b"{}"
ROLE_BURST = 20
ROLE_RATE_PER_KEY = 10
ROLE_STREAMS_PER_KEY = 20


def send_many(
    proxy: LocalNginx,
    pki: LocalPKI,
    count: int,
    *,
    headers: dict[str, str],
    source: str = "127.0.0.1",
    interval_s: float = 0.0,
) -> list[Answer]:
    """`count` cheap requests, one after another (`interval_s` apart), from `source`."""
    answers = []
    started = time.monotonic()
    for index in range(count):
        time.sleep(max(0.0, started + index * interval_s - time.monotonic()))
        answers.append(
            call(
                proxy,
                CHEAP_PATH,
                pki=pki,
                method="POST",
                body=CHEAP_BODY,
                headers=headers,
                source=source,
            )
        )
    return answers


def refused(answers: list[Answer]) -> list[Answer]:
    return [answer for answer in answers if answer.status == 429]


def assert_limit_answer(answer: Answer, message: str) -> None:
    assert answer.status == 429
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["retry-after"] == "1"
    assert answer.headers.get(HSTS) == "max-age=63072000"
    assert answer.json() == {
        "error": {
            "message": f"rate limit exceeded: {message}",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limited",
        }
    }


def test_a_burst_over_the_key_rate_gets_429_json_with_retry_after(edge, pki):
    answers = send_many(edge, pki, ROLE_BURST + 15, headers=bearer(client_key("burst")))

    passed = [answer for answer in answers if answer.status != 429]
    assert refused(answers), [answer.status for answer in answers]
    # The burst passes at once (1 + burst), then about one per 1/rate seconds.
    assert len(passed) >= ROLE_BURST + 1, [answer.status for answer in answers]
    assert all(answer.status == 400 for answer in passed)  # the app's own answer
    assert_limit_answer(refused(answers)[-1], "too many requests for this client")


def test_traffic_under_the_key_rate_is_never_limited(edge, pki):
    """More requests than the burst, spread at 80 % of the rate: every one passes."""
    interval_s = 1.25 / ROLE_RATE_PER_KEY
    answers = send_many(
        edge, pki, 2 * ROLE_BURST, headers=bearer(client_key("steady")), interval_s=interval_s
    )
    assert not refused(answers), [answer.status for answer in answers]


def test_each_key_has_its_own_limit(edge, pki):
    exhausted = bearer(client_key("exhausted"))
    assert refused(send_many(edge, pki, ROLE_BURST + 10, headers=exhausted))
    other = bearer(client_key("other"))
    # Alternating: the other key always passes while the exhausted one stays refused (it earns
    # one request per 1/rate seconds back).
    pairs = [
        (send_many(edge, pki, 1, headers=other)[0], send_many(edge, pki, 1, headers=exhausted)[0])
        for _ in range(6)
    ]
    assert not refused([first for first, _ in pairs]), [first.status for first, _ in pairs]
    assert len(refused([second for _, second in pairs])) >= 4, [s.status for _, s in pairs]


def test_requests_without_a_key_are_limited_per_address(edge, pki):
    flooding, quiet = fresh_address(), fresh_address()
    answers = send_many(edge, pki, ROLE_BURST + 10, headers={}, source=flooding)
    assert refused(answers), [answer.status for answer in answers]
    assert_limit_answer(refused(answers)[-1], "too many requests for this client")
    # Another address, and a keyed client on the same address, are not touched by it.
    assert not refused(send_many(edge, pki, 3, headers={}, source=quiet))
    keyed = send_many(edge, pki, 3, headers=bearer(client_key("same-address")), source=flooding)
    assert not refused(keyed)


# Long enough (150 tokens, 3 s) that every stream is still open when the last one has started.
LONG_STREAM = json.dumps(chat.body(chat.TEXT, max_tokens=150))


def open_streams(
    proxy: LocalNginx, pki: LocalPKI, count: int, key: str, stack: ExitStack
) -> list[tuple[http.client.HTTPSConnection, int]]:
    """`count` streams of one key, all sent before any head is read, held open after their head
    (closed by `stack`): each connection with the status it got."""
    conns = []
    for _ in range(count):
        conn = http.client.HTTPSConnection(
            "127.0.0.1", proxy.port, timeout=10, context=pki.client_context()
        )
        stack.callback(conn.close)
        conn.request(
            "POST",
            chat.ROUTES[chat.TEXT],
            body=LONG_STREAM,
            headers={"Content-Type": "application/json", **bearer(key)},
        )
        conns.append(conn)
    return [(conn, conn.getresponse().status) for conn in conns]


def test_concurrent_streams_per_key_are_limited(edge, pki):
    key = client_key("streams")
    with ExitStack() as stack:
        held = open_streams(edge, pki, ROLE_STREAMS_PER_KEY, key, stack)
        assert [status for _, status in held] == [200] * ROLE_STREAMS_PER_KEY
        one_more = call(
            edge,
            chat.ROUTES[chat.TEXT],
            pki=pki,
            method="POST",
            body=LONG_STREAM.encode(),
            headers=bearer(key),
        )
        assert_limit_answer(one_more, "too many concurrent streams for this client")
        other_key = call(
            edge,
            CHEAP_PATH,
            pki=pki,
            method="POST",
            body=CHEAP_BODY,
            headers=bearer(client_key("streams-other")),
        )
        assert other_key.status == 400  # another key streams on
        held[0][0].close()  # one client hangs up: nginx frees its slot at its next write
        deadline = time.monotonic() + 3.0
        while True:
            again = call(
                edge, CHEAP_PATH, pki=pki, method="POST", body=CHEAP_BODY, headers=bearer(key)
            )
            if again.status != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.status == 400, again.body


@pytest.fixture(scope="module")
def unlimited_edge(running, gateway, pki):
    """Negative control: the same edge with every limit_req/limit_conn line removed."""

    def without_limits(site: str) -> str:
        return without_lines(
            site, lambda line: line.lstrip().startswith(("limit_req ", "limit_conn "))
        )

    proxy = start_edge(running, gateway, pki, role_limits=True, site_edits=[without_limits])
    yield proxy
    proxy.stop()


def test_negative_control_without_the_limits_nothing_is_refused(unlimited_edge, pki):
    key = client_key("unlimited")
    assert not refused(send_many(unlimited_edge, pki, ROLE_BURST + 15, headers=bearer(key)))
    assert not refused(
        send_many(unlimited_edge, pki, ROLE_BURST + 15, headers={}, source=fresh_address())
    )
    with ExitStack() as stack:
        held = open_streams(unlimited_edge, pki, ROLE_STREAMS_PER_KEY + 1, key, stack)
        assert [status for _, status in held] == [200] * (ROLE_STREAMS_PER_KEY + 1)


def test_a_long_chat_history_fits_and_a_bigger_body_is_refused_by_nginx(edge, pki):
    history = [
        {"role": "user" if i % 2 else "assistant", "content": "word " * 2000} for i in range(150)
    ]  # about 1.5 MB of JSON
    fits = json.dumps({"messages": history}).encode()
    assert 1_400_000 < len(fits) < 2 * 1024 * 1024
    answer = call(
        edge, CHEAP_PATH, pki=pki, method="POST", body=fits, headers=bearer(client_key("history"))
    )
    assert answer.status != 413 or "error" in answer.json(), answer.body[:200]  # the app's say
    too_big = json.dumps({"messages": history * 2}).encode()
    answer = call(
        edge,
        CHEAP_PATH,
        pki=pki,
        method="POST",
        body=too_big,
        headers=bearer(client_key("history")),
    )
    assert answer.status == 413 and b"nginx" in answer.body, answer.body[:200]


# --- exposure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"])
def test_the_api_documentation_is_not_served_through_nginx(edge, gateway, pki, path):
    import urllib.request

    with urllib.request.urlopen(f"{gateway.base_url}{path}", timeout=5) as direct:
        assert direct.status == 200  # the app has it: nginx is what keeps it in
    answer = call(edge, path, pki=pki)
    assert answer.status == 404, (answer.status, answer.body[:200])


def test_metrics_answer_only_allowed_networks(edge, pki):
    allowed = call(edge, "/metrics", pki=pki)
    assert allowed.status == 200 and b"streamgate_" in allowed.body
    elsewhere = call(edge, "/metrics", pki=pki, source=fresh_address())
    assert elsewhere.status == 403


def test_metrics_refused_when_the_allow_list_leaves_the_client_out(running, gateway, pki):
    proxy = start_edge(running, gateway, pki, overrides={"nginx_metrics_allow": ["10.0.0.0/8"]})
    try:
        assert call(proxy, "/metrics", pki=pki).status == 403
    finally:
        proxy.stop()


@pytest.fixture
def not_ready_app():
    """An app that is up but not ready, with its reasons, as the gateway answers /readyz then."""
    reasons = {"status": "not ready", "problems": ["no upstream: set STREAMGATE_UPSTREAM_API_KEY"]}
    with ExitStack() as stack:
        port = serve_fixed_answer(stack, 503, "application/json", json.dumps(reasons).encode())
        yield f"127.0.0.1:{port}"


def test_readyz_tells_only_ready_or_not(edge, running, pki, not_ready_app):
    ready = call(edge, "/readyz", pki=pki)
    assert (ready.status, ready.json()) == (200, {"status": "ready"})
    # Not ready: the app's reasons stay behind nginx; down: the same bare answer.
    for upstream in (not_ready_app, "127.0.0.1:1"):
        proxy = LocalNginx([upstream], pki=pki)
        running.callback(proxy.stop)
        proxy.start(require_nginx())
        try:
            not_ready = call(proxy, "/readyz", pki=pki)
            assert (not_ready.status, not_ready.json()) == (503, {"status": "not ready"}), upstream
        finally:
            proxy.stop()


def test_the_client_key_is_in_no_nginx_log(edge, pki):
    """Runs after the tests above, which sent keys and were limited (error log lines)."""
    key = client_key("logged")
    call(edge, CHEAP_PATH, pki=pki, method="POST", body=CHEAP_BODY, headers=bearer(key))
    send_many(edge, pki, ROLE_BURST + 5, headers=bearer(key))
    assert edge.workdir is not None
    access = (edge.workdir / "access.log").read_text()
    errors = (edge.workdir / "error.log").read_text()
    assert CHEAP_PATH in access and "limiting requests" in errors
    assert "sk-edge-" not in access + errors
