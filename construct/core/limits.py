"""Counters behind rate limits: fixed windows, counted all or nothing across several keys.

A key counts events in a window that starts at the first event counted in it and lasts
`Limit.period` seconds; when it ends, the key starts from zero again. One call may charge
several keys (say, per user and per device): `take` refuses if any of them is at its limit
and then counts nothing anywhere, so a refused request never uses up another limit.

Two stores keep these counters with the same contract: `MemoryCounters` (here, embedded mode,
one process) and `RedisCounters` (construct/redis/limits.py, production mode, shared by every
instance).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from twisted.internet.interfaces import IReactorTime


@dataclass(frozen=True)
class Limit:
    """At most `count` events per window of `period` seconds.

    A `count` of zero or less turns the limit off: every event is allowed and nothing is
    stored for it (its `period` is then ignored).
    """

    count: int
    period: float

    def __post_init__(self) -> None:
        if self.enabled and not self.period > 0:
            raise ValueError(f"a limit's period must be positive, not {self.period!r}")

    @property
    def enabled(self) -> bool:
        return self.count > 0

    def __str__(self) -> str:
        """As the options take it: COUNT/SECONDS, or 0 when off."""
        return f"{self.count}/{self.period:g}" if self.enabled else "0"


# Not frozen: two are built for every message, and a frozen dataclass is several times slower to build.
@dataclass(slots=True)
class Charge:
    """One event against `key` under `limit`.

    The caller puts a Redis hash tag in the key (`{<userId>}:send`); all the keys of one call
    must share that tag, so that a Redis Cluster could run the call in one slot.
    """

    key: str
    limit: Limit


class _Window:
    __slots__ = ("used", "ends", "period")

    def __init__(self, now: float, period: float) -> None:
        self.used = 0
        self.ends = now + period
        self.period = period

    def left_ms(self, now: float) -> int:
        """Milliseconds until the window ends, rounded up as Redis counts: in [1, period].

        `now` is large (epoch seconds), so `ends - now` carries ~1e-7 s of float noise: it
        is rounded to the microsecond first, and the result never exceeds the period.
        """
        return max(1, min(_ceil_ms(self.ends - now), _ceil_ms(self.period)))


def _ceil_ms(seconds: float) -> int:
    return math.ceil(round(seconds * 1000, 3))


class Allowance:
    """One fixed window counted on the object it belongs to (a connection's sealed sends):
    nothing to look up, and it goes when its owner does."""

    __slots__ = ("_window",)

    def __init__(self) -> None:
        self._window: _Window | None = None

    def take(self, limit: Limit, now: float) -> float | None:
        """Count one event; None when counted, else the seconds until the window ends."""
        if not limit.enabled:
            return None
        window = self._window
        if window is None or window.ends <= now:
            window = self._window = _Window(now, limit.period)
        if window.used >= limit.count:
            return window.left_ms(now) / 1000
        window.used += 1
        return None


class MemoryCounters:
    """The counters of one process (embedded mode), holding at most `max_keys` windows.

    When full, a new window first drops every ended window, then the oldest live one (the
    earliest started). Two structures make that cheap: `_windows` keeps the windows in the
    order they started (an OrderedDict, whose popitem(last=False) is O(1)), and `_ends` is a
    heap of (end, seq, key, window) from which ended windows are popped. A heap entry whose
    window is no longer the key's current one (cleared, dropped or restarted) is stale: it is
    skipped when popped, and the heap is rebuilt once it holds over twice as many entries as
    there are windows.
    """

    def __init__(self, clock: IReactorTime, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self._clock = clock
        self._max_keys = max_keys
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._ends: list[tuple[float, int, str, _Window]] = []
        self._seq = itertools.count()

    async def take(self, charges: Sequence[Charge]) -> float | None:
        """Count one event on every key, or on none if any key is at its limit.

        Returns None when counted, else the seconds until the latest-ending full window ends.
        """
        now = self._clock.seconds()
        wait_ms = 0
        for charge in charges:
            if charge.limit.enabled:
                window = self._current(charge.key, now)
                if window is not None and window.used >= charge.limit.count:
                    wait_ms = max(wait_ms, window.left_ms(now))
        if wait_ms:
            return wait_ms / 1000
        self._count(charges, now)
        return None

    async def add(self, charges: Sequence[Charge]) -> None:
        """Count one event on every key, even past its limit."""
        self._count(charges, self._clock.seconds())

    async def window(self, key: str) -> tuple[int, float]:
        """Events counted in the key's current window and the seconds until it ends ((0, 0.0) if none)."""
        now = self._clock.seconds()
        window = self._current(key, now)
        return (0, 0.0) if window is None else (window.used, window.left_ms(now) / 1000)

    async def give_back(self, charges: Sequence[Charge]) -> None:
        """Uncount one event on every key (an event counted ahead that did not happen)."""
        now = self._clock.seconds()
        for charge in charges:
            window = self._current(charge.key, now) if charge.limit.enabled else None
            if window is not None and window.used > 0:
                window.used -= 1

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the keys' windows."""
        for key in keys:
            self._windows.pop(key, None)

    def _current(self, key: str, now: float) -> _Window | None:
        window = self._windows.get(key)
        if window is not None and window.ends <= now:
            del self._windows[key]
            return None
        return window

    def _count(self, charges: Sequence[Charge], now: float) -> None:
        for charge in charges:
            if charge.limit.enabled:
                # Looked up again, not reused from take's check: opening another key's window
                # may have dropped this one.
                window = self._current(charge.key, now)
                if window is None:
                    window = self._open(charge.key, charge.limit.period, now)
                window.used += 1

    def _open(self, key: str, period: float, now: float) -> _Window:
        windows, heap = self._windows, self._ends
        # Each heap entry is pushed once and popped at most once: O(log n) amortised.
        while heap and heap[0][0] <= now:
            _, _, ended_key, ended = heapq.heappop(heap)
            if windows.get(ended_key) is ended:
                del windows[ended_key]
        while len(windows) >= self._max_keys:
            windows.popitem(last=False)
        window = windows[key] = _Window(now, period)
        heapq.heappush(heap, (window.ends, next(self._seq), key, window))
        if len(heap) > 2 * len(windows) + 64:
            # Rebuilt after at least len(windows) + 64 stale pushes: O(1) amortised.
            self._ends = [entry for entry in heap if windows.get(entry[2]) is entry[3]]
            heapq.heapify(self._ends)
        return window
