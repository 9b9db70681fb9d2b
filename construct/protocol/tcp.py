"""Raw TCP adapter: one JSON object per \\n-terminated line."""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from construct.core.app import Core
from construct.protocol import codec
from construct.protocol.connection import ClientConnection


class JsonLinesProtocol(Protocol):
    """Splits lines itself so an oversize line is skipped with an error, not a disconnect."""

    log = Logger()

    def __init__(self, core: Core, max_line_bytes: int) -> None:
        self._core = core
        self._max_line_bytes = max_line_bytes
        self._buffer = b""
        self._discarding = False
        self._connection: ClientConnection | None = None

    def connectionMade(self) -> None:
        try:
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
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
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
            if self._connection is not None:
                self._connection.connection_lost()
        except Exception:
            self.log.failure("unexpected error closing a TCP connection")

    def _write(self, data: bytes, encoding: str) -> None:
        self.transport.write(data + b"\n")


class JsonLinesFactory(Factory):
    noisy = False

    def __init__(self, core: Core, max_line_bytes: int) -> None:
        self.core = core
        self.max_line_bytes = max_line_bytes

    def buildProtocol(self, addr: object) -> JsonLinesProtocol:
        protocol = JsonLinesProtocol(self.core, self.max_line_bytes)
        protocol.factory = self
        return protocol
