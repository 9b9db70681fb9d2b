"""Redis over RESP2: a small client of our own, with hiredis packing commands and parsing replies.

Why not txredisapi: its per-command cost (Python command building, a DeferredQueue, a timer
per command) was most of the server's CPU per message. Here a command is one C call to pack,
one write and one Deferred; replies come back in order on one pipelined connection.

- Every command has a deadline and fails at once while no connection is ready: Redis being
  down is SERVICE_UNAVAILABLE for the caller, never a hang. A connection that stays silent
  past a deadline is aborted and made again.
- Reconnection never stops (with backoff), including after a failed AUTH or SELECT. Only at
  startup is an unreachable Redis fatal: `check_reachable` runs before the reactor does.
- The subscriber subscribes again after every reconnect and then calls `on_subscribed`, so its
  owner can rescan what it may have missed: pub/sub is only a hint. It PINGs on a timer: a
  subscriber connection that goes half-open would otherwise leave the instance deaf for good.
- Each connection can name itself (CLIENT SETNAME), so `CLIENT LIST` shows what it belongs to.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import hiredis
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.errors import service_unavailable

COMMAND_TIMEOUT_SECONDS = 3.0
# Error replies that mean "Redis cannot serve now" rather than "this command is wrong".
UNAVAILABLE_REPLIES = ("OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")
CONNECT_TIMEOUT_SECONDS = 5.0
# A subscriber connection PINGs at this interval, and is made again when an interval after a
# PING passes with nothing heard.
SUBSCRIBER_PING_SECONDS = 10.0


class ResponseError(Exception):
    """An error reply from Redis."""


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


class Script:
    """A Lua script, run by its SHA1 (EVALSHA) and sent in full only when Redis lacks it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()


def _handshake(password: str | None, username: str | None, db: int, name: str | None = None) -> list[tuple]:
    commands: list[tuple] = []
    if password is not None:
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        commands.append(("SELECT", db))
    if name:
        commands.append(("CLIENT", "SETNAME", connection_name(name)))
    return commands


def connection_name(name: str) -> str:
    """A name CLIENT SETNAME takes: it refuses spaces and newlines, which a key prefix may hold."""
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in name)


def check_reachable(address: RedisAddress, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Connect, authenticate, select the database and PING once, blocking.

    For startup, before the reactor runs: a Redis that is unreachable or refuses the
    credentials then stops the program with one line, as an unreachable database does.
    Raises OSError or ResponseError saying what failed.
    """
    with socket.create_connection((address.host, address.port), timeout) as raw:
        connection = ssl.create_default_context().wrap_socket(raw, server_hostname=address.host) if address.tls else raw
        reader = hiredis.Reader(replyError=ResponseError, encoding="utf-8", errors="replace")
        for command in [*_handshake(address.password, address.username, address.db), ("PING",)]:
            connection.sendall(hiredis.pack_command(command))
            reply = False
            while reply is False:
                data = connection.recv(65536)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                reader.feed(data)
                reply = reader.gets()
            if isinstance(reply, ResponseError):
                raise reply


class RespProtocol(Protocol):
    """One connection: each command is written at once and its reply matched in order."""

    log = Logger()

    def __init__(
        self,
        handshake: list[tuple],
        on_ready: Callable[["RespProtocol"], None],
        on_lost: Callable[["RespProtocol"], None],
    ) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError, encoding="utf-8", errors="replace")
        self._waiting: deque[defer.Deferred] = deque()
        self._handshake = handshake
        self._on_ready = on_ready
        self._on_lost = on_lost

    def connectionMade(self) -> None:
        defer.ensureDeferred(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        for command in self._handshake:
            await self.send(command)
        self._on_ready(self)

    def _start_failed(self, failure: Failure) -> None:
        self.log.warn("Redis refused setting up the connection (AUTH, SELECT, SCRIPT LOAD); retrying: {error}",
                      error=failure.value)
        self.transport.abortConnection()

    def send(self, command: tuple | list) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(waiter)
        self.transport.write(hiredis.pack_command(tuple(command)))
        return waiter

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                self.reply_received(reply)
        except hiredis.ProtocolError:
            self.log.failure("unreadable data from Redis; reconnecting")
            self.transport.abortConnection()

    def reply_received(self, reply: Any) -> None:
        waiter = self._waiting.popleft()
        # A waiter already failed by its deadline takes its late reply and drops it.
        if not waiter.called:
            if isinstance(reply, ResponseError):
                waiter.errback(reply)
            else:
                waiter.callback(reply)

    def connectionLost(self, reason: Failure = None) -> None:
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(ConnectionLost("Redis connection lost"))
        self._on_lost(self)


class _Connection:
    """A connection to Redis that is made again whenever it is lost."""

    log = Logger()

    def __init__(self, address: RedisAddress, reactor: Any, make_protocol: Callable[[], Protocol]) -> None:
        self.address = address
        self._reactor = reactor
        factory = Factory.forProtocol(make_protocol)
        factory.noisy = False
        self._service = ClientService(
            address.endpoint(reactor),
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0),
            clock=reactor,
        )

    def start(self) -> None:
        if not self._service.running:
            self._service.startService()

    def stop(self) -> defer.Deferred:
        return self._service.stopService() if self._service.running else defer.succeed(None)


def _gather(waiters: list[defer.Deferred]) -> defer.Deferred:
    """Fires with every waiter's result, in order, once all have fired; or with the first failure."""
    done: defer.Deferred = defer.Deferred()
    results: list[Any] = [None] * len(waiters)
    state = {"left": len(waiters), "failure": None}

    def settled(result: Any, index: int) -> None:
        if isinstance(result, Failure):
            if state["failure"] is None:
                state["failure"] = result
        else:
            results[index] = result
        state["left"] -= 1
        if not state["left"]:
            done.errback(state["failure"]) if state["failure"] is not None else done.callback(results)

    for index, waiter in enumerate(waiters):
        waiter.addBoth(settled, index)
    return done


class TurnBatches:
    """Work grouped by key until the end of the reactor turn, then handed to `handle(key, items)`
    group by group, each in the order added: calls that Redis can take as one (one hash tag)."""

    log = Logger()

    def __init__(self, reactor: Any, handle: Callable[[str, list], None]) -> None:
        self._reactor = reactor
        self._handle = handle
        self._groups: dict[str, list] = {}
        self._call: Any = None

    def add(self, key: str, item: Any) -> None:
        self._groups.setdefault(key, []).append(item)
        if self._call is None:
            self._call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._call = None
        groups, self._groups = self._groups, {}
        for key, items in groups.items():
            try:
                self._handle(key, items)
            except Exception:
                # The handler answers its own items, even on failure; this is a bug in it.
                self.log.failure("handling a batch of Redis calls failed")


def fail_unanswered(failure: Failure, batch: list[tuple[Any, defer.Deferred]]) -> None:
    """A batched call failed, or its reply could not be read: every waiter of the batch not yet
    answered fails with it, so none is left waiting."""
    for _, waiter in batch:
        if not waiter.called:
            waiter.errback(failure)


class RedisClient(_Connection):
    """Commands and scripts, pipelined on one connection."""

    def __init__(self, address: RedisAddress, reactor: Any, name: str | None = None) -> None:
        super().__init__(address, reactor, self._new_protocol)
        self._name = name
        self._protocol: RespProtocol | None = None
        self._scripts: list[Script] = []
        # (deadline, waiter, connection) in the order sent, so the oldest is always first.
        self._deadlines: deque[tuple[float, defer.Deferred, RespProtocol]] = deque()
        self._deadline_call: Any = None
        self._connected_waiters: list[defer.Deferred] = []

    def preload(self, *scripts: Script) -> None:
        """Load these scripts on every new connection before it takes commands.

        Else the first EVALSHA after a Redis restart fails and is sent again as EVAL, and a
        script issued in between could run first: one sender's messages out of order.
        """
        self._scripts.extend(script for script in scripts if script not in self._scripts)

    def _new_protocol(self) -> RespProtocol:
        handshake = _handshake(self.address.password, self.address.username, self.address.db, self._name)
        handshake += [("SCRIPT", "LOAD", script.text) for script in self._scripts]
        return RespProtocol(handshake, self._ready, self._lost)

    def _ready(self, protocol: RespProtocol) -> None:
        self._protocol = protocol
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _lost(self, protocol: RespProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def when_connected(self) -> defer.Deferred:
        """Fires once a connection is ready to take commands (at once if one is)."""
        if self._protocol is not None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._connected_waiters.append(waiter)
        return waiter

    def _send(self, command: tuple | list) -> defer.Deferred:
        protocol = self._protocol
        if protocol is None:
            raise service_unavailable("Redis")
        waiter = protocol.send(command)
        deadlines = self._deadlines
        # Replies come in order: answered commands leave from the front, so this stays short.
        while deadlines and deadlines[0][1].called:
            deadlines.popleft()
        deadlines.append((self._reactor.seconds() + COMMAND_TIMEOUT_SECONDS, waiter, protocol))
        if self._deadline_call is None:
            self._deadline_call = self._reactor.callLater(COMMAND_TIMEOUT_SECONDS, self._check_deadlines)
        return waiter

    def _check_deadlines(self) -> None:
        self._deadline_call = None
        now = self._reactor.seconds()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][1].called or deadlines[0][0] <= now):
            _, waiter, protocol = deadlines.popleft()
            if not waiter.called:
                waiter.errback(TimeoutError(f"no Redis reply in {COMMAND_TIMEOUT_SECONDS}s"))
                # Silent past a deadline: assume the connection is dead and make a new one.
                protocol.transport.abortConnection()
        if deadlines:
            self._deadline_call = self._reactor.callLater(deadlines[0][0] - now, self._check_deadlines)

    def execute_batch(self, commands: list[tuple]) -> defer.Deferred:
        """Plain commands sent together; fires with their replies in order, or with the first
        failure once all have answered. Callbacks, not a coroutine: it runs for every message.

        Each command is atomic on its own but the batch is not (another connection's commands may
        run between two of them): for what needs no script. Plain commands cost Redis a fraction
        of a script's: no interpreter, no argument tables."""
        try:
            waiters = [self._send(command) for command in commands]
        except Exception:
            return defer.fail()
        return _gather(waiters).addErrback(self._unavailable)

    def _unavailable(self, failure: Failure) -> Failure:
        """A connection that failed, or a reply that means Redis cannot serve now, is
        SERVICE_UNAVAILABLE for the caller; any other error reply goes through as it is."""
        error = failure.value
        if isinstance(error, (TimeoutError, ConnectionLost)):
            self.log.warn("Redis command failed: {error}", error=error)
        elif isinstance(error, ResponseError) and str(error).startswith(UNAVAILABLE_REPLIES):
            self.log.warn("Redis refused a command: {error}", error=error)
        else:
            return failure
        raise service_unavailable("Redis") from error

    async def _call(self, command: tuple | list) -> Any:
        try:
            return await self._send(command)
        except (TimeoutError, ConnectionLost) as e:
            self.log.warn("Redis command failed: {error}", error=e)
            raise service_unavailable("Redis") from e
        except ResponseError as e:
            if not str(e).startswith(UNAVAILABLE_REPLIES):
                raise
            self.log.warn("Redis refused a command: {error}", error=e)
            raise service_unavailable("Redis") from e

    async def execute(self, *args: Any) -> Any:
        return await self._call(args)

    async def eval(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._call(("EVALSHA", script.sha, len(keys), *keys, *args))
        except ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self._call(("EVAL", script.text, len(keys), *keys, *args))

    async def ping(self) -> None:
        await self.execute("PING")


class _SubscriberProtocol(RespProtocol):
    """After the handshake, subscribes and then only receives messages."""

    def __init__(self, handshake: list[tuple], subscriber: "RedisSubscriber", clock: Any) -> None:
        super().__init__(handshake, self._subscribe, subscriber.lost)
        self._subscriber = subscriber
        self._clock = clock
        self._listening = False
        self._confirmations = 0
        self._heard = False
        self._ping_call: Any = None

    def _subscribe(self, _: RespProtocol) -> None:
        self._listening = True
        self.transport.write(hiredis.pack_command(("SUBSCRIBE", *self._subscriber.channels)))
        self._ping_call = self._clock.callLater(SUBSCRIBER_PING_SECONDS, self._check_alive)

    def _check_alive(self) -> None:
        """Silent for a whole interval after a PING: half-open, so abort and let it be made again."""
        if self._heard:
            self._heard = False
            self.transport.write(hiredis.pack_command(("PING",)))
            self._ping_call = self._clock.callLater(SUBSCRIBER_PING_SECONDS, self._check_alive)
        else:
            self._ping_call = None
            self.log.warn("the Redis subscriber connection answered no PING; reconnecting")
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        super().connectionLost(reason)

    def reply_received(self, reply: Any) -> None:
        if not self._listening:
            return super().reply_received(reply)
        self._heard = True
        kind = reply[0] if isinstance(reply, list) and reply else None
        if kind == "pong":
            return
        if kind == "message":
            self._subscriber.message_received(reply[1], reply[2])
        elif kind == "subscribe":
            self._confirmations += 1
            if self._confirmations == len(self._subscriber.channels):
                self._subscriber.subscribed(self)
        else:
            self.log.warn("unexpected reply on the subscriber connection: {reply!r}", reply=reply)


class RedisSubscriber(_Connection):
    """A dedicated connection (a subscribed connection can run no other command)."""

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any,
        channels: list[str],
        on_message: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        name: str | None = None,
    ) -> None:
        super().__init__(address, reactor, self._new_protocol)
        self._name = name
        self.channels = channels
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self._protocol: _SubscriberProtocol | None = None

    def _new_protocol(self) -> _SubscriberProtocol:
        handshake = _handshake(self.address.password, self.address.username, 0, self._name)
        return _SubscriberProtocol(handshake, self, self._reactor)

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def subscribed(self, protocol: _SubscriberProtocol) -> None:
        self._protocol = protocol
        try:
            self.on_subscribed()
        except Exception:
            self.log.failure("handling a Redis (re)subscription failed")

    def lost(self, protocol: _SubscriberProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    def message_received(self, channel: str, message: str) -> None:
        try:
            self.on_message(channel, message)
        except Exception:
            self.log.failure("could not handle a message on {channel}", channel=channel)


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
