"""The chat page (web/) in a real browser: headless Chromium (Debian's) opens it on a local HTTPS
edge rendered from nginx/*.j2 (nginx_chat_page, the role's defaults and limits), in front of real
gunicorn with client keys on and the simulator (50 tokens, 20 ms apart).

Everything is read from the page's own DOM (support.browser.GROWTH_RECORDER): the answer grows in
>= 45 separate steps over >= 0.8 s and ends equal to the simulator's text; Stop aborts the fetch
and the simulator records the cancel of that request; 401, 429 and an in-band error are shown as
errors, never as model text; history goes back with the next question; the page runs under the
edge's Content-Security-Policy with no violation; keys stay in the tab's session storage.

Negative control: the same question through a buffering nginx (proxy_buffering on, the app's
X-Accel-Buffering ignored, gzip on the stream types) fails the growth assertion.
"""

from __future__ import annotations

import http.client
import json

import pytest
from streamgate.simulator.script import expected_text
from support import browser
from support.browser import PAGE_TOKENS
from support.nginx import LocalNginx
from support.procs import wait_until

MIN_GROWTH_STEPS = 45
MIN_GROWTH_SPAN_S = 0.8
CLIENT_KEY = "sk-browser-test-key-0123456789abcdef"
PROMPT = "Why does buffering break streaming?"


@pytest.fixture(scope="module")
def backend(page_backend_factory):
    return page_backend_factory(CLIENT_KEY, workers=2)


@pytest.fixture(scope="module")
def edge(page_edge_factory, backend) -> LocalNginx:
    """The HTTPS edge as the role renders it, the page on (its limits lifted: the tests open the
    page again and again from one address)."""
    return page_edge_factory(backend.gateway)


@pytest.fixture(scope="module")
def buffering_edge(page_edge_factory, backend):
    proxy = page_edge_factory(backend.gateway, buffering_fault=True)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def chromium(pki, edge, buffering_edge):
    ports = (edge.port, buffering_edge.port)
    with browser.chromium_trusting_loopback(pki.ca_certificate, *ports) as instance:
        yield instance


@pytest.fixture
def page(chromium, edge):
    page, response = browser.open_page(chromium, f"{edge.base_url}/")
    assert response.status == 200
    yield page
    page.close()


def assert_streamed(answer: browser.Answer) -> None:
    assert answer.steps >= MIN_GROWTH_STEPS, answer.describe()
    assert answer.span_s >= MIN_GROWTH_SPAN_S, answer.describe()


# --- streaming ----------------------------------------------------------------------------------


def test_the_answer_grows_word_by_word_in_the_page_and_equals_the_simulators(page):
    browser.ask(page, PROMPT, key=CLIENT_KEY)
    browser.wait_answered(page)
    answer = browser.last_answer(page)
    print(f"through the edge: {answer.describe()}")
    assert_streamed(answer)
    assert answer.text == expected_text(PAGE_TOKENS), answer.describe()
    assert not answer.error and not answer.outcome, answer.describe()
    # One mark per read, as many as the page counted; the measures are filled in.
    assert answer.marks == int(answer.reads_shown) >= MIN_GROWTH_STEPS, answer.describe()
    assert answer.ttft_shown.endswith(" ms") and float(answer.rate_shown) > 0, answer.describe()
    assert browser.csp_violations(page) == []


def test_negative_control_a_buffering_nginx_fails_the_growth_assertion(chromium, buffering_edge):
    page, _ = browser.open_page(chromium, f"{buffering_edge.base_url}/")
    try:
        browser.ask(page, PROMPT, key=CLIENT_KEY)
        browser.wait_answered(page)
        answer = browser.last_answer(page)
    finally:
        page.close()
    print(f"through the buffering nginx: {answer.describe()}")
    # The whole answer arrived: only its pace gives the hop away.
    assert answer.text == expected_text(PAGE_TOKENS), answer.describe()
    with pytest.raises(AssertionError):
        assert_streamed(answer)


def test_the_page_is_served_with_its_security_headers_and_runs_under_them(chromium, edge):
    page, response = browser.open_page(chromium, f"{edge.base_url}/")
    try:
        headers = response.all_headers()
        script = page.evaluate(
            "fetch('/page/app.js').then((r) => [r.status, r.headers.get('content-type')])"
        )
        violations = browser.csp_violations(page)
    finally:
        page.close()
    assert "script-src 'self'" in headers["content-security-policy"], headers
    assert headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" in headers
    assert script[0] == 200 and script[1].startswith("text/javascript"), script
    assert violations == []


def test_negative_control_a_browser_without_the_test_ca_cannot_open_the_page(chromium, edge):
    """The browser trusts the test CA's certificate, not any certificate."""
    outcome = browser.opens(chromium, f"{edge.base_url}/")
    assert "ERR_CERT_AUTHORITY_INVALID" in outcome, outcome


# --- history, stop ------------------------------------------------------------------------------


def test_the_conversation_is_sent_back_as_history(page):
    bodies: list[dict] = []

    def keep_body(request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", keep_body)
    browser.ask(page, "first question", key=CLIENT_KEY)
    browser.wait_answered(page)
    first = browser.last_answer(page)
    browser.ask(page, "second question")
    # Mid-answer, for the test report (not while an answer's growth is judged: a screenshot
    # holds the page's thread, and reads that wait meanwhile are taken as one).
    browser.wait_growth(page, PAGE_TOKENS + 20)
    browser.screenshot(page, "chat-page-mid-answer")
    browser.wait_answered(page)
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"], bodies
    assert bodies[1]["messages"][1]["content"] == first.text == expected_text(PAGE_TOKENS)
    assert bodies[1]["stream"] is True


def test_stop_aborts_the_fetch_and_the_gateway_cancels_the_upstream(page, backend):
    browser.ask(page, PROMPT, key=CLIENT_KEY)
    browser.wait_growth(page, 5)
    page.focus("#stop")
    page.keyboard.press("Enter")  # by keyboard, as a person without a mouse does
    browser.wait_answered(page)
    answer = browser.last_answer(page)
    assert answer.outcome == "stopped" and not answer.error, answer.describe()
    assert 0 < len(answer.text) < len(expected_text(PAGE_TOKENS)), answer.describe()

    def cancelled():
        cancels = backend.simulator.stats()["recent_cancels"]
        return next((c for c in cancels if c["request_id"] == answer.request_id), None)

    cancel = wait_until(cancelled, timeout_s=3, what=f"the cancel of {answer.request_id}")
    assert isinstance(cancel, dict) and 0 < cancel["tokens_sent"] < PAGE_TOKENS, cancel


def test_negative_control_an_answer_read_to_its_end_is_never_cancelled(page, backend):
    """The cancel detector above must be able to fail."""
    browser.ask(page, PROMPT, key=CLIENT_KEY)
    browser.wait_answered(page)
    request_id = browser.last_answer(page).request_id
    assert request_id in backend.simulator.stats()["recent_request_ids"]
    cancels = backend.simulator.stats()["recent_cancels"]
    assert all(c["request_id"] != request_id for c in cancels), cancels


# --- errors and keys ----------------------------------------------------------------------------


NEEDS_A_KEY = "This gateway needs a valid client key"  # web/app.js, its 401 message


@pytest.mark.parametrize(
    ("key", "model", "error_start", "focus"),
    [
        pytest.param("", None, NEEDS_A_KEY, "key", id="missing-key-401"),
        pytest.param(
            "sk-wrong-key-000000000000000000000000", None, NEEDS_A_KEY, "key", id="wrong-key-401"
        ),
        pytest.param(CLIENT_KEY, "sim-fault-429", "Too many requests", "prompt", id="429"),
    ],
)
def test_a_refused_request_is_an_error_never_model_text(page, key, model, error_start, focus):
    """After a 401 the key field gets the focus (the key is what to fix); after a 429 the
    prompt keeps it."""
    browser.ask(page, PROMPT, key=key, model=model)
    browser.wait_answered(page)
    answer = browser.last_answer(page)
    assert answer.error.startswith(error_start) and not answer.text, answer.describe()
    assert page.evaluate("document.activeElement.id") == focus
    # Nothing was shown as the model's words.
    assert page.locator("#log li.assistant").count() == 0


def test_an_in_band_error_is_an_error_after_the_words_that_came(page):
    browser.ask(page, PROMPT, key=CLIENT_KEY, model="sim-fault-error-midstream")
    browser.wait_answered(page)
    answer = browser.last_answer(page)
    assert answer.error.startswith("The answer broke off"), answer.describe()
    assert answer.outcome == "failed", answer.describe()
    assert expected_text(PAGE_TOKENS).startswith(answer.text), answer.describe()
    assert "error" not in answer.text.lower(), answer.describe()


def test_the_key_is_kept_in_session_storage_only(page):
    browser.ask(page, PROMPT, key=CLIENT_KEY)
    browser.wait_answered(page)
    stored = page.evaluate(
        "[sessionStorage.getItem('streamgate.clientKey'), JSON.stringify(localStorage),"
        " document.cookie]"
    )
    assert stored == [CLIENT_KEY, "{}", ""]
    page.reload()
    browser.wait_for(page, "window.streamgateChat !== undefined", timeout_s=10, what="the page")
    assert page.input_value("#key") == CLIENT_KEY  # the same tab keeps it


def test_the_page_reads_on_a_phone(chromium, edge):
    page, _ = browser.open_page(
        chromium, f"{edge.base_url}/", viewport={"width": 360, "height": 740}
    )
    try:
        widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        labels = page.evaluate(
            "['prompt', 'key', 'model'].map((id) => document.querySelector(`label[for=${id}]`)"
            " !== null)"
        )
    finally:
        page.close()
    assert widths[0] <= widths[1], f"the page scrolls sideways on a phone: {widths}"
    assert labels == [True, True, True]


def test_with_the_page_off_the_root_goes_to_the_app(page_edge_factory, backend, pki):
    """nginx_chat_page: false renders no page location: / and /page/ are the app's 404s."""
    proxy = page_edge_factory(backend.gateway, {"nginx_chat_page": False})
    try:
        context = pki.client_context()
        answers = {}
        for path in ("/", "/page/app.js"):
            connection = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context)
            connection.request("GET", path)
            response = connection.getresponse()
            answers[path] = (response.status, response.read())
            connection.close()
    finally:
        proxy.stop()
    assert answers == {path: (404, b'{"detail":"Not Found"}') for path in answers}, answers
