"""What the load generator puts on the wire: codecs per transport, prebuilt sends, key bundles."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
from orjson import dumps as json_dumps, loads as json_loads

from construct.client.crypto import IdentityKeys, SignedPrekey, make_key_bundle

WS_MSGPACK = "ws-msgpack"
WS_JSON = "ws-json"
TCP = "tcp"
TRANSPORTS = (WS_MSGPACK, WS_JSON, TCP)

PASSWORD = "Bench-Password-1"
# The server never looks inside a message, so one key serves every message of a run.
EPHEMERAL_KEY = bytes(range(32))
# Every messageNumber is NUMBER_BASE + n: always ten JSON digits and a 4-byte MessagePack uint32,
# so a number can be written into a prebuilt frame without changing its layout.
NUMBER_BASE = 1_000_000_000
STAMP_DIGITS = 20
_ID_MARK = "!" * 12
_STAMP_MARK = "#" * STAMP_DIGITS
_NUMBER_MARK = 2**32 - 1


def _msgpack_number(value: int) -> bytes:
    return b"\xce" + value.to_bytes(4, "big")


def _json_number(value: int) -> bytes:
    return b"%d" % value


@dataclass(frozen=True)
class Codec:
    """How one transport writes protocol messages."""

    transport: str
    encode: Callable[[dict], bytes]
    decode: Callable[[bytes], dict]
    # How ephemeralPublicKey and a messageNumber are spelled in this encoding.
    key: Callable[[bytes], Any]
    number: Callable[[int], bytes]

    @property
    def websocket(self) -> bool:
        return self.transport != TCP

    @property
    def binary(self) -> bool:
        return self.transport == WS_MSGPACK


def _pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CODECS = {
    WS_MSGPACK: Codec(WS_MSGPACK, _pack, _unpack, bytes, _msgpack_number),
    WS_JSON: Codec(WS_JSON, json_dumps, json_loads, _base64, _json_number),
    # A line is the JSON text and its "\n", so a prebuilt frame is written with one call.
    TCP: Codec(TCP, lambda message: json_dumps(message) + b"\n", json_loads, _base64, _json_number),
}


class SendFrames:
    """One sender's sendMessage frames, encoded once before the run.

    Per message only the last 12 hex digits of the id, the messageNumber and the send time
    (monotonic ns, at the start of `content`, which the server never reads) are filled in.
    """

    def __init__(self, codec: Codec, sender_id: str, recipient_id: str, content_bytes: int) -> None:
        self.id_prefix = str(uuid.uuid4())[:24]
        payload = {
            "id": self.id_prefix + _ID_MARK,
            "from": sender_id,
            "to": recipient_id,
            "ephemeralPublicKey": codec.key(EPHEMERAL_KEY),
            "messageNumber": _NUMBER_MARK,
            "content": _STAMP_MARK + "x" * max(0, content_bytes - STAMP_DIGITS),
            "timestamp": int(time.time()),
        }
        frame = codec.encode({"type": "sendMessage", "payload": payload})
        self._head, rest = frame.split(_ID_MARK.encode())
        self._middle, rest = rest.split(codec.number(_NUMBER_MARK))
        self._before_stamp, self._tail = rest.split(_STAMP_MARK.encode())
        self._number = codec.number

    def frame(self, n: int, sent_ns: int) -> bytes:
        return b"".join(
            (self._head, b"%012x" % n, self._middle, self._number(NUMBER_BASE + n), self._before_stamp,
             b"%020d" % sent_ns, self._tail)
        )


def sent_ns_of(content: str) -> int:
    return int(content[:STAMP_DIGITS])


def key_bundle() -> dict:
    """A publicKey whose signature verifies, as `register` requires: the reference client's own."""
    return make_key_bundle(IdentityKeys.generate(), SignedPrekey.generate())