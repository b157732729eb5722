"""The doctor's verdict rules on synthetic read timelines: each verdict and cause, each with a
timeline that must not be called so (a long first token, a slow steady stream, an early head)."""

from __future__ import annotations

import pytest
from streamgate.doctor import verdict
from streamgate.doctor.verdict import judge


def probe_result(
    reads: list[tuple[float, int, int]],
    *,
    headers: dict[str, str] | None = None,
    head_ms: float | None = None,
    status: int | None = 200,
    error: str | None = None,
    alpn: str | None = None,
) -> dict:
    """A probe result as probe.py prints it: reads are (ms after sending, bytes, tokens)."""
    body_times = [at for at, _, tokens in reads if tokens]
    return {
        "url": "http://127.0.0.1:1/v1/chat/completions",
        "status": status,
        "reason": "OK" if status == 200 else "Unauthorized",
        "alpn": alpn,
        "headers": {"transfer-encoding": "chunked", **(headers or {})},
        "t_headers_ms": head_ms if head_ms is not None else (0.5 if status else None),
        "t_first_body_ms": body_times[0] if body_times else None,
        "t_end_ms": reads[-1][0] if reads else None,
        "reads": [list(read) for read in reads],
        "tokens": sum(tokens for _, _, tokens in reads),
        "body_bytes": sum(size for _, size, _ in reads),
        "usage": None,
        "stream_error": None,
        "error": error,
        "body_sample": "",
    }


def steady(tokens: int, *, first_ms: float = 50, gap_ms: float = 20, size: int = 280) -> list:
    """One token per read at a steady pace: a healthy stream."""
    return [(first_ms + i * gap_ms, size, 1) for i in range(tokens)]


def bursts(tokens: int, per_read: int, every_ms: float, first_ms: float = 50) -> list:
    return [(first_ms + i * every_ms, per_read * 60, per_read) for i in range(tokens // per_read)]


def test_a_steady_stream_is_streamed():
    judged = judge(probe_result(steady(50)))
    assert (judged["verdict"], judged["confidence"], judged["cause"]) == ("streamed", "high", None)
    assert judged["ttft_ms"] == 50 and judged["span_ms"] == 980 and judged["gap_p50_ms"] == 20


def test_a_long_first_token_then_a_fast_stream_is_streamed():
    """A reasoning model: 10 s of thinking, then 100 tokens at 200 a second."""
    judged = judge(probe_result(steady(100, first_ms=10_000, gap_ms=5)))
    assert judged["verdict"] == "streamed", judged


def test_a_slow_model_with_some_merged_reads_is_streamed():
    """Over a real network a few reads merge two tokens: 80 % alone is enough."""
    reads = steady(40) + [(900 + i * 40, 560, 2) for i in range(5)]
    assert judge(probe_result(reads))["verdict"] == "streamed"


def test_the_whole_answer_in_one_read_is_buffered():
    judged = judge(probe_result([(1200, 14000, 50)], headers={"server": "uvicorn"}))
    assert (judged["verdict"], judged["cause"]) == ("buffered", "whole-answer")
    assert "1200 ms" in judged["reason"]


def test_the_whole_answer_at_the_end_in_many_reads_is_buffered():
    """Held, then sent in TLS records or chunks of its own: separate reads, 50 tokens in 75 ms."""
    reads = [(1200 + i * 1.5, 300, 1) for i in range(50)]
    assert judge(probe_result(reads))["verdict"] == "buffered"


def test_a_fast_steady_stream_is_not_a_final_burst():
    """Negative control of the one above: 50 tokens at 5 ms (200 a second) are no burst."""
    assert judge(probe_result(steady(50, gap_ms=5)))["verdict"] == "streamed"


def test_reads_at_a_steady_interval_with_many_tokens_are_a_flush_interval():
    judged = judge(probe_result(bursts(60, 10, 200)))
    assert (judged["verdict"], judged["cause"]) == ("coalesced", "flush-interval")
    assert "200 ms" in judged["reason"]


def test_reads_of_one_size_are_a_size_buffer():
    reads = [(300 + i * 290, 8200, 29) for i in range(3)] + [(1050, 1500, 4)]
    judged = judge(probe_result(reads))
    assert (judged["verdict"], judged["cause"]) == ("coalesced", "size-buffer")
    assert "8.0 KiB" in judged["reason"]


def test_merged_reads_at_no_rhythm_are_coalescing():
    reads = [(50, 300, 1), (90, 900, 3), (400, 2400, 8), (420, 300, 1), (900, 1500, 5)]
    reads += [(1500, 900, 3), (1530, 300, 1)]
    judged = judge(probe_result(reads))
    assert (judged["verdict"], judged["cause"]) == ("coalesced", "coalescing")


def test_separate_reads_that_cluster_after_holds_are_coalesced():
    """Every token in a read of its own, but in clumps of ten after 300 ms holds."""
    reads = [(50 + clump * 300 + i * 0.5, 280, 1) for clump in range(5) for i in range(10)]
    assert judge(probe_result(reads))["verdict"] == "coalesced"


def test_compression_on_a_held_stream_is_named():
    reads = bursts(60, 10, 200)
    judged = judge(probe_result(reads, headers={"content-encoding": "gzip", "server": "uvicorn"}))
    assert (judged["verdict"], judged["cause"]) == ("coalesced", "gzip")


def test_nginx_with_gzip_holding_the_whole_answer_is_nginx_buffering():
    headers = {"content-encoding": "gzip", "server": "nginx/1.22.1"}
    judged = judge(probe_result([(1200, 3000, 50)], headers=headers))
    assert (judged["verdict"], judged["cause"]) == ("buffered", "nginx-proxy-buffering")
    assert "proxy_buffering off" in judged["fix"]


def test_a_content_length_on_a_held_answer_is_a_whole_body():
    headers = {"content-length": "14000", "transfer-encoding": ""}
    judged = judge(probe_result([(1200, 14000, 50)], headers=headers))
    assert (judged["verdict"], judged["cause"]) == ("buffered", "whole-body")


def test_cdn_markers_on_a_held_stream_are_named():
    headers = {"cf-ray": "8a1b2c3d4e5f-AMS", "server": "cloudflare"}
    judged = judge(probe_result([(1200, 14000, 50)], headers=headers))
    assert (judged["verdict"], judged["cause"]) == ("buffered", "cdn")
    assert "cf-ray" in judged["reason"]


def test_a_head_held_until_the_first_data_is_headers_held():
    judged = judge(probe_result(steady(30, first_ms=1500), head_ms=1500))
    assert (judged["verdict"], judged["cause"]) == ("headers-held", "held-head")


@pytest.mark.parametrize(
    ("headers", "alpn", "cause"),
    [
        ({"server": "nginx"}, None, "nginx-proxy-buffering"),
        ({"via": "2 envoy"}, None, "http2-headers"),
        ({}, "h2", "http2-headers"),
    ],
)
def test_the_layer_holding_the_head_is_named_by_its_marker(headers, alpn, cause):
    result = probe_result(steady(30, first_ms=1500), head_ms=1500, headers=headers, alpn=alpn)
    assert judge(result)["cause"] == cause


def test_a_head_sent_at_once_before_a_long_first_token_is_streamed():
    """Negative control: the same first token, the head at 1 ms."""
    assert judge(probe_result(steady(30, first_ms=1500), head_ms=1))["verdict"] == "streamed"


def test_a_late_head_that_came_before_the_first_data_is_not_held():
    """A slow upstream head, then the first token 100 ms later: nothing held the head."""
    assert judge(probe_result(steady(30, first_ms=1500), head_ms=1400))["verdict"] == "streamed"


def test_a_head_with_a_fast_first_token_is_not_called_held():
    """Under a second a held head cannot be told from an app that starts with its first token."""
    assert judge(probe_result(steady(30, first_ms=60), head_ms=60))["verdict"] == "streamed"


def test_a_few_tokens_prove_nothing_and_ask_for_a_longer_answer():
    judged = judge(probe_result(steady(3)))
    assert (judged["verdict"], judged["confidence"]) == ("streamed", "low")
    assert "longer answer" in judged["reason"] and "--max-tokens" in judged["reason"]


def test_enough_tokens_are_judged_with_confidence():
    assert judge(probe_result(steady(verdict.MIN_TOKENS)))["confidence"] == "high"


@pytest.mark.parametrize(
    ("error", "status", "reads", "cause"),
    [
        ("connection to 127.0.0.1:9 refused: nothing listens there", None, [], "unreachable"),
        ("cannot resolve nowhere.invalid: Name or service not known", None, [], "unreachable"),
        ("TLS: 127.0.0.1:443's certificate is not trusted (self signed)", None, [], "tls"),
        ("no complete answer within 5 s", None, [], "timeout"),
        ("the response breaks HTTP/1.1: bad chunk size line", 200, [(5, 40, 0)], "protocol"),
        (None, 401, [(5, 120, 0)], "http-status"),
        (None, 200, [(5, 40, 0)], "no-content"),
    ],
)
def test_a_probe_that_could_not_run_fails_with_its_cause(error, status, reads, cause):
    judged = judge(probe_result(reads, status=status, error=error))
    assert (judged["verdict"], judged["cause"]) == ("failed", cause)
    assert judged["fix"] and judged["reason"]


def test_an_error_after_some_tokens_is_still_judged_by_timing():
    result = probe_result(steady(30), error="the connection failed mid-answer: reset")
    assert judge(result)["verdict"] == "streamed"


def test_every_cause_row_is_reachable_and_explains_its_verdicts():
    ids = [cause.id for cause in verdict.CAUSES]
    assert len(ids) == len(set(ids))
    for cause in verdict.CAUSES:
        assert cause.verdicts and set(cause.verdicts) <= set(verdict.VERDICTS), cause.id
        fix = cause.fix.removesuffix("{find_the_layer}").rstrip()
        assert cause.evidence and cause.reason.endswith(".") and fix.endswith("."), cause.id
        # Where to look depends on the run's mode: only FIND_THE_LAYER names hop mode.
        assert "--inventory" not in cause.fix, cause.id
    assert all(text.endswith(".") for text in verdict.FIND_THE_LAYER.values())


@pytest.mark.parametrize(
    ("verdicts", "code"),
    [
        (["streamed"], 0),
        (["streamed", "streamed"], 0),
        (["streamed", "coalesced"], 1),
        (["headers-held"], 1),
        (["buffered", "failed"], 2),
    ],
)
def test_exit_codes(verdicts, code):
    assert verdict.exit_code(verdicts) == code


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert verdict.percentile(values, 0.5) == 50
    assert verdict.percentile(values, 0.99) == 99
    assert verdict.percentile([], 0.5) is None
