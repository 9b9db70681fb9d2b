"""The shared test vectors (tests/vectors/ratchet.json) hold for the Python client.

The web client's tests replay the same file, so the two implementations cannot drift apart.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest

from construct.client.crypto import (
    IdentityKeys,
    OneTimePrekey,
    SignedPrekey,
    aead_decrypt,
    aead_encrypt,
    envelope_context,
    hkdf_sha256,
    pad,
    unpad,
    verify_key_bundle,
)
from construct.client.ratchet import Session
from tests.vectors import generate

VECTORS = json.loads(generate.PATH.read_text())


def test_the_vector_file_is_what_the_generator_writes():
    """Regenerate with `python -m tests.vectors.generate` after a deliberate format change."""
    assert generate.build() == VECTORS


@pytest.mark.parametrize("vector", VECTORS["encrypt"], ids=lambda v: f"{len(v['plaintext']) // 2}-bytes")
def test_encrypt_vectors(vector):
    """ENCRYPT: HKDF of the message key is the AEAD key; XChaCha20-Poly1305 of the padded text."""
    message_key, nonce, ad = (bytes.fromhex(vector[k]) for k in ("messageKey", "nonce", "associatedData"))
    key = hkdf_sha256(message_key, bytes(32), b"construct/ratchet/message", 32)
    assert key.hex() == vector["aeadKey"]
    assert aead_encrypt(key, nonce, pad(bytes.fromhex(vector["plaintext"])), ad).hex() == vector["ciphertext"]
    assert unpad(aead_decrypt(key, nonce, bytes.fromhex(vector["ciphertext"]), ad)).hex() == vector["plaintext"]


def _replay(chunks: list[str]) -> Callable[[int], bytes]:
    """Hand out exactly the recorded random chunks, in order, and nothing more."""
    queue = [bytes.fromhex(chunk) for chunk in chunks]

    def random_bytes(size: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == size
        return chunk

    random_bytes.left = queue  # type: ignore[attr-defined]
    return random_bytes


def test_the_conversation_replays_byte_for_byte():
    """With the recorded randomness each side produces exactly the recorded contents and reads
    every message, in the recorded delivery order, leaving the recorded session states."""
    parties = VECTORS["parties"]
    messages = VECTORS["messages"]
    identities = {
        name: IdentityKeys(bytes.fromhex(p["masterSeed"]), bytes.fromhex(p["identityPrivate"]))
        for name, p in parties.items()
    }
    sessions: dict[str, Session] = {}
    for event in VECTORS["timeline"]:
        if "send" in event:
            message = messages[event["send"]]
            sender, recipient = message["from"], message["to"]
            random_bytes = _replay(message["senderRandom"])
            if sender not in sessions:
                bundle = verify_key_bundle(parties[recipient]["bundle"], parties[recipient]["userId"])
                prekey = {k: parties[recipient]["oneTimePrekey"][k] for k in ("keyId", "publicKey")}
                sessions[sender] = Session.initiate(identities[sender], bundle, prekey, random_bytes)
            session = Session.from_dict(sessions[sender].to_dict(), random_bytes)
            context = envelope_context(parties[sender]["userId"], parties[recipient]["userId"], message["id"])
            ratchet_public, number, content = session.encrypt(message["plaintext"].encode(), context)
            assert (base64.b64encode(ratchet_public).decode(), number, content) == (
                message["ephemeralPublicKey"], message["messageNumber"], message["content"]
            )
            assert random_bytes.left == []
            assert session.to_dict() == event["session"]
            sessions[sender] = session
        else:
            message = messages[event["deliver"]]
            sender, recipient = message["from"], message["to"]
            random_bytes = _replay(message["recipientRandom"])
            context = envelope_context(parties[sender]["userId"], parties[recipient]["userId"], message["id"])
            ratchet_public = base64.b64decode(message["ephemeralPublicKey"])
            if recipient not in sessions:
                me = parties[recipient]
                spk = SignedPrekey(bytes.fromhex(me["signedPrekeyPrivate"]))
                opk = OneTimePrekey(me["oneTimePrekey"]["keyId"], bytes.fromhex(me["oneTimePrekey"]["privateKey"]))
                session, plaintext, used = Session.from_initial(
                    identities[recipient], {spk.key_id: spk}, {opk.key_id: opk}, ratchet_public,
                    message["messageNumber"], message["content"], context, random_bytes, now=event["now"],
                )
                assert used == opk.key_id
            else:
                session = Session.from_dict(sessions[recipient].to_dict(), random_bytes)
                plaintext = session.decrypt(
                    ratchet_public, message["messageNumber"], message["content"], context, now=event["now"]
                )
            assert plaintext == message["plaintext"].encode()
            assert random_bytes.left == []
            assert session.to_dict() == event["session"]
            sessions[recipient] = session
    assert [base64.b64decode(m["content"])[0] for m in messages] == [0x20, 0x20, 0x21, 0x21, 0x21, 0x21]
