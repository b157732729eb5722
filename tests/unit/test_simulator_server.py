"""The simulator in-process (its own loop in a thread): OpenAI wire format, faults, counters."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import select
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from streamgate.doctor.probe import ChunkedDecoder, ProtocolError
from streamgate.simulator.config import SimConfig
from streamgate.simulator.faults import FAULT_KINDS
from streamgate.simulator.script import MAX_TOKENS, expected_text, expected_tokens
from support import sdk, sse
from support.sim_capacity import check_stream_body
from support.simulator_thread import SimulatorThread

pytestmark = pytest.mark.timeout(60)

CHUNK_KEYS = ["id", "object", "created", "model", "system_fingerprint", "choices"]
STALL_S = 0.4


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    """Fast answers (5 ms to the first token, 1 ms apart), short stalls."""
    config = SimConfig(port=0, ttft_ms=5, gap_ms=1, tokens=20, stall_s=STALL_S)
    with SimulatorThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def instant_sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(port=0, ttft_ms=0, gap_ms=0, tokens=20)) as running:
        yield running


@pytest.fixture(scope="module")
def stalling_sim() -> Iterator[SimulatorThread]:
    """Stalls that outlast every test: for disconnects while nothing is being sent."""
    with SimulatorThread(SimConfig(port=0, ttft_ms=5, gap_ms=5, tokens=20, stall_s=600)) as running:
        yield running


def chat(sim: SimulatorThread, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(sim.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def events_of(response: httpx.Response) -> list[bytes]:
    """The SSE events' data, each checked to be framed exactly as one `data: ` line and a
    blank line (what the simulator writes)."""
    events = sse.parse(response.content).events
    assert response.content == b"".join(b"data: %s\n\n" % event.data.encode() for event in events)
    return [event.data.encode() for event in events]


def chunks_of(body: bytes) -> list[dict]:
    """The JSON chunks of a streamed body (a decoded body: no chunked framing), [DONE] left out."""
    return [json.loads(event.data) for event in sse.parse(body).events if event.data != "[DONE]"]


def contents_of(chunks: list[dict]) -> list[str]:
    return [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if c["choices"] and "content" in c["choices"][0]["delta"]
    ]


# -- OpenAI wire format ------------------------------------------------------------------


def test_stream_is_openai_chunks_then_done(sim):
    response = chat(
        sim,
        {
            "model": "gpt-test",
            "stream": True,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    events = events_of(response)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(list(chunk) == CHUNK_KEYS for chunk in chunks)
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(
        chunk["object"] == "chat.completion.chunk" and chunk["model"] == "gpt-test"
        for chunk in chunks
    )
    assert all(isinstance(chunk["created"], int) for chunk in chunks)
    assert chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert [c["choices"] for c in chunks[1:-1]] == [
        [
            {
                "index": 0,
                "delta": {"content": token},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        for token in expected_tokens(8)
    ]
    assert chunks[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]


def test_include_usage_adds_a_usage_chunk_and_null_usage_everywhere_else(sim):
    response = chat(
        sim,
        {
            "stream": True,
            "max_tokens": 5,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "three words here"}],
        },
    )
    chunks = [json.loads(event) for event in events_of(response)[:-1]]
    assert all(list(chunk) == [*CHUNK_KEYS, "usage"] for chunk in chunks)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_non_stream_is_one_chat_completion(sim):
    response = chat(
        sim,
        {
            "model": "gpt-test",
            "max_tokens": 6,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    ]
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": expected_text(6),
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 6,
        "total_tokens": 7,
    }


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        ({}, 20),
        ({"max_tokens": 3}, 3),
        ({"max_completion_tokens": 4}, 4),
        ({"max_tokens": MAX_TOKENS + 10}, MAX_TOKENS),
    ],
)
def test_token_count_is_max_tokens_bounded_else_the_default(instant_sim, body, tokens):
    response = chat(instant_sim, {"messages": [], **body})
    assert response.json()["choices"][0]["message"]["content"] == expected_text(tokens)


def test_every_token_of_the_sequence_streams_exactly(instant_sim):
    response = chat(instant_sim, {"stream": True, "max_tokens": MAX_TOKENS})
    assert contents_of(chunks_of(response.content))[1:] == expected_tokens(MAX_TOKENS)


def test_openai_sdk_streams(sim):
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        max_tokens=50,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert sdk.streamed_text(chunks) == expected_text(50)
    assert chunks[-1].usage.completion_tokens == 50
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_async_openai_sdk_streams_and_not(sim):
    answers = asyncio.run(
        sdk.streamed_and_whole(sim.url, streamed={"max_tokens": 30}, whole={"max_tokens": 30})
    )
    assert answers.streamed == answers.whole == expected_text(30)


def test_models_and_health(sim):
    models = httpx.get(sim.url + "/v1/models").json()
    assert models["object"] == "list"
    ids = [model["id"] for model in models["data"]]
    assert ids[0] == "streamgate-sim"
    assert {f"sim-fault-{kind}" for kind in FAULT_KINDS} <= set(ids)
    assert httpx.get(sim.url + "/healthz").json() == {"status": "ok"}


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["model", "header"])
@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("429", 429, "rate_limit_exceeded"), ("500", 500, None)],
)
def test_status_faults_answer_before_any_token(sim, how, kind, status, code):
    body = {
        "stream": True,
        "model": f"sim-fault-{kind}" if how == "model" else "gpt-test",
    }
    response = chat(sim, body, headers={"X-Sim-Fault": kind} if how == "header" else None)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


def test_openai_sdk_sees_status_faults_as_api_errors(sim):
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="sim-fault-429", messages=[], stream=True)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="sim-fault-500", messages=[])


def test_error_midstream_sends_half_then_an_error_event_and_no_done(sim):
    response = chat(sim, {"stream": True, "model": "sim-fault-error-midstream", "max_tokens": 10})
    assert response.status_code == 200
    events = events_of(response)
    assert b"[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and error["code"] == "simulated_midstream_error"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(contents_of(chunks)) == expected_text(5)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


def test_openai_sdk_raises_on_the_midstream_error(sim):
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="sim-fault-error-midstream", messages=[], stream=True
    )
    with pytest.raises(openai.APIError, match="simulated failure"):
        list(stream)


def _timed_reads(sim: SimulatorThread, body: dict) -> tuple[float, list[tuple[float, bytes]]]:
    """(time to headers, [(seconds since request, decoded body piece)]) for one streamed answer."""
    started = time.monotonic()
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json=body, timeout=10) as response:
        headers_at = time.monotonic() - started
        reads = [(time.monotonic() - started, piece) for piece in response.iter_raw()]
    return headers_at, reads


def test_stall_first_sends_headers_then_nothing_for_the_stall(sim):
    headers_at, reads = _timed_reads(
        sim, {"stream": True, "model": "sim-fault-stall-first", "max_tokens": 4}
    )
    assert headers_at < STALL_S / 2
    assert reads[0][0] >= STALL_S
    assert "".join(contents_of(chunks_of(b"".join(piece for _, piece in reads)))) == expected_text(
        4
    )


def test_stall_midstream_pauses_after_half_then_finishes(sim):
    _, reads = _timed_reads(
        sim, {"stream": True, "model": "sim-fault-stall-midstream", "max_tokens": 10}
    )
    pauses = [later[0] - earlier[0] for earlier, later in itertools.pairwise(reads)]
    assert max(pauses) >= STALL_S - 0.02  # measured from a token that may itself be late
    text_before_pause = b"".join(p for _, p in reads[: pauses.index(max(pauses)) + 1])
    assert text_before_pause.count(b'"content":') == 1 + 5  # role chunk + half the tokens
    assert b"data: [DONE]" in reads[-1][1]


def test_close_midstream_drops_the_connection_without_the_end(sim):
    received = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            sim.url + "/v1/chat/completions",
            json={
                "stream": True,
                "model": "sim-fault-close-midstream",
                "max_tokens": 10,
            },
        ) as response,
    ):
        received.extend(response.iter_bytes())
    assert "".join(contents_of(chunks_of(b"".join(received)))) == expected_text(5)


def test_drop_token_loses_exactly_token_n_over_2(sim):
    response = chat(
        sim,
        {
            "stream": True,
            "model": "sim-fault-drop-token",
            "max_tokens": 10,
            "stream_options": {"include_usage": True},
        },
    )
    events = events_of(response)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    tokens = expected_tokens(10)
    assert contents_of(chunks)[1:] == tokens[:5] + tokens[6:]
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_the_stream_checker_catches_a_dropped_token(sim):
    """Negative control for check_stream_body (the capacity check's verdict)."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b"
    )
    for model, verdict in [
        (b"gpt-test", None),
        (b"sim-fault-drop-token", "content differs from expected_text"),
    ]:
        body = b'{"stream": true, "max_tokens": 9, "model": "%b"}' % model
        raw = raw_exchange(sim, request % (len(body), body), until=b"0\r\n\r\n")
        assert check_stream_body(raw, 9) == verdict


@pytest.mark.parametrize("model", ["gpt-4o", "sim-faulty", "sim-fault"])
def test_any_other_model_streams_normally(sim, model):
    response = chat(sim, {"stream": True, "model": model, "max_tokens": 5})
    assert "".join(contents_of([json.loads(e) for e in events_of(response)[:-1]])) == expected_text(
        5
    )


def test_non_stream_faults(sim):
    assert chat(sim, {"model": "sim-fault-error-midstream"}).status_code == 500
    dropped = chat(sim, {"model": "sim-fault-drop-token", "max_tokens": 6}).json()
    tokens = expected_tokens(6)
    assert dropped["choices"][0]["message"]["content"] == "".join(tokens[:3] + tokens[4:])
    with pytest.raises(httpx.RemoteProtocolError):
        chat(sim, {"model": "sim-fault-close-midstream"})


def test_faults_are_counted_by_kind(sim):
    sim.call(sim.stats.reset)
    for kind in ("429", "drop-token", "drop-token"):
        chat(sim, {"stream": True, "model": f"sim-fault-{kind}", "max_tokens": 2})
    chat(sim, {"stream": True, "max_tokens": 2}, headers={"X-Sim-Fault": "500"})
    assert httpx.get(sim.url + "/stats").json()["faults"] == {
        "429": 1,
        "drop-token": 2,
        "500": 1,
    }


# -- bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"max_tokens": 0}', 400, "max_tokens"),
        (b'{"max_tokens": "5"}', 400, "max_tokens"),
        (b'{"max_tokens": true}', 400, "max_tokens"),
        (b'{"stream": "yes"}', 400, "stream"),
        (b'{"model": 5}', 400, "model"),
        (b'{"stream_options": []}', 400, "stream_options"),
        (b'{"model": "sim-fault-nope"}', 400, "unknown simulator fault"),
    ],
)
def test_bad_requests_get_an_openai_error(sim, content, status, says):
    response = httpx.post(sim.url + "/v1/chat/completions", content=content)
    assert response.status_code == status
    assert says in response.json()["error"]["message"]


def test_unknown_fault_header_is_refused(sim):
    assert chat(sim, {}, headers={"X-Sim-Fault": "explode"}).status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/healthz", 405),
    ],
)
def test_unknown_routes_and_methods(sim, method, path, status):
    response = httpx.request(method, sim.url + path)
    assert response.status_code == status
    assert "error" in response.json()


def test_oversized_body_is_refused(sim):
    response = httpx.post(
        sim.url + "/v1/chat/completions", content=b"x" * (9 * 1024 * 1024), timeout=10
    )
    assert response.status_code == 413


# -- counters, request ids, disconnects ----------------------------------------------------


def test_request_id_is_echoed_and_recorded(sim):
    response = chat(sim, {"stream": True, "max_tokens": 2}, headers={"X-Request-ID": "rid-echo-1"})
    assert response.headers["x-request-id"] == "rid-echo-1"
    stats = httpx.get(sim.url + "/stats").json()
    assert stats["recent_request_ids"][-1] == "rid-echo-1"


def test_a_request_id_is_made_up_when_absent_but_not_recorded(sim):
    before = httpx.get(sim.url + "/stats").json()["requests_with_request_id"]
    response = chat(sim, {"max_tokens": 2})
    assert response.headers["x-request-id"].startswith("req_sim")
    assert httpx.get(sim.url + "/stats").json()["requests_with_request_id"] == before


def test_counters_add_up_and_reset(sim):
    reset = httpx.post(sim.url + "/stats/reset").json()
    assert (
        reset["started"],
        reset["completed"],
        reset["cancelled"],
        reset["active"],
    ) == (0, 0, 0, 0)
    for model in ("gpt-test", "sim-fault-429", "sim-fault-close-midstream"):
        try:
            chat(sim, {"stream": True, "model": model, "max_tokens": 4})
        except httpx.RemoteProtocolError:
            pass
    stats = httpx.get(sim.url + "/stats").json()
    assert (
        stats["started"],
        stats["completed"],
        stats["cancelled"],
        stats["active"],
    ) == (3, 3, 0, 0)
    assert stats["peak_active"] == 1


def raw_exchange(
    sim: SimulatorThread, request: bytes, until: bytes | None = None, limit_s: float = 5
) -> bytes:
    """Send raw bytes; read until `until` shows up or the server closes."""
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=limit_s) as sock:
        sock.sendall(request)
        received = b""
        while until is None or until not in received:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        return received


def _post(body: bytes, headers: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/%b\r\nhost: sim\r\ncontent-type: application/json\r\n%b"
        b"content-length: %d\r\n\r\n%b" % (version, headers, len(body), body)
    )


def _wait_for(condition, timeout_s: float) -> float:
    """Poll until condition() is true; return how long it took (fails after timeout_s)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition never became true"
        time.sleep(0.001)
    return time.monotonic() - started


@pytest.mark.parametrize(
    "model", ["gpt-test", "sim-fault-stall-first", "sim-fault-stall-midstream"]
)
def test_a_client_that_goes_away_is_counted_cancelled_at_once(stalling_sim, model):
    sim = stalling_sim
    sim.call(sim.stats.reset)
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    body = b'{"stream": true, "max_tokens": 20, "model": "%b"}' % model.encode()
    sock.sendall(_post(body, b"x-request-id: rid-cancel\r\n"))
    received = b""
    want = b"200 OK" if model == "sim-fault-stall-first" else b'"content":"ing "'
    while want not in received:
        received += sock.recv(65536)
    time.sleep(0.05)  # mid-stream, or well into the stall
    closed_at = time.time()
    sock.close()
    took = _wait_for(lambda: sim.stats.cancelled == 1, timeout_s=2)
    assert took < 0.1
    stats = httpx.get(sim.url + "/stats").json()
    assert stats["active"] == 0 and stats["completed"] == 0
    assert 0 <= stats["last_cancel_at"] - closed_at < 0.1
    assert stats["recent_cancels"][-1]["request_id"] == "rid-cancel"
    assert stats["recent_cancels"][-1]["tokens_sent"] < 20


def test_stats_list_each_answer_in_flight_with_its_clients_port(stalling_sim):
    """Which connection carries which answer: what tells a test which process holds a stream."""
    sim = stalling_sim
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            _post(
                b'{"stream": true, "model": "sim-fault-stall-first"}',
                b"x-request-id: rid-in-flight\r\n",
            )
        )
        _wait_for(lambda: sim.stats.active >= 1, timeout_s=2)
        listed = httpx.get(sim.url + "/stats").json()["active_streams"]
        assert {
            "request_id": "rid-in-flight",
            "peer_port": sock.getsockname()[1],
            "tokens_sent": 0,
        } in listed
    _wait_for(lambda: sim.stats.active == 0, timeout_s=2)
    assert httpx.get(sim.url + "/stats").json()["active_streams"] == []  # control: gone


def test_a_reset_keeps_streams_in_flight_counted(stalling_sim):
    sim = stalling_sim
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_post(b'{"stream": true, "model": "sim-fault-stall-first"}'))
        _wait_for(lambda: sim.stats.active == 1, timeout_s=2)
        reset = httpx.post(sim.url + "/stats/reset").json()
        assert (reset["started"], reset["active"], reset["cancelled"]) == (1, 1, 0)
    _wait_for(lambda: sim.stats.cancelled == 1, timeout_s=2)
    stats = httpx.get(sim.url + "/stats").json()
    assert (stats["started"], stats["completed"], stats["active"]) == (1, 0, 0)


def test_a_client_that_reads_to_the_end_is_not_cancelled(stalling_sim):
    """Negative control for the cancellation counter."""
    sim = stalling_sim
    sim.call(sim.stats.reset)
    raw = raw_exchange(sim, _post(b'{"stream": true, "max_tokens": 5}'), until=b"0\r\n\r\n")
    assert check_stream_body(raw, 5) is None
    _wait_for(lambda: sim.stats.completed == 1, timeout_s=2)
    assert sim.stats.cancelled == 0


def test_keep_alive_and_pipelined_requests_are_answered_in_order(sim):
    one = _post(b'{"stream": true, "max_tokens": 3}', b"x-request-id: first\r\n")
    two = _post(b'{"max_tokens": 4}', b"x-request-id: second\r\n")
    raw = raw_exchange(sim, one + two, until=b'"total_tokens":5}')
    first, second = raw.split(b"0\r\n\r\n", 1)
    assert b"x-request-id: first" in first
    assert check_stream_body(first + b"0\r\n\r\n", 3) is None
    head, _, body = second.partition(b"\r\n\r\n")
    assert b"x-request-id: second" in head
    assert json.loads(body)["choices"][0]["message"]["content"] == expected_text(4)


def test_http_1_0_gets_a_close_delimited_stream(sim):
    raw = raw_exchange(sim, _post(b'{"stream": true, "max_tokens": 6}', version=b"1.0"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head
    assert body.endswith(b"data: [DONE]\n\n")
    assert "".join(contents_of(chunks_of(body))) == expected_text(6)


def test_expect_100_continue_is_answered_before_the_body(sim):
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    body = b'{"max_tokens": 3}'
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\nexpect: 100-continue\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while b"total_tokens" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 OK")


def test_malformed_http_is_refused(sim):
    raw = raw_exchange(sim, b"GARBAGE\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")


def test_jitter_varies_timing_not_text():
    with SimulatorThread(SimConfig(port=0, ttft_ms=1, gap_ms=10, jitter_ms=10, tokens=30)) as sim:
        _, reads = _timed_reads(sim, {"stream": True})
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(reads)]
    assert max(gaps) - min(gaps) > 0.005  # 10 ms +/- 10 ms: uneven, unlike the fixed pace
    assert "".join(contents_of(chunks_of(b"".join(p for _, p in reads)))) == expected_text(30)


# -- bounds: what a client can make one connection hold ------------------------------------
# Real sockets against the in-process simulator; every read and write is bounded in time.

BOUND_WAIT_S = 2.0


def _connect(sim: SimulatorThread, timeout_s: float = BOUND_WAIT_S) -> socket.socket:
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout_s)


def _read_to_close(sock: socket.socket, limit_s: float = BOUND_WAIT_S) -> tuple[bytes, bool]:
    """Everything the simulator sends until it closes, or until limit_s: (bytes, closed)."""
    deadline = time.monotonic() + limit_s
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received, True
        if not piece:
            return received, True
        received += piece
    return received, False


def _send_until_answered(sock: socket.socket, pieces: Iterator[bytes]) -> int:
    """Send pieces until the simulator answers (or stops reading); returns the bytes sent."""
    sent = 0
    for piece in pieces:
        if select.select([sock], [], [], 0.005)[0]:
            break
        try:
            sock.sendall(piece)
        except OSError:  # reset, or blocked: the simulator stopped taking more
            break
        sent += len(piece)
    return sent


def _error_answer(raw: bytes, status: int) -> dict:
    """A closing OpenAI-style error answer, alone: returns its `error` object."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 %d " % status), raw[:200]
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/json"
    assert len(body) == int(headers[b"content-length"]), "answer cut off or followed by more"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _request_line_pieces(total: int) -> Iterator[bytes]:
    yield b"GET /"
    for _ in range(total // 8192):
        yield b"a" * 8192


def _header_value_pieces(total: int) -> Iterator[bytes]:
    yield b"GET /healthz HTTP/1.1\r\nhost: sim\r\nx-pad: "
    for _ in range(total // 8192):
        yield b"v" * 8192


@pytest.mark.parametrize(
    ("pieces", "status", "code"),
    [
        (_request_line_pieces, 414, "uri_too_long"),
        (_header_value_pieces, 431, "request_header_fields_too_large"),
    ],
    ids=["request-line", "header-value"],
)
def test_an_endless_head_is_refused_early_and_closed(sim, pieces, status, code):
    """No end of the head ever comes: the answer must come after a bounded read, not never."""
    with _connect(sim) as sock:
        sent = _send_until_answered(sock, pieces(1024 * 1024))
        raw, closed = _read_to_close(sock)
    assert raw, f"no answer after {sent} bytes of an unfinished head"
    assert sent < 256 * 1024, f"the simulator kept reading: {sent} bytes before it answered"
    assert _error_answer(raw, status)["code"] == code
    assert closed


def test_a_huge_request_line_is_414(sim):
    with _connect(sim) as sock:
        sock.sendall(b"GET /healthz?" + b"a" * 64 * 1024 + b" HTTP/1.1\r\nhost: sim\r\n\r\n")
        raw, closed = _read_to_close(sock)
    assert _error_answer(raw, 414)["code"] == "uri_too_long"
    assert closed


@pytest.mark.parametrize(
    "headers",
    [
        b"x-big: " + b"v" * 64 * 1024 + b"\r\n",
        b"".join(b"x-pad-%d: value\r\n" % n for n in range(4000)),  # ~80 KiB of small ones
        b"".join(b"x-%d: v\r\n" % n for n in range(150)),  # few bytes, many lines
    ],
    ids=["one-huge-header", "many-headers", "many-header-lines"],
)
def test_huge_headers_are_431(sim, headers):
    with _connect(sim) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: sim\r\n" + headers + b"\r\n")
        raw, closed = _read_to_close(sock)
    assert _error_answer(raw, 431)["code"] == "request_header_fields_too_large"
    assert closed


def test_a_huge_content_length_is_413_before_the_body_is_sent(sim):
    with _connect(sim) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n{" % (10 * 1024**3)
        )
        raw, closed = _read_to_close(sock)
    assert _error_answer(raw, 413)["code"] == "request_too_large"
    assert closed


def test_a_huge_chunked_body_is_413_once_it_is_over_the_cap(sim):
    chunk = b"%x\r\n%b\r\n" % (64 * 1024, b" " * 64 * 1024)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\n"
        b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    with _connect(sim) as sock:
        # 1 KiB of JSON, then whitespace: valid JSON if it were ever complete (2 MiB)
        pieces = itertools.chain(
            [head, b"400\r\n" + b"[" + b" " * 1022 + b"]" + b"\r\n"],
            itertools.repeat(chunk, 32),
            [b"0\r\n\r\n"],
        )
        sent = _send_until_answered(sock, pieces)
        raw, closed = _read_to_close(sock)
    assert raw, f"no answer after {sent} bytes"
    assert _error_answer(raw, 413)["code"] == "request_too_large"
    assert sent < 2 * 1024 * 1024
    assert closed


def test_a_body_under_the_cap_is_accepted(instant_sim):
    """Negative control for the body cap: a large but allowed request is answered."""
    padding = "x" * (1024 * 1024 - 200)
    response = chat(
        instant_sim,
        {"max_tokens": 2, "messages": [{"role": "user", "content": padding}]},
    )
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 1


def _stream_then_rest(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a raw exchange that starts with a chunked answer: (head, decoded body, what
    follows its last chunk). Fails when anything else is found inside the chunked body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), raw[:200]
    assert b"transfer-encoding: chunked" in head
    decoder = ChunkedDecoder()
    try:
        decoded = decoder.feed(body)
    except ProtocolError as exc:
        raise AssertionError(f"not a chunked body: {exc}") from None
    assert decoder.done, f"chunked body cut off: ...{body[-80:]!r}"
    return head, decoded, decoder.rest


MALFORMED = {
    "garbage": (b"GARBAGE\r\n\r\n", 400),
    "huge-head": (
        b"GET /healthz HTTP/1.1\r\nx-big: " + b"v" * 32 * 1024 + b"\r\n\r\n",
        431,
    ),
    "huge-body": (
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 9999999999\r\n\r\n",
        413,
    ),
}


@pytest.mark.parametrize("when", ["same-write", "mid-stream"])
@pytest.mark.parametrize("malformed", list(MALFORMED))
def test_a_bad_request_after_a_stream_is_answered_after_its_last_chunk(sim, malformed, when):
    bad, status = MALFORMED[malformed]
    good = _post(b'{"stream": true, "max_tokens": 60}')
    with _connect(sim) as sock:
        if when == "same-write":
            sock.sendall(good + bad)
            raw = b""
        else:
            sock.sendall(good)
            raw = b""
            while b'"content":"Stream"' not in raw:  # the first token: the stream is under way
                piece = sock.recv(65536)
                assert piece, "closed before the first token"
                raw += piece
            sock.sendall(bad)
        rest_of_exchange, closed = _read_to_close(sock)
        raw += rest_of_exchange
    _, body, after = _stream_then_rest(raw)
    assert body.endswith(b"data: [DONE]\n\n")
    assert "".join(contents_of(chunks_of(body))) == expected_text(60)
    assert _error_answer(after, status)  # after the last chunk, alone
    assert closed


def test_expect_100_continue_behind_a_stream_waits_for_its_end(sim):
    body = b'{"max_tokens": 3}'
    with _connect(sim) as sock:
        sock.sendall(
            _post(b'{"stream": true, "max_tokens": 40}')
            + b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\nexpect: 100-continue\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        )
        raw = b""
        while not raw.endswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
            piece = sock.recv(65536)
            assert piece, "closed"
            raw += piece
        _, streamed, after = _stream_then_rest(raw)
        assert streamed.endswith(b"data: [DONE]\n\n")
        assert after == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while b"total_tokens" not in answer:
            piece = sock.recv(65536)
            assert piece, "closed"
            answer += piece
    assert answer.startswith(b"HTTP/1.1 200 OK")


def test_a_long_pipeline_is_answered_completely_and_in_order(instant_sim):
    """Back-pressure on the read-ahead must lose and reorder nothing: 200 requests in one
    write (far over the read-ahead bound), streams and plain answers mixed."""
    requests = []
    for n in range(200):
        rid = b"x-request-id: p%d\r\n" % n
        body = b'{"stream": true, "max_tokens": 2}' if n % 3 == 0 else b'{"max_tokens": 2}'
        requests.append(_post(body, rid))
    with _connect(instant_sim, timeout_s=5) as sock:
        sock.sendall(b"".join(requests))
        raw = b""
        deadline = time.monotonic() + 5
        while raw.count(b"HTTP/1.1 200 OK") < 200 or not raw.endswith((b"0\r\n\r\n", b"}")):
            assert time.monotonic() < deadline, "answers missing"
            piece = sock.recv(65536)
            assert piece, "closed"
            raw += piece
    ids = re.findall(rb"x-request-id: (p\d+)", raw)
    assert ids == [b"p%d" % n for n in range(200)]


def test_a_hang_up_behind_a_refused_request_is_still_heard_at_once(stalling_sim):
    """The error waits for the stalled stream, but the client's hang-up must not wait."""
    sim = stalling_sim
    sim.call(sim.stats.reset)
    with _connect(sim) as sock:
        sock.sendall(
            _post(b'{"stream": true, "model": "sim-fault-stall-first"}') + b"GARBAGE\r\n\r\n"
        )
        received = b""
        while b"200 OK" not in received:
            piece = sock.recv(65536)
            assert piece, "closed"
            received += piece
        time.sleep(0.05)
        assert sim.stats.active == 1
    took = _wait_for(lambda: sim.stats.cancelled == 1, timeout_s=2)
    assert took < 0.1
