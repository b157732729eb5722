"""What a relay of an OpenAI-compatible stream must keep: every event, in order, field for field
and in the same key order, except what two requests of the same prompt cannot share: the chunk's
`id` and `created`, llama.cpp's `timings`, and the prompt cache's count in the usage.

The gateway's OpenAI route passes each upstream chunk through whole (formats.OpenAIChunks); the
wire test (tests/wire/test_llm_passthrough.py) and testinfra on the lab (tests/infra/
test_llm_relay.py) compare what a real llama.cpp server sends directly with what the gateway
relays from it, with greedy sampling so both answers are the same tokens.
"""

from __future__ import annotations

import json

from support import sse

# Differs from one request to the next, whoever relays it.
PER_REQUEST_FIELDS = ("id", "created", "timings")
PER_REQUEST_USAGE_FIELDS = ("prompt_tokens_details",)
DONE = "[DONE]"


def comparable_events(body: bytes) -> list[str]:
    """Each event of an OpenAI stream as canonical text: the chunk's JSON in its own key order,
    minus the per-request fields; `[DONE]` as it is."""
    found = []
    for event in sse.parse(body).events:
        if event.data == DONE:
            found.append(DONE)
            continue
        chunk = json.loads(event.data)
        for name in PER_REQUEST_FIELDS:
            chunk.pop(name, None)
        if isinstance(chunk.get("usage"), dict):
            for name in PER_REQUEST_USAGE_FIELDS:
                chunk["usage"].pop(name, None)
        found.append(json.dumps(chunk))
    return found


def request_body(include_usage: bool, max_tokens: int = 16) -> dict:
    """One greedy answer (temperature 0: the same tokens every time from the same server)."""
    body: dict = {
        "model": "test-llama",
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def protocol_problems(events: list[str], include_usage: bool) -> list[str]:
    """What a stream of a real engine must show: the role chunk first, content, one finish
    reason, the usage chunk when asked (and only then), `[DONE]` last."""
    if not events or events[-1] != DONE:
        return ["no [DONE] at the end"]
    chunks = [json.loads(event) for event in events[:-1]]
    problems = []
    first_delta = (chunks[0].get("choices") or [{}])[0].get("delta", {}) if chunks else {}
    if first_delta.get("role") != "assistant":
        problems.append(f"the first chunk is not the role chunk: {events[0]}")
    choices = [choice for chunk in chunks for choice in chunk.get("choices", [])]
    if not any(choice.get("delta", {}).get("content") for choice in choices):
        problems.append("no content")
    if len([choice for choice in choices if choice.get("finish_reason")]) != 1:
        problems.append("not exactly one finish_reason")
    has_usage = any(chunk.get("usage") for chunk in chunks)
    if has_usage != include_usage:
        problems.append(f"usage {'missing' if include_usage else 'not asked for but sent'}")
    return problems
