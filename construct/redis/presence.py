"""Presence and wake-ups across instances (production mode).

Presence: `<prefix>{<userId>}:presence` is a ZSET of instance id -> expiry (ms). An instance
refreshes the entries of the users it holds every HEARTBEAT_SECONDS, so a crashed instance's
entries vanish within PRESENCE_TTL_SECONDS; instance ids are stable across restarts, so a
restarted instance simply takes its entries over again.

Wake-ups: each instance subscribes to `<prefix>instance:<instanceId>`; a JSON event there says
"user X has pending messages", "push X's unacknowledged messages again", or "these sessions
of X were revoked". Users coming online are announced on `<prefix>online` for the workers.
Every event is a hint: the inbox is the truth, and a subscriber that reconnects rescans.
"""

from __future__ import annotations

from typing import Any

import orjson

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from construct.redis.client import RedisClient

PRESENCE_TTL_SECONDS = 60
HEARTBEAT_SECONDS = 20


def online_channel(prefix: str) -> str:
    return f"{prefix}online"


def instance_channel(prefix: str, instance_id: str) -> str:
    return f"{prefix}instance:{instance_id}"


def presence_key(prefix: str, user_id: str) -> str:
    return f"{prefix}{{{user_id}}}:presence"


def event_message(event: str, user_id: str, **fields: Any) -> str:
    return orjson.dumps({"event": event, "userId": user_id, **fields}).decode("utf-8")


class RedisPresence:
    """Looks up where users are connected and sends events to those instances."""

    log = Logger()

    def __init__(self, redis: RedisClient, prefix: str, clock: IReactorTime) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock

    def key(self, user_id: str) -> str:
        return presence_key(self._prefix, user_id)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def holders(self, user_id: str) -> list[str]:
        return await self._redis.execute("ZRANGEBYSCORE", self.key(user_id), self._now_ms(), "+inf")

    async def is_online(self, user_id: str) -> bool:
        return bool(await self.holders(user_id))

    async def notify(self, user_id: str, event: str, **fields: Any) -> list[str]:
        """Publish an event about a user to every instance holding them; returns those instances."""
        holders = await self.holders(user_id)
        message = event_message(event, user_id, **fields)
        for instance_id in holders:
            await self._redis.execute("PUBLISH", instance_channel(self._prefix, instance_id), message)
        return holders


class InstancePresence(RedisPresence):
    """One `construct` instance: registers its users and acts on events sent to it."""

    def __init__(self, redis: RedisClient, prefix: str, clock: IReactorTime, instance_id: str, hub: Any) -> None:
        super().__init__(redis, prefix, clock)
        self.instance_id = instance_id
        self._hub = hub

    @property
    def channel(self) -> str:
        return instance_channel(self._prefix, self.instance_id)

    # Hub listener: the first connection of a user attached, the last one detached.

    def user_attached(self, user_id: str) -> None:
        self._background(self._register(user_id, announce=True), "registering presence")

    def user_detached(self, user_id: str) -> None:
        self._background(self._redis.execute("ZREM", self.key(user_id), self.instance_id), "clearing presence")

    async def _register(self, user_id: str, announce: bool) -> None:
        key = self.key(user_id)
        await self._redis.execute("ZADD", key, self._now_ms() + PRESENCE_TTL_SECONDS * 1000, self.instance_id)
        await self._redis.execute("PEXPIRE", key, PRESENCE_TTL_SECONDS * 1000)
        if announce:
            # Only after the presence entry exists, so a worker acting on it finds this instance.
            message = orjson.dumps({"userId": user_id, "instanceId": self.instance_id}).decode("utf-8")
            await self._redis.execute("PUBLISH", online_channel(self._prefix), message)

    async def heartbeat(self) -> None:
        for user_id in self._hub.online_users():
            await self._register(user_id, announce=False)

    # Core callbacks

    def sessions_revoked(self, user_id: str, token_hashes: list[str], reason: str | None = None) -> None:
        self._hub.on_sessions_revoked(user_id, token_hashes, reason)
        self._background(
            self._notify_others(user_id, "revoked", tokenHashes=token_hashes, reason=reason), "revoking sessions"
        )

    async def _notify_others(self, user_id: str, event: str, **fields: Any) -> None:
        message = event_message(event, user_id, **fields)
        for instance_id in await self.holders(user_id):
            if instance_id != self.instance_id:
                await self._redis.execute("PUBLISH", instance_channel(self._prefix, instance_id), message)

    # Subscriber callbacks

    def event_received(self, channel: str, message: str) -> None:
        event = orjson.loads(message)
        user_id = event["userId"]
        if event["event"] == "pending":
            self._hub.on_pending(user_id)
        elif event["event"] == "redeliver":
            self._hub.redeliver(user_id, event["attachedBefore"])
        elif event["event"] == "revoked":
            self._hub.on_sessions_revoked(user_id, event["tokenHashes"], event.get("reason"))
        else:
            self.log.warn("unknown instance event {event!r}", event=event["event"])

    def subscribed(self) -> None:
        """(Re)subscribed: hints may have been lost meanwhile, so look at every inbox we serve."""
        for user_id in self._hub.online_users():
            self._hub.on_pending(user_id)
        self._background(self.heartbeat(), "refreshing presence")

    def _background(self, coroutine: Any, what: str) -> None:
        ensureDeferred(coroutine).addErrback(lambda f: self.log.warn("{what} failed: {error}", what=what, error=f.value))
