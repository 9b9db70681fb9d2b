"""Write tests/vectors/ratchet.json: deterministic test vectors of X3DH and the Double Ratchet.

    python -m tests.vectors.generate

Every private key and every random byte comes from SHA-256 of a label, and the vectors list the
random bytes each step drew (`senderRandom`, `recipientRandom`: 32-byte chunks for new X25519
keys, 24-byte chunks for nonces, in the order drawn), so another implementation can replay the
conversation byte for byte: tests/test_client_vectors.py does, and so does the web client. Each
event also holds the session it leaves behind (`session`: `Session.to_dict()` of the sender after a
send, of the recipient after a delivery, at the delivery's `now`), so both implementations store
sessions in the same form (version 2: skipped message keys stamped with when they were skipped).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

from construct.client.crypto import (
    IdentityKeys,
    OneTimePrekey,
    SignedPrekey,
    aead_encrypt,
    b64encode,
    envelope_context,
    hkdf_sha256,
    make_key_bundle,
    pad,
    verify_key_bundle,
)
from construct.client.ratchet import Session

PATH = Path(__file__).with_name("ratchet.json")
ALICE_ID = "3f2b8c1e-7a4d-4e2b-9c61-0d5e8f7a1b2c"
BOB_ID = "9a7c4e12-5b3f-4d8e-a1c6-2f0b9d8e7c65"
BUNDLE_TIME = datetime(2026, 3, 1, 9, 0, 0, tzinfo=timezone.utc)
# The conversation's clock: the timeline's event i happens at START + 60 i (unix seconds).
START = int(BUNDLE_TIME.timestamp()) + 600
# The conversation, as a timeline: ("send", sender, text) or ("deliver", index of the message).
# Alice's first two messages start the session (X3DH header, one-time prekey); Bob's last two
# reach Alice in reverse order.
TIMELINE = [
    ("send", "alice", "Hi Bob, it's Alice"),
    ("send", "alice", "Are you there?"),
    ("deliver", 0),
    ("deliver", 1),
    ("send", "bob", "Hi Alice!"),
    ("deliver", 2),
    ("send", "alice", "Good to hear from you"),
    ("deliver", 3),
    ("send", "bob", "Two messages,"),
    ("send", "bob", "delivered out of order"),
    ("deliver", 5),
    ("deliver", 4),
]


def derived(label: str, size: int = 32) -> bytes:
    return hashlib.sha256(label.encode()).digest()[:size]


class RecordedRandom:
    """A deterministic byte source that remembers what it handed out since the last `take`."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._count = 0
        self._drawn: list[bytes] = []

    def __call__(self, size: int) -> bytes:
        self._count += 1
        chunk = derived(f"{self._label} random {self._count}", size)
        self._drawn.append(chunk)
        return chunk

    def take(self) -> list[str]:
        drawn, self._drawn = self._drawn, []
        return [chunk.hex() for chunk in drawn]


def _party(name: str, user_id: str) -> dict:
    identity = IdentityKeys(derived(f"{name} master seed"), derived(f"{name} identity"))
    spk = SignedPrekey(derived(f"{name} signed prekey"))
    opk = OneTimePrekey(1, derived(f"{name} one-time prekey 1"))
    return {"userId": user_id, "identity": identity, "spk": spk, "opk": opk,
            "bundle": make_key_bundle(identity, spk, user_id, BUNDLE_TIME)}


def _encrypt_vectors() -> list[dict]:
    vectors = []
    for index, plaintext in enumerate([b"", b"hello", "ünïcödé ✓".encode(), b"x" * 300]):
        message_key = derived(f"message key {index}")
        nonce = derived(f"nonce {index}", 24)
        associated_data = derived(f"associated data {index}") * (index + 1)
        key = hkdf_sha256(message_key, bytes(32), b"construct/ratchet/message", 32)
        vectors.append({
            "messageKey": message_key.hex(), "nonce": nonce.hex(), "plaintext": plaintext.hex(),
            "associatedData": associated_data.hex(), "aeadKey": key.hex(),
            "ciphertext": aead_encrypt(key, nonce, pad(plaintext), associated_data).hex(),
        })
    return vectors


def build() -> dict:
    parties = {"alice": _party("alice", ALICE_ID), "bob": _party("bob", BOB_ID)}
    randoms = {name: RecordedRandom(name) for name in parties}
    sessions: dict[str, Session] = {}
    messages: list[dict] = []
    timeline: list[dict] = []
    for index, event in enumerate(TIMELINE):
        now = START + 60 * index
        if event[0] == "send":
            timeline.append({"send": len(messages)})
            messages.append(_send(parties, sessions, randoms, event[1], event[2], len(messages), now))
            timeline[-1]["session"] = sessions[event[1]].to_dict()
        else:
            timeline.append({"deliver": event[1], "now": now})
            _deliver(parties, sessions, randoms, messages[event[1]], now)
            timeline[-1]["session"] = sessions[messages[event[1]]["to"]].to_dict()
    return {
        "description": (
            "Construct message encryption (docs/crypto.md): ENCRYPT vectors, then one X3DH + Double "
            "Ratchet conversation. Hex for raw bytes, base64 where the wire has base64. Random bytes "
            "each step drew are listed in order (32 bytes: an X25519 private key; 24: a nonce)."
        ),
        "encrypt": _encrypt_vectors(),
        "parties": {
            name: {
                "userId": party["userId"],
                "masterSeed": party["identity"].signing_seed.hex(),
                "identityPrivate": party["identity"].dh_private.hex(),
                "signedPrekeyPrivate": party["spk"].private.hex(),
                "oneTimePrekey": {"keyId": party["opk"].key_id, "privateKey": party["opk"].private.hex(),
                                  "publicKey": b64encode(party["opk"].public)},
                "bundle": party["bundle"],
            }
            for name, party in parties.items()
        },
        "timeline": timeline,
        "messages": messages,
    }


def _send(parties: dict, sessions: dict, randoms: dict, sender: str, text: str, index: int, now: int) -> dict:
    recipient = "bob" if sender == "alice" else "alice"
    if sender not in sessions:
        bundle = verify_key_bundle(parties[recipient]["bundle"], parties[recipient]["userId"])
        sessions[sender] = Session.initiate(
            parties[sender]["identity"], bundle, parties[recipient]["opk"].upload_form(), randoms[sender]
        )
    message_id = str(uuid.UUID(bytes=derived(f"message id {index}", 16), version=4))
    context = envelope_context(parties[sender]["userId"], parties[recipient]["userId"], message_id)
    ratchet_public, number, content = sessions[sender].encrypt(text.encode(), context)
    return {
        "from": sender, "to": recipient, "id": message_id, "plaintext": text,
        "ephemeralPublicKey": b64encode(ratchet_public), "messageNumber": number, "content": content,
        "timestamp": now, "senderRandom": randoms[sender].take(),
    }


def _deliver(parties: dict, sessions: dict, randoms: dict, message: dict, now: int) -> None:
    recipient, sender = parties[message["to"]], parties[message["from"]]
    context = envelope_context(sender["userId"], recipient["userId"], message["id"])
    ratchet_public = base64.b64decode(message["ephemeralPublicKey"])
    if message["to"] not in sessions:
        sessions[message["to"]], plaintext, _ = Session.from_initial(
            recipient["identity"], {recipient["spk"].key_id: recipient["spk"]},
            {recipient["opk"].key_id: recipient["opk"]}, ratchet_public,
            message["messageNumber"], message["content"], context, randoms[message["to"]], now=now,
        )
    else:
        plaintext = sessions[message["to"]].decrypt(
            ratchet_public, message["messageNumber"], message["content"], context, now=now
        )
    assert plaintext == message["plaintext"].encode()
    message["recipientRandom"] = randoms[message["to"]].take()


def main() -> None:
    PATH.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
