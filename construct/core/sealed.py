"""Sealed sender: messages the server stores and delivers without learning who sent them.

A sealed send (`sendSealed {id, to, content, accessKey}`) needs no session: it is allowed by
the recipient's 16-byte unidentified-access key, registered with the recipient's bundle (or by
the recipient taking sealed messages from anyone), compared in constant time. An unknown
recipient and a wrong key get the same error after the same work: one lookup, one comparison.
The stored envelope has no sender field; its duplicate-send record holds a digest of the
content where a plain message's holds the sender. What is inside `content` (the sender's
certificate and the end-to-end encrypted message) only the recipient can read (docs/crypto.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from twisted.internet.defer import Deferred, ensureDeferred

from construct.core.validation import canonical_uuid, decode_base64
from construct.errors import ConstructError, invalid_format
from construct.storage.keys import AccessRecord, AccessUpdate

ACCESS_KEY_BYTES = 16
# The duplicate-send record of a sealed message names this and a digest of its content, not a sender.
SEALED_MARKER = "sealed:"


def access_denied() -> ConstructError:
    """The one answer to a sealed send that is not allowed, whatever the reason."""
    return ConstructError("UNIDENTIFIED_ACCESS_DENIED", "No such recipient, or the access key is not theirs", 401)


def parse_access_update(payload: Mapping[str, Any]) -> AccessUpdate:
    """`unidentifiedAccessKey` (base64 of 16 bytes; null removes it) and
    `unrestrictedUnidentifiedAccess` (a boolean), each optional: left out, it stays as it is."""
    update = AccessUpdate()
    if "unidentifiedAccessKey" in payload:
        raw = payload["unidentifiedAccessKey"]
        key = None if raw is None else base64.b64encode(
            decode_base64(raw, "unidentifiedAccessKey", "INVALID_FORMAT", ACCESS_KEY_BYTES)
        ).decode("ascii")
        update = AccessUpdate(set_key=True, key=key)
    if "unrestrictedUnidentifiedAccess" in payload:
        unrestricted = payload["unrestrictedUnidentifiedAccess"]
        if not isinstance(unrestricted, bool):
            raise invalid_format("'unrestrictedUnidentifiedAccess' must be true or false")
        update = AccessUpdate(update.set_key, update.key, unrestricted)
    return update


# Not frozen: one per message.
@dataclass(slots=True)
class SealedMessage:
    message_id: str
    recipient_id: str
    content: str
    access_key: bytes | None


def _bad_message(message: str) -> ConstructError:
    return ConstructError("INVALID_MESSAGE_FORMAT", message)


def parse_sealed_message(payload: Mapping[str, Any], max_content_bytes: int) -> SealedMessage:
    message_id = canonical_uuid(payload.get("id"), "id", "INVALID_MESSAGE_FORMAT")
    recipient_id = canonical_uuid(payload.get("to"), "to", "INVALID_MESSAGE_FORMAT")
    content = payload.get("content")
    if not isinstance(content, str) or not content:
        raise _bad_message("'content' must be a non-empty string")
    if len(content.encode("utf-8")) > max_content_bytes:
        raise ConstructError("MESSAGE_TOO_LARGE", f"'content' is larger than {max_content_bytes} bytes", 413)
    key = payload.get("accessKey")
    access_key = None if key is None else decode_base64(key, "accessKey", "INVALID_MESSAGE_FORMAT", ACCESS_KEY_BYTES)
    return SealedMessage(message_id, recipient_id, content, access_key)


def sealed_envelope(message: SealedMessage, accepted_at: int) -> dict:
    """What is stored and pushed: no sender, and the time the server accepted it (unix s), by
    which the recipient checks the certificate inside (a message may wait longer than one lives)."""
    return {"id": message.message_id, "to": message.recipient_id, "sealed": True, "content": message.content,
            "acceptedAt": accepted_at}


def sealed_marker(content: str) -> str:
    """Stands for the sender in the duplicate-send record: a resend of the same content is a
    duplicate, another message under the same id is refused, and no sender is kept."""
    return SEALED_MARKER + hashlib.sha256(content.encode("utf-8")).hexdigest()[:32]


class UnidentifiedAccess:
    """Whether a sealed send to a recipient is allowed, by the key it presents.

    Every check costs one lookup and one constant-time comparison of 16 bytes, against a
    random stand-in when the recipient is unknown or has no key, and nothing is remembered
    between checks: no answer comes sooner for an account that exists.
    """

    def __init__(self, lookup: Callable[[str], Awaitable[AccessRecord | None]]) -> None:
        self._lookup = lookup
        # Secret and random: no presented key matches them.
        self._stand_in = base64.b64encode(os.urandom(ACCESS_KEY_BYTES)).decode("ascii")
        self._nothing_presented = os.urandom(ACCESS_KEY_BYTES)

    def check(self, recipient_id: str, presented: bytes | None) -> Deferred:
        """Fires once allowed; fails with UNIDENTIFIED_ACCESS_DENIED otherwise."""
        return ensureDeferred(self._check(recipient_id, presented))

    async def _check(self, recipient_id: str, presented: bytes | None) -> None:
        record = await self._lookup(recipient_id)
        has_key = record is not None and record.access_key is not None
        stored = base64.b64decode(record.access_key if has_key else self._stand_in)
        matches = hmac.compare_digest(presented if presented is not None else self._nothing_presented, stored)
        if record is None or not (record.unrestricted or (has_key and presented is not None and matches)):
            raise access_denied()
