"""Whether this process takes new sends now, or sheds them because it is behind.

Past its capacity a server that queues everything answers nothing in time: each send waits
behind all the others until Redis deadlines fire, and nearly every send fails. Instead, while
this process is behind, a new `sendMessage` is refused at once with `SERVER_BUSY` and a
`retryAfter`, which costs a small fraction of taking it, so the sends it does take are answered
promptly and it keeps accepting close to its capacity. Acknowledgements, deliveries, logins and
everything else go on: they are what lets the backlog clear.

Behind means either of, measured every TICK_SECONDS:

- the reactor is late: the tick itself fires more than MAX_LAG_SECONDS after it was due, so the
  process is out of CPU and what it reads waits in the sockets;
- sends wait too long: more are in flight than the process completes in MAX_DELAY_SECONDS at
  its recent rate, so the store (Redis, or the SQLite commit) is the bottleneck.

It stops being behind only once both are under half their limits, so it does not flap.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


TICK_SECONDS = 0.05
MAX_LAG_SECONDS = 0.1
MAX_DELAY_SECONDS = 0.25
# Never shed below this many sends in flight: a burst at startup has no rate to go by yet, and
# clients that pipeline (32 sends per connection) keep many in flight without being behind.
MIN_IN_FLIGHT = 2048
# Weight of the latest tick in the completion rate.
RATE_WEIGHT = 0.3


class Admission:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.busy = False
        self.in_flight = 0
        self._completed = 0
        self._rate = 0.0
        self._last_tick: float | None = None

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        self._completed += 1

    def limit(self) -> float:
        """Sends in flight past which they wait too long, at the recent completion rate."""
        return max(MIN_IN_FLIGHT, self._rate * MAX_DELAY_SECONDS)

    async def tick(self) -> None:
        """Run every TICK_SECONDS (a timer of the service tree)."""
        now = self._clock.seconds()
        if self._last_tick is None:
            self._last_tick = now
            return
        elapsed = max(now - self._last_tick, 1e-6)
        self._last_tick = now
        lag = elapsed - TICK_SECONDS
        completed, self._completed = self._completed, 0
        self._rate += RATE_WEIGHT * (completed / elapsed - self._rate)
        limit = self.limit()
        if self.busy:
            self.busy = lag > MAX_LAG_SECONDS / 2 or self.in_flight > limit / 2
        else:
            self.busy = lag > MAX_LAG_SECONDS or self.in_flight > limit
