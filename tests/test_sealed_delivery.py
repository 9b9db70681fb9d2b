"""Sealed messages through a real core (SQLite, PostgreSQL, Redis) and its real listeners: the
reference client sends them sealed, and refuses forged, expired and mismatched certificates
that come over WebSocket, TCP or HTTP."""

from __future__ import annotations

import copy
import os
import uuid

import pytest
import pytest_twisted
from nacl.pwhash import argon2id
from twisted.internet import reactor

from construct.client import account
from construct.client.crypto import b64encode
from construct.client.messenger import Messenger
from construct.client.sealed import SenderCertificate, seal
from construct.client.state import KdfParams
from construct.client.store import StateStore
from construct.client.transport import ServerAddress
from construct.core.certificates import ServerKeys, certificate_body
from construct.protocol import codec
from tests.helpers import PASSWORD, MemoryClient
from tests.test_sealed_sender import _Sender, _transport_server

FAST = KdfParams(argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)


async def _messenger(tmp_path, address: ServerAddress, name: str) -> tuple[Messenger, dict]:
    messenger = Messenger(reactor, StateStore(str(tmp_path / f"{name}.state"), "pw", FAST), address, codec.JSON)
    registered = await messenger.register(str(address), name, PASSWORD)
    return messenger, registered


def _certificate(keys: ServerKeys, sender_id: str, identity_key: bytes, expires: int, key_id: int | None = None,
                 signer=None) -> SenderCertificate:
    key_id = keys.current.key_id if key_id is None else key_id
    body = certificate_body(key_id, sender_id, b64encode(identity_key), expires)
    return SenderCertificate(key_id, body, (signer or keys.current).sign(body), sender_id, identity_key, expires)


@pytest.mark.parametrize("transport", ["ws", "tcp", "http"])
@pytest_twisted.ensureDeferred
async def test_forged_expired_and_mismatched_certificates_are_refused(core, tmp_path, transport):
    """Alice's messages reach Bob sealed; then sealed messages with an expired certificate, a
    forged one, one of a key the server does not publish and one for another identity key come
    over the transport: Bob drops each with a warning (and acknowledges it), and Alice's next
    message still arrives."""
    listeners, ports = _transport_server(core)
    address = ServerAddress.parse(f"tcp://127.0.0.1:{ports['tcp']}" if transport == "tcp" else
                                  f"ws://127.0.0.1:{ports['http']}/ws")
    alice, alice_info = await _messenger(tmp_path, address, "alice")
    bob, bob_info = await _messenger(tmp_path, address, "bob")
    sender = _Sender(transport, ports)
    warnings: list[str] = []
    bob.on_warning = warnings.append
    try:
        assert (await alice.send("bob", "first, sealed")).status == "sealed"
        received: list[dict] = []
        await bob.listen(received.append, count=1)
        assert [(m["text"], m.get("sealed"), m["peerName"]) for m in received] == [("first, sealed", True, "alice")]

        alice_key = await alice._store.read(lambda data: account.identity(data).master_public)
        bob_dh = await bob._store.read(lambda data: account.identity(data).dh_public)
        keys, now = core.certificates.keys, int(reactor.seconds())
        stranger = ServerKeys.generate(now, 9).current
        forgeries = {
            "expired at": _certificate(keys, alice_info["userId"], alice_key, now - 60),
            "does not verify": _certificate(keys, alice_info["userId"], alice_key, now + 3600,
                                            signer=ServerKeys.generate(now).current),
            "does not publish": _certificate(keys, alice_info["userId"], alice_key, now + 3600, 9, stranger),
            "another identity key than the one pinned for alice": _certificate(
                keys, alice_info["userId"], os.urandom(32), now + 3600),
        }
        junk = {"content": b64encode(bytes([0x21]) + os.urandom(80)), "ephemeralPublicKey": b64encode(os.urandom(32)),
                "messageNumber": 5, "timestamp": now}
        await sender.open()
        for certificate in forgeries.values():
            payload = {"id": str(uuid.uuid4()), "to": bob_info["userId"], "content": seal(junk, certificate, bob_dh),
                       "accessKey": await bob._store.read(lambda data: data["accessKey"])}
            ok, ack = await sender.send(payload)
            assert ok, ack
        assert (await alice.send("bob", "after the forgeries")).status == "sealed"
        received.clear()
        await bob.listen(received.append, count=1)
        assert [m["text"] for m in received] == ["after the forgeries"]
        dropped = [text for text in warnings if text.startswith("dropped message")]
        assert len(dropped) == len(forgeries), warnings
        for reason, text in zip(forgeries, dropped):
            assert reason in text, (reason, text)
        # Every one was acknowledged: nothing waits for Bob.
        assert await core.messaging.pending(bob_info["userId"], 10) == []
    finally:
        await sender.close()
        for messenger in (alice, bob):
            await messenger.close()
        for listener in listeners:
            await listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_refused_sealed_send_goes_as_a_plain_message(core, tmp_path, monkeypatch):
    """When the server refuses Alice's sealed sends (Bob changed his access key, or it refuses
    them all), she reads Bob's bundle once more and, still refused, sends the message plainly."""
    listeners, ports = _transport_server(core)
    address = ServerAddress.parse(f"tcp://127.0.0.1:{ports['tcp']}")
    alice, _ = await _messenger(tmp_path, address, "alice")
    bob, bob_info = await _messenger(tmp_path, address, "bob")
    try:
        assert (await alice.send("bob", "sealed")).status == "sealed"
        # Bob's access key changes behind Alice's back: she reads his bundle again and seals with the new one.
        bob_client = MemoryClient(core)
        connected = await bob_client.request("connect", {"sessionToken": bob_info["sessionToken"]})
        assert connected["type"] == "connectSuccess"
        bundle = await bob._store.read(lambda data: account.signed_prekey_to_publish(
            dict(copy.deepcopy(data), accessKeyPublished=False), reactor.seconds()))
        new_key = b64encode(os.urandom(16))
        bob_client.send("rotatePrekey", {"update": bundle, "unidentifiedAccessKey": new_key})
        await bob_client.next_of("keyRotationSuccess")
        bob_client.close()
        assert (await alice.send("bob", "sealed with the new key")).status == "sealed"
        contact = await alice._store.read(lambda data: data["contacts"][bob_info["userId"]])
        assert contact["accessKey"] == new_key
        monkeypatch.setattr(core.messaging, "_access", None)
        assert (await alice.send("bob", "plain")).status in ("queued", "delivered")
        assert (await alice.send("bob", "plain again")).status in ("queued", "delivered")
        received: list[dict] = []
        await bob.listen(received.append, count=4)
        assert [(m["text"], bool(m.get("sealed"))) for m in received] == [
            ("sealed", True), ("sealed with the new key", True), ("plain", False), ("plain again", False)]
    finally:
        for messenger in (alice, bob):
            await messenger.close()
        for listener in listeners:
            await listener.stopListening()
