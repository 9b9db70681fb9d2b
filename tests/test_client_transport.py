"""The client's connections (construct.client.transport) against a scripted JSON-lines server."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from construct.client import transport
from construct.client.transport import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionClosed,
    Link,
    RequestTimeout,
    ServerAddress,
    ServerError,
)
from construct.protocol import codec

FAST_RETRY = lambda attempt: 0.05  # noqa: E731


class _ScriptedProtocol(LineOnlyReceiver):
    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def lineReceived(self, line: bytes) -> None:
        frame = json.loads(line)
        self.factory.received.append(frame)
        answer = self.factory.script.get(frame["type"], lambda f: {"type": "pong"})
        reply = answer(frame)
        if reply is not None:
            reply.setdefault("requestId", frame.get("requestId"))
            self.sendLine(json.dumps(reply).encode())

    def push(self, message_type: str, payload: dict) -> None:
        self.sendLine(json.dumps({"type": message_type, "payload": payload}).encode())


class ScriptedServer(Factory):
    """Answers each message type with script[type](frame) (None: no answer)."""

    protocol = _ScriptedProtocol

    def __init__(self) -> None:
        self.script: dict = {}
        self.received: list[dict] = []
        self.connections: list[_ScriptedProtocol] = []


@pytest_twisted.async_yield_fixture
async def server():
    factory = ScriptedServer()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.address = ServerAddress.parse(f"tcp://127.0.0.1:{port.getHost().port}")
    yield factory
    await port.stopListening()
    for connection in factory.connections:
        connection.transport.abortConnection()


def test_server_addresses():
    """ws, wss, tcp and tcps URLs parse with their default ports; anything else is refused."""
    assert ServerAddress.parse("ws://127.0.0.1:8080/ws") == ServerAddress("ws", "127.0.0.1", 8080, "/ws")
    assert str(ServerAddress.parse("wss://chat.example.org/ws")) == "wss://chat.example.org:443/ws"
    assert str(ServerAddress.parse("tcp://localhost")) == "tcp://localhost:8081"
    assert str(ServerAddress.parse("tcps://chat.example.org:9443")) == "tcps://chat.example.org:9443"
    assert ServerAddress.parse("tcps://chat.example.org").lines
    for bad in ("http://x/", "127.0.0.1:8080", "ws://", "tcp://host:port"):
        with pytest.raises(ValueError):
            ServerAddress.parse(bad)


@pytest_twisted.ensureDeferred
async def test_replies_are_matched_by_request_id_and_pushes_go_aside(server):
    """A late reply still reaches its request, an error raises ServerError, a push goes to the callback."""
    held: list = []
    server.script["slow"] = lambda frame: held.append(frame) or None
    server.script["bad"] = lambda frame: {"type": "error", "payload": {"code": "NOPE", "message": "no"}}
    pushes: list[dict] = []
    link = Link(reactor, server.address, codec.JSON, pushes.append, FAST_RETRY)
    channel = await link.channel()
    slow = defer.ensureDeferred(channel.request("slow"))
    assert (await channel.request("ping"))["type"] == "pong"
    with pytest.raises(ServerError) as caught:
        await channel.request("bad")
    assert caught.value.code == "NOPE"
    server.connections[0].push("message", {"id": "m1"})
    server.connections[0].sendLine(json.dumps({"type": "done", "requestId": held[0]["requestId"]}).encode())
    assert (await slow)["type"] == "done"
    assert pushes == [{"type": "message", "payload": {"id": "m1"}}]
    await link.stop()


@pytest_twisted.ensureDeferred
async def test_reconnects_and_authenticates_again(server):
    """After the connection drops, pending requests fail, and the link reconnects and re-authenticates."""
    server.script["silent"] = lambda frame: None
    link = Link(reactor, server.address, codec.JSON, lambda frame: None, FAST_RETRY)
    authenticated: list = []

    async def authenticate(channel):
        authenticated.append((await channel.request("connect", {"sessionToken": "t"}))["type"])

    link.authenticate = authenticate
    channel = await link.channel()
    pending = defer.ensureDeferred(channel.request("silent"))
    server.connections[0].transport.loseConnection()
    with pytest.raises(ConnectionClosed):
        await pending
    again = await link.channel()
    assert again is not channel and len(server.connections) == 2
    assert authenticated == ["pong", "pong"]
    assert [f["type"] for f in server.received].count("connect") == 2
    assert (await link.request("ping"))["type"] == "pong"
    await link.stop()


@pytest_twisted.ensureDeferred
async def test_request_timeout(server):
    """A request without a reply fails with RequestTimeout."""
    server.script["silent"] = lambda frame: None
    link = Link(reactor, server.address, codec.JSON, lambda frame: None, FAST_RETRY)
    with pytest.raises(RequestTimeout):
        await link.request("silent", timeout=0.2)
    await link.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_server_fails_after_the_given_attempts():
    """With nothing listening, channel(fail_after=N) fails with ConnectFailed after N attempts."""
    probe = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    address = ServerAddress.parse(f"tcp://127.0.0.1:{probe.getHost().port}")
    await probe.stopListening()
    attempts: list[int] = []

    def policy(attempt: int) -> float:
        attempts.append(attempt)
        return 0.01

    link = Link(reactor, address, codec.JSON, lambda frame: None, policy)
    with pytest.raises(ConnectFailed):
        await link.channel(fail_after=3)
    assert attempts[:2] == [0, 1]
    await link.stop()


@pytest_twisted.ensureDeferred
async def test_authentication_failure_stops_the_link(server):
    """AuthenticationFailed from the authenticate step is final: no retries, every caller gets it."""
    link = Link(reactor, server.address, codec.JSON, lambda frame: None, FAST_RETRY)

    async def authenticate(channel):
        raise AuthenticationFailed("dead session")

    link.authenticate = authenticate
    with pytest.raises(AuthenticationFailed):
        await link.channel()
    await task.deferLater(reactor, 0.2, lambda: None)
    assert len(server.connections) == 1
    with pytest.raises(AuthenticationFailed):
        await link.request("ping")
    await link.stop()


@pytest_twisted.ensureDeferred
async def test_acknowledge_is_confirmed_by_a_ping(server):
    """acknowledge() returns once the ping after the ack is answered, and raises the ack's error."""
    server.script["ackMessage"] = lambda frame: None
    link = Link(reactor, server.address, codec.JSON, lambda frame: None, FAST_RETRY)
    channel = await link.channel()
    await channel.acknowledge(["m1"])
    assert [f["type"] for f in server.received] == ["ackMessage", "ping"]
    server.script["ackMessage"] = lambda frame: {"type": "error", "payload": {"code": "INVALID_FORMAT", "message": "x"}}
    with pytest.raises(ServerError):
        await channel.acknowledge(["bad"])
    await link.stop()


class _ClosingWebSocket(WebSocketServerProtocol):
    """Answers every request; told to, it sends a close frame and stops reading, as a server
    does in its shutdown window, so the client sits in the closing state."""

    def onOpen(self) -> None:
        self.factory.connections.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.factory.received.append(frame["type"])
        answer = {"connect": "connectSuccess"}.get(frame["type"], "pong")
        self.sendMessage(json.dumps({"type": answer, "requestId": frame.get("requestId")}).encode())

    def close_and_stop_reading(self) -> None:
        self.sendCloseFrame(code=1001, reasonUtf8=b"shutting down", isReply=False)
        self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_a_keepalive_in_the_servers_shutdown_window_does_not_stop_reconnecting(monkeypatch):
    """A keepalive ping that lands while the WebSocket is closing ("Attempt to send on a closed
    protocol") neither kills the keepalive nor the link: it reconnects and says so."""
    monkeypatch.setattr(transport, "KEEPALIVE_SECONDS", 0.05)
    factory = WebSocketServerFactory()
    factory.protocol = _ClosingWebSocket
    factory.connections, factory.received = [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = ServerAddress.parse(f"ws://127.0.0.1:{port.getHost().port}/ws")
    statuses: list[tuple[str, str]] = []
    link = Link(reactor, address, codec.JSON, lambda frame: None, FAST_RETRY, on_status=lambda *s: statuses.append(s))

    async def authenticate(channel):
        await channel.request("connect", {"sessionToken": "t"})

    link.authenticate = authenticate
    try:
        first = await link.channel()
        factory.connections[0].close_and_stop_reading()
        await first.closed
        second = await link.channel()
        assert second is not first
        while not statuses or statuses[-1][0] != "reconnected":
            await task.deferLater(reactor, 0.02, lambda: None)
        assert [event for event, _ in statuses] == ["lost", "reconnected"]
        assert "1001" in statuses[0][1] or "1006" in statuses[0][1]
        # Keepalives go on, on the new connection.
        pings = factory.received.count("ping")
        await task.deferLater(reactor, 0.3, lambda: None)
        assert factory.received.count("ping") > pings
    finally:
        await link.stop()
        await port.stopListening()
        for connection in factory.connections:
            connection.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_the_client_answers_a_close_at_once():
    """When the server closes, the client answers the close handshake right away (the server's
    close is clean and quick), so a shutting-down server need not wait for it."""
    closed: list[tuple[bool, float]] = []

    class Server(_ClosingWebSocket):
        def onClose(self, wasClean, code, reason) -> None:
            closed.append((wasClean, reactor.seconds()))

    factory = WebSocketServerFactory()
    factory.protocol = Server
    factory.connections, factory.received = [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = ServerAddress.parse(f"ws://127.0.0.1:{port.getHost().port}/ws")
    link = Link(reactor, address, codec.JSON, lambda frame: None, FAST_RETRY)
    try:
        await link.channel()
        started = reactor.seconds()
        factory.connections[0].sendCloseFrame(code=1001, reasonUtf8=b"shutting down", isReply=False)
        while not closed:
            await task.deferLater(reactor, 0.01, lambda: None)
        assert closed[0][0] is True and closed[0][1] - started < 0.5
    finally:
        await link.stop()
        await port.stopListening()
