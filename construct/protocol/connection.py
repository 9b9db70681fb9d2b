"""One live client connection (WebSocket or TCP), independent of framing.

The transport hands over whole frames; this object decodes them, runs them in order (sends
may overlap, stored still in the order sent), writes the replies in the order of the frames,
and receives pushes from the delivery hub once the client is authenticated.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from construct.core.accounts import Identity
from construct.core.app import Core
from construct.errors import ConstructError
from construct.protocol import codec, operations

# Past this many frames waiting, stop reading the socket until the backlog shrinks.
PAUSE_BACKLOG = 32
RESUME_BACKLOG = 8
# Operations that may start before the frames ahead of them are answered: the core keeps one
# sender's stores in order, and the connection keeps replies in order.
PIPELINED = frozenset({"sendMessage"})
MAX_IN_FLIGHT = 32


class ClientConnection:
    log = Logger()
    # Thousands are open at once, most of them idle: no per-instance __dict__.
    __slots__ = (
        "identity", "_core", "_transport_name", "_write", "_pause_reading", "_resume_reading",
        "_max_frame_bytes", "_push_encoding", "_backlog", "_busy", "_paused", "_open", "_draining",
        "_idle_waiters", "_in_flight", "_slot", "_last_answered",
    )

    def __init__(
        self,
        core: Core,
        transport_name: str,
        write: Callable[[bytes, str], None],
        pause_reading: Callable[[], None],
        resume_reading: Callable[[], None],
        max_frame_bytes: int,
    ) -> None:
        self.identity: Identity | None = None
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
        # Fires once the latest frame started has been answered (None: all have been).
        self._last_answered: Deferred | None = None
        core.metrics.connection_opened(transport_name)

    # Transport side

    def frame_received(self, data: bytes, encoding: str) -> None:
        if not self._open:
            return
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
            self._pause_reading()
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
            self._pause_reading()
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

    # Client protocol for operations

    def bind(self, identity: Identity) -> None:
        self.identity = identity
        self._core.hub.attach(self, identity.user_id, identity.token_hash)
        self.log.info(
            "user {user} authenticated on a {transport} connection",
            user=self._core.log_id(identity.user_id),
            transport=self._transport_name,
        )

    def unbind(self) -> None:
        self.identity = None
        self._core.hub.detach(self)

    # LiveConnection protocol for the delivery hub

    def push_message(self, message: dict) -> None:
        self._send("message", message, None, self._push_encoding)

    def session_revoked(self) -> None:
        self.identity = None
        self._send("sessionExpired", None, None, self._push_encoding)

    # Internals

    async def _process_backlog(self) -> None:
        try:
            while self._backlog and self._open:
                data, encoding = self._backlog.pop(0)
                if self._paused and not self._draining and len(self._backlog) <= RESUME_BACKLOG:
                    self._paused = False
                    self._resume_reading()
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
                    answered: Deferred = Deferred()
                    previous, self._last_answered = self._last_answered, answered
                    self._in_flight += 1
                    ensureDeferred(self._run_pipelined(frame, encoding, previous, answered))
                else:
                    await self._all_answered()
                    reply = await self._outcome(frame, encoding)
                    if reply is not None:
                        self._send(*reply)
        finally:
            self._busy = False
            self._notify_if_idle()

    async def _all_answered(self) -> None:
        """Wait until every frame before the current one has been answered."""
        last, self._last_answered = self._last_answered, None
        if last is not None:
            await last

    async def _run_pipelined(self, frame: codec.Frame, encoding: str, previous: Deferred | None, answered: Deferred) -> None:
        """Run now, answer after the frame before: replies keep the order of the frames."""
        try:
            reply = await self._outcome(frame, encoding)
            if previous is not None:
                await previous
            if reply is not None:
                self._send(*reply)
        finally:
            self._in_flight -= 1
            if self._last_answered is answered:
                self._last_answered = None
            answered.callback(None)
            if self._slot is not None and not self._slot.called:
                self._slot.callback(None)
            self._notify_if_idle()

    def _notify_if_idle(self) -> None:
        if not self._busy and not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def _outcome(self, frame: codec.Frame, encoding: str) -> tuple | None:
        """The reply to a frame as `_send` arguments (None for none); an error is a reply too."""
        try:
            reply = await operations.run(self._core, self, frame.type, frame.payload)
            return None if reply is None else (reply.type, reply.payload, frame.request_id, encoding)
        except ConstructError as e:
            error = e
        except Exception:
            self.log.failure("operation failed on a {transport} connection", transport=self._transport_name)
            error = ConstructError("SERVER_ERROR", "Internal server error", 500)
        self._core.metrics.error(error.code)
        return "error", {"code": error.code, "message": error.message}, frame.request_id, encoding

    def _send_error(self, error: ConstructError, request_id: str | None, encoding: str) -> None:
        self._core.metrics.error(error.code)
        self._send("error", {"code": error.code, "message": error.message}, request_id, encoding)

    def _send(self, message_type: str, payload: dict | None, request_id: str | None, encoding: str) -> None:
        if self._open:
            self._write(codec.encode(message_type, payload, request_id, encoding), encoding)


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

    def _shutdown_failed(self, failure: Any) -> None:
        if not failure.check(CancelledError):
            self.log.failure("closing a connection failed", failure)
