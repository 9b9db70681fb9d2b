"""Frames <-> protocol messages: JSON text and MessagePack binary, one shape for both.

Every message is {"type": str, "payload": {...}, "requestId"?: str}. Byte fields are
MessagePack bin, or standard base64 strings in JSON.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson

from construct.errors import ConstructError

JSON = "json"
MSGPACK = "msgpack"
MAX_REQUEST_ID_LENGTH = 128
# One packer for the process (the reactor thread): msgpack.packb builds a new one every call.
_PACKER = msgpack.Packer(use_bin_type=True)


# Not frozen: one per message, and a frozen dataclass is several times slower to build.
@dataclass(slots=True)
class Frame:
    type: str
    payload: dict
    request_id: str | None


class FrameError(ConstructError):
    """A frame that cannot be dispatched; carries the requestId when it could be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__("INVALID_FORMAT", message)
        self.request_id = request_id


def _invalid(message: str) -> FrameError:
    return FrameError(message)


def decode(data: bytes, encoding: str) -> Frame:
    """Parse one frame; any malformation is a FrameError, never another exception."""
    try:
        if encoding == MSGPACK:
            message = msgpack.unpackb(data, raw=False, strict_map_key=True)
        else:
            message = orjson.loads(data)
    except Exception:
        kind = "MessagePack" if encoding == MSGPACK else "JSON"
        raise _invalid(f"Invalid message format: not a {kind} message") from None
    if not isinstance(message, dict):
        raise _invalid("Invalid message format: expected an object with 'type' and 'payload'")
    request_id = message.get("requestId")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_LENGTH):
        raise _invalid(f"'requestId' must be a string of at most {MAX_REQUEST_ID_LENGTH} characters")
    message_type = message.get("type")
    payload = message.get("payload", {})
    if not isinstance(message_type, str) or not isinstance(payload, dict):
        raise FrameError(
            "Invalid message format: 'type' must be a string and 'payload' an object", request_id
        )
    return Frame(message_type, payload, request_id)


def request_id_of(data: bytes, encoding: str) -> str | None:
    """The requestId of a frame, if it has a readable one (for replies to frames not acted on)."""
    try:
        return decode(data, encoding).request_id
    except FrameError as e:
        return e.request_id


def _bytes_as_base64(value: Any) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_bytes(value: Any) -> bytes:
    """Compact JSON, bytes as standard base64 strings."""
    return orjson.dumps(value, default=_bytes_as_base64)


def encode(message_type: str, payload: dict | None, request_id: str | None, encoding: str) -> bytes:
    message: dict[str, Any] = {"type": message_type}
    if payload is not None:
        message["payload"] = payload
    if request_id is not None:
        message["requestId"] = request_id
    if encoding == MSGPACK:
        return _PACKER.pack(message)
    return json_bytes(message)
