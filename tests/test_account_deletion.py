"""Deleting an account removes everything the server holds about the user, on every backend and both paths.

The user's own `deleteAccount` (WebSocket/TCP, HTTP `DELETE /v1/accounts/current`) and
`construct-admin user delete` both go through construct.core.deletion; afterwards the only
traces left are the Redis tombstone and the messages the user sent to others, which are theirs.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from construct.protocol import codec
from tests.clients import TcpClient, WsClient
from tests.conftest import REDIS_URL
from tests.helpers import PASSWORD, MemoryClient, chat_message, error_reply, make_bundle, register
from tests.privacy_scan import redis_client, redis_dump, redis_entries_mentioning, sql_rows_mentioning
from tests.processes import ServerProcess, process_env

# Rate-limit counters (<prefix>limit:…) are keyed by salted hashes and expire on their own.
LIMIT_KEYS = "limit:"


def _prekeys(count: int) -> list[dict]:
    return [{"keyId": i, "publicKey": base64.b64encode(os.urandom(32)).decode()} for i in range(count)]


def _database(backend: str, tmp_path, request) -> str:
    return str(tmp_path / "construct.sqlite3") if backend == "sqlite" else request.getfixturevalue("postgres_url")


def _only_recipients_data(rows: list[tuple[str, tuple]], recipient_id: str) -> list[tuple[str, tuple]]:
    """The rows left that are not messages to (or dedup records of) `recipient_id`."""
    return [(table, row) for table, row in rows if not (table in ("inbox", "sent_messages") and recipient_id in row)]


async def _reply(client: MemoryClient, message_type: str, payload: dict | None = None) -> dict:
    """The reply to a request, past the pushes of messages that interleave with it."""
    client.send(message_type, payload)
    while True:
        frame = await client.next()
        if frame["type"] != "message":
            return frame


async def _error(client: MemoryClient, message_type: str, payload: dict) -> dict:
    reply = await _reply(client, message_type, payload)
    assert reply["type"] == "error", reply
    return reply["payload"]


async def _settle(redis, prefix: str) -> dict:
    """Redis after the background writes of the last requests (presence, pending index)."""
    await task.deferLater(reactor, 0.2, lambda: None)
    return await redis_dump(redis, prefix)


@pytest_twisted.ensureDeferred
async def test_delete_account_removes_everything(core_factory, backend, clock, tmp_path, request, redis_prefix):
    """deleteAccount with the password: rows, keys, prekeys, sessions and inbox go; other connections get sessionExpired."""
    core = await core_factory()
    alice_client, alice = await register(core, "zed-alice")
    other_connection = MemoryClient(core)
    assert (await _reply(other_connection, "login", {"username": "zed-alice", "password": PASSWORD}))["type"] == "loginSuccess"
    bob_client, bob = await register(core, "zed-bob")
    assert (await _reply(alice_client, "uploadPrekeys", {"prekeys": _prekeys(5)}))["type"] == "prekeysUploaded"
    for _ in range(3):
        assert (await _reply(bob_client, "sendMessage", chat_message(bob["userId"], alice["userId"])))["type"] == "ack"
    # A message alice sent stays with bob: it is his.
    assert (await _reply(alice_client, "sendMessage", chat_message(alice["userId"], bob["userId"])))["type"] == "ack"
    clock.advance(0)  # the Redis inbox writes its pending index on the next turn
    redis = await redis_client() if backend == "redis" else None
    try:
        if redis is not None:
            before = redis_entries_mentioning(await _settle(redis, redis_prefix), alice["userId"])
            assert any(key.endswith(":inbox") for key in before) and f"{redis_prefix}pending" in before

        wrong = await _error(alice_client, "deleteAccount", {"password": "Wrong-password-1"})
        assert wrong["code"] == "INVALID_PASSWORD"
        assert (await _error(alice_client, "deleteAccount", {}))["code"] == "INVALID_FORMAT"
        assert (await _reply(alice_client, "getPrekeyCount"))["payload"]["count"] == 5

        assert await _reply(alice_client, "deleteAccount", {"password": PASSWORD}) == {"type": "accountDeleted"}
        # It says why, so a client does not ask its user to log in to an account that is gone.
        assert (await other_connection.next_of("sessionExpired")).get("payload") == {"reason": "accountDeleted"}
        assert (await _error(alice_client, "getPrekeyCount", {}))["code"] == "AUTH_REQUIRED"
        assert not await core.hub.is_online(alice["userId"])

        assert (await _error(bob_client, "getPublicKey", {"userId": alice["userId"]}))["code"] == "USER_NOT_FOUND"
        assert (await _error(bob_client, "lookupUser", {"username": "zed-alice"}))["code"] == "USER_NOT_FOUND"
        refused = await _error(bob_client, "sendMessage", chat_message(bob["userId"], alice["userId"]))
        assert refused["code"] == "USER_NOT_FOUND"
        relogin = await error_reply(MemoryClient(core), "login", {"username": "zed-alice", "password": PASSWORD})
        assert relogin["code"] == "INVALID_CREDENTIALS"

        rows = sql_rows_mentioning(_database(backend, tmp_path, request), alice["userId"], "zed-alice")
        assert _only_recipients_data(rows, bob["userId"]) == []
        # The message alice sent waits in bob's inbox: in SQL in embedded mode, in Redis in production mode.
        assert bool(rows) == (backend != "redis")
        if redis is not None:
            left = redis_entries_mentioning(await _settle(redis, redis_prefix), alice["userId"], "zed-alice")
            left = {key: value for key, value in left.items() if not key.startswith(redis_prefix + LIMIT_KEYS)}
            bobs = f"{redis_prefix}{{{bob['userId']}}}:"
            assert {key for key in left if not key.startswith(bobs)} == {f"{redis_prefix}{{{alice['userId']}}}:deleted"}
            assert f"{bobs}msgs" in left

        # The name is free again, for a new account with a new id.
        _, again = await register(core, "zed-alice")
        assert again["userId"] != alice["userId"]
        assert (await _reply(bob_client, "sendMessage", chat_message(bob["userId"], again["userId"])))["type"] == "ack"
    finally:
        if redis is not None:
            await redis.stop()


@pytest_twisted.ensureDeferred
async def test_delete_account_over_http(core, http):
    """DELETE /v1/accounts/current takes {password}: 204, then the token and the account are gone."""
    _, alice = await register(core, "zed-alice")
    token = alice["sessionToken"]
    assert (await http.call("DELETE", "/v1/accounts/current", {"password": PASSWORD}))[0] == 401
    status, error = await http.call("DELETE", "/v1/accounts/current", {"password": "Wrong-password-1"}, token=token)
    assert (status, error["code"]) == (401, "INVALID_PASSWORD")
    status, error = await http.call("DELETE", "/v1/accounts/current", raw=b"not json", token=token)
    assert (status, error["code"]) == (400, "INVALID_FORMAT")
    assert await http.call("DELETE", "/v1/accounts/current", {"password": PASSWORD}, token=token) == (204, None)
    status, error = await http.call("GET", "/v1/keys/prekeys/count", token=token)
    assert status == 401
    status, error = await http.call("POST", "/v1/sessions", {"username": "zed-alice", "password": PASSWORD})
    assert (status, error["code"]) == (401, "INVALID_CREDENTIALS")


def _admin(cwd, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "construct.admin", *args], cwd=cwd, env=process_env(**env),
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["embedded", "production"])
@pytest_twisted.ensureDeferred
async def test_admin_delete_removes_everything(mode, tmp_path, request):
    """construct-admin user delete leaves the same nothing as deleteAccount; in production mode live connections are told."""
    if mode == "embedded":
        database = str(tmp_path / "data" / "construct.sqlite3")
        settings = {"CONSTRUCT_DATA_DIR": str(tmp_path / "data")}
    else:
        database = request.getfixturevalue("postgres_url")
        prefix = request.getfixturevalue("redis_prefix")
        settings = {"CONSTRUCT_DATABASE": database, "CONSTRUCT_REDIS": REDIS_URL, "CONSTRUCT_REDIS_PREFIX": prefix}
    server = ServerProcess(tmp_path, "--bcrypt-cost", "4", env=settings).start()
    redis = await redis_client() if mode == "production" else None
    clients = []
    try:
        alice = await TcpClient.connect(server.ports["tcp"])
        bob = await WsClient.connect(server.ports["http"], codec.JSON)
        clients += [alice, bob]
        reply = await alice.request("register", {"username": "zed-alice", "password": PASSWORD, "publicKey": make_bundle()})
        a = reply["payload"]
        b = (await bob.request("register", {"username": "zed-bob", "password": PASSWORD, "publicKey": make_bundle()}))["payload"]
        assert (await alice.request("uploadPrekeys", {"prekeys": _prekeys(3)}))["type"] == "prekeysUploaded"
        await alice.request("logout")
        for _ in range(2):
            assert (await bob.request("sendMessage", chat_message(b["userId"], a["userId"])))["type"] == "ack"
        live = await WsClient.connect(server.ports["http"], codec.JSON)
        clients.append(live)
        assert (await live.request("login", {"username": "zed-alice", "password": PASSWORD}))["type"] == "loginSuccess"
        await live.next_of("message")

        deleted = _admin(tmp_path, "--json", "user", "delete", "--yes", "zed-alice", env=settings)
        assert deleted.returncode == 0, deleted.stderr
        assert json.loads(deleted.stdout) == {"deleted": a["userId"]}
        if mode == "production":
            # Embedded mode has no channel from construct-admin to the server (docs/operations.md).
            assert (await live.next_of("sessionExpired")).get("payload") == {"reason": "accountDeleted"}

        assert sql_rows_mentioning(database, a["userId"], "zed-alice") == []
        if redis is not None:
            left = redis_entries_mentioning(await _settle(redis, prefix), a["userId"], "zed-alice")
            left = {key: value for key, value in left.items() if not key.startswith(prefix + LIMIT_KEYS)}
            assert set(left) == {f"{prefix}{{{a['userId']}}}:deleted"}
        assert _admin(tmp_path, "user", "delete", "--yes", "zed-alice", env=settings).returncode == 1
    finally:
        for client in clients:
            await client.close()
        server.stop()
        if redis is not None:
            dump = await redis_dump(redis, prefix)
            if dump:
                await redis.execute("DEL", *dump)
            await redis.stop()


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_deleted_account_leaves_no_bytes_in_the_sqlite_files(core_factory, tmp_path):
    """After deleteAccount neither the database file nor its write-ahead log holds the name, the id
    or a ciphertext sent to the account (secure_delete zeroes pages, a checkpoint empties the log)."""
    core = await core_factory()
    alice_client, alice = await register(core, "qvx-residue-alice")
    bob_client, bob = await register(core, "qvx-residue-bob")
    content = base64.b64encode(b"qvx-ciphertext-for-alice-" + os.urandom(8)).decode()
    reply = await _reply(bob_client, "sendMessage", chat_message(bob["userId"], alice["userId"], content=content))
    assert reply["type"] == "ack"
    assert await _reply(alice_client, "deleteAccount", {"password": PASSWORD}) == {"type": "accountDeleted"}
    files = [path for path in tmp_path.iterdir() if path.name.startswith("construct.sqlite3")]
    raw = b"".join(path.read_bytes() for path in files)
    assert b"qvx-residue-bob" in raw  # the scan sees what is still there
    for trace in ("qvx-residue-alice", alice["userId"], content):
        assert trace.encode() not in raw, trace
