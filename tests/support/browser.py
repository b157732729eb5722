"""Debian's Chromium, headless, driven by Playwright: the chat page (web/) as a person's browser
runs it, on a local edge (tests/wire/test_browser_*.py) or on the lab's (tests/e2e).

Nothing is downloaded: Playwright starts /usr/bin/chromium (`make deps` installs it). HTTPS is
trusted the way a person would trust the edge's CA, without touching any system store: Python
verifies the edge's certificate against the CA (chain and name), then Chromium is told to accept
that one certificate's key (--ignore-certificate-errors-spki-list). A certificate from any other
key still fails in the browser.

What the page shows is read from its own DOM: GROWTH_RECORDER, installed before the page's
script runs, timestamps every growth of the answer's text with a MutationObserver.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.ci import skip_unless_ci

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
PAGE_SOURCE = REPO / "web"
# Screenshots and other artifacts of the browser tests (git-ignored).
REPORTS = REPO / "tests" / "reports" / "browser"
# The local simulator behind the page: the growth the page must show is read against this pace.
PAGE_TOKENS = 50
PAGE_PACING = {"tokens": PAGE_TOKENS, "gap_ms": 20, "ttft_ms": 50}

# Each growth of the latest answer's text, with the time it was seen (ms, performance.now()),
# and every Content-Security-Policy violation the page caused.
GROWTH_RECORDER = """
window.__growth = [];
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
new MutationObserver(() => {
  const answers = document.querySelectorAll("#log li.assistant .text");
  const answer = answers[answers.length - 1];
  if (!answer) return;
  const length = answer.textContent.length;
  const last = window.__growth[window.__growth.length - 1];
  const count = answers.length;
  if (!last || last.answer !== count || last.length !== length) {
    window.__growth.push({ at: performance.now(), answer: count, length });
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


def require_chromium() -> str:
    """Debian's chromium; a skip when it is missing, except under CI where it is a failure."""
    if not Path(CHROMIUM).is_file():
        skip_unless_ci("chromium not found (Debian: apt-get install chromium; `make deps` as root)")
    return CHROMIUM


def spki_pin(host: str, port: int, ca_file: Path) -> str:
    """The base64 SHA-256 of the public key the server at host:port presents, once Python has
    verified its certificate against `ca_file` (chain, dates and the name `host`)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der, f"{host}:{port} presented no certificate"
    public_key = x509.load_der_x509_certificate(der).public_key()
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextmanager
def chromium(*, trusted_keys: tuple[str, ...] = ()) -> Iterator:
    """A headless Chromium (Playwright's Browser) that accepts certificates with these keys."""
    from playwright.sync_api import sync_playwright  # the wheel is a test tool only

    args = (
        [f"--ignore-certificate-errors-spki-list={','.join(trusted_keys)}"] if trusted_keys else []
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=require_chromium(), headless=True, args=args
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def chromium_trusting_loopback(ca_file: Path, *ports: int) -> Iterator:
    """chromium() accepting the certificates of the HTTPS servers on these loopback ports, each
    verified against `ca_file` first (the local edges of the wire tests)."""
    keys = tuple(sorted({spki_pin("127.0.0.1", port, ca_file) for port in ports}))
    with chromium(trusted_keys=keys) as instance:
        yield instance


def opens(other_browser, url: str) -> str:
    """How a second Chromium from the same Playwright, trusting no key, fares at `url`: "opened",
    or the error it met (controls of the trust above: a certificate error is expected)."""
    from playwright.sync_api import Error as PlaywrightError

    untrusting = other_browser.browser_type.launch(
        executable_path=require_chromium(), headless=True
    )
    try:
        untrusting.new_page().goto(url)
        return "opened"
    except PlaywrightError as error:
        return str(error).splitlines()[0]
    finally:
        untrusting.close()


@dataclass
class Answer:
    """One answer as the page showed it."""

    text: str
    error: str
    outcome: str
    growth: list[dict]  # [{"at": ms, "answer": n, "length": chars}] of this answer
    reads_shown: str
    marks: int
    ttft_shown: str
    rate_shown: str
    request_id: str

    @property
    def steps(self) -> int:
        """Separate growths of the text (the first one included)."""
        return sum(1 for g in self.growth if g["length"] > 0)

    @property
    def span_s(self) -> float:
        grown = [g["at"] for g in self.growth if g["length"] > 0]
        return (grown[-1] - grown[0]) / 1000 if len(grown) > 1 else 0.0

    def describe(self) -> str:
        return (
            f"steps={self.steps} span={self.span_s:.3f}s reads={self.reads_shown} "
            f"marks={self.marks} ttft={self.ttft_shown} rate={self.rate_shown} "
            f"error={self.error!r} outcome={self.outcome!r} text={self.text[:80]!r}"
        )


def wait_for(page, expression: str, *, timeout_s: float, what: str) -> None:
    """Until `expression` is truthy in the page. Polled from here: Playwright's own
    wait_for_function evaluates a string inside the page, which the page's CSP refuses (no
    'unsafe-eval'), and must."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        page.wait_for_timeout(20)


def open_page(browser, url: str, *, viewport: dict | None = None):
    """A new page with the growth recorder, at `url`; returns (page, its main response)."""
    page = browser.new_page(viewport=viewport or {"width": 900, "height": 900})
    page.add_init_script(GROWTH_RECORDER)
    response = page.goto(url, wait_until="load")
    wait_for(page, "window.streamgateChat !== undefined", timeout_s=10, what="the page's script")
    return page, response


def ask(page, prompt: str, *, key: str | None = None, model: str | None = None) -> None:
    """Type a question as a person does (the key and model first, if given) and press Enter."""
    if key is not None:
        page.fill("#key", key)
    if model is not None:
        page.fill("#model", model)
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def wait_answered(page, *, timeout_s: float = 20) -> None:
    """Until the page is ready for the next question (the stream ended, failed or stopped)."""
    wait_for(
        page,
        "document.querySelector('#log').getAttribute('aria-busy') === 'false'"
        " && !document.querySelector('#send').disabled",
        timeout_s=timeout_s,
        what="the end of the answer",
    )


def wait_growth(page, steps: int, *, timeout_s: float = 10) -> None:
    wait_for(
        page,
        f"window.__growth.filter((g) => g.length > 0).length >= {steps}",
        timeout_s=timeout_s,
        what=f"{steps} growths of the answer",
    )


def last_answer(page) -> Answer:
    """What the page shows for its latest answer, and how its text grew."""
    state = page.evaluate(
        """() => {
        const items = document.querySelectorAll('#log li.assistant');
        const item = items[items.length - 1];
        const error = document.querySelector('#error');
        return {
          count: items.length,
          text: item ? item.querySelector('.text').textContent : '',
          outcome: item ? (item.dataset.outcome || '') : '',
          error: error.hidden ? '' : error.textContent,
          growth: window.__growth,
          reads: document.querySelector('#reads').textContent,
          marks: document.querySelectorAll('#strip .mark').length,
          ttft: document.querySelector('#ttft').textContent,
          rate: document.querySelector('#rate').textContent,
          requestId: document.querySelector('#request-id').textContent,
        };
    }"""
    )
    return Answer(
        text=state["text"],
        error=state["error"],
        outcome=state["outcome"],
        growth=[g for g in state["growth"] if g["answer"] == state["count"]],
        reads_shown=state["reads"],
        marks=state["marks"],
        ttft_shown=state["ttft"],
        rate_shown=state["rate"],
        request_id=state["requestId"],
    )


def csp_violations(page) -> list[str]:
    return page.evaluate("window.__cspViolations")


def screenshot(page, name: str) -> Path:
    """A screenshot into the browser tests' reports directory; its path is printed."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def copy_page() -> Path:
    """The page's files in a new directory a local nginx can read (its workers run as nobody
    under root, and pytest's temp dirs are private): the caller removes it."""
    destination = Path(tempfile.mkdtemp(prefix="streamgate-page-"))
    shutil.copytree(PAGE_SOURCE, destination, dirs_exist_ok=True)
    destination.chmod(0o755)
    for path in destination.iterdir():
        path.chmod(0o644)
    return destination
