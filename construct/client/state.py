"""The client's local state file, encrypted under a passphrase.

File format (JSON)::

    {"version": 1, "kdf": "argon2id", "opslimit": int, "memlimit": int,
     "salt": b64(16), "box": b64(nonce(24) ‖ tag(16) ‖ ciphertext)}

The key is Argon2id(passphrase, salt, opslimit, memlimit). The cost
parameters live in the file so that they can change between saves. The box
holds the state dict as compact UTF-8 JSON.

A client that saves often (after every message) derives the key once with
:func:`derive_state_key` or :func:`load_state_with_key` and saves with
:func:`save_state_with_key`: the salt then stays the same between those
saves, and every save still gets a fresh random 24-byte SecretBox nonce.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from nacl import pwhash
from nacl.exceptions import CryptoError as _NaclError
from nacl.secret import SecretBox
from nacl.utils import random

from construct.client.crypto import CryptoError, b64decode, b64encode

FILE_VERSION = 1
KDF_NAME = "argon2id"
# Refuse cost parameters beyond these when loading, so that a damaged or
# hostile file cannot make the client allocate absurd amounts of memory.
_MAX_OPSLIMIT = 64
_MAX_MEMLIMIT = 4 * 1024**3


class WrongPassphrase(CryptoError):
    """The passphrase is wrong, or the state file was damaged or tampered with."""


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters."""

    opslimit: int
    memlimit: int


DEFAULT_KDF = KdfParams(pwhash.argon2id.OPSLIMIT_MODERATE, pwhash.argon2id.MEMLIMIT_MODERATE)


@dataclass(frozen=True, repr=False)
class StateKey:
    """A file key derived from the passphrase, with the salt and cost it was derived with."""

    salt: bytes
    kdf: KdfParams
    key: bytes

    def __repr__(self) -> str:
        return f"StateKey(kdf={self.kdf})"


def _derive_key(passphrase: str | bytes, salt: bytes, kdf: KdfParams) -> bytes:
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    return pwhash.argon2id.kdf(SecretBox.KEY_SIZE, secret, salt, kdf.opslimit, kdf.memlimit)


def derive_state_key(passphrase: str | bytes, kdf: KdfParams = DEFAULT_KDF) -> StateKey:
    """Run Argon2id once, with a fresh salt; slow on purpose (call it off the reactor thread)."""
    salt = random(pwhash.argon2id.SALTBYTES)
    return StateKey(salt, kdf, _derive_key(passphrase, salt, kdf))


def save_state(
    path: str | os.PathLike[str],
    passphrase: str | bytes,
    data: dict[str, Any],
    kdf: KdfParams = DEFAULT_KDF,
) -> None:
    """Encrypt ``data`` (JSON-able) and replace ``path`` atomically, mode 0600.

    A fresh salt is drawn on every save. Tests pass a cheap ``kdf``.
    """
    save_state_with_key(path, derive_state_key(passphrase, kdf), data)


def save_state_with_key(path: str | os.PathLike[str], state_key: StateKey, data: dict[str, Any]) -> None:
    """Like :func:`save_state` with a key derived earlier: no Argon2id, same salt."""
    plaintext = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    box = SecretBox(state_key.key).encrypt(plaintext)
    document = {
        "version": FILE_VERSION,
        "kdf": KDF_NAME,
        "opslimit": state_key.kdf.opslimit,
        "memlimit": state_key.kdf.memlimit,
        "salt": b64encode(state_key.salt),
        "box": b64encode(bytes(box)),
    }
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    # A temp file in the same directory makes os.replace an atomic rename.
    fd, temp_path = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(json.dumps(document).encode("ascii"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, target)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise
    # Persist the rename itself.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_state(path: str | os.PathLike[str], passphrase: str | bytes) -> dict[str, Any]:
    """Decrypt the state file at ``path``.

    Raises WrongPassphrase for a wrong passphrase or a damaged or tampered
    file; a missing file raises FileNotFoundError.
    """
    return load_state_with_key(path, passphrase)[0]


def load_state_with_key(
    path: str | os.PathLike[str], passphrase: str | bytes, known: StateKey | None = None
) -> tuple[dict[str, Any], StateKey]:
    """Like :func:`load_state`, also returning the key for :func:`save_state_with_key`.

    When the file was saved with ``known``'s salt and cost, ``known`` is used
    as is and Argon2id does not run again.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        document = json.loads(raw.decode("utf-8"))
        if not isinstance(document, dict):
            raise ValueError("not an object")
        if document.get("version") != FILE_VERSION or document.get("kdf") != KDF_NAME:
            raise ValueError("unsupported state file version or KDF")
        opslimit, memlimit = document.get("opslimit"), document.get("memlimit")
        for value, low, high in (
            (opslimit, pwhash.argon2id.OPSLIMIT_MIN, _MAX_OPSLIMIT),
            (memlimit, pwhash.argon2id.MEMLIMIT_MIN, _MAX_MEMLIMIT),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError("KDF parameters out of range")
        salt = b64decode(document.get("salt"), length=pwhash.argon2id.SALTBYTES)
        box = b64decode(document.get("box"))
    except (UnicodeDecodeError, ValueError, CryptoError) as exc:
        raise WrongPassphrase("state file is damaged or was tampered with") from exc
    kdf = KdfParams(opslimit, memlimit)
    try:
        if known is not None and known.salt == salt and known.kdf == kdf:
            state_key = known
        else:
            state_key = StateKey(salt, kdf, _derive_key(passphrase, salt, kdf))
        plaintext = SecretBox(state_key.key).decrypt(box)
    except _NaclError as exc:
        raise WrongPassphrase("wrong passphrase, or the state file was tampered with") from exc
    data = json.loads(plaintext.decode("utf-8"))
    if not isinstance(data, dict):
        raise WrongPassphrase("state file does not hold an object")
    return data, state_key
