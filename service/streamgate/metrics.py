"""Prometheus metrics. With several gunicorn workers each worker counts on its own, so
gunicorn_conf.py sets PROMETHEUS_MULTIPROC_DIR and /metrics then sums all workers' files."""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REQUESTS = Counter(
    "streamgate_requests_total", "Requests by route and HTTP status", ["route", "status"]
)
ACTIVE_STREAMS = Gauge(
    "streamgate_active_streams", "Streams being relayed now", multiprocess_mode="livesum"
)
TTFT = Histogram(
    "streamgate_ttft_seconds",
    "Request received to first content byte sent",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CHUNK_GAP = Histogram(
    "streamgate_inter_chunk_gap_seconds",
    "Time between two content chunks sent to a client",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5),
)
TOKENS = Counter("streamgate_tokens_relayed_total", "Content deltas relayed", ["route"])
UPSTREAM_ERRORS = Counter("streamgate_upstream_errors_total", "Upstream failures by kind", ["kind"])
DISCONNECTS = Counter(
    "streamgate_client_disconnects_total",
    "Clients that left before the end, by phase (first_token, streaming)",
    ["route", "phase"],
)


def render() -> tuple[bytes, str]:
    """The exposition text: all workers' values when running multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class GapRecorder:
    """Counts inter-chunk gaps locally and adds them to CHUNK_GAP once per stream.

    Histogram.observe per chunk takes a lock (and an mmap write in multi-process mode); a
    bisect into a local list is a fraction of that, and the exported histogram is the same.
    """

    __slots__ = ("_counts", "_histogram", "_sum", "_values")

    def __init__(self, histogram: Histogram = CHUNK_GAP) -> None:
        self._histogram = histogram
        bounds = getattr(histogram, "_upper_bounds", None)
        self._counts = [0] * len(bounds) if bounds is not None else None
        self._sum = 0.0
        self._values: list[float] = []

    def add(self, gap_s: float) -> None:
        if self._counts is None:
            self._values.append(gap_s)
            return
        self._counts[bisect_left(self._histogram._upper_bounds, gap_s)] += 1
        self._sum += gap_s

    def flush(self) -> None:
        histogram = self._histogram
        if self._counts is None:  # pragma: no cover - other prometheus_client internals
            for value in self._values:
                histogram.observe(value)
            self._values.clear()
            return
        if self._sum or any(self._counts):
            histogram._sum.inc(self._sum)
            for index, count in enumerate(self._counts):
                if count:
                    histogram._buckets[index].inc(count)
                    self._counts[index] = 0
            self._sum = 0.0
