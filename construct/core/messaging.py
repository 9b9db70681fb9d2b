"""Sending and acknowledging messages: validate, store durably, then wake the recipient."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson
from twisted.internet.interfaces import IReactorTime

from construct.core.validation import canonical_uuid, decode_base64
from construct.delivery.types import Accepted, InboxEntry, Submission
from construct.errors import ConstructError

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_QUOTA = 10_000
DEFAULT_MAX_CONTENT_BYTES = 64 * 1024
MAX_ACK_IDS = 1000


def _bad_message(message: str) -> ConstructError:
    return ConstructError("INVALID_MESSAGE_FORMAT", message)


def parse_chat_message(payload: dict, max_content_bytes: int) -> dict:
    """The seed's ChatMessage, checked and with canonical ids; unknown fields are dropped."""
    message = {
        "id": canonical_uuid(payload.get("id"), "id", "INVALID_MESSAGE_FORMAT"),
        "from": canonical_uuid(payload.get("from"), "from", "INVALID_MESSAGE_FORMAT"),
        "to": canonical_uuid(payload.get("to"), "to", "INVALID_MESSAGE_FORMAT"),
    }
    key = payload.get("ephemeralPublicKey")
    if isinstance(key, str):
        key = decode_base64(key, "ephemeralPublicKey", "INVALID_MESSAGE_FORMAT")
    if not isinstance(key, bytes) or len(key) != 32:
        raise _bad_message("'ephemeralPublicKey' must be 32 bytes (MessagePack bin or base64)")
    message["ephemeralPublicKey"] = key
    number = payload.get("messageNumber")
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**32:
        raise _bad_message("'messageNumber' must be an unsigned 32-bit integer")
    message["messageNumber"] = number
    content = payload.get("content")
    if not isinstance(content, str) or not content:
        raise _bad_message("'content' must be a non-empty string")
    if len(content.encode("utf-8")) > max_content_bytes:
        raise ConstructError(
            "MESSAGE_TOO_LARGE", f"'content' is larger than {max_content_bytes} bytes", 413
        )
    message["content"] = content
    timestamp = payload.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or not 0 <= timestamp < 2**64:
        raise _bad_message("'timestamp' must be an unsigned integer (unix seconds)")
    message["timestamp"] = timestamp
    return message


def encode_envelope(message: dict) -> str:
    stored = dict(message, ephemeralPublicKey=base64.b64encode(message["ephemeralPublicKey"]).decode("ascii"))
    return orjson.dumps(stored).decode("utf-8")


def decode_envelope(envelope: str) -> dict:
    message = orjson.loads(envelope)
    message["ephemeralPublicKey"] = base64.b64decode(message["ephemeralPublicKey"])
    return message


@dataclass(frozen=True)
class SendResult:
    message_id: str
    accepted: Accepted


class MessageService:
    """The delivery contract's write side (DESIGN.md §3): accepted means stored."""

    def __init__(
        self,
        inbox: Any,
        is_online: Callable[[str], Awaitable[bool]],
        on_stored: Callable[[str, int | None, dict], None],
        clock: IReactorTime,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        quota: int = DEFAULT_QUOTA,
        max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
    ) -> None:
        self._inbox = inbox
        self._is_online = is_online
        self._on_stored = on_stored
        self._clock = clock
        self._ttl_ms = int(ttl_seconds * 1000)
        self._quota = quota
        self.max_content_bytes = max_content_bytes

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def send(self, sender_id: str, payload: dict) -> SendResult:
        message = parse_chat_message(payload, self.max_content_bytes)
        if message["from"] != sender_id:
            raise ConstructError("FORBIDDEN", "'from' must be the authenticated user", 403)
        status = "delivered" if await self._is_online(message["to"]) else "queued"
        accepted = await self._inbox.put(
            Submission(
                sender_id, message["to"], message["id"], encode_envelope(message), status,
                self._now_ms(), self._ttl_ms, self._quota,
            )
        )
        # Only after the write committed; a duplicate was already announced the first time.
        if not accepted.duplicate:
            self._on_stored(message["to"], accepted.seq, message)
        return SendResult(message["id"], accepted)

    async def ack(self, user_id: str, message_ids: Any) -> list[float]:
        """Remove acknowledged messages; return, for each one removed, seconds since it was accepted."""
        if not isinstance(message_ids, list) or not 0 < len(message_ids) <= MAX_ACK_IDS:
            raise ConstructError("INVALID_FORMAT", f"'messageIds' must be a list of 1 to {MAX_ACK_IDS} ids")
        ids = [canonical_uuid(value, "messageIds[]") for value in message_ids]
        now_ms = self._now_ms()
        return [(now_ms - accepted_ms) / 1000 for accepted_ms in await self._inbox.ack(user_id, ids)]

    async def pending(self, user_id: str, limit: int) -> list[InboxEntry]:
        return await self._inbox.fetch(user_id, 0, limit, self._now_ms())

    async def expire(self) -> int:
        return await self._inbox.expire(self._now_ms())
