"""One live client connection (WebSocket or TCP), independent of framing.

The transport hands over whole frames; this object decodes them, runs them in order (sends
may overlap, stored still in the order sent), writes the replies in the order of the frames,
and receives pushes from the delivery hub once the client is authenticated.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from construct.core.accounts import Identity
from construct.core.app import Core
from construct.errors import ConstructError, rate_limited
from construct.protocol import codec, operations

# Past this many frames waiting, stop reading the socket until the backlog shrinks.
PAUSE_BACKLOG = 32
RESUME_BACKLOG = 8
# Operations that may start before the frames ahead of them are answered: the core keeps one
# sender's stores in order, and the connection keeps replies in order.
PIPELINED = frozenset({"sendMessage"})
MAX_IN_FLIGHT = 32
# A client told to wait for a free connection slot is told to retry after this long.
CONNECTION_RETRY_SECONDS = 10
# A client that stopped reading may leave this much unread (or eight frames, if more) before it
# is cut off at once; its unacknowledged messages wait in its inbox for the next connection.
MIN_STALLED_BYTES = 1024 * 1024
# Why the sweep closes a connection (ClientConnection.overdue).
STOPPED_READING = "stopped reading"
AUTH_TIMEOUT = "did not authenticate in time"
IDLE = "sent nothing for too long"


def closing_error(reason: str) -> ConstructError:
    """Sent just before the server closes a connection that outstayed a limit."""
    return ConstructError("CONNECTION_TIMEOUT", f"Closing the connection: {reason}", 408)


def client_address(peer: Any) -> str:
    """The address limits count a client under: its IPv4 address (also when written IPv4-mapped
    in IPv6), or its IPv6 /64, since one host is usually given a whole /64 to pick from."""
    host = getattr(peer, "host", "")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold of this instance; 0 turns a limit off."""

    per_address: int = 100
    per_user: int = 20
    # Seconds to authenticate after connecting.
    auth_timeout: float = 60
    # Seconds without a frame before a TCP connection is closed (WebSocket has pings instead).
    idle_timeout: float = 300
    # Seconds the client may leave the server's output unread.
    slow_client_timeout: float = 30


class AddressCounts:
    """Open client connections per network address, over every listener of this instance."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._open: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        count = self._open.get(address, 0)
        if self._most and count >= self._most:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)


class _PendingReply:
    """A pipelined frame's place in the order of replies."""

    __slots__ = ("request_id", "encoding", "reply")

    def __init__(self, request_id: str | None, encoding: str) -> None:
        self.request_id = request_id
        self.encoding = encoding
        # `_send` arguments once answered ((None,): no reply).
        self.reply: tuple | None = None


@implementer(IPushProducer)
class ClientConnection:
    log = Logger()
    # Thousands are open at once, most of them idle: no per-instance __dict__.
    __slots__ = (
        "identity", "_core", "_transport_name", "_write", "_pause_reading", "_resume_reading",
        "_max_frame_bytes", "_push_encoding", "_backlog", "_busy", "_paused", "_open", "_draining",
        "_idle_waiters", "_in_flight", "_slot", "_replies", "_answered_waiter", "address", "_close", "_limits", "_clock",
        "opened_at", "last_heard", "stalled_since", "_stalled_bytes", "_max_stalled_bytes",
    )

    def __init__(
        self,
        core: Core,
        transport_name: str,
        write: Callable[[bytes, str], None],
        pause_reading: Callable[[], None],
        resume_reading: Callable[[], None],
        max_frame_bytes: int,
        address: str,
        close: Callable[[], None],
        limits: ConnectionLimits,
        clock: IReactorTime,
    ) -> None:
        """`close` drops the connection at once; the client's address is for limits, and reaches
        the log only with --log-client-addresses (construct.logs withholds it otherwise)."""
        self.identity: Identity | None = None
        self.address = address
        self._close = close
        self._limits = limits
        self._clock = clock
        self.opened_at = self.last_heard = clock.seconds()
        # When the transport last asked us to stop writing (the client is not reading), if it still does.
        self.stalled_since: float | None = None
        self._stalled_bytes = 0
        self._max_stalled_bytes = max(MIN_STALLED_BYTES, 8 * max_frame_bytes)
        self._core = core
        self._transport_name = transport_name
        self._write = write
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._max_frame_bytes = max_frame_bytes
        self._push_encoding = codec.JSON
        # A list, not a deque: an empty deque costs over 500 bytes, and the backlog stays short.
        self._backlog: list[tuple[bytes, str]] = []
        self._busy = False
        self._paused = False
        self._open = True
        self._draining = False
        self._idle_waiters: list[Deferred] = []
        self._in_flight = 0
        self._slot: Deferred | None = None
        # The pipelined frames started and not yet answered, in frame order: replies go out
        # from the front as they are ready, so they keep the order of the frames.
        self._replies: list[_PendingReply] = []
        # Fires once every pipelined frame has been answered, for a frame that must wait.
        self._answered_waiter: Deferred | None = None
        core.metrics.connection_opened(transport_name)

    # Transport side

    def frame_received(self, data: bytes, encoding: str) -> None:
        if not self._open:
            return
        self.last_heard = self._clock.seconds()
        if self._draining:
            # Nothing was done with it: the client resends after reconnecting elsewhere.
            self._send_error(
                ConstructError("SERVICE_UNAVAILABLE", "The server is shutting down", 503),
                codec.request_id_of(data, encoding),
                encoding,
            )
            return
        self._push_encoding = encoding
        if len(data) > self._max_frame_bytes:
            self._send_error(
                ConstructError("MESSAGE_TOO_LARGE", f"Frames are limited to {self._max_frame_bytes} bytes", 413),
                None,
                encoding,
            )
            return
        self._backlog.append((data, encoding))
        if len(self._backlog) >= PAUSE_BACKLOG and not self._paused:
            self._paused = True
            self._update_reading()
        if not self._busy:
            self._busy = True
            ensureDeferred(self._process_backlog())

    def frame_too_large(self, encoding: str) -> None:
        """The transport dropped an oversize frame unread."""
        self._send_error(
            ConstructError("MESSAGE_TOO_LARGE", f"Frames are limited to {self._max_frame_bytes} bytes", 413),
            None,
            encoding,
        )

    def drain(self) -> Deferred:
        """Stop taking frames; fires once those already received have been answered."""
        self._draining = True
        if not self._paused:
            self._paused = True
            self._update_reading()
        if not self._busy and not self._in_flight:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def connection_lost(self) -> None:
        if self._open:
            self._open = False
            self._backlog.clear()
            self.unbind()
            self._core.metrics.connection_closed(self._transport_name)

    def overdue(self, now: float, pings: bool) -> str | None:
        """Why this connection must go now, if it must: the sweep of its tracker asks."""
        limits = self._limits
        if self.stalled_since is not None and limits.slow_client_timeout and now - self.stalled_since > limits.slow_client_timeout:
            return STOPPED_READING
        if self.identity is None and limits.auth_timeout and now - self.opened_at > limits.auth_timeout:
            return AUTH_TIMEOUT
        if not pings and limits.idle_timeout and now - self.last_heard > limits.idle_timeout:
            return IDLE
        return None

    def send_error(self, error: ConstructError) -> None:
        """An error that answers no request (the connection is about to close)."""
        self._send_error(error, None, self._push_encoding)

    # IPushProducer, registered with the transport: it pauses us when the client stops reading.

    def pauseProducing(self) -> None:
        """Take no more requests until the client reads what it has been sent."""
        if self.stalled_since is None:
            self.stalled_since = self._clock.seconds()
            self._stalled_bytes = 0
            self._update_reading()

    def resumeProducing(self) -> None:
        if self.stalled_since is not None:
            self.stalled_since = None
            self._update_reading()
            if self.identity is not None:
                self._core.hub.resume(self)

    @property
    def writable(self) -> bool:
        """For the hub: False while the client leaves what it was sent unread."""
        return self.stalled_since is None

    def stopProducing(self) -> None:
        pass

    def _update_reading(self) -> None:
        """Read the socket unless the backlog is full, a drain started, or the client is not reading."""
        if self._paused or self.stalled_since is not None:
            self._pause_reading()
        else:
            self._resume_reading()

    # Client protocol for operations

    def bind(self, identity: Identity) -> None:
        most = self._limits.per_user
        rebinding = self.identity is not None and self.identity.user_id == identity.user_id
        if most and not rebinding and self._core.hub.connection_count(identity.user_id) >= most:
            raise rate_limited(CONNECTION_RETRY_SECONDS, f"At most {most} connections per user")
        self.identity = identity
        self._core.hub.attach(self, identity.user_id, identity.token_hash)
        self.log.info(
            "user {user} authenticated on a {transport} connection from {client}",
            user=self._core.log_id(identity.user_id),
            transport=self._transport_name,
            # Withheld by construct.logs unless --log-client-addresses.
            client=self.address,
        )

    def unbind(self) -> None:
        self.identity = None
        self._core.hub.detach(self)

    # LiveConnection protocol for the delivery hub

    def push_message(self, message: dict) -> None:
        self._send("message", message, None, self._push_encoding)

    def session_revoked(self, reason: str | None = None) -> None:
        self.identity = None
        self._send("sessionExpired", {"reason": reason} if reason else None, None, self._push_encoding)

    # Internals

    async def _process_backlog(self) -> None:
        try:
            while self._backlog and self._open:
                data, encoding = self._backlog.pop(0)
                if self._paused and not self._draining and len(self._backlog) <= RESUME_BACKLOG:
                    self._paused = False
                    self._update_reading()
                try:
                    frame = codec.decode(data, encoding)
                except codec.FrameError as e:
                    await self._all_answered()
                    self._send_error(e, e.request_id, encoding)
                    continue
                if frame.type in PIPELINED and self.identity is not None:
                    while self._in_flight >= MAX_IN_FLIGHT:
                        self._slot = Deferred()
                        await self._slot
                    pending = _PendingReply(frame.request_id, encoding)
                    self._replies.append(pending)
                    self._in_flight += 1
                    operations.start(self._core, self, frame.type, frame.payload).addBoth(self._pipelined_outcome, pending)
                else:
                    await self._all_answered()
                    try:
                        reply = await operations.run(self._core, self, frame.type, frame.payload)
                    except Exception:
                        reply = Failure()
                    self._send_reply(self._reply_to(reply, frame.request_id, encoding))
        finally:
            self._busy = False
            self._notify_if_idle()

    def _all_answered(self) -> Deferred:
        """Fires once every frame before the current one has been answered."""
        if not self._replies:
            return succeed(None)
        if self._answered_waiter is None:
            self._answered_waiter = Deferred()
        return self._answered_waiter

    def _pipelined_outcome(self, result: Any, pending: "_PendingReply") -> None:
        """A pipelined frame is answered: send every reply now ready at the front, in frame order."""
        try:
            try:
                pending.reply = self._reply_to(result, pending.request_id, pending.encoding)
            except Exception:
                self.log.failure("could not answer a pipelined frame")
                pending.reply = (None,)
            replies = self._replies
            while replies and replies[0].reply is not None:
                reply = replies.pop(0).reply
                try:
                    self._send_reply(reply)
                except Exception:
                    # One reply that cannot go out must not hold back the ones after it.
                    self.log.failure("could not send the reply to a pipelined frame")
        finally:
            self._in_flight -= 1
            if not self._replies and self._answered_waiter is not None:
                waiter, self._answered_waiter = self._answered_waiter, None
                waiter.callback(None)
            if self._slot is not None and not self._slot.called:
                self._slot.callback(None)
            self._notify_if_idle()

    def _notify_if_idle(self) -> None:
        if not self._busy and not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _reply_to(self, result: Any, request_id: str | None, encoding: str) -> tuple:
        """The reply to a frame as `_send` arguments ((None,) for none): an operation's Reply,
        None, or its Failure, which is answered with an error."""
        if not isinstance(result, Failure):
            return (None,) if result is None else (result.type, result.payload, request_id, encoding)
        if result.check(ConstructError):
            error = result.value
        else:
            self.log.failure("operation failed on a {transport} connection", result, transport=self._transport_name)
            error = ConstructError("SERVER_ERROR", "Internal server error", 500)
        self._core.metrics.error(error.code)
        return "error", error.payload(), request_id, encoding

    def _send_reply(self, reply: tuple) -> None:
        if reply[0] is not None:
            self._send(*reply)

    def _send_error(self, error: ConstructError, request_id: str | None, encoding: str) -> None:
        self._core.metrics.error(error.code)
        self._send("error", error.payload(), request_id, encoding)

    def _send(self, message_type: str, payload: dict | None, request_id: str | None, encoding: str) -> None:
        if not self._open:
            return
        data = codec.encode(message_type, payload, request_id, encoding)
        if self.stalled_since is not None:
            # The hub holds pushes back meanwhile; replies to requests read before the stall
            # (and a client that stalls forever) are bounded here.
            self._stalled_bytes += len(data)
            if self._stalled_bytes > self._max_stalled_bytes:
                self.log.info("dropping a {transport} connection whose client stopped reading", transport=self._transport_name)
                self.connection_lost()
                self._close()
                return
        self._write(data, encoding)


class ConnectionTracker:
    """The live connections of one listener, so a shutdown can drain and close them."""

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._protocols: set[Any] = set()

    def add(self, protocol: Any) -> None:
        self._protocols.add(protocol)

    def discard(self, protocol: Any) -> None:
        self._protocols.discard(protocol)

    def __len__(self) -> int:
        return len(self._protocols)

    async def shutdown(self, timeout: float) -> None:
        """Finish what each connection already sent, close it politely, abort stragglers."""
        closing = [
            ensureDeferred(protocol.shutdown()).addErrback(self._shutdown_failed) for protocol in list(self._protocols)
        ]
        if not closing:
            return
        self.log.info("closing {count} connections", count=len(closing))
        done = DeferredList(closing, consumeErrors=True)
        timer = self._clock.callLater(timeout, done.cancel)
        await done
        if timer.active():
            timer.cancel()
        for protocol in list(self._protocols):
            protocol.abort()

    async def sweep(self) -> None:
        """Close the connections that outstayed a limit (see ClientConnection.overdue)."""
        now = self._clock.seconds()
        for protocol in list(self._protocols):
            reason = protocol.overdue(now)
            if reason is None:
                continue
            self.log.info("closing a connection: {reason}", reason=reason)
            if reason == STOPPED_READING:
                protocol.abort()  # a goodbye would wait behind what it does not read
            else:
                protocol.expire(reason)

    def _shutdown_failed(self, failure: Any) -> None:
        if not failure.check(CancelledError):
            self.log.failure("closing a connection failed", failure)
