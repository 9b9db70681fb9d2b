"""Write tests/vectors/formats.json: the wire and storage formats both clients must agree on.

    python -m tests.vectors.generate_formats

Padding, envelope binding, safety numbers, key bundles (good and bad), the passphrase-encrypted
state file, a key file (an account's state with its history inline, as `construct-chat export`
writes it and the web client keeps it) with a version 1 state and what it upgrades to, and
MessagePack frames as the server's codec writes them. Everything is computed by the Python
client (and `msgpack`); the web client's node tests and tests/test_web_vectors.py read the same
file. The parties' keys, sessions and messages are those of ratchet.json.
"""

from __future__ import annotations

import base64
import copy
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import msgpack
from nacl import pwhash
from nacl.secret import SecretBox

from construct.client import account
from construct.client.crypto import (
    PAD_BUCKETS,
    IdentityKeys,
    OneTimePrekey,
    SignedPrekey,
    b64encode,
    envelope_context,
    make_key_bundle,
    pad,
    safety_number,
)
from construct.client.history import HistoryLog
from tests.vectors import generate
from tests.vectors.generate import ALICE_ID, BOB_ID, BUNDLE_TIME, derived

PATH = Path(__file__).with_name("formats.json")
# The cheapest Argon2id libsodium allows, so that the vector is quick to check.
STATE_KDF = {"opslimit": pwhash.argon2id.OPSLIMIT_MIN, "memlimit": pwhash.argon2id.MEMLIMIT_MIN}


def _identity(name: str) -> IdentityKeys:
    return IdentityKeys(derived(f"{name} master seed"), derived(f"{name} identity"))


def _padding() -> list[dict]:
    lengths = sorted({0, 1, 255, 256, 511, 1000, 32767} | {bucket - 1 for bucket in PAD_BUCKETS})
    return [{"length": length, "bucket": len(pad(bytes(length)))} for length in lengths]


def _envelopes() -> list[dict]:
    triples = [(ALICE_ID, BOB_ID, "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"), ("ab", "c", "d"), ("a", "bc", "d"), ("", "ü", "✓")]
    return [{"from": f, "to": t, "id": i, "context": envelope_context(f, t, i).hex()} for f, t, i in triples]


def _safety_numbers() -> list[dict]:
    alice, bob = _identity("alice"), _identity("bob")
    libsignal = (
        "+14152222222", "0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868",
        "+14153333333", "05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b",
    )
    cases = [libsignal, (ALICE_ID, alice.master_public.hex(), BOB_ID, bob.master_public.hex())]
    return [
        {"localUserId": a, "localKey": ka, "remoteUserId": b, "remoteKey": kb,
         "safetyNumber": safety_number(a, bytes.fromhex(ka), b, bytes.fromhex(kb))}
        for a, ka, b, kb in cases
    ]


def _signed(identity: IdentityKeys, raw: bytes) -> dict:
    return {"masterIdentityKey": b64encode(identity.master_public), "bundleData": b64encode(raw),
            "signature": b64encode(identity.sign(raw))}


def _bundles() -> dict:
    alice = _identity("alice")
    spk = SignedPrekey(derived("alice signed prekey"))
    good = make_key_bundle(alice, spk, ALICE_ID, BUNDLE_TIME)
    raw = base64.b64decode(good["bundleData"])
    suite = {"suiteId": 1, "identityKey": b64encode(alice.dh_public), "signedPrekey": b64encode(spk.public)}

    def data(**changes: object) -> bytes:
        body = {"userId": ALICE_ID, "timestamp": "2026-03-01T09:00:00Z", "supportedSuites": [suite]}
        body.update(changes)
        return json.dumps(body, separators=(",", ":")).encode()

    signature = base64.b64decode(good["signature"])
    bad = {
        "short master key": dict(good, masterIdentityKey=b64encode(alice.master_public[:31])),
        "non-canonical base64": dict(good, signature=good["signature"][:-3] + "h==") if good["signature"].endswith("g==") else dict(good, signature=good["signature"] + "\n"),
        "signature by another key": dict(good, masterIdentityKey=b64encode(_identity("bob").master_public)),
        "flipped signature": dict(good, signature=b64encode(bytes([signature[0] ^ 1]) + signature[1:])),
        "modified bundleData": dict(good, bundleData=b64encode(raw + b" ")),
        "not JSON": _signed(alice, b"\xff not json"),
        "suite 2": _signed(alice, data(supportedSuites=[dict(suite, suiteId=2)])),
        "no suites": _signed(alice, data(supportedSuites=[])),
        "short identity key": _signed(alice, data(supportedSuites=[dict(suite, identityKey=b64encode(bytes(31)))])),
        "bad timestamp": _signed(alice, data(timestamp="yesterday")),
        "impossible date": _signed(alice, data(timestamp="2026-02-30T10:00:00Z")),
        "userId not a string": _signed(alice, data(userId=7)),
        "another user": make_key_bundle(alice, spk, BOB_ID, BUNDLE_TIME),
        "registration bundle (empty userId)": make_key_bundle(alice, spk, "", BUNDLE_TIME),
    }
    return {
        "userId": ALICE_ID, "masterSeed": alice.signing_seed.hex(), "identityPrivate": alice.dh_private.hex(),
        "signedPrekeyPrivate": spk.private.hex(), "timestamp": "2026-03-01T09:00:00Z",
        "signedPrekeyId": spk.key_id, "good": good,
        "rejected": [{"name": name, "bundle": bundle} for name, bundle in bad.items()],
    }


def _state_file() -> dict:
    """A construct-chat state file (construct/client/state.py), with its salt and nonce given."""
    passphrase = "correct horse battery staple ✓"
    salt, nonce = derived("state salt", 16), derived("state nonce", 24)
    data = {"version": 1, "server": "ws://127.0.0.1:8080/ws", "identity": _identity("alice").to_dict(),
            "account": None, "contacts": {}, "history": [{"text": "ünïcödé"}]}
    key = pwhash.argon2id.kdf(SecretBox.KEY_SIZE, passphrase.encode(), salt, **STATE_KDF)
    plaintext = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    box = SecretBox(key).encrypt(plaintext, nonce)
    document = {"version": 1, "kdf": "argon2id", **STATE_KDF, "salt": b64encode(salt), "box": b64encode(bytes(box))}
    return {"passphrase": passphrase, "key": key.hex(), "plaintext": plaintext.decode(), "nonce": nonce.hex(),
            "data": data, "document": document}


def _sealed(data: dict, passphrase: str, label: str) -> dict:
    """A state file holding `data`, with its salt and nonce derived from `label`."""
    salt, nonce = derived(f"{label} salt", 16), derived(f"{label} nonce", 24)
    key = pwhash.argon2id.kdf(SecretBox.KEY_SIZE, passphrase.encode(), salt, **STATE_KDF)
    plaintext = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    box = SecretBox(key).encrypt(plaintext, nonce)
    return {"version": 1, "kdf": "argon2id", **STATE_KDF, "salt": b64encode(salt), "box": b64encode(bytes(box))}


def _key_file() -> dict:
    """Alice's key file in the middle of ratchet.json's conversation: after message 5 arrived and
    before message 4 (so her session holds one skipped key, stamped), with one message still
    waiting in the outbox unencrypted, and one version 1 state (as the web client used to keep)
    with `upgraded`, what it becomes (but `historyKey`, which upgrading draws at random)."""
    conversation = generate.build()
    alice, bob = conversation["parties"]["alice"], conversation["parties"]["bob"]
    messages = conversation["messages"]
    at = {event["deliver"]: event["now"] for event in conversation["timeline"] if "deliver" in event}
    session = next(event["session"] for event in conversation["timeline"] if event.get("deliver") == 5)
    bob_keys = json.loads(base64.b64decode(bob["bundle"]["bundleData"]))["supportedSuites"][0]

    def sent(index: int, status: str = "sent") -> dict:
        m = messages[index]
        return {"id": m["id"], "peer": BOB_ID, "peerName": "bob", "direction": "out", "text": m["plaintext"],
                "timestamp": m["timestamp"], "status": status}

    def received(index: int) -> dict:
        m = messages[index]
        return {"id": m["id"], "peer": BOB_ID, "peerName": "bob", "direction": "in", "timestamp": m["timestamp"],
                "receivedAt": at[index], "status": "received", "text": m["plaintext"]}

    created = int(BUNDLE_TIME.timestamp())
    data = {
        "version": account.STATE_VERSION, "server": "ws://127.0.0.1:8080/ws",
        "identity": IdentityKeys(bytes.fromhex(alice["masterSeed"]), bytes.fromhex(alice["identityPrivate"])).to_dict(),
        "account": {"userId": ALICE_ID, "username": "alice", "sessionToken": b64encode(derived("alice token"))[:43],
                    "expires": created + 30 * 24 * 3600},
        "signedPrekeys": [dict(SignedPrekey(bytes.fromhex(alice["signedPrekeyPrivate"])).to_dict(), createdAt=created,
                               published=True, retiredAt=None)],
        "oneTimePrekeys": [OneTimePrekey(1, bytes.fromhex(alice["oneTimePrekey"]["privateKey"])).to_dict()],
        "nextPrekeyId": 2,
        "contacts": {BOB_ID: {"username": "bob", "masterKey": bob["bundle"]["masterIdentityKey"], "pinnedAt": created,
                              "formerIds": [], "identityKey": bob_keys["identityKey"], "bundleTime": created}},
        "sessions": {BOB_ID: [session]},
        "outbox": [{"id": "0b5f6c1e-2d3a-4e5f-8a9b-0c1d2e3f4a5b", "peerName": "bob", "peer": None,
                    "text": "written while offline ✓", "createdAt": at[5] + 30, "message": None}],
        "historyKey": b64encode(derived("alice history key")), "keepMessages": 10000,
        "history": [sent(0), sent(1), received(2), sent(3), received(5)],
    }
    passphrase = "alice's passphrase ✓"

    # The web client's version 1: history (with unsent and refused messages) and outbox in the state.
    old = copy.deepcopy(data)
    del old["historyKey"], old["keepMessages"]
    old["version"] = 1
    old["contacts"] = {BOB_ID: {key: value for key, value in data["contacts"][BOB_ID].items()
                                if key not in ("formerIds", "bundleTime")}}
    old["sessions"] = {BOB_ID: [dict(session, version=1, skipped=[item[:3] for item in session["skipped"]])]}
    unsent = messages[3]
    old["outbox"] = [{"id": unsent["id"], "from": ALICE_ID, "to": BOB_ID, "ephemeralPublicKey": unsent["ephemeralPublicKey"],
                      "messageNumber": unsent["messageNumber"], "content": unsent["content"], "timestamp": unsent["timestamp"]}]
    old["history"] = [sent(0), sent(1, "delivered"), dict(received(2), verified=True), sent(3, "pending"),
                      {"id": "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", "peer": BOB_ID, "peerName": "bob", "direction": "in",
                       "timestamp": None, "receivedAt": at[5], "status": "undecryptable", "reason": "no session or prekey of ours opens it"}]
    with tempfile.TemporaryDirectory() as directory:
        history = HistoryLog(str(Path(directory) / "upgrade.history"))
        upgraded = copy.deepcopy(old)
        account.upgrade(upgraded, history)
        upgraded = account.key_file(upgraded, history)
        history.commit()
        history.close()
    del upgraded["historyKey"]
    return {"passphrase": passphrase, "data": data, "document": _sealed(data, passphrase, "key file"),
            "version1": old, "upgraded": upgraded}


def _msgpack() -> list[dict]:
    """Frames as the seed's clients and the server's codec (use_bin_type) encode them."""
    frames = [
        {"type": "ping", "requestId": "7"},
        {"type": "sessionExpired"},
        {"type": "sendMessage", "requestId": "12", "payload": {
            "id": "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", "from": ALICE_ID, "to": BOB_ID,
            "ephemeralPublicKey": {"$bin": derived("ratchet key").hex()}, "messageNumber": 4294967295,
            "content": "A" * 300, "timestamp": 1772357400}},
        {"type": "ackMessage", "payload": {"messageIds": [ALICE_ID, BOB_ID]}},
        {"type": "error", "payload": {"code": "RATE_LIMITED", "message": "é" * 40, "retryAfter": 70000}},
        {"type": "x", "payload": {"n": [0, 127, 128, 255, 256, 65535, 65536, -1, -32, -33, -128, -129, -32768, -32769,
                                        2**32, 2**53 - 1], "t": True, "f": False, "z": None, "s": "ß" * 20}},
    ]

    def native(value: object) -> object:
        if isinstance(value, dict):
            return bytes.fromhex(value["$bin"]) if set(value) == {"$bin"} else {k: native(v) for k, v in value.items()}
        if isinstance(value, list):
            return [native(v) for v in value]
        return value

    return [{"frame": frame, "msgpack": msgpack.packb(native(frame), use_bin_type=True).hex()} for frame in frames]


def build() -> dict:
    return {
        "description": (
            "Construct formats shared by construct-chat and the web client: padding buckets, envelope "
            "context, safety numbers, key bundles (one good, then rejected ones), the state file, a key "
            "file (an account with its history inline; a version 1 state and what it upgrades to, but "
            "its random historyKey), MessagePack frames ({\"$bin\": hex} stands for a bin value). Hex "
            "for raw bytes."
        ),
        "padding": _padding(),
        "envelopeContext": _envelopes(),
        "safetyNumbers": _safety_numbers(),
        "bundles": _bundles(),
        "stateFile": _state_file(),
        "keyFile": _key_file(),
        "msgpack": _msgpack(),
    }


def main() -> None:
    PATH.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
