"""Two economies on the plain TCP transports of client connections: writing without a round
trip through the reactor, and one shared log prefix.

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
