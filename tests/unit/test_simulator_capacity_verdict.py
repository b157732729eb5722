"""The capacity verdict: each criterion passes a good run and catches its own failure."""

from __future__ import annotations

import dataclasses

import pytest
from support.sim_capacity import (
    CapacityResult,
    capacity_problems,
    oversubscribed,
)

GOOD = CapacityResult(
    streams=5000,
    tokens=30,
    gap_ms=100,
    completed=5000,
    peak_active=5000,
    gap_p50_ms=100.2,
    gap_p99_ms=130,
    reads_per_stream_min=30,
    sim_cpu_per_wall=0.4,
    sim_cpu_us_per_chunk=10,
    wall_s=4.0,
    sim_runqueue_wait_s=0.1,
    client_runqueue_wait_s=0.2,
)


def test_a_good_run_passes():
    assert capacity_problems(GOOD, max_gap_p99_ms=200) == []


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"completed": 4999, "error_count": 1}, "streams failed"),
        ({"peak_active": 4000}, "in flight at once"),
        ({"reads_per_stream_min": 5}, "tokens coalesced"),
        ({"gap_p50_ms": 60}, "median gap"),
        ({"gap_p50_ms": 400}, "median gap"),
        ({"gap_p99_ms": 250}, "p99 gap"),
        ({"sim_cpu_per_wall": 0.97}, "saturated"),
        ({"sim_cpu_us_per_chunk": 60}, "us per chunk"),
    ],
)
def test_each_criterion_catches_its_failure(change, says):
    problems = capacity_problems(dataclasses.replace(GOOD, **change), max_gap_p99_ms=200)
    assert len(problems) == 1 and says in problems[0], problems


TIMING_FAILURES = [
    {"reads_per_stream_min": 5},
    {"gap_p50_ms": 60},
    {"gap_p99_ms": 250},
]


@pytest.mark.parametrize("change", TIMING_FAILURES)
def test_timing_is_not_judged_when_the_machine_is_oversubscribed(change):
    late = dataclasses.replace(GOOD, **change)
    assert capacity_problems(late, max_gap_p99_ms=200, judge_timing=False) == []


@pytest.mark.parametrize(
    ("change", "starved"),
    [
        ({}, None),
        ({"sim_runqueue_wait_s": 2.5}, "simulator"),
        ({"client_runqueue_wait_s": 2.0}, "client"),
    ],
)
def test_oversubscription_is_read_from_the_runqueue_waits(change, starved):
    reason = oversubscribed(dataclasses.replace(GOOD, **change))
    assert (reason is None) if starved is None else (starved in reason)


def test_cpu_and_completeness_are_judged_even_when_oversubscribed():
    broken = dataclasses.replace(GOOD, completed=10, error_count=4990, sim_cpu_us_per_chunk=60)
    assert len(capacity_problems(broken, max_gap_p99_ms=200, judge_timing=False)) == 2
