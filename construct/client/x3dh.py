"""X3DH key agreement for Construct.

Follows https://signal.org/docs/specifications/x3dh/ with curve X25519,
hash SHA-256 and info ``b"construct/x3dh"``, with two deliberate
differences (see docs/crypto.md):

* Identity is two keys: the Ed25519 ``masterIdentityKey`` signs, a separate
  X25519 ``identityKey`` does the DH. The spec's single XEdDSA key is not
  used, because the seed's bundle already carries both keys.
* The signed prekey is authenticated by the Ed25519 signature over the whole
  ``bundleData`` (which contains it), not by a signature over the key alone.

The associated data is ``IKa_dh ‖ IKb_dh ‖ IKa_master ‖ IKb_master``
(initiator first), binding both DH keys and both signing keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from construct.client.crypto import (
    KEY_SIZE,
    NO_ONE_TIME_PREKEY,
    DecryptionError,
    IdentityKeys,
    InvalidBundle,
    OneTimePrekey,
    RandomBytes,
    ReplayError,
    SignedPrekey,
    VerifiedBundle,
    generate_x25519,
    hkdf_sha256,
    parse_one_time_prekey,
    x25519,
)

X3DH_INFO = b"construct/x3dh"
# X3DH 2.2: 32 0xFF bytes prepended for X25519 (domain separation from XEdDSA).
_F = b"\xff" * KEY_SIZE
_SALT = bytes(KEY_SIZE)
HEADER_SIZE = 3 * KEY_SIZE + 4 + 4


@dataclass(frozen=True)
class InitialHeader:
    """What the initiator sends so the responder can repeat the agreement."""

    identity_key: bytes
    master_key: bytes
    ephemeral_key: bytes
    signed_prekey_id: int
    one_time_prekey_id: int | None

    def to_bytes(self) -> bytes:
        """``IKa_dh(32) ‖ IKa_master(32) ‖ EKa(32) ‖ SPK id(4) ‖ OPK id(4)``."""
        opk_id = NO_ONE_TIME_PREKEY if self.one_time_prekey_id is None else self.one_time_prekey_id
        return (
            self.identity_key
            + self.master_key
            + self.ephemeral_key
            + self.signed_prekey_id.to_bytes(4, "big")
            + opk_id.to_bytes(4, "big")
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InitialHeader:
        """Inverse of :meth:`to_bytes`; raises DecryptionError on a bad length."""
        if len(data) != HEADER_SIZE:
            raise DecryptionError("X3DH header must be %d bytes" % HEADER_SIZE)
        opk_id = int.from_bytes(data[100:104], "big")
        return cls(
            identity_key=data[0:32],
            master_key=data[32:64],
            ephemeral_key=data[64:96],
            signed_prekey_id=int.from_bytes(data[96:100], "big"),
            one_time_prekey_id=None if opk_id == NO_ONE_TIME_PREKEY else opk_id,
        )


def _kdf(dh_outputs: list[bytes]) -> bytes:
    return hkdf_sha256(_F + b"".join(dh_outputs), _SALT, X3DH_INFO, KEY_SIZE)


def _associated_data(
    initiator_dh: bytes, responder_dh: bytes, initiator_master: bytes, responder_master: bytes
) -> bytes:
    return initiator_dh + responder_dh + initiator_master + responder_master


def initiate(
    my_identity: IdentityKeys,
    remote_bundle: VerifiedBundle,
    one_time_prekey: Mapping[str, object] | None = None,
    random_bytes: RandomBytes = os.urandom,
) -> tuple[bytes, bytes, InitialHeader]:
    """Run X3DH as the initiator against a verified bundle.

    ``one_time_prekey`` is the server's ``{"keyId", "publicKey"}`` or None.
    Returns ``(shared_secret, associated_data, header)``; raises
    InvalidBundle if a remote key is unusable.
    """
    ephemeral_private, ephemeral_public = generate_x25519(random_bytes)
    dh_outputs = [
        x25519(my_identity.dh_private, remote_bundle.signed_prekey, InvalidBundle),
        x25519(ephemeral_private, remote_bundle.identity_key, InvalidBundle),
        x25519(ephemeral_private, remote_bundle.signed_prekey, InvalidBundle),
    ]
    opk_id = None
    if one_time_prekey is not None:
        opk_id, opk_public = parse_one_time_prekey(one_time_prekey)
        dh_outputs.append(x25519(ephemeral_private, opk_public, InvalidBundle))
    header = InitialHeader(
        identity_key=my_identity.dh_public,
        master_key=my_identity.master_public,
        ephemeral_key=ephemeral_public,
        signed_prekey_id=remote_bundle.signed_prekey_id,
        one_time_prekey_id=opk_id,
    )
    ad = _associated_data(
        my_identity.dh_public,
        remote_bundle.identity_key,
        my_identity.master_public,
        remote_bundle.master_key,
    )
    return _kdf(dh_outputs), ad, header


def respond(
    my_identity: IdentityKeys,
    my_signed_prekeys_by_id: Mapping[int, SignedPrekey],
    my_one_time_prekeys_by_id: Mapping[int, OneTimePrekey],
    header: InitialHeader,
) -> tuple[bytes, bytes, int | None]:
    """Run X3DH as the responder.

    Returns ``(shared_secret, associated_data, used_one_time_prekey_id)``.
    Nothing is mutated: the caller deletes the used one-time prekey once the
    first message has decrypted (so a forged header cannot burn it). An
    unknown one-time prekey id raises ReplayError (it was already used); an
    unknown signed prekey id raises DecryptionError.
    """
    signed_prekey = my_signed_prekeys_by_id.get(header.signed_prekey_id)
    if signed_prekey is None:
        raise DecryptionError("unknown signed prekey id %d" % header.signed_prekey_id)
    dh_outputs = [
        x25519(signed_prekey.private, header.identity_key, DecryptionError),
        x25519(my_identity.dh_private, header.ephemeral_key, DecryptionError),
        x25519(signed_prekey.private, header.ephemeral_key, DecryptionError),
    ]
    if header.one_time_prekey_id is not None:
        one_time_prekey = my_one_time_prekeys_by_id.get(header.one_time_prekey_id)
        if one_time_prekey is None:
            raise ReplayError("one-time prekey %d was already used" % header.one_time_prekey_id)
        dh_outputs.append(x25519(one_time_prekey.private, header.ephemeral_key, DecryptionError))
    ad = _associated_data(
        header.identity_key,
        my_identity.dh_public,
        header.master_key,
        my_identity.master_public,
    )
    return _kdf(dh_outputs), ad, header.one_time_prekey_id
