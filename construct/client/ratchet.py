"""The Double Ratchet, mapped onto the seed's ChatMessage.

Follows https://signal.org/docs/specifications/doubleratchet/ section 3 with
the recommended functions:

* KDF_RK: HKDF-SHA256, salt = root key, ikm = DH output, 64 bytes out.
* KDF_CK: HMAC-SHA256(chain key, 0x01) is the message key and
  HMAC-SHA256(chain key, 0x02) the next chain key.
* ENCRYPT: XChaCha20-Poly1305-IETF with a 32-byte key taken from HKDF-SHA256
  of the message key and a random 24-byte nonce. The nonce is random, not
  derived, so that a client restored from an old state file, which derives the
  same message keys again, still never reuses a key and nonce pair.

Wire mapping (the server only sees these ChatMessage fields):

* ``ephemeralPublicKey``: the sender's current ratchet public key.
* ``messageNumber``: N.
* ``content``: base64 of ``version ‖ header ‖ nonce(24) ‖ ciphertext ‖ tag``,
  version 0x21 with header PN(4), or 0x20 (sent until the initiator hears
  back) with header PN(4) ‖ X3DH header(104).

The AEAD associated data is ``X3DH AD ‖ version ‖ header ‖ ratchet key ‖
N(4) ‖ context`` where the caller's context binds the envelope (see
:func:`construct.client.crypto.envelope_context`).
"""

from __future__ import annotations

import hmac
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from hashlib import sha256
from typing import Any

from construct.client import x3dh
from construct.client.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    CryptoError,
    DecryptionError,
    IdentityKeys,
    InvalidBundle,
    OneTimePrekey,
    RandomBytes,
    ReplayError,
    SignedPrekey,
    TooManySkipped,
    VerifiedBundle,
    aead_decrypt,
    aead_encrypt,
    b64decode,
    b64encode,
    generate_x25519,
    hkdf_sha256,
    pad,
    unpad,
    x25519,
    x25519_public,
)

VERSION_INITIAL = 0x20
VERSION_NORMAL = 0x21
MAX_SKIP = 1000
MAX_SKIPPED_TOTAL = 2000
_MAX_U32 = 0xFFFFFFFF
_RK_INFO = b"construct/ratchet/root"
_MESSAGE_INFO = b"construct/ratchet/message"
_STATE_VERSION = 1


def _kdf_rk(root_key: bytes, dh_output: bytes) -> tuple[bytes, bytes]:
    out = hkdf_sha256(dh_output, root_key, _RK_INFO, 2 * KEY_SIZE)
    return out[:KEY_SIZE], out[KEY_SIZE:]


def _kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """Returns ``(next_chain_key, message_key)``."""
    message_key = hmac.new(chain_key, b"\x01", sha256).digest()
    return hmac.new(chain_key, b"\x02", sha256).digest(), message_key


def _message_key(message_key: bytes) -> bytes:
    return hkdf_sha256(message_key, bytes(KEY_SIZE), _MESSAGE_INFO, KEY_SIZE)


@dataclass(frozen=True)
class _Content:
    header: bytes  # version byte and header, as authenticated
    previous_chain_length: int
    initial_header: bytes | None
    nonce: bytes
    ciphertext: bytes


def _parse_content(content: str) -> _Content:
    raw = b64decode(content, DecryptionError)
    if not raw:
        raise DecryptionError("empty content")
    if raw[0] == VERSION_NORMAL:
        header_size = 1 + 4
    elif raw[0] == VERSION_INITIAL:
        header_size = 1 + 4 + x3dh.HEADER_SIZE
    else:
        raise DecryptionError("not a ratchet message")
    if len(raw) < header_size + NONCE_SIZE + TAG_SIZE:
        raise DecryptionError("content too short")
    return _Content(
        header=raw[:header_size],
        previous_chain_length=int.from_bytes(raw[1:5], "big"),
        initial_header=raw[5:header_size] if raw[0] == VERSION_INITIAL else None,
        nonce=raw[header_size:header_size + NONCE_SIZE],
        ciphertext=raw[header_size + NONCE_SIZE:],
    )


def is_ratchet_content(content: str) -> bool:
    """Whether ``content`` is shaped like a ratchet message (version 0x20/0x21, long enough)."""
    try:
        _parse_content(content)
    except DecryptionError:
        return False
    return True


@dataclass
class _State:
    """Section 3.2 state variables; ``skipped`` is ordered oldest first."""

    dhs_private: bytes
    dhr: bytes | None
    rk: bytes
    cks: bytes | None
    ckr: bytes | None
    ns: int
    nr: int
    pn: int
    skipped: OrderedDict[tuple[bytes, int], bytes]

    def copy(self) -> _State:
        return replace(self, skipped=OrderedDict(self.skipped))


def _skip_message_keys(state: _State, until: int) -> None:
    if state.ckr is None or state.dhr is None:
        return
    if until > state.nr + MAX_SKIP:
        raise TooManySkipped(f"message {until} is more than {MAX_SKIP} ahead of {state.nr}")
    while state.nr < until:
        state.ckr, message_key = _kdf_ck(state.ckr)
        state.skipped[(state.dhr, state.nr)] = message_key
        state.nr += 1
        if len(state.skipped) > MAX_SKIPPED_TOTAL:
            state.skipped.popitem(last=False)


def _dh_ratchet(state: _State, remote_public: bytes, random_bytes: RandomBytes) -> None:
    state.pn = state.ns
    state.ns = 0
    state.nr = 0
    state.dhr = remote_public
    receiving = x25519(state.dhs_private, remote_public, DecryptionError)
    state.rk, state.ckr = _kdf_rk(state.rk, receiving)
    state.dhs_private = generate_x25519(random_bytes)[0]
    sending = x25519(state.dhs_private, remote_public, DecryptionError)
    state.rk, state.cks = _kdf_rk(state.rk, sending)


def _optional_b64(value: bytes | None) -> str | None:
    return None if value is None else b64encode(value)


def _optional_key(value: object) -> bytes | None:
    return None if value is None else b64decode(value, length=KEY_SIZE)


def _is_u32(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_U32


def _counter(value: object) -> int:
    if isinstance(value, int) and _is_u32(value):
        return value
    raise CryptoError("malformed counter")


class Session:
    """A Double Ratchet session with one peer.

    Build one with :meth:`initiate` or :meth:`from_initial`, or restore it
    with :meth:`from_dict`. :meth:`decrypt` is transactional: when it raises,
    the session is exactly as before.

    ``random_bytes`` is where new ratchet keys and nonces come from; only tests
    that make deterministic vectors pass anything but the default.
    """

    def __init__(
        self,
        state: _State,
        associated_data: bytes,
        initial_header: bytes,
        send_initial: bool,
        remote_identity_key: bytes,
        remote_master_key: bytes,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self._state = state
        self._random = random_bytes
        self._ad = associated_data
        self._initial_header = initial_header
        self._send_initial = send_initial
        self._remote_identity_key = remote_identity_key
        self._remote_master_key = remote_master_key

    @property
    def remote_identity_key(self) -> bytes:
        """The peer's X25519 identity key, as used in X3DH."""
        return self._remote_identity_key

    @property
    def remote_master_key(self) -> bytes:
        """The peer's Ed25519 master identity key (for safety numbers)."""
        return self._remote_master_key

    @classmethod
    def initiate(
        cls,
        my_identity: IdentityKeys,
        remote_bundle: VerifiedBundle,
        one_time_prekey: Mapping[str, object] | None = None,
        random_bytes: RandomBytes = os.urandom,
    ) -> Session:
        """Start a session to the owner of ``remote_bundle`` (X3DH initiator).

        Messages carry the X3DH header (version 0x20) until a reply arrives.
        """
        secret, ad, header = x3dh.initiate(my_identity, remote_bundle, one_time_prekey, random_bytes)
        dhs_private = generate_x25519(random_bytes)[0]
        rk, cks = _kdf_rk(secret, x25519(dhs_private, remote_bundle.signed_prekey, InvalidBundle))
        state = _State(
            dhs_private, remote_bundle.signed_prekey, rk, cks, None, 0, 0, 0, OrderedDict()
        )
        return cls(
            state, ad, header.to_bytes(), True, remote_bundle.identity_key, remote_bundle.master_key,
            random_bytes,
        )

    @classmethod
    def from_initial(
        cls,
        my_identity: IdentityKeys,
        my_signed_prekeys_by_id: Mapping[int, SignedPrekey],
        my_one_time_prekeys_by_id: Mapping[int, OneTimePrekey],
        ratchet_public: bytes,
        message_number: int,
        content: str,
        context: bytes = b"",
        random_bytes: RandomBytes = os.urandom,
    ) -> tuple[Session, bytes, int | None]:
        """Accept a 0x20 message from a new peer (X3DH responder).

        Returns ``(session, plaintext, used_one_time_prekey_id)``. The caller
        must check ``session.remote_master_key``/``remote_identity_key``
        against the sender's verified bundle, then delete the used one-time
        prekey and keep the session.
        """
        parsed = _parse_content(content)
        if parsed.initial_header is None:
            raise DecryptionError("not an initial message")
        header = x3dh.InitialHeader.from_bytes(parsed.initial_header)
        secret, ad, opk_id = x3dh.respond(
            my_identity, my_signed_prekeys_by_id, my_one_time_prekeys_by_id, header
        )
        signed_prekey = my_signed_prekeys_by_id[header.signed_prekey_id]
        state = _State(signed_prekey.private, None, secret, None, None, 0, 0, 0, OrderedDict())
        session = cls(
            state, ad, parsed.initial_header, False, header.identity_key, header.master_key,
            random_bytes,
        )
        plaintext = session.decrypt(ratchet_public, message_number, content, context)
        return session, plaintext, opk_id

    def knows_initial(self, content: str) -> bool:
        """Whether ``content`` is a 0x20 message that belongs to this session.

        A 0x20 message for which this is False starts a new session
        (:meth:`from_initial`), e.g. after the peer reinstalled.
        """
        try:
            parsed = _parse_content(content)
        except DecryptionError:
            return False
        return parsed.initial_header is not None and hmac.compare_digest(
            parsed.initial_header, self._initial_header
        )

    def encrypt(self, plaintext: bytes, context: bytes = b"") -> tuple[bytes, int, str]:
        """Encrypt one message.

        Returns ``(ratchet_public, message_number, content)`` for the
        ChatMessage fields ``ephemeralPublicKey``, ``messageNumber`` and
        ``content``.
        """
        padded = pad(plaintext)
        state = self._state
        if state.cks is None:
            raise CryptoError("session has no sending chain")
        if state.ns >= _MAX_U32:
            raise CryptoError("sending chain exhausted")
        next_chain_key, message_key = _kdf_ck(state.cks)
        number = state.ns
        if self._send_initial:
            header = bytes([VERSION_INITIAL]) + state.pn.to_bytes(4, "big") + self._initial_header
        else:
            header = bytes([VERSION_NORMAL]) + state.pn.to_bytes(4, "big")
        ratchet_public = x25519_public(state.dhs_private)
        nonce = self._random(NONCE_SIZE)
        ad = self._aead_ad(header, ratchet_public, number, context)
        ciphertext = aead_encrypt(_message_key(message_key), nonce, padded, ad)
        state.cks = next_chain_key
        state.ns += 1
        return ratchet_public, number, b64encode(header + nonce + ciphertext)

    def decrypt(
        self, ratchet_public: bytes, message_number: int, content: str, context: bytes = b""
    ) -> bytes:
        """Decrypt one message; on any error the session is unchanged.

        Raises ReplayError for a message already decrypted on the current
        receiving chain, TooManySkipped for a gap over MAX_SKIP, and
        DecryptionError for anything else (including replays from an older
        chain, which can no longer be told apart from forgeries).
        """
        parsed = _parse_content(content)
        if parsed.initial_header is not None and not hmac.compare_digest(
            parsed.initial_header, self._initial_header
        ):
            raise DecryptionError("initial message of another session")
        if not isinstance(ratchet_public, bytes) or len(ratchet_public) != KEY_SIZE:
            raise DecryptionError("ratchet key must be 32 bytes")
        if not _is_u32(message_number):
            raise DecryptionError("message number must be a u32")

        state = self._state.copy()
        message_key = state.skipped.pop((ratchet_public, message_number), None)
        if message_key is None:
            if ratchet_public == state.dhr and message_number < state.nr:
                raise ReplayError(f"message {message_number} was already received")
            if ratchet_public != state.dhr:
                _skip_message_keys(state, parsed.previous_chain_length)
                _dh_ratchet(state, ratchet_public, self._random)
            _skip_message_keys(state, message_number)
            if state.ckr is None:
                # Only the initiator's placeholder (the peer's signed prekey) has no chain.
                raise DecryptionError("no receiving chain for this ratchet key")
            state.ckr, message_key = _kdf_ck(state.ckr)
            state.nr += 1

        ad = self._aead_ad(parsed.header, ratchet_public, message_number, context)
        plaintext = unpad(aead_decrypt(_message_key(message_key), parsed.nonce, parsed.ciphertext, ad))
        self._state = state
        self._send_initial = False  # the peer has the session: stop sending the X3DH header
        return plaintext

    def _aead_ad(self, header: bytes, ratchet_public: bytes, number: int, context: bytes) -> bytes:
        return self._ad + header + ratchet_public + number.to_bytes(4, "big") + context

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (contains secrets: store it only encrypted)."""
        state = self._state
        return {
            "version": _STATE_VERSION,
            "associatedData": b64encode(self._ad),
            "initialHeader": b64encode(self._initial_header),
            "sendInitial": self._send_initial,
            "remoteIdentityKey": b64encode(self._remote_identity_key),
            "remoteMasterKey": b64encode(self._remote_master_key),
            "dhsPrivate": b64encode(state.dhs_private),
            "dhr": _optional_b64(state.dhr),
            "rootKey": b64encode(state.rk),
            "sendingChainKey": _optional_b64(state.cks),
            "receivingChainKey": _optional_b64(state.ckr),
            "ns": state.ns,
            "nr": state.nr,
            "pn": state.pn,
            "skipped": [
                [b64encode(dh), number, b64encode(key)]
                for (dh, number), key in state.skipped.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], random_bytes: RandomBytes = os.urandom) -> Session:
        """Inverse of :meth:`to_dict`; raises CryptoError if malformed."""
        try:
            if data["version"] != _STATE_VERSION:
                raise CryptoError("unsupported session state version")
            if not isinstance(data["sendInitial"], bool):
                raise CryptoError("malformed sendInitial")
            skipped: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
            for dh, number, key in data["skipped"]:
                dh_key = b64decode(dh, length=KEY_SIZE)
                skipped[(dh_key, _counter(number))] = b64decode(key, length=KEY_SIZE)
            state = _State(
                dhs_private=b64decode(data["dhsPrivate"], length=KEY_SIZE),
                dhr=_optional_key(data["dhr"]),
                rk=b64decode(data["rootKey"], length=KEY_SIZE),
                cks=_optional_key(data["sendingChainKey"]),
                ckr=_optional_key(data["receivingChainKey"]),
                ns=_counter(data["ns"]),
                nr=_counter(data["nr"]),
                pn=_counter(data["pn"]),
                skipped=skipped,
            )
            return cls(
                state,
                b64decode(data["associatedData"], length=4 * KEY_SIZE),
                b64decode(data["initialHeader"], length=x3dh.HEADER_SIZE),
                data["sendInitial"],
                b64decode(data["remoteIdentityKey"], length=KEY_SIZE),
                b64decode(data["remoteMasterKey"], length=KEY_SIZE),
                random_bytes,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CryptoError("malformed session state") from exc
