"""Turns between owners for a scarce resource: the password-hashing threads.

A FIFO queue serves whoever queues most: a client logging in to its own accounts from many
threads would make every other login wait behind all of its hashes. Here each owner (a client
address) has its own queue, and the queues are served in turn, one job each.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred


class FairShare:
    """Runs at most `slots` jobs at once through `run` (fn, *args -> Deferred), taking the
    next one from each waiting owner in turn.

    `run` should have `slots` workers of its own, so that nothing waits in its queue, where
    turns would no longer hold.
    """

    def __init__(self, run: Callable[..., Deferred], slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots!r}")
        self._run = run
        self._free = slots
        # Owners with jobs waiting, in the order they get their next turn.
        self._waiting: OrderedDict[str, deque[tuple[Deferred, Callable, tuple]]] = OrderedDict()

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
            owner, queue = self._waiting.popitem(last=False)
            result, fn, args = queue.popleft()
            if queue:
                # To the back of the line: every other waiting owner goes first.
                self._waiting[owner] = queue
            self._free -= 1
            maybeDeferred(self._run, fn, *args).addBoth(self._finished).chainDeferred(result)

    def _finished(self, outcome: Any) -> Any:
        self._free += 1
        self._start()
        return outcome
