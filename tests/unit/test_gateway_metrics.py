"""/metrics, /healthz, /readyz: the series the issue asks for move when their events happen."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.services import sample

from .conftest import stream_body

pytestmark = pytest.mark.anyio


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics text, keyed as services.sample reads them."""
    return {
        (series.name, frozenset(series.labels.items())): series.value
        for family in text_string_to_metric_families(text)
        for series in family.samples
    }


def families(text: str) -> dict[str, str]:
    """Metric family name -> type, from the TYPE lines (labelled families with no sample yet)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


async def test_metrics_count_requests_tokens_errors_and_latency(make_app, fake_upstream):
    app = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        before = (await client.get("/metrics")).text
        fake_upstream.parts = stream_body(["a ", "b ", "c"])
        await client.post("/v1/chat/stream", json={"prompt": "x"})
        await client.post("/v1/chat/stream", json={"prompt": ""})
        fake_upstream.status = 429
        await client.post("/v1/chat/stream", json={"prompt": "x"})
        after = (await client.get("/metrics")).text

    scraped_before, scraped_after = scrape(before), scrape(after)

    def moved(name, **labels):
        # A labelled series appears at its first use: absent before counts as 0, never after.
        key = (name, frozenset(labels.items()))
        return sample(scraped_after, name, **labels) - scraped_before.get(key, 0.0)

    assert moved("streamgate_requests_total", route="stream", status="200") == 1
    assert moved("streamgate_requests_total", route="stream", status="400") == 1
    assert moved("streamgate_requests_total", route="stream", status="429") == 1
    assert moved("streamgate_tokens_relayed_total", route="stream") == 3
    assert moved("streamgate_upstream_errors_total", kind="rate_limited") == 1
    assert moved("streamgate_ttft_seconds_count", route="stream") == 1
    assert moved("streamgate_inter_chunk_gap_seconds_count") == 2
    assert sample(scraped_after, "streamgate_active_streams") == 0
    # No client left early: the family is exported (its TYPE line) and none of its series moved.
    assert families(after).get("streamgate_client_disconnects") == "counter"
    disconnects = {
        key: count
        for key, count in scraped_after.items()
        if key[0] == "streamgate_client_disconnects_total"
    }
    assert all(count == scraped_before.get(key, 0.0) for key, count in disconnects.items())


async def test_health_and_readiness(make_app, settings):
    app = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        app.state.upstream_client = None  # negative control: not started means not ready
        not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    assert "upstream client not started" in not_ready.json()["problems"]
