"""HTTPS at the edge, as deployed: the certificate and its key on the host, a verified handshake
from the controller with the CA the play wrote next to the inventory, plain HTTP redirecting,
gixy-ng on the effective config (`nginx -T`), the per-key limits answering 429 past a burst, and
a stream over HTTP/2 from the controller arriving token by token.

Negative controls: the same handshake without the CA must fail verification; gixy must report
an `add_header` added to the streaming location of the same dump; a burst under the limit must
see no 429 (so a limit that refuses everything cannot pass); a non-streamed answer over the same
HTTP/2 path must be judged buffered.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import ssl
import tempfile
from pathlib import Path

import pytest
from streamgate.simulator.script import expected_text
from support import chat, gixy, h2_probe, stream_probe
from support.ci import skip_unless_ci
from support.upstream import SIMULATOR, setting

from infra.helpers import (
    any_upstream_verdict,
    any_upstream_whole_answer_verdict,
    check_output_as_root,
)

testinfra_hosts = ["ansible://edge"]

CERTIFICATE = "/etc/nginx/streamgate-tls/fullchain.pem"
PRIVATE_KEY = "/etc/nginx/streamgate-tls/privkey.pem"
HOST_CA_FILE = "/tmp/streamgate-testinfra-ca.pem"


@pytest.fixture(scope="module")
def ca_file(request) -> Path:
    inventory = request.config.option.ansible_inventory
    path = Path(inventory).parent / "ca.pem" if inventory else None
    if not path or not path.is_file():
        skip_unless_ci(
            "no ca.pem next to the inventory (the play writes it when it makes the certificate)"
        )
    return path


@pytest.fixture(scope="module")
def effective_config(host) -> str:
    return check_output_as_root(host, "nginx -T 2>/dev/null")


@pytest.fixture(scope="module")
def edge_address(hostvars) -> str:
    return hostvars.get("ansible_host") or hostvars["inventory_hostname"]


@pytest.fixture(scope="module")
def ca_on_host(host, ca_file) -> str:
    """The CA, copied to the edge host for the probes that run there (public data)."""
    result = host.run(f"printf %s {shlex.quote(ca_file.read_text())} > {HOST_CA_FILE}")
    assert result.rc == 0, result.stderr
    return HOST_CA_FILE


@pytest.fixture(scope="module")
def tls_port(hostvars) -> int:
    return int(setting(hostvars, "nginx_listen_tls"))


def test_nginx_listens_on_its_tls_port(host, tls_port):
    assert host.socket(f"tcp://0.0.0.0:{tls_port}").is_listening


@pytest.mark.parametrize(("path", "mode"), [(CERTIFICATE, 0o644), (PRIVATE_KEY, 0o600)])
def test_certificate_and_key_files(host, path, mode):
    with host.sudo():
        placed = host.file(path)
        assert placed.exists, path
        assert (placed.user, placed.group, placed.mode) == ("root", "root", mode)


def handshake(address: str, port: int, context: ssl.SSLContext) -> tuple[str, dict]:
    with (
        socket.create_connection((address, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=address) as tls,
    ):
        return tls.version(), tls.getpeercert()


def test_handshake_from_the_controller_verifies_with_the_ca(edge_address, tls_port, ca_file):
    version, certificate = handshake(
        edge_address, tls_port, ssl.create_default_context(cafile=str(ca_file))
    )
    assert version in ("TLSv1.2", "TLSv1.3")
    names = [value for _, value in certificate.get("subjectAltName", ())]
    assert edge_address in names, names


def test_negative_control_handshake_without_the_ca_fails(edge_address, tls_port):
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(edge_address, tls_port, ssl.create_default_context())


def test_plain_http_redirects_to_https(host):
    answer = host.check_output(
        "curl -s -o /dev/null -w '%{http_code} %{redirect_url}' --max-time 5 http://127.0.0.1/v1/chat/stream"
    )
    status, location = answer.split(" ", 1)
    assert status == "301" and location.startswith("https://"), answer


def gixy_findings(dump: str) -> list[dict]:
    """gixy on the text of `nginx -T` (one file holding every included one)."""
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "nginx-T.conf"
        path.write_text(dump)
        return gixy.findings(path)


def test_gixy_finds_nothing_in_the_effective_config(effective_config):
    assert "ssl_certificate" in effective_config
    findings = gixy_findings(effective_config)
    assert findings == [], json.dumps(findings, indent=1)


def test_negative_control_gixy_reports_a_header_that_drops_hsts(effective_config):
    marker = "    location /v1/ {\n"
    assert marker in effective_config
    findings = gixy_findings(
        effective_config.replace(marker, marker + "        add_header X-Probe 1;\n")
    )
    assert "add_header_redefinition" in [finding["plugin"] for finding in findings], findings


# Runs on the edge (python3, standard library): `count` streams with one key at once over HTTPS,
# each connected and handshaken first, then all sent together; prints the statuses it got.
BURST = r"""
import http.client, json, ssl, sys, threading
count, key, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tokens, port = int(sys.argv[4]), int(sys.argv[5])
context = ssl.create_default_context(cafile=cafile)
body = json.dumps({"model": "sim", "stream": True, "max_tokens": tokens,
                   "messages": [{"role": "user", "content": "burst"}]})
start, statuses, lock = threading.Barrier(count), [], threading.Lock()
def one():
    status = "error"
    try:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
        connection.connect()
        start.wait(timeout=60)
        connection.request("POST", "/v1/chat/completions", body,
                           {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        response = connection.getresponse()
        status = response.status
        response.read()
        connection.close()
    except Exception as error:
        status = type(error).__name__
    with lock:
        statuses.append(status)
threads = [threading.Thread(target=one) for _ in range(count)]
for thread in threads: thread.start()
for thread in threads: thread.join(timeout=120)
print(json.dumps(statuses))
"""


# Long enough that every stream of a burst is still open when the last one arrives: 250
# simulator tokens take 5 s. A real server answers streams beyond its parallel slots one batch
# after another, so a short answer keeps the whole burst open for seconds (and the queue short).
BURST_TOKENS = {SIMULATOR: 250}
BURST_TOKENS_ANY_UPSTREAM = 20


@pytest.fixture(scope="module")
def burst(host, ca_on_host, tls_port, upstream_kind):
    """burst(count, key) -> the statuses of `count` streams sent at once with one key."""
    tokens = BURST_TOKENS.get(upstream_kind, BURST_TOKENS_ANY_UPSTREAM)

    def send(count: int, key: str) -> list:
        result = host.run(
            f"python3 -c {shlex.quote(BURST)} {count} {shlex.quote(key)} "
            f"{ca_on_host} {tokens} {tls_port}"
        )
        assert result.rc == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    return send


@pytest.fixture(scope="module")
def streams_per_key(effective_config) -> int:
    match = re.search(r"limit_conn streamgate_streams (\d+);", effective_config)
    assert match, "no limit_conn streamgate_streams in the effective config"
    return int(match[1])


def test_burst_over_the_stream_limit_gets_429_from_the_edge(burst, client_key, streams_per_key):
    """streams_per_key + 30 streams at once with one key: about 30 answered 429, the rest 200."""
    if client_key is None:
        skip_unless_ci("no client key known")
    over = 30
    statuses = burst(streams_per_key + over, client_key)
    assert statuses.count(429) >= over // 2, sorted(set(map(str, statuses)))
    assert statuses.count(200) >= streams_per_key - over, sorted(set(map(str, statuses)))
    assert set(statuses) <= {200, 429}, sorted(set(map(str, statuses)))


def test_negative_control_burst_under_the_limit_gets_no_429(burst, client_key, streams_per_key):
    if client_key is None:
        skip_unless_ci("no client key known")
    statuses = burst(streams_per_key * 2 // 3, client_key)
    assert statuses == [200] * len(statuses), sorted(set(map(str, statuses)))


# ---------------------------------------------------------------- HTTP/2 from the controller

H2_STREAM_TOKENS = 50
# The simulator sends a token every 20 ms: 50 tokens span about 1 s (as in test_edge.py).
H2_MIN_SEPARATE_READS = 40
H2_MIN_ARRIVAL_SPAN_S = 0.7


@pytest.fixture(scope="module")
def h2_trace(edge_address, tls_port, ca_file, client_key):
    """h2_trace(body) -> the trace of one request to the OpenAI route over HTTP/2."""
    headers = {"Authorization": f"Bearer {client_key}"} if client_key else {}

    def send(body: dict):
        return h2_probe.request(
            edge_address,
            tls_port,
            chat.ROUTES[chat.OPENAI],
            body,
            headers=headers,
            tls=ssl.create_default_context(cafile=str(ca_file)),
            timeout_s=30,
        )

    return send


def h2_verdict(trace) -> str:
    """The simulator's answer over HTTP/2: streamed (enough separate reads over long enough) or
    buffered."""
    return stream_probe.streaming_verdict(
        trace, min_reads=H2_MIN_SEPARATE_READS, min_span_s=H2_MIN_ARRIVAL_SPAN_S
    )


def test_tokens_arrive_one_by_one_over_http2(h2_trace, upstream_kind):
    trace = h2_trace(
        chat.body(chat.OPENAI, max_tokens=H2_STREAM_TOKENS, stream_options={"include_usage": True})
    )
    assert trace.status == 200 and trace.complete, (trace.status, trace.error, trace.body[:300])
    if upstream_kind != SIMULATOR:
        assert any_upstream_verdict(chat.OPENAI, trace) is None, stream_probe.summarize(trace)
        return
    assert h2_verdict(trace) == stream_probe.STREAMED, stream_probe.summarize(trace)
    assert chat.decode(chat.OPENAI, trace).content == expected_text(H2_STREAM_TOKENS)


def test_negative_control_a_whole_answer_over_http2_is_judged_buffered(h2_trace, upstream_kind):
    trace = h2_trace(chat.body(chat.OPENAI, max_tokens=H2_STREAM_TOKENS, stream=False))
    assert trace.status == 200 and trace.complete, (trace.status, trace.error, trace.body[:300])
    if upstream_kind != SIMULATOR:
        judged = any_upstream_whole_answer_verdict(trace)
        assert judged and judged.startswith(stream_probe.BUFFERED), (
            judged,
            stream_probe.summarize(trace),
        )
        return
    assert h2_verdict(trace) == stream_probe.BUFFERED, stream_probe.summarize(trace)
