"""Network clients for integration tests: WebSocket (MessagePack or JSON), TCP JSON lines, HTTP."""

from __future__ import annotations

import json

import msgpack
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.basic import LineOnlyReceiver

from construct.protocol import codec

TIMEOUT = 10.0


class _QueueingClient:
    def __init__(self) -> None:
        self.received: defer.DeferredQueue = defer.DeferredQueue()
        self.closed: defer.Deferred = defer.Deferred()

    async def next(self, timeout: float = TIMEOUT) -> dict:
        return await self.received.get().addTimeout(timeout, reactor)

    async def request(self, message_type: str, payload: dict | None = None, request_id: str | None = None) -> dict:
        self.send(message_type, payload, request_id)
        return await self.next()

    async def next_of(self, message_type: str, timeout: float = TIMEOUT) -> dict:
        """The next frame of a type, skipping others (pushes interleave with replies)."""
        while True:
            frame = await self.next(timeout)
            if frame["type"] == message_type:
                return frame


class _WsProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client.protocol = self
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client.received.put(msgpack.unpackb(payload, raw=False) if isBinary else json.loads(payload))

    def onClose(self, wasClean, code, reason) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        if not self.factory.client.closed.called:
            self.factory.client.closed.callback(code)


class WsClient(_QueueingClient):
    def __init__(self, encoding: str = codec.MSGPACK) -> None:
        super().__init__()
        self.encoding = encoding
        self.protocol: _WsProtocol | None = None

    @classmethod
    async def connect(cls, port: int, encoding: str = codec.MSGPACK, path: str = "/ws", origin: str | None = None) -> "WsClient":
        client = cls(encoding)
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}", origin=origin)
        factory.protocol = _WsProtocol
        factory.client = client
        factory.opened = defer.Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        await factory.opened.addTimeout(TIMEOUT, reactor)
        return client

    def send(self, message_type: str, payload: dict | None = None, request_id: str | None = None) -> None:
        self.send_raw(codec.encode(message_type, payload or {}, request_id, self.encoding), self.encoding == codec.MSGPACK)

    def send_raw(self, data: bytes, binary: bool) -> None:
        self.protocol.sendMessage(data, isBinary=binary)

    async def close(self) -> None:
        if not self.closed.called:
            self.protocol.sendClose()
            await self.closed.addTimeout(TIMEOUT, reactor)


class _LineProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4 * 1024 * 1024

    def lineReceived(self, line: bytes) -> None:
        self.client.received.put(json.loads(line))

    def connectionLost(self, reason=None) -> None:
        if not self.client.closed.called:
            self.client.closed.callback(None)


class TcpClient(_QueueingClient):
    protocol: _LineProtocol

    @classmethod
    async def connect(cls, port: int) -> "TcpClient":
        client = cls()
        factory = protocol.Factory.forProtocol(_LineProtocol)
        client.protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        client.protocol.client = client
        return client

    def send(self, message_type: str, payload: dict | None = None, request_id: str | None = None) -> None:
        self.send_raw(codec.encode(message_type, payload or {}, request_id, codec.JSON) + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.protocol.transport.write(data)

    async def close(self) -> None:
        self.protocol.transport.loseConnection()
        await self.closed.addTimeout(TIMEOUT, reactor)


class HttpClient:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token: str | None = None

    async def call(self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None):
        headers = {}
        token = token or self.token
        if token:
            headers["Authorization"] = [f"Bearer {token}"]
        data = raw if raw is not None else (codec.json_bytes(body) if body is not None else None)
        if data is not None:
            headers["Content-Type"] = ["application/json"]
        response = await treq.request(method, self.base + path, data=data, headers=headers).addTimeout(TIMEOUT, reactor)
        content = await treq.content(response)
        return response.code, (json.loads(content) if content else None)
