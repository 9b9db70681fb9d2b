"""Writing to a plain TCP socket without a round trip through the reactor.

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
