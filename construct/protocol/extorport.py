"""The Extended ORPort, server side: how obfs4proxy hands over a connection with its client's address.

obfs4proxy connects to this loopback port for every client it has unwrapped. Before the
client's bytes it authenticates with a cookie both sides read from a file (SAFE_COOKIE:
HMAC-SHA256 over two nonces, so the cookie never crosses the socket and another local user
cannot pose as the proxy), then sends commands: `USERADDR` with the client's own address,
`TRANSPORT obfs4`, `DONE`. Only after the `OKAY` reply does the wrapped protocol (TCP JSON
lines or the HTTP site) see a connection, with `getPeer()` giving the client's address, so
the per-address limits count obfs4 clients one by one instead of all as 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from construct.pt import split_address

COOKIE_HEADER = b"! Extended ORPort Auth Cookie !\x0a"
COOKIE_BYTES = 32
NONCE_BYTES = 32
AUTH_SAFE_COOKIE = 1
SERVER_HASH_CONTEXT = b"ExtORPort authentication server-to-client hash"
CLIENT_HASH_CONTEXT = b"ExtORPort authentication client-to-server hash"
COMMAND_DONE, COMMAND_USERADDR = 0x0000, 0x0001
REPLY_OKAY = 0x1000
# obfs4proxy gives itself 5 s for all of it; anything slower is not obfs4proxy.
HANDSHAKE_TIMEOUT = 10.0
# The commands before DONE are a few short ones; a peer that sends more is not obfs4proxy.
MAX_HANDSHAKE_BYTES = 4096


def write_cookie_file(path: str) -> bytes:
    """A fresh cookie in the file format the proxy reads (readable by this user only)."""
    cookie = os.urandom(COOKIE_BYTES)
    descriptor = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(COOKIE_HEADER + cookie)
    os.replace(path + ".new", path)
    return cookie


def _hash(cookie: bytes, context: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(cookie, context + client_nonce + server_nonce, hashlib.sha256).digest()


def peer_address(text: str) -> IPv4Address | IPv6Address | None:
    """A USERADDR body (`203.0.113.7:5555`, `[2001:db8::1]:5555`) as a Twisted address."""
    try:
        host, port = split_address(text)
    except ValueError:
        return None
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


class ExtOrPortProtocol(ProtocolWrapper):
    """Authenticates the proxy, reads its commands, then carries the client's bytes both ways."""

    log = Logger()
    factory: "ExtOrPortFactory"

    def __init__(self, factory: "ExtOrPortFactory", wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._step = self._method
        self._client_nonce = self._server_nonce = b""
        self._client: IPv4Address | IPv6Address | None = None
        self._open = False
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper does, except that the wrapped protocol waits for the handshake.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(HANDSHAKE_TIMEOUT, self._refuse, "handshake timed out")
        self.transport.write(bytes((AUTH_SAFE_COOKIE, 0)))

    def dataReceived(self, data: bytes) -> None:
        if self._open:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        if len(self._buffer) > MAX_HANDSHAKE_BYTES:
            self._refuse("handshake too long")
            return
        while not self._open and not self.disconnecting and self._step():
            pass
        if self._open and self._buffer:
            rest, self._buffer = self._buffer, b""
            self.wrappedProtocol.dataReceived(rest)

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) < size:
            return None
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    # Each step consumes what it needs and returns True to go on, False to wait for more bytes.

    def _method(self) -> bool:
        chosen = self._take(1)
        if chosen is None:
            return False
        if chosen[0] != AUTH_SAFE_COOKIE:
            self._refuse("unsupported authentication type")
            return False
        self._step = self._nonce
        return True

    def _nonce(self) -> bool:
        nonce = self._take(NONCE_BYTES)
        if nonce is None:
            return False
        self._client_nonce, self._server_nonce = nonce, os.urandom(NONCE_BYTES)
        server_hash = _hash(self.factory.cookie, SERVER_HASH_CONTEXT, self._client_nonce, self._server_nonce)
        self.transport.write(server_hash + self._server_nonce)
        self._step = self._client_hash
        return True

    def _client_hash(self) -> bool:
        client_hash = self._take(32)
        if client_hash is None:
            return False
        expected = _hash(self.factory.cookie, CLIENT_HASH_CONTEXT, self._client_nonce, self._server_nonce)
        if not hmac.compare_digest(client_hash, expected):
            self.transport.write(b"\x00")
            self._refuse("wrong cookie")
            return False
        self.transport.write(b"\x01")
        self._step = self._command
        return True

    def _command(self) -> bool:
        if len(self._buffer) < 4:
            return False
        command = int.from_bytes(self._buffer[:2], "big")
        length = int.from_bytes(self._buffer[2:4], "big")
        if len(self._buffer) < 4 + length:
            return False
        body, self._buffer = self._buffer[4 : 4 + length], self._buffer[4 + length :]
        if command == COMMAND_USERADDR:
            self._client = peer_address(body.decode("ascii", "replace"))
        elif command == COMMAND_DONE:
            self._start()
        # Other commands (TRANSPORT, and any a later proxy adds) change nothing here.
        return True

    def _start(self) -> None:
        self._cancel_timer()
        self.transport.write(REPLY_OKAY.to_bytes(2, "big") + b"\x00\x00")
        self._open = True
        self.wrappedProtocol.makeConnection(self)

    def _refuse(self, reason: str) -> None:
        self._cancel_timer()
        self.log.warn("refused a connection on the obfs4 handover port: {reason}", reason=reason)
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def getPeer(self) -> Any:
        return self._client if self._client is not None else self.transport.getPeer()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_timer()
        if self._open:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None


class ExtOrPortFactory(WrappingFactory):
    """Serves `wrapped` (the TCP JSON-lines factory or the HTTP site) behind the Extended ORPort."""

    protocol = ExtOrPortProtocol
    noisy = False

    def __init__(self, wrapped: Any, cookie: bytes, clock: Any) -> None:
        super().__init__(wrapped)
        self.cookie = cookie
        self.clock = clock
