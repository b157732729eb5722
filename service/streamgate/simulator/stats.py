"""The simulator's counters, served at /stats: what started, ended, was cancelled, and when."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

# How many recent request ids, cancels and in-flight streams /stats lists.
RECENT_LIMIT = 256


class Stats:
    """Counters for /stats. started == completed + cancelled + active at all times.

    completed: the simulator wrote the response as scripted, faults included (a 429, an error
    event, a deliberate close). cancelled: the client went away before that.
    """

    def __init__(self) -> None:
        self.connections_open = 0  # a gauge: kept across resets
        self.started = self.completed = self.cancelled = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; streams still in flight count as started after the reset, so
        started == completed + cancelled + active keeps holding when they end."""
        in_flight = self.active
        self.started = in_flight
        self.completed = 0
        self.cancelled = 0
        self.peak_active = in_flight
        self.connections_total = 0
        self.tokens_sent = 0
        self.faults: Counter[str] = Counter()
        self.requests_with_request_id = 0
        self.recent_request_ids: deque[str] = deque(maxlen=RECENT_LIMIT)
        self.recent_cancels: deque[dict[str, Any]] = deque(maxlen=RECENT_LIMIT)
        self.last_cancel_at: float | None = None
        self.reset_at = time.time()

    @property
    def active(self) -> int:
        return self.started - self.completed - self.cancelled

    def record_start(self, request_id: str | None, fault: str | None) -> None:
        self.started += 1
        self.peak_active = max(self.peak_active, self.active)
        if request_id is not None:
            self.requests_with_request_id += 1
            self.recent_request_ids.append(request_id)
        if fault is not None:
            self.faults[fault] += 1

    def record_cancel(self, request_id: str, tokens_sent: int) -> None:
        now = time.time()
        self.cancelled += 1
        self.last_cancel_at = now
        self.recent_cancels.append(
            {"request_id": request_id, "at": now, "tokens_sent": tokens_sent}
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "active": self.active,
            "faults": dict(self.faults),
            "peak_active": self.peak_active,
            "connections_open": self.connections_open,
            "connections_total": self.connections_total,
            "tokens_sent": self.tokens_sent,
            "requests_with_request_id": self.requests_with_request_id,
            "recent_request_ids": list(self.recent_request_ids),
            "last_cancel_at": self.last_cancel_at,
            "recent_cancels": list(self.recent_cancels),
            "reset_at": self.reset_at,
            "now": time.time(),
        }
