"""Tests for construct.client.state: the passphrase-encrypted state file."""

import base64
import json
import os
import stat

import pytest
from nacl.pwhash import argon2id

from construct.client.crypto import CryptoError
from construct.client.state import KdfParams, WrongPassphrase, load_state, save_state

# Cheapest Argon2id parameters: tests check the format, not the cost.
FAST = KdfParams(argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)
DATA = {"identity": {"masterSeed": "AAAA"}, "sessions": {"peer": [1, 2, 3]}, "history": ["héllo"]}


def test_round_trip(tmp_path):
    """What save_state writes, load_state returns."""
    path = tmp_path / "state.json"
    save_state(path, "correct horse", DATA, kdf=FAST)
    assert load_state(path, "correct horse") == DATA


def test_file_format_and_parameters_stored(tmp_path):
    """The file is the documented JSON with the KDF parameters and no plaintext."""
    path = tmp_path / "state.json"
    save_state(path, "pw", DATA, kdf=FAST)
    document = json.loads(path.read_text())
    assert set(document) == {"version", "kdf", "opslimit", "memlimit", "salt", "box"}
    assert (document["version"], document["kdf"]) == (1, "argon2id")
    assert (document["opslimit"], document["memlimit"]) == (FAST.opslimit, FAST.memlimit)
    assert len(base64.b64decode(document["salt"])) == 16
    assert b"sessions" not in path.read_bytes()


def test_resave_uses_new_salt_and_new_parameters(tmp_path):
    """Each save draws a fresh salt, and parameters can change between saves."""
    path = tmp_path / "state.json"
    save_state(path, "pw", DATA, kdf=FAST)
    first = json.loads(path.read_text())
    stronger = KdfParams(FAST.opslimit + 1, FAST.memlimit * 2)
    save_state(path, "pw", DATA, kdf=stronger)
    second = json.loads(path.read_text())
    assert first["salt"] != second["salt"]
    assert second["opslimit"] == stronger.opslimit
    assert load_state(path, "pw") == DATA


def test_wrong_passphrase(tmp_path):
    """A wrong passphrase raises WrongPassphrase, a CryptoError."""
    path = tmp_path / "state.json"
    save_state(path, "right", DATA, kdf=FAST)
    with pytest.raises(WrongPassphrase):
        load_state(path, "wrong")
    assert issubclass(WrongPassphrase, CryptoError)


def test_tampered_file(tmp_path):
    """Changing any field of the file, or truncating it, raises WrongPassphrase."""
    path = tmp_path / "state.json"
    save_state(path, "pw", DATA, kdf=FAST)
    good = json.loads(path.read_text())
    box = bytearray(base64.b64decode(good["box"]))
    box[-1] ^= 1
    salt = bytearray(base64.b64decode(good["salt"]))
    salt[0] ^= 1
    variants = [
        dict(good, box=base64.b64encode(bytes(box)).decode()),
        dict(good, salt=base64.b64encode(bytes(salt)).decode()),
        dict(good, opslimit=good["opslimit"] + 1),
        dict(good, memlimit=2**50),
        dict(good, version=2),
        dict(good, kdf="scrypt"),
        dict(good, box="not base64"),
        {k: v for k, v in good.items() if k != "salt"},
        [good],
    ]
    for variant in variants:
        path.write_text(json.dumps(variant))
        with pytest.raises(WrongPassphrase):
            load_state(path, "pw")
    path.write_text(json.dumps(good)[:-10])
    with pytest.raises(WrongPassphrase):
        load_state(path, "pw")


def test_atomic_write_leaves_no_temp_file(tmp_path):
    """After saving, the directory holds only the state file."""
    path = tmp_path / "state.json"
    save_state(path, "pw", DATA, kdf=FAST)
    save_state(path, "pw", {"v": 2}, kdf=FAST)
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    """If the final rename fails, the old file is intact and the temp file is gone."""
    path = tmp_path / "state.json"
    save_state(path, "pw", DATA, kdf=FAST)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_state(path, "pw", {"v": 2}, kdf=FAST)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["state.json"]
    assert load_state(path, "pw") == DATA


def test_file_mode_0600(tmp_path):
    """The state file is readable and writable by its owner only, whatever the umask."""
    path = tmp_path / "state.json"
    old_umask = os.umask(0o022)
    try:
        save_state(path, "pw", DATA, kdf=FAST)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_file(tmp_path):
    """A missing state file raises FileNotFoundError (a first run, not a bad passphrase)."""
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "absent.json", "pw")
