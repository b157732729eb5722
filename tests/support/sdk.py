"""The official openai SDK as a client of a local OpenAI-compatible server (the simulator)."""

from __future__ import annotations

from dataclasses import dataclass

import openai

MESSAGES = [{"role": "user", "content": "hi"}]


def streamed_text(chunks: list) -> str:
    """The text of a streamed chat completion's chunks (a usage chunk has no choices)."""
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


@dataclass
class Answers:
    streamed: str
    whole: str
    usage_tokens: int | None  # the streamed answer's completion_tokens, when it sent usage


async def streamed_and_whole(base_url: str, *, streamed: dict, whole: dict) -> Answers:
    """One streamed and one non-streamed completion on one openai.AsyncOpenAI client;
    `streamed` and `whole` are each request's own options (max_tokens, stream_options)."""
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=15
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True, **streamed
        )
        chunks = [chunk async for chunk in stream]
        answer = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, **whole)
    usage = chunks[-1].usage
    return Answers(
        streamed=streamed_text(chunks),
        whole=answer.choices[0].message.content,
        usage_tokens=usage.completion_tokens if usage is not None else None,
    )
