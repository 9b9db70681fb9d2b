"""The delivery worker's logic, the same in both modes.

Embedded mode runs it inside `construct` on the SQL inbox and the local hub; production mode
runs it in `construct-worker` processes on Redis. It never moves messages: inboxes are the
source of truth and the instance holding a connection reads them in order. The worker decides
*when* an instance must look again:

- a user came online: wake the instance holding the connection, so its backlog drains;
- a message stays unacknowledged past the redelivery timeout while its recipient is online:
  tell the holding instance to push the unacknowledged messages again to the connections
  that have been attached since before the timeout (only those can have held it that long);
- a message outlives its TTL: remove it and count it.

Leases keep several workers from doing the same job twice.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from construct.delivery.ports import Inbox, WakeUps

DEFAULT_REDELIVERY_SECONDS = 60.0
ONLINE_LEASE_SECONDS = 5.0


class Leases(Protocol):
    async def acquire(self, name: str, seconds: float) -> bool: ...


class MemoryLeases:
    """Leases for a single process (embedded mode)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}

    async def acquire(self, name: str, seconds: float) -> bool:
        now = self._clock.seconds()
        if self._until.get(name, 0.0) > now:
            return False
        self._until = {key: until for key, until in self._until.items() if until > now}
        self._until[name] = now + seconds
        return True


class DeliveryWorker:
    log = Logger()

    def __init__(
        self,
        inbox: Inbox,
        is_online: Callable[[str], Awaitable[bool]],
        wakeups: WakeUps,
        leases: Leases,
        clock: IReactorTime,
        metrics: Any,
        redelivery_seconds: float = DEFAULT_REDELIVERY_SECONDS,
    ) -> None:
        self._inbox = inbox
        self._is_online = is_online
        self._wakeups = wakeups
        self._leases = leases
        self._clock = clock
        self._metrics = metrics
        self._redelivery_seconds = redelivery_seconds

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def user_online(self, user_id: str) -> bool:
        """Drain a user's backlog to where they are connected; False when another worker has it."""
        if not await self._leases.acquire(f"online:{user_id}", ONLINE_LEASE_SECONDS):
            return False
        if await self._inbox.depth(user_id, self._now_ms()):
            await self._wakeups.pending(user_id)
            self._metrics.worker_drains.inc()
        return True

    async def sweep(self) -> tuple[int, int]:
        """Expire old messages and redeliver stale unacknowledged ones; returns (expired, redelivered users)."""
        now_ms = self._now_ms()
        expired = await self._inbox.expire(now_ms)
        if expired:
            self._metrics.messages_expired.inc(expired)
            self.log.info("expired {count} unacknowledged messages", count=expired)
        redelivered = 0
        cutoff = now_ms - int(self._redelivery_seconds * 1000)
        survey = await self._inbox.survey(cutoff, now_ms)
        self._metrics.inbox_depth.set(survey.depth)
        for user_id in survey.stale_recipients:
            if not await self._is_online(user_id):
                continue
            # At most one redelivery per user per timeout, across all workers.
            if await self._leases.acquire(f"redeliver:{user_id}", self._redelivery_seconds):
                await self._wakeups.redeliver(user_id, cutoff / 1000)
                redelivered += 1
        if redelivered:
            self._metrics.worker_redeliveries.inc(redelivered)
        return expired, redelivered
