"""Raw TCP adapter: one JSON object per \\n-terminated line."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from construct.core.app import Core
from construct.protocol import codec
from construct.protocol.connection import ClientConnection, ConnectionTracker


class JsonLinesProtocol(Protocol):
    """Splits lines itself so an oversize line is skipped with an error, not a disconnect."""

    log = Logger()

    def __init__(self, core: Core, max_line_bytes: int, tracker: ConnectionTracker) -> None:
        self._core = core
        self._max_line_bytes = max_line_bytes
        self._tracker = tracker
        self._buffer = b""
        self._discarding = False
        self._connection: ClientConnection | None = None
        self._closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        try:
            self._tracker.add(self)
            self._connection = ClientConnection(
                self._core,
                "tcp",
                self._write,
                self.transport.pauseProducing,
                self.transport.resumeProducing,
                self._max_line_bytes,
            )
        except Exception:
            self.log.failure("could not set up a TCP connection")
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            self._lines_received(data)
        except Exception:
            self.log.failure("unexpected error handling TCP data")

    def _lines_received(self, data: bytes) -> None:
        if self._connection is None:
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if self._discarding:
                self._discarding = False
                continue
            line = line.rstrip(b"\r")
            if line.strip():
                self._connection.frame_received(line, codec.JSON)
        if len(self._buffer) > self._max_line_bytes:
            # Drop the partial line now and the rest of it when its newline arrives.
            self._buffer = b""
            if not self._discarding:
                self._discarding = True
                self._connection.frame_too_large(codec.JSON)

    def connectionLost(self, reason: object = None) -> None:
        try:
            self._tracker.discard(self)
            if self._connection is not None:
                self._connection.connection_lost()
            if not self._closed.called:
                self._closed.callback(None)
        except Exception:
            self.log.failure("unexpected error closing a TCP connection")

    async def shutdown(self) -> None:
        """Answer what was received, flush, close."""
        if self._connection is not None:
            await self._connection.drain()
        self.transport.loseConnection()
        await self._closed

    def abort(self) -> None:
        self.transport.abortConnection()

    def _write(self, data: bytes, encoding: str) -> None:
        self.transport.write(data + b"\n")


class JsonLinesFactory(Factory):
    noisy = False

    def __init__(self, core: Core, max_line_bytes: int, tracker: ConnectionTracker) -> None:
        self.core = core
        self.max_line_bytes = max_line_bytes
        self.tracker = tracker

    def buildProtocol(self, addr: object) -> JsonLinesProtocol:
        protocol = JsonLinesProtocol(self.core, self.max_line_bytes, self.tracker)
        protocol.factory = self
        return protocol
