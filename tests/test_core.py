"""The core through the protocol layer, with in-memory connections, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from construct.protocol import codec
from tests.helpers import MemoryClient, PASSWORD, chat_message, error_reply, make_bundle, register
from tests.privacy_scan import redis_client, redis_dump, redis_entries_mentioning, sql_rows_mentioning


# Accounts


@pytest_twisted.ensureDeferred
async def test_register_folds_username_and_logs_in(core):
    """Registration lower-cases the username, returns a session and binds the connection."""
    client, payload = await register(core, "Alice")
    assert payload["username"] == "alice"
    assert str(uuid.UUID(payload["userId"])) == payload["userId"]
    assert payload["expires"] == int(1_800_000_000 + 30 * 24 * 3600)
    assert (await client.request("ping"))["type"] == "pong"
    assert await core.hub.is_online(payload["userId"])


@pytest_twisted.ensureDeferred
async def test_usernames_are_unique_case_insensitively(core):
    """ALICE and alice are one account."""
    await register(core, "alice")
    other = MemoryClient(core)
    error = await error_reply(other, "register", {"username": "ALICE", "password": PASSWORD, "publicKey": make_bundle()})
    assert error["code"] == "USERNAME_TAKEN"


@pytest.mark.parametrize(
    "username, password, code",
    [
        ("al", PASSWORD, "INVALID_USERNAME"),
        ("a" * 33, PASSWORD, "INVALID_USERNAME"),
        ("bad name", PASSWORD, "INVALID_USERNAME"),
        ("émile", PASSWORD, "INVALID_USERNAME"),
        (7, PASSWORD, "INVALID_FORMAT"),
        ("alice", "Short9a", "WEAK_PASSWORD"),
        ("alice", "alllowercase9", "WEAK_PASSWORD"),
        ("ALLUPPERCASE9", "ALLUPPERCASE9", "WEAK_PASSWORD"),
        ("alice", "NoDigitsHereAtAll", "WEAK_PASSWORD"),
        ("alice", "Aa1" + "x" * 70, "WEAK_PASSWORD"),
        ("alice", None, "INVALID_FORMAT"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_register_rejects_bad_usernames_and_passwords(core, username, password, code):
    """Each username and password rule has its own clear error."""
    client = MemoryClient(core)
    error = await error_reply(client, "register", {"username": username, "password": password, "publicKey": make_bundle()})
    assert error["code"] == code


def _tampered_signature() -> dict:
    bundle = make_bundle()
    signature = bytearray(base64.b64decode(bundle["signature"]))
    signature[0] ^= 1
    return dict(bundle, signature=base64.b64encode(bytes(signature)).decode())


@pytest.mark.parametrize(
    "bundle",
    [
        None,
        "not an object",
        _tampered_signature(),
        make_bundle(user_id=str(uuid.uuid4())),
        make_bundle(supportedSuites=[]),
        make_bundle(supportedSuites=[{"suiteId": 2, "identityKey": "AA==", "signedPrekey": "AA=="}]),
        make_bundle(supportedSuites=[{"suiteId": 1, "identityKey": "AAAA", "signedPrekey": "AAAA"}]),
        dict(make_bundle(), masterIdentityKey="AAAA"),
        dict(make_bundle(), bundleData="%%%"),
    ],
    ids=["missing", "string", "bad-signature", "foreign-user", "no-suites", "suite-2", "short-keys", "short-master", "bad-b64"],
)
@pytest_twisted.ensureDeferred
async def test_register_rejects_bad_key_bundles(core, bundle):
    """The bundle is parsed and its Ed25519 signature verified before anything is stored."""
    client = MemoryClient(core)
    error = await error_reply(client, "register", {"username": "alice", "password": PASSWORD, "publicKey": bundle})
    assert error["code"] == "INVALID_KEY_BUNDLE"
    # Nothing was created: the name is still free.
    assert (await register(core, "alice"))[1]["username"] == "alice"


@pytest_twisted.ensureDeferred
async def test_login_and_uniform_invalid_credentials(core):
    """A good login succeeds; an unknown user and a wrong password get the same error."""
    _, registered = await register(core, "alice")
    client = MemoryClient(core)
    ok = await client.request("login", {"username": "ALICE", "password": PASSWORD})
    assert ok["type"] == "loginSuccess" and ok["payload"]["userId"] == registered["userId"]
    assert ok["payload"]["sessionToken"] != registered["sessionToken"]
    wrong = await error_reply(client, "login", {"username": "alice", "password": "WrongHorse99"})
    unknown = await error_reply(client, "login", {"username": "nobody", "password": PASSWORD})
    assert wrong == unknown == {"code": "INVALID_CREDENTIALS", "message": "Invalid credentials"}
    too_long = await error_reply(client, "login", {"username": "alice", "password": PASSWORD + "x" * 100})
    assert too_long["code"] == "INVALID_CREDENTIALS"


@pytest_twisted.ensureDeferred
async def test_connect_resumes_expires_and_rejects(core, clock):
    """connect resumes a session, says sessionExpired after 30 days, and rejects unknown tokens."""
    _, registered = await register(core, "alice")
    client = MemoryClient(core)
    ok = await client.request("connect", {"sessionToken": registered["sessionToken"]})
    assert ok == {"type": "connectSuccess", "payload": {"userId": registered["userId"], "username": "alice"}}
    assert (await error_reply(client, "connect", {"sessionToken": "forged"}))["code"] == "INVALID_TOKEN"
    assert (await error_reply(client, "connect", {}))["code"] == "INVALID_FORMAT"
    clock.advance(30 * 24 * 3600 + 1)
    assert (await client.request("connect", {"sessionToken": registered["sessionToken"]})) == {"type": "sessionExpired"}


@pytest_twisted.ensureDeferred
async def test_expired_sessions_are_swept_and_their_connections_told(core, clock):
    """The session sweep ends connections still bound to an expired session."""
    client, registered = await register(core, "alice")
    clock.advance(30 * 24 * 3600 + 1)
    await core.accounts.delete_expired_sessions()
    assert (await client.next()) == {"type": "sessionExpired"}
    assert not await core.hub.is_online(registered["userId"])


@pytest_twisted.ensureDeferred
async def test_logout_revokes_token_and_unbinds(core):
    """After logout the token is dead and the connection is no longer authenticated."""
    client, registered = await register(core, "alice")
    assert (await client.request("logout", {"sessionToken": registered["sessionToken"]})) == {"type": "logoutSuccess"}
    assert (await error_reply(client, "getPublicKey", {"userId": registered["userId"]}))["code"] == "AUTH_REQUIRED"
    assert (await client.request("connect", {"sessionToken": registered["sessionToken"]})) == {"type": "sessionExpired"}
    assert not await core.hub.is_online(registered["userId"])


@pytest_twisted.ensureDeferred
async def test_change_password_revokes_other_sessions(core):
    """changePassword keeps the current session, ends the others (live ones get sessionExpired)."""
    first, registered = await register(core, "alice")
    second = MemoryClient(core)
    login = await second.request("login", {"username": "alice", "password": PASSWORD})
    new = "BatteryStaple42"
    reply = await first.request(
        "changePassword",
        {"sessionToken": registered["sessionToken"], "oldPassword": PASSWORD, "newPassword": new, "newPasswordConfirm": new},
    )
    assert reply == {"type": "changePasswordSuccess"}
    assert (await second.next()) == {"type": "sessionExpired"}
    assert (await second.request("connect", {"sessionToken": login["payload"]["sessionToken"]})) == {"type": "sessionExpired"}
    assert (await first.request("ping"))["type"] == "pong"
    assert (await MemoryClient(core).request("login", {"username": "alice", "password": new}))["type"] == "loginSuccess"
    assert (await error_reply(second, "login", {"username": "alice", "password": PASSWORD}))["code"] == "INVALID_CREDENTIALS"


@pytest.mark.parametrize(
    "old, new, confirm, code",
    [
        ("WrongHorse99", "BatteryStaple42", "BatteryStaple42", "INVALID_PASSWORD"),
        (PASSWORD, "BatteryStaple42", "BatteryStaple43", "PASSWORD_MISMATCH"),
        (PASSWORD, PASSWORD, PASSWORD, "SAME_PASSWORD"),
        (PASSWORD, "weak", "weak", "WEAK_PASSWORD"),
        (PASSWORD, None, None, "INVALID_FORMAT"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_change_password_errors(core, old, new, confirm, code):
    """Each changePassword failure has its own code and changes nothing."""
    client, registered = await register(core, "alice")
    payload = {"oldPassword": old, "newPassword": new, "newPasswordConfirm": confirm}
    assert (await error_reply(client, "changePassword", payload))["code"] == code
    assert (await MemoryClient(core).request("login", {"username": "alice", "password": PASSWORD}))["type"] == "loginSuccess"


@pytest_twisted.ensureDeferred
async def test_http_change_password(core, http):
    """PUT /v1/accounts/current/password changes the password and ends the account's other sessions."""
    live, registered = await register(core, "alice")
    status, session = await http.call("POST", "/v1/sessions", {"username": "alice", "password": PASSWORD})
    assert status == 200
    new = "BatteryStaple42"
    body = {"oldPassword": "WrongHorse99", "newPassword": new, "newPasswordConfirm": new}
    status, error = await http.call("PUT", "/v1/accounts/current/password", body, token=session["sessionToken"])
    assert (status, error["code"]) == (401, "INVALID_PASSWORD")
    body["oldPassword"] = PASSWORD
    assert (await http.call("PUT", "/v1/accounts/current/password", body))[0] == 401
    status, _ = await http.call("PUT", "/v1/accounts/current/password", body, token=session["sessionToken"])
    assert status == 204
    assert (await live.next()) == {"type": "sessionExpired"}
    status, error = await http.call("GET", "/v1/messages", token=registered["sessionToken"])
    assert (status, error["code"]) == (401, "SESSION_EXPIRED")
    assert (await http.call("GET", "/v1/messages", token=session["sessionToken"]))[0] == 200
    assert (await http.call("POST", "/v1/sessions", {"username": "alice", "password": new}))[0] == 200


# Keys


@pytest_twisted.ensureDeferred
async def test_get_public_key_returns_the_verifiable_bundle(core):
    """getPublicKey needs a session and returns the stored bundle byte for byte."""
    bundle = make_bundle()
    bob = MemoryClient(core)
    registered = (await bob.request("register", {"username": "bob", "password": PASSWORD, "publicKey": bundle}))["payload"]
    stranger = MemoryClient(core)
    assert (await error_reply(stranger, "getPublicKey", {"userId": registered["userId"]}))["code"] == "AUTH_REQUIRED"
    alice, _ = await register(core, "alice")
    reply = await alice.request("getPublicKey", {"userId": registered["userId"].upper()})
    assert reply["type"] == "publicKeyBundle"
    payload = reply["payload"]
    suite = json.loads(base64.b64decode(bundle["bundleData"]))["supportedSuites"][0]
    assert payload == {
        "userId": registered["userId"],
        "username": "bob",
        "identityPublic": suite["identityKey"],
        "signedPrekeyPublic": suite["signedPrekey"],
        "signature": bundle["signature"],
        "verifyingKey": bundle["masterIdentityKey"],
        "masterIdentityKey": bundle["masterIdentityKey"],
        "bundleData": bundle["bundleData"],
    }
    assert (await error_reply(alice, "getPublicKey", {"userId": str(uuid.uuid4())}))["code"] == "USER_NOT_FOUND"
    assert (await error_reply(alice, "getPublicKey", {"userId": "not-a-uuid"}))["code"] == "INVALID_USER_ID"


@pytest_twisted.ensureDeferred
async def test_rotate_prekey_only_for_own_account_and_same_identity(core):
    """rotatePrekey replaces only the caller's bundle and never its identity key."""
    from nacl.signing import SigningKey

    signing_key = SigningKey.generate()
    alice = MemoryClient(core)
    registered = (
        await alice.request(
            "register", {"username": "alice", "password": PASSWORD, "publicKey": make_bundle(signing_key=signing_key)}
        )
    )["payload"]
    user_id = registered["userId"]
    bob, bob_registered = await register(core, "bob")

    update = make_bundle(user_id, signing_key=signing_key)
    assert (await alice.request("rotatePrekey", {"userId": user_id, "update": update})) == {"type": "keyRotationSuccess"}
    fetched = (await bob.request("getPublicKey", {"userId": user_id}))["payload"]
    assert fetched["bundleData"] == update["bundleData"]

    forbidden = await error_reply(bob, "rotatePrekey", {"userId": user_id, "update": make_bundle(user_id)})
    assert forbidden["code"] == "FORBIDDEN"
    new_identity = await error_reply(alice, "rotatePrekey", {"userId": user_id, "update": make_bundle(user_id)})
    assert new_identity["code"] == "INVALID_KEY_BUNDLE"
    wrong_owner = make_bundle(bob_registered["userId"], signing_key=signing_key)
    assert (await error_reply(alice, "rotatePrekey", {"userId": user_id, "update": wrong_owner}))["code"] == "INVALID_KEY_BUNDLE"
    assert (await bob.request("getPublicKey", {"userId": user_id}))["payload"]["bundleData"] == update["bundleData"]


# Messages


@pytest_twisted.ensureDeferred
async def test_live_message_is_pushed_and_acked_delivered(core):
    """An online recipient gets the message at once; the sender's ack says delivered."""
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob", encoding=codec.MSGPACK)
    message = chat_message(a["userId"], b["userId"].upper())
    alice.send("sendMessage", message, request_id="send-1")
    ack = await alice.next()
    assert ack["type"] == "ack" and ack["requestId"] == "send-1"
    assert ack["payload"]["messageId"] == message["id"]
    assert ack["payload"]["status"] == "delivered"
    assert ack["payload"]["expiresAt"] == 1_800_000_000 + 7 * 24 * 3600
    pushed = await bob.next()
    assert pushed["type"] == "message"
    assert pushed["payload"] == dict(message, to=b["userId"])
    assert isinstance(pushed["payload"]["ephemeralPublicKey"], bytes)


@pytest_twisted.ensureDeferred
async def test_offline_messages_wait_and_are_redelivered_until_acked(core):
    """Queued messages arrive in order on login, again on every reconnect, never after ackMessage."""
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    await bob.request("logout")
    messages = [chat_message(a["userId"], b["userId"], content=f"bXNn{i}") for i in range(5)]
    for message in messages:
        assert (await alice.request("sendMessage", message))["payload"]["status"] == "queued"

    async def login_and_collect(count):
        client = MemoryClient(core)
        assert (await client.request("login", {"username": "bob", "password": PASSWORD}))["type"] == "loginSuccess"
        return client, [(await client.next())["payload"]["content"] for _ in range(count)]

    first, contents = await login_and_collect(5)
    assert contents == [m["content"] for m in messages]
    first.send("ackMessage", {"messageIds": [messages[0]["id"], messages[1]["id"]]})
    assert (await first.request("ping"))["type"] == "pong"
    first.close()

    second, contents = await login_and_collect(3)
    assert contents == [m["content"] for m in messages[2:]]
    second.send("ackMessage", {"messageIds": [m["id"] for m in messages]})
    assert (await second.request("ping"))["type"] == "pong"
    second.close()

    third, _ = await login_and_collect(0)
    assert (await third.request("ping"))["type"] == "pong"
    assert third.pending() == []


@pytest_twisted.ensureDeferred
async def test_an_acknowledged_message_is_gone_from_the_store(core_factory, backend, tmp_path, request, redis_prefix):
    """After ackMessage no byte of the message's content is left in SQL or Redis (only the dedup
    record of its id), and the message that is not yet acknowledged is still there."""
    core = await core_factory()
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    acked, kept = (chat_message(a["userId"], b["userId"], content=base64.b64encode(uuid.uuid4().bytes).decode())
                   for _ in range(2))
    for message in (acked, kept):
        assert (await alice.request("sendMessage", message))["type"] == "ack"
        assert (await bob.next())["payload"]["id"] == message["id"]
    bob.send("ackMessage", {"messageIds": [acked["id"]]})
    assert (await bob.request("ping"))["type"] == "pong"
    if backend == "redis":
        redis = await redis_client()
        try:
            stored = await redis_dump(redis, redis_prefix)
        finally:
            await redis.stop()
        assert redis_entries_mentioning(stored, kept["content"]), "the unacknowledged message is in Redis"
        assert redis_entries_mentioning(stored, acked["content"]) == {}
    else:
        database = str(tmp_path / "construct.sqlite3") if backend == "sqlite" else request.getfixturevalue("postgres_url")
        assert [table for table, _ in sql_rows_mentioning(database, kept["content"])] == ["inbox"]
        assert sql_rows_mentioning(database, acked["content"]) == []


@pytest_twisted.ensureDeferred
async def test_resent_id_gets_same_ack_and_is_delivered_once(core):
    """Resending an id, before or after the recipient acknowledged it, delivers nothing twice."""
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    message = chat_message(a["userId"], b["userId"])
    first = await alice.request("sendMessage", message)
    assert (await bob.next())["payload"]["id"] == message["id"]
    assert (await alice.request("sendMessage", message)) == first
    bob.send("ackMessage", {"messageIds": [message["id"]]})
    assert (await bob.request("ping"))["type"] == "pong"
    assert (await alice.request("sendMessage", message)) == first
    assert (await bob.request("ping"))["type"] == "pong"
    assert bob.pending() == []
    carol, c = await register(core, "carol")
    stolen = dict(message, **{"from": c["userId"]})
    assert (await error_reply(carol, "sendMessage", stolen))["code"] == "DUPLICATE_MESSAGE"


@pytest_twisted.ensureDeferred
async def test_send_rejects_bad_messages(core):
    """Spoofed senders, unknown recipients, malformed fields and oversize content get clear errors."""
    alice, a = await register(core, "alice")
    _, b = await register(core, "bob")
    good = chat_message(a["userId"], b["userId"])
    cases = {
        "FORBIDDEN": dict(good, **{"from": b["userId"]}),
        "USER_NOT_FOUND": dict(good, to=str(uuid.uuid4())),
        "INVALID_MESSAGE_FORMAT": dict(good, ephemeralPublicKey=b"short"),
    }
    for code, message in cases.items():
        assert (await error_reply(alice, "sendMessage", message))["code"] == code
    for field, value in [("id", "x"), ("to", None), ("messageNumber", -1), ("messageNumber", 2**32),
                         ("content", ""), ("timestamp", "now"), ("ephemeralPublicKey", "!!")]:
        assert (await error_reply(alice, "sendMessage", dict(good, **{field: value})))["code"] == "INVALID_MESSAGE_FORMAT"
    too_large = dict(good, content="A" * (64 * 1024 + 1))
    assert (await error_reply(alice, "sendMessage", too_large))["code"] == "MESSAGE_TOO_LARGE"
    assert (await alice.request("sendMessage", dict(good, content="A" * 64 * 1024)))["type"] == "ack"
    anonymous = MemoryClient(core)
    assert (await error_reply(anonymous, "sendMessage", good))["code"] == "AUTH_REQUIRED"


@pytest_twisted.ensureDeferred
async def test_inbox_quota(core_factory):
    """A full inbox refuses more with INBOX_FULL until the recipient acknowledges."""
    core = await core_factory(inbox_quota=2)
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    sent = []
    for _ in range(2):
        message = chat_message(a["userId"], b["userId"])
        sent.append(message["id"])
        assert (await alice.request("sendMessage", message))["type"] == "ack"
    assert (await error_reply(alice, "sendMessage", chat_message(a["userId"], b["userId"])))["code"] == "INBOX_FULL"
    assert [(await bob.next())["payload"]["id"] for _ in range(2)] == sent
    bob.send("ackMessage", {"messageIds": sent[:1]})
    assert (await bob.request("ping"))["type"] == "pong"
    assert (await alice.request("sendMessage", chat_message(a["userId"], b["userId"])))["type"] == "ack"


@pytest_twisted.ensureDeferred
async def test_messages_expire_after_ttl(core_factory, clock):
    """Past its TTL a message is neither delivered nor kept; expire() reports it."""
    core = await core_factory(message_ttl=60)
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    await bob.request("logout")
    await alice.request("sendMessage", chat_message(a["userId"], b["userId"]))
    clock.advance(61)
    late = MemoryClient(core)
    assert (await late.request("login", {"username": "bob", "password": PASSWORD}))["type"] == "loginSuccess"
    assert (await late.request("ping"))["type"] == "pong"
    assert await core.messaging.expire() == 1
    assert await core.messaging.expire() == 0


@pytest_twisted.ensureDeferred
async def test_fifo_across_offline_backlog_and_live_sends(core):
    """Messages sent while the recipient drains its backlog still arrive in acceptance order."""
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    await bob.request("logout")
    for i in range(120):
        assert (await alice.request("sendMessage", chat_message(a["userId"], b["userId"], content=f"m{i}")))["type"] == "ack"
    bob.send("login", {"username": "bob", "password": PASSWORD})
    for i in range(120, 160):
        alice.send("sendMessage", chat_message(a["userId"], b["userId"], content=f"m{i}"))
    assert (await bob.next())["type"] == "loginSuccess"
    contents = [(await bob.next())["payload"]["content"] for _ in range(160)]
    assert contents == [f"m{i}" for i in range(160)]


@pytest_twisted.ensureDeferred
async def test_every_connection_of_a_user_receives(core):
    """Two devices of one user both get each message."""
    alice, a = await register(core, "alice")
    phone, b = await register(core, "bob")
    laptop = MemoryClient(core)
    await laptop.request("connect", {"sessionToken": b["sessionToken"]})
    message = chat_message(a["userId"], b["userId"])
    await alice.request("sendMessage", message)
    assert (await phone.next())["payload"]["id"] == message["id"]
    assert (await laptop.next())["payload"]["id"] == message["id"]


@pytest_twisted.ensureDeferred
async def test_push_uses_latest_encoding_and_replies_match_requests(core):
    """Replies follow each request's encoding; pushes follow the latest one."""
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob", encoding=codec.JSON)
    bob.send_raw(codec.encode("ping", {}, "p1", codec.MSGPACK), codec.MSGPACK)
    assert (await bob.next()) == {"type": "pong", "requestId": "p1"}
    message = chat_message(a["userId"], b["userId"])
    await alice.request("sendMessage", message)
    assert (await bob.next())["payload"]["ephemeralPublicKey"] == message["ephemeralPublicKey"]
    bob.send_raw(b'{"type":"ping","requestId":"p2"}', codec.JSON)
    assert (await bob.next()) == {"type": "pong", "requestId": "p2"}
    second = chat_message(a["userId"], b["userId"])
    await alice.request("sendMessage", second)
    pushed = await bob.next()
    assert pushed["payload"]["ephemeralPublicKey"] == base64.b64encode(second["ephemeralPublicKey"]).decode()


@pytest_twisted.ensureDeferred
async def test_malformed_frames_get_errors_and_the_connection_continues(core):
    """Garbage, unknown types, bad shapes and bad ack lists are answered; the connection lives on."""
    client, _ = await register(core, "alice")
    client.send_raw(b"\xc1\xff", codec.MSGPACK)
    assert (await client.next())["payload"]["code"] == "INVALID_FORMAT"
    client.send_raw(b"{not json", codec.JSON)
    assert (await client.next())["payload"]["code"] == "INVALID_FORMAT"
    client.send_raw(b"[1, 2]", codec.JSON)
    assert (await client.next())["payload"]["code"] == "INVALID_FORMAT"
    client.send_raw(b'{"type": "ping", "payload": [], "requestId": "r9"}', codec.JSON)
    assert (await client.next()) == {
        "type": "error",
        "payload": {"code": "INVALID_FORMAT", "message": "Invalid message format: 'type' must be a string and 'payload' an object"},
        "requestId": "r9",
    }
    client.send("fly", {}, request_id="r10")
    reply = await client.next()
    assert reply["payload"]["code"] == "UNKNOWN_TYPE" and reply["requestId"] == "r10"
    for bad in [None, [], ["nope"], [str(uuid.uuid4())] * 1001]:
        assert (await error_reply(client, "ackMessage", {"messageIds": bad}))["code"] == "INVALID_FORMAT"
    client.send_raw(b"x" * (300 * 1024), codec.JSON)
    assert (await client.next())["payload"]["code"] == "MESSAGE_TOO_LARGE"
    assert (await client.request("ping"))["type"] == "pong"


@pytest_twisted.ensureDeferred
async def test_http_long_poll_rejects_bad_waits_and_wakes_on_a_send(core, http):
    """GET /v1/messages refuses a bad wait and returns as soon as a message arrives."""
    alice, a = await register(core, "alice")
    _, b = await register(core, "bob")
    for wait in ("abc", "-1", "61"):
        status, error = await http.call("GET", f"/v1/messages?wait={wait}", token=b["sessionToken"])
        assert (status, error["code"]) == (400, "INVALID_FORMAT"), wait
    poll = defer.ensureDeferred(http.call("GET", "/v1/messages?wait=30", token=b["sessionToken"]))
    await task.deferLater(reactor, 0.2, lambda: None)
    assert not poll.called
    message = chat_message(a["userId"], b["userId"])
    await alice.request("sendMessage", message)
    status, pending = await poll.addTimeout(10, reactor)
    assert status == 200 and [m["id"] for m in pending["messages"]] == [message["id"]]
