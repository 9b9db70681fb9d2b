"""One-time prekeys and username lookup: storage on both engines, the core on three backends, HTTP."""

from __future__ import annotations

import base64
import os
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from construct.core.keys import MAX_PREKEY_ID, MAX_WAITING_PREKEYS
from construct.errors import ConstructError
from construct.storage.accounts import AccountStore, User
from construct.storage.database import Database, PostgresEngine
from construct.storage.keys import KeyStore, OneTimePrekeyRecord, StoredBundle
from tests.helpers import MemoryClient, PASSWORD, b64, error_reply, make_bundle, register

NOW_MS = 1_800_000_000_000
BUNDLE = StoredBundle("master", "data", "signature")


def _prekeys(start: int, count: int) -> list[dict]:
    return [{"keyId": start + i, "publicKey": b64(os.urandom(32))} for i in range(count)]


def _records(start: int, count: int) -> list[OneTimePrekeyRecord]:
    return [OneTimePrekeyRecord(p["keyId"], p["publicKey"]) for p in _prekeys(start, count)]


async def _user(database, name: str) -> str:
    user = User(str(uuid.uuid4()), name, "hash")
    await AccountStore(database).create_account(user, BUNDLE, uuid.uuid4().hex, NOW_MS, NOW_MS + 60_000)
    return user.id


# Storage


@pytest_twisted.ensureDeferred
async def test_storage_claims_lowest_id_once_and_upserts(database):
    """Keys are handed out lowest id first, each once; a re-uploaded id replaces the waiting key."""
    user_id = await _user(database, "bob")
    store = KeyStore(database)
    records = _records(10, 3)
    assert await store.add_one_time_prekeys(user_id, records, NOW_MS, 1000) == 3
    replacement = OneTimePrekeyRecord(10, b64(os.urandom(32)))
    assert await store.add_one_time_prekeys(user_id, [replacement], NOW_MS, 1000) == 3
    assert await store.get_bundle(user_id) is not None
    assert await store.count_one_time_prekeys(user_id) == 3
    claimed = [(await store.get_bundle(user_id, claim_one_time_prekey=True)).one_time_prekey for _ in range(4)]
    assert claimed == [replacement, records[1], records[2], None]
    assert await store.count_one_time_prekeys(user_id) == 0


@pytest_twisted.ensureDeferred
async def test_storage_pool_limit_stores_nothing_past_it(database):
    """An upload that would pass the per-user limit is refused whole."""
    user_id = await _user(database, "bob")
    store = KeyStore(database)
    await store.add_one_time_prekeys(user_id, _records(0, 4), NOW_MS, 5)
    with pytest.raises(ConstructError) as caught:
        await store.add_one_time_prekeys(user_id, _records(4, 2), NOW_MS, 5)
    assert caught.value.code == "TOO_MANY_PREKEYS"
    assert await store.count_one_time_prekeys(user_id) == 4
    # Replacing waiting ids does not grow the pool.
    assert await store.add_one_time_prekeys(user_id, _records(0, 4) + _records(4, 1), NOW_MS, 5) == 5


@pytest_twisted.ensureDeferred
async def test_storage_prekeys_go_with_their_user(database):
    """Deleting a user deletes its prekeys (ON DELETE CASCADE)."""
    user_id = await _user(database, "bob")
    await KeyStore(database).add_one_time_prekeys(user_id, _records(0, 3), NOW_MS, 1000)
    await database.run("delete_user", lambda txn: txn.execute("DELETE FROM users WHERE id = ?", (user_id,)))
    count = await database.run(
        "count_all", lambda txn: txn.execute("SELECT COUNT(*) FROM one_time_prekeys").fetchone()[0]
    )
    assert count == 0


@pytest_twisted.ensureDeferred
async def test_concurrent_fetches_never_share_a_prekey(database, engine):
    """50 concurrent bundle fetches get 50 different keys while they last, then none."""
    if engine.name == "postgres":
        # Several pool connections, so the fetches really run side by side.
        database = Database(PostgresEngine(engine.url, pool_size=12), reactor)
    try:
        user_id = await _user(database, "bob")
        store = KeyStore(database)
        await store.add_one_time_prekeys(user_id, _records(0, 100), NOW_MS, 1000)
        fetches = [defer.ensureDeferred(store.get_bundle(user_id, claim_one_time_prekey=True)) for _ in range(50)]
        first = [published.one_time_prekey for published in await defer.gatherResults(fetches)]
        assert None not in first and len({p.key_id for p in first}) == 50
        fetches = [defer.ensureDeferred(store.get_bundle(user_id, claim_one_time_prekey=True)) for _ in range(70)]
        second = [published.one_time_prekey for published in await defer.gatherResults(fetches)]
        handed_out = [p.key_id for p in first + second if p is not None]
        assert sorted(handed_out) == list(range(100))
        assert second.count(None) == 20
        assert await store.count_one_time_prekeys(user_id) == 0
    finally:
        if engine.name == "postgres":
            database.close()


# Core, through the protocol layer


@pytest_twisted.ensureDeferred
async def test_upload_count_and_claim_on_fetch(core):
    """Uploaded keys are counted, and each fetch by another user takes one until none are left."""
    bob, b = await register(core, "bob")
    alice, _ = await register(core, "alice")
    assert (await bob.request("getPrekeyCount")) == {"type": "prekeyCount", "payload": {"count": 0}}
    uploaded = _prekeys(1, 3)
    reply = await bob.request("uploadPrekeys", {"prekeys": uploaded})
    assert reply == {"type": "prekeysUploaded", "payload": {"count": 3}}
    served = []
    for _ in range(4):
        bundle = (await alice.request("getPublicKey", {"userId": b["userId"]}))["payload"]
        served.append(bundle.get("oneTimePrekey"))
    assert served == uploaded + [None]
    assert (await bob.request("getPrekeyCount"))["payload"] == {"count": 0}


@pytest_twisted.ensureDeferred
async def test_fetching_your_own_bundle_burns_no_prekey(core):
    """A user's own getPublicKey leaves the pool alone and carries no oneTimePrekey."""
    bob, b = await register(core, "bob")
    await bob.request("uploadPrekeys", {"prekeys": _prekeys(0, 2)})
    own = (await bob.request("getPublicKey", {"userId": b["userId"].upper()}))["payload"]
    assert "oneTimePrekey" not in own
    assert (await bob.request("getPrekeyCount"))["payload"] == {"count": 2}


@pytest_twisted.ensureDeferred
async def test_bundle_without_a_prekey_when_asked(core, http):
    """"oneTimePrekey": false (or ?oneTimePrekey=false) reads another user's bundle without taking a key."""
    bob, b = await register(core, "bob")
    await bob.request("uploadPrekeys", {"prekeys": _prekeys(0, 2)})
    alice, a = await register(core, "alice")
    plain = (await alice.request("getPublicKey", {"userId": b["userId"], "oneTimePrekey": False}))["payload"]
    assert "oneTimePrekey" not in plain
    status, over_http = await http.call("GET", f"/v1/keys/{b['userId']}?oneTimePrekey=false", token=a["sessionToken"])
    assert status == 200 and "oneTimePrekey" not in over_http
    assert (await bob.request("getPrekeyCount"))["payload"] == {"count": 2}
    bad = await alice.request("getPublicKey", {"userId": b["userId"], "oneTimePrekey": "no"})
    assert bad["payload"]["code"] == "INVALID_FORMAT"
    status, error = await http.call("GET", f"/v1/keys/{b['userId']}?oneTimePrekey=maybe", token=a["sessionToken"])
    assert (status, error["code"]) == (400, "INVALID_FORMAT")
    taken = (await alice.request("getPublicKey", {"userId": b["userId"]}))["payload"]
    assert taken["oneTimePrekey"]["keyId"] == 0
    assert (await bob.request("getPrekeyCount"))["payload"] == {"count": 1}


@pytest_twisted.ensureDeferred
async def test_prekey_pool_limit(core):
    """The pool holds at most MAX_WAITING_PREKEYS keys; past it the upload is refused whole."""
    bob, _ = await register(core, "bob")
    for start in range(0, MAX_WAITING_PREKEYS, 100):
        assert (await bob.request("uploadPrekeys", {"prekeys": _prekeys(start, 100)}))["type"] == "prekeysUploaded"
    error = await error_reply(bob, "uploadPrekeys", {"prekeys": _prekeys(MAX_WAITING_PREKEYS, 1)})
    assert error["code"] == "TOO_MANY_PREKEYS"
    assert (await bob.request("getPrekeyCount"))["payload"] == {"count": MAX_WAITING_PREKEYS}


@pytest_twisted.ensureDeferred
async def test_upload_rejects_bad_prekeys(core):
    """Malformed uploads get INVALID_KEY_BUNDLE naming the problem, and store nothing."""
    bob, _ = await register(core, "bob")
    key = b64(os.urandom(32))
    cases = [
        (None, "'prekeys' must be a list of 1 to 100"),
        ({"keyId": 1, "publicKey": key}, "'prekeys' must be a list of 1 to 100"),
        ([], "'prekeys' must be a list of 1 to 100"),
        (_prekeys(0, 101), "'prekeys' must be a list of 1 to 100"),
        (["x"], "'prekeys[0]' must be an object"),
        ([{"keyId": -1, "publicKey": key}], "'prekeys[0].keyId' must be an integer"),
        ([{"keyId": MAX_PREKEY_ID + 1, "publicKey": key}], "'prekeys[0].keyId' must be an integer"),
        ([{"keyId": True, "publicKey": key}], "'prekeys[0].keyId' must be an integer"),
        ([{"keyId": "1", "publicKey": key}], "'prekeys[0].keyId' must be an integer"),
        ([{"keyId": 1, "publicKey": b64(os.urandom(31))}], "'prekeys[0].publicKey' must decode to 32 bytes"),
        ([{"keyId": 1, "publicKey": "%%%"}], "'prekeys[0].publicKey' is not valid base64"),
        ([{"keyId": 1, "publicKey": key}, {"keyId": 1, "publicKey": key}], "keyId 1 appears more than once"),
    ]
    for prekeys, expected in cases:
        error = await error_reply(bob, "uploadPrekeys", {"prekeys": prekeys})
        assert error["code"] == "INVALID_KEY_BUNDLE" and error["message"].startswith(expected), (prekeys, error)
    assert (await bob.request("getPrekeyCount"))["payload"] == {"count": 0}


@pytest_twisted.ensureDeferred
async def test_highest_key_id_and_canonical_base64(core):
    """keyId 2^32-2 is accepted, and keys are served in canonical base64."""
    bob, b = await register(core, "bob")
    alice, _ = await register(core, "alice")
    raw = bytes(31) + b"\x01"
    sloppy = base64.b64encode(raw).decode()[:-2] + "F="  # same bytes, non-zero padding bits
    assert base64.b64decode(sloppy) == raw
    await bob.request("uploadPrekeys", {"prekeys": [{"keyId": MAX_PREKEY_ID, "publicKey": sloppy}]})
    served = (await alice.request("getPublicKey", {"userId": b["userId"]}))["payload"]["oneTimePrekey"]
    assert served == {"keyId": MAX_PREKEY_ID, "publicKey": b64(raw)}


@pytest_twisted.ensureDeferred
async def test_prekey_and_lookup_messages_need_a_session(core):
    """uploadPrekeys, getPrekeyCount and lookupUser answer AUTH_REQUIRED before login."""
    await register(core, "bob")
    stranger = MemoryClient(core)
    for message_type, payload in (
        ("uploadPrekeys", {"prekeys": _prekeys(0, 1)}),
        ("getPrekeyCount", {}),
        ("lookupUser", {"username": "bob"}),
    ):
        assert (await error_reply(stranger, message_type, payload))["code"] == "AUTH_REQUIRED"


@pytest_twisted.ensureDeferred
async def test_lookup_user_by_name(core):
    """lookupUser maps a username (any case) to its id; unknown and malformed names get clear errors."""
    _, b = await register(core, "bob")
    alice, _ = await register(core, "alice")
    reply = await alice.request("lookupUser", {"username": "BOB"})
    assert reply == {"type": "userFound", "payload": {"userId": b["userId"], "username": "bob"}}
    assert (await error_reply(alice, "lookupUser", {"username": "nobody"}))["code"] == "USER_NOT_FOUND"
    assert (await error_reply(alice, "lookupUser", {"username": "no way"}))["code"] == "INVALID_USERNAME"
    assert (await error_reply(alice, "lookupUser", {}))["code"] == "INVALID_FORMAT"


# HTTP, in process (the `http` fixture is in conftest.py)


@pytest_twisted.ensureDeferred
async def test_http_prekey_routes_and_lookup(core, http):
    """POST /v1/keys/prekeys, GET /v1/keys/prekeys/count and GET /v1/users/{username} mirror the messages."""
    account = {"username": "bob", "password": PASSWORD, "publicKey": make_bundle()}
    status, bob = await http.call("POST", "/v1/accounts", account)
    assert status == 201
    alice, _ = await register(core, "alice")
    uploaded = _prekeys(5, 2)
    assert await http.call("POST", "/v1/keys/prekeys", {"prekeys": uploaded}, token=bob["sessionToken"]) == (
        200, {"count": 2}
    )
    assert await http.call("GET", "/v1/keys/prekeys/count", token=bob["sessionToken"]) == (200, {"count": 2})
    status, error = await http.call("POST", "/v1/keys/prekeys", {"prekeys": []}, token=bob["sessionToken"])
    assert (status, error["code"]) == (400, "INVALID_KEY_BUNDLE")
    status, own = await http.call("GET", f"/v1/keys/{bob['userId']}", token=bob["sessionToken"])
    assert status == 200 and "oneTimePrekey" not in own
    fetched = (await alice.request("getPublicKey", {"userId": bob["userId"]}))["payload"]
    assert fetched["oneTimePrekey"] == uploaded[0]
    assert await http.call("GET", "/v1/users/BOB", token=bob["sessionToken"]) == (
        200, {"userId": bob["userId"], "username": "bob"}
    )
    status, error = await http.call("GET", "/v1/users/nobody", token=bob["sessionToken"])
    assert (status, error["code"]) == (404, "USER_NOT_FOUND")
    status, error = await http.call("GET", "/v1/users/bob")
    assert (status, error["code"]) == (401, "AUTH_REQUIRED")
    status, error = await http.call("GET", "/v1/keys/prekeys/count")
    assert (status, error["code"]) == (401, "AUTH_REQUIRED")


def test_openapi_limits_match_the_implementation():
    """The documented prekey limits are the code's constants."""
    from construct.core.keys import MAX_PREKEYS_PER_UPLOAD
    from tests.test_openapi import load_document

    schemas = load_document()["components"]["schemas"]
    assert schemas["UploadPrekeysRequest"]["properties"]["prekeys"]["maxItems"] == MAX_PREKEYS_PER_UPLOAD
    assert schemas["OneTimePrekey"]["properties"]["keyId"]["maximum"] == MAX_PREKEY_ID
    assert schemas["PrekeyCount"]["properties"]["count"]["maximum"] == MAX_WAITING_PREKEYS


@pytest_twisted.ensureDeferred
async def test_signed_prekey_rotation_is_verified_and_keeps_the_pool(core):
    """A new signed prekey needs a signature by the registered identity key; rotating leaves the prekeys."""
    from nacl.signing import SigningKey

    identity = SigningKey.generate()
    bob = MemoryClient(core)
    registered = await bob.request(
        "register", {"username": "bob", "password": PASSWORD, "publicKey": make_bundle(signing_key=identity)}
    )
    bob_id = registered["payload"]["userId"]
    await bob.request("uploadPrekeys", {"prekeys": _prekeys(0, 3)})
    forged = dict(make_bundle(bob_id), masterIdentityKey=make_bundle(signing_key=identity)["masterIdentityKey"])
    error = await error_reply(bob, "rotatePrekey", {"update": forged})
    assert error == {"code": "INVALID_KEY_BUNDLE", "message": "The signature does not verify against masterIdentityKey"}
    rotated = make_bundle(bob_id, signing_key=identity)
    assert (await bob.request("rotatePrekey", {"update": rotated})) == {"type": "keyRotationSuccess"}
    assert (await bob.request("getPrekeyCount"))["payload"] == {"count": 3}
