"""Sending and acknowledging messages: validate, store durably, then wake the recipient."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.core.abuse import AbuseLimits
from construct.core.limits import Allowance
from construct.core.sealed import (
    SealedMessage,
    UnidentifiedAccess,
    access_denied,
    parse_sealed_message,
    sealed_envelope,
    sealed_marker,
)
from construct.core.validation import canonical_uuid, decode_base64
from construct.delivery.ports import Inbox, WakeUps
from construct.delivery.types import Accepted, InboxEntry, Submission
from construct.errors import ConstructError, user_not_found_error

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_QUOTA = 10_000
DEFAULT_MAX_CONTENT_BYTES = 64 * 1024
MAX_ACK_IDS = 1000


def _then(first: Deferred | None, then: Deferred) -> Deferred:
    """`then`, once `first` (if any) has fired."""
    return then if first is None else first.addCallback(lambda _: then)


def _found(exists: bool) -> None:
    if not exists:
        raise user_not_found_error()


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


def sender_digest(salt: bytes, sender: str, message_id: str) -> str:
    """What a duplicate-send record keeps of the sender: a resend from the same sender matches,
    another sender's message under that id does not, and without the salt neither the sender
    nor a link between two records of one sender can be read from it (128 bits, hex)."""
    return hmac.new(salt, f"{sender}\n{message_id}".encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def encode_envelope(message: dict) -> str:
    key = binascii.b2a_base64(message["ephemeralPublicKey"], newline=False).decode("ascii")
    stored = dict(message, ephemeralPublicKey=key)
    return orjson.dumps(stored).decode("utf-8")


def decode_envelope(envelope: str) -> dict:
    message = orjson.loads(envelope)
    if "ephemeralPublicKey" in message:  # a sealed envelope has none
        message["ephemeralPublicKey"] = base64.b64decode(message["ephemeralPublicKey"])
    return message


def _denied_if_gone(failure: Failure) -> Failure:
    """A recipient deleted between the access check and the store is refused like any unknown one."""
    if failure.check(ConstructError) and failure.value.code == "USER_NOT_FOUND":
        raise access_denied()
    return failure


DELIVERED = "delivered"
QUEUED = "queued"
# A sealed send's ack says nothing of the recipient's presence.
SEALED = "sealed"


# Not frozen: one per message, and a frozen dataclass is several times slower to build.
@dataclass(slots=True)
class SendResult:
    message_id: str
    # "delivered": a connection of the recipient was attached somewhere when it was stored;
    # "queued": it waits in the inbox for the next one.
    status: str
    expires_at_ms: int
    duplicate: bool


class MessageService:
    """The delivery contract's write side (DESIGN.md §3): accepted means stored."""

    log = Logger()

    def __init__(
        self,
        inbox: Inbox,
        held_here: Callable[[str], bool],
        wakeups: WakeUps,
        clock: IReactorTime,
        limits: AbuseLimits,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        quota: int = DEFAULT_QUOTA,
        max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
        recipient_exists: Callable[[str], bool | Deferred] | None = None,
        access: UnidentifiedAccess | None = None,
        record_salt: bytes = b"",
    ) -> None:
        """`held_here`: a connection of the user is attached to this process. `recipient_exists`
        is for an inbox that cannot check it in its own store (Redis): True when known at once,
        else a Deferred firing with whether the user exists. `access` decides sealed sends
        (none: every sealed send is refused). `record_salt`, a secret every instance shares,
        keys the digests of senders in the duplicate-send records."""
        self._record_salt = record_salt
        self._inbox = inbox
        self._held_here = held_here
        self._wakeups = wakeups
        self._clock = clock
        self._limits = limits
        self._ttl_ms = int(ttl_seconds * 1000)
        self._quota = quota
        self.max_content_bytes = max_content_bytes
        self._recipient_exists = recipient_exists
        self._access = access
        # sender id (for sealed sends: "sealed:" and the recipient id) -> fires once the latest
        # send waiting for a check has been issued to the inbox, so the next one is issued after it.
        self._store_turns: dict[str, Deferred] = {}

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def send(self, sender_id: str, payload: dict) -> Deferred:
        """Store a message; fires with its SendResult. One sender's messages are issued to the
        inbox, which keeps the order it is given (Inbox.put), in the order of these calls, also
        when a connection makes the next call before this one is answered (FIFO per recipient).

        Callbacks, not a coroutine: this runs for every message, and its checks are mostly
        answered at once.
        """
        try:
            message = parse_chat_message(payload, self.max_content_bytes)
            if message["from"] != sender_id:
                raise ConstructError("FORBIDDEN", "'from' must be the authenticated user", 403)
            waiting = self._limits.check_send(sender_id, message["to"])
            if self._recipient_exists is not None:
                exists = self._recipient_exists(message["to"])
                if exists is not True:
                    waiting = _then(waiting, exists).addCallback(_found)
        except Exception:
            return fail()
        previous = self._store_turns.get(sender_id)
        if waiting is None and previous is None:
            # Nothing to wait for: issued now, and the sender's next message follows it.
            try:
                stored = self._store(sender_id, message)
            except Exception:
                return fail()
            return stored.addCallback(self._stored, message)
        stored = self._in_turn(sender_id, waiting, previous, self._store, sender_id, message)
        return stored.addCallback(self._stored, message)

    def _in_turn(self, key: str, waiting: Deferred | None, previous: Deferred | None, store: Callable[..., Deferred],
                 *args: Any) -> Deferred:
        """`store(*args)` once `waiting` has fired, after the sends queued before it under `key`."""
        turn: Deferred = Deferred()
        self._store_turns[key] = turn
        if previous is not None:
            waiting = _then(waiting, previous)
        return (waiting or succeed(None)).addCallbacks(
            self._issue, self._refused, callbackArgs=(key, turn, store, *args), errbackArgs=(key, turn)
        )

    def _issue(self, _: None, key: str, turn: Deferred, store: Callable[..., Deferred], *args: Any) -> Deferred:
        try:
            return store(*args)
        finally:
            self._pass_turn(key, turn)

    def _refused(self, failure: Failure, key: str, turn: Deferred) -> Failure:
        self._pass_turn(key, turn)
        return failure

    def _store(self, sender_id: str, message: dict) -> Deferred:
        recipient, message_id = message["to"], message["id"]
        return self._inbox.put(Submission(
            sender_id, recipient, message_id, encode_envelope(message), self._held_here(recipient),
            self._now_ms(), self._ttl_ms, self._quota, sender_digest(self._record_salt, sender_id, message_id),
        ))

    def _stored(self, accepted: Accepted, message: dict) -> SendResult:
        self._wake(accepted, message)
        return SendResult(message["id"], DELIVERED if accepted.reached else QUEUED, accepted.expires_at_ms,
                          accepted.duplicate)

    def _wake(self, accepted: Accepted, message: dict) -> None:
        # Only after the write is durable; a duplicate was announced the first time.
        if not accepted.duplicate:
            try:
                self._wakeups.stored(message["to"], accepted, message)
            except Exception:
                # The message is stored: its sender is told so, and the recipient reads it later.
                self.log.failure("waking the recipient of a stored message failed")

    def _pass_turn(self, key: str, turn: Deferred) -> None:
        if self._store_turns.get(key) is turn:
            del self._store_turns[key]
        if not turn.called:
            turn.callback(None)

    def send_sealed(self, payload: dict, address: str, allowance: Allowance | None) -> Deferred:
        """Store a sealed message (construct.core.sealed); fires with its SendResult, whose
        status says nothing of the recipient. Limits first (the connection's, the address's),
        then the access check, then the recipient's limit; the sealed messages to one recipient
        are issued to the inbox in the order of these calls."""
        try:
            message = parse_sealed_message(payload, self.max_content_bytes)
            self._limits.check_sealed_connection(allowance, self._clock.seconds())
            waiting = (self._limits.check_sealed_address(address) or succeed(None)).addCallback(self._allowed, message)
        except Exception:
            return fail()
        key = f"sealed:{message.recipient_id}"
        return self._in_turn(key, waiting, self._store_turns.get(key), self._store_sealed, message)

    def _allowed(self, _: None, message: SealedMessage) -> Deferred:
        if self._access is None:
            raise access_denied()
        recipient = message.recipient_id
        return self._access.check(recipient, message.access_key).addCallback(
            lambda _: self._limits.check_sealed_recipient(recipient)
        )

    def _store_sealed(self, message: SealedMessage) -> Deferred:
        """The one place a sealed message is submitted. What a recipient may be sent (the inbox
        quota) applies as to any message; nothing can charge its sender, whom nobody here knows."""
        now_ms = self._now_ms()
        envelope = sealed_envelope(message, now_ms // 1000)
        recipient, marker = message.recipient_id, sealed_marker(message.content)
        stored = self._inbox.put(Submission(
            marker, recipient, message.message_id, orjson.dumps(envelope).decode("utf-8"),
            self._held_here(recipient), now_ms, self._ttl_ms, self._quota,
            sender_digest(self._record_salt, marker, message.message_id),
        ))
        return stored.addCallbacks(self._stored_sealed, _denied_if_gone, callbackArgs=(envelope,))

    def _stored_sealed(self, accepted: Accepted, envelope: dict) -> SendResult:
        self._wake(accepted, envelope)
        return SendResult(envelope["id"], SEALED, accepted.expires_at_ms, accepted.duplicate)

    def ack(self, user_id: str, message_ids: Any) -> Deferred:
        """Remove acknowledged messages; fires with, for each one removed, seconds since it was accepted."""
        try:
            if not isinstance(message_ids, list) or not 0 < len(message_ids) <= MAX_ACK_IDS:
                raise ConstructError("INVALID_FORMAT", f"'messageIds' must be a list of 1 to {MAX_ACK_IDS} ids")
            ids = [canonical_uuid(value, "messageIds[]") for value in message_ids]
            removed = self._inbox.ack(user_id, ids)
        except Exception:
            return fail()
        now_ms = self._now_ms()
        return removed.addCallback(lambda accepted: [(now_ms - accepted_ms) / 1000 for accepted_ms in accepted])

    async def pending(self, user_id: str, limit: int) -> list[InboxEntry]:
        return await self._inbox.fetch(user_id, 0, limit, self._now_ms())

    async def expire(self) -> int:
        return await self._inbox.expire(self._now_ms())
