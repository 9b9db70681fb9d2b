"""Sealed sender on the server: access keys, sealed sends on every transport and backend, their
refusals and limits, sender certificates and the key file that signs them."""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid

import pytest
import pytest_twisted
from nacl.signing import SigningKey, VerifyKey
from twisted.internet import defer, reactor

from construct.core import sealed as sealed_module
from construct.core.certificates import ServerKeys, certificate_body
from construct.core.limits import Limit
from construct.http.api import HttpApi
from construct.http.site import build_site
from construct.protocol import codec
from construct.protocol.connection import AddressCounts, ConnectionTracker
from construct.protocol.tcp import JsonLinesFactory
from construct.protocol.timeouts import ConnectionLimits
from construct.protocol.ws import ConstructWebSocketFactory
from construct.storage import server_keys as key_file
from tests.clients import HttpClient, TcpClient, WsClient
from tests.conftest import NOW
from tests.helpers import PASSWORD, MemoryClient, b64, error_reply, make_bundle

DENIED = {"code": "UNIDENTIFIED_ACCESS_DENIED", "message": "No such recipient, or the access key is not theirs"}


def access_key() -> str:
    return b64(os.urandom(16))


async def register(core, name: str, key: str | None = None, unrestricted: bool | None = None,
                   signing_key: SigningKey | None = None) -> tuple[MemoryClient, dict]:
    """A connected user; `key` and `unrestricted` are registered with the bundle when given."""
    client = MemoryClient(core)
    payload = {"username": name, "password": PASSWORD, "publicKey": make_bundle(signing_key=signing_key)}
    if key is not None:
        payload["unidentifiedAccessKey"] = key
    if unrestricted is not None:
        payload["unrestrictedUnidentifiedAccess"] = unrestricted
    reply = await client.request("register", payload)
    assert reply["type"] == "registerSuccess", reply
    return client, reply["payload"]


def sealed(to: str, key: str | None, content: str | None = None, message_id: str | None = None) -> dict:
    payload = {"id": message_id or str(uuid.uuid4()), "to": to, "content": content or b64(os.urandom(300))}
    if key is not None:
        payload["accessKey"] = key
    return payload


@pytest_twisted.ensureDeferred
async def test_the_access_key_is_registered_with_the_bundle_and_handed_out_with_it(core):
    """register and rotatePrekey set (or clear) the access key and the unrestricted flag; every
    bundle read hands them out; a malformed one is refused."""
    key, signing_key = access_key(), SigningKey.generate()
    bob, bob_info = await register(core, "bob", key, signing_key=signing_key)
    alice, _ = await register(core, "alice")
    for wants_prekey in (True, False):
        bundle = (await alice.request("getPublicKey", {"userId": bob_info["userId"], "oneTimePrekey": wants_prekey}))
        assert bundle["payload"]["unidentifiedAccessKey"] == key
        assert "unrestrictedUnidentifiedAccess" not in bundle["payload"]
    own = (await alice.request("getPublicKey", {"userId": bob_info["userId"]}))["payload"]
    assert own["username"] == "bob"

    update = {"update": make_bundle(bob_info["userId"], signing_key)}
    assert (await bob.request("rotatePrekey", update))["type"] == "keyRotationSuccess"
    bundle = (await alice.request("getPublicKey", {"userId": bob_info["userId"]}))["payload"]
    assert bundle["unidentifiedAccessKey"] == key
    cleared = dict(update, unidentifiedAccessKey=None, unrestrictedUnidentifiedAccess=True)
    assert (await bob.request("rotatePrekey", cleared))["type"] == "keyRotationSuccess"
    bundle = (await alice.request("getPublicKey", {"userId": bob_info["userId"]}))["payload"]
    assert "unidentifiedAccessKey" not in bundle and bundle["unrestrictedUnidentifiedAccess"] is True

    for bad in ({"unidentifiedAccessKey": b64(os.urandom(15))}, {"unidentifiedAccessKey": 7},
                {"unrestrictedUnidentifiedAccess": "yes"}):
        refused = await error_reply(bob, "rotatePrekey", dict(update, **bad))
        assert refused["code"] == "INVALID_FORMAT", refused
        client = MemoryClient(core)
        refused = await error_reply(client, "register", {"username": "carol", "password": PASSWORD,
                                                         "publicKey": make_bundle(), **bad})
        assert refused["code"] == "INVALID_FORMAT", refused


@pytest_twisted.ensureDeferred
async def test_a_sealed_send_needs_no_session_and_leaves_no_sender(core, http):
    """A connection that never authenticated sends sealed; the ack has no status; the stored
    and pushed envelope has no sender; a resend is a duplicate, other content under the id is refused."""
    key = access_key()
    bob, bob_info = await register(core, "bob", key)
    bob_id = bob_info["userId"]
    anonymous = MemoryClient(core)
    message = sealed(bob_id, key)
    ack = await anonymous.request("sendSealed", message)
    assert ack["type"] == "ack" and set(ack["payload"]) == {"messageId", "expiresAt"}, ack
    assert ack["payload"]["messageId"] == message["id"]
    assert ack["payload"]["expiresAt"] == int(NOW) + 7 * 24 * 3600
    pushed = await bob.next_of("message")
    assert pushed["payload"] == {"id": message["id"], "to": bob_id, "sealed": True, "content": message["content"],
                                 "acceptedAt": int(NOW)}
    (entry,) = await core.messaging.pending(bob_id, 10)
    assert json.loads(entry.envelope) == pushed["payload"]

    assert await anonymous.request("sendSealed", message) == ack
    refused = await error_reply(anonymous, "sendSealed", dict(message, content=b64(os.urandom(300))))
    assert refused["code"] == "DUPLICATE_MESSAGE"
    # The same id from a sender who is known is refused too: it is taken.
    alice, alice_info = await register(core, "alice")
    plain = {"id": message["id"], "from": alice_info["userId"], "to": bob_id, "ephemeralPublicKey": os.urandom(32),
             "messageNumber": 0, "content": "Y2lwaGVydGV4dA==", "timestamp": 1}
    assert (await error_reply(alice, "sendMessage", plain))["code"] == "DUPLICATE_MESSAGE"

    http.token = bob_info["sessionToken"]
    status, body = await http.call("GET", "/v1/messages")
    assert status == 200 and body["messages"] == [pushed["payload"]]
    bob.send("ackMessage", {"messageIds": [message["id"]]})
    assert (await bob.request("ping"))["type"] == "pong"
    assert await core.messaging.pending(bob_id, 10) == []


def _transport_server(core) -> tuple[list, dict[str, int]]:
    """The core behind real WebSocket, TCP and HTTP listeners on loopback."""
    limits = ConnectionLimits()
    ws_factory = ConstructWebSocketFactory(core, 1 << 18, ConnectionTracker(reactor), AddressCounts(0), limits,
                                           reactor, ["*"])
    site = reactor.listenTCP(0, build_site(ws_factory, HttpApi(core), 1 << 18), interface="127.0.0.1")
    tcp = reactor.listenTCP(0, JsonLinesFactory(core, 1 << 18, ConnectionTracker(reactor), AddressCounts(0), limits,
                                                reactor), interface="127.0.0.1")
    return [site, tcp], {"http": site.getHost().port, "tcp": tcp.getHost().port}


class _Sender:
    """An anonymous sender on one transport: `send` returns (ok, payload of the ack or error)."""

    def __init__(self, transport: str, ports: dict[str, int]) -> None:
        self.transport = transport
        self.ports = ports
        self.client = None

    async def open(self) -> None:
        if self.transport == "ws":
            self.client = await WsClient.connect(self.ports["http"], codec.MSGPACK)
        elif self.transport == "tcp":
            self.client = await TcpClient.connect(self.ports["tcp"])
        else:
            self.client = HttpClient(self.ports["http"])

    async def send(self, payload: dict) -> tuple[bool, dict]:
        if self.transport == "http":
            status, body = await self.client.call("POST", "/v1/messages/sealed", payload)
            assert status in (200, 401), (status, body)
            return status == 200, body
        reply = await self.client.request("sendSealed", payload)
        return reply["type"] == "ack", reply["payload"]

    async def close(self) -> None:
        if self.transport != "http":
            await self.client.close()


@pytest.mark.parametrize("transport", ["ws", "tcp", "http"])
@pytest_twisted.ensureDeferred
async def test_refusals_are_one_answer_on_every_transport(core, transport):
    """A wrong key, no key, an unknown recipient and a recipient without a key all get the very
    same UNIDENTIFIED_ACCESS_DENIED (HTTP 401), on every transport and backend; an unrestricted
    recipient takes any; the right key goes through."""
    key = access_key()
    _, bob = await register(core, "bob", key)
    _, carol = await register(core, "carol")
    _, dave = await register(core, "dave", unrestricted=True)
    listeners, ports = _transport_server(core)
    sender = _Sender(transport, ports)
    try:
        await sender.open()
        refusals = [
            sealed(bob["userId"], access_key()),
            sealed(bob["userId"], None),
            sealed(str(uuid.uuid4()), key),
            sealed(str(uuid.uuid4()), None),
            sealed(carol["userId"], key),
            sealed(carol["userId"], None),
        ]
        for payload in refusals:
            assert await sender.send(payload) == (False, DENIED), payload
        for payload in (sealed(bob["userId"], key), sealed(dave["userId"], None), sealed(dave["userId"], access_key())):
            ok, ack = await sender.send(payload)
            assert ok and set(ack) == {"messageId", "expiresAt"}, ack
        assert [len(await core.messaging.pending(user["userId"], 10)) for user in (bob, carol, dave)] == [1, 0, 2]
    finally:
        await sender.close()
        for listener in listeners:
            await listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_unknown_recipient_costs_what_a_wrong_key_does(core, monkeypatch):
    """Each refusal and each success does one lookup and one 16-byte comparison: no answer comes
    sooner for an account that exists (the lookup itself is one statement either way)."""
    key = access_key()
    _, bob = await register(core, "bob", key)
    _, carol = await register(core, "carol")
    work: list[str] = []
    access = core.messaging._access
    lookup = access._lookup

    async def counted_lookup(user_id):
        work.append("lookup")
        return await lookup(user_id)

    real_compare = sealed_module.hmac.compare_digest

    def counted_compare(a, b):
        work.append(f"compare {len(a)} {len(b)}")
        return real_compare(a, b)

    monkeypatch.setattr(access, "_lookup", counted_lookup)
    monkeypatch.setattr(sealed_module.hmac, "compare_digest", counted_compare)
    anonymous = MemoryClient(core)
    for payload in (sealed(str(uuid.uuid4()), key), sealed(bob["userId"], access_key()), sealed(bob["userId"], None),
                    sealed(carol["userId"], key), sealed(bob["userId"], key)):
        work.clear()
        await anonymous.request("sendSealed", payload)
        assert work == ["lookup", "compare 16 16"], payload


@pytest_twisted.ensureDeferred
async def test_a_recipient_deleted_meanwhile_is_refused_like_any_unknown_one(core):
    """The access check passed, and the account went before the store: the same refusal."""
    key = access_key()
    bob, bob_info = await register(core, "bob", key)
    assert (await bob.request("deleteAccount", {"password": PASSWORD}))["type"] == "accountDeleted"
    anonymous = MemoryClient(core)
    assert await error_reply(anonymous, "sendSealed", sealed(bob_info["userId"], key)) == DENIED
    core.messaging._access = _AllowEveryone()
    assert await error_reply(anonymous, "sendSealed", sealed(bob_info["userId"], key)) == DENIED
    rows = await core.keys._store._db.run("count", lambda txn: txn.execute(
        "SELECT COUNT(*) FROM unidentified_access").fetchone()[0])
    assert rows == 0


class _AllowEveryone:
    def check(self, recipient_id, presented):
        return defer.succeed(None)


@pytest_twisted.ensureDeferred
async def test_sealed_sends_are_limited_per_connection_address_and_recipient(core_factory):
    """None of the limits can count a sender: a connection's sends, an address's, and those a
    recipient's key allowed (refused sends do not count against the recipient)."""
    key = access_key()
    per_connection = await core_factory(limit_sealed_per_connection=Limit(2, 60), limit_sealed_per_address=Limit(0, 0),
                                        limit_sealed_per_recipient=Limit(0, 0))
    _, bob = await register(per_connection, "bob", key)
    first = MemoryClient(per_connection)
    assert [(await first.request("sendSealed", sealed(bob["userId"], key)))["type"] for _ in range(2)] == ["ack"] * 2
    refused = await error_reply(first, "sendSealed", sealed(bob["userId"], key))
    assert refused["code"] == "RATE_LIMITED" and "connection" in refused["message"] and refused["retryAfter"] == 60
    assert (await MemoryClient(per_connection).request("sendSealed", sealed(bob["userId"], key)))["type"] == "ack"

    per_address = await core_factory(limit_sealed_per_connection=Limit(0, 0), limit_sealed_per_address=Limit(2, 60),
                                     limit_sealed_per_recipient=Limit(0, 0))
    sent = [(await MemoryClient(per_address, address="198.51.100.7").request(
        "sendSealed", sealed(bob["userId"], key)))["type"] for _ in range(2)]
    assert sent == ["ack", "ack"]
    refused = await error_reply(MemoryClient(per_address, address="198.51.100.7"), "sendSealed",
                                sealed(str(uuid.uuid4()), key))
    assert refused["code"] == "RATE_LIMITED" and "address" in refused["message"]
    other = MemoryClient(per_address, address="198.51.100.8")
    assert (await other.request("sendSealed", sealed(bob["userId"], key)))["type"] == "ack"

    per_recipient = await core_factory(limit_sealed_per_connection=Limit(0, 0), limit_sealed_per_address=Limit(0, 0),
                                       limit_sealed_per_recipient=Limit(2, 60))
    _, carol = await register(per_recipient, "carol", key)
    anonymous = MemoryClient(per_recipient)
    for _ in range(4):
        assert await error_reply(anonymous, "sendSealed", sealed(carol["userId"], access_key())) == DENIED
    for _ in range(2):
        assert (await anonymous.request("sendSealed", sealed(carol["userId"], key)))["type"] == "ack"
    refused = await error_reply(anonymous, "sendSealed", sealed(carol["userId"], key))
    assert refused["code"] == "RATE_LIMITED" and "recipient" in refused["message"]
    assert (await anonymous.request("sendSealed", sealed(bob["userId"], key)))["type"] == "ack"


@pytest_twisted.ensureDeferred
async def test_sender_certificates_bind_the_user_to_its_identity_key(core, http):
    """An authenticated user gets a certificate naming its id and master key, expiring in 24 h,
    signed by the key the server publishes to anyone (WebSocket/TCP and HTTP alike)."""
    signing_key = SigningKey.generate()
    alice, info = await register(core, "alice", signing_key=signing_key)
    assert (await error_reply(MemoryClient(core), "getSenderCertificate", {}))["code"] == "AUTH_REQUIRED"
    issued = (await alice.request("getSenderCertificate"))["payload"]
    published = (await MemoryClient(core).request("getServerKeys"))["payload"]["keys"]
    assert [key["keyId"] for key in published] == [1] and issued["keyId"] == 1
    body = base64.b64decode(issued["certificate"])
    identity_key = b64(bytes(signing_key.verify_key))
    assert body == certificate_body(1, info["userId"], identity_key, int(NOW) + 24 * 3600)
    assert json.loads(body) == {"keyId": 1, "senderId": info["userId"], "identityKey": identity_key,
                                "expires": int(NOW) + 24 * 3600}
    assert issued["expires"] == int(NOW) + 24 * 3600
    VerifyKey(base64.b64decode(published[0]["publicKey"])).verify(body, base64.b64decode(issued["signature"]))

    core.certificates.keys = key_file.rotated(core.certificates.keys, NOW)
    http.token = info["sessionToken"]
    status, issued = await http.call("GET", "/v1/certificate")
    assert status == 200 and issued["keyId"] == 2
    http.token = None
    status, published = await http.call("GET", "/v1/server-keys")
    assert status == 200 and [key["keyId"] for key in published["keys"]] == [2, 1]
    assert (await http.call("GET", "/v1/certificate"))[0] == 401


def test_the_key_file_is_private_and_rotates(tmp_path):
    """Made on first start (0600 in a 0700 directory); a rotation signs with a new key and keeps
    the old one published for longer than any certificate lives; --drop-old keeps only the new one."""
    path = str(tmp_path / "keys" / key_file.FILE_NAME)
    made = key_file.load_or_create(path, NOW)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    assert key_file.load_or_create(path, NOW + 5) == made == key_file.load(path)
    second = key_file.rotated(made, NOW + 10)
    assert [key.key_id for key in second.keys] == [2, 1] and second.keys[1] == made.current
    day = 24 * 3600
    third = key_file.rotated(second, NOW + 7 * day)
    assert [key.key_id for key in third.keys] == [3, 2, 1]
    # Key 1 was retired by key 2 (at NOW + 10) more than eight days ago: gone; key 2 stays.
    assert [key.key_id for key in key_file.rotated(third, NOW + 10 + 8 * day).keys] == [4, 3, 2]
    assert [key.key_id for key in key_file.rotated(third, NOW + 7 * day, drop_old=True).keys] == [4]
    (tmp_path / "bad.json").write_text('{"version": 1, "keys": [{"keyId": 1, "privateKey": "abc"}]}')
    with pytest.raises(key_file.KeyFileError, match="not a sender-certificate key file"):
        key_file.load(str(tmp_path / "bad.json"))
    with pytest.raises(key_file.KeyFileError, match="cannot create"):
        key_file.load_or_create("/proc/construct-keys.json", NOW)


@pytest_twisted.ensureDeferred
async def test_a_rotated_key_file_is_picked_up_while_running(core, tmp_path):
    """The watcher hands a rewritten file to the certificate service; a broken one changes nothing."""
    path = str(tmp_path / key_file.FILE_NAME)
    keys = key_file.load_or_create(path, NOW)
    core.certificates.keys = keys
    watcher = key_file.KeyFileWatcher(path, core.certificates)
    await watcher.check()
    assert core.certificates.keys is keys
    key_file.write(path, key_file.rotated(keys, NOW))
    await watcher.check()
    assert core.certificates.keys.current.key_id == 2
    with open(path, "w") as broken:
        broken.write("{")
    await watcher.check()
    assert core.certificates.keys.current.key_id == 2


def test_a_key_ring_needs_a_key():
    with pytest.raises(ValueError):
        ServerKeys(())
