"""/metrics, /healthz, /readyz: the series the issue asks for move when their events happen."""

from __future__ import annotations

import re

import httpx
import pytest

from .conftest import stream_body

pytestmark = pytest.mark.anyio


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


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

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("streamgate_requests_total", route="stream", status="200") == 1
    assert moved("streamgate_requests_total", route="stream", status="400") == 1
    assert moved("streamgate_requests_total", route="stream", status="429") == 1
    assert moved("streamgate_tokens_relayed_total", route="stream") == 3
    assert moved("streamgate_upstream_errors_total", kind="rate_limited") == 1
    assert moved("streamgate_ttft_seconds_count", route="stream") == 1
    assert moved("streamgate_inter_chunk_gap_seconds_count") == 2
    assert sample(after, "streamgate_active_streams") == 0
    assert "streamgate_client_disconnects_total" in after


async def test_health_and_readiness(make_app, settings):
    app = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        app.state.upstream_client = None  # negative control: not started means not ready
        not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    assert "upstream client not started" in not_ready.json()["problems"]
