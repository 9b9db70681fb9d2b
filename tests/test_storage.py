"""Storage on SQLite and on the real PostgreSQL: schema, accounts, and the SQL inbox contract."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import defer

from construct.errors import ConstructError
from construct.storage.accounts import AccountStore, User
from construct.storage.database import SCHEMA_VERSION, prepare_database
from construct.delivery.types import Submission
from construct.storage.inbox import SqlInbox
from construct.storage.keys import KeyStore, StoredBundle

NOW_MS = 1_800_000_000_000
TTL_MS = 60_000
BUNDLE = StoredBundle("master", "data", "signature")


async def _user(database, name: str) -> str:
    user = User(str(uuid.uuid4()), name, "hash")
    await AccountStore(database).create_account(user, BUNDLE, uuid.uuid4().hex, NOW_MS, NOW_MS + TTL_MS)
    return user.id


def test_prepare_database_is_idempotent(engine):
    """Running the migrations twice leaves the schema at the current version."""
    assert prepare_database(engine) == SCHEMA_VERSION
    assert prepare_database(engine) == SCHEMA_VERSION


@pytest_twisted.ensureDeferred
async def test_account_rows_and_unique_username(database):
    """A username is taken once; the user, bundle and session are written together."""
    user_id = await _user(database, "alice")
    store = AccountStore(database)
    assert (await store.get_user_by_name("alice")).id == user_id
    assert (await KeyStore(database).get_bundle(user_id)).bundle == BUNDLE
    with pytest.raises(ConstructError) as caught:
        await _user(database, "alice")
    assert caught.value.code == "USERNAME_TAKEN"


@pytest_twisted.ensureDeferred
async def test_change_password_returns_revoked_sessions(database):
    """Every session but the kept one is deleted and reported."""
    user_id = await _user(database, "alice")
    store = AccountStore(database)
    for token in ("keep", "other1", "other2"):
        await store.create_session(token, user_id, NOW_MS, NOW_MS + TTL_MS)
    revoked = await store.change_password(user_id, "newhash", "keep")
    # _user's registration opened a session too.
    assert len(revoked) == 3 and {"other1", "other2"} <= set(revoked)
    assert await store.get_session("keep") is not None
    assert await store.get_session("other1") is None
    assert (await store.get_user(user_id)).password_hash == "newhash"


@pytest_twisted.ensureDeferred
async def test_inbox_fifo_ack_and_expiry(database):
    """Entries come back in insertion order after a cursor, vanish on ack, and expire."""
    sender, recipient = await _user(database, "alice"), await _user(database, "bob")
    inbox = SqlInbox(database)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for i, message_id in enumerate(ids):
        accepted = await inbox.put(Submission(sender, recipient, message_id, f"e{i}", False, NOW_MS + i, TTL_MS, 100, sender))
        assert not accepted.duplicate and accepted.expires_at_ms == NOW_MS + i + TTL_MS
    entries = await inbox.fetch(recipient, 0, 10, NOW_MS)
    assert [e.envelope for e in entries] == [f"e{i}" for i in range(5)]
    assert [e.envelope for e in await inbox.fetch(recipient, entries[2].seq, 10, NOW_MS)] == ["e3", "e4"]
    assert sorted(await inbox.ack(recipient, ids[:2] + [str(uuid.uuid4())])) == [NOW_MS, NOW_MS + 1]
    assert await inbox.ack(sender, ids[2:]) == []
    assert [e.envelope for e in await inbox.fetch(recipient, 0, 10, NOW_MS)] == ["e2", "e3", "e4"]
    assert await inbox.fetch(recipient, 0, 10, NOW_MS + TTL_MS + 3) == [entries[4]]
    assert await inbox.expire(NOW_MS + TTL_MS + 3) == 2
    assert await inbox.depth(recipient, NOW_MS) == 1


@pytest_twisted.ensureDeferred
async def test_inbox_dedup_quota_and_unknown_recipient(database):
    """An id is stored once per sender, reused ids by others are refused, the quota holds."""
    sender, other, recipient = [await _user(database, n) for n in ("alice", "carol", "bob")]
    inbox = SqlInbox(database)
    message_id = str(uuid.uuid4())
    first = await inbox.put(Submission(sender, recipient, message_id, "e", True, NOW_MS, TTL_MS, 2, sender))
    again = await inbox.put(Submission(sender, recipient, message_id, "e", False, NOW_MS + 5, TTL_MS, 2, sender))
    assert again.duplicate and (again.reached, again.expires_at_ms) == (first.reached, first.expires_at_ms) == (True, NOW_MS + TTL_MS)
    with pytest.raises(ConstructError) as caught:
        await inbox.put(Submission(other, recipient, message_id, "e", False, NOW_MS, TTL_MS, 2, other))
    assert caught.value.code == "DUPLICATE_MESSAGE"
    await inbox.put(Submission(sender, recipient, str(uuid.uuid4()), "e", False, NOW_MS, TTL_MS, 2, sender))
    with pytest.raises(ConstructError) as caught:
        await inbox.put(Submission(sender, recipient, str(uuid.uuid4()), "e", False, NOW_MS, TTL_MS, 2, sender))
    assert caught.value.code == "INBOX_FULL"
    with pytest.raises(ConstructError) as caught:
        await inbox.put(Submission(sender, str(uuid.uuid4()), str(uuid.uuid4()), "e", False, NOW_MS, TTL_MS, 2, sender))
    assert caught.value.code == "USER_NOT_FOUND"
    # An expired id may be used again.
    assert await inbox.expire(NOW_MS + TTL_MS) == 2
    assert not (await inbox.put(Submission(sender, recipient, message_id, "e", False, NOW_MS + TTL_MS, TTL_MS, 2, sender))).duplicate


@pytest_twisted.ensureDeferred
async def test_concurrent_puts_keep_commit_order_and_dedup(database):
    """Many concurrent sends to one recipient get distinct increasing seqs; a racing resend is stored once."""
    senders = [await _user(database, f"user{i}") for i in range(4)]
    recipient = await _user(database, "bob")
    inbox = SqlInbox(database)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    puts = [
        defer.ensureDeferred(inbox.put(Submission(senders[i % 4], recipient, ids[i], f"e{i}", False, NOW_MS, TTL_MS, 1000, senders[i % 4])))
        for i in range(40)
    ]
    resend = [defer.ensureDeferred(inbox.put(Submission(senders[0], recipient, ids[0], "e0", False, NOW_MS, TTL_MS, 1000, senders[0])))]
    results = await defer.gatherResults(puts + resend)
    assert sum(not r.duplicate for r in results) == 40
    entries = await inbox.fetch(recipient, 0, 100, NOW_MS)
    assert sorted(e.message_id for e in entries) == sorted(ids)
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)


def test_a_failing_migration_leaves_nothing_and_the_next_start_succeeds(engine, monkeypatch):
    """Each migration runs in one transaction: the tables of a migration that fails are not kept,
    so the start after the fix does not stop at 'table already exists'."""
    from construct.storage import database as database_module

    real_scripts = database_module._schema_scripts
    broken = (SCHEMA_VERSION + 1, "CREATE TABLE migration_probe (id INTEGER); CREATE TABLE broken (")
    fixed = (SCHEMA_VERSION + 1, "CREATE TABLE migration_probe (id INTEGER)")
    monkeypatch.setattr(database_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(database_module, "_schema_scripts", lambda e: real_scripts(e) + [broken])
    with pytest.raises(engine.driver.Error):
        prepare_database(engine)
    # Nothing of the failed start stays, not even the earlier migrations of the same start.
    assert database_module.schema_version(engine) == 0
    monkeypatch.setattr(database_module, "_schema_scripts", lambda e: real_scripts(e) + [fixed])
    assert prepare_database(engine) == SCHEMA_VERSION + 1


def test_sqlite_files_are_private_to_the_server(tmp_path):
    """The data directory is made 0700 and the database files 0600, also when they existed wider."""
    import os
    import stat

    from construct.storage.database import SqliteEngine

    data_dir = tmp_path / "data"
    prepare_database(SqliteEngine(str(data_dir / "construct.sqlite3")))
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    files = [path for path in data_dir.iterdir() if path.name.startswith("construct.sqlite3")]
    assert files and {stat.S_IMODE(os.stat(path).st_mode) for path in files} == {0o600}
    os.chmod(data_dir / "construct.sqlite3", 0o644)
    prepare_database(SqliteEngine(str(data_dir / "construct.sqlite3")))
    assert stat.S_IMODE(os.stat(data_dir / "construct.sqlite3").st_mode) == 0o600
