"""The official openai SDK works against the gateway by changing only its base_url."""

from __future__ import annotations

import asyncio

import openai
import pytest
from streamgate.simulator.script import expected_text
from support.services import API_KEY_PLACEHOLDER

TOKENS = 20
MESSAGES = [{"role": "user", "content": "Stream me something."}]


@pytest.fixture(params=["direct", "nginx"])
def base_url(request, gateway) -> str:
    target = gateway if request.param == "direct" else request.getfixturevalue("nginx")
    return f"http://127.0.0.1:{target.port}/v1"


def client(base_url: str) -> openai.AsyncOpenAI:
    # Retries off and a short timeout: a failure must show, not be papered over.
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=API_KEY_PLACEHOLDER, max_retries=0, timeout=15
    )


async def collect_stream(base_url: str, model: str = "streamgate-sim", **options) -> list:
    async with client(base_url) as sdk:
        stream = await sdk.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=TOKENS, stream=True, **options
        )
        return [chunk async for chunk in stream]


def test_streaming_with_usage(base_url):
    chunks = asyncio.run(collect_stream(base_url, stream_options={"include_usage": True}))

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected_text(TOKENS)
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish_reasons[-1] == "stop" and set(finish_reasons[:-1]) <= {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None, usage_chunk
    assert usage_chunk.usage.completion_tokens == TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streaming_without_usage_sends_no_usage_chunk(base_url):
    chunks = asyncio.run(collect_stream(base_url))

    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(TOKENS)


def test_non_streaming(base_url):
    async def complete():
        async with client(base_url) as sdk:
            return await sdk.chat.completions.create(
                model="streamgate-sim", messages=MESSAGES, max_tokens=TOKENS
            )

    completion = asyncio.run(complete())

    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected_text(TOKENS)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == TOKENS


def test_upstream_rate_limit_reaches_the_sdk_as_rate_limit_error(gateway):
    with pytest.raises(openai.RateLimitError):
        asyncio.run(collect_stream(f"{gateway.base_url}/v1", model="sim-fault-429"))


def test_error_mid_stream_raises_in_the_sdk_after_the_relayed_tokens(gateway):
    received: list[str] = []

    async def consume():
        async with client(f"{gateway.base_url}/v1") as sdk:
            stream = await sdk.chat.completions.create(
                model="sim-fault-error-midstream", messages=MESSAGES, max_tokens=TOKENS, stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIError):
        asyncio.run(consume())
    assert "".join(received) == expected_text(TOKENS // 2)
