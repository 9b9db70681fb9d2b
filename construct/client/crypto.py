"""Primitives and wire formats of the Construct client.

Every primitive comes from PyNaCl (libsodium). The one exception is
HMAC-SHA256 (and HKDF built on it), which PyNaCl does not expose; it comes
from the standard library's ``hmac`` and ``hashlib``.

See ``docs/crypto.md`` for the byte layouts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, TypeGuard

from nacl import bindings
from nacl.exceptions import CryptoError as _NaclError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

KEY_SIZE = 32
SIGNATURE_SIZE = 64
NONCE_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
SUITE_CLASSIC_X25519 = 1
# The X3DH header uses this id to say "no one-time prekey", so it is never a key id.
NO_ONE_TIME_PREKEY = 0xFFFFFFFF
PAD_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# One byte of every bucket is taken by the 0x80 padding marker.
MAX_PLAINTEXT = PAD_BUCKETS[-1] - 1
SAFETY_NUMBER_ITERATIONS = 5200

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


class CryptoError(Exception):
    """Base class of every error raised by the client cryptography."""


class InvalidBundle(CryptoError):
    """A key bundle or one-time prekey is malformed or not properly signed."""


class DecryptionError(CryptoError):
    """A ciphertext could not be authenticated or decoded."""


class MessageTooLarge(CryptoError):
    """A plaintext is longer than the largest padding bucket allows."""


class ReplayError(CryptoError):
    """A message (or the one-time prekey it names) was already consumed."""


class TooManySkipped(CryptoError):
    """A message would require skipping more message keys than allowed."""


# -- encoding helpers ------------------------------------------------------


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as used on the wire."""
    return base64.b64encode(data).decode("ascii")


def b64decode(
    text: object, error: type[CryptoError] = CryptoError, length: int | None = None
) -> bytes:
    """Decode canonical standard base64, raising ``error`` on anything else.

    Non-canonical encodings (whitespace, non-zero padding bits) are refused
    so that one byte string has exactly one text form.
    """
    if not isinstance(text, str):
        raise error("expected a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise error("invalid base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise error("non-canonical base64")
    if length is not None and len(raw) != length:
        raise error(f"expected {length} bytes, got {len(raw)}")
    return raw


# -- primitives ------------------------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with ``info``."""
    if not 0 <= length <= 255 * hashlib.sha256().digest_size:
        raise ValueError("HKDF-SHA256 output length out of range")
    # RFC 5869 2.2: a missing salt is HashLen zero bytes.
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


# Where the ratchet and X3DH take their randomness from: os.urandom, except in tests that
# produce deterministic test vectors.
RandomBytes = Callable[[int], bytes]


def generate_x25519(random_bytes: RandomBytes = os.urandom) -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as ``(private, public)`` raw bytes."""
    private = PrivateKey(random_bytes(KEY_SIZE))
    return bytes(private), bytes(private.public_key)


def x25519_public(private_key: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    return bindings.crypto_scalarmult_base(private_key)


def x25519(
    private_key: bytes, public_key: bytes, error: type[CryptoError] = CryptoError
) -> bytes:
    """X25519 shared secret; raises ``error`` for a bad or low-order public key."""
    if not isinstance(public_key, bytes) or len(public_key) != KEY_SIZE:
        raise error("X25519 public key must be 32 bytes")
    try:
        shared = bindings.crypto_scalarmult(private_key, public_key)
    except _NaclError as exc:
        # libsodium refuses to return an all-zero result (low-order point).
        raise error("X25519 produced an all-zero shared secret") from exc
    if hmac.compare_digest(shared, bytes(KEY_SIZE)):
        raise error("X25519 produced an all-zero shared secret")
    return shared


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """XChaCha20-Poly1305-IETF (24-byte nonce); returns ciphertext followed by the 16-byte tag."""
    return bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, associated_data, nonce, key
    )


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises DecryptionError if not authentic."""
    try:
        return bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, associated_data, nonce, key
        )
    except _NaclError as exc:
        raise DecryptionError("message authentication failed") from exc


# -- padding ---------------------------------------------------------------


def pad(plaintext: bytes) -> bytes:
    """Pad to the smallest bucket with 0x80 then zeros (ISO/IEC 7816-4)."""
    if len(plaintext) > MAX_PLAINTEXT:
        raise MessageTooLarge(f"plaintext is {len(plaintext)} bytes, limit {MAX_PLAINTEXT}")
    size = next(bucket for bucket in PAD_BUCKETS if bucket > len(plaintext))
    return plaintext + b"\x80" + bytes(size - len(plaintext) - 1)


def unpad(padded: bytes) -> bytes:
    """Remove :func:`pad` padding; raises DecryptionError if it is malformed."""
    if len(padded) not in PAD_BUCKETS:
        raise DecryptionError("padded plaintext has no bucket size")
    stripped = padded.rstrip(b"\x00")
    if not stripped.endswith(b"\x80"):
        raise DecryptionError("invalid padding")
    return stripped[:-1]


# -- keys ------------------------------------------------------------------


def _check_key(value: object, name: str, size: int = KEY_SIZE) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise CryptoError(f"{name} must be {size} bytes")
    return value


def signed_prekey_id(public_key: bytes) -> int:
    """The id of a signed prekey: first 4 bytes of SHA-256(public), big-endian.

    BundleData has no field for a prekey id, so both sides derive it from the
    key the bundle signs.
    """
    return int.from_bytes(hashlib.sha256(public_key).digest()[:4], "big")


@dataclass(frozen=True, repr=False)
class IdentityKeys:
    """Long-term identity: Ed25519 master key (signing) and X25519 key (X3DH DH)."""

    signing_seed: bytes
    dh_private: bytes

    def __post_init__(self) -> None:
        _check_key(self.signing_seed, "Ed25519 seed")
        _check_key(self.dh_private, "X25519 private key")

    @classmethod
    def generate(cls) -> IdentityKeys:
        """New random identity keys."""
        return cls(os.urandom(KEY_SIZE), generate_x25519()[0])

    @property
    def master_public(self) -> bytes:
        """The Ed25519 public key (the account's ``masterIdentityKey``)."""
        return bytes(SigningKey(self.signing_seed).verify_key)

    @property
    def dh_public(self) -> bytes:
        """The X25519 identity public key (bundle ``identityKey``)."""
        return x25519_public(self.dh_private)

    def sign(self, data: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature over ``data``."""
        return SigningKey(self.signing_seed).sign(data).signature

    def to_dict(self) -> dict[str, str]:
        """Private form for the state file."""
        return {
            "masterSeed": b64encode(self.signing_seed),
            "identityPrivate": b64encode(self.dh_private),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IdentityKeys:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                b64decode(data["masterSeed"], length=KEY_SIZE),
                b64decode(data["identityPrivate"], length=KEY_SIZE),
            )
        except (KeyError, TypeError) as exc:
            raise CryptoError("malformed identity keys") from exc

    def __repr__(self) -> str:
        return f"IdentityKeys(master_public={self.master_public.hex()})"


@dataclass(frozen=True, repr=False)
class SignedPrekey:
    """A signed prekey pair; its id is derived from the public key."""

    private: bytes

    def __post_init__(self) -> None:
        _check_key(self.private, "signed prekey")

    @classmethod
    def generate(cls) -> SignedPrekey:
        """A new random signed prekey."""
        return cls(generate_x25519()[0])

    @property
    def public(self) -> bytes:
        """The X25519 public key."""
        return x25519_public(self.private)

    @property
    def key_id(self) -> int:
        """See :func:`signed_prekey_id`."""
        return signed_prekey_id(self.public)

    def to_dict(self) -> dict[str, Any]:
        """Private form for the state file (``keyId`` is informative)."""
        return {"keyId": self.key_id, "privateKey": b64encode(self.private)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignedPrekey:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(b64decode(data["privateKey"], length=KEY_SIZE))
        except (KeyError, TypeError) as exc:
            raise CryptoError("malformed signed prekey") from exc

    def __repr__(self) -> str:
        return f"SignedPrekey(key_id={self.key_id})"


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true and 1.0 are not integers here (serde's u16/u32 refuse them too).
    return isinstance(value, int) and not isinstance(value, bool)


def _check_key_id(key_id: object) -> int:
    if _is_int(key_id) and 0 <= key_id < NO_ONE_TIME_PREKEY:
        return key_id
    raise CryptoError("one-time prekey id must be an integer in [0, 2**32 - 2]")


@dataclass(frozen=True, repr=False)
class OneTimePrekey:
    """A one-time prekey pair with its uploaded id."""

    key_id: int
    private: bytes

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        _check_key(self.private, "one-time prekey")

    @property
    def public(self) -> bytes:
        """The X25519 public key."""
        return x25519_public(self.private)

    def upload_form(self) -> dict[str, Any]:
        """``{"keyId": int, "publicKey": b64}`` as sent to the server."""
        return {"keyId": self.key_id, "publicKey": b64encode(self.public)}

    def to_dict(self) -> dict[str, Any]:
        """Private form for the state file."""
        return {"keyId": self.key_id, "privateKey": b64encode(self.private)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OneTimePrekey:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(data["keyId"], b64decode(data["privateKey"], length=KEY_SIZE))
        except (KeyError, TypeError) as exc:
            raise CryptoError("malformed one-time prekey") from exc

    def __repr__(self) -> str:
        return f"OneTimePrekey(key_id={self.key_id})"


def generate_one_time_prekeys(
    start_id: int, count: int
) -> tuple[list[OneTimePrekey], list[dict[str, Any]]]:
    """``count`` new one-time prekeys with ids from ``start_id``.

    Returns the private pairs (keep them) and their upload form
    ``[{"keyId": int, "publicKey": b64}]``.
    """
    if count < 0:
        raise ValueError("count must not be negative")
    if count:
        _check_key_id(start_id)
        _check_key_id(start_id + count - 1)
    keys = [OneTimePrekey(start_id + i, generate_x25519()[0]) for i in range(count)]
    return keys, [key.upload_form() for key in keys]


def parse_one_time_prekey(data: object) -> tuple[int, bytes]:
    """Validate a served ``{"keyId", "publicKey"}`` and return ``(key_id, public)``."""
    if not isinstance(data, Mapping):
        raise InvalidBundle("one-time prekey must be an object")
    try:
        key_id = _check_key_id(data.get("keyId"))
    except CryptoError as exc:
        raise InvalidBundle(str(exc)) from exc
    return key_id, b64decode(data.get("publicKey"), InvalidBundle, KEY_SIZE)


# -- key bundles -----------------------------------------------------------


def _rfc3339(when: datetime | None) -> str:
    if when is None:
        when = datetime.now(timezone.utc)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # naive means UTC
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_key_bundle(
    identity: IdentityKeys,
    signed_prekey: SignedPrekey,
    user_id: str = "",
    timestamp: datetime | None = None,
) -> dict[str, str]:
    """The seed's UploadableKeyBundle, signed by the master identity key.

    ``user_id`` is empty only for ``register`` (the server assigns the id);
    peers verify it, so re-upload with the real id afterwards.
    """
    bundle_data = {
        "userId": user_id,
        "timestamp": _rfc3339(timestamp),
        "supportedSuites": [
            {
                "suiteId": SUITE_CLASSIC_X25519,
                "identityKey": b64encode(identity.dh_public),
                "signedPrekey": b64encode(signed_prekey.public),
            }
        ],
    }
    raw = json.dumps(bundle_data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return {
        "masterIdentityKey": b64encode(identity.master_public),
        "bundleData": b64encode(raw),
        "signature": b64encode(identity.sign(raw)),
    }


@dataclass(frozen=True)
class VerifiedBundle:
    """A key bundle whose signature and format were checked."""

    user_id: str
    timestamp: str
    master_key: bytes
    identity_key: bytes
    signed_prekey: bytes

    @property
    def signed_prekey_id(self) -> int:
        """See :func:`signed_prekey_id`."""
        return signed_prekey_id(self.signed_prekey)


def _valid_timestamp(value: object) -> bool:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def verify_key_bundle(
    bundle: Mapping[str, Any], expected_user_id: str | None = None
) -> VerifiedBundle:
    """Check an UploadableKeyBundle and return its keys.

    Raises InvalidBundle for bad base64, wrong key lengths, bad JSON, a suite
    other than 1, a bad signature, or a ``userId`` other than the expected one.
    Fields other than the three bundle fields are ignored, so a
    ``publicKeyBundle`` payload that carries them can be passed as is.
    """
    if not isinstance(bundle, Mapping):
        raise InvalidBundle("key bundle must be an object")
    master_key = b64decode(bundle.get("masterIdentityKey"), InvalidBundle, KEY_SIZE)
    raw = b64decode(bundle.get("bundleData"), InvalidBundle)
    signature = b64decode(bundle.get("signature"), InvalidBundle, SIGNATURE_SIZE)
    # Authenticate before parsing: nothing unsigned is interpreted.
    try:
        VerifyKey(master_key).verify(raw, signature)
    except (_NaclError, ValueError, TypeError) as exc:
        raise InvalidBundle("bundle signature does not verify") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidBundle("bundleData is not UTF-8 JSON") from exc
    if not isinstance(data, dict):
        raise InvalidBundle("bundleData must be a JSON object")
    user_id = data.get("userId")
    if not isinstance(user_id, str):
        raise InvalidBundle("userId must be a string")
    if expected_user_id is not None and user_id != expected_user_id:
        raise InvalidBundle("bundle userId does not match the expected user")
    timestamp = data.get("timestamp")
    if not _valid_timestamp(timestamp):
        raise InvalidBundle("timestamp must be RFC 3339")
    suites = data.get("supportedSuites")
    if not isinstance(suites, list) or not suites:
        raise InvalidBundle("supportedSuites must be a non-empty list")
    for suite in suites:
        suite_id = suite.get("suiteId") if isinstance(suite, dict) else None
        if not _is_int(suite_id) or suite_id != SUITE_CLASSIC_X25519:
            raise InvalidBundle(f"unsupported suite {suite_id!r}")
    # Like the seed's getPublicKey, the first suite is the one used.
    suite = suites[0]
    return VerifiedBundle(
        user_id=user_id,
        timestamp=timestamp,
        master_key=master_key,
        identity_key=b64decode(suite.get("identityKey"), InvalidBundle, KEY_SIZE),
        signed_prekey=b64decode(suite.get("signedPrekey"), InvalidBundle, KEY_SIZE),
    )


# -- envelope binding ------------------------------------------------------


def envelope_context(sender_id: str, recipient_id: str, message_id: str) -> bytes:
    """Associated data binding a ciphertext to its ChatMessage envelope.

    Each field is UTF-8 with a 2-byte big-endian length prefix, so that
    different (from, to, id) triples can never encode to the same bytes.
    """
    out = b""
    for field in (sender_id, recipient_id, message_id):
        raw = field.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ValueError("envelope field too long")
        out += len(raw).to_bytes(2, "big") + raw
    return out


# -- safety numbers --------------------------------------------------------


def _fingerprint_digits(user_id: str, key: bytes) -> str:
    # Signal's NumericFingerprintGenerator: version 0, then hash(previous ‖ key).
    digest = b"\x00\x00" + key + user_id.encode("utf-8")
    for _ in range(SAFETY_NUMBER_ITERATIONS):
        digest = hashlib.sha512(digest + key).digest()
    return "".join(
        f"{int.from_bytes(digest[i:i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )


def safety_number(
    local_user_id: str, local_master_key: bytes, remote_user_id: str, remote_master_key: bytes
) -> str:
    """Signal-style 60-digit safety number, the same on both sides.

    Returned as 12 groups of 5 digits separated by single spaces.
    """
    local = _fingerprint_digits(local_user_id, local_master_key)
    remote = _fingerprint_digits(remote_user_id, remote_master_key)
    digits = local + remote if local <= remote else remote + local
    return " ".join(digits[i:i + 5] for i in range(0, 60, 5))
