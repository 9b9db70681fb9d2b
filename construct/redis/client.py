"""Redis connections through txredisapi, with the guards it lacks.

- Every command has a timeout, and fails at once while no connection is up: Redis being down
  is SERVICE_UNAVAILABLE for the caller, never a hang.
- Reconnection never stops (txredisapi stops for good after one failed AUTH or SELECT).
- The subscriber re-subscribes after every reconnect (txredisapi does not) and then calls
  `on_subscribed`, so its owner can rescan what it may have missed: pub/sub is only a hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.errors import service_unavailable

COMMAND_TIMEOUT_SECONDS = 3.0
# Error replies that mean "Redis cannot serve now" rather than "this command is wrong".
UNAVAILABLE_REPLIES = ("OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")
CONNECT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "RedisAddress":
        """redis://[user:password@]host[:port][/db], or rediss:// for TLS."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"must be a redis:// or rediss:// URL, not {url.split(':', 1)[0]!r}")
        path = parts.path.strip("/")
        try:
            db = int(path) if path else 0
            port = parts.port or 6379
        except ValueError:
            raise ValueError("has a bad port or database number") from None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )

    def endpoint(self, reactor: Any) -> Any:
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT_SECONDS)
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


class _KeepTrying:
    log = Logger()

    def stopTrying(self) -> Any:
        # txredisapi calls this when AUTH or SELECT fails, even on a timeout; a worker that
        # silently stops reconnecting is worse than one that logs and retries.
        self.log.warn("Redis refused AUTH or SELECT; retrying")
        return defer.succeed(None)


class _CommandFactory(_KeepTrying, txredisapi.RedisFactory):
    pass


def _with_timeout(deferred: defer.Deferred, seconds: float, clock: IReactorTime) -> defer.Deferred:
    """Fail after `seconds` without cancelling the command (txredisapi's queues cannot be cancelled)."""
    result: defer.Deferred = defer.Deferred()

    def expire() -> None:
        if not result.called:
            result.errback(TimeoutError(f"no Redis reply in {seconds}s"))

    timer = clock.callLater(seconds, expire)

    def settle(outcome: Any) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

    deferred.addBoth(settle)
    return result


class RedisClient:
    """A small pool for commands and scripts."""

    log = Logger()

    def __init__(self, address: RedisAddress, reactor: Any, poolsize: int = 4) -> None:
        self.address = address
        self._reactor = reactor
        self._factory = _CommandFactory(
            f"{address.host}:{address.port}",
            address.db,
            poolsize,
            isLazy=True,
            charset="utf-8",
            password=address.password,
            replyTimeout=COMMAND_TIMEOUT_SECONDS,
            convertNumbers=False,
            username=address.username,
        )
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._factory.startConnecting(self.address.endpoint(self._reactor))

    def stop(self) -> defer.Deferred:
        return self._factory.disconnect() if self._started else defer.succeed(None)

    @property
    def connected(self) -> bool:
        return self._factory.size > 0

    async def _call(self, method: str, *args: Any) -> Any:
        if not self.connected:
            raise service_unavailable("Redis")
        try:
            return await _with_timeout(
                getattr(self._factory.handler, method)(*args), COMMAND_TIMEOUT_SECONDS, self._reactor
            )
        except (TimeoutError, txredisapi.ConnectionError) as e:
            self.log.warn("Redis command failed: {error}", error=e)
            raise service_unavailable("Redis") from e
        except txredisapi.ResponseError as e:
            if not str(e).startswith(UNAVAILABLE_REPLIES):
                raise
            self.log.warn("Redis refused a command: {error}", error=e)
            raise service_unavailable("Redis") from e

    async def execute(self, *args: Any) -> Any:
        return await self._call("execute_command", *args)

    async def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self._call("eval", script, keys, [str(arg) for arg in args])

    async def ping(self) -> None:
        await self.execute("PING")


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    log = Logger()

    @defer.inlineCallbacks
    def connectionMade(self) -> Any:
        yield txredisapi.SubscriberProtocol.connectionMade(self)
        try:
            yield self.subscribe(list(self.factory.channels))
            self.factory.on_subscribed()
        except Exception:
            self.log.failure("could not subscribe to Redis channels; reconnecting")
            self.transport.loseConnection()

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        try:
            self.factory.on_message(channel, message)
        except Exception:
            self.log.failure("could not handle a message on {channel}", channel=channel)


class RedisSubscriber(_KeepTrying, txredisapi.SubscriberFactory):
    """A dedicated connection (a subscribed connection can run no other command)."""

    protocol = _SubscriberProtocol

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any,
        channels: list[str],
        on_message: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
    ) -> None:
        txredisapi.SubscriberFactory.__init__(self, isLazy=True)
        self.address = address
        self.password = address.password
        self.username = address.username
        self.channels = channels
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self._reactor = reactor
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.startConnecting(self.address.endpoint(self._reactor))

    def stop(self) -> defer.Deferred:
        return self.disconnect() if self._started else defer.succeed(None)

    @property
    def connected(self) -> bool:
        return self.size > 0


class RedisLeases:
    """Short exclusive claims shared by every worker (SET NX PX)."""

    def __init__(self, redis: RedisClient, prefix: str, owner: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._owner = owner

    async def acquire(self, name: str, seconds: float) -> bool:
        # The user id inside a lease name is hash-tagged like the user's other keys.
        kind, _, user_id = name.partition(":")
        key = f"{self._prefix}{{{user_id}}}:lease:{kind}" if user_id else f"{self._prefix}lease:{kind}"
        reply = await self._redis.execute("SET", key, self._owner, "NX", "PX", int(seconds * 1000))
        return reply == "OK"
