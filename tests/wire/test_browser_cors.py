"""CORS at the edge (nginx_cors_allowed_origins), in a real browser: headless Chromium opens a
page served by another origin on loopback and calls the API of a local HTTPS edge rendered from
nginx/*.j2, in front of real gunicorn with client keys on and the simulator.

- From an allowed origin the browser's preflight is answered by nginx (never the app) and the
  stream comes through whole; a 401 from the app is readable by that page (an error it can show).
- From any other origin the browser refuses the answer (the fetch fails), the preflight carries
  no CORS header, and the request never reaches the model.
- Control: the same allowed origin against the role's default (no origins) is refused, so it
  is the variable that lets it in.
"""

from __future__ import annotations

import http.client
import http.server
import json
from contextlib import ExitStack

import pytest
from streamgate.simulator.script import expected_text
from support import browser, gixy, sse
from support.browser import PAGE_TOKENS
from support.fixed_answer import serve_fixed_answer
from support.nginx import LocalNginx
from support.tls import LocalPKI

CLIENT_KEY = "sk-browser-cors-key-0123456789abcdef"
API = "/v1/chat/completions"

# Runs in the other origin's page: a cross-origin streamed call, as that site's own code would.
CALL_API = """async ([url, key]) => {
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": `Bearer ${key}`},
      body: JSON.stringify({messages: [{role: "user", content: "hi"}], stream: true}),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let body = "";
    let reads = 0;
    for (;;) {
      const read = await reader.read();
      if (read.done) break;
      reads += 1;
      body += decoder.decode(read.value, {stream: true});
    }
    return {status: response.status, body, reads};
  } catch (error) {
    return {failed: `${error.name}: ${error.message}`};
  }
}"""


def serve_other_site(running: ExitStack) -> str:
    page = b"<!doctype html><title>another site</title><p>another site</p>"
    return f"http://127.0.0.1:{serve_fixed_answer(running, 200, 'text/html', page)}"


@pytest.fixture(scope="module")
def allowed_origin(running) -> str:
    return serve_other_site(running)


@pytest.fixture(scope="module")
def refused_origin(running) -> str:
    return serve_other_site(running)


@pytest.fixture(scope="module")
def backend(page_backend_factory):
    return page_backend_factory(CLIENT_KEY, workers=1)


@pytest.fixture(scope="module")
def cors_edge(page_edge_factory, backend, allowed_origin) -> LocalNginx:
    return page_edge_factory(backend.gateway, {"nginx_cors_allowed_origins": [allowed_origin]})


@pytest.fixture(scope="module")
def default_edge(page_edge_factory, backend) -> LocalNginx:
    return page_edge_factory(backend.gateway, {"nginx_cors_allowed_origins": []})


@pytest.fixture(scope="module")
def chromium(pki, cors_edge, default_edge):
    ports = (cors_edge.port, default_edge.port)
    with browser.chromium_trusting_loopback(pki.ca_certificate, *ports) as instance:
        yield instance


def call_from(chromium, origin: str, edge: LocalNginx, key: str = CLIENT_KEY) -> dict:
    page = chromium.new_page()
    try:
        page.goto(f"{origin}/")
        return page.evaluate(CALL_API, [f"{edge.base_url}{API}", key])
    finally:
        page.close()


def preflight(edge: LocalNginx, pki: LocalPKI, origin: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", edge.port, context=pki.client_context(), timeout=10
    )
    connection.request(
        "OPTIONS",
        API,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def cors_headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {
        k.lower(): v for k, v in response.getheaders() if k.lower().startswith("access-control")
    }


def access_lines(edge: LocalNginx, method: str) -> list[str]:
    assert edge.workdir is not None
    log = (edge.workdir / "access.log").read_text()
    return [line for line in log.splitlines() if f'"{method} {API}' in line]


def streamed_text(body: str) -> str:
    """The OpenAI stream's deltas, joined."""
    chunks = [json.loads(e.data) for e in sse.parse(body).events if e.data != "[DONE]"]
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for chunk in chunks
        for choice in chunk.get("choices", [])
    )


def test_an_allowed_origin_streams_through_the_browser(chromium, cors_edge, allowed_origin):
    result = call_from(chromium, allowed_origin, cors_edge)
    assert result.get("status") == 200, result
    assert result["reads"] > 1 and result["body"].rstrip().endswith("data: [DONE]"), result
    assert streamed_text(result["body"]) == expected_text(PAGE_TOKENS), result
    # The browser's preflight was answered by nginx itself (no upstream address logged).
    preflights = access_lines(cors_edge, "OPTIONS")
    assert preflights and all(" 204 " in line and "upstream=-" in line for line in preflights)


def test_a_401_is_readable_by_the_allowed_origin(chromium, cors_edge, allowed_origin):
    result = call_from(chromium, allowed_origin, cors_edge, key="sk-wrong-key-000000000000000000")
    assert result.get("status") == 401, result
    assert json.loads(result["body"])["error"]["code"] == "invalid_api_key", result


def test_another_origin_is_refused_and_never_reaches_the_model(
    chromium, cors_edge, refused_origin, backend
):
    started = backend.simulator.stats()["started"]
    result = call_from(chromium, refused_origin, cors_edge)
    assert result.get("failed", "").startswith("TypeError"), result
    assert backend.simulator.stats()["started"] == started


def test_the_preflight_headers_go_to_the_allowed_origin_only(
    cors_edge, pki, allowed_origin, refused_origin
):
    allowed = preflight(cors_edge, pki, allowed_origin)
    assert allowed.status == 204
    assert cors_headers(allowed) == {
        "access-control-allow-origin": allowed_origin,
        "access-control-expose-headers": "X-Request-ID, Retry-After",
        "access-control-allow-methods": "POST",
        "access-control-allow-headers": "Authorization, Content-Type, X-Request-ID",
        "access-control-max-age": "600",
    }
    refused = preflight(cors_edge, pki, refused_origin)
    assert refused.status == 204 and cors_headers(refused) == {}


def test_negative_control_without_the_variable_the_same_origin_is_refused(
    chromium, default_edge, allowed_origin
):
    result = call_from(chromium, allowed_origin, default_edge)
    assert result.get("failed", "").startswith("TypeError"), result


def test_gixy_finds_nothing_in_the_config_with_origins(cors_edge):
    """The CORS maps and headers keep the template gixy-clean (no add_header dropped in a nested
    block, no unsafe directive inside `if`): the default rendering is checked in tests/unit."""
    assert cors_edge.workdir is not None
    findings = gixy.findings(cors_edge.workdir / "nginx.conf")
    assert findings == [], json.dumps(findings, indent=1)
