"""Sealed sender on the client: a ChatMessage sealed so that only its recipient learns who sent it.

The sender puts its sender certificate (construct.core.certificates: the server's signature
binding its user id to its master identity key) and the fields of its ratchet message into one
plaintext, and seals that to the recipient's X25519 identity key with libsodium's sealed box
(an ephemeral X25519 key and XSalsa20-Poly1305: anyone can seal, only the recipient can open):

    content = b64(crypto_box_seal(plaintext, recipient identity key))
    plaintext = 0x01 ‖ keyId(4) ‖ len(certificate)(2) ‖ certificate ‖ signature(64)
                ‖ ratchet key(32) ‖ N(4) ‖ timestamp(8) ‖ ratchet content (its raw bytes)

The ChatMessage is rebuilt on the recipient's side with `from` = the certificate's sender,
`to` = the recipient and `id` = the sealed message's id, all three bound by the ratchet's
associated data (crypto.md, "Envelope binding"), so a certificate cannot be put on a message of
someone else's. docs/crypto.md, "Sealed sender", has the rules a recipient checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nacl import bindings
from nacl.exceptions import CryptoError as _NaclError
from nacl.signing import VerifyKey

from construct.client.crypto import (
    KEY_SIZE,
    SIGNATURE_SIZE,
    CryptoError,
    DecryptionError,
    IdentityKeys,
    b64decode,
    b64encode,
)

SEALED_VERSION = 0x01
ACCESS_KEY_SIZE = 16


class InvalidCertificate(CryptoError):
    """A sender certificate that does not verify, has expired or is malformed."""


class UnknownServerKey(InvalidCertificate):
    """A certificate signed by a key the server's published keys do not include."""


@dataclass(frozen=True)
class SenderCertificate:
    """A certificate as the server signed it, and what it says."""

    key_id: int
    body: bytes
    signature: bytes
    sender_id: str
    identity_key: bytes
    expires: int

    @classmethod
    def parse(cls, key_id: int, body: bytes, signature: bytes) -> "SenderCertificate":
        """What the body says; the signature is not checked here (see `verify`)."""
        try:
            fields = json.loads(body.decode("utf-8"))
            sender_id, identity_key, expires = fields["senderId"], fields["identityKey"], fields["expires"]
            if fields["keyId"] != key_id or not isinstance(sender_id, str) or not _is_int(expires):
                raise ValueError("fields of the wrong kind")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise InvalidCertificate("is malformed") from exc
        return cls(key_id, body, signature, sender_id, b64decode(identity_key, InvalidCertificate, KEY_SIZE), expires)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SenderCertificate":
        """From a `senderCertificate` reply (or its copy in the state file)."""
        if not _is_int(data.get("keyId")):
            raise InvalidCertificate("has no key id")
        return cls.parse(
            data["keyId"], b64decode(data.get("certificate"), InvalidCertificate),
            b64decode(data.get("signature"), InvalidCertificate, SIGNATURE_SIZE),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"keyId": self.key_id, "certificate": b64encode(self.body), "signature": b64encode(self.signature),
                "expires": self.expires}

    def verify(self, server_keys: Mapping[int, bytes], at: float) -> None:
        """Signed by the server key it names, and not expired at `at` (unix seconds)."""
        public = server_keys.get(self.key_id)
        if public is None:
            raise UnknownServerKey(f"is signed by server key {self.key_id}, which the server does not publish")
        try:
            VerifyKey(public).verify(self.body, self.signature)
        except (_NaclError, ValueError, TypeError) as exc:
            raise InvalidCertificate("does not verify against the server's key") from exc
        if self.expires <= at:
            raise InvalidCertificate(f"expired at {self.expires}, before the message was accepted ({int(at)})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class OpenedMessage:
    """A sealed message opened: its certificate (not yet verified) and its ratchet message's fields."""

    certificate: SenderCertificate
    ephemeral_public_key: bytes
    message_number: int
    timestamp: int
    content: str

    def chat_message(self, message_id: str, recipient_id: str) -> dict[str, Any]:
        """The ChatMessage it carries, from the certificate's sender."""
        return {"id": message_id, "from": self.certificate.sender_id, "to": recipient_id,
                "ephemeralPublicKey": self.ephemeral_public_key, "messageNumber": self.message_number,
                "content": self.content, "timestamp": self.timestamp}


def seal(message: Mapping[str, Any], certificate: SenderCertificate, recipient_identity_key: bytes) -> str:
    """The `content` of a sealed send of `message` (a ChatMessage as kept in the outbox)."""
    raw = b64decode(message["content"])
    plaintext = b"".join((
        bytes([SEALED_VERSION]), certificate.key_id.to_bytes(4, "big"), len(certificate.body).to_bytes(2, "big"),
        certificate.body, certificate.signature, b64decode(message["ephemeralPublicKey"], length=KEY_SIZE),
        message["messageNumber"].to_bytes(4, "big"), message["timestamp"].to_bytes(8, "big"), raw,
    ))
    return b64encode(bindings.crypto_box_seal(plaintext, recipient_identity_key))


def open_sealed(content: Any, identity: IdentityKeys) -> OpenedMessage:
    """Open a sealed message with our identity key; DecryptionError if it is not for us or damaged."""
    sealed = b64decode(content, DecryptionError)
    try:
        plaintext = bindings.crypto_box_seal_open(sealed, identity.dh_public, identity.dh_private)
    except (_NaclError, ValueError, TypeError) as exc:
        raise DecryptionError("the sealed message does not open with our identity key") from exc
    if len(plaintext) < 7 or plaintext[0] != SEALED_VERSION:
        raise DecryptionError("not a sealed message of a version we know")
    key_id = int.from_bytes(plaintext[1:5], "big")
    body_end = 7 + int.from_bytes(plaintext[5:7], "big")
    fields_end = body_end + SIGNATURE_SIZE + KEY_SIZE + 4 + 8
    if len(plaintext) <= fields_end:
        raise DecryptionError("the sealed message is too short")
    signature_end = body_end + SIGNATURE_SIZE
    key_end = signature_end + KEY_SIZE
    certificate = SenderCertificate.parse(key_id, plaintext[7:body_end], plaintext[body_end:signature_end])
    return OpenedMessage(
        certificate, plaintext[signature_end:key_end], int.from_bytes(plaintext[key_end:key_end + 4], "big"),
        int.from_bytes(plaintext[key_end + 4:fields_end], "big"), b64encode(plaintext[fields_end:]),
    )
