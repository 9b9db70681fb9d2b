"""The order of replies on one connection: the order of the frames they answer.

Frames may be answered out of order (overlapping sends finish in any order), but a client reads
its replies in the order it sent the frames, so each frame takes its place when it starts and
its reply waits there until every reply before it has gone out.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger


class Place:
    """A frame's place in the order of replies; `reply` is set once it is answered."""

    __slots__ = ("request_id", "encoding", "reply")

    def __init__(self, request_id: str | None, encoding: str) -> None:
        self.request_id = request_id
        self.encoding = encoding
        # The reply's (type, payload, request id, encoding), or (None,) for a frame with none.
        self.reply: tuple | None = None


NO_REPLY = (None,)


class ReplyOrder:
    """`send(type, payload, request_id, encoding)` writes one reply; this calls it in frame order."""

    log = Logger()
    __slots__ = ("_send", "_places", "_answered")

    def __init__(self, send: Callable[[str, dict | None, str | None, str], None]) -> None:
        self._send = send
        # The frames started and not yet answered, in frame order.
        self._places: list[Place] = []
        # Fires once every frame started so far has been answered.
        self._answered: Deferred | None = None

    @property
    def waiting(self) -> int:
        """Frames started and not yet answered."""
        return len(self._places)

    def take(self, request_id: str | None, encoding: str) -> Place:
        place = Place(request_id, encoding)
        self._places.append(place)
        return place

    def answer(self, place: Place, reply: tuple) -> None:
        """The frame of `place` is answered: send every reply now ready at the front."""
        place.reply = reply
        places = self._places
        while places and places[0].reply is not None:
            ready = places.pop(0).reply
            if ready[0] is None:
                continue
            try:
                self._send(*ready)
            except Exception:
                # One reply that cannot go out must not hold back the ones after it.
                self.log.failure("could not send a reply")
        if not places and self._answered is not None:
            answered, self._answered = self._answered, None
            answered.callback(None)

    def all_answered(self) -> Deferred:
        """Fires once every frame started so far has been answered."""
        if not self._places:
            return succeed(None)
        if self._answered is None:
            self._answered = Deferred()
        return self._answered
