"""The doctor's probe against canned answers on a loopback socket: what each read carried, and
hostile answers (oversized heads, broken chunk sizes, no body, bombs, silence) each ending in a
bounded time with a sentence, never a traceback or unbounded memory."""

from __future__ import annotations

import gzip
import itertools
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from streamgate.doctor import probe
from streamgate.doctor.probe import Options
from support.tls import LocalPKI, make_test_pki

pytestmark = pytest.mark.timeout(30)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
SSE_HEAD = CHUNKED_HEAD + b"content-type: text/event-stream\r\n\r\n"
TEXT_HEAD = CHUNKED_HEAD + b"content-type: text/plain\r\n\r\n"


@contextmanager
def canned(
    pieces: list[tuple[float, bytes]],
    *,
    hold_open_s: float = 0.0,
    tls: ssl.SSLContext | None = None,
) -> Iterator[dict]:
    """A server for one connection: reads the request, then sends each (delay s, bytes) piece,
    then keeps the connection open `hold_open_s` and closes it. Yields {"url", "request"}."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    scheme = "https" if tls else "http"
    seen: dict = {"url": f"{scheme}://127.0.0.1:{listener.getsockname()[1]}", "request": b""}

    def serve() -> None:
        try:
            exchange()
        except OSError:
            pass  # the probe gave up first (or refused the certificate): some tests want that

    def exchange() -> None:
        connection, _ = listener.accept()
        if tls is not None:
            connection = tls.wrap_socket(connection, server_side=True)
        with connection:
            connection.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                body += connection.recv(65536)
            seen["request"] = head + b"\r\n\r\n" + body
            for delay, data in pieces:
                time.sleep(delay)
                connection.sendall(data)
            time.sleep(hold_open_s)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        thread.join(10)
        listener.close()


def run(url_path: str, seen: dict, **options) -> dict:
    return probe.probe(Options(url=seen["url"] + url_path, **{"timeout_s": 5.0, **options}))


# --------------------------------------------------------------------- what reads carried


def test_each_read_is_timed_with_the_tokens_it_completed():
    events = [b'data: {"choices":[{"delta":{"content":"w%d "}}]}\n\n' % i for i in range(3)]
    pieces = [(0, SSE_HEAD)] + [(0.05, chunk(event)) for event in events]
    pieces += [(0.05, chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")]
    with canned(pieces) as seen:
        result = run("/v1/chat/completions", seen)
    assert result["error"] is None and result["complete"]
    assert [read[2] for read in result["reads"]] == [0, 1, 1, 1, 0]
    times = [read[0] for read in result["reads"]]
    assert all(later - earlier >= 40 for earlier, later in itertools.pairwise(times))
    assert result["t_headers_ms"] < result["t_first_body_ms"]
    assert result["tokens"] == 3 and result["body_sample"] == "w0 w1 w2 "


def test_an_event_split_across_reads_counts_in_the_read_that_completes_it():
    event = b'data: {"content": "hello"}\n\n'
    pieces = [(0, SSE_HEAD), (0.03, chunk(event[:9])), (0.03, chunk(event[9:]) + b"0\r\n\r\n")]
    with canned(pieces) as seen:
        result = run("/v1/chat/stream-sse", seen)
    assert [read[2] for read in result["reads"]] == [0, 0, 1]


def test_plain_text_counts_words_where_they_start():
    pieces = [
        (0, TEXT_HEAD),
        (0.03, chunk(b"Hello wor")),
        (0.03, chunk(b"ld again") + b"0\r\n\r\n"),
    ]
    with canned(pieces) as seen:
        result = run("/v1/chat/stream", seen)
    assert [read[2] for read in result["reads"]] == [0, 2, 1] and result["tokens"] == 3


def test_usage_and_in_band_errors_are_kept_and_not_counted():
    body = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\n'
        b'data: {"error":{"message":"upstream error mid-stream"}}\n\ndata: [DONE]\n\n'
    )
    with canned([(0, SSE_HEAD + chunk(body) + b"0\r\n\r\n")]) as seen:
        result = run("/v1/chat/completions", seen)
    assert result["tokens"] == 1
    assert result["usage"] == {"completion_tokens": 1}
    assert "upstream error mid-stream" in result["stream_error"]


def test_a_gzip_stream_is_undone_to_count_tokens():
    compressed = gzip.compress(b"one two three four")
    head = CHUNKED_HEAD + b"content-type: text/plain\r\ncontent-encoding: gzip\r\n\r\n"
    with canned([(0, head + chunk(compressed) + b"0\r\n\r\n")]) as seen:
        result = run("/v1/chat/stream", seen)
    assert result["error"] is None and result["tokens"] == 4


def test_the_request_asks_for_a_long_streamed_answer_with_the_key():
    with canned([(0, SSE_HEAD + b"0\r\n\r\n")]) as seen:
        run("/v1/chat/completions", seen, key="sk-probe-test", max_tokens=321, model="m1")
    head, _, body = seen["request"].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer sk-probe-test" in head
    assert b"Accept-Encoding: gzip" in head
    payload = json.loads(body)
    assert payload["stream"] is True and payload["max_tokens"] == 321 and payload["model"] == "m1"


def test_an_unknown_path_without_a_body_is_a_get():
    with canned([(0, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]) as seen:
        result = run("/events", seen)
    assert seen["request"].startswith(b"GET /events HTTP/1.1")
    assert result["complete"] and result["tokens"] == 1


def test_interim_answers_before_the_final_head_are_skipped():
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
    with canned([(0, early), (0.02, TEXT_HEAD + chunk(b"hi") + b"0\r\n\r\n")]) as seen:
        result = run("/v1/chat/stream", seen)
    assert (result["status"], result["error"], result["tokens"]) == (200, None, 1)


def test_a_header_line_break_in_an_option_is_refused():
    result = probe.probe(
        Options(url="http://127.0.0.1:9/v1/chat/stream", headers={"X-A": "b\r\nX-Evil: 1"})
    )
    assert "line break" in result["error"]


# ------------------------------------------------------------------------ hostile answers


# Each answer sent at once, then the connection closed: id -> (the bytes, what the error says).
HOSTILE_ANSWERS = {
    "oversized-head": (
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",
        "head over 65536 bytes",
    ),
    "too-many-fields": (
        b"HTTP/1.1 200 OK\r\n" + b"x-a: 1\r\n" * 300 + b"\r\n",
        "more than 200 header fields",
    ),
    "broken-chunk-size": (TEXT_HEAD + b"zz\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),
    "negative-chunk-size": (TEXT_HEAD + b"-5\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),
    "chunk-longer-than-its-size": (
        TEXT_HEAD + b"5\r\nhello!!\r\n0\r\n\r\n",
        "chunk not followed by CRLF",
    ),
    "cut-mid-body": (
        TEXT_HEAD + chunk(b"hello"),
        "closed the connection before the end of the body",
    ),
    "no-answer": (b"", "closed the connection before the end of the head"),
    "not-http": (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x status line"),
    "bad-field": (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header field line"),
    "body-over-content-length": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhello",
        "more body bytes than the content-length",
    ),
    "negative-content-length": (
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        "bad content-length",
    ),
    "transfer-coding-not-chunked": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxx",
        "does not end in chunked",
    ),
    "unasked-content-coding": (
        b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 1\r\n\r\nx",
        "was not asked for",
    ),
    "switching-protocols": (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
        "switched protocols",
    ),
}


@pytest.mark.parametrize(("answer", "error"), HOSTILE_ANSWERS.values(), ids=HOSTILE_ANSWERS.keys())
def test_hostile_answers_end_with_a_sentence(answer, error):
    with canned([(0, answer)] if answer else []) as seen:
        result = run("/v1/chat/stream", seen)
    assert result["error"] and error in result["error"], result["error"]
    assert result["error"].startswith("the response breaks HTTP/1.1")


def test_a_gzip_bomb_is_stopped_at_the_body_limit(monkeypatch):
    monkeypatch.setattr(probe, "MAX_BODY_BYTES", 1 << 20)
    bomb = gzip.compress(b"a " * (4 << 20))  # 8 MiB of words in about 8 KiB
    head = CHUNKED_HEAD + b"content-type: text/plain\r\ncontent-encoding: gzip\r\n\r\n"
    with canned([(0, head + chunk(bomb) + b"0\r\n\r\n")]) as seen:
        result = run("/v1/chat/stream", seen)
    assert "once decompressed" in result["error"]
    assert result["body_bytes"] <= 1 << 20


def test_an_endless_body_is_stopped_at_the_body_limit(monkeypatch):
    monkeypatch.setattr(probe, "MAX_BODY_BYTES", 100_000)
    pieces = [(0, TEXT_HEAD)] + [(0, chunk(b"x " * 5000)) for _ in range(30)]
    with canned(pieces) as seen:
        result = run("/v1/chat/stream", seen)
    assert "body over 100000 bytes" in result["error"]


def test_an_answer_that_never_ends_is_cut_at_the_timeout():
    with canned([(0, TEXT_HEAD + chunk(b"word "))], hold_open_s=1.5) as seen:
        started = time.monotonic()
        result = run("/v1/chat/stream", seen, timeout_s=0.5)
        took = time.monotonic() - started
    assert "no complete answer within 0.5 s" in result["error"] and took < 2
    assert result["tokens"] == 1  # what came before the cut is kept for the verdict


@pytest.mark.parametrize(
    ("head", "complete"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", True),
    ],
)
def test_answers_without_a_body_complete_with_no_tokens(head, complete):
    with canned([(0, head)], hold_open_s=0.5) as seen:
        result = run("/v1/chat/stream", seen)
    assert (result["error"], result["complete"], result["tokens"]) == (None, complete, 0)
    assert result["t_first_body_ms"] is None


def test_a_closed_port_says_what_to_fix():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # bound, never listening: refused
    result = probe.probe(Options(url=f"http://127.0.0.1:{port}/v1/chat/stream", timeout_s=2))
    assert "refused" in result["error"] and "is the server running" in result["error"]


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://example.org/", "must start with http:// or https://"),
        ("http://127.0.0.1:99999/", "port is not a number"),
    ],
)
def test_bad_urls_are_refused_with_a_sentence(url, error):
    assert error in probe.probe(Options(url=url))["error"]


def test_the_script_alone_runs_on_a_bare_python(tmp_path):
    """As on a host: the file, the system python3, no site packages, no streamgate."""
    with canned([(0, TEXT_HEAD + chunk(b"one two") + b"0\r\n\r\n")]) as seen:
        source = open(probe.__file__, "rb").read()
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-", seen["url"] + "/v1/chat/stream", "--timeout", "5"],
            input=source,
            capture_output=True,
            timeout=20,
            check=False,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["status"], result["tokens"], result["error"]) == (200, 2, None)


# --------------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: LocalPKI) -> ssl.SSLContext:
    """A server that would speak HTTP/2 if offered: the probe offers http/1.1 only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.certificate_chain, pki.private_key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def test_https_offers_http_1_1_and_reports_the_session(pki):
    with canned([(0, TEXT_HEAD + chunk(b"one two") + b"0\r\n\r\n")], tls=server_tls(pki)) as seen:
        result = run("/v1/chat/stream", seen, cacert=str(pki.ca_certificate))
    assert result["error"] is None and result["tokens"] == 2
    assert result["alpn"] == "http/1.1" and result["tls"]["version"] in ("TLSv1.2", "TLSv1.3")


def test_an_untrusted_certificate_says_to_pass_the_ca(pki):
    with canned([(0, TEXT_HEAD + b"0\r\n\r\n")], tls=server_tls(pki)) as seen:
        result = run("/v1/chat/stream", seen)
    assert "not trusted" in result["error"] and "--cacert" in result["error"]


def test_insecure_looks_anyway(pki):
    with canned([(0, TEXT_HEAD + chunk(b"one") + b"0\r\n\r\n")], tls=server_tls(pki)) as seen:
        result = run("/v1/chat/stream", seen, insecure=True)
    assert (result["error"], result["tokens"]) == (None, 1)
