"""The client's local state file, encrypted under a passphrase.

File format (JSON)::

    {"version": 1, "kdf": "argon2id", "opslimit": int, "memlimit": int,
     "salt": b64(16), "box": b64(SecretBox nonce ‖ ciphertext)}

The key is Argon2id(passphrase, salt, opslimit, memlimit). The cost
parameters live in the file so that they can change between saves. The box
holds the state dict as compact UTF-8 JSON.
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


def _derive_key(passphrase: str | bytes, salt: bytes, kdf: KdfParams) -> bytes:
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    return pwhash.argon2id.kdf(SecretBox.KEY_SIZE, secret, salt, kdf.opslimit, kdf.memlimit)


def save_state(
    path: str | os.PathLike[str],
    passphrase: str | bytes,
    data: dict[str, Any],
    kdf: KdfParams = DEFAULT_KDF,
) -> None:
    """Encrypt ``data`` (JSON-able) and replace ``path`` atomically, mode 0600.

    A fresh salt is drawn on every save. Tests pass a cheap ``kdf``.
    """
    salt = random(pwhash.argon2id.SALTBYTES)
    plaintext = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    box = SecretBox(_derive_key(passphrase, salt, kdf)).encrypt(plaintext)
    document = {
        "version": FILE_VERSION,
        "kdf": KDF_NAME,
        "opslimit": kdf.opslimit,
        "memlimit": kdf.memlimit,
        "salt": b64encode(salt),
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
    try:
        key = _derive_key(passphrase, salt, KdfParams(opslimit, memlimit))
        plaintext = SecretBox(key).decrypt(box)
    except _NaclError as exc:
        raise WrongPassphrase("wrong passphrase, or the state file was tampered with") from exc
    data = json.loads(plaintext.decode("utf-8"))
    if not isinstance(data, dict):
        raise WrongPassphrase("state file does not hold an object")
    return data
