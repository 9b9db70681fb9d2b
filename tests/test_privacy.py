"""Privacy in-process: the log filter's redactions, the option that lets addresses through, and no user enumeration."""

from __future__ import annotations

import json
import sqlite3
import uuid

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import LogPublisher, formatEventAsClassicLogText
from twisted.python.failure import Failure

from construct.errors import ConstructError
from construct.logs import ADDRESS_WITHHELD, _json_line, install_privacy_filter, redact_event
from construct.metrics import Metrics
from construct.tap import Options, build_embedded
from tests.conftest import make_options
from tests.helpers import PASSWORD, MemoryClient, chat_message, error_reply, make_bundle

SECRET = "zed-secret-username"


def _failure_of(raising) -> Failure:
    try:
        raising()
    except BaseException:
        return Failure()
    raise AssertionError("did not raise")


def _rendered(event: dict) -> str:
    """The event as both log formats would write it."""
    return formatEventAsClassicLogText(event) + _json_line(event)


def _event(failure: Failure | None = None, **fields) -> dict:
    event = {"log_format": "operation failed: {error}", "log_level": None, "log_namespace": "test", "log_time": 0.0}
    if failure is not None:
        event["log_failure"] = failure
    event.update(fields)
    return event


def test_failure_messages_that_may_hold_data_are_withheld():
    """A KeyError naming a user id, a ValueError quoting input: type and frames stay, the message goes."""
    user_id = str(uuid.uuid4())
    for raising in (lambda: {}[user_id], lambda: int(SECRET)):
        failure = _failure_of(raising)
        event = _event(failure, error=failure.value)
        redact_event(event, log_client_addresses=False)
        text = _rendered(event)
        assert user_id not in text and SECRET not in text
        assert "(message withheld from the log)" in text and "_failure_of" in text
        assert event["log_failure"].check(KeyError, ValueError)


def test_program_errors_keep_their_messages():
    """ConstructError, OSError and AttributeError messages describe the program and stay readable."""
    for error in (ConstructError("SERVICE_UNAVAILABLE", "Redis is unavailable"), TimeoutError("no Redis reply in 3s"),
                  AttributeError("'NoneType' object has no attribute 'x'")):
        event = _event(_failure_of(lambda: (_ for _ in ()).throw(error)), error=error)
        redact_event(event, log_client_addresses=False)
        assert str(error) in _rendered(event)


def test_sqlite_errors_keep_only_their_name_unless_operational():
    """A constraint error keeps SQLite's error name only; an operational one (locked, I/O) its message."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE users (name TEXT UNIQUE)")
    conn.execute("INSERT INTO users VALUES ('a')")
    failure = _failure_of(lambda: conn.execute("INSERT INTO users VALUES ('a')"))
    event = _event(failure, error=failure.value)
    redact_event(event, log_client_addresses=False)
    text = _rendered(event)
    assert "users.name" not in text and "SQLITE_CONSTRAINT_UNIQUE" in text
    locked = sqlite3.OperationalError("database is locked")
    event = _event(error=locked)
    redact_event(event, log_client_addresses=False)
    assert "database is locked" in _rendered(event)


def test_postgres_error_quoting_a_value_is_withheld(postgres_url):
    """psycopg2 quotes the offending value ('invalid input syntax … "zed-…"'): only the SQLSTATE is logged."""
    conn = psycopg2.connect(postgres_url)
    try:
        failure = _failure_of(lambda: conn.cursor().execute("SELECT %s::integer", (SECRET,)))
    finally:
        conn.close()
    assert SECRET in failure.getTraceback()
    event = _event(failure, error=failure.value)
    redact_event(event, log_client_addresses=False)
    text = _rendered(event)
    assert SECRET not in text and "SQLSTATE 22P02" in text


def test_postgres_connection_errors_keep_their_messages():
    """libpq's own errors (no SQLSTATE) say why the database is unreachable, and name no user data."""
    failure = _failure_of(lambda: psycopg2.connect("postgresql://127.0.0.1:1/none", connect_timeout=2))
    event = _event(failure, error=failure.value)
    redact_event(event, log_client_addresses=False)
    assert "withheld" not in _rendered(event) and "127.0.0.1" in _rendered(event)


def test_tracebacks_never_carry_local_variables():
    """A failure captured with its variables (Deferred debug mode) loses them in the log."""
    def leak():
        password = PASSWORD  # noqa: F841
        raise RuntimeError("boom")

    try:
        leak()
    except RuntimeError:
        failure = Failure(captureVars=True)
    assert PASSWORD in failure.getTraceback(detail="verbose")
    event = _event(failure)
    redact_event(event, log_client_addresses=False)
    assert PASSWORD not in event["log_failure"].getTraceback(detail="verbose")


def test_client_addresses_are_withheld_unless_asked_for():
    """Twisted's and Autobahn's `peer`, our `client`, and a legacy event's system lose the address by default."""
    fields = {"log_format": "dropping connection to peer {peer}; user from {client}", "peer": "tcp4:203.0.113.7:5555",
              "client": "203.0.113.7", "log_system": "HTTPChannel,3,203.0.113.7", "system": "HTTPChannel,3,203.0.113.7"}
    withheld = _event(**fields)
    redact_event(withheld, log_client_addresses=False)
    assert "203.0.113.7" not in _rendered(withheld) + withheld["system"]
    assert ADDRESS_WITHHELD in _rendered(withheld) and withheld["system"] == "HTTPChannel,3,-"
    kept = _event(**fields)
    redact_event(kept, log_client_addresses=True)
    assert _rendered(kept).count("203.0.113.7") >= 2 and kept["system"] == fields["system"]


def test_the_filter_runs_before_observers_added_later():
    """Installed on a publisher before logging begins, the filter redacts what every later observer sees."""
    publisher = LogPublisher()
    install_privacy_filter(False, publisher)
    seen: list[dict] = []
    publisher.addObserver(seen.append)
    address = ".".join(["203", "0", "113", "7"])  # not spelled out: tracebacks quote this source line
    failure = _failure_of(lambda: {}[SECRET])
    publisher(_event(failure, error=failure.value, peer=f"tcp4:{address}:5555"))
    assert SECRET not in _rendered(seen[0]) and address not in _rendered(seen[0])
    install_privacy_filter(True, publisher)
    publisher(_event(peer=f"tcp4:{address}:5555", log_format="{peer}"))
    assert address in _rendered(seen[1])


def test_log_client_addresses_option():
    """--log-client-addresses is a flag, off by default; the environment says true or false."""
    def parsed(args, environ):
        options = Options(environ=environ)
        options.parseOptions(args)
        return options["log-client-addresses"]

    assert parsed([], {}) is False
    assert parsed(["--log-client-addresses"], {}) is True
    assert parsed([], {"CONSTRUCT_LOG_CLIENT_ADDRESSES": "true"}) is True
    assert parsed([], {"CONSTRUCT_LOG_CLIENT_ADDRESSES": "no"}) is False
    with pytest.raises(SystemExit, match="CONSTRUCT_LOG_CLIENT_ADDRESSES must be true or false"):
        parsed([], {"CONSTRUCT_LOG_CLIENT_ADDRESSES": "maybe"})


# No user enumeration


class CountingHasher:
    """run_blocking that runs inline and records which bcrypt function each call ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, fn, *args) -> defer.Deferred:
        self.calls.append(fn.__name__)
        return defer.maybeDeferred(fn, *args)

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_wrong_password_look_the_same(database, clock):
    """login: same error and the same bcrypt work for an unknown user (the very first one too) and a wrong password."""
    hasher = CountingHasher()
    core, _ = build_embedded(database, clock, make_options(), Metrics(), hasher)
    client = MemoryClient(core)
    reply = await client.request("register", {"username": "alice", "password": PASSWORD, "publicKey": make_bundle()})
    assert reply["type"] == "registerSuccess"
    assert hasher.take() == ["hashpw"]
    await client.request("logout")

    outcomes = {}
    for case, username, password in [
        ("first unknown user", "nobody", PASSWORD),
        ("wrong password", "alice", "Wrong-password-1"),
        ("unknown user", "nobody-else", "Wrong-password-1"),
        ("overlong password", "alice", "A1a" + "x" * 80),
        ("overlong, unknown", "nobody", "A1a" + "x" * 80),
    ]:
        error = await error_reply(MemoryClient(core), "login", {"username": username, "password": password})
        outcomes[case] = (error, hasher.take())
    first = outcomes["wrong password"]
    assert first == ({"code": "INVALID_CREDENTIALS", "message": "Invalid credentials"}, ["checkpw"])
    assert all(outcome == first for outcome in outcomes.values()), outcomes

    # Registering a taken name costs the hash a new one does, before the name is checked.
    taken = await error_reply(MemoryClient(core), "register", {"username": "alice", "password": PASSWORD, "publicKey": make_bundle()})
    assert (taken["code"], hasher.take()) == ("USERNAME_TAKEN", ["hashpw"])


@pytest_twisted.ensureDeferred
async def test_deleted_and_never_existing_users_look_the_same(core):
    """Key fetches and sends for a deleted account get exactly the errors of an id that never existed."""
    bob = MemoryClient(core)
    b = (await bob.request("register", {"username": "bob", "password": PASSWORD, "publicKey": make_bundle()}))["payload"]
    alice = MemoryClient(core)
    a = (await alice.request("register", {"username": "alice", "password": PASSWORD, "publicKey": make_bundle()}))["payload"]
    assert (await alice.request("deleteAccount", {"password": PASSWORD}))["type"] == "accountDeleted"

    for user_id in (a["userId"], str(uuid.uuid4())):
        assert await error_reply(bob, "getPublicKey", {"userId": user_id}) == {"code": "USER_NOT_FOUND", "message": "User not found"}
        assert await error_reply(bob, "sendMessage", chat_message(b["userId"], user_id)) == {
            "code": "USER_NOT_FOUND", "message": "User not found"}


def test_json_log_lines_are_json():
    """The JSON observer's lines stay parseable with a redacted failure."""
    event = _event(_failure_of(lambda: {}[SECRET]), error=None)
    redact_event(event, log_client_addresses=False)
    record = json.loads(_json_line(event))
    assert "traceback" in record and SECRET not in record["traceback"]


@pytest_twisted.ensureDeferred
async def test_an_acknowledged_message_leaves_nothing_that_pairs_its_sender_and_recipient(
    core_factory, backend, clock, tmp_path, request, redis_prefix
):
    """Once the recipient has acknowledged them, what the server still keeps of alice's messages
    to bob (the duplicate-send records) and of her sends and key fetches (the rate-limit
    counters) names neither alice nor bob's id beside the other: no who-writes-to-whom table in
    SQL or in Redis."""
    from tests.helpers import register
    from tests.privacy_scan import redis_client, redis_dump, redis_entries_mentioning, sql_rows_mentioning
    from tests.test_sealed_privacy import ACCOUNT_TABLES

    core = await core_factory()
    alice_client, alice = await register(core, "pairing-alice")
    bob_client, bob = await register(core, "pairing-bob")
    alice_id, bob_id = alice["userId"], bob["userId"]
    assert (await alice_client.request("getPublicKey", {"userId": bob_id}))["type"] != "error"
    ids = []
    for _ in range(3):
        message = chat_message(alice_id, bob_id)
        assert (await alice_client.request("sendMessage", message))["type"] == "ack"
        ids.append(message["id"])
    assert len(await core.messaging.ack(bob_id, ids)) == 3
    clock.advance(0)
    database = str(tmp_path / "construct.sqlite3") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    records = [row for table, row in sql_rows_mentioning(database, bob_id) if table == "sent_messages"]
    if backend != "redis":
        assert len(records) == 3  # kept for resends, with a digest for the sender
    rows = sql_rows_mentioning(database, alice_id)
    assert {table for table, _ in rows} <= ACCOUNT_TABLES, rows
    if backend == "redis":
        redis = await redis_client()
        try:
            dump = await redis_dump(redis, redis_prefix)
        finally:
            await redis.stop()
        assert any(key.endswith(":sent") and bob_id in key for key in dump)
        assert any(":limit:" in key and ":send:" in key for key in dump)
        # alice's own keys (presence) carry her id; nothing about her is under bob's, or in a counter.
        for key in redis_entries_mentioning(dump, alice_id):
            assert f"{{{alice_id}}}" in key and bob_id not in str(dump[key]), key
        assert not [key for key in dump if ":limit:" in key and (alice_id in key or bob_id in key)]
