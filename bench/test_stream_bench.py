"""The benchmark's own logic, without starting anything: which services a target list needs, the
transport comparison and its lines, the TCP connection count. Run with `pytest bench`."""

from __future__ import annotations

import socket

import pytest
from stack import tcp_connections
from stream_bench import (
    GATEWAY_APPS,
    GATEWAY_TRANSPORTS,
    TARGETS,
    comparison_lines,
    needed_services,
    parse_args,
    reads_lost_lines,
    tls_cost,
    tls_cost_lines,
    transport_comparison,
    verdicts,
)


def test_default_targets_start_no_sdk_gateway():
    assert not any("sdk" in name or "aiohttp" in name for name in parse_args([]).targets)
    assert needed_services(["sim", "gateway", "nginx", "article"]) == [
        "sim",
        "gateway",
        "nginx",
        "article",
    ]


def test_an_nginx_target_brings_its_own_gateway_only():
    assert needed_services(["sim", "nginx-sdk"]) == ["sim", "gateway-sdk", "nginx-sdk"]
    assert needed_services(["gateway-aiohttp"]) == ["sim", "gateway-aiohttp"]
    assert needed_services(["nginx", "nginx-buffered", "nginx-aiohttp"]) == [
        "sim",
        "gateway",
        "gateway-aiohttp",
        "nginx",
        "nginx-buffered",
        "nginx-aiohttp",
    ]


def test_every_gateway_target_is_costed_on_the_gateway_of_its_transport():
    for name, target in TARGETS.items():
        if name.startswith(("gateway", "nginx")):
            assert target.relay in GATEWAY_TRANSPORTS
            suffix = name.partition("-")[2]
            expected = "lean" if suffix in ("", "buffered", "tls", "plain") else suffix
            assert GATEWAY_TRANSPORTS[target.relay] == expected
            # Only the plain-send targets run another app than the product's.
            assert (target.relay in GATEWAY_APPS) == (suffix == "plain")


def test_unknown_target_is_refused():
    with pytest.raises(SystemExit):
        parse_args(["--targets", "sim,nginx-httpx"])


def row(target: str, level: int, relay_us: float | None, vs_sim: float = 1.0) -> dict:
    relay = TARGETS[target].relay
    return {
        "target": target,
        "level": level,
        "cpu_us_per_chunk": {"sim": 9.0, **({relay: relay_us} if relay else {})},
        "throughput_vs_sim": vs_sim,
        "upstream_connections": {
            "open_at_end": level,
            "closed_in_window": 0,
            "closed_per_stream": 0.0,
        },
        "gap_p99_ms": 30.0,
        "ttft_p99_ms": 80.0,
        "error_count": 0,
        "reads_min": 50,
        "other_processes_cores": 0.1,
    }


def test_comparison_gives_each_client_as_a_multiple_of_lean_at_the_same_level():
    rows = [
        row("sim", 500, None),
        row("nginx", 500, 25.0),
        row("nginx-sdk", 500, 77.5, vs_sim=0.43),
        row("nginx-aiohttp", 500, 50.0),
        row("nginx", 10, 60.0),  # no SDK row at 10: no comparison there
    ]
    entries = transport_comparison(rows)
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["path"], entry["level"], entry["lean_us"]) == ("nginx", 500, 25.0)
    assert entry["sdk_x_lean"] == 3.1 and entry["aiohttp_x_lean"] == 2.0
    assert entry["vs_sim"]["sdk"] == 0.43
    assert comparison_lines(entries) == [
        "sdk/lean gateway CPU per chunk = 3.1x (nginx @500: 77.5 vs 25.0 us)",
        "aiohttp/lean gateway CPU per chunk = 2.0x (nginx @500: 50.0 vs 25.0 us)",
    ]


def test_comparison_needs_the_lean_row_and_skips_an_unmeasured_client():
    assert transport_comparison([row("gateway-sdk", 10, 90.0)]) == []
    entries = transport_comparison([row("gateway", 10, 30.0), row("gateway-aiohttp", 10, 45.0)])
    assert entries[0]["path"] == "direct" and entries[0]["sdk_x_lean"] is None
    assert comparison_lines(entries) == [
        "aiohttp/lean gateway CPU per chunk = 1.5x (direct @10: 45.0 vs 30.0 us)"
    ]


def test_sdk_checks_appear_only_when_measured():
    names = [check["check"] for check in verdicts([row("nginx", 500, 25.0)])]
    assert not any("sdk" in name or "aiohttp" in name for name in names)
    rows = [row("nginx", 500, 25.0), row("nginx-sdk", 500, 80.0)]
    checks = {check["check"]: check for check in verdicts(rows)}
    assert checks["gateway CPU per chunk, nginx-sdk @500 (us)"]["pass"] is False
    assert checks["nginx-sdk @500: streams/s vs simulator alone"]["pass"] is True


def test_tcp_connections_counts_a_loopback_connection_once():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                assert tcp_connections(port)["established"] == {client.getsockname()[1]}


def test_the_tls_edge_brings_the_lean_gateway_only():
    assert needed_services(["sim", "nginx", "nginx-tls"]) == [
        "sim",
        "gateway",
        "nginx",
        "nginx-tls",
    ]


def test_tls_cost_is_nginx_tls_minus_nginx_at_the_same_level():
    def nginx_row(target: str, level: int, nginx_us: float) -> dict:
        base = row(target, level, 25.0)
        base["cpu_us_per_chunk"][target] = nginx_us
        return base

    rows = [
        row("sim", 500, None),
        nginx_row("nginx", 500, 14.0),
        nginx_row("nginx-tls", 500, 19.5),
        nginx_row("nginx", 10, 22.0),
    ]  # no TLS row at 10: nothing there
    entries = tls_cost(rows)
    assert [(e["level"], e["tls_adds_us"]) for e in entries] == [(500, 5.5)]
    assert tls_cost_lines(entries)[0].startswith(
        "TLS adds 5.5 us of nginx CPU per chunk @500 (nginx-tls 19.5 vs nginx 14.0 us"
    )
    checks = {check["check"] for check in verdicts(rows)}
    assert "nginx-tls @500: p99 TTFT (ms)" in checks


def test_reads_lost_says_where_only_for_rows_that_lost_reads():
    def row(target: str, reads_min: int, merged: int, late: int) -> dict:
        return {
            "target": target,
            "level": 500,
            "reads_min": reads_min,
            "reads_lost": {"merged_before_client": merged, "read_late_by_client": late},
            "harness_lag_max_ms": {"sim": 5.0, "client": 6.5},
        }

    lines = reads_lost_lines([row("gateway", 50, 0, 0), row("nginx", 48, 120, 7)])
    assert lines[1:] == [
        "(c) nginx -> gateway @500: tokens merged before the load generator in 120 responses, "
        "read late by it in 7; longest lag of the simulator's token clock 5.0 ms, of the load "
        "generator 6.5 ms (tokens are 20 ms apart)."
    ]
    assert reads_lost_lines([row("gateway", 50, 0, 0)]) == []
