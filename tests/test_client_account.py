"""The reference client's account logic (construct.client.account) without a server: users'
states and history files, a fake key directory that hands out one-time prekeys once, and the
messages between them."""

from __future__ import annotations

import copy
import os
import uuid
from pathlib import Path

import pytest
from nacl import bindings as nacl_bindings
from nacl.public import PrivateKey

from construct.client import account
from construct.client.account import SENDER_GONE, IdentityChanged, PeerBundle, SelfMessage, StaleBundle
from construct.client.crypto import (
    MAX_PLAINTEXT,
    IdentityKeys,
    MessageTooLarge,
    SignedPrekey,
    b64decode,
    b64encode,
    envelope_context,
    hkdf_sha256,
    make_key_bundle,
    pad,
    verify_key_bundle,
)
from construct.client.history import HistoryLog

NOW = 1_800_000_000.0


class User:
    """One client's state, its history file, and what the server would publish for it."""

    def __init__(self, name: str, directory: Path, user_id: str | None = None) -> None:
        self.name = name
        self.user_id = user_id or str(uuid.uuid4())
        self.state = account.new_state("ws://server/ws", NOW)
        self.history = HistoryLog(str(directory / f"{name}-{self.user_id[:8]}.history"))
        account.set_account(
            self.state, {"userId": self.user_id, "username": name, "sessionToken": "t", "expires": 0}
        )
        self.bundle = account.signed_prekey_to_publish(self.state, NOW)
        account.signed_prekey_published(self.state, verify_key_bundle(self.bundle).signed_prekey_id, NOW)
        self.pool = account.new_one_time_prekeys(self.state, 3)

    def run(self, fn, *args, **kwargs):
        """`fn(state, history, …)` as the store runs it: on a copy, the history written if it returns."""
        working = copy.deepcopy(self.state)
        if "historyKey" in working:
            self.history.begin(b64decode(working["historyKey"]), working["keepMessages"])
        try:
            result = fn(working, self.history, *args, **kwargs)
        except BaseException:
            self.history.rollback()
            raise
        self.history.commit()
        self.state = working
        return result

    def fetched(self) -> PeerBundle:
        """What a peer's getPublicKey returns: the bundle and the next one-time prekey, once."""
        prekey = self.pool.pop(0) if self.pool else None
        return PeerBundle(self.name, verify_key_bundle(self.bundle, self.user_id), prekey)

    def send(self, peer: "User", text: str, bundle: PeerBundle | None = None) -> dict:
        """What `send` does: queue, resolve the name, encrypt (fetching a bundle if need be), settle."""
        entry = account.queue_outgoing(self.state, peer.name, text, NOW)
        account.resolve_outgoing(self.state, entry["id"], peer.user_id)
        message = account.encrypt_outgoing(self.state, entry["id"], None, NOW)
        if message is None:
            message = account.encrypt_outgoing(self.state, entry["id"], bundle or peer.fetched(), NOW)
        self.run(lambda data, history: account.outgoing_settled(data, history, entry["id"], "sent"))
        return account.wire_message(message)

    def accept(self, message: dict, sender: PeerBundle | str | None, now: float = NOW) -> account.Incoming:
        return self.run(lambda data, history: account.accept_incoming(data, history, message, sender, now))

    def receive(self, sender: "User", message: dict, now: float = NOW) -> account.Incoming:
        outcome = self.accept(message, None, now)
        if outcome.status == "need-bundle":
            outcome = self.accept(message, sender.fetched(), now)
        return outcome

    def messages(self) -> list[dict]:
        return self.run(lambda data, history: history.messages())


@pytest.fixture
def users(tmp_path):
    return lambda *names: [User(name, tmp_path) for name in names]


def _texts(user: User, peer: User) -> list[tuple[str, str]]:
    return [(e["direction"], e.get("text")) for e in user.messages() if e["peer"] == peer.user_id]


def test_conversation_uses_a_one_time_prekey_and_pins_both_sides(users):
    """A first message runs X3DH with a one-time prekey, which the recipient then deletes; replies flow."""
    alice, bob = users("alice", "bob")
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


def test_nothing_stored_is_plaintext(users, tmp_path):
    """Neither the ChatMessage nor the state nor the history file carries the text or its base64."""
    alice, bob = users("alice", "bob")
    message = alice.send(bob, "attack at dawn")
    bob.receive(alice, message)
    stored = repr(message) + repr(bob.state) + repr(alice.state)
    stored += "".join(path.read_bytes().decode("latin-1") for path in tmp_path.iterdir())
    assert "attack at dawn" not in stored and b64encode(b"attack at dawn") not in stored
    assert [m["text"] for m in bob.messages()] == ["attack at dawn"]


def test_duplicates_are_recognised_and_change_nothing(users):
    """A redelivered message is a duplicate, before and after later messages, and leaves the state alone."""
    alice, bob = users("alice", "bob")
    first = alice.send(bob, "one")
    bob.receive(alice, first)
    second = alice.send(bob, "two")
    bob.receive(alice, second)
    before = copy.deepcopy(bob.state)
    for message in (first, second):
        assert bob.accept(message, None).status == "duplicate"
    assert bob.state == before and len(bob.messages()) == 2


def test_out_of_order_delivery_within_a_chain(users):
    """Messages decrypt whatever order they arrive in."""
    alice, bob = users("alice", "bob")
    messages = [alice.send(bob, f"m{i}") for i in range(4)]
    for message in (messages[0], messages[3], messages[1], messages[2]):
        assert bob.receive(alice, message).status == "received"
    assert [t for _, t in _texts(bob, alice)] == ["m0", "m3", "m1", "m2"]


def test_pinned_identity_change_is_refused_when_sending(users):
    """A bundle with another master key for a pinned contact raises IdentityChanged."""
    alice, bob = users("alice", "bob")
    alice.send(bob, "hi")
    del alice.state["sessions"][bob.user_id]
    impostor = make_key_bundle(IdentityKeys.generate(), SignedPrekey.generate(), bob.user_id)
    forged = PeerBundle("bob", verify_key_bundle(impostor, bob.user_id), None)
    with pytest.raises(IdentityChanged, match="construct-chat trust bob"):
        alice.send(bob, "again", forged)


def test_a_reused_name_is_an_identity_change_until_trusted(tmp_path, users):
    """Bob deletes his account and someone registers `bob` again: the name now means another
    user id, which is refused (sending, and messages from the newcomer) until `trust_contact`."""
    alice, bob = users("alice", "bob")
    assert bob.receive(alice, alice.send(bob, "hello bob")).status == "received"
    assert alice.receive(bob, bob.send(alice, "hi")).status == "received"
    newcomer = User("bob", tmp_path)
    entry = account.queue_outgoing(alice.state, "bob", "for bob", NOW)
    with pytest.raises(IdentityChanged, match="another account for bob"):
        account.resolve_outgoing(alice.state, entry["id"], newcomer.user_id)
    stranger = newcomer.send(alice, "it's me, bob", alice.fetched())
    outcome = alice.receive(newcomer, stranger)
    assert outcome.status == "rejected" and "trust bob" in outcome.reason
    assert [c["username"] for c in alice.state["contacts"].values()] == ["bob"]

    account.trust_contact(alice.state, "bob", newcomer.user_id, newcomer.fetched(), NOW)
    assert list(alice.state["contacts"]) == [newcomer.user_id]
    assert alice.state["contacts"][newcomer.user_id]["formerIds"] == [bob.user_id]
    assert bob.user_id not in alice.state["sessions"]
    account.resolve_outgoing(alice.state, entry["id"], newcomer.user_id)
    # The history of the former bob stays, under the name.
    shown = alice.run(lambda data, history: account.history_of(data, history, "bob"))
    assert [m["text"] for m in shown] == ["hello bob", "hi", "for bob"]
    assert shown[-1]["status"] == "pending"


def test_an_account_pinned_under_another_name_is_refused(users):
    alice, bob = users("alice", "bob")
    alice.send(bob, "hi")
    entry = account.queue_outgoing(alice.state, "robert", "hi", NOW)
    with pytest.raises(IdentityChanged, match="you pinned as bob"):
        account.resolve_outgoing(alice.state, entry["id"], bob.user_id)


def test_sessions_start_only_on_a_bundle_no_older_than_one_seen(users):
    """A server replaying an older (validly signed) bundle cannot make a new session use it."""
    alice, bob = users("alice", "bob")
    old_bundle = bob.fetched()
    later = NOW + account.SIGNED_PREKEY_ROTATION_SECONDS
    newer = account.signed_prekey_to_publish(bob.state, later)
    assert bob.receive(alice, alice.send(bob, "hi", PeerBundle("bob", verify_key_bundle(newer), None))).status == (
        "received"
    )
    del alice.state["sessions"][bob.user_id]
    with pytest.raises(StaleBundle, match="older than one seen before"):
        alice.send(bob, "again", old_bundle)
    assert account.bundle_time(verify_key_bundle(newer)) == int(later)


def test_initial_message_with_keys_not_in_the_senders_bundle_is_rejected(users):
    """An X3DH header whose keys are not the sender's published ones is dropped, not shown."""
    alice, bob, mallory = users("alice", "bob", "mallory")
    # Mallory (or a server) writes to Bob with her own keys, in an envelope that names Alice.
    mallory.state["account"]["userId"] = alice.user_id
    message = mallory.send(bob, "I am alice")
    assert bob.accept(message, None).status == "need-bundle"
    outcome = bob.accept(message, alice.fetched())
    assert outcome.status == "rejected"
    assert "I am alice" not in repr(bob.state) and bob.messages() == []
    assert alice.user_id not in bob.state["contacts"] and alice.user_id not in bob.state["sessions"]


def test_sender_keys_must_match_their_bundle(users):
    """A genuine initial message is rejected when the fetched bundle holds other keys."""
    alice, bob = users("alice", "bob")
    message = alice.send(bob, "hello")
    other = make_key_bundle(IdentityKeys.generate(), SignedPrekey.generate(), alice.user_id)
    outcome = bob.accept(message, PeerBundle("alice", verify_key_bundle(other), None))
    assert outcome.status == "rejected" and "signed bundle" in outcome.reason
    assert bob.accept(message, None).status == "duplicate"
    assert [k["keyId"] for k in bob.state["oneTimePrekeys"]] == [1, 2, 3]
    gone = bob.accept(dict(alice.send(bob, "x")), SENDER_GONE)
    assert gone.status == "rejected"


def test_simultaneous_first_messages_converge(users):
    """When both start a session at once, both first messages decrypt and the conversation goes on."""
    alice, bob = users("alice", "bob")
    to_bob, to_alice = alice.send(bob, "hi from alice"), bob.send(alice, "hi from bob")
    assert bob.receive(alice, to_bob).status == "received"
    assert alice.receive(bob, to_alice).status == "received"
    for i in range(3):
        assert bob.receive(alice, alice.send(bob, f"a{i}")).status == "received"
        assert alice.receive(bob, bob.send(alice, f"b{i}")).status == "received"
    assert len(alice.state["sessions"][bob.user_id]) <= account.MAX_SESSIONS_PER_CONTACT


def test_an_initial_message_naming_a_used_one_time_prekey_is_refused_with_a_reason(tmp_path, users):
    """Two first messages on one one-time prekey (the server handed it out twice): the second
    cannot be read, and says so instead of passing for a duplicate."""
    alice, bob, carol = users("alice", "bob", "carol")
    handed_out = bob.fetched()
    assert bob.receive(alice, alice.send(bob, "first", handed_out)).status == "received"
    outcome = bob.receive(carol, carol.send(bob, "second", PeerBundle("bob", handed_out.keys, handed_out.one_time_prekey)))
    assert outcome.status == "undecryptable"
    assert "one-time prekey 1, which was already used" in outcome.reason


def test_a_message_sent_again_from_a_restored_state_is_refused_with_a_reason(users):
    """After Alice restores an old state and writes again, her message reuses a message number
    Bob already read: it is refused as such, not silently taken for a duplicate."""
    alice, bob = users("alice", "bob")
    assert bob.receive(alice, alice.send(bob, "hello")).status == "received"
    backup = copy.deepcopy(alice.state)
    assert bob.receive(alice, alice.send(bob, "one")).status == "received"
    alice.state = backup
    outcome = bob.receive(alice, alice.send(bob, "two"))
    assert outcome.status == "undecryptable" and "restored an old copy" in outcome.reason


def test_skipped_keys_expire_by_time_through_the_account(users):
    """A message whose key was skipped more than 30 days before it arrives is refused."""
    alice, bob = users("alice", "bob")
    assert bob.receive(alice, alice.send(bob, "hi")).status == "received"
    late, later = alice.send(bob, "late"), alice.send(bob, "later")
    assert bob.receive(alice, later).status == "received"
    outcome = bob.receive(alice, late, now=NOW + 31 * 24 * 3600)
    assert outcome.status == "undecryptable" and "its key expired" in outcome.reason


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


def test_seed_v1_messages_are_refused_even_from_a_pinned_contact(users):
    """The seed's unauthenticated scheme is no longer read: anyone holding the signed prekey's
    public half could write it. It is refused (and acknowledged), never shown."""
    alice, bob = users("alice", "bob")
    assert bob.receive(alice, alice.send(bob, "hello")).status == "received"
    message_id = str(uuid.uuid4())
    spk = verify_key_bundle(bob.bundle).signed_prekey
    key, content = _seal_seed_v1(spk, b"old client", envelope_context(alice.user_id, bob.user_id, message_id))
    message = {"id": message_id, "from": alice.user_id, "to": bob.user_id, "ephemeralPublicKey": key,
               "messageNumber": 0, "content": content, "timestamp": 1}
    outcome = bob.receive(alice, message)
    assert outcome.status == "undecryptable" and "not a Double Ratchet message" in outcome.reason
    assert "text" not in outcome.entry
    assert [e.get("text") for e in bob.messages()] == ["hello"]
    assert bob.accept(message, None).status == "duplicate"


def test_garbage_is_undecryptable_and_remembered(users):
    """Content nobody can open is refused, and only its id is kept (so its redelivery is a duplicate)."""
    alice, bob = users("alice", "bob")
    message = {"id": str(uuid.uuid4()), "from": alice.user_id, "to": bob.user_id,
               "ephemeralPublicKey": bytes(32), "messageNumber": 0, "content": "AAAA", "timestamp": 1}
    assert bob.accept(message, None).status == "undecryptable"
    assert bob.accept(message, None).status == "duplicate"
    assert bob.accept(dict(message, id="x", ephemeralPublicKey="%"), None).status == "undecryptable"
    assert bob.messages() == []


def test_history_keeps_the_newest_messages_and_refused_junk_goes_too(users, monkeypatch):
    """keepMessages bounds the messages kept; the ids of refused messages are kept only as long as
    a redelivery could come, and never push real messages out."""
    monkeypatch.setattr("construct.client.history.SEEN_KEPT", 5)
    alice, bob = users("alice", "bob")
    account.set_keep(bob.state, 3)
    for i in range(5):
        assert bob.receive(alice, alice.send(bob, f"m{i}")).status == "received"
    assert [m["text"] for m in bob.messages()] == ["m2", "m3", "m4"]
    junk = [{"id": str(uuid.uuid4()), "from": str(uuid.uuid4()), "to": bob.user_id, "ephemeralPublicKey": bytes(32),
             "messageNumber": 0, "content": "AAAA", "timestamp": 1} for _ in range(8)]
    for message in junk:
        assert bob.accept(message, None).status == "undecryptable"
    assert [m["text"] for m in bob.messages()] == ["m2", "m3", "m4"]
    db = bob.history._connection()
    assert db.execute("SELECT count(*) FROM seen").fetchone()[0] == 5
    assert bob.accept(junk[-1], None).status == "duplicate"


def test_the_state_does_not_grow_with_the_history(users):
    """Messages go to the history file: the state file's content stays the same size."""
    alice, bob = users("alice", "bob")
    bob.receive(alice, alice.send(bob, "first"))
    size = len(repr(bob.state))
    for i in range(40):
        bob.receive(alice, alice.send(bob, f"message {i}"))
    assert len(repr(bob.state)) < size + 200
    assert len(bob.messages()) == 41


def test_sending_to_yourself_and_too_long_messages_are_refused_before_anything_is_queued(users):
    (alice,) = users("alice")
    with pytest.raises(SelfMessage):
        account.queue_outgoing(alice.state, "alice", "note to self", NOW)
    with pytest.raises(MessageTooLarge):
        account.queue_outgoing(alice.state, "bob", "x" * (MAX_PLAINTEXT + 1), NOW)
    assert alice.state["outbox"] == []


def test_a_version_1_state_is_upgraded_with_its_history_and_outbox(users, tmp_path):
    """States from before the history file: messages move to it, unsent ones keep their text."""
    alice, bob = users("alice", "bob")
    received = alice.send(bob, "kept")
    bob.receive(alice, received)
    entry = account.queue_outgoing(bob.state, "alice", "unsent", NOW)
    account.resolve_outgoing(bob.state, entry["id"], alice.user_id)
    message = account.encrypt_outgoing(bob.state, entry["id"], alice.fetched(), NOW)
    old = copy.deepcopy(bob.state)
    for key in ("historyKey", "keepMessages"):
        del old[key]
    old["version"] = 1
    old["history"] = [
        {"id": received["id"], "peer": alice.user_id, "peerName": "alice", "direction": "in", "timestamp": 1,
         "receivedAt": 1, "status": "received", "text": "kept", "verified": True},
        {"id": "junk", "peer": alice.user_id, "peerName": None, "direction": "in", "timestamp": 1, "receivedAt": 1,
         "status": "undecryptable", "reason": "x"},
        {"id": message["id"], "peer": alice.user_id, "direction": "out", "text": "unsent", "timestamp": 1,
         "status": "pending"},
    ]
    old["outbox"] = [message]
    upgraded = User("bob-upgraded", tmp_path)
    upgraded.state = old
    upgraded.run(account.upgrade)
    assert upgraded.state["version"] == account.STATE_VERSION and "history" not in upgraded.state
    assert [m["text"] for m in upgraded.messages()] == ["kept"]
    assert upgraded.state["outbox"] == [
        {"id": message["id"], "peerName": "alice", "peer": alice.user_id, "text": "unsent",
         "createdAt": message["timestamp"], "message": message}
    ]
    assert upgraded.accept(dict(received), None).status == "duplicate"
    assert upgraded.run(lambda data, history: history.seen("junk"))


def test_a_key_file_carries_the_history_and_opening_one_moves_it_into_the_history_file(users, tmp_path):
    """key_file (construct-chat export, and what the web client keeps and exports) is the state with
    its messages inline; upgrade moves them into the history file: shown messages (the web
    client's "delivered" too) kept in order, incoming ids recognised as seen, anything else dropped."""
    alice, bob = users("alice", "bob")
    first = alice.send(bob, "hello bob")
    bob.receive(alice, first)
    bob.send(alice, "hi alice")
    exported = bob.run(account.key_file)
    assert exported["version"] == account.STATE_VERSION and "history" not in bob.state
    assert [(m["direction"], m["text"]) for m in exported["history"]] == [("in", "hello bob"), ("out", "hi alice")]
    exported["history"] += [
        {"id": "from-a-browser", "peer": alice.user_id, "peerName": "alice", "direction": "out", "text": "seen live",
         "timestamp": 2, "status": "delivered"},
        {"id": "not-an-entry"}, "junk",
    ]
    opened = User("bob-elsewhere", tmp_path, bob.user_id)
    opened.state = copy.deepcopy(exported)
    opened.run(account.upgrade)
    assert opened.state == bob.state
    assert [(m["text"], m["status"]) for m in opened.messages()] == [
        ("hello bob", "received"), ("hi alice", "sent"), ("seen live", "delivered")]
    assert opened.accept(dict(first), None).status == "duplicate"
    # A current state file (no inline history) is left as it is.
    before = copy.deepcopy(opened.state)
    opened.run(account.upgrade)
    assert opened.state == before and len(opened.messages()) == 3


def test_signed_prekey_rotation_keeps_old_keys_for_a_while(users):
    """After a week a new signed prekey is published; the old one still opens messages in flight, then goes."""
    alice, bob = users("alice", "bob")
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


def test_one_time_prekey_ids_count_up(users):
    """Every batch takes fresh ids, so a key id is never uploaded twice."""
    (user,) = users("alice")
    batch = account.new_one_time_prekeys(user.state, 2)
    assert [p["keyId"] for p in batch] == [4, 5] and user.state["nextPrekeyId"] == 6
    assert len(user.state["oneTimePrekeys"]) == 5
