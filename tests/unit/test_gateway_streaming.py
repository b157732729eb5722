"""Word granularity, heartbeats and in-band errors, on the ASGI app with a timed fake upstream."""

from __future__ import annotations

import time

import orjson
import pytest
from streamgate.settings import Settings

from .conftest import bodies, body_bytes, call, chunk_event, stream_body

pytestmark = pytest.mark.anyio


async def test_word_granularity_ends_chunks_on_word_boundaries(make_app, fake_upstream):
    fake_upstream.parts = stream_body(["Hel", "lo ", "wor", "ld", " and", " more"])
    sent = await call(make_app(), "/v1/chat/stream", {"prompt": "x", "granularity": "word"})
    chunks = [body.decode() for _, body in bodies(sent)]
    assert "".join(chunks) == "Hello world and more"
    assert chunks[:2] == ["Hello ", "world "]


async def test_token_granularity_passes_every_delta(make_app, fake_upstream):
    fake_upstream.parts = stream_body(["Hel", "lo ", "wor"])
    fake_upstream.delays = [0, 0.02, 0.02]
    sent = await call(make_app(), "/v1/chat/stream", {"prompt": "x"})
    assert [body for _, body in bodies(sent)] == [b"Hel", b"lo ", b"wor"]


@pytest.mark.parametrize("flush_ms", [60, 150])
async def test_word_granularity_never_holds_text_longer_than_the_bound(
    make_app, fake_upstream, flush_ms
):
    # One long word arriving slowly: without the bound it would wait for the end.
    pieces = ["su", "per", "cal", "ifr", "agi", "list", "ic"]
    fake_upstream.parts = stream_body(pieces)
    fake_upstream.delays = [0] + [0.05] * (len(pieces) - 1)
    started = time.monotonic()
    sent = await call(
        make_app(word_flush_ms=flush_ms), "/v1/chat/stream", {"prompt": "x", "granularity": "word"}
    )
    chunks = bodies(sent)
    assert b"".join(body for _, body in chunks) == "".join(pieces).encode()
    assert len(chunks) >= 2, "the bound must flush a word that is still open"
    # The first piece arrives at ~0 s: it must be out within the bound (plus scheduling slack).
    assert chunks[0][0] - started <= flush_ms / 1000 + 0.05


async def test_negative_control_a_huge_bound_holds_the_word(make_app, fake_upstream):
    pieces = ["su", "per", "cal", "ifr"]
    fake_upstream.parts = stream_body(pieces)
    fake_upstream.delays = [0] + [0.05] * (len(pieces) - 1)
    sent = await call(
        make_app(word_flush_ms=10_000), "/v1/chat/stream", {"prompt": "x", "granularity": "word"}
    )
    assert len(bodies(sent)) == 1  # what the bound test would catch


async def test_sse_heartbeat_while_first_token_is_slow(make_app, fake_upstream):
    fake_upstream.delays = [0.35]
    sent = await call(make_app(heartbeat_s=0.1), "/v1/chat/stream-sse", {"prompt": "x"})
    payloads = [body for _, body in bodies(sent)]
    pings = [p for p in payloads if p == b": ping\n\n"]
    assert 2 <= len(pings) <= 4
    assert payloads.index(b": ping\n\n") == 0


async def test_sse_heartbeat_while_upstream_headers_are_slow(make_app, fake_upstream):
    fake_upstream.header_delay = 0.35
    sent = await call(make_app(heartbeat_s=0.1), "/v1/chat/stream-sse", {"prompt": "x"})
    payloads = [body for _, body in bodies(sent)]
    assert payloads[0] == b": ping\n\n"
    assert 2 <= payloads.count(b": ping\n\n") <= 4
    assert b"Hello" in b"".join(payloads)


async def test_plain_text_never_gets_heartbeats(make_app, fake_upstream):
    fake_upstream.delays = [0.25]
    sent = await call(make_app(heartbeat_s=0.05), "/v1/chat/stream", {"prompt": "x"})
    assert b"ping" not in body_bytes(sent)


async def test_non_stream_completion_is_relayed_without_stream_options(make_app, fake_upstream):
    fake_upstream.parts = [b'{"id": "x", "object": "chat.completion", "choices": []}']
    sent = await call(make_app(), "/v1/chat/completions", {"prompt": "x"})
    assert orjson.loads(body_bytes(sent))["object"] == "chat.completion"
    payload = orjson.loads(fake_upstream.requests[0].content)
    assert payload["stream"] is False and "stream_options" not in payload


@pytest.mark.parametrize("ask_usage", [True, False])
async def test_stream_options_go_upstream_only_when_configured(make_app, fake_upstream, ask_usage):
    await call(make_app(upstream_include_usage=ask_usage), "/v1/chat/stream", {"prompt": "x"})
    payload = orjson.loads(fake_upstream.requests[0].content)
    assert payload["stream"] is True
    assert payload.get("stream_options") == ({"include_usage": True} if ask_usage else None)


async def test_midstream_error_is_in_band_for_sse_and_openai(make_app, fake_upstream):
    error = b'data: {"error": {"message": "model crashed"}}\n\n'
    for path, expect in (
        ("/v1/chat/stream-sse", b"event: error"),
        ("/v1/chat/completions", b'"error"'),
    ):
        fake_upstream.parts = [chunk_event("Hi"), error]
        sent = await call(make_app(), path, {"prompt": "x", "stream": True})
        start = next(m for _, m in sent if m["type"] == "http.response.start")
        assert start["status"] == 200
        text = body_bytes(sent)
        # In user terms; the upstream's own words ("model crashed") stay in the log.
        assert expect in text and b"upstream error mid-stream" in text
        assert b"model crashed" not in text
        if path.endswith("completions"):
            assert text.endswith(b"data: [DONE]\n\n")
        assert sent[-1][1]["more_body"] is False


async def test_midstream_error_aborts_plain_text_without_final_chunk(make_app, fake_upstream):
    fake_upstream.parts = [chunk_event("Hi"), b'data: {"error": {"message": "boom"}}\n\n']
    sent = await call(make_app(), "/v1/chat/stream", {"prompt": "x"})
    start = next(m for _, m in sent if m["type"] == "http.response.start")
    assert start["status"] == 200
    # What came before the error arrived; the error is not sent as model text.
    assert body_bytes(sent) == b"Hi"
    body_messages = [m for _, m in sent if m["type"] == "http.response.body"]
    assert body_messages and all(m.get("more_body", True) for m in body_messages)  # no clean end


async def test_first_token_timeout_before_any_byte_is_504(make_app, fake_upstream):
    fake_upstream.delays = [1.0]
    sent = await call(make_app(first_token_timeout_s=0.1), "/v1/chat/stream", {"prompt": "x"})
    start = next(m for _, m in sent if m["type"] == "http.response.start")
    assert start["status"] == 504


def test_settings_fall_back_to_openai_variables(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://vllm.test/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.delenv("STREAMGATE_UPSTREAM_BASE_URL", raising=False)
    loaded = Settings(_env_file=None)  # type: ignore[call-arg]
    assert loaded.upstream_base_url == "http://vllm.test/v1"
    assert "sk-secret" not in repr(loaded) and "sk-secret" not in str(loaded.public_dict())
    monkeypatch.setenv("STREAMGATE_UPSTREAM_BASE_URL", "http://own.test/v1")
    assert Settings(_env_file=None).upstream_base_url == "http://own.test/v1"  # type: ignore[call-arg]


def test_settings_read_the_env_file(tmp_path, monkeypatch):
    env_file = tmp_path / "streamgate.env"
    env_file.write_text("STREAMGATE_HEARTBEAT_S=7\nSTREAMGATE_SIM_PORT=9\n")
    monkeypatch.setenv("STREAMGATE_ENV_FILE", str(env_file))
    from streamgate.settings import load_settings

    assert load_settings().heartbeat_s == 7


def test_graceful_timeout_must_cover_total_timeout():
    with pytest.raises(ValueError, match="graceful_timeout_s"):
        Settings(total_timeout_s=100, graceful_timeout_s=50, _env_file=None)  # type: ignore[call-arg]


async def test_role_only_first_chunk_does_not_count_as_first_token(make_app, fake_upstream):
    # vLLM sends {"delta": {"role": "assistant"}} at once; the first token comes later.
    role = chunk_event(None).replace(b'"delta":{}', b'"delta":{"role":"assistant"}')
    fake_upstream.parts = [role, chunk_event("Hi"), *stream_body([])[-3:]]
    fake_upstream.delays = [0, 0.5]
    sent = await call(
        make_app(first_token_timeout_s=0.2), "/v1/chat/completions", {"prompt": "x", "stream": True}
    )
    text = body_bytes(sent)
    assert b"first token" in text and b"Hi" not in text  # timed out waiting for content


@pytest.mark.parametrize(("workers", "cpus", "expected"), [(0, 4, 4), (0, None, None), (3, 8, 3)])
def test_workers_zero_means_one_per_cpu(workers, cpus, expected):
    import os

    configured = Settings(workers=workers, _env_file=None)  # type: ignore[call-arg]
    result = configured.effective_workers(cpus)
    assert result == (expected if expected is not None else len(os.sched_getaffinity(0)))
