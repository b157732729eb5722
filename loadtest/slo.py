"""SLO gates over Locust's stats (so they work the same on a master fed by many workers)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from locust.stats import RequestStats, StatsEntry
from streamcheck import BUFFERED, CORRUPT, GENERATOR_LAGGED

# request_type of the events the users fire (see locustfile.py).
TTFT = "ttft_ms"
ITL = "itl_ms"
TOKENS_PER_S = "tokens_per_s"
RESPONSE = "POST"
LOOP_LAG = "generator_loop_lag_ms"


@dataclass
class Gate:
    name: str
    value: float | None  # None: nothing measured, which fails the gate
    limit: float
    unit: str = ""

    @property
    def passed(self) -> bool:
        return self.value is not None and self.value <= self.limit

    def summary(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4g}{self.unit}"
        verdict = "PASS" if self.passed else "FAIL"
        limit = f"{self.limit:g}{self.unit:<4}"
        return f"gate {self.name:<16} value {shown:<12} limit <= {limit} {verdict}"


def merged(stats: RequestStats, request_type: str) -> StatsEntry:
    """One entry holding every route's samples of a metric."""
    total = StatsEntry(stats, request_type, request_type)
    for entry in stats.entries.values():
        if entry.method == request_type:
            total.extend(entry)
    return total


def failure_ratio(entry: StatsEntry) -> float | None:
    return entry.num_failures / entry.num_requests if entry.num_requests else None


def percentile(entry: StatsEntry, share: float) -> float | None:
    return entry.get_response_time_percentile(share) if entry.num_requests else None


def evaluate(stats: RequestStats, limits) -> list[Gate]:
    """`limits` is Locust's parsed options (the slo_* attributes)."""
    return [
        Gate("ttft_p95", percentile(merged(stats, TTFT), 0.95), limits.slo_ttft_p95_ms, " ms"),
        Gate("itl_p99", percentile(merged(stats, ITL), 0.99), limits.slo_itl_p99_ms, " ms"),
        Gate("failure_ratio", failure_ratio(merged(stats, RESPONSE)), limits.slo_failure_ratio),
        Gate("buffered_ratio", failure_ratio(merged(stats, BUFFERED)), limits.slo_buffered_ratio),
        Gate("corrupt_ratio", failure_ratio(merged(stats, CORRUPT)), limits.slo_corrupt_ratio),
        # Validity, not service quality: above this the generator distorted its own figures.
        Gate(
            "generator_lagged",
            failure_ratio(merged(stats, GENERATOR_LAGGED)),
            limits.max_generator_lagged_ratio,
        ),
    ]


def write_json(path: str, gates: list[Gate], responses: int) -> None:
    rows = [{**asdict(gate), "passed": gate.passed} for gate in gates]
    with open(path, "w", encoding="utf-8") as out:
        json.dump({"responses": responses, "gates": rows}, out, indent=2)
