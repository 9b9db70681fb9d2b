"""One live client connection (WebSocket or TCP), independent of framing.

The transport hands over whole frames; this object decodes them and runs them in order, and
receives pushes from the delivery hub once the client is authenticated. Its parts, each of
which can be read (and tested) on its own:

- the order of replies (construct.protocol.replies): sends and acks may overlap (PIPELINED),
  every other frame runs alone, and replies go out in the order of the frames;
- backpressure both ways (construct.protocol.backpressure);
- the timeouts a sweep closes it for (construct.protocol.timeouts);
- binding to a user: `bind`/`unbind`, and the pushes of the delivery hub.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from construct.core.accounts import Identity
from construct.core.app import Core
from construct.core.limits import Allowance
from construct.errors import ConstructError, rate_limited, server_busy
from construct.protocol import codec, operations
from construct.protocol.backpressure import PAUSE_BACKLOG, Backpressure
from construct.protocol.replies import NO_REPLY, Place, ReplyOrder
from construct.protocol.timeouts import STOPPED_READING, ConnectionLimits, overdue

# Operations that may start before the frames ahead of them are answered: the core keeps one
# sender's stores in order, and the reply order keeps replies in order. Sealed sends need no
# session, so they are pipelined on any connection.
PIPELINED = frozenset({"sendMessage", "ackMessage", "sendSealed"})
SEALED_SEND = "sendSealed"
# Sends shed while the process is behind (construct.core.admission).
SENDS = frozenset({"sendMessage", SEALED_SEND})
MAX_IN_FLIGHT = 32
SERVER_BUSY = server_busy()
# A client told to wait for a free connection slot is told to retry after this long.
CONNECTION_RETRY_SECONDS = 10


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


class Transport(TypingProtocol):
    """What a connection needs of the framing adapter that owns its socket (ws.py, tcp.py)."""

    def write_frame(self, data: bytes, encoding: str) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection at once."""


@implementer(IPushProducer)
class ClientConnection:
    log = Logger()
    # Thousands are open at once, most of them idle: no per-instance __dict__, and the parts an
    # idle connection does not use (reply order, backpressure, drain waiters) made when first needed.
    __slots__ = (
        "identity", "address", "opened_at", "last_heard", "_core", "_transport_name", "_transport", "_limits",
        "_clock", "_max_frame_bytes", "_push_encoding", "_backlog", "_running", "_alone", "_in_flight", "_open",
        "_draining", "_idle_waiters", "_reply_order", "_backpressure", "_sealed_allowance",
    )

    def __init__(
        self,
        core: Core,
        transport_name: str,
        transport: Transport,
        max_frame_bytes: int,
        address: str,
        limits: ConnectionLimits,
        clock: IReactorTime,
    ) -> None:
        """The client's address is for limits, and reaches the log only with
        --log-client-addresses (construct.logs withholds it otherwise)."""
        self.identity: Identity | None = None
        self.address = address
        self.opened_at = self.last_heard = clock.seconds()
        self._core = core
        self._transport_name = transport_name
        self._transport = transport
        self._limits = limits
        self._clock = clock
        self._max_frame_bytes = max_frame_bytes
        self._push_encoding = codec.JSON
        # Frames received and not yet started. A list: an empty deque costs over 500 bytes.
        self._backlog: list[tuple[bytes, str]] = []
        self._running = False
        # A frame that runs alone has started (or waits for the ones before it to be answered).
        self._alone = False
        self._in_flight = 0
        self._open = True
        self._draining = False
        self._idle_waiters: list[Deferred] | None = None
        self._reply_order: ReplyOrder | None = None
        self._backpressure: Backpressure | None = None
        self._sealed_allowance: Allowance | None = None
        core.metrics.connection_opened(transport_name)

    @property
    def sealed_allowance(self) -> Allowance:
        """The count of this connection's sealed sends (construct.core.abuse)."""
        if self._sealed_allowance is None:
            self._sealed_allowance = Allowance()
        return self._sealed_allowance

    @property
    def _replies(self) -> ReplyOrder:
        if self._reply_order is None:
            self._reply_order = ReplyOrder(self._send)
        return self._reply_order

    @property
    def _flow(self) -> Backpressure:
        if self._backpressure is None:
            self._backpressure = Backpressure(self._transport, self._max_frame_bytes, self._clock)
        return self._backpressure

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
            self.frame_too_large(encoding)
            return
        self._backlog.append((data, encoding))
        self._run_backlog()

    def frame_too_large(self, encoding: str) -> None:
        """The transport dropped an oversize frame unread (or this one is)."""
        self._send_error(
            ConstructError("MESSAGE_TOO_LARGE", f"Frames are limited to {self._max_frame_bytes} bytes", 413),
            None,
            encoding,
        )

    def drain(self) -> Deferred:
        """Take no new frames; fires once those already received have been answered. The
        transport goes on reading, so the client's side of a closing handshake is read."""
        self._draining = True
        if not self._busy():
            return succeed(None)
        waiter: Deferred = Deferred()
        if self._idle_waiters is None:
            self._idle_waiters = []
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
        stalled_since = None if self._backpressure is None else self._backpressure.stalled_since
        return overdue(self._limits, now, self.opened_at, self.last_heard, self.identity is not None, stalled_since, pings)

    def send_error(self, error: ConstructError) -> None:
        """An error that answers no request (the connection is about to close)."""
        self._send_error(error, None, self._push_encoding)

    # IPushProducer, registered with the transport: it pauses us when the client stops reading.

    def pauseProducing(self) -> None:
        """Take no more requests until the client reads what it has been sent."""
        self._flow.stalled()

    def resumeProducing(self) -> None:
        if self._backpressure is not None and self._backpressure.unstalled() and self.identity is not None:
            self._core.hub.resume(self)

    def stopProducing(self) -> None:
        pass

    @property
    def writable(self) -> bool:
        """For the hub: False while the client leaves what it was sent unread."""
        return self._backpressure is None or self._backpressure.writable

    # Binding, and the LiveConnection protocol of the delivery hub

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

    def push_message(self, message: dict) -> None:
        self._send("message", message, None, self._push_encoding)

    def session_revoked(self, reason: str | None = None) -> None:
        self.identity = None
        self._send("sessionExpired", {"reason": reason} if reason else None, None, self._push_encoding)

    # Running frames, in order

    def _busy(self) -> bool:
        return bool(self._backlog or self._in_flight or self._alone)

    def _run_backlog(self) -> None:
        """Start the frames received, in order, as far as each may start now: a pipelined one
        while fewer than MAX_IN_FLIGHT are, any other once every frame before it is answered
        (and the next one only once it is). Called again whenever that may have changed."""
        if self._running:
            return
        self._running = True
        backlog = self._backlog
        try:
            while backlog and self._open and not self._alone:
                data, encoding = backlog[0]
                try:
                    frame: Any = codec.decode(data, encoding)
                except codec.FrameError as e:
                    frame = e
                if not isinstance(frame, codec.FrameError) and frame.type in PIPELINED and (
                    self.identity is not None or frame.type == SEALED_SEND
                ):
                    if self._in_flight >= MAX_IN_FLIGHT:
                        break
                    backlog.pop(0)
                    self._start(frame, encoding)
                else:
                    backlog.pop(0)
                    self._alone = True
                    if self._reply_order is None or not self._reply_order.waiting:
                        self._run_alone(None, frame, encoding)
                    else:
                        self._reply_order.all_answered().addCallback(self._run_alone, frame, encoding)
        finally:
            self._running = False
            if self._backpressure is not None or len(backlog) >= PAUSE_BACKLOG:
                self._flow.backlog(len(backlog))
        self._notify_if_idle()

    def _start(self, frame: codec.Frame, encoding: str) -> None:
        place = self._replies.take(frame.request_id, encoding)
        if frame.type in SENDS and self._core.admission.busy:
            # Shedding must cost a small fraction of taking a send (construct.core.admission):
            # the refusal goes in its place at once, with no operation, Deferred or Failure.
            self._core.metrics.error(SERVER_BUSY.code)
            self._replies.answer(place, ("error", SERVER_BUSY.payload(), frame.request_id, encoding))
            return
        self._in_flight += 1
        operations.start(self._core, self, frame.type, frame.payload).addBoth(self._pipelined_answered, place)

    def _pipelined_answered(self, result: Any, place: Place) -> None:
        try:
            reply = self._reply_to(result, place.request_id, place.encoding)
        except Exception:
            self.log.failure("could not answer a pipelined frame")
            reply = NO_REPLY
        self._in_flight -= 1
        self._replies.answer(place, reply)
        self._run_backlog()

    def _run_alone(self, _: None, frame: Any, encoding: str) -> None:
        if not self._open:
            self._alone = False
            return
        if isinstance(frame, codec.FrameError):
            self._alone_answered(Failure(frame), frame.request_id, encoding)
            return
        try:
            running = ensureDeferred(operations.run(self._core, self, frame.type, frame.payload))
        except Exception:
            running = Deferred()
            running.errback()
        running.addBoth(self._alone_answered, frame.request_id, encoding)

    def _alone_answered(self, result: Any, request_id: str | None, encoding: str) -> None:
        try:
            reply = self._reply_to(result, request_id, encoding)
            if reply[0] is not None:
                self._send(*reply)
        except Exception:
            self.log.failure("could not answer a frame")
        finally:
            self._alone = False
            self._run_backlog()

    def _notify_if_idle(self) -> None:
        if self._idle_waiters and not self._busy():
            waiters, self._idle_waiters = self._idle_waiters, None
            for waiter in waiters:
                waiter.callback(None)

    def _reply_to(self, result: Any, request_id: str | None, encoding: str) -> tuple:
        """The reply to a frame as `_send` arguments (NO_REPLY for none): an operation's Reply,
        None, or its Failure, which is answered with an error."""
        if not isinstance(result, Failure):
            return NO_REPLY if result is None else (result.type, result.payload, request_id, encoding)
        if result.check(ConstructError):
            error = result.value
        else:
            self.log.failure("operation failed on a {transport} connection", result, transport=self._transport_name)
            error = ConstructError("SERVER_ERROR", "Internal server error", 500)
        self._core.metrics.error(error.code)
        return "error", error.payload(), request_id, encoding

    def _send_error(self, error: ConstructError, request_id: str | None, encoding: str) -> None:
        self._core.metrics.error(error.code)
        self._send("error", error.payload(), request_id, encoding)

    def _send(self, message_type: str, payload: dict | None, request_id: str | None, encoding: str) -> None:
        if not self._open:
            return
        data = codec.encode(message_type, payload, request_id, encoding)
        # The hub holds pushes back while the client is not reading; replies to requests read
        # before that (and a client that stops reading for good) are bounded here.
        if self._backpressure is not None and self._backpressure.over_allowance(len(data)):
            self.log.info("dropping a {transport} connection whose client stopped reading", transport=self._transport_name)
            self.connection_lost()
            self._transport.abort()
            return
        self._transport.write_frame(data, encoding)


class ConnectionTracker:
    """The live connections of one listener, so a shutdown can drain and close them."""

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._protocols: set[Any] = set()
        # Told to go by the last sweep: a polite close waits for its goodbye to be read.
        self._expired: set[Any] = set()

    def add(self, protocol: Any) -> None:
        self._protocols.add(protocol)

    def discard(self, protocol: Any) -> None:
        self._protocols.discard(protocol)
        self._expired.discard(protocol)

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
        # A client that has not read its goodbye in a whole sweep interval never will.
        unread, self._expired = self._expired, set()
        for protocol in unread:
            self.log.info("closing a connection: {reason}", reason=STOPPED_READING)
            protocol.abort()
        for protocol in list(self._protocols - unread):
            reason = protocol.overdue(now)
            if reason is None:
                continue
            self.log.info("closing a connection: {reason}", reason=reason)
            if reason == STOPPED_READING:
                protocol.abort()  # a goodbye would wait behind what it does not read
            else:
                protocol.expire(reason)
                self._expired.add(protocol)

    def _shutdown_failed(self, failure: Any) -> None:
        if not failure.check(CancelledError):
            self.log.failure("closing a connection failed", failure)
