"""Turns between owners for a scarce resource: the password-hashing threads.

A FIFO queue serves whoever queues most: a client logging in to its own accounts from many
threads would make every other login wait behind all of its hashes. Here each owner (a client
address) has its own queue; a free thread takes the next job of the waiting owner with the
fewest jobs running, and among those of the one whose turn is longest ago.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred


class FairShare:
    """Runs at most `slots` jobs at once through `run` (fn, *args -> Deferred), the next one
    from the waiting owner with the fewest running (ties: in turn).

    `run` should have `slots` workers of its own, so that nothing waits in its queue, where
    turns would no longer hold.
    """

    def __init__(self, run: Callable[..., Deferred], slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots!r}")
        self._run = run
        self._free = slots
        # Owners with jobs waiting (first come first), their jobs running, and when (a count of
        # starts) each of those waiting or running last started one.
        self._waiting: dict[str, deque[tuple[Deferred, Callable, tuple]]] = {}
        self._running: dict[str, int] = {}
        self._last_turn: dict[str, int] = {}
        self._starts = 0

    def run(self, owner: str, fn: Callable, *args: Any) -> Deferred:
        """fn(*args) in its turn; fires with its result."""
        result: Deferred = Deferred()
        queue = self._waiting.get(owner)
        if queue is None:
            queue = self._waiting[owner] = deque()
        queue.append((result, fn, args))
        self._start()
        return result

    def _start(self) -> None:
        while self._free > 0 and self._waiting:
            # O(owners waiting): a few, or as many as the addresses a flood comes from.
            owner = min(self._waiting, key=self._priority)
            queue = self._waiting[owner]
            result, fn, args = queue.popleft()
            if not queue:
                del self._waiting[owner]
            self._free -= 1
            self._running[owner] = self._running.get(owner, 0) + 1
            self._last_turn[owner] = self._starts
            self._starts += 1
            maybeDeferred(self._run, fn, *args).addBoth(self._finished, owner).chainDeferred(result)

    def _priority(self, owner: str) -> tuple[int, int]:
        return self._running.get(owner, 0), self._last_turn.get(owner, -1)

    def _finished(self, outcome: Any, owner: str) -> Any:
        self._free += 1
        if self._running[owner] > 1:
            self._running[owner] -= 1
        else:
            del self._running[owner]
            if owner not in self._waiting:
                # Gone: nothing about it is kept (a client back later queues as a new one).
                del self._last_turn[owner]
        self._start()
        return outcome
