"""`obfs4://host:port?cert=…&iat-mode=…`: reaching a server through obfs4proxy in client mode.

The address is the bridge line a server with `--obfs4` prints. Without a path it carries TCP
JSON lines (the server's default `--obfs4-target tcp`); with one, `obfs4://host:port/ws?cert=…`,
it carries a WebSocket at that path (`--obfs4-target websocket`).

The first connection starts obfs4proxy as a managed client transport (`TOR_PT_CLIENT_TRANSPORTS=obfs4`);
it answers with the address of its SOCKS5 proxy (`CMETHOD obfs4 socks5 127.0.0.1:PORT`), and every
connection is a SOCKS5 CONNECT to the server whose username and password carry the bridge's
arguments (`cert=…;iat-mode=…`). One proxy serves the whole process; it exits with the reactor
(and, watching its stdin, with the process however it ends). `CONSTRUCT_CHAT_OBFS4PROXY` names
another program than `obfs4proxy` on PATH (lyrebird, its successor, speaks the same protocol).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from construct import pt
from construct.client.transport import CONNECT_TIMEOUT, ConnectFailed, ServerAddress

EXECUTABLE_VARIABLE = "CONSTRUCT_CHAT_OBFS4PROXY"
PROXY_START_TIMEOUT = 10.0
PROXY_STOP_TIMEOUT = 2.0
SOCKS_VERSION = 5
SOCKS_USERNAME_PASSWORD = 2
SOCKS_CONNECT = 1
SOCKS_REPLIES = {
    1: "general failure", 2: "not allowed", 3: "network unreachable", 4: "host unreachable",
    5: "connection refused", 6: "TTL expired", 7: "command not supported", 8: "address type not supported",
}
IAT_MODES = ("0", "1", "2")


@dataclass(frozen=True)
class Obfs4Address(ServerAddress):
    """A server behind obfs4. `scheme` says what obfs4 carries (tcp or ws), for the connection code."""

    cert: str = ""
    iat_mode: str = "0"

    @classmethod
    def parse(cls, text: str) -> "Obfs4Address":
        parts = urlsplit(text.strip())
        usage = "obfs4 address must look like obfs4://host:port?cert=…&iat-mode=0 (the server's bridge line)"
        if parts.scheme != "obfs4" or not parts.hostname:
            raise ValueError(f"{usage}, not {text!r}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            raise ValueError(f"{usage}: the port is missing or bad in {text!r}")
        # Not parse_qs: a certificate is base64, whose "+" would become a space.
        query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
        cert, iat_mode = unquote(query.get("cert", "")), unquote(query.get("iat-mode", "0"))
        if not cert or iat_mode not in IAT_MODES:
            raise ValueError(f"{usage}: it needs cert= and an iat-mode of 0, 1 or 2, in {text!r}")
        path = parts.path if parts.path not in ("", "/") else ""
        return cls("ws" if path else "tcp", parts.hostname, port, path or "/", cert=cert, iat_mode=iat_mode)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = self.path if self.scheme == "ws" else ""
        return f"obfs4://{host}:{self.port}{path}?cert={self.cert}&iat-mode={self.iat_mode}"

    def endpoint(self, reactor: Any) -> "Obfs4Endpoint":
        return Obfs4Endpoint(reactor, client_proxy(reactor), self.host, self.port, self.arguments())

    def arguments(self) -> dict[str, str]:
        return {"cert": self.cert, "iat-mode": self.iat_mode}


class ClientProxy:
    """obfs4proxy in client mode, started on first use and again after it dies."""

    def __init__(self, reactor: Any, executable_name: str) -> None:
        self._reactor = reactor
        self._executable_name = executable_name
        self._proxy: pt.ManagedProxy | None = None
        self._state_dir: str | None = None
        self._address: tuple[str, int] | None = None
        self._waiting: list[defer.Deferred] = []

    @property
    def pid(self) -> int | None:
        return None if self._proxy is None else self._proxy.pid

    async def socks_address(self) -> tuple[str, int]:
        """(host, port) of the proxy's SOCKS5 listener, starting the proxy if it is not running."""
        if self._address is not None:
            return self._address
        if self._proxy is None:
            self._start()
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(waiter)
        return await waiter.addTimeout(PROXY_START_TIMEOUT, self._reactor)

    def _start(self) -> None:
        executable = pt.find_executable(self._executable_name)
        if executable is None:
            raise ConnectFailed(
                f"obfs4 needs obfs4proxy, and {self._executable_name!r} is not installed "
                f"(Debian: apt-get install obfs4proxy; or name the program in {EXECUTABLE_VARIABLE})"
            )
        if self._state_dir is None:
            self._state_dir = tempfile.mkdtemp(prefix="construct-obfs4-")
        env = pt.base_environment(self._state_dir)
        env["TOR_PT_CLIENT_TRANSPORTS"] = pt.OBFS4
        self._proxy = pt.ManagedProxy("obfs4proxy", self._line, self._proxy_ended)
        pt.spawn(self._reactor, executable, env, self._proxy)

    def _line(self, keyword: str, words: list[str]) -> None:
        if keyword == "CMETHOD" and words[:2] == [pt.OBFS4, "socks5"] and len(words) >= 3:
            self._address = pt.split_address(words[2])
            self._settle(lambda waiter: waiter.callback(self._address))
        elif keyword in pt.ERROR_KEYWORDS:
            error = ConnectFailed(f"obfs4proxy refused to start: {keyword} {' '.join(words)}")
            self._settle(lambda waiter: waiter.errback(error))

    def _proxy_ended(self, reason: Failure) -> None:
        self._proxy, self._address = None, None
        error = ConnectFailed(f"obfs4proxy ended ({pt.exit_description(reason)})")
        self._settle(lambda waiter: waiter.errback(error))

    def _settle(self, how: Any) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.called:
                how(waiter)

    async def stop(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop(self._reactor, PROXY_STOP_TIMEOUT)
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None


_proxies: dict[int, ClientProxy] = {}


def client_proxy(reactor: Any) -> ClientProxy:
    """The process's obfs4proxy, stopped when the reactor stops."""
    proxy = _proxies.get(id(reactor))
    if proxy is None:
        proxy = _proxies[id(reactor)] = ClientProxy(reactor, os.environ.get(EXECUTABLE_VARIABLE) or "obfs4proxy")

        def stop() -> defer.Deferred:
            _proxies.pop(id(reactor), None)
            return defer.ensureDeferred(proxy.stop())

        reactor.addSystemEventTrigger("before", "shutdown", stop)
    return proxy


class Obfs4Endpoint:
    """An IStreamClientEndpoint: a connection to host:port through the obfs4 client proxy."""

    def __init__(self, reactor: Any, proxy: ClientProxy, host: str, port: int, arguments: dict[str, str]) -> None:
        self._reactor = reactor
        self._proxy = proxy
        self._host = host
        self._port = port
        self._arguments = arguments

    def connect(self, factory: Any) -> defer.Deferred:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        socks_host, socks_port = await self._proxy.socks_address()
        handshake = Socks5Factory(factory, self._host, self._port, pt.socks_arguments(self._arguments))
        endpoint = TCP4ClientEndpoint(self._reactor, socks_host, socks_port, timeout=CONNECT_TIMEOUT)
        wrapper = await endpoint.connect(handshake)
        try:
            return await wrapper.handshake_done.addTimeout(CONNECT_TIMEOUT, self._reactor)
        except defer.TimeoutError:
            wrapper.transport.abortConnection()
            raise ConnectFailed(f"no obfs4 connection to {self._host}:{self._port} within {CONNECT_TIMEOUT:g} s") \
                from None


def _target_address(host: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return b"\x03" + bytes((len(name),)) + name
    return (b"\x01" if address.version == 4 else b"\x04") + address.packed


class Socks5Protocol(ProtocolWrapper):
    """A SOCKS5 CONNECT with username/password authentication; then the wrapped protocol's bytes."""

    factory: "Socks5Factory"

    def __init__(self, factory: "Socks5Factory", wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self.handshake_done: defer.Deferred = defer.Deferred()
        self._buffer = b""
        self._step = self._method_chosen
        self._open = False

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper does, except that the wrapped protocol waits for the proxy's reply.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        self.transport.write(bytes((SOCKS_VERSION, 1, SOCKS_USERNAME_PASSWORD)))

    def dataReceived(self, data: bytes) -> None:
        if self._open:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        while not self._open and self._step is not None and self._step():
            pass
        if self._open and self._buffer:
            rest, self._buffer = self._buffer, b""
            self.wrappedProtocol.dataReceived(rest)

    def _method_chosen(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] != bytes((SOCKS_VERSION, SOCKS_USERNAME_PASSWORD)):
            return self._fail("the obfs4 proxy refused the SOCKS authentication")
        self._buffer = self._buffer[2:]
        # The arguments fill the username, then the password; an unused password is one NUL.
        credentials = self.factory.arguments.encode()
        username, password = credentials[:255], credentials[255:510] or b"\x00"
        self.transport.write(b"\x01" + bytes((len(username),)) + username + bytes((len(password),)) + password)
        self._step = self._authenticated
        return True

    def _authenticated(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[1] != 0:
            return self._fail("the obfs4 proxy refused the bridge's arguments")
        self._buffer = self._buffer[2:]
        target = _target_address(self.factory.host) + self.factory.port.to_bytes(2, "big")
        self.transport.write(bytes((SOCKS_VERSION, SOCKS_CONNECT, 0)) + target)
        self._step = self._connected
        return True

    def _connected(self) -> bool:
        if len(self._buffer) < 5:
            return False
        reply, kind = self._buffer[1], self._buffer[3]
        if reply != 0:
            return self._fail(f"obfs4 could not reach {self.factory.host}:{self.factory.port} "
                              f"({SOCKS_REPLIES.get(reply, f'SOCKS reply {reply}')})")
        size = {1: 4, 4: 16, 3: 1 + self._buffer[4]}.get(kind)
        if size is None:
            return self._fail("the obfs4 proxy gave a malformed SOCKS reply")
        if len(self._buffer) < 4 + size + 2:
            return False
        self._buffer = self._buffer[4 + size + 2:]
        self._open = True
        self._step = None
        self.wrappedProtocol.makeConnection(self)
        self.handshake_done.callback(self.wrappedProtocol)
        return True

    def _fail(self, reason: str) -> bool:
        self._step = None
        self.transport.abortConnection()
        if not self.handshake_done.called:
            self.handshake_done.errback(ConnectFailed(reason))
        return False

    def connectionLost(self, reason: Any) -> None:
        if self._open:
            super().connectionLost(reason)
            return
        self.factory.unregisterProtocol(self)
        self.wrappedProtocol = None
        if not self.handshake_done.called:
            self.handshake_done.errback(ConnectFailed("the obfs4 proxy closed the connection"))


class Socks5Factory(WrappingFactory):
    protocol = Socks5Protocol
    noisy = False

    def __init__(self, wrapped: Any, host: str, port: int, arguments: str) -> None:
        super().__init__(wrapped)
        self.host = host
        self.port = port
        self.arguments = arguments
