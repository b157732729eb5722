"""The chat page on a deployed edge over HTTPS, in headless Chromium (Debian's): a step of
tests/e2e/lab_e2e.sh, after the load test. `pytest tests/e2e/test_lab_browser.py
--ansible-inventory=INVENTORY` (the lab's: its CA and client key lie next to it).

The page is opened at https://<edge>/ as a person would open it, trusting the play's CA; a
question streams through nginx over HTTP/2 and the answer, read from the page's own DOM, must
grow in >= 45 separate steps over >= 0.8 s (the simulator: 50 tokens, 20 ms apart) and equal the
simulator's text. Without a key the page shows the 401 as an error. Control: a browser that does
not trust the CA cannot open the page at all (the trust is that CA's, not "ignore errors").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from streamgate.simulator.script import expected_text
from support import browser
from support.upstream import (
    SIMULATOR,
    deployment_upstream_kind,
    groups_of,
    inventory_listing,
    setting,
)

# The whole module, the browser's start included, well under the e2e step's budget.
pytestmark = pytest.mark.timeout(90)

MIN_GROWTH_STEPS = 45
MIN_GROWTH_SPAN_S = 0.8
PACE = {"streamgate_sim_tokens": 50, "streamgate_sim_gap_ms": 20}


@pytest.fixture(scope="module")
def listing(inventory) -> dict:
    return inventory_listing(inventory, str(Path(sys.executable).with_name("ansible-inventory")))


@pytest.fixture(scope="module")
def edge_address(listing) -> str:
    name = groups_of(listing)["edge"][0]
    return listing["_meta"]["hostvars"].get(name, {}).get("ansible_host", name)


@pytest.fixture(scope="module")
def tokens(listing) -> int:
    """The simulator's answer length, once its pace is the one the growth assertion assumes."""
    if deployment_upstream_kind(listing) != SIMULATOR:
        pytest.skip("the app hosts do not stream from the simulator: its pace is unknown")
    simulator = groups_of(listing)["simulator"][0]
    hostvars = listing["_meta"]["hostvars"].get(simulator, {})
    pace = {name: int(setting(hostvars, name)) for name in PACE}
    assert pace == PACE, f"the growth assertion assumes the simulator's {PACE}: {pace}"
    return pace["streamgate_sim_tokens"]


@pytest.fixture(scope="module")
def chromium(inventory, edge_address):
    ca_file = inventory.parent / "ca.pem"
    assert ca_file.is_file(), f"the play writes the edge's CA at {ca_file}"
    with browser.chromium(trusted_keys=(browser.spki_pin(edge_address, 443, ca_file),)) as b:
        yield b


@pytest.fixture(scope="module")
def client_key(inventory) -> str:
    return (inventory.parent / "client-key").read_text().strip()


def test_the_page_streams_word_by_word_over_https(chromium, edge_address, client_key, tokens):
    page, response = browser.open_page(chromium, f"https://{edge_address}/")
    try:
        assert response.status == 200
        protocol = page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
        browser.ask(page, "Does this stream reach my browser word by word?", key=client_key)
        browser.wait_answered(page)
        answer = browser.last_answer(page)
        browser.screenshot(page, "lab-chat-page")
        violations = browser.csp_violations(page)
    finally:
        page.close()
    print(f"the lab's edge over {protocol}: {answer.describe()}")
    assert protocol == "h2"
    assert answer.steps >= MIN_GROWTH_STEPS, answer.describe()
    assert answer.span_s >= MIN_GROWTH_SPAN_S, answer.describe()
    assert answer.text == expected_text(tokens), answer.describe()
    assert not answer.error and violations == [], (answer.describe(), violations)


def test_without_a_key_the_page_shows_the_401_as_an_error(chromium, edge_address):
    page, _ = browser.open_page(chromium, f"https://{edge_address}/")
    try:
        browser.ask(page, "hello", key="")
        browser.wait_answered(page)
        answer = browser.last_answer(page)
        answers = page.locator("#log li.assistant").count()
    finally:
        page.close()
    assert "client key" in answer.error and answers == 0, answer.describe()


def test_negative_control_a_browser_without_the_ca_cannot_open_the_page(chromium, edge_address):
    outcome = browser.opens(chromium, f"https://{edge_address}/")
    assert "ERR_CERT_AUTHORITY_INVALID" in outcome, outcome
