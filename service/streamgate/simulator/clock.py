"""The token clock: one timer for every stream in the process, however many there are."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from typing import Protocol


class Steppable(Protocol):
    """What the clock steps: an answer that sends its next token (and schedules the one after)."""

    finished: bool

    def step(self) -> None: ...


class TokenClock:
    """One timer for every stream: a wheel of 1 ms buckets, a heap of the non-empty ones.

    A stream asks to be stepped at a time; all streams due in the same millisecond are stepped by
    one callback, so 5,000 streams cost a few hundred timer events per second, not 250,000.
    """

    RESOLUTION_S = 0.001

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, list[Steppable]] = {}
        self._ticks: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed_tick: int | None = None
        # How late each callback ran after its earliest due stream: the simulator's own lag.
        self.lags_ms: deque[float] = deque(maxlen=20_000)

    def call_at(self, when: float, response: Steppable) -> None:
        tick = math.ceil(when / self.RESOLUTION_S)  # never early
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.append(response)
            return
        self._buckets[tick] = [response]
        heapq.heappush(self._ticks, tick)
        if self._armed_tick is None or tick < self._armed_tick:
            self._arm(tick)

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_tick = tick
        self._timer = self._loop.call_at(tick * self.RESOLUTION_S, self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        limit = max(self._armed_tick or 0, math.floor(now / self.RESOLUTION_S))
        if self._ticks:
            self.lags_ms.append(max(0.0, now - self._ticks[0] * self.RESOLUTION_S) * 1000)
        self._timer = None
        self._armed_tick = None
        due: list[list[Steppable]] = []
        while self._ticks and self._ticks[0] <= limit:
            due.append(self._buckets.pop(heapq.heappop(self._ticks)))
        # Streams reschedule themselves while stepping; those land in new buckets, served by a
        # later callback, so a zero gap cannot spin here forever.
        for bucket in due:
            for response in bucket:
                if not response.finished:
                    response.step()
        if self._ticks and (self._armed_tick is None or self._ticks[0] < self._armed_tick):
            self._arm(self._ticks[0])
