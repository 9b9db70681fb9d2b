"""WakeUps across instances (production mode): the local hub, and Redis pub/sub to the others.

Each instance subscribes to `<prefix>instance:<instanceId>`; a JSON event there says "user X has
pending messages", "push X's unacknowledged messages again", or "these sessions of X were
revoked". An event goes only to the instances that presence says hold the user. Every event is a
hint (construct.delivery.ports.WakeUps): the inbox is the truth, and a subscriber that
reconnects looks at every inbox it serves again.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from construct.delivery.types import Accepted
from construct.redis.client import RedisClient
from construct.redis.presence import RedisPresence


def instance_channel(prefix: str, instance_id: str) -> str:
    return f"{prefix}instance:{instance_id}"


def event_message(event: str, user_id: str, **fields: Any) -> str:
    return orjson.dumps({"event": event, "userId": user_id, **fields}).decode("utf-8")


class RedisWakeUps:
    """`hub` is this instance's (None in a worker or construct-admin, which hold no connections)."""

    log = Logger()

    def __init__(
        self, redis: RedisClient, prefix: str, presence: RedisPresence, instance_id: str, hub: Any = None
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._presence = presence
        self._instance_id = instance_id
        self._hub = hub

    @property
    def channel(self) -> str:
        """Where the other instances send this one's events."""
        return instance_channel(self._prefix, self._instance_id)

    # WakeUps

    def stored(self, recipient_id: str, accepted: Accepted, message: dict) -> None:
        # The store itself read which other instances hold the recipient: no lookup here.
        self._hub.on_stored(recipient_id, accepted.seq, accepted.previous_seq, message)
        if accepted.holders:
            self._background(self._publish(accepted.holders, event_message("pending", recipient_id)), "waking")

    def sessions_revoked(self, user_id: str, token_hashes: list[str]) -> None:
        if self._hub is not None:
            self._hub.on_sessions_revoked(user_id, token_hashes)
        self._background(self.revoked_elsewhere(user_id, token_hashes), "revoking sessions")

    async def revoked_elsewhere(self, user_id: str, token_hashes: list[str]) -> None:
        """Tell the other instances holding the user (construct-admin: all of them)."""
        await self._notify(user_id, "revoked", tokenHashes=token_hashes)

    async def pending(self, user_id: str) -> None:
        await self._notify(user_id, "pending")

    async def redeliver(self, user_id: str, attached_before: float) -> None:
        await self._notify(user_id, "redeliver", attachedBefore=attached_before)

    async def _notify(self, user_id: str, event: str, **fields: Any) -> None:
        holders = [holder for holder in await self._presence.holders(user_id) if holder != self._instance_id]
        await self._publish(holders, event_message(event, user_id, **fields))

    async def _publish(self, holders: Any, message: str) -> None:
        for instance_id in holders:
            await self._redis.execute("PUBLISH", instance_channel(self._prefix, instance_id), message)

    def _background(self, coroutine: Any, what: str) -> None:
        ensureDeferred(coroutine).addErrback(lambda f: self.log.warn("{what} failed: {error}", what=what, error=f.value))

    # Subscriber callbacks (an instance's own channel)

    def event_received(self, channel: str, message: str) -> None:
        event = orjson.loads(message)
        user_id = event["userId"]
        if event["event"] == "pending":
            self._hub.on_pending(user_id)
        elif event["event"] == "redeliver":
            self._hub.redeliver(user_id, event["attachedBefore"])
        elif event["event"] == "revoked":
            self._hub.on_sessions_revoked(user_id, event["tokenHashes"])
        else:
            self.log.warn("unknown instance event {event!r}", event=event["event"])

    def subscribed(self) -> None:
        """(Re)subscribed: hints may have been lost meanwhile, so look at every inbox we serve."""
        for user_id in self._hub.online_users():
            self._hub.on_pending(user_id)
