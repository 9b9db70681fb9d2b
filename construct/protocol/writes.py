"""Economies on the plain TCP transports of client connections: one `send()` per connection and
reactor turn, with no round trip through the reactor, and one shared log prefix.

Writing.

Twisted's `transport.write` only buffers: it registers the socket for writing (an `epoll_ctl`),
sends on the reactor's next turn, and unregisters it (another `epoll_ctl`). A relay writes one
small frame to each of thousands of sockets, one per message, so that is three system calls and
a reactor round trip where one `send()` does. When nothing is waiting in the transport's own
buffer, the bytes go straight to the socket; whatever the socket cannot take at once goes
through `transport.write` as before, behind nothing, so the order of the bytes never changes
and Twisted's flow control (pausing a registered producer) still sees every byte it holds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime


def write_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sent at once when it can be: only on a plain TCP socket (not
    TLS, not a PROXY-protocol or other wrapper, whose bytes are not the socket's) that holds
    nothing unsent."""
    if (
        not isinstance(transport, tcp.Connection)
        or transport.TLS
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        # Full (EAGAIN) or broken: the transport finds out which when it tries itself.
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)


def share_log_prefix(transport: Any, prefix: str) -> None:
    """Twisted gives every connection a log prefix and a repr of its own that name the client's
    address (`JsonLinesProtocol,42,203.0.113.9`): over a hundred bytes on every connection, and an
    address in the log's system field, which construct.logs keeps out of the log otherwise. All
    client connections of a kind share one string instead."""
    if isinstance(transport, tcp.Connection):
        transport.logstr = transport.repstr = prefix


class TurnWriter:
    """The frames written to a connection during one reactor turn go out together, at the end of
    the turn, with one `write_now` each: a client whose requests come in bursts (a pipeline of
    sends, say) gets one `send()` for all their replies, and one that sends a single request per
    turn still gets its reply without waiting for the reactor's next poll.

    A connection keeps what it wrote this turn in its own list (`CoalescedWrites`); this object
    only remembers which connections have something and flushes them."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._holding: list[Any] = []
        self._call: Any = None

    def hold(self, connection: Any) -> None:
        self._holding.append(connection)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        holding, self._holding = self._holding, []
        for connection in holding:
            connection.flush_writes()


class CoalescedWrites:
    """A protocol's side of TurnWriter: `write_soon` holds bytes until the end of the turn, and
    anything that writes around it (the framework's own frames, closing) calls `flush_writes`
    first, so the order of the bytes never changes. The protocol's factory has `writer`."""

    _pending_writes: list[bytes] | None = None

    def write_soon(self, data: bytes) -> None:
        if self._pending_writes is None:
            self._pending_writes = [data]
            self.factory.writer.hold(self)
        else:
            self._pending_writes.append(data)

    def flush_writes(self) -> None:
        pending, self._pending_writes = self._pending_writes, None
        if pending:
            write_now(self.transport, pending[0] if len(pending) == 1 else b"".join(pending))
