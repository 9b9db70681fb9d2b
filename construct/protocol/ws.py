"""WebSocket adapter (Autobahn): binary frames carry MessagePack, text frames JSON."""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from construct.core.app import Core
from construct.protocol import codec
from construct.protocol.connection import ClientConnection, ConnectionTracker

GOING_AWAY = 1001
HANDSHAKE_LEFTOVERS = (
    "http_request_data", "http_response_data", "http_headers", "http_request_params", "http_status_line", "_wskey",
)

# Frames above the protocol limit but below this many times it are read and answered with
# MESSAGE_TOO_LARGE; past it Autobahn closes the connection (1009) instead of buffering more.
HARD_LIMIT_FACTOR = 4


class QuietFrames:
    """Autobahn's per-read and per-write paths without their debug lines.

    Autobahn formats the arguments of a debug log call (coloured type names, via `hltype`) on
    every read and every write, logging on or off: about a sixth of what a small frame costs.
    These are the same methods minus that call; anything unusual goes to Autobahn's own.
    """

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue or self.state != WebSocketProtocol.STATE_OPEN:
            super().sendData(data, sync, chopsize)
            return
        self.transport.write(data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)


class ConstructWebSocketProtocol(QuietFrames, WebSocketServerProtocol):
    # Autobahn owns `log`.
    _log = Logger()
    _connection: ClientConnection | None = None
    _closed: Deferred | None = None

    def onOpen(self) -> None:
        try:
            self._forget_handshake()
            self._closed = Deferred()
            self.factory.tracker.add(self)
            self._connection = ClientConnection(
                self.factory.core,
                "websocket",
                self._write,
                self.transport.pauseProducing,
                self.transport.resumeProducing,
                self.factory.max_frame_bytes,
            )
        except Exception:
            self._log.failure("could not set up a WebSocket connection")
            self.dropConnection(abort=True)

    def _forget_handshake(self) -> None:
        """Autobahn keeps the opening handshake's text for the connection's life: over 1 KB an
        idle connection does not need (nothing reads these after onConnect)."""
        for name in HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            if self._connection is not None:
                self._connection.frame_received(payload, codec.MSGPACK if isBinary else codec.JSON)
        except Exception:
            self._log.failure("unexpected error handling a WebSocket frame")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self.factory.tracker.discard(self)
            if self._connection is not None:
                self._connection.connection_lost()
            if self._closed is not None and not self._closed.called:
                self._closed.callback(None)
        except Exception:
            self._log.failure("unexpected error closing a WebSocket connection")

    async def shutdown(self) -> None:
        """Answer what was received, then close with 1001 (going away)."""
        if self._connection is not None:
            await self._connection.drain()
        # sendClose only takes 1000 or application codes; 1001 is the one that says "going away".
        self.sendCloseFrame(code=GOING_AWAY, reasonUtf8=b"server shutting down", isReply=False)
        await self._closed

    def abort(self) -> None:
        self.dropConnection(abort=True)

    def _write(self, data: bytes, encoding: str) -> None:
        self.sendMessage(data, isBinary=encoding == codec.MSGPACK)


class ConstructWebSocketFactory(WebSocketServerFactory):
    protocol = ConstructWebSocketProtocol

    def __init__(self, core: Core, max_frame_bytes: int, tracker: ConnectionTracker) -> None:
        super().__init__(server="Construct")
        self.noisy = False
        self.core = core
        self.tracker = tracker
        self.max_frame_bytes = max_frame_bytes
        # One call: setProtocolOptions resets allowNullOrigin unless it is passed again.
        self.setProtocolOptions(
            maxMessagePayloadSize=max_frame_bytes * HARD_LIMIT_FACTOR,
            maxFramePayloadSize=max_frame_bytes * HARD_LIMIT_FACTOR,
            autoPingInterval=30,
            autoPingTimeout=30,
            openHandshakeTimeout=10,
            webStatus=False,
            failByDrop=False,
            allowNullOrigin=True,
        )
