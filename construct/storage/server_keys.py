"""The file of the server's sender-certificate signing keys (construct.core.certificates).

    {"version": 1, "keys": [{"keyId": 2, "privateKey": "<b64 32-byte Ed25519 seed>", "createdAt": <unix s>}, …]}

newest first. `construct` creates it on first start (mode 0600, in a directory it makes 0700)
at `--sender-key-path`, by default in the data directory, and reads it again whenever it
changes; `construct-admin sender-key rotate` puts a new key in front. Every instance of one
deployment must read the same keys (the same file, copied or mounted as a secret).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from construct.core.certificates import CertificateService, ServerKey, ServerKeys

FILE_NAME = "sender-certificate-keys.json"
FORMAT_VERSION = 1
# A retired key stays published this long after its successor was made: longer than the
# longest certificate lifetime (7 days), so every certificate it signed still verifies.
RETIRED_KEY_SECONDS = 8 * 24 * 3600


class KeyFileError(Exception):
    """The key file cannot be read or is not a key file; the message says which."""


def default_path(data_dir: str) -> str:
    return os.path.join(data_dir, FILE_NAME)


def load(path: str) -> ServerKeys:
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
        keys = tuple(
            ServerKey(_key_id(entry["keyId"]), _seed(entry["privateKey"]), int(entry["createdAt"]))
            for entry in document["keys"]
        )
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown version {document.get('version')!r}")
        return ServerKeys(keys)
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KeyFileError(f"{path} is not a sender-certificate key file ({e})") from None


def _key_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise ValueError(f"bad keyId {value!r}")
    return value


def _seed(value: Any) -> bytes:
    try:
        seed = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError):
        raise ValueError("privateKey is not base64") from None
    if len(seed) != 32:
        raise ValueError("privateKey is not 32 bytes")
    return seed


def write(path: str, keys: ServerKeys) -> None:
    """Replace the file at once (a temporary file renamed over it), readable by its owner only."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    document = {
        "version": FORMAT_VERSION,
        "keys": [
            {"keyId": key.key_id, "privateKey": base64.b64encode(key.seed).decode("ascii"), "createdAt": key.created_at}
            for key in keys.keys
        ],
    }
    temporary = f"{path}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=1)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_or_create(path: str, now: float) -> ServerKeys:
    """The keys in the file; on first start (no file yet) a new key, written there."""
    if not os.path.exists(path):
        keys = ServerKeys.generate(now)
        try:
            write(path, keys)
        except OSError as e:
            raise KeyFileError(f"cannot create {path}: {e.strerror}") from None
        return keys
    return load(path)


def rotated(keys: ServerKeys, now: float, drop_old: bool = False) -> ServerKeys:
    """A new key in front; the retired ones kept while certificates they signed may be valid
    (all dropped with `drop_old`, for a key that leaked)."""
    new = ServerKey(max(key.key_id for key in keys.keys) + 1, os.urandom(32), int(now))
    kept, successor_made = [], int(now)
    for key in keys.keys:
        if drop_old or now - successor_made >= RETIRED_KEY_SECONDS:
            break
        kept.append(key)
        successor_made = key.created_at
    return ServerKeys((new, *kept))


class KeyFileWatcher:
    """Reads the key file again when it has changed (a rotation), and hands the new keys to the
    certificate service: run `check` on a timer."""

    log = Logger()

    def __init__(self, path: str, certificates: CertificateService) -> None:
        self._path = path
        self._certificates = certificates
        self._seen = self._stamp()

    def _stamp(self) -> tuple | None:
        try:
            status = os.stat(self._path)
        except OSError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_size

    async def check(self) -> None:
        stamp = await deferToThread(self._stamp)
        if stamp is None or stamp == self._seen:
            return
        try:
            keys = await deferToThread(load, self._path)
        except KeyFileError as e:
            # The keys in use stay; a rotation half written is read at the next check.
            self.log.warn("sender-certificate keys not reloaded: {error}", error=str(e))
            return
        self._seen = stamp
        if keys != self._certificates.keys:
            self._certificates.keys = keys
            self.log.info("sender-certificate keys reloaded: signing with key {key_id}", key_id=keys.current.key_id)
