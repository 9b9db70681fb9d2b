"""Raw TCP adapter: one JSON object per \\n-terminated line."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from construct.core.app import Core
from construct.errors import rate_limited
from construct.protocol import codec
from construct.protocol.writes import CoalescedWrites, TurnWriter, share_log_prefix
from construct.protocol.connection import (
    CONNECTION_RETRY_SECONDS,
    AddressCounts,
    ClientConnection,
    ConnectionTracker,
    client_address,
)
from construct.protocol.timeouts import AUTH_TIMEOUT, ConnectionLimits, closing_error


class JsonLinesProtocol(CoalescedWrites, Protocol):
    """Splits lines itself so an oversize line is skipped with an error, not a disconnect."""

    log = Logger()

    def __init__(self, factory: "JsonLinesFactory") -> None:
        self.factory = factory
        self._buffer = b""
        self._discarding = False
        self.connection: ClientConnection | None = None
        # Made only when a shutdown waits for the close (a Deferred on every connection is 280 bytes).
        self._closed: Deferred | None = None
        self._lost = False
        self._opened_at = 0.0
        self._refused = False

    def connectionMade(self) -> None:
        try:
            share_log_prefix(self.transport, "construct-tcp")
            self.factory.tracker.add(self)
            self._opened_at = self.factory.clock.seconds()
            if not self.factory.proxied:
                # Counted at once, so silent sockets count against their address too.
                self._start()
        except Exception:
            self.log.failure("could not set up a TCP connection")
            self.transport.abortConnection()

    def _start(self) -> bool:
        """Admit the client: on connecting, or behind a PROXY-protocol endpoint (haproxy:…) on
        its first bytes, since only then does getPeer() give the client's address, not the proxy's."""
        factory = self.factory
        address = client_address(self.transport.getPeer())
        if not factory.addresses.admit(address):
            error = rate_limited(CONNECTION_RETRY_SECONDS, f"At most {factory.limits.per_address} connections per address")
            self.transport.write(codec.encode("error", error.payload(), None, codec.JSON) + b"\n")
            self.transport.loseConnection()
            self._refused = True
            return False
        self.connection = ClientConnection(
            factory.core, "tcp", self, factory.max_line_bytes, address, factory.limits, factory.clock
        )
        self.transport.registerProducer(self.connection, True)
        return True

    def overdue(self, now: float) -> str | None:
        """Why the tracker's sweep must close this connection now, if it must."""
        if self.connection is not None:
            # No keepalive of its own: a silent TCP connection is closed after the idle timeout.
            return self.connection.overdue(now, pings=False)
        if not self._refused and now - self._opened_at > self.factory.limits.auth_timeout > 0:
            return AUTH_TIMEOUT
        return None

    def expire(self, reason: str) -> None:
        """Say why, then close once that is written."""
        error = closing_error(reason)
        if self.connection is not None:
            self.connection.send_error(error)
        else:
            self.transport.write(codec.encode("error", error.payload(), None, codec.JSON) + b"\n")
        self._close_politely()

    def _close_politely(self) -> None:
        self.flush_writes()
        # A TLS transport closes only once no producer is registered.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            if self.connection is None and (self._refused or not self._start()):
                return
            self._lines_received(data)
        except Exception:
            self.log.failure("unexpected error handling TCP data")

    def _lines_received(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if self._discarding:
                self._discarding = False
                continue
            line = line.rstrip(b"\r")
            if line.strip():
                self.connection.frame_received(line, codec.JSON)
        if len(self._buffer) > self.factory.max_line_bytes:
            # Drop the partial line now and the rest of it when its newline arrives.
            self._buffer = b""
            if not self._discarding:
                self._discarding = True
                self.connection.frame_too_large(codec.JSON)

    def connectionLost(self, reason: object = None) -> None:
        try:
            self.factory.tracker.discard(self)
            if self.connection is not None:
                self.factory.addresses.release(self.connection.address)
                self.connection.connection_lost()
            self._lost = True
            if self._closed is not None and not self._closed.called:
                self._closed.callback(None)
        except Exception:
            self.log.failure("unexpected error closing a TCP connection")

    async def shutdown(self) -> None:
        """Answer what was received, flush, close."""
        if self.connection is not None:
            await self.connection.drain()
        if self._lost:
            return
        self._closed = Deferred()
        self._close_politely()
        await self._closed

    # The connection's Transport (construct.protocol.connection)

    def abort(self) -> None:
        self.transport.abortConnection()

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    def write_frame(self, data: bytes, encoding: str) -> None:
        self.write_soon(data + b"\n")


class JsonLinesFactory(Factory):
    noisy = False

    def __init__(
        self,
        core: Core,
        max_line_bytes: int,
        tracker: ConnectionTracker,
        addresses: AddressCounts,
        limits: ConnectionLimits,
        clock: Any,
        proxied: bool = False,
    ) -> None:
        """`proxied`: the endpoint speaks the PROXY protocol (haproxy:…)."""
        self.core = core
        self.max_line_bytes = max_line_bytes
        self.tracker = tracker
        self.addresses = addresses
        self.limits = limits
        self.clock = clock
        self.writer = TurnWriter(clock)
        self.proxied = proxied

    def buildProtocol(self, addr: Any) -> JsonLinesProtocol:
        return JsonLinesProtocol(self)
