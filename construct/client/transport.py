"""Connections from a client to a Construct server.

- `ServerAddress`: `ws://host:port/path`, `wss://…`, `tcp://host:port` (JSON lines) or
  `tcps://host:port` (JSON lines over TLS).
- `Channel`: one open connection speaking the protocol. Requests carry a `requestId` and are
  matched with their replies; pushes (`message`, `sessionExpired`) go to a callback.
- `Link`: keeps one authenticated channel open. After every (re)connection it runs the
  `authenticate` step (normally `connect {sessionToken}`) before anyone may use the channel, and
  when the connection drops it reconnects with exponential backoff and jitter, for as long as it
  runs, whatever went wrong.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from construct.protocol import codec

REQUEST_TIMEOUT = 15.0
CONNECT_TIMEOUT = 10.0
KEEPALIVE_SECONDS = 30.0
CLOSE_TIMEOUT = 2.0
# The server's frames are bounded by its options; this only stops a runaway line.
MAX_LINE_BYTES = 64 * 1024 * 1024
PUSH_TYPES = ("message", "sessionExpired")


class ServerError(Exception):
    """The server answered a request with `error`."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        # Seconds the server asked us to wait (RATE_LIMITED), if it did.
        self.retry_after = retry_after


class ConnectionClosed(Exception):
    """The connection ended before the reply came; the request may or may not have run."""


class RequestTimeout(Exception):
    """No reply in time; the request may or may not have run."""


class ConnectFailed(Exception):
    """The server could not be reached."""


class AuthenticationFailed(Exception):
    """The stored session no longer works; retrying cannot help (log in again)."""


@dataclass(frozen=True)
class ServerAddress:
    scheme: str
    host: str
    port: int
    path: str
    # The PEM of the certificate authorities TLS trusts; None: the system's.
    trust: bytes | None = field(default=None, repr=False)

    DEFAULT_PORTS = {"ws": 80, "wss": 443, "tcp": 8081, "tcps": 8081}

    @classmethod
    def parse(cls, text: str, trust: bytes | None = None) -> "ServerAddress":
        """`ws://127.0.0.1:8080/ws`, `wss://chat.example.org/ws`, `tcp://127.0.0.1:8081`,
        `tcps://chat.example.org:8081` or an obfs4 bridge line (`obfs4://…`); `trust` is the PEM
        of the authorities to trust for TLS."""
        if text.strip().startswith("obfs4://"):
            from construct.client.obfs4 import Obfs4Address  # which builds on this module

            return Obfs4Address.parse(text)
        parts = urlsplit(text.strip())
        if parts.scheme not in cls.DEFAULT_PORTS or not parts.hostname:
            raise ValueError(
                f"server address must look like ws://host:port/ws, wss://…, tcp://host:port or tcps://…, not {text!r}"
            )
        try:
            port = parts.port or cls.DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ValueError(f"bad port in server address {text!r}") from None
        return cls(parts.scheme, parts.hostname, port, parts.path or "/", trust)

    @property
    def lines(self) -> bool:
        """JSON lines (tcp, tcps) rather than WebSocket."""
        return self.scheme in ("tcp", "tcps")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = "" if self.lines else self.path
        return f"{self.scheme}://{host}:{self.port}{path}"

    def endpoint(self, reactor: Any) -> Any:
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        if self.scheme in ("wss", "tcps"):
            trust = None if self.trust is None else Certificate.loadPEM(self.trust)
            endpoint = wrapClientTLS(optionsForClientTLS(self.host, trustRoot=trust), endpoint)
        return endpoint


class Channel:
    """One open connection: requests by `requestId`, pushes to `on_push`."""

    log = Logger()

    def __init__(
        self,
        write: Callable[[bytes], None],
        close: Callable[[], None],
        abort: Callable[[], None],
        encoding: str,
        clock: IReactorTime,
        on_push: Callable[[dict], None],
    ) -> None:
        self._write = write
        self._close = close
        self._abort = abort
        self._encoding = encoding
        self._clock = clock
        self._on_push = on_push
        self._ids = itertools.count(1)
        self._pending: dict[str, defer.Deferred] = {}
        # Fires when the connection ends; `close_reason` says why (awaiting `closed` consumes its result).
        self.closed: defer.Deferred = defer.Deferred()
        self.close_reason = ""

    async def request(self, message_type: str, payload: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> dict:
        """Send one message and return its reply `{"type", "payload"}`; ServerError for `error`."""
        request_id, reply = self._send(message_type, payload)
        reply.addTimeout(timeout, self._clock, onTimeoutCancel=self._timed_out(message_type))
        try:
            return await reply
        finally:
            self._pending.pop(request_id, None)

    async def acknowledge(self, message_ids: list[str], timeout: float = REQUEST_TIMEOUT) -> None:
        """`ackMessage`, confirmed: a successful ack has no reply, so a `ping` follows it; the
        server answers in order, so once `pong` is back any error for the ack has arrived too."""
        request_id, outcome = self._send("ackMessage", {"messageIds": message_ids})
        failures: list[Failure] = []
        outcome.addErrback(failures.append)
        try:
            await self.request("ping", None, timeout)
        finally:
            self._pending.pop(request_id, None)
        if failures:
            failures[0].raiseException()

    def _send(self, message_type: str, payload: dict | None) -> tuple[str, defer.Deferred]:
        if self.closed.called:
            raise ConnectionClosed("the connection is closed")
        request_id = str(next(self._ids))
        data = codec.encode(message_type, payload, request_id, self._encoding)
        try:
            self._write(data)
        except Exception as e:
            # A WebSocket that is closing refuses to send ("Attempt to send on a closed protocol").
            raise ConnectionClosed(f"the connection is closing: {e}") from None
        reply: defer.Deferred = defer.Deferred()
        self._pending[request_id] = reply
        return request_id, reply

    @staticmethod
    def _timed_out(message_type: str) -> Callable[[Any, float], Any]:
        def on_timeout(result: Any, timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                raise RequestTimeout(f"no reply to {message_type} within {timeout:g} s")
            return result

        return on_timeout

    def close(self) -> None:
        """End the connection politely (WebSocket close handshake, TCP FIN)."""
        self._close()

    def abort(self) -> None:
        self._abort()

    # From the protocol

    def frame_received(self, data: bytes, encoding: str) -> None:
        try:
            self._dispatch(data, encoding)
        except Exception:
            self.log.failure("handling a frame from the server failed")

    def _dispatch(self, data: bytes, encoding: str) -> None:
        try:
            frame = codec.decode(data, encoding)
        except codec.FrameError:
            self.log.warn("ignoring a frame the client cannot parse")
            return
        reply = self._pending.pop(frame.request_id, None) if frame.request_id is not None else None
        if reply is not None:
            if frame.type == "error":
                retry_after = frame.payload.get("retryAfter")
                reply.errback(ServerError(
                    str(frame.payload.get("code")),
                    str(frame.payload.get("message")),
                    retry_after if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool) else None,
                ))
            else:
                reply.callback({"type": frame.type, "payload": frame.payload})
        elif frame.type in PUSH_TYPES and frame.request_id is None:
            self._on_push({"type": frame.type, "payload": frame.payload})
        elif frame.type == "error":
            self.log.warn("server error without a request: {code}", code=frame.payload.get("code"))

    def connection_lost(self, reason: str) -> None:
        if self.closed.called:
            return
        pending, self._pending = self._pending, {}
        self.close_reason = reason
        # Closed first, so a caller retrying from an errback below finds the link reconnecting.
        self.closed.callback(reason)
        for reply in pending.values():
            if not reply.called:
                reply.errback(ConnectionClosed(reason))


class _WebSocketProtocol(WebSocketClientProtocol):
    ready: defer.Deferred
    channel: Channel | None = None

    def onOpen(self) -> None:
        factory = self.factory
        self.channel = Channel(
            lambda data: self.sendMessage(data, isBinary=factory.encoding == codec.MSGPACK),
            self.sendClose,
            lambda: self.dropConnection(abort=True),
            factory.encoding,
            factory.clock,
            factory.on_push,
        )
        self.ready.callback(self.channel)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.channel is not None:
            self.channel.frame_received(payload, codec.MSGPACK if isBinary else codec.JSON)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        description = f"WebSocket closed ({code}{': ' + reason if reason else ''})"
        if not self.ready.called:
            self.ready.errback(ConnectFailed(description))
        elif self.channel is not None:
            self.channel.connection_lost(description)


class _WebSocketFactory(WebSocketClientFactory):
    protocol = _WebSocketProtocol

    def __init__(self, address: ServerAddress, encoding: str, clock: IReactorTime, on_push: Callable) -> None:
        super().__init__(f"{address.scheme}://{address.host}:{address.port}{address.path}")
        self.noisy = False
        self.encoding = encoding
        self.clock = clock
        self.on_push = on_push
        self.setProtocolOptions(openHandshakeTimeout=CONNECT_TIMEOUT)

    def buildProtocol(self, addr: Any) -> _WebSocketProtocol:
        protocol = super().buildProtocol(addr)
        protocol.ready = defer.Deferred()
        return protocol


class _JsonLinesProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE_BYTES
    ready: defer.Deferred
    channel: Channel | None = None

    def connectionMade(self) -> None:
        self.channel = Channel(
            lambda data: self.transport.write(data + b"\n"),
            self.transport.loseConnection,
            self.transport.abortConnection,
            codec.JSON,
            self.factory.clock,
            self.factory.on_push,
        )
        self.ready.callback(self.channel)

    def lineReceived(self, line: bytes) -> None:
        if self.channel is not None and line.strip():
            self.channel.frame_received(line, codec.JSON)

    def connectionLost(self, reason: Any = None) -> None:
        if self.channel is not None:
            # A clean close says nothing more; a TLS failure says which ("certificate verify failed").
            why = "" if reason is None or reason.check(ConnectionDone) else f": {reason.value}"
            self.channel.connection_lost(f"TCP connection closed{why}")


class _JsonLinesFactory(Factory):
    noisy = False

    def __init__(self, clock: IReactorTime, on_push: Callable) -> None:
        self.clock = clock
        self.on_push = on_push

    def buildProtocol(self, addr: Any) -> _JsonLinesProtocol:
        protocol = _JsonLinesProtocol()
        protocol.factory = self
        protocol.ready = defer.Deferred()
        return protocol


class Link:
    """One authenticated channel kept open: connect, authenticate, and reconnect when it drops.

    `authenticate(channel)` runs on every new connection before the channel is handed out; if
    it raises AuthenticationFailed the link gives up (the session is dead), other errors count
    as a failed attempt.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        address: ServerAddress,
        encoding: str,
        on_push: Callable[[dict], None],
        retry_policy: Callable[[int], float] = backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0),
        on_status: Callable[[str, str], None] = lambda event, detail: None,
    ) -> None:
        self._reactor = reactor
        self._address = address
        self._encoding = encoding
        self._on_push = on_push
        self._retry_policy = retry_policy
        # ("lost", reason) when an open connection drops, ("reconnected", address) when one is back.
        self._on_status = on_status
        self.authenticate: Callable[[Channel], Awaitable[None]] | None = None
        self._current: Channel | None = None
        self._waiters: list[tuple[defer.Deferred, int | None]] = []
        self._fatal: Exception | None = None
        self._running = False
        self._sleeping: defer.Deferred | None = None
        self._loop: defer.Deferred | None = None

    def start(self) -> None:
        if not self._running:
            self._running = True
            self._loop = defer.ensureDeferred(self._run())
            self._loop.addErrback(lambda failure: self.log.failure("connection loop failed", failure=failure))

    async def stop(self) -> None:
        self._running = False
        if self._sleeping is not None:
            self._sleeping.cancel()
        if self._current is not None:
            channel = self._current
            channel.close()
            closing = defer.Deferred()
            channel.closed.chainDeferred(closing)
            try:
                await closing.addTimeout(CLOSE_TIMEOUT, self._reactor)
            except defer.TimeoutError:
                channel.abort()
        self._fail_waiters(ConnectionClosed("the client is stopping"), everyone=True)
        if self._loop is not None:
            await self._loop

    async def channel(self, fail_after: int | None = None) -> Channel:
        """The open, authenticated channel; ConnectFailed after `fail_after` failed attempts."""
        if self._fatal is not None:
            raise self._fatal
        if self._current is not None and not self._current.closed.called:
            return self._current
        self.start()
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((waiter, fail_after))
        return await waiter

    async def request(
        self, message_type: str, payload: dict | None = None, timeout: float = REQUEST_TIMEOUT,
        fail_after: int | None = None,
    ) -> dict:
        """One request on the current connection. A connection that drops under the request is
        replaced and the request sent once more: everything this client sends is safe to repeat
        (sends and acknowledgements are idempotent by message id)."""
        channel = await self.channel(fail_after)
        try:
            return await channel.request(message_type, payload, timeout)
        except ConnectionClosed:
            if not self._running:
                raise
        channel = await self.channel(fail_after)
        return await channel.request(message_type, payload, timeout)

    async def _run(self) -> None:
        failures = 0
        lost = False
        while self._running:
            try:
                channel = await self._open()
            except AuthenticationFailed as e:
                self._fatal = e
                self._running = False
                self._fail_waiters(e, everyone=True)
                return
            except Exception as e:
                if not self._running:
                    return
                failures += 1
                self._fail_waiters(ConnectFailed(f"cannot reach {self._address}: {e}"))
                await self._sleep(self._retry_policy(failures - 1))
                continue
            if not self._running:
                # stop() came while this connection was being made.
                channel.abort()
                return
            failures = 0
            try:
                if lost:
                    lost = False
                    self._report("reconnected", str(self._address))
                reason = await self._serve(channel)
            except Exception:
                # A bug in a callback must not end the reconnecting.
                self.log.failure("serving a connection failed")
                channel.abort()
                reason = "client error"
            if self._running:
                lost = True
                self._report("lost", reason)
                await self._sleep(self._retry_policy(0))

    def _report(self, event: str, detail: str) -> None:
        try:
            self._on_status(event, detail)
        except Exception:
            self.log.failure("reporting the connection status failed")

    async def _serve(self, channel: Channel) -> str:
        """Hand the channel out and keep it alive until it closes; returns why it closed."""
        self._current = channel
        waiters, self._waiters = self._waiters, []
        for waiter, _ in waiters:
            waiter.callback(channel)
        keepalive = task.LoopingCall(self._keepalive, channel)
        keepalive.clock = self._reactor
        keepalive.start(KEEPALIVE_SECONDS, now=False)
        try:
            await channel.closed
            return channel.close_reason
        finally:
            self._current = None
            if keepalive.running:
                keepalive.stop()

    async def _open(self) -> Channel:
        if self._address.lines:
            factory: Any = _JsonLinesFactory(self._reactor, self._on_push)
        else:
            factory = _WebSocketFactory(self._address, self._encoding, self._reactor, self._on_push)
        protocol = await self._address.endpoint(self._reactor).connect(factory)
        try:
            channel = await protocol.ready.addTimeout(CONNECT_TIMEOUT, self._reactor)
            if self.authenticate is not None:
                await self.authenticate(channel)
        except BaseException:
            protocol.transport.abortConnection()
            raise
        return channel

    async def _keepalive(self, channel: Channel) -> None:
        """A dead link otherwise goes unnoticed until the next request (TCP has no pings).

        It never raises: a LoopingCall whose function fails stops for good."""
        try:
            await channel.request("ping")
        except ConnectionClosed:
            pass
        except Exception:
            # No answer, or nonsense: this connection is no good, make a new one.
            channel.abort()

    async def _sleep(self, seconds: float) -> None:
        self._sleeping = task.deferLater(self._reactor, seconds, lambda: None)
        try:
            await self._sleeping
        except defer.CancelledError:
            pass
        finally:
            self._sleeping = None

    def _fail_waiters(self, error: Exception, everyone: bool = False) -> None:
        """Fail the waiters whose attempts are used up (all of them when `everyone`)."""
        failing, remaining = [], []
        for waiter, left in self._waiters:
            if everyone or (left is not None and left <= 1):
                failing.append(waiter)
            else:
                remaining.append((waiter, None if left is None else left - 1))
        # Settle the list first: a failed waiter's callbacks may call back into the link.
        self._waiters = remaining
        for waiter in failing:
            waiter.errback(error)
