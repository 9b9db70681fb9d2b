"""`twistd construct-worker`: the delivery worker of production mode, on Redis.

It subscribes to the user-online channel (waking the instance that holds a new connection so
its backlog drains), and sweeps periodically under a shared lease: expiring old messages and
having unacknowledged ones pushed again. Any number can run side by side.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any


from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from construct.config import Setting, SettingsOptions, int_between, non_empty
from construct.core.worker import DEFAULT_REDELIVERY_SECONDS, DeliveryWorker
from construct.http.health import build_health_site
from construct.logs import log_format, use_log_format
from construct.metrics import Metrics
from construct.redis.client import RedisClient, RedisLeases, RedisSubscriber
from construct.redis.inbox import RedisInbox
from construct.redis.presence import RedisPresence, online_channel
from construct.redis.service import RedisService
from construct.redis.wakeups import RedisWakeUps
from construct.services import GuardedTimer, ListenerService, SequentialMultiService, parse_endpoint
from construct.tap import SWEEP_INTERVAL_SECONDS, redis_address, require_redis

PROGRAM = "construct-worker"


class Options(SettingsOptions):
    program = PROGRAM
    settings = (
        Setting("redis", None, "redis://host:port/db URL (required)", redis_address),
        Setting("redis-prefix", "construct:", "prefix of every Redis key and channel", non_empty),
        Setting(
            "health", "tcp:3001:interface=127.0.0.1", "health and metrics endpoint", non_empty,
            env="CONSTRUCT_WORKER_HEALTH",
        ),
        Setting(
            "instance-id", None, "id of this worker (default: host name and process id)", non_empty,
            env="CONSTRUCT_WORKER_INSTANCE_ID",
        ),
        Setting(
            "redelivery-timeout",
            int(DEFAULT_REDELIVERY_SECONDS),
            "seconds before an unacknowledged push is pushed again",
            int_between(5, 86400),
        ),
        Setting(
            "sweep-interval", SWEEP_INTERVAL_SECONDS, "seconds between sweeps", int_between(1, 3600),
            env="CONSTRUCT_WORKER_SWEEP_INTERVAL",
        ),
        Setting("log-format", "text", "text, or json for one JSON object a line", log_format),
    )

    def postOptions(self) -> None:
        super().postOptions()
        use_log_format(self, self["log-format"])
        if self["redis"] is None:
            raise SystemExit(f"{PROGRAM}: --redis (or CONSTRUCT_REDIS) is required")
        if self["instance-id"] is None:
            self["instance-id"] = f"{socket.gethostname()}-worker-{os.getpid()}"


class OnlineListener:
    """Hands user-online announcements to the worker; a rescan follows every (re)subscription."""

    log = Logger()

    def __init__(self, worker: DeliveryWorker, redis: RedisClient) -> None:
        self._worker = worker
        self._redis = redis

    def message(self, channel: str, message: str) -> None:
        user_id = json.loads(message)["userId"]
        ensureDeferred(self._worker.user_online(user_id)).addErrback(
            lambda f: self.log.warn("draining for a user failed: {error}", error=f.value)
        )

    def subscribed(self) -> None:
        # Announcements sent while we were away are lost; the sweep finds what they would have.
        ensureDeferred(self._sweep()).addErrback(
            lambda f: self.log.warn("sweep after subscribing failed: {error}", error=f.value)
        )

    async def _sweep(self) -> None:
        # The subscription may be up before the command connection is.
        await self._redis.when_connected()
        await self._worker.sweep()


def makeService(options: Options, reactor: Any = None) -> SequentialMultiService:
    if reactor is None:
        from twisted.internet import reactor
    health_endpoint = parse_endpoint(reactor, PROGRAM, "health", options["health"])
    address, prefix = options["redis"], options["redis-prefix"]
    require_redis(PROGRAM, address)
    metrics = Metrics()
    redis = RedisClient(address, reactor, name=f"{prefix}worker:{options['instance-id']}")
    presence = RedisPresence(redis, prefix, reactor)
    # The worker only reads inboxes that already exist; it never stores messages.
    inbox = RedisInbox(redis, prefix, reactor)
    # It holds no connections: its wake-ups all go to the instances that do.
    wakeups = RedisWakeUps(redis, prefix, presence, options["instance-id"])
    leases = RedisLeases(redis, prefix, options["instance-id"])
    worker = DeliveryWorker(
        inbox, presence.is_online, wakeups, leases, reactor, metrics, options["redelivery-timeout"]
    )
    listener = OnlineListener(worker, redis)
    subscriber = RedisSubscriber(
        address, reactor, [online_channel(prefix)], listener.message, listener.subscribed,
        name=f"{prefix}worker-subscriber:{options['instance-id']}",
    )

    async def sweep() -> None:
        if not redis.connected:
            # Not yet (at startup) or not now (Redis down, which the connection logs): the
            # sweep that follows every (re)subscription makes up for this one.
            return
        # One worker sweeps per interval; the others skip.
        if await leases.acquire("sweep", options["sweep-interval"] * 0.9):
            await worker.sweep()

    root = SequentialMultiService()
    RedisService(redis, subscriber).setServiceParent(root)
    GuardedTimer(options["sweep-interval"], "delivery sweep", sweep, reactor).setServiceParent(root)
    health = build_health_site({"redis": redis.ping}, metrics, reactor)
    ListenerService(PROGRAM, "health", health_endpoint, health).setServiceParent(root)
    return root
