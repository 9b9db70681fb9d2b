"""Backpressure on one client connection, both ways.

In: past PAUSE_BACKLOG frames waiting to run, the transport stops reading until the backlog is
down to RESUME_BACKLOG, so a client sending faster than it is served is held back by TCP's own
flow control instead of growing this process's memory. Out: while the client leaves what it was
sent unread (the transport paused us as its producer), the connection reads nothing more from
it, the delivery hub holds pushes back (`writable`), and past an allowance of unread bytes the
connection is dropped; its unacknowledged messages wait in its inbox.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime

PAUSE_BACKLOG = 32
RESUME_BACKLOG = 8
# A client that stopped reading may leave this much unread (or eight frames, if more) before it
# is cut off at once.
MIN_STALLED_BYTES = 1024 * 1024


class Reading(Protocol):
    """The transport side: whether it reads its socket."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Backpressure:
    __slots__ = ("_transport", "_clock", "_reading", "backlogged", "stalled_since", "_stalled_bytes", "_max_stalled_bytes")

    def __init__(self, transport: Reading, max_frame_bytes: int, clock: IReactorTime) -> None:
        self._transport = transport
        self._clock = clock
        self._reading = True
        self.backlogged = False
        # When the transport last asked us to stop writing (the client is not reading), if it still does.
        self.stalled_since: float | None = None
        self._stalled_bytes = 0
        self._max_stalled_bytes = max(MIN_STALLED_BYTES, 8 * max_frame_bytes)

    @property
    def writable(self) -> bool:
        """False while the client leaves what it was sent unread."""
        return self.stalled_since is None

    def backlog(self, waiting: int) -> None:
        """`waiting` frames wait to run now."""
        if not self.backlogged and waiting >= PAUSE_BACKLOG:
            self.backlogged = True
            self._update()
        elif self.backlogged and waiting <= RESUME_BACKLOG:
            self.backlogged = False
            self._update()

    def stalled(self) -> None:
        if self.stalled_since is None:
            self.stalled_since = self._clock.seconds()
            self._stalled_bytes = 0
            self._update()

    def unstalled(self) -> bool:
        """The client reads again; True if it had stopped."""
        if self.stalled_since is None:
            return False
        self.stalled_since = None
        self._update()
        return True

    def over_allowance(self, size: int) -> bool:
        """`size` more bytes are written while the client is not reading: past the allowance?"""
        if self.stalled_since is None:
            return False
        self._stalled_bytes += size
        return self._stalled_bytes > self._max_stalled_bytes

    def _update(self) -> None:
        reading = not self.backlogged and self.stalled_since is None
        if reading != self._reading:
            self._reading = reading
            if reading:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()
