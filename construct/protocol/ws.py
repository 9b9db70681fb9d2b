"""WebSocket adapter (Autobahn): binary frames carry MessagePack, text frames JSON."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from construct.core.app import Core
from construct.protocol import codec
from construct.protocol.writes import CoalescedWrites, TurnWriter, share_log_prefix
from construct.protocol.connection import AddressCounts, ClientConnection, ConnectionTracker, client_address
from construct.protocol.timeouts import MESSAGE_TIMEOUT, ConnectionLimits, closing_error
from construct.protocol.padding import pad

GOING_AWAY = 1001
POLICY_VIOLATION = 1008
HANDSHAKE_LEFTOVERS = (
    "http_request_data", "http_response_data", "http_headers", "http_request_params", "http_status_line", "_wskey",
)

# Messages above the protocol limit but within this cap are read and answered with
# MESSAGE_TOO_LARGE; past it Autobahn closes the connection (1009) instead of buffering more.
# Fixed: it bounds what one connection can make this process hold, whatever --max-message-bytes.
MAX_MESSAGE_BYTES = 1 << 20
# What a message still arriving holds beyond its bytes: per frame (its header, its list of
# chunks) and per chunk read (a bytes object and its place in a list). Counted so that a message
# sent in tiny fragments or reads cannot hold many times its size unseen.
FRAME_OVERHEAD_BYTES = 256
CHUNK_OVERHEAD_BYTES = 64
DEFAULT_UNFINISHED_BUDGET_BYTES = 32 * 2**20
# "Try again later": the server has no room for the message now.
TRY_AGAIN_LATER = 1013
NO_MASK = bytes(4)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """A client frame's payload, unmasked (one big-integer XOR: a C loop over the bytes)."""
    if mask == NO_MASK:
        return payload
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def server_frame(payload: bytes, binary: bool) -> bytes:
    """One unfragmented, unmasked data frame."""
    size = len(payload)
    opcode = 0x82 if binary else 0x81
    if size < 126:
        return bytes((opcode, size)) + payload
    if size < 1 << 16:
        return bytes((opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((opcode, 127)) + size.to_bytes(8, "big") + payload


class UnfinishedBudget:
    """The bytes that messages still arriving hold, over every WebSocket of this process: past
    `most`, the connection whose message would grow is closed (1013), so many connections that
    each start a large message and never finish it cannot fill the memory together."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.held = 0

    def take(self, size: int) -> bool:
        """Count `size` more; False (counting nothing) if that would pass the budget."""
        if self.most and self.held + size > self.most:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class SendQueue(list):
    """Autobahn's send queue (for synchronous and chopped sends) as a list: an empty deque costs
    over 600 bytes on every connection, and the queue is almost never used."""

    def popleft(self) -> Any:
        return self.pop(0)


class _NobodyWaits:
    """A future that Autobahn resolves and nothing here waits on."""

    def callback(self, result: Any) -> None:
        pass


NOBODY_WAITS = _NobodyWaits()
# Autobahn counts traffic on every connection; nothing reads the counts, so all share one.
UNREAD_STATISTICS = TrafficStats()


class FastFrames(CoalescedWrites):
    """The common frames of an open connection without Autobahn's per-frame machinery.

    Autobahn runs a state machine per frame (a frame header object, a new C XOR masker, a
    message object and callbacks) and formats a debug line per read and write: together more
    than the rest of relaying a small message. Nearly every frame a client sends is a whole,
    masked, unfragmented text or binary frame, usually several in one read: those are unmasked
    and handed to `onMessage` here. At the first frame that is anything else (a control frame,
    a fragment, reserved bits, a length over the limit or not minimally encoded, text that is
    not UTF-8, or a frame not yet complete) the rest of the bytes go to Autobahn, which handles
    them as it always does, from a frame boundary. Replies go out as one unfragmented frame,
    written with the turn's others, straight to the socket (construct.protocol.writes).
    """

    def dataReceived(self, data: bytes) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN or self.current_frame is not None or self.inside_message:
            self._dataReceived(data)
            return
        if self.data:
            data, self.data = self.data + data, b""
        start, end, most = 0, len(data), self.maxMessagePayloadSize
        while end - start >= 6:
            first, second = data[start], data[start + 1]
            opcode, size = first & 0x0F, second & 0x7F
            # FIN set, no reserved bits, a data frame (text or binary), masked.
            if first & 0xF0 != 0x80 or opcode not in (1, 2) or not second & 0x80:
                break
            head = start + 2
            if size == 126:
                size = int.from_bytes(data[head:head + 2], "big")
                head += 2
                if size < 126:
                    break
            elif size == 127:
                size = int.from_bytes(data[head:head + 8], "big")
                head += 8
                if size < 1 << 16:
                    break
            if (most and size > most) or end < head + 4 + size:
                break
            payload = unmask(data[head + 4:head + 4 + size], data[head:head + 4])
            if opcode == 1:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break
            start = head + 4 + size
            self.onMessage(payload, opcode == 2)
            if self.state != WebSocketProtocol.STATE_OPEN:
                return
        if start < end:
            self._dataReceived(data[start:] if start else data)

    def send_message(self, payload: bytes, binary: bool) -> None:
        """`sendMessage` for an open connection: one frame, out with the turn's others."""
        if self.send_queue:
            self.flush_writes()
            self.sendMessage(payload, isBinary=binary)
            return
        self.write_soon(server_frame(payload, binary))

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's own writes (handshake, control frames, close), after what this turn wrote
        before them, and without Autobahn's debug line."""
        self.flush_writes()
        if sync or chopsize or self.send_queue or self.state != WebSocketProtocol.STATE_OPEN:
            super().sendData(data, sync, chopsize)
            return
        self.transport.write(data)


class ConstructWebSocketProtocol(FastFrames, WebSocketServerProtocol):
    # Autobahn owns `log`.
    _log = Logger()
    connection: ClientConnection | None = None
    _closed: Deferred | None = None
    # The client address counted against its limit.
    _address: str | None = None
    # What the message still arriving holds of the factory's UnfinishedBudget, and since when.
    _unfinished_bytes = 0
    _unfinished_since: float | None = None

    def connectionMade(self) -> None:
        # The site's channel counted this socket against its address as it accepted it
        # (construct.http.site); the socket now closes through this protocol, which releases
        # the count. The transport's peer: behind a PROXY-protocol endpoint, the client's own.
        self._address = client_address(self.transport.getPeer())
        super().connectionMade()

    def onOpen(self) -> None:
        try:
            self._slim_down()
            factory = self.factory
            factory.tracker.add(self)
            self.connection = ClientConnection(
                factory.core, "websocket", self, factory.max_frame_bytes, self._address, factory.limits, factory.clock
            )
            self.transport.registerProducer(self.connection, True)
        except Exception:
            self._log.failure("could not set up a WebSocket connection")
            self.dropConnection(abort=True)

    def _slim_down(self) -> None:
        """Let go of what Autobahn keeps per connection that an open one of ours does not use:
        the opening handshake's text (over 1 KB), traffic statistics nobody reads, a send queue
        only synchronous sends use (a deque is over 600 bytes empty), and the futures of the
        open and the close, which nobody waits on here (Autobahn still resolves them)."""
        for name in HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        share_log_prefix(self.transport, "construct-websocket")
        self.trafficStats = UNREAD_STATISTICS
        self.send_queue = SendQueue()
        self.is_open = self.is_closed = NOBODY_WAITS

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            if self.connection is not None:
                self.connection.frame_received(payload, codec.MSGPACK if isBinary else codec.JSON)
        except Exception:
            self._log.failure("unexpected error handling a WebSocket frame")

    # Autobahn's hooks for a message that does not arrive whole in one read (FastFrames hands
    # whole frames over without them): what it holds is counted until the message ends.

    def onMessageFrameBegin(self, length: int) -> None:
        self._hold(FRAME_OVERHEAD_BYTES)
        super().onMessageFrameBegin(length)

    def onMessageFrameData(self, payload: bytes) -> None:
        self._hold(len(payload) + CHUNK_OVERHEAD_BYTES)
        super().onMessageFrameData(payload)

    def onMessageEnd(self) -> None:
        self._let_go()
        super().onMessageEnd()

    def _hold(self, size: int) -> None:
        if self.failedByMe:
            return  # failing: Autobahn keeps nothing more
        if self._unfinished_since is None:
            self._unfinished_since = self.factory.clock.seconds()
        if self.factory.unfinished.take(size):
            self._unfinished_bytes += size
            return
        self._log.info("closing a WebSocket connection: its message would pass the budget for unfinished messages")
        self._give_up_message(TRY_AGAIN_LATER, "no room for an unfinished message now")

    def _let_go(self) -> None:
        if self._unfinished_bytes:
            self.factory.unfinished.give_back(self._unfinished_bytes)
            self._unfinished_bytes = 0
        self._unfinished_since = None

    def _give_up_message(self, code: int, reason: str) -> None:
        """Drop the message still arriving and fail the connection: nothing more it sends is kept."""
        self._let_go()
        self.message_data, self.frame_data = [], []
        self._fail_connection(code, reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self._let_go()
            self.factory.tracker.discard(self)
            if self._address is not None:
                self.factory.addresses.release(self._address)
                self._address = None
            if self.connection is not None:
                self.connection.connection_lost()
            if self._closed is not None and not self._closed.called:
                self._closed.callback(None)
        except Exception:
            self._log.failure("unexpected error closing a WebSocket connection")

    async def shutdown(self) -> None:
        """Answer what was received, then close with 1001 (going away)."""
        if self.connection is not None:
            await self.connection.drain()
        if self.state == WebSocketProtocol.STATE_CLOSED:
            return
        self._closed = Deferred()
        # sendClose only takes 1000 or application codes; 1001 is the one that says "going away".
        self.sendCloseFrame(code=GOING_AWAY, reasonUtf8=b"server shutting down", isReply=False)
        await self._closed

    # The connection's Transport (construct.protocol.connection)

    def abort(self) -> None:
        self.dropConnection(abort=True)

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    def overdue(self, now: float) -> str | None:
        """Why the tracker's sweep must close this connection now, if it must."""
        since, most = self._unfinished_since, self.factory.limits.message_timeout
        if since is not None and most and now - since > most:
            return MESSAGE_TIMEOUT
        # Autobahn's pings find dead peers: an idle WebSocket that answers them may stay.
        return None if self.connection is None else self.connection.overdue(now, pings=True)

    def expire(self, reason: str) -> None:
        """Say why, in an error and in the close frame (1008, policy violation)."""
        if self.connection is not None:
            self.connection.send_error(closing_error(reason))
        if reason == MESSAGE_TIMEOUT:
            self._give_up_message(POLICY_VIOLATION, reason)
        else:
            self.sendCloseFrame(code=POLICY_VIOLATION, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def write_frame(self, data: bytes, encoding: str) -> None:
        # A reply can be ready after Autobahn began failing the connection (invalid UTF-8, a
        # protocol error) and before onClose: there is no one left to read it.
        if self.state == WebSocketProtocol.STATE_OPEN:
            binary = encoding == codec.MSGPACK
            self.send_message(pad(data, binary) if self.factory.padding else data, binary)


class ConstructWebSocketFactory(WebSocketServerFactory):
    protocol = ConstructWebSocketProtocol

    def __init__(
        self,
        core: Core,
        max_frame_bytes: int,
        tracker: ConnectionTracker,
        addresses: AddressCounts,
        limits: ConnectionLimits,
        clock: Any,
        allowed_origins: list[str],
        padding: bool = False,
        unfinished_budget: int = DEFAULT_UNFINISHED_BUDGET_BYTES,
    ) -> None:
        """`padding`: every message sent padded to a size bucket (construct.protocol.padding);
        `unfinished_budget`: bytes the messages still arriving may hold together (0: no limit)."""
        super().__init__(server="Construct")
        self.noisy = False
        self.padding = padding
        self.core = core
        self.tracker = tracker
        self.addresses = addresses
        self.limits = limits
        self.clock = clock
        self.writer = TurnWriter(clock)
        self.max_frame_bytes = max_frame_bytes
        self.unfinished = UnfinishedBudget(unfinished_budget)
        # One call: setProtocolOptions resets allowNullOrigin unless it is passed again.
        # Compression stays off (Autobahn's default): it costs memory per connection and
        # leaks plaintext length (CRIME/BREACH-style) in mixed content.
        self.setProtocolOptions(
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            maxFramePayloadSize=MAX_MESSAGE_BYTES,
            autoPingInterval=30,
            autoPingTimeout=30,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            # No status page, so no `?redirect=` either.
            webStatus=False,
            failByDrop=False,
            # Browsers send an Origin; other clients do not, and the check leaves them alone.
            allowedOrigins=allowed_origins,
            allowNullOrigin=True,
        )
