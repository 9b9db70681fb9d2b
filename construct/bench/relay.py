"""The bare relay: the ceiling that framing and the event loop allow, with no storage or checks.

    python -m construct.bench.relay [--ws ENDPOINT] [--tcp ENDPOINT]

It speaks just enough of the protocol for the load generator to run unchanged: `register`,
`login` and `connect` succeed at once (the session token is the user id), `sendMessage` is
pushed as `message` to the recipient's latest connection and answered with `ack`, `ackMessage`
is ignored. WebSocket (Autobahn, set up as Construct sets up its own) and TCP JSON lines, with
the load generator's codecs. It logs "ws listening on HOST:PORT" and "tcp listening on ...".
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from construct.bench.wire import CODECS, TCP, WS_JSON, WS_MSGPACK, Codec
from construct.protocol.writes import CoalescedWrites, TurnWriter
from construct.protocol.ws import FastFrames

CHAT_MESSAGE_FIELDS = ("id", "from", "to", "ephemeralPublicKey", "messageNumber", "content", "timestamp")
SESSION_SECONDS = 30 * 24 * 3600
MESSAGE_TTL_SECONDS = 7 * 24 * 3600

log = Logger()


class RelaySession:
    """One client connection, whatever its framing."""

    def __init__(self, routes: dict[str, "RelaySession"], write: Callable[[bytes, Codec], None]) -> None:
        self._routes = routes
        self._write = write
        self._push_codec: Codec | None = None
        self.user_id: str | None = None

    def frame_received(self, data: bytes, codec: Codec) -> None:
        self._push_codec = codec
        message = codec.decode(data)
        kind = message.get("type")
        payload = message.get("payload") or {}
        if kind == "sendMessage":
            reply = self._relay(payload)
        elif kind == "ackMessage":
            return
        elif kind in ("register", "login"):
            reply = self._authenticate(kind + "Success", str(uuid.uuid4()), payload.get("username", ""))
        elif kind == "connect":
            reply = self._authenticate("connectSuccess", payload.get("sessionToken", ""), "")
        elif kind == "ping":
            reply = {"type": "pong"}
        else:
            reply = {"type": "error", "payload": {"code": "UNKNOWN_TYPE", "message": "not in the bare relay"}}
        if "requestId" in message:
            reply["requestId"] = message["requestId"]
        self._write(codec.encode(reply), codec)

    def _relay(self, payload: dict) -> dict:
        recipient = self._routes.get(payload.get("to"))
        if recipient is not None:
            recipient.push({name: payload.get(name) for name in CHAT_MESSAGE_FIELDS})
        return {
            "type": "ack",
            "payload": {"messageId": payload.get("id"), "status": "delivered",
                        "expiresAt": int(time.time()) + MESSAGE_TTL_SECONDS},
        }

    def _authenticate(self, reply_type: str, user_id: str, username: str) -> dict:
        self.disconnected()
        self.user_id = user_id
        self._routes[user_id] = self
        payload = {"userId": user_id, "username": username}
        if reply_type != "connectSuccess":
            payload.update(sessionToken=user_id, expires=int(time.time()) + SESSION_SECONDS)
        return {"type": reply_type, "payload": payload}

    def push(self, chat_message: dict) -> None:
        self._write(self._push_codec.encode({"type": "message", "payload": chat_message}), self._push_codec)

    def disconnected(self) -> None:
        if self.user_id is not None and self._routes.get(self.user_id) is self:
            del self._routes[self.user_id]


class RelayWebSocket(FastFrames, WebSocketServerProtocol):
    """With Construct's own framing of common frames and direct writes, so the ceiling is what
    the event loop allows with the framing Construct uses."""

    _session: RelaySession | None = None

    def onOpen(self) -> None:
        self._session = RelaySession(self.factory.routes, self._write)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._session.frame_received(payload, CODECS[WS_MSGPACK if isBinary else WS_JSON])

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._session is not None:
            self._session.disconnected()

    def _write(self, data: bytes, codec: Codec) -> None:
        self.send_message(data, codec.binary)


class RelayLines(CoalescedWrites, Protocol):
    _partial = b""

    def connectionMade(self) -> None:
        self._session = RelaySession(self.factory.routes, self._write)

    def dataReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._session.frame_received(line, CODECS[TCP])

    def connectionLost(self, reason: Any = None) -> None:
        self._session.disconnected()

    def _write(self, data: bytes, codec: Codec) -> None:
        self.write_soon(data)


def websocket_factory(routes: dict, reactor: Any) -> WebSocketServerFactory:
    factory = WebSocketServerFactory(server="Construct bare relay")
    factory.protocol = RelayWebSocket
    factory.routes = routes
    factory.writer = TurnWriter(reactor)
    factory.noisy = False
    factory.setProtocolOptions(
        autoPingInterval=30, autoPingTimeout=30, openHandshakeTimeout=10, webStatus=False, failByDrop=False,
        allowNullOrigin=True,
    )
    return factory


def lines_factory(routes: dict, reactor: Any) -> Factory:
    factory = Factory.forProtocol(RelayLines)
    factory.routes = routes
    factory.writer = TurnWriter(reactor)
    factory.noisy = False
    return factory


def _listen(reactor: Any, name: str, endpoint: str, factory: Any) -> None:
    def listening(port: Any) -> None:
        address = port.getHost()
        log.info("{name} listening on {host}:{port}", name=name, host=address.host, port=address.port)

    def failed(failure: Any) -> None:
        log.failure("cannot listen for {name} on {endpoint}", failure, name=name, endpoint=endpoint)
        reactor.stop()

    serverFromString(reactor, endpoint).listen(factory).addCallbacks(listening, failed)


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m construct.bench.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ws", default="tcp:0:interface=127.0.0.1", help="WebSocket endpoint (Twisted syntax)")
    parser.add_argument("--tcp", default="tcp:0:interface=127.0.0.1", help="TCP JSON-lines endpoint")
    arguments = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    routes: dict[str, RelaySession] = {}
    _listen(reactor, "ws", arguments.ws, websocket_factory(routes, reactor))
    _listen(reactor, "tcp", arguments.tcp, lines_factory(routes, reactor))
    reactor.run()


if __name__ == "__main__":
    main()
