"""The reference client's Messenger against the real core (SQLite, PostgreSQL, Redis), over TCP in process."""

from __future__ import annotations

import argparse
import uuid

import pytest
import pytest_twisted
from nacl.pwhash import argon2id
from twisted.internet import defer, reactor, task

from construct.client import messenger as messenger_module
from construct.client.cli import EXIT_NETWORK, _describe_failure
from construct.client.crypto import IdentityKeys, b64encode, envelope_context, verify_key_bundle
from construct.client.ratchet import Session
from construct.client.messenger import Messenger
from construct.client.state import KdfParams
from construct.client.store import StateStore
from construct.client.transport import AuthenticationFailed, ServerAddress, ServerError
from construct.core.limits import Limit
from construct.errors import ConstructError, rate_limited
from construct.protocol import codec
from construct.protocol.connection import AddressCounts, ConnectionTracker
from construct.protocol.timeouts import ConnectionLimits
from construct.protocol.tcp import JsonLinesFactory
from tests.helpers import PASSWORD, MemoryClient, register

FAST = KdfParams(argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)


class Server:
    def __init__(self, core) -> None:
        self.factory = JsonLinesFactory(
            core, 256 * 1024, ConnectionTracker(reactor), AddressCounts(0), ConnectionLimits(), reactor
        )
        self.connections: list = []
        build = self.factory.buildProtocol

        def tracked(addr):
            protocol = build(addr)
            self.connections.append(protocol)
            return protocol

        self.factory.buildProtocol = tracked
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.address = ServerAddress.parse(f"tcp://127.0.0.1:{self.port.getHost().port}")

    def cut(self) -> None:
        """Drop every client connection (a network failure, or a server restart)."""
        for protocol in self.connections:
            protocol.transport.abortConnection()


@pytest_twisted.async_yield_fixture
async def server(core):
    server = Server(core)
    messengers: list[Messenger] = []
    server.messengers = messengers
    yield server
    for messenger in messengers:
        await messenger.close()
    await server.port.stopListening()
    server.cut()


async def _user(server, tmp_path, name: str) -> tuple[Messenger, str]:
    messenger = Messenger(reactor, StateStore(str(tmp_path / f"{name}.state"), "pw", FAST), server.address, codec.JSON)
    server.messengers.append(messenger)
    registered = await messenger.register(str(server.address), name, PASSWORD)
    return messenger, registered["userId"]


@pytest_twisted.ensureDeferred
async def test_registration_publishes_the_bundle_and_one_time_prekeys(core, server, tmp_path):
    """After register the bundle names the real user id and 100 one-time prekeys wait on the server."""
    _, bob_id = await _user(server, tmp_path, "bob")
    assert await core.keys.count_one_time_prekeys(bob_id) == 100
    carol, _ = await register(core, "carol")
    fetched = (await carol.request("getPublicKey", {"userId": bob_id}))["payload"]
    assert verify_key_bundle(fetched, expected_user_id=bob_id).user_id == bob_id
    assert fetched["oneTimePrekey"]["keyId"] == 1
    assert await core.keys.count_one_time_prekeys(bob_id) == 99


@pytest_twisted.ensureDeferred
async def test_send_listen_and_acknowledge(core, server, tmp_path):
    """Messages sent while the recipient is away arrive decrypted and in order, and leave the server."""
    alice, _ = await _user(server, tmp_path, "alice")
    bob, bob_id = await _user(server, tmp_path, "bob")
    for i in range(3):
        # Bob's bundle gave Alice his access key: every message goes sealed, the first one too.
        assert (await alice.send("BOB", f"message {i}")).status == "sealed"
    received: list[dict] = []
    await bob.listen(received.append, count=3)
    assert [(m["peerName"], m["text"], m.get("sealed")) for m in received] == [
        ("alice", f"message {i}", True) for i in range(3)
    ]
    assert await core.messaging.pending(bob_id, 10) == []
    # The first message used one of Bob's one-time prekeys.
    assert await core.keys.count_one_time_prekeys(bob_id) == 99
    await bob.send("alice", "thanks")
    replies: list[dict] = []
    await alice.listen(replies.append, count=1)
    assert replies[0]["text"] == "thanks"
    assert [e["text"] for e in await alice.history("bob")] == [f"message {i}" for i in range(3)] + ["thanks"]


def _intercept(core, monkeypatch, path: str, refuse) -> list[str]:
    """Make the server's send of `path` ("sendMessage", or "sendSealed") answer `refuse(payload)`
    when it returns a failure; returns the ids of every attempt. On the plain path no sealed
    send is allowed, so the client falls back to sendMessage."""
    attempts: list[str] = []
    name = "send" if path == "sendMessage" else "send_sealed"
    real = getattr(core.messaging, name)
    if path == "sendMessage":
        monkeypatch.setattr(core.messaging, "_access", None)

    def intercepted(*args):
        payload = args[1] if path == "sendMessage" else args[0]
        attempts.append(payload["id"])
        return refuse(payload) or real(*args)

    monkeypatch.setattr(core.messaging, name, intercepted)
    return attempts


@pytest.mark.parametrize("path", ["sendMessage", "sendSealed"])
@pytest_twisted.ensureDeferred
async def test_unacknowledged_sends_are_resent_unchanged(core, server, tmp_path, monkeypatch, path):
    """SERVICE_UNAVAILABLE makes the client resend the same message; when it gives up, the next
    run does; sealed or not."""
    monkeypatch.setattr(messenger_module, "RETRY_DELAY_SECONDS", 0.01)
    alice, _ = await _user(server, tmp_path, "alice")
    bob, bob_id = await _user(server, tmp_path, "bob")
    failures = [2]
    contents: list[str] = []

    def flaky(payload):
        contents.append(payload["content"])
        if failures[0]:
            failures[0] -= 1
            return defer.fail(ConstructError("SERVICE_UNAVAILABLE", "The database is unavailable, try again later", 503))
        return None

    attempts = _intercept(core, monkeypatch, path, flaky)
    await alice.send("bob", "first")
    assert len(attempts) == 3 and len(set(attempts)) == 1 and len(set(contents)) == 1

    failures[0] = messenger_module.SEND_ATTEMPTS
    with pytest.raises(ServerError):
        await alice.send("bob", "second")
    assert len(set(attempts)) == 2
    # The next command sends what is still in the outbox before anything new.
    await alice.send("bob", "third")
    assert attempts[-2] == attempts[-3] and len(set(attempts)) == 3
    assert contents[-2] == contents[-3]
    received: list[dict] = []
    await bob.listen(received.append, count=3)
    assert [(m["text"], bool(m.get("sealed"))) for m in received] == [
        (text, path == "sendSealed") for text in ("first", "second", "third")
    ]


@pytest.mark.parametrize("path", ["sendMessage", "sendSealed"])
@pytest.mark.parametrize("code", ["RATE_LIMITED", "SERVER_BUSY"])
@pytest_twisted.ensureDeferred
async def test_a_send_refused_for_now_stays_in_the_outbox_and_goes_out_next_time(
    core, server, tmp_path, monkeypatch, code, path
):
    """RATE_LIMITED and SERVER_BUSY (the server sheds sends past its capacity) mean "not now",
    sealed or not: the message is not marked failed, construct-chat exits 3, and the next run
    sends it first."""
    alice, _ = await _user(server, tmp_path, "alice")
    bob, _ = await _user(server, tmp_path, "bob")
    limited = [True]
    if code == "RATE_LIMITED":
        _intercept(core, monkeypatch, path,
                   lambda payload: defer.fail(rate_limited(30, "Too many messages")) if limited[0] else None)
    else:
        _intercept(core, monkeypatch, path, lambda payload: None)
        core.admission.busy = True
    with pytest.raises(ServerError) as refused:
        await alice.send("bob", "held back")
    assert refused.value.code == code and refused.value.retry_after == (30 if code == "RATE_LIMITED" else 1)
    assert _describe_failure(refused.value, argparse.Namespace(command="send"))[0] == EXIT_NETWORK
    limited[0] = False
    core.admission.busy = False
    await alice.send("bob", "after the wait")
    received: list[dict] = []
    await bob.listen(received.append, count=2)
    assert [m["text"] for m in received] == ["held back", "after the wait"]


@pytest_twisted.ensureDeferred
async def test_listen_reconnects_after_the_connection_drops(core, server, tmp_path):
    """A listener whose connection is cut reconnects, resumes its session and keeps receiving."""
    alice, _ = await _user(server, tmp_path, "alice")
    bob, _ = await _user(server, tmp_path, "bob")
    received: list[dict] = []
    listening = defer.ensureDeferred(bob.listen(received.append, count=2))
    await alice.send("bob", "before")
    while not received:
        await task.deferLater(reactor, 0.05, lambda: None)
    server.cut()
    await alice.send("bob", "after")
    await listening.addTimeout(15, reactor)
    assert [m["text"] for m in received] == ["before", "after"]


@pytest_twisted.ensureDeferred
async def test_revoked_session_ends_listening(core, server, tmp_path):
    """When another session changes the password, the listener's session is revoked and listen fails."""
    bob, _ = await _user(server, tmp_path, "bob")
    listening = defer.ensureDeferred(bob.listen(lambda entry: None))
    await task.deferLater(reactor, 0.2, lambda: None)
    other = MemoryClient(core)
    assert (await other.request("login", {"username": "bob", "password": PASSWORD}))["type"] == "loginSuccess"
    new = "BatteryStaple42"
    change = {"oldPassword": PASSWORD, "newPassword": new, "newPasswordConfirm": new}
    assert (await other.request("changePassword", change))["type"] == "changePasswordSuccess"
    with pytest.raises(AuthenticationFailed):
        await listening.addTimeout(10, reactor)


def _forged_initial(mallory_id: str, bob_id: str, bob_bundle: dict) -> dict:
    """An initial message from Mallory's account whose X3DH header claims made-up identity keys:
    Bob can only reject it after checking Mallory's bundle."""
    session = Session.initiate(IdentityKeys.generate(), verify_key_bundle(bob_bundle, bob_id))
    message_id = str(uuid.uuid4())
    key, number, content = session.encrypt(b"let me in", envelope_context(mallory_id, bob_id, message_id))
    return {"id": message_id, "from": mallory_id, "to": bob_id, "ephemeralPublicKey": b64encode(key),
            "messageNumber": number, "content": content, "timestamp": 1}


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_a_stranger_cannot_stall_the_queue(core_factory, tmp_path, monkeypatch):
    """31 forged first messages ahead of a real one: each would need a check of the sender's
    bundle. They cost one fetch (the result is cached), and when checks are refused
    (RATE_LIMITED) the message is set aside, unacknowledged, instead of holding up the rest."""
    # Bob checks Alice once when she first writes, then Mallory once; Trudy finds the budget spent.
    core = await core_factory(limit_bundle_checks=Limit(2, 3600))
    server = Server(core)
    try:
        alice = Messenger(reactor, StateStore(str(tmp_path / "alice.state"), "pw", FAST), server.address, codec.JSON)
        bob = Messenger(reactor, StateStore(str(tmp_path / "bob.state"), "pw", FAST), server.address, codec.JSON)
        await alice.register(str(server.address), "alice", PASSWORD)
        bob_id = (await bob.register(str(server.address), "bob", PASSWORD))["userId"]
        await alice.send("bob", "hello")
        await bob.listen(lambda entry: None, count=1)
        mallory, m = await register(core, "mallory")
        bob_bundle = (await mallory.request("getPublicKey", {"userId": bob_id}))["payload"]
        fetches: list[tuple[str, bool]] = []
        real_get = core.keys.get

        def counted(user_id, requester_id, wants_prekey=True):
            fetches.append((user_id, wants_prekey))
            return real_get(user_id, requester_id, wants_prekey)

        monkeypatch.setattr(core.keys, "get", counted)
        for _ in range(31):
            reply = await mallory.request("sendMessage", _forged_initial(m["userId"], bob_id, bob_bundle))
            assert reply["type"] == "ack"
        # A second stranger's check is refused: its message waits, and the queue goes on.
        trudy, t = await register(core, "trudy")
        waiting = _forged_initial(t["userId"], bob_id, bob_bundle)
        assert (await trudy.request("sendMessage", waiting))["type"] == "ack"
        await alice.send("bob", "the real message")
        warnings: list[str] = []
        bob.on_warning = warnings.append
        received: list[dict] = []
        await defer.ensureDeferred(bob.listen(received.append, count=1)).addTimeout(20, reactor)
        assert [entry["text"] for entry in received] == ["the real message"]
        assert fetches.count((m["userId"], False)) == 1
        assert sum("dropped message" in w and m["userId"] in w for w in warnings) == 31
        assert any(waiting["id"] in w and "refuses key bundle checks" in w for w in warnings)
        # Mallory's are acknowledged and gone; Trudy's waits on the server for a later check.
        assert [entry.message_id for entry in await core.messaging.pending(bob_id, 100)] == [waiting["id"]]
        for messenger in (alice, bob):
            await messenger.close()
    finally:
        await server.port.stopListening()
        server.cut()
