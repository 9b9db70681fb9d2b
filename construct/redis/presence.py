"""Presence across instances (production mode): which instances hold a user's connections.

`<prefix>{<userId>}:presence` is a ZSET of instance id -> expiry (ms). An instance refreshes the
entries of the users it holds every HEARTBEAT_SECONDS, so a crashed instance's entries vanish
within PRESENCE_TTL_SECONDS; instance ids are stable across restarts, so a restarted instance
simply takes its entries over again. Users coming online are announced on `<prefix>online` for
the workers. The events that travel between instances are construct.redis.wakeups'.
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


def presence_key(prefix: str, user_id: str) -> str:
    return f"{prefix}{{{user_id}}}:presence"


class RedisPresence:
    """Looks up where users are connected."""

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


class InstancePresence(RedisPresence):
    """One `construct` instance registering the users its hub holds (the hub's listener)."""

    def __init__(self, redis: RedisClient, prefix: str, clock: IReactorTime, instance_id: str, hub: Any) -> None:
        super().__init__(redis, prefix, clock)
        self.instance_id = instance_id
        self._hub = hub

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

    def refresh(self) -> None:
        """Register every user held here again now (after Redis came back, say)."""
        self._background(self.heartbeat(), "refreshing presence")

    def _background(self, coroutine: Any, what: str) -> None:
        ensureDeferred(coroutine).addErrback(lambda f: self.log.warn("{what} failed: {error}", what=what, error=f.value))
