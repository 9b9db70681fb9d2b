"""Sealed sender in the reference client's account logic, without a server: sealing an outbox
entry, opening a sealed message, and each certificate a recipient must refuse."""

from __future__ import annotations

import copy
import os
import uuid

import pytest

from construct.client import account
from construct.client.crypto import DecryptionError, b64decode, b64encode
from construct.client.sealed import InvalidCertificate, SenderCertificate, open_sealed, seal
from construct.core.certificates import ServerKeys, certificate_body
from tests.test_client_account import NOW, User

DAY = 24 * 3600


class Server:
    """The server's part: its signing keys, the certificates it issues, the envelope it stores."""

    def __init__(self) -> None:
        self.keys = ServerKeys.generate(NOW)

    def certificate(self, user: User, expires: float = NOW + DAY, identity_key: bytes | None = None,
                    key_id: int | None = None, signer=None) -> dict:
        key = self.keys.current
        key_id = key.key_id if key_id is None else key_id
        identity_key = identity_key or account.identity(user.state).master_public
        body = certificate_body(key_id, user.user_id, b64encode(identity_key), int(expires))
        signature = (signer or key).sign(body)
        return {"keyId": key_id, "certificate": b64encode(body), "signature": b64encode(signature),
                "expires": int(expires)}

    def public(self) -> dict:
        return {"keys": self.keys.public()}


def envelope(message_id: str, to: str, content: str, accepted_at: float = NOW) -> dict:
    return {"id": message_id, "to": to, "sealed": True, "content": content, "acceptedAt": int(accepted_at)}


class Sealing(User):
    """A user whose bundle hands out its access key, and who can seal."""

    def fetched(self) -> account.PeerBundle:
        plain = super().fetched()
        return account.PeerBundle(plain.username, plain.keys, plain.one_time_prekey, self.state["accessKey"])

    def send_sealed(self, peer: "Sealing", text: str, server: Server, now: float = NOW) -> dict:
        """What `send` does for a contact with an access key: encrypt, seal, and what the server stores."""
        entry = account.queue_outgoing(self.state, peer.name, text, now)
        account.resolve_outgoing(self.state, entry["id"], peer.user_id)
        if account.encrypt_outgoing(self.state, entry["id"], None, now) is None:
            account.encrypt_outgoing(self.state, entry["id"], peer.fetched(), now)
        assert account.sealing_access(self.state, peer.user_id) == {"accessKey": peer.state["accessKey"]}
        if self.state["senderCertificate"] is None:
            account.set_certificate(self.state, server.certificate(self, expires=now + DAY))
        content = account.seal_outgoing(self.state, entry["id"], now)
        assert content == account.seal_outgoing(self.state, entry["id"], now + 60)  # the same content when resent
        self.run(lambda data, history: account.outgoing_settled(data, history, entry["id"], "sent", sealed=True))
        return envelope(entry["id"], peer.user_id, content, now)

    def receive_sealed(self, sender: User, message: dict, server: Server, now: float = NOW) -> account.Incoming:
        """What `listen` does: fetch the server's keys or the sender's bundle when asked to."""
        outcome = self.accept(message, None, now)
        if outcome.status == "need-server-keys":
            account.set_server_keys(self.state, server.public(), now)
            outcome = self.accept(message, None, now)
        if outcome.status == "need-bundle":
            assert outcome.sender == sender.user_id
            outcome = self.accept(message, sender.fetched(), now)
        return outcome


@pytest.fixture
def people(tmp_path):
    return [Sealing(name, tmp_path) for name in ("alice", "bob", "mallory")]


def _forged(sender: User, recipient: User, certificate: dict) -> dict:
    """A sealed message carrying `certificate` and a ratchet-shaped message that nothing opens."""
    junk = {"content": b64encode(bytes([0x21]) + os.urandom(80)), "ephemeralPublicKey": b64encode(os.urandom(32)),
            "messageNumber": 0, "timestamp": int(NOW)}
    identity_key = account.identity(recipient.state).dh_public
    return envelope(str(uuid.uuid4()), recipient.user_id,
                    seal(junk, SenderCertificate.from_dict(certificate), identity_key))


def test_a_sealed_conversation_pins_both_sides_and_seals_the_replies(people):
    """Alice's first message goes sealed (Bob's bundle gave her his key); Bob opens it, checks
    her certificate and her bundle, pins her with her access key, and his reply goes sealed too."""
    alice, bob, _ = people
    server = Server()
    first = alice.send_sealed(bob, "hello, sealed", server)
    assert set(first) == {"id", "to", "sealed", "content", "acceptedAt"}
    outcome = bob.receive_sealed(alice, first, server)
    assert outcome.status == "received" and outcome.entry["text"] == "hello, sealed"
    assert outcome.entry["sealed"] and outcome.entry["peer"] == alice.user_id and outcome.used_one_time_prekey
    assert bob.state["contacts"][alice.user_id]["accessKey"] == alice.state["accessKey"]
    assert account.sealable_contact(bob.state, "alice") == alice.user_id
    reply = bob.send_sealed(alice, "hi, also sealed", server)
    assert alice.receive_sealed(bob, reply, server).entry["text"] == "hi, also sealed"
    for i in range(2):
        assert bob.receive_sealed(alice, alice.send_sealed(bob, f"m{i}", server), server).entry["text"] == f"m{i}"
    assert [(m["direction"], m.get("sealed")) for m in alice.messages()] == [("out", True), ("in", True),
                                                                          ("out", True), ("out", True)]
    assert bob.accept(first, None).status == "duplicate"


def test_the_server_learns_nothing_from_a_sealed_envelope(people):
    """The envelope names the recipient only; the content opens only with the recipient's key."""
    alice, bob, mallory = people
    server = Server()
    message = alice.send_sealed(bob, "hello", server)
    text = repr(message) + repr(b64decode(message["content"]))
    for needle in (alice.user_id, alice.user_id.replace("-", ""), "alice",
                   b64encode(account.identity(alice.state).master_public)):
        assert needle not in text
    with pytest.raises(DecryptionError):
        open_sealed(message["content"], account.identity(mallory.state))
    assert mallory.receive_sealed(alice, dict(message, to=mallory.user_id), server).status == "undecryptable"


@pytest.mark.parametrize("case, reason", [
    ("expired", "expired at"),
    ("forged", "does not verify"),
    ("unknown key", "does not publish"),
    ("another identity key, pinned", "another identity key than the one pinned for alice"),
])
def test_certificates_a_recipient_refuses(people, case, reason):
    """Each is refused (and acknowledged, so not delivered again) before the message inside is read."""
    alice, bob, mallory = people
    server = Server()
    bob.receive_sealed(alice, alice.send_sealed(bob, "pinned", server), server)
    certificates = {
        "expired": server.certificate(alice, expires=NOW - 1),
        "forged": server.certificate(alice, signer=ServerKeys.generate(NOW).current),
        "unknown key": server.certificate(alice, key_id=7, signer=ServerKeys.generate(NOW, 7).current),
        "another identity key, pinned": server.certificate(alice, identity_key=os.urandom(32)),
    }
    outcome = bob.receive_sealed(alice, _forged(alice, bob, certificates[case]), server)
    assert outcome.status == "rejected" and reason in outcome.reason, outcome
    assert bob.receive_sealed(alice, alice.send_sealed(bob, "still fine", server), server).status == "received"


def test_a_certificate_for_another_identity_key_than_a_new_senders_is_refused(people):
    """Mallory seals her first message to Bob with a certificate naming her id and Alice's key:
    the X3DH keys in the message are hers, so it is refused. With Alice's own certificate on it,
    the message claims to be Alice's, and her envelope binding does not open it."""
    alice, bob, mallory = people
    server = Server()
    alice_key = account.identity(alice.state).master_public
    outcomes = []
    for certificate in (server.certificate(mallory, identity_key=alice_key), server.certificate(alice)):
        entry = account.queue_outgoing(mallory.state, "bob", "it is me, alice", NOW)
        account.resolve_outgoing(mallory.state, entry["id"], bob.user_id)
        message = account.encrypt_outgoing(mallory.state, entry["id"], bob.fetched(), NOW)
        content = seal(message, SenderCertificate.from_dict(certificate), account.identity(bob.state).dh_public)
        outcomes.append(bob.receive_sealed(mallory, envelope(entry["id"], bob.user_id, content), server))
    assert [outcome.status for outcome in outcomes] == ["rejected", "undecryptable"], outcomes
    assert "another identity key than the message's" in outcomes[0].reason
    assert bob.state["contacts"] == {} and bob.state["sessions"] == {}


def test_a_certificate_valid_when_the_server_took_the_message_still_counts(people):
    """A message that waited longer than its certificate lives is checked at its acceptedAt."""
    alice, bob, _ = people
    server = Server()
    message = alice.send_sealed(bob, "written yesterday", server)
    outcome = bob.receive_sealed(alice, message, server, now=NOW + 3 * DAY)
    assert outcome.status == "received"


def test_server_keys_are_fetched_again_after_a_day_or_for_an_unknown_key(people):
    alice, bob, _ = people
    server = Server()
    bob.receive_sealed(alice, alice.send_sealed(bob, "one", server), server)
    second = alice.send_sealed(bob, "two", server)
    assert bob.accept(second, None, NOW + 2 * DAY).status == "need-server-keys"
    account.set_server_keys(bob.state, server.public(), NOW + 2 * DAY)
    # A rotated server key, not seen yet: fetched again at once.
    server.keys = ServerKeys((ServerKeys.generate(NOW, 2).current, *server.keys.keys))
    alice.state["senderCertificate"] = None
    third = alice.send_sealed(bob, "three", server, now=NOW + 2 * DAY + 700)
    assert bob.accept(third, None, NOW + 2 * DAY + 700).status == "need-server-keys"
    assert bob.receive_sealed(alice, second, server, NOW + 2 * DAY + 700).entry["text"] == "two"
    assert bob.receive_sealed(alice, third, server, NOW + 2 * DAY + 700).entry["text"] == "three"


def test_a_message_is_sealed_again_only_when_its_certificate_runs_out(people):
    """A resend is the same sealed content (so the server sees a duplicate), unless the saved
    certificate would expire within the hour: then it needs a fresh one."""
    alice, bob, _ = people
    server = Server()
    account.set_certificate(alice.state, server.certificate(alice, expires=NOW + 2 * 3600))
    entry = account.queue_outgoing(alice.state, "bob", "waiting", NOW)
    account.resolve_outgoing(alice.state, entry["id"], bob.user_id)
    account.encrypt_outgoing(alice.state, entry["id"], bob.fetched(), NOW)
    first = account.seal_outgoing(alice.state, entry["id"], NOW)
    assert account.seal_outgoing(alice.state, entry["id"], NOW + 3000) == first
    assert account.seal_outgoing(alice.state, entry["id"], NOW + 3700) is None
    account.set_certificate(alice.state, server.certificate(alice, expires=NOW + 3700 + DAY))
    again = account.seal_outgoing(alice.state, entry["id"], NOW + 3700)
    assert again != first and account.outbox_entry(alice.state, entry["id"])["sealed"]["content"] == again


def test_a_certificate_for_someone_else_is_not_kept(people):
    alice, bob, _ = people
    server = Server()
    with pytest.raises(InvalidCertificate):
        account.set_certificate(alice.state, server.certificate(bob))
    with pytest.raises(InvalidCertificate):
        account.set_certificate(alice.state, server.certificate(alice, identity_key=os.urandom(32)))
    assert alice.state["senderCertificate"] is None


def test_without_an_access_key_a_message_is_not_sealed(people, tmp_path):
    """A contact whose bundle gave no key (the web client registers none) gets plain messages,
    and its bundle is read again after a day for a key; an upgraded state gets a key to publish."""
    alice, bob, _ = people
    plain = User.fetched(bob)
    entry = account.queue_outgoing(alice.state, "bob", "plain", NOW)
    account.resolve_outgoing(alice.state, entry["id"], bob.user_id)
    account.encrypt_outgoing(alice.state, entry["id"], plain, NOW)
    assert account.sealing_access(alice.state, bob.user_id) is None
    assert account.sealable_contact(alice.state, "bob") is None
    assert not account.access_check_due(alice.state, bob.user_id, NOW + 60)
    assert account.access_check_due(alice.state, bob.user_id, NOW + DAY)

    old = copy.deepcopy(bob.state)
    for field in ("accessKey", "accessKeyPublished", "senderCertificate", "serverKeys"):
        del old[field]
    account.prepare_sealing(old)
    assert len(b64decode(old["accessKey"])) == 16 and not old["accessKeyPublished"]
    assert account.signed_prekey_to_publish(old, NOW) is not None
