"""The reference client's account logic (construct.client.account) without a server: two users'
states, a fake key directory that hands out one-time prekeys once, and the messages between them."""

from __future__ import annotations

import copy
import os
import uuid

import pytest
from nacl import bindings as nacl_bindings
from nacl.public import PrivateKey

from construct.client import account
from construct.client.account import SENDER_GONE, IdentityChanged, PeerBundle
from construct.client.crypto import (
    IdentityKeys,
    SignedPrekey,
    b64encode,
    envelope_context,
    hkdf_sha256,
    make_key_bundle,
    pad,
    verify_key_bundle,
)

NOW = 1_800_000_000.0


class User:
    """One client's state and what the server would publish for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.user_id = str(uuid.uuid4())
        self.state = account.new_state("ws://server/ws", NOW)
        account.set_account(
            self.state, {"userId": self.user_id, "username": name, "sessionToken": "t", "expires": 0}
        )
        self.bundle = account.signed_prekey_to_publish(self.state, NOW)
        account.signed_prekey_published(self.state, verify_key_bundle(self.bundle).signed_prekey_id, NOW)
        self.pool = account.new_one_time_prekeys(self.state, 3)

    def fetched(self) -> PeerBundle:
        """What a peer's getPublicKey returns: the bundle and the next one-time prekey, once."""
        prekey = self.pool.pop(0) if self.pool else None
        return PeerBundle(self.name, verify_key_bundle(self.bundle, self.user_id), prekey)

    def send(self, peer: "User", text: str) -> dict:
        message = account.prepare_outgoing(self.state, peer.user_id, text, None, NOW)
        if message is None:
            message = account.prepare_outgoing(self.state, peer.user_id, text, peer.fetched(), NOW)
        account.outgoing_settled(self.state, message["id"], "sent")
        return account.wire_message(message)

    def receive(self, sender: "User", message: dict) -> account.Incoming:
        outcome = account.accept_incoming(self.state, message, None, NOW)
        if outcome.status == "need-bundle":
            outcome = account.accept_incoming(self.state, message, sender.fetched(), NOW)
        return outcome


def _texts(user: User, peer: User) -> list[tuple[str, str]]:
    return [(e["direction"], e.get("text")) for e in user.state["history"] if e["peer"] == peer.user_id]


def test_conversation_uses_a_one_time_prekey_and_pins_both_sides():
    """A first message runs X3DH with a one-time prekey, which the recipient then deletes; replies flow."""
    alice, bob = User("alice"), User("bob")
    first = alice.send(bob, "hello bob")
    assert [k["keyId"] for k in bob.state["oneTimePrekeys"]] == [1, 2, 3]
    outcome = bob.receive(alice, first)
    assert outcome.status == "received" and outcome.entry["text"] == "hello bob"
    assert outcome.used_one_time_prekey
    assert [k["keyId"] for k in bob.state["oneTimePrekeys"]] == [2, 3]
    assert bob.state["contacts"][alice.user_id]["username"] == "alice"
    assert alice.receive(bob, bob.send(alice, "hi alice")).entry["text"] == "hi alice"
    for i in range(3):
        assert bob.receive(alice, alice.send(bob, f"m{i}")).status == "received"
    assert _texts(bob, alice) == [("in", "hello bob"), ("out", "hi alice"), ("in", "m0"), ("in", "m1"), ("in", "m2")]


def test_nothing_stored_is_plaintext_on_the_wire():
    """The ChatMessage carries neither the text nor its base64."""
    alice, bob = User("alice"), User("bob")
    message = alice.send(bob, "attack at dawn")
    wire = repr(message)
    assert "attack at dawn" not in wire and b64encode(b"attack at dawn") not in wire


def test_duplicates_are_recognised_and_change_nothing():
    """A redelivered message is a duplicate, before and after later messages, and leaves the state alone."""
    alice, bob = User("alice"), User("bob")
    first = alice.send(bob, "one")
    bob.receive(alice, first)
    second = alice.send(bob, "two")
    bob.receive(alice, second)
    before = copy.deepcopy(bob.state)
    for message in (first, second):
        assert account.accept_incoming(bob.state, message, None, NOW).status == "duplicate"
    assert bob.state == before


def test_out_of_order_delivery_within_a_chain():
    """Messages decrypt whatever order they arrive in."""
    alice, bob = User("alice"), User("bob")
    messages = [alice.send(bob, f"m{i}") for i in range(4)]
    for message in (messages[0], messages[3], messages[1], messages[2]):
        assert bob.receive(alice, message).status == "received"
    assert [t for _, t in _texts(bob, alice)] == ["m0", "m3", "m1", "m2"]


def test_pinned_identity_change_is_refused_when_sending():
    """A bundle with another master key for a pinned contact raises IdentityChanged."""
    alice, bob = User("alice"), User("bob")
    alice.send(bob, "hi")
    del alice.state["sessions"][bob.user_id]
    impostor = make_key_bundle(IdentityKeys.generate(), SignedPrekey.generate(), bob.user_id)
    forged = PeerBundle("bob", verify_key_bundle(impostor, bob.user_id), None)
    with pytest.raises(IdentityChanged):
        account.prepare_outgoing(alice.state, bob.user_id, "again", forged, NOW)


def test_initial_message_with_keys_not_in_the_senders_bundle_is_rejected():
    """An X3DH header whose keys are not the sender's published ones is dropped, not shown."""
    alice, bob, mallory = User("alice"), User("bob"), User("mallory")
    # Mallory (or a server) writes to Bob with her own keys, in an envelope that names Alice.
    mallory.state["account"]["userId"] = alice.user_id
    message = mallory.send(bob, "I am alice")
    outcome = account.accept_incoming(bob.state, message, None, NOW)
    assert outcome.status == "need-bundle"
    outcome = account.accept_incoming(bob.state, message, alice.fetched(), NOW)
    assert outcome.status == "rejected"
    assert "I am alice" not in repr(bob.state)
    assert alice.user_id not in bob.state["contacts"] and alice.user_id not in bob.state["sessions"]


def test_sender_keys_must_match_their_bundle():
    """A genuine initial message is rejected when the fetched bundle holds other keys."""
    alice, bob = User("alice"), User("bob")
    message = alice.send(bob, "hello")
    other = make_key_bundle(IdentityKeys.generate(), SignedPrekey.generate(), alice.user_id)
    outcome = account.accept_incoming(bob.state, message, PeerBundle("alice", verify_key_bundle(other), None), NOW)
    assert outcome.status == "rejected" and "signed bundle" in outcome.reason
    assert account.accept_incoming(bob.state, message, None, NOW).status == "duplicate"
    assert [k["keyId"] for k in bob.state["oneTimePrekeys"]] == [1, 2, 3]
    gone = account.accept_incoming(bob.state, dict(alice.send(bob, "x")), SENDER_GONE, NOW)
    assert gone.status == "rejected"


def test_simultaneous_first_messages_converge():
    """When both start a session at once, both first messages decrypt and the conversation goes on."""
    alice, bob = User("alice"), User("bob")
    to_bob, to_alice = alice.send(bob, "hi from alice"), bob.send(alice, "hi from bob")
    assert bob.receive(alice, to_bob).status == "received"
    assert alice.receive(bob, to_alice).status == "received"
    for i in range(3):
        assert bob.receive(alice, alice.send(bob, f"a{i}")).status == "received"
        assert alice.receive(bob, bob.send(alice, f"b{i}")).status == "received"
    assert len(alice.state["sessions"][bob.user_id]) <= account.MAX_SESSIONS_PER_CONTACT


def _seal_seed_v1(spk_public: bytes, plaintext: bytes, associated_data: bytes) -> tuple[bytes, str]:
    """The seed's per-message scheme, as an old client still sends it: sealed to the signed
    prekey with a fresh ephemeral key, no sender authentication."""
    ephemeral = PrivateKey.generate()
    shared = nacl_bindings.crypto_scalarmult(bytes(ephemeral), spk_public)
    key = hkdf_sha256(shared, bytes(ephemeral.public_key) + spk_public, b"construct/v1/message", 32)
    nonce = os.urandom(12)
    sealed = nacl_bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
        pad(plaintext), associated_data, nonce, key
    )
    return bytes(ephemeral.public_key), b64encode(nonce + sealed)


def test_seed_v1_messages_are_refused_even_from_a_pinned_contact():
    """The seed's unauthenticated scheme is no longer read: anyone holding the signed prekey's
    public half could write it. It is refused (and acknowledged), never shown."""
    alice, bob = User("alice"), User("bob")
    assert bob.receive(alice, alice.send(bob, "hello")).status == "received"
    message_id = str(uuid.uuid4())
    spk = verify_key_bundle(bob.bundle).signed_prekey
    key, content = _seal_seed_v1(spk, b"old client", envelope_context(alice.user_id, bob.user_id, message_id))
    message = {"id": message_id, "from": alice.user_id, "to": bob.user_id, "ephemeralPublicKey": key,
               "messageNumber": 0, "content": content, "timestamp": 1}
    outcome = bob.receive(alice, message)
    assert outcome.status == "undecryptable" and "not a Double Ratchet message" in outcome.reason
    assert "text" not in outcome.entry
    assert [e.get("text") for e in bob.state["history"]] == ["hello", None]


def test_garbage_is_undecryptable_and_remembered():
    """Content nobody can open is recorded without text (so its redelivery is a duplicate)."""
    alice, bob = User("alice"), User("bob")
    bob.state["contacts"][alice.user_id] = {"username": "alice", "masterKey": "x", "pinnedAt": 0}
    message = {"id": str(uuid.uuid4()), "from": alice.user_id, "to": bob.user_id,
               "ephemeralPublicKey": bytes(32), "messageNumber": 0, "content": "AAAA", "timestamp": 1}
    assert account.accept_incoming(bob.state, message, None, NOW).status == "undecryptable"
    assert account.accept_incoming(bob.state, message, None, NOW).status == "duplicate"
    assert account.accept_incoming(bob.state, dict(message, id="x", ephemeralPublicKey="%"), None, NOW).status == (
        "undecryptable"
    )


def test_signed_prekey_rotation_keeps_old_keys_for_a_while():
    """After a week a new signed prekey is published; the old one still opens messages in flight, then goes."""
    alice, bob = User("alice"), User("bob")
    in_flight = alice.send(bob, "sent before the rotation")
    assert account.signed_prekey_to_publish(bob.state, NOW + 3600) is None
    later = NOW + account.SIGNED_PREKEY_ROTATION_SECONDS
    bundle = account.signed_prekey_to_publish(bob.state, later)
    assert verify_key_bundle(bundle, bob.user_id).signed_prekey != verify_key_bundle(bob.bundle).signed_prekey
    account.signed_prekey_published(bob.state, verify_key_bundle(bundle).signed_prekey_id, later)
    assert [entry["published"] for entry in bob.state["signedPrekeys"]] == [True, True]
    assert bob.state["signedPrekeys"][1]["retiredAt"] == int(later)
    assert bob.receive(alice, in_flight).status == "received"
    much_later = later + account.SIGNED_PREKEY_RETENTION_SECONDS
    account.signed_prekey_published(bob.state, verify_key_bundle(bundle).signed_prekey_id, much_later)
    assert len(bob.state["signedPrekeys"]) == 1


def test_one_time_prekey_ids_count_up():
    """Every batch takes fresh ids, so a key id is never uploaded twice."""
    user = User("alice")
    batch = account.new_one_time_prekeys(user.state, 2)
    assert [p["keyId"] for p in batch] == [4, 5] and user.state["nextPrekeyId"] == 6
    assert len(user.state["oneTimePrekeys"]) == 5
