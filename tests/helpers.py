"""Test helpers: key bundles, chat messages, and an in-memory client of the core."""

from __future__ import annotations

import base64
import json
import os
import uuid

import msgpack
from nacl.signing import SigningKey
from twisted.internet import defer, reactor

from construct.protocol import codec
from construct.protocol.connection import ClientConnection
from construct.protocol.timeouts import ConnectionLimits

PASSWORD = "CorrectHorse9"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_bundle(user_id: str = "", signing_key: SigningKey | None = None, **bundle_data) -> dict:
    """A correctly signed UploadableKeyBundle (overrides go into BundleData)."""
    signing_key = signing_key or SigningKey.generate()
    data = {
        "userId": user_id,
        "timestamp": "2026-01-02T10:00:00Z",
        "supportedSuites": [{"suiteId": 1, "identityKey": b64(os.urandom(32)), "signedPrekey": b64(os.urandom(32))}],
    }
    data.update(bundle_data)
    raw = json.dumps(data).encode()
    return {
        "masterIdentityKey": b64(bytes(signing_key.verify_key)),
        "bundleData": b64(raw),
        "signature": b64(signing_key.sign(raw).signature),
    }


def chat_message(sender: str, recipient: str, content: str = "Y2lwaGVydGV4dA==", **fields) -> dict:
    message = {
        "id": str(uuid.uuid4()),
        "from": sender,
        "to": recipient,
        "ephemeralPublicKey": os.urandom(32),
        "messageNumber": 0,
        "content": content,
        "timestamp": 1_767_348_000,
    }
    message.update(fields)
    return message


def decode_server_frame(data: bytes, encoding: str) -> dict:
    if encoding == codec.MSGPACK:
        return msgpack.unpackb(data, raw=False)
    return json.loads(data)


class MemoryClient:
    """A live connection of the core with an in-memory transport."""

    def __init__(self, core, encoding: str = codec.JSON, address: str = "192.0.2.1",
                 limits: ConnectionLimits = ConnectionLimits(), clock=None) -> None:
        self.encoding = encoding
        self.received: defer.DeferredQueue = defer.DeferredQueue()
        self.closed = False
        # What the connection last told its transport: read the client, or stop.
        self.reading = True
        self.connection = ClientConnection(core, "memory", self, 256 * 1024, address, limits, clock or reactor)

    # The connection's Transport

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def abort(self) -> None:
        self.closed = True

    def write_frame(self, data: bytes, encoding: str) -> None:
        self.received.put(decode_server_frame(data, encoding))

    def send(self, message_type: str, payload: dict | None = None, request_id: str | None = None) -> None:
        self.send_raw(codec.encode(message_type, payload or {}, request_id, self.encoding))

    def send_raw(self, data: bytes, encoding: str | None = None) -> None:
        self.connection.frame_received(data, encoding or self.encoding)

    async def next(self, timeout: float = 5.0) -> dict:
        return await self.received.get().addTimeout(timeout, reactor)

    async def next_of(self, message_type: str, timeout: float = 5.0) -> dict:
        """The next frame of a type, skipping others (pushes interleave with replies)."""
        while True:
            frame = await self.next(timeout)
            if frame["type"] == message_type:
                return frame

    async def request(self, message_type: str, payload: dict | None = None) -> dict:
        self.send(message_type, payload)
        return await self.next()

    def pending(self) -> list:
        return list(self.received.pending)

    def close(self) -> None:
        self.connection.connection_lost()


async def error_reply(client: MemoryClient, message_type: str, payload: dict) -> dict:
    """The payload of the `error` the request must get."""
    reply = await client.request(message_type, payload)
    assert reply["type"] == "error", reply
    return reply["payload"]


async def register(core, username: str, encoding: str = codec.JSON) -> tuple[MemoryClient, dict]:
    """A MemoryClient registered (and so logged in) as `username`; returns it and registerSuccess's payload."""
    client = MemoryClient(core, encoding)
    reply = await client.request("register", {"username": username, "password": PASSWORD, "publicKey": make_bundle()})
    assert reply["type"] == "registerSuccess", reply
    return client, reply["payload"]
