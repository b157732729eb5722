"""Request validation: every malformed body is an InvalidRequest with the right status and param
(never another exception), valid bodies of every documented shape parse, the prompt limit
counts real text; and through the app, invalid requests get a 4xx JSON body and never reach
the upstream, valid ones do."""

from __future__ import annotations

import copy

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streamgate.chat_request import (
    OPENAI,
    OPENAI_CHECKS,
    ROLES,
    SSE,
    STREAM_ROUTE_KEYS,
    TEXT,
    ChatRequest,
    InvalidRequest,
    parse_chat_request,
)
from streamgate.formats import CHAT_ROUTES

pytestmark = pytest.mark.anyio  # coroutine tests run on asyncio via anyio's plugin

ALL, OWN = (TEXT, SSE, OPENAI), (TEXT, SSE)
LIMIT = 100  # max_prompt_chars in these tests
MEGA = 1_000_000  # a value size no error message may echo
# Every top-level field the gateway knows, for the generated bodies: the stream routes' own, the
# OpenAI parameters it checks, stream_options, and top_k (an extension passed upstream as sent).
FIELDS = tuple(dict.fromkeys((*STREAM_ROUTE_KEYS, "stream_options", *OPENAI_CHECKS, "top_k")))
BODY_TEXT_FIELDS = ("prompt", "messages")


def user(content=None, **fields) -> dict:
    """A body with one message (role user unless given), content "hi" unless given."""
    message = {"role": "user", "content": "hi" if content is None else content}
    message.update(fields)
    return {"messages": [message]}


def parts(*content_parts) -> dict:
    return user(list(content_parts))


def nested(levels: int):
    """`levels` lists, one in the other: in a body's field, the body nests levels + 1 deep."""
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def with_prompt(**fields) -> dict:
    return {"prompt": "hi", **fields}


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.test/cat.png", "detail": "low"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE_ID = {"type": "file", "file": {"file_id": "file-123"}}
FILE_DATA = {
    "type": "file",
    "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
}
REFUSAL = {"type": "refusal", "refusal": "I can't."}
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

# (case, routes, body (dict, or raw bytes), status, param)
MALFORMED = [
    # The body as a whole.
    ("empty body", ALL, b"", 400, None),
    ("blank body", ALL, b" \n ", 400, None),
    ("not json", ALL, b"{not json", 400, None),
    ("json array", ALL, b"[1, 2]", 400, None),
    ("json string", ALL, b'"hi"', 400, None),
    ("json null", ALL, b"null", 400, None),
    ("1e400 is no float", ALL, b'{"prompt": "hi", "temperature": 1e400}', 400, None),
    ("NaN", ALL, b'{"prompt": "hi", "temperature": NaN}', 400, None),
    ("Infinity", ALL, b'{"prompt": "hi", "max_tokens": Infinity}', 400, None),
    ("lone surrogate", ALL, b'{"prompt": "\\ud800"}', 400, None),
    ("not utf-8", ALL, b'{"prompt": "caf\xe9"}', 400, None),
    (
        "nested past the parser's limit",
        ALL,
        b'{"prompt": "hi", "model": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        400,
        None,
    ),
    # orjson reads 1024 levels but writes only 254: the gateway stops at 64.
    (
        "nested past the gateway's limit",
        ALL,
        b'{"prompt": "hi", "model": ' + b"[" * 300 + b"]" * 300 + b"}",
        400,
        None,
    ),
    ("nested in messages", ALL, user(name=nested(100)), 400, None),
    (
        "nested in an extension field",
        (OPENAI,),
        b'{"prompt": "hi", "kwargs": ' + b"[" * 300 + b"]" * 300 + b"}",
        400,
        None,
    ),
    ("nested one past 64", (OPENAI,), with_prompt(kwargs=nested(64)), 400, None),
    # prompt and messages
    ("neither prompt nor messages", ALL, {}, 400, "prompt"),
    ("prompt and messages", ALL, {"prompt": "hi", **user()}, 400, "prompt"),
    ("prompt empty", ALL, {"prompt": ""}, 400, "prompt"),
    ("prompt blank", ALL, {"prompt": " \n\t"}, 400, "prompt"),
    ("prompt a number", ALL, {"prompt": 42}, 400, "prompt"),
    ("prompt a list", ALL, {"prompt": ["hi"]}, 400, "prompt"),
    ("prompt an object", ALL, {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("prompt over the limit", ALL, {"prompt": "x" * (LIMIT + 1)}, 413, "prompt"),
    ("messages a string", ALL, {"messages": "hi"}, 400, "messages"),
    ("messages an object", ALL, {"messages": {"role": "user"}}, 400, "messages"),
    ("messages empty", ALL, {"messages": []}, 400, "messages"),
    ("message a number", ALL, {"messages": [5]}, 400, "messages[0]"),
    ("message null", ALL, {"messages": [None]}, 400, "messages[0]"),
    ("message a list", ALL, {"messages": [["user", "hi"]]}, 400, "messages[0]"),
    ("role missing", ALL, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("role a number", ALL, user(role=1), 400, "messages[0].role"),
    ("role a list", ALL, user(role=["user"]), 400, "messages[0].role"),
    ("role unknown", ALL, user(role="robot"), 400, "messages[0].role"),
    ("role huge", ALL, user(role="r" * MEGA), 400, "messages[0].role"),
    (
        "second message bad",
        ALL,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
        400,
        "messages[1].content",
    ),
    ("content a number", ALL, user(5), 400, "messages[0].content"),
    ("content true", ALL, user(True), 400, "messages[0].content"),
    ("content an object", ALL, user({"type": "text", "text": "hi"}), 400, "messages[0].content"),
    (
        "content null on user",
        ALL,
        {"messages": [{"role": "user", "content": None}]},
        400,
        "messages[0].content",
    ),
    ("content missing on user", ALL, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (
        "content null on assistant without tool calls",
        ALL,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
        400,
        "messages[1].content",
    ),
    (
        "content null with empty tool_calls",
        ALL,
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": []},
            ]
        },
        400,
        "messages[1].content",
    ),
    (
        "content null on tool",
        ALL,
        {"messages": [{"role": "tool", "content": None, "tool_call_id": "call_1"}]},
        400,
        "messages[0].content",
    ),
    ("messages hold no text", ALL, user(""), 400, "messages"),
    ("messages hold no parts", ALL, user([]), 400, "messages"),
    (
        "messages over the limit",
        ALL,
        {
            "messages": [
                {"role": "system", "content": "x" * 60},
                {"role": "user", "content": "y" * 41},
            ]
        },
        413,
        "messages",
    ),
    (
        "text parts over the limit",
        ALL,
        parts({"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 41}),
        413,
        "messages",
    ),
    ("name a number", ALL, user(name=5), 400, "messages[0].name"),
    ("name an object", ALL, user(name={"first": "a"}), 400, "messages[0].name"),
    (
        "tool_call_id a number",
        ALL,
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": 7}]},
        400,
        "messages[0].tool_call_id",
    ),
    (
        "tool_calls a string",
        ALL,
        user(role="assistant", tool_calls="call"),
        400,
        "messages[0].tool_calls",
    ),
    (
        "tool_calls an object",
        ALL,
        user(role="assistant", tool_calls=TOOL_CALL),
        400,
        "messages[0].tool_calls",
    ),
    (
        "tool call a number",
        ALL,
        user(role="assistant", tool_calls=[5]),
        400,
        "messages[0].tool_calls[0]",
    ),
    (
        "tool call id a number",
        ALL,
        user(role="assistant", tool_calls=[{**TOOL_CALL, "id": 1}]),
        400,
        "messages[0].tool_calls[0].id",
    ),
    (
        "tool call type missing",
        ALL,
        user(role="assistant", tool_calls=[{"id": "c", "function": TOOL_CALL["function"]}]),
        400,
        "messages[0].tool_calls[0].type",
    ),
    (
        "tool call function missing",
        ALL,
        user(role="assistant", tool_calls=[{"id": "c", "type": "function"}]),
        400,
        "messages[0].tool_calls[0].function",
    ),
    (
        "tool call arguments an object",
        ALL,
        user(
            role="assistant",
            tool_calls=[{**TOOL_CALL, "function": {"name": "f", "arguments": {"city": "Oslo"}}}],
        ),
        400,
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        "function_call a string",
        ALL,
        user(role="assistant", function_call="f"),
        400,
        "messages[0].function_call",
    ),
    (
        "function_call without arguments",
        ALL,
        user(None, role="assistant", function_call={"name": "f"}),
        400,
        "messages[0].function_call.arguments",
    ),
    # content parts
    ("part a string", ALL, parts("hi"), 400, "messages[0].content[0]"),
    ("part a number", ALL, parts(5), 400, "messages[0].content[0]"),
    ("part without type", ALL, parts({"text": "hi"}), 400, "messages[0].content[0]"),
    ("part type a number", ALL, parts({"type": 5, "text": "hi"}), 400, "messages[0].content[0]"),
    (
        "second part bad",
        ALL,
        parts({"type": "text", "text": "hi"}, {"type": "text"}),
        400,
        "messages[0].content[1].text",
    ),
    ("text a number", ALL, parts({"type": "text", "text": 5}), 400, "messages[0].content[0].text"),
    (
        "text a list",
        ALL,
        parts({"type": "text", "text": ["x" * (LIMIT + 1)]}),
        400,
        "messages[0].content[0].text",
    ),
    (
        "text a short list",
        ALL,
        parts({"type": "text", "text": ["hi"]}),
        400,
        "messages[0].content[0].text",
    ),
    (
        "text an object",
        ALL,
        parts({"type": "text", "text": {"value": "hi"}}),
        400,
        "messages[0].content[0].text",
    ),
    ("text null", ALL, parts({"type": "text", "text": None}), 400, "messages[0].content[0].text"),
    ("text missing", ALL, parts({"type": "text"}), 400, "messages[0].content[0].text"),
    (
        "refusal a number",
        ALL,
        parts({"type": "refusal", "refusal": 5}),
        400,
        "messages[0].content[0].refusal",
    ),
    (
        "image_url a string",
        ALL,
        parts({"type": "image_url", "image_url": "https://x.test/a"}),
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "image_url missing",
        ALL,
        parts({"type": "image_url"}),
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "image url missing",
        ALL,
        parts({"type": "image_url", "image_url": {}}),
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        "image url a number",
        ALL,
        parts({"type": "image_url", "image_url": {"url": 5}}),
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        "image detail a number",
        ALL,
        parts({"type": "image_url", "image_url": {"url": "https://x.test/a", "detail": 1}}),
        400,
        "messages[0].content[0].image_url.detail",
    ),
    (
        "input_audio a string",
        ALL,
        parts({"type": "input_audio", "input_audio": "UklGRg=="}),
        400,
        "messages[0].content[0].input_audio",
    ),
    (
        "input_audio without format",
        ALL,
        parts({"type": "input_audio", "input_audio": {"data": "UklGRg=="}}),
        400,
        "messages[0].content[0].input_audio.format",
    ),
    (
        "input_audio data a list",
        ALL,
        parts({"type": "input_audio", "input_audio": {"data": [1, 2], "format": "wav"}}),
        400,
        "messages[0].content[0].input_audio.data",
    ),
    (
        "file a string",
        ALL,
        parts({"type": "file", "file": "file-123"}),
        400,
        "messages[0].content[0].file",
    ),
    ("file empty", ALL, parts({"type": "file", "file": {}}), 400, "messages[0].content[0].file"),
    (
        "file_id a number",
        ALL,
        parts({"type": "file", "file": {"file_id": 5}}),
        400,
        "messages[0].content[0].file.file_id",
    ),
    (
        "filename a number",
        ALL,
        parts({"type": "file", "file": {"file_data": "x", "filename": 5}}),
        400,
        "messages[0].content[0].file.filename",
    ),
    (
        "part type unknown on our routes",
        OWN,
        parts({"type": "video_url", "video_url": {"url": "https://x.test/v"}}),
        400,
        "messages[0].content[0].type",
    ),
    (
        "part type huge on our routes",
        OWN,
        parts({"type": "t" * MEGA}),
        400,
        "messages[0].content[0].type",
    ),
    # model, granularity, stream
    ("model a number", ALL, with_prompt(model=7), 400, "model"),
    ("model empty", ALL, with_prompt(model=""), 400, "model"),
    ("model a list", ALL, with_prompt(model=["gpt"]), 400, "model"),
    ("model too long", ALL, with_prompt(model="m" * 257), 400, "model"),
    ("granularity unknown", ALL, with_prompt(granularity="sentence"), 400, "granularity"),
    ("granularity huge", ALL, with_prompt(granularity="g" * MEGA), 400, "granularity"),
    (
        "granularity a huge list",
        ALL,
        with_prompt(granularity=["g" * 1000] * 1000),
        400,
        "granularity",
    ),
    ("granularity a number", ALL, with_prompt(granularity=1), 400, "granularity"),
    ("stream a string", ALL, with_prompt(stream="yes"), 400, "stream"),
    ("stream a number", ALL, with_prompt(stream=1), 400, "stream"),
    ("stream false on our routes", OWN, with_prompt(stream=False), 400, "stream"),
    # numbers: types, ranges, booleans (True is an int in Python), huge values
    ("max_tokens a string", ALL, with_prompt(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens zero", ALL, with_prompt(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", ALL, with_prompt(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens true", ALL, with_prompt(max_tokens=True), 400, "max_tokens"),
    ("max_tokens a float", ALL, with_prompt(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens huge", ALL, with_prompt(max_tokens=10**12), 400, "max_tokens"),
    (
        "max_tokens past 64 bits",
        ALL,
        b'{"prompt": "hi", "max_tokens": 1' + b"0" * 30 + b"}",
        400,
        "max_tokens",
    ),
    ("temperature a string", ALL, with_prompt(temperature="hot"), 400, "temperature"),
    ("temperature over 2", ALL, with_prompt(temperature=3), 400, "temperature"),
    ("temperature negative", ALL, with_prompt(temperature=-0.1), 400, "temperature"),
    ("temperature true", ALL, with_prompt(temperature=True), 400, "temperature"),
    ("temperature a list", ALL, with_prompt(temperature=[1]), 400, "temperature"),
    ("temperature 1e308", ALL, with_prompt(temperature=1e308), 400, "temperature"),
    (
        "max_completion_tokens zero",
        (OPENAI,),
        with_prompt(max_completion_tokens=0),
        400,
        "max_completion_tokens",
    ),
    (
        "max_completion_tokens true",
        (OPENAI,),
        with_prompt(max_completion_tokens=True),
        400,
        "max_completion_tokens",
    ),
    ("top_p over 1", (OPENAI,), with_prompt(top_p=1.5), 400, "top_p"),
    ("top_p a string", (OPENAI,), with_prompt(top_p="0.9"), 400, "top_p"),
    ("top_p true", (OPENAI,), with_prompt(top_p=True), 400, "top_p"),
    ("n zero", (OPENAI,), with_prompt(n=0), 400, "n"),
    ("n huge", (OPENAI,), with_prompt(n=10**6), 400, "n"),
    ("n a float", (OPENAI,), with_prompt(n=2.0), 400, "n"),
    ("n true", (OPENAI,), with_prompt(n=True), 400, "n"),
    ("stop a number", (OPENAI,), with_prompt(stop=5), 400, "stop"),
    ("stop an object", (OPENAI,), with_prompt(stop={"a": 1}), 400, "stop"),
    ("stop a list with a number", (OPENAI,), with_prompt(stop=["a", 5]), 400, "stop"),
    ("stop five strings", (OPENAI,), with_prompt(stop=list("abcde")), 400, "stop"),
    (
        "presence_penalty over 2",
        (OPENAI,),
        with_prompt(presence_penalty=2.5),
        400,
        "presence_penalty",
    ),
    (
        "presence_penalty a string",
        (OPENAI,),
        with_prompt(presence_penalty="0"),
        400,
        "presence_penalty",
    ),
    (
        "frequency_penalty under -2",
        (OPENAI,),
        with_prompt(frequency_penalty=-3),
        400,
        "frequency_penalty",
    ),
    (
        "frequency_penalty false",
        (OPENAI,),
        with_prompt(frequency_penalty=False),
        400,
        "frequency_penalty",
    ),
    ("seed a string", (OPENAI,), with_prompt(seed="42"), 400, "seed"),
    ("seed a float", (OPENAI,), with_prompt(seed=4.2), 400, "seed"),
    ("seed true", (OPENAI,), with_prompt(seed=True), 400, "seed"),
    ("seed past int64", (OPENAI,), with_prompt(seed=2**64 - 1), 400, "seed"),
    ("user a number", (OPENAI,), with_prompt(user=5), 400, "user"),
    ("user a list", (OPENAI,), with_prompt(user=["u"]), 400, "user"),
    (
        "stream_options a string",
        (OPENAI,),
        with_prompt(stream=True, stream_options="usage"),
        400,
        "stream_options",
    ),
    (
        "stream_options a list",
        (OPENAI,),
        with_prompt(stream=True, stream_options=[]),
        400,
        "stream_options",
    ),
    (
        "include_usage a string",
        (OPENAI,),
        with_prompt(stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options",
    ),
    ("logit_bias a list", (OPENAI,), with_prompt(logit_bias=[1]), 400, "logit_bias"),
    (
        "logit_bias a string value",
        (OPENAI,),
        with_prompt(logit_bias={"50256": "x"}),
        400,
        "logit_bias",
    ),
    ("logit_bias over 100", (OPENAI,), with_prompt(logit_bias={"50256": 101}), 400, "logit_bias"),
    ("logit_bias true", (OPENAI,), with_prompt(logit_bias={"50256": True}), 400, "logit_bias"),
    (
        "response_format a string",
        (OPENAI,),
        with_prompt(response_format="json"),
        400,
        "response_format",
    ),
    (
        "response_format without type",
        (OPENAI,),
        with_prompt(response_format={}),
        400,
        "response_format.type",
    ),
    (
        "response_format type a number",
        (OPENAI,),
        with_prompt(response_format={"type": 1}),
        400,
        "response_format.type",
    ),
    ("tools an object", (OPENAI,), with_prompt(tools=TOOL), 400, "tools"),
    ("tool a string", (OPENAI,), with_prompt(tools=["get_weather"]), 400, "tools[0]"),
    ("tool type a number", (OPENAI,), with_prompt(tools=[{"type": 1}]), 400, "tools[0].type"),
    (
        "tool function missing",
        (OPENAI,),
        with_prompt(tools=[{"type": "function"}]),
        400,
        "tools[0].function",
    ),
    (
        "tool function name a number",
        (OPENAI,),
        with_prompt(tools=[{"type": "function", "function": {"name": 5}}]),
        400,
        "tools[0].function.name",
    ),
    ("tool_choice a number", (OPENAI,), with_prompt(tool_choice=5), 400, "tool_choice"),
    ("tool_choice true", (OPENAI,), with_prompt(tool_choice=True), 400, "tool_choice"),
    ("tool_choice a list", (OPENAI,), with_prompt(tool_choice=["auto"]), 400, "tool_choice"),
    # unknown top-level fields: refused on the kit's own routes (OpenAI's route passes them on)
    ("unknown field", OWN, with_prompt(top_k=40), 400, "top_k"),
    ("OpenAI parameter not taken here", OWN, with_prompt(top_p=0.9), 400, "top_p"),
    (
        "stream_options not taken here",
        OWN,
        with_prompt(stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
    ("tools not taken here", OWN, with_prompt(tools=[TOOL]), 400, "tools"),
    ("unknown null field", OWN, with_prompt(extra=None), 400, "extra"),
    ("unknown field with a huge name", OWN, with_prompt(**{"k" * MEGA: 1}), 400, "k" * 37 + "..."),
]


def _expand(table) -> list:
    return [
        pytest.param(route, body, *expected, id=f"{route}: {case}")
        for case, routes, body, *expected in table
        for route in routes
    ]


def parse(body, route: str, settings) -> ChatRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_chat_request(raw, settings.model_copy(update={"max_prompt_chars": LIMIT}), route)


@pytest.mark.parametrize(("route", "body", "status", "param"), _expand(MALFORMED))
def test_malformed_body_is_an_invalid_request_with_status_and_param(
    settings, route, body, status, param
):
    with pytest.raises(InvalidRequest) as raised:
        parse(body, route, settings)
    assert (raised.value.status, raised.value.param) == (status, param), raised.value.message
    # Nothing the client sent is echoed whole: messages and params stay short.
    assert len(raised.value.message) < 200, raised.value.message[:300]


VALID = [
    ("prompt", ALL, {"prompt": "hi"}),
    ("prompt at the limit", ALL, {"prompt": "x" * LIMIT}),
    (
        "every field of ours",
        ALL,
        {
            "prompt": "hi",
            "model": "m",
            "max_tokens": 5,
            "temperature": 0,
            "granularity": "word",
            "stream": True,
        },
    ),
    (
        "nulls are left out",
        ALL,
        {
            "prompt": "hi",
            "messages": None,
            "model": None,
            "max_tokens": None,
            "temperature": None,
            "granularity": None,
            "stream": None,
        },
    ),
    ("max_tokens at the bound", ALL, with_prompt(max_tokens=1_000_000)),
    ("temperature a float", ALL, with_prompt(temperature=1.25)),
    (
        "every role",
        ALL,
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "developer", "content": "d"},
                {"role": "user", "content": "u", "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
                {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                {"role": "function", "name": "f", "content": "done"},
            ]
        },
    ),
    (
        "every content part",
        ALL,
        parts({"type": "text", "text": "describe"}, IMAGE, AUDIO, FILE_ID, FILE_DATA, REFUSAL),
    ),
    ("image without text", ALL, parts({"type": "image_url", "image_url": {"url": "u"}})),
    (
        "media does not count against the limit",
        ALL,
        parts(
            {"type": "text", "text": "x" * LIMIT},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}},
        ),
    ),
    (
        "text parts exactly at the limit",
        ALL,
        parts({"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 40}),
    ),
    ("unknown message keys", ALL, user(reasoning_content="thought", cache_control={})),
    ("unknown part keys", ALL, parts({"type": "text", "text": "hi", "cache_control": {}})),
    (
        "nesting within the limit",
        (OPENAI,),
        with_prompt(response_format={"type": "json_schema", "json_schema": {"schema": nested(40)}}),
    ),
    ("nesting at the limit", (OPENAI,), with_prompt(kwargs=nested(63))),
    (
        "every OpenAI parameter",
        (OPENAI,),
        {
            **user(),
            "model": "gpt-4o-mini",
            "max_tokens": 5,
            "max_completion_tokens": 9,
            "temperature": 2,
            "top_p": 0,
            "n": 2,
            "stop": ["a", "b", "c", "d"],
            "presence_penalty": -2,
            "frequency_penalty": 1.5,
            "seed": -(2**63),
            "user": "u-1",
            "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {"50256": -100},
            "response_format": {"type": "json_object"},
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
    ),
    ("stop a string, tool_choice a string", (OPENAI,), with_prompt(stop="\n", tool_choice="auto")),
    (
        "extension fields",
        (OPENAI,),
        with_prompt(
            top_k=40,
            min_p=0.1,
            repetition_penalty=1.1,
            chat_template_kwargs={"thinking": False},
            options=None,
        ),
    ),
    (
        "an upstream's own part type",
        (OPENAI,),
        parts(
            {"type": "text", "text": "what happens?"},
            {"type": "video_url", "video_url": {"url": "https://x.test/v.mp4"}},
        ),
    ),
]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        pytest.param(route, body, id=f"{route}: {case}")
        for case, routes, body in VALID
        for route in routes
    ],
)
def test_valid_body_parses(settings, route, body):
    request = parse(body, route, settings)
    sent = body.get("messages")
    assert request.messages == (
        sent if sent is not None else [{"role": "user", "content": body["prompt"]}]
    )
    orjson.dumps(request.upstream_payload(True))  # what goes upstream can be encoded


def test_openai_route_passes_extensions_upstream_and_drops_null_known_fields(settings):
    body = with_prompt(
        top_k=40,
        chat_template_kwargs={"thinking": False},
        options=None,
        top_p=None,
        max_tokens=None,
        seed=7,
        granularity="word",
        stream=True,
        stream_options={"include_usage": True},
    )
    request = parse(body, OPENAI, settings)
    assert request.upstream_extra == {
        "top_k": 40,
        "chat_template_kwargs": {"thinking": False},
        "options": None,
        "seed": 7,
    }
    assert (request.stream, request.include_usage, request.granularity) == (True, True, "word")


def test_stream_routes_forward_only_their_sampling_fields(settings):
    request = parse(with_prompt(max_tokens=5, temperature=None, stream=True), SSE, settings)
    assert request.upstream_extra == {"max_tokens": 5}
    assert (request.stream, request.include_usage) == (True, True)


@pytest.mark.parametrize("route", ALL)
def test_prompt_limit_counts_real_text_characters(settings, route):
    text = {"type": "text", "text": "é" * LIMIT}  # characters, not bytes
    parse(parts(text), route, settings)
    with pytest.raises(InvalidRequest) as raised:
        parse(parts(text, REFUSAL), route, settings)
    assert raised.value.status == 413
    assert f"{LIMIT + len(REFUSAL['refusal'])} characters" in raised.value.message


# --- any body at all: an InvalidRequest or a request whose upstream payload encodes ------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # orjson's int range
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
PART_TYPES = ["text", "refusal", "image_url", "input_audio", "file", "video_url"]
# Mostly the right shape with any value anywhere: each level is reached often enough.
content_parts = st.fixed_dictionaries(
    {"type": st.sampled_from(PART_TYPES) | json_values},
    optional={
        "text": st.text(max_size=5) | json_values,
        "refusal": st.text(max_size=5) | json_values,
        "image_url": st.fixed_dictionaries({}, optional={"url": json_values, "detail": json_values})
        | json_values,
        "input_audio": st.fixed_dictionaries(
            {}, optional={"data": json_values, "format": json_values}
        )
        | json_values,
        "file": st.fixed_dictionaries(
            {}, optional={"file_id": json_values, "file_data": json_values}
        )
        | json_values,
    },
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(max_size=3) | json_values,
            "type": st.just("function") | json_values,
            "function": st.fixed_dictionaries(
                {}, optional={"name": json_values, "arguments": json_values}
            ),
        },
    ),
    max_size=2,
)
messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(ROLES) | json_values,
        "content": st.text(max_size=5) | st.lists(content_parts, max_size=3) | json_values,
    },
    optional={
        "name": json_values,
        "tool_call_id": json_values,
        "tool_calls": tool_calls | json_values,
        "function_call": json_values,
    },
)
other_fields = st.dictionaries(
    st.sampled_from([name for name in FIELDS if name not in BODY_TEXT_FIELDS])
    | st.text(max_size=6),
    json_values,
    max_size=2,
)
bodies = st.one_of(
    st.builds(
        lambda fields, sent: {**fields, "messages": sent},
        other_fields,
        st.lists(messages | json_values, min_size=1, max_size=3),
    ),
    st.builds(
        lambda fields, prompt: {**fields, "prompt": prompt},
        other_fields,
        st.text(max_size=5) | json_values,
    ),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=5),
)


def _objects(value) -> list:
    """Every object in `value`, itself first if it is one."""
    found, todo = [], [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            found.append(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


def _mutated(case: tuple, pick: int, key: str, value) -> dict:
    body = copy.deepcopy(case[2])
    objects = _objects(body)
    objects[pick % len(objects)][key] = value
    return body


# One field of a valid body, at any depth, set to any JSON value: close misses.
KEYS = sorted(
    {
        *FIELDS,
        "role",
        "content",
        "type",
        "text",
        "refusal",
        "name",
        "tool_calls",
        "tool_call_id",
        "function_call",
        "function",
        "arguments",
        "id",
        "url",
        "detail",
        "data",
        "format",
        "file_id",
        "file_data",
        "filename",
        "include_usage",
        *PART_TYPES,
    }
)
close_misses = st.builds(
    _mutated,
    st.sampled_from(VALID),
    st.integers(0, 50),
    st.sampled_from(KEYS) | st.text(max_size=4),
    json_values | st.text(max_size=300),
)


def _parses_or_is_invalid(raw: bytes, settings) -> None:
    for route in ALL:
        try:
            request = parse(raw, route, settings)
        except InvalidRequest as invalid:
            assert invalid.status in (400, 413)
            assert len(invalid.message) < 200 and len(invalid.param or "") < 80
        else:
            assert isinstance(request.messages, list) and isinstance(request.model, str)
            orjson.dumps(request.upstream_payload(True))


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies | close_misses)
def test_any_json_body_parses_or_is_an_invalid_request(settings, body):
    _parses_or_is_invalid(orjson.dumps(body), settings)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=st.lists(messages, min_size=1, max_size=3))
def test_any_messages_parse_or_are_an_invalid_request(settings, sent):
    _parses_or_is_invalid(orjson.dumps({"messages": sent}), settings)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(role=st.sampled_from(ROLES), content=st.lists(content_parts, min_size=1, max_size=3))
def test_any_content_parts_parse_or_are_an_invalid_request(settings, role, content):
    _parses_or_is_invalid(
        orjson.dumps({"messages": [{"role": role, "content": content}]}), settings
    )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=40) | json_values.map(orjson.dumps))
def test_any_bytes_parse_or_are_an_invalid_request(settings, raw):
    _parses_or_is_invalid(raw, settings)


# --- through the app ----------------------------------------------------------------------

ROUTES = [route.path for route in CHAT_ROUTES]

BAD_INPUTS = [
    # (body, status, words the message must contain)
    (b"", 400, "empty"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"{}", 400, "prompt is required"),
    (b'{"prompt": ""}', 400, "prompt is empty"),
    (b'{"prompt": "   "}', 400, "prompt is empty"),
    (b'{"prompt": 42}', 400, "prompt must be a string"),
    (b'{"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}', 400, "not both"),
    (b'{"messages": []}', 400, "non-empty list"),
    (b'{"messages": [{"content": "x"}]}', 400, "string role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "content must be"),
    (b'{"prompt": "hi", "max_tokens": "10"}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": true}', 400, "max_tokens"),
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "hi", "temperature": 3}', 400, "temperature"),
    (b'{"prompt": "hi", "model": 7}', 400, "model"),
    (b'{"prompt": "hi", "granularity": "sentence"}', 400, "unknown granularity"),
    (b'{"prompt": "' + b"x" * 101 + b'"}', 413, "too long"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("body", "status", "words"), BAD_INPUTS)
async def test_bad_input_gets_4xx_json_saying_what_is_wrong(
    make_app, fake_upstream, route, body, status, words
):
    app = make_app(max_prompt_chars=100)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        response = await client.post(route, content=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]["message"]
    assert fake_upstream.requests == []  # nothing invalid goes upstream


async def test_openai_route_rejects_non_boolean_stream(make_app):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(make_app()), base_url="http://t"
    ) as client:
        response = await client.post("/v1/chat/completions", json={"prompt": "hi", "stream": "yes"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


async def test_valid_request_streams_with_headers_and_passes_request_id(make_app, fake_upstream):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(make_app()), base_url="http://t"
    ) as client:
        response = await client.post(
            "/v1/chat/stream",
            json={"prompt": "hi", "max_tokens": 7},
            headers={"X-Request-ID": "req-123"},
        )
    assert response.status_code == 200
    assert response.text == "Hello world"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-request-id"] == "req-123"
    sent = fake_upstream.requests[0]
    assert sent.headers["x-request-id"] == "req-123"
    payload = orjson.loads(sent.content)
    assert payload["max_tokens"] == 7 and payload["stream"] is True
    assert payload["messages"] == [{"role": "user", "content": "hi"}]


async def test_unsafe_request_id_is_replaced(make_app):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(make_app()), base_url="http://t"
    ) as client:
        response = await client.post(
            "/v1/chat/stream",
            json={"prompt": "hi"},
            headers={"X-Request-ID": "bad id\twith spaces"},
        )
    assert response.headers["x-request-id"] != "bad id\twith spaces"
    assert len(response.headers["x-request-id"]) == 32


@pytest.mark.parametrize(
    ("upstream_status", "client_status"),
    [(400, 400), (401, 502), (403, 502), (404, 404), (429, 429), (500, 502), (503, 502)],
)
async def test_upstream_status_before_first_byte_is_a_real_status(
    make_app, fake_upstream, upstream_status, client_status
):
    fake_upstream.status = upstream_status
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(make_app()), base_url="http://t"
    ) as client:
        response = await client.post("/v1/chat/stream-sse", json={"prompt": "hi"})
    assert response.status_code == client_status
    assert "error" in response.json()
