"""Lean client connections for the load generator: raw Autobahn WebSocket and JSON lines.

A connection hands every decoded frame to its handler and tells it when a read is done, so a
handler can answer a whole burst of frames with one write (one ackMessage per burst).
"""

from __future__ import annotations

import base64
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol as TypingProtocol

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from construct.bench.wire import Codec

CONNECT_TIMEOUT = 30
REQUEST_TIMEOUT = 60
WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class BenchError(Exception):
    """The server did not do what the benchmark needs (refused a setup request, went away)."""


@dataclass(frozen=True)
class Target:
    """Where one server (Construct or the bare relay) listens."""

    host: str
    ws_port: int
    tcp_port: int | None

    def port_for(self, codec: Codec) -> int:
        if codec.websocket:
            return self.ws_port
        if self.tcp_port is None:
            raise BenchError("the tcp transport needs the server's TCP port")
        return self.tcp_port

    def as_dict(self) -> dict:
        return {"host": self.host, "ws_port": self.ws_port, "tcp_port": self.tcp_port}


class Handler(TypingProtocol):
    def frame_received(self, message: dict) -> None: ...

    def read_done(self) -> None: ...

    def closed(self) -> None: ...


class Replies:
    """Until the benchmark proper takes over: each reply answers the oldest request."""

    def __init__(self) -> None:
        self._waiting: deque[Deferred] = deque()

    def expect(self) -> Deferred:
        waiting: Deferred = Deferred()
        self._waiting.append(waiting)
        return waiting

    def frame_received(self, message: dict) -> None:
        if message.get("type") != "message" and self._waiting:
            self._waiting.popleft().callback(message)

    def read_done(self) -> None:
        pass

    def closed(self) -> None:
        while self._waiting:
            self._waiting.popleft().errback(BenchError("the server closed the connection"))


class _Link:
    """What both connection kinds offer on top of their framing."""

    codec: Codec
    handler: Handler
    clock: Any

    def send_frame(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.transport.loseConnection()

    def send(self, message_type: str, payload: dict) -> None:
        self.send_frame(self.codec.encode({"type": message_type, "payload": payload}))

    async def request(self, message_type: str, payload: dict, expected: str) -> dict:
        """Send one request while `Replies` is the handler; its reply must be `expected`."""
        reply = self.handler.expect()
        self.send(message_type, payload)
        message = await reply.addTimeout(REQUEST_TIMEOUT, self.clock)
        if message.get("type") != expected:
            raise BenchError(f"{message_type} answered {message.get('type')}: {message.get('payload')}")
        return message["payload"]


class WebSocketLink(_Link, WebSocketClientProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.handler.frame_received(self.codec.decode(payload))

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.handler.read_done()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.handler.closed()

    def send_frame(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=self.codec.binary)


class LineLink(_Link, Protocol):
    _partial = b""

    def dataReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self.handler.frame_received(self.codec.decode(line))
        self.handler.read_done()

    def connectionLost(self, reason: Any = None) -> None:
        self.handler.closed()

    def send_frame(self, data: bytes) -> None:
        # Line codecs end every frame with its "\n" already.
        self.transport.write(data)


class SlimWebSocketLink(_Link, Protocol):
    """A bare WebSocket client for connections that authenticate and then sit idle.

    Autobahn keeps about 20 KB per client connection; holding 10,000 of them would make the load
    generator the biggest process on the machine. This one does the opening handshake, sends
    masked frames, reads unfragmented messages and answers pings, nothing more.
    """

    _buffer = b""
    _upgraded = False

    def connectionMade(self) -> None:
        self.is_open: Deferred = Deferred()
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (self.factory.host.encode(), key)
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded:
            head, separator, self._buffer = self._buffer.partition(b"\r\n\r\n")
            if not separator:
                self._buffer = head
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.is_open.errback(BenchError(f"WebSocket upgrade refused: {head[:80]!r}"))
                self.transport.loseConnection()
                return
            self._upgraded = True
            self.is_open.callback(None)
        while (frame := self._next_frame()) is not None:
            self._frame_received(*frame)
        self.handler.read_done()

    def _next_frame(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next whole frame in the buffer; the server never masks."""
        if len(self._buffer) < 2:
            return None
        opcode, length = self._buffer[0] & 0x0F, self._buffer[1] & 0x7F
        start = 2
        if length >= 126:
            size = 2 if length == 126 else 8
            if len(self._buffer) < 2 + size:
                return None
            length, start = int.from_bytes(self._buffer[2:2 + size], "big"), 2 + size
        if len(self._buffer) < start + length:
            return None
        payload, self._buffer = self._buffer[start:start + length], self._buffer[start + length:]
        return opcode, payload

    def _frame_received(self, opcode: int, payload: bytes) -> None:
        if opcode in (WS_TEXT, WS_BINARY):
            self.handler.frame_received(self.codec.decode(payload))
        elif opcode == WS_PING:
            self._write_frame(WS_PONG, payload)
        elif opcode == WS_CLOSE:
            self.transport.loseConnection()

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = bytes((0x80 | opcode, 0x80 | length))
        elif length < 1 << 16:
            header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
        self.transport.write(header + mask + masked)

    def send_frame(self, data: bytes) -> None:
        self._write_frame(WS_BINARY if self.codec.binary else WS_TEXT, data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.is_open.called:
            self.is_open.errback(BenchError("the server closed the connection during the WebSocket handshake"))
        self.handler.closed()


class Connector:
    """Opens connections of one transport to one server; one factory serves them all."""

    def __init__(self, reactor: Any, codec: Codec, target: Target, slim: bool = False) -> None:
        """`slim`: WebSocket connections that will only authenticate and idle (`SlimWebSocketLink`)."""
        self._reactor = reactor
        self._codec = codec
        self._endpoint = TCP4ClientEndpoint(reactor, target.host, target.port_for(codec), timeout=CONNECT_TIMEOUT)
        if codec.websocket and slim:
            self._factory = Factory.forProtocol(SlimWebSocketLink)
            self._factory.host = f"{target.host}:{target.ws_port}"
        elif codec.websocket:
            self._factory = WebSocketClientFactory(f"ws://{target.host}:{target.ws_port}/", reactor=reactor)
            self._factory.protocol = WebSocketLink
            # Autobahn answers the server's pings itself; closing is abrupt at the end of a run.
            self._factory.setProtocolOptions(openHandshakeTimeout=CONNECT_TIMEOUT, closeHandshakeTimeout=1)
        else:
            self._factory = Factory.forProtocol(LineLink)
        self._factory.noisy = False

    async def open(self) -> _Link:
        """A connection whose handler is a fresh `Replies`, ready for setup requests."""
        link = await self._endpoint.connect(self._factory)
        link.codec = self._codec
        link.clock = self._reactor
        link.handler = Replies()
        if self._codec.websocket:
            await link.is_open
        return link
