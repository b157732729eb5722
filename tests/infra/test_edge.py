"""nginx on the edge hosts: installed, running, the effective config, and streaming itself.

The streaming check runs ON the edge host (tests/support/stream_probe.py, standard library
only, sent to the host's python3): a request through nginx must show the tokens arriving in
many separate reads spread over time. From the simulator (its pace and text known) the text must
be its own exactly; from any other upstream the answer is judged as the load test judges it
(complete, protocol whole, token by token at the stream's own pace). The same detector must
call a non-streamed answer "buffered" (negative control), and the `nginx -T` parser must catch a
location without `proxy_buffering off` (negative control on a sample config).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from streamgate.simulator.script import expected_text
from support import chat, stream_probe
from support.ci import skip_unless_ci
from support.upstream import SIMULATOR, setting

from infra.helpers import (
    any_upstream_verdict,
    any_upstream_whole_answer_verdict,
    check_output_as_root,
    probe_from,
)

testinfra_hosts = ["ansible://edge"]

# HTTPS when the play made the certificate (its CA next to the inventory, copied to the edge for
# the probe), else the plain HTTP of an edge without TLS.
HOST_CA_FILE = "/tmp/streamgate-testinfra-ca.pem"
STREAM_TOKENS = 50
# The simulator sends a token every 20 ms: 50 tokens span about 1 s.
MIN_SEPARATE_READS = 40
MIN_ARRIVAL_SPAN_S = 0.7


# ---------------------------------------------------------------- the effective nginx config


def location_blocks(config: str) -> dict[str, str]:
    """{location argument: body} for every `location` block in `nginx -T` output."""
    blocks = {}
    for match in re.finditer(r"^\s*location\s+([^{]+?)\s*\{", config, re.MULTILINE):
        depth, position = 1, match.end()
        while depth and position < len(config):
            depth += {"{": 1, "}": -1}.get(config[position], 0)
            position += 1
        blocks[match[1]] = config[match.end() : position - 1]
    return blocks


def unbuffered_violations(config: str) -> list[str]:
    """Streaming locations (under /v1/) that lack proxy_buffering off or proxy_cache off."""
    streaming = {path: body for path, body in location_blocks(config).items() if "/v1" in path}
    assert streaming, "no streaming location (/v1/...) in the config"
    return [
        path
        for path, body in streaming.items()
        if not re.search(r"^\s*proxy_buffering\s+off;", body, re.MULTILINE)
        or not re.search(r"^\s*proxy_cache\s+off;", body, re.MULTILINE)
    ]


SAMPLE_GOOD = """
server {
    location /v1/ { proxy_pass http://x;
        proxy_buffering off;
        proxy_cache off;
    }
    location / { proxy_pass http://x; }
}
"""


def test_config_parser_accepts_unbuffered_streaming_locations():
    assert unbuffered_violations(SAMPLE_GOOD) == []


def test_config_parser_catches_a_buffered_streaming_location():
    """Negative control: drop the directive from one location and the check must name it."""
    bad = SAMPLE_GOOD.replace(
        "location / {", "location /v1/chat/stream {\n proxy_buffering on;\n}\nlocation / {"
    )
    assert unbuffered_violations(bad) == ["/v1/chat/stream"]


@pytest.fixture(scope="module")
def effective_config(host) -> str:
    return check_output_as_root(host, "nginx -T 2>/dev/null")


def test_nginx_is_installed_running_and_enabled(host):
    assert host.package("nginx").is_installed
    service = host.service("nginx")
    assert service.is_running
    assert service.is_enabled


def test_nginx_listens_on_its_plain_port(host, hostvars):
    assert host.socket(f"tcp://0.0.0.0:{setting(hostvars, 'nginx_listen')}").is_listening


def test_default_site_is_removed(host):
    assert not host.file("/etc/nginx/sites-enabled/default").exists


def test_every_streaming_location_has_buffering_off(effective_config):
    assert unbuffered_violations(effective_config) == []


@pytest.mark.parametrize(
    "directive",
    [
        r"server_tokens off;",
        r"proxy_http_version 1\.1;",
        r'proxy_set_header Connection "";',
        r"keepalive \d+;",
        r"client_max_body_size \d+[kmg]?;",
        r"worker_shutdown_timeout \S+;",
        r"gzip off;",
    ],
)
def test_effective_config_has(effective_config, directive):
    assert re.search(rf"^\s*{directive}", effective_config, re.MULTILINE), directive


def test_upstream_lists_every_app_host(host, effective_config):
    upstream = re.search(r"upstream streamgate_app \{(.*?)\}", effective_config, re.DOTALL)
    assert upstream, "no upstream streamgate_app block"
    servers = re.findall(r"^\s*server\s+(\S+?)(?:\s|;)", upstream[1], re.MULTILINE)
    app_hosts = host.ansible.get_variables()["groups"]["app"]
    assert len(servers) == len(app_hosts), (servers, app_hosts)


# ---------------------------------------------------------------- streaming through nginx


@pytest.fixture(scope="module")
def edge_url(host, hostvars, request) -> tuple[str, list[str]]:
    """(base URL on the edge host, probe options to verify it): https with the inventory's CA."""
    inventory = request.config.option.ansible_inventory
    ca = Path(inventory).parent / "ca.pem" if inventory else None
    if ca is None or not ca.is_file():
        return f"http://127.0.0.1:{setting(hostvars, 'nginx_listen')}", []
    result = host.run(f"printf %s {shlex.quote(ca.read_text())} > {HOST_CA_FILE}")
    assert result.rc == 0, result.stderr
    return f"https://127.0.0.1:{setting(hostvars, 'nginx_listen_tls')}", ["--cafile", HOST_CA_FILE]


def probe_on_host(host, edge_url, path: str, body: dict, key: str | None) -> stream_probe.Trace:
    """Run the stdlib probe on the edge host against nginx (asking for gzip, which the edge must
    not apply to a stream). `key`: sent as `Authorization: Bearer <key>` (None: no header)."""
    base, tls_options = edge_url
    auth = (f"Authorization: Bearer {key}",) if key is not None else ()
    headers = ("Accept-Encoding: gzip", *auth)
    return probe_from(host, f"{base}{path}", body, headers, tuple(tls_options))


def describe(trace: stream_probe.Trace) -> str:
    return (
        f"{stream_probe.summarize(trace)} reads={[f'{r.at_s * 1000:.0f}ms' for r in trace.reads]}"
    )


def verdict(trace: stream_probe.Trace) -> str:
    return stream_probe.streaming_verdict(
        trace, min_reads=MIN_SEPARATE_READS, min_span_s=MIN_ARRIVAL_SPAN_S
    )


def stream_body(route: str) -> dict:
    """A streamed request; on the OpenAI route with the usage, so its token count is known."""
    extra = {"stream_options": {"include_usage": True}} if route == chat.OPENAI else {}
    return chat.body(route, max_tokens=STREAM_TOKENS, **extra)


@pytest.mark.parametrize("route", list(chat.ROUTES))
def test_tokens_arrive_through_nginx_one_by_one(host, edge_url, route, client_key, upstream_kind):
    trace = probe_on_host(host, edge_url, chat.ROUTES[route], stream_body(route), client_key)

    assert trace.status == 200 and trace.complete, (trace.status, trace.error, trace.body[:300])
    if upstream_kind != SIMULATOR:
        assert any_upstream_verdict(route, trace) is None, describe(trace)
        return
    assert verdict(trace) == stream_probe.STREAMED, describe(trace)
    assert chat.decode(route, trace).content == expected_text(STREAM_TOKENS)


def test_negative_control_a_whole_answer_is_judged_buffered(
    host, edge_url, client_key, upstream_kind
):
    """The same detector on the non-streamed completion (one JSON body) must say BUFFERED."""
    body = chat.body(chat.OPENAI, max_tokens=STREAM_TOKENS, stream=False)
    trace = probe_on_host(host, edge_url, chat.ROUTES[chat.OPENAI], body, client_key)

    assert trace.status == 200 and trace.complete, (trace.status, trace.error, trace.body[:300])
    if upstream_kind != SIMULATOR:
        judged = any_upstream_whole_answer_verdict(trace)
        assert judged and judged.startswith(stream_probe.BUFFERED), (judged, describe(trace))
        return
    answer = json.loads(trace.body)
    assert answer["choices"][0]["message"]["content"] == expected_text(STREAM_TOKENS)
    assert verdict(trace) == stream_probe.BUFFERED, describe(trace)


# ---------------------------------------------------------------- client keys


@pytest.mark.parametrize("route", list(chat.ROUTES))
@pytest.mark.parametrize("sent", ["no key", "wrong key"])
def test_chat_routes_refuse_a_request_without_a_valid_key(host, edge_url, route, sent, client_key):
    """With keys configured, no key or a wrong one is a 401 in OpenAI's shape, through nginx.
    (The streaming tests above, with the lab's key, are the control: the key is what differs.)"""
    if client_key is None:
        skip_unless_ci(
            "no client key known: STREAMGATE_CLIENT_KEY or a client-key file next to the inventory"
        )
    key = None if sent == "no key" else "not-the-key-" + "x" * 32
    trace = probe_on_host(
        host, edge_url, chat.ROUTES[route], chat.body(route, max_tokens=STREAM_TOKENS), key
    )
    assert trace.status == 401, (trace.status, trace.body[:300])
    assert json.loads(trace.body)["error"]["code"], trace.body[:300]
