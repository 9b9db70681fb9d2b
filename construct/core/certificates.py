"""Sender certificates (sealed sender): the server vouches that a user id has an identity key.

A certificate is the compact JSON

    {"keyId":1,"senderId":"<uuid>","identityKey":"<b64 of the 32-byte Ed25519 master key>","expires":<unix s>}

signed (Ed25519, over exactly those bytes) by the server key `keyId`. An authenticated user
gets one for itself (`getSenderCertificate`) and puts it inside each sealed message, where
only the recipient reads it; anyone may fetch the server's public keys (`getServerKeys`) to
verify it. The server signs nothing else with these keys. docs/crypto.md has the format.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import orjson
from nacl.signing import SigningKey
from twisted.internet.interfaces import IReactorTime

from construct.errors import user_not_found_error
from construct.storage.keys import KeyStore

DEFAULT_LIFETIME_SECONDS = 24 * 3600


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class ServerKey:
    """One Ed25519 signing key of the server: its id, its 32-byte seed, when it was made (unix s)."""

    key_id: int
    seed: bytes
    created_at: int

    @property
    def public_key(self) -> bytes:
        return bytes(SigningKey(self.seed).verify_key)

    def sign(self, data: bytes) -> bytes:
        return SigningKey(self.seed).sign(data).signature


@dataclass(frozen=True)
class ServerKeys:
    """The server's signing keys, newest first: the first signs, the others are published until
    the certificates they signed have expired (a rotation keeps them for a while)."""

    keys: tuple[ServerKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("at least one server key is needed")

    @classmethod
    def generate(cls, now: float, key_id: int = 1) -> "ServerKeys":
        return cls((ServerKey(key_id, os.urandom(32), int(now)),))

    @property
    def current(self) -> ServerKey:
        return self.keys[0]

    def public(self) -> list[dict]:
        return [{"keyId": key.key_id, "publicKey": _b64(key.public_key)} for key in self.keys]


def certificate_body(key_id: int, sender_id: str, identity_key: str, expires: int) -> bytes:
    """The signed bytes: compact JSON, these fields in this order."""
    return orjson.dumps({"keyId": key_id, "senderId": sender_id, "identityKey": identity_key, "expires": expires})


class CertificateService:
    """Issues sender certificates; `keys` may be replaced while running (a rotated key file)."""

    def __init__(self, store: KeyStore, clock: IReactorTime, keys: ServerKeys,
                 lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS) -> None:
        self._store = store
        self._clock = clock
        self.keys = keys
        self._lifetime = lifetime_seconds

    async def issue(self, user_id: str) -> dict:
        """A certificate binding the user's id to the master identity key of its bundle."""
        published = await self._store.get_bundle(user_id)
        if published is None:
            raise user_not_found_error()
        key = self.keys.current
        expires = int(self._clock.seconds()) + self._lifetime
        # Canonical base64: the bundle's is as uploaded, which may not be.
        identity_key = _b64(base64.b64decode(published.bundle.master_identity_key))
        body = certificate_body(key.key_id, user_id, identity_key, expires)
        return {"keyId": key.key_id, "certificate": _b64(body), "signature": _b64(key.sign(body)), "expires": expires}

    def public_keys(self) -> list[dict]:
        return self.keys.public()
