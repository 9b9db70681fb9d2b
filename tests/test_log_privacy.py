"""A real server's whole log, after traffic on every transport, holds none of the secrets that went through it.

Passwords (right, wrong, new), session tokens, key material, ciphertext, ephemeral keys,
password hashes, user ids, usernames and the clients' address (127.0.0.1) must all stay out of
it, in embedded and production mode, JSON and text format, errors included. With
--log-client-addresses the address appears where a connection authenticates.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import sqlite3
import uuid

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from construct.protocol import codec
from construct.storage.database import PostgresEngine, prepare_database
from tests.clients import HttpClient, TcpClient, WsClient
from tests.conftest import REDIS_URL
from tests.helpers import chat_message, make_bundle
from tests.privacy_scan import redis_client, redis_dump
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
# The one kind of line that may name 127.0.0.1: the server's own listening address at startup.
OWN_ADDRESS = re.compile(r"\w+ listening on [\d.]+:\d+")

# Production mode: registering a name starting with "trap" makes PostgreSQL fail with an error
# whose message quotes the new row's username and password hash, as a stand-in for any database
# error that carries data; the server answers SERVER_ERROR and logs the failure.
TRAP_TRIGGER = """
CREATE FUNCTION construct_test_trap() RETURNS trigger AS $$
BEGIN
  IF NEW.username LIKE 'trap%' THEN
    RAISE EXCEPTION 'refusing % with %', NEW.username, NEW.password_hash;
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER construct_test_trap BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION construct_test_trap();
"""


class Secrets:
    """Everything that must not reach the log, in the forms it could be written in."""

    def __init__(self) -> None:
        self.values: set[str] = set()

    def text(self, *values: str) -> None:
        self.values.update(value for value in values if value)

    def raw(self, *values: bytes) -> None:
        for value in values:
            self.text(base64.b64encode(value).decode(), value.hex())

    def bundle(self, bundle: dict) -> None:
        self.text(bundle["masterIdentityKey"], bundle["signature"], bundle["bundleData"])
        data = json.loads(base64.b64decode(bundle["bundleData"]))
        for suite in data["supportedSuites"]:
            self.text(suite["identityKey"], suite["signedPrekey"], *suite.get("oneTimePrekeys", []))
        for key in ("masterIdentityKey", "signature"):
            self.raw(base64.b64decode(bundle[key]))

    def session(self, payload: dict) -> dict:
        self.text(payload["sessionToken"], payload["userId"], payload["username"])
        return payload

    def message(self, sender: str, recipient: str) -> dict:
        message = chat_message(sender, recipient, content=base64.b64encode(os.urandom(48)).decode())
        self.text(message["content"], message["id"])
        self.raw(message["ephemeralPublicKey"])
        return message


def _b64(size: int = 32) -> str:
    return base64.b64encode(os.urandom(size)).decode()


def _prekeys(found: Secrets, first: int, count: int) -> list[dict]:
    prekeys = [{"keyId": first + i, "publicKey": _b64()} for i in range(count)]
    found.text(*(prekey["publicKey"] for prekey in prekeys))
    return prekeys


async def _reply(client, message_type: str, payload: dict | None = None) -> dict:
    """The reply to a request; message pushes that come first are kept for `_pushed`."""
    client.send(message_type, payload)
    while True:
        frame = await client.next()
        if frame["type"] != "message":
            return frame
        client.__dict__.setdefault("pushed", []).append(frame["payload"]["id"])


async def _pushed(client, count: int) -> set[str]:
    """The ids of the next `count` messages pushed to the client."""
    ids = client.__dict__.setdefault("pushed", [])
    while len(ids) < count:
        ids.append((await client.next_of("message"))["payload"]["id"])
    taken, ids[:] = ids[:count], ids[count:]
    return set(taken)


def _bad_websocket_handshake(port: int) -> None:
    """An upgrade Autobahn refuses: it logs a warning naming the peer."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        conn.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        conn.recv(1024)


async def _traffic(server: ServerProcess, found: Secrets, trap: bool) -> dict:
    """Register, log in (wrong, then right), fetch and upload keys, send, ack, rotate, change
    passwords, log out, delete accounts and send bad input, on WebSocket, TCP and HTTP."""
    tag = secrets.token_hex(4)
    names = {who: f"zq{tag}-{who}" for who in ("alice", "bob", "carol", "nobody")}
    passwords = {who: f"Pw{secrets.token_hex(8)}" for who in ("alice", "bob", "carol", "alice2", "carol2")}
    wrong = f"Wrong{secrets.token_hex(8)}9"
    found.text(*names.values(), *passwords.values(), wrong)
    ws = await WsClient.connect(server.ports["http"], codec.MSGPACK)
    ws_json = await WsClient.connect(server.ports["http"], codec.JSON)
    tcp = await TcpClient.connect(server.ports["tcp"])
    http = HttpClient(server.ports["http"])
    try:
        # Registration, with one-time prekeys inside the first bundle too.
        bundle = make_bundle(supportedSuites=[{"suiteId": 1, "identityKey": _b64(), "signedPrekey": _b64(),
                                               "oneTimePrekeys": [_b64(), _b64()]}])
        found.bundle(bundle)
        alice = found.session((await ws.request(
            "register", {"username": names["alice"], "password": passwords["alice"], "publicKey": bundle}))["payload"])
        bundle = make_bundle()
        found.bundle(bundle)
        bob = found.session((await tcp.request(
            "register", {"username": names["bob"], "password": passwords["bob"], "publicKey": bundle}))["payload"])
        bundle = make_bundle()
        found.bundle(bundle)
        status, carol = await http.call(
            "POST", "/v1/accounts", {"username": names["carol"], "password": passwords["carol"], "publicKey": bundle})
        assert status == 201, carol
        found.session(carol)

        # Logins: an unknown user, a wrong password, then the right one.
        assert (await ws_json.request("login", {"username": names["nobody"], "password": wrong}))["type"] == "error"
        assert (await tcp.request("login", {"username": names["bob"], "password": wrong}))["type"] == "error"
        bob = found.session((await tcp.request("login", {"username": names["bob"], "password": passwords["bob"]}))["payload"])
        assert (await http.call("POST", "/v1/sessions", {"username": names["carol"], "password": wrong}))[0] == 401
        status, carol = await http.call("POST", "/v1/sessions", {"username": names["carol"], "password": passwords["carol"]})
        http.token = found.session(carol)["sessionToken"]

        # Keys: uploads, fetches (which hand out one-time prekeys), a rotation, lookups.
        assert (await _reply(ws, "uploadPrekeys", {"prekeys": _prekeys(found, 10, 5)}))["type"] == "prekeysUploaded"
        assert (await http.call("POST", "/v1/keys/prekeys", {"prekeys": _prekeys(found, 1, 3)}))[0] == 200
        fetched = await _reply(tcp, "getPublicKey", {"userId": alice["userId"]})
        assert fetched["type"] == "publicKeyBundle" and fetched["payload"]["oneTimePrekey"], fetched
        status, fetched = await http.call("GET", f"/v1/keys/{alice['userId']}")
        assert status == 200 and fetched["oneTimePrekey"]
        rotated = make_bundle(alice["userId"])
        found.bundle(rotated)
        assert (await _reply(ws, "rotatePrekey", {"update": rotated}))["type"] == "error"  # another master key
        assert (await _reply(tcp, "lookupUser", {"username": names["alice"]}))["type"] == "userFound"
        assert (await http.call("GET", f"/v1/users/{names['bob']}"))[0] == 200

        # Messages on each transport, delivered live or fetched, and acknowledged.
        sent = [found.message(bob["userId"], alice["userId"]), found.message(alice["userId"], bob["userId"]),
                found.message(carol["userId"], alice["userId"])]
        assert (await _reply(tcp, "sendMessage", sent[0]))["type"] == "ack"
        assert (await _reply(ws, "sendMessage", sent[1]))["type"] == "ack"
        status, _ = await http.call("POST", "/v1/messages", dict(sent[2], ephemeralPublicKey=_as_b64(sent[2])))
        assert status == 200
        received = await _pushed(ws, 2)
        assert received == {sent[0]["id"], sent[2]["id"]}
        ws.send("ackMessage", {"messageIds": sorted(received)})
        assert await _pushed(tcp, 1) == {sent[1]["id"]}
        tcp.send("ackMessage", {"messageIds": [sent[1]["id"]]})
        assert (await http.call("GET", "/v1/messages"))[0] == 200
        assert (await http.call("POST", "/v1/messages/ack", {"messageIds": [str(uuid.uuid4())]}))[0] == 204

        # Password changes and logouts.
        change = {"oldPassword": passwords["alice"], "newPassword": passwords["alice2"], "newPasswordConfirm": passwords["alice2"]}
        assert (await _reply(ws, "changePassword", change))["type"] == "changePasswordSuccess"
        change = {"oldPassword": passwords["carol"], "newPassword": passwords["carol2"], "newPasswordConfirm": passwords["carol2"]}
        assert (await http.call("PUT", "/v1/accounts/current/password", change))[0] == 204
        assert (await _reply(tcp, "logout"))["type"] == "logoutSuccess"

        # Bad input of every kind.
        bogus_token = secrets.token_urlsafe(32)
        found.text(bogus_token)
        tcp.send_raw(b"this is not json\n")
        tcp.send_raw(b'{"type": "login", "payload": {"username": 7, "password": ["' + wrong.encode() + b'"]}}\n')
        assert [(await tcp.next())["type"] for _ in range(2)] == ["error", "error"]
        assert (await tcp.request("connect", {"sessionToken": bogus_token}))["type"] == "sessionExpired"
        ws.send_raw(b"\xc1\xff" + wrong.encode(), True)
        assert (await ws.next())["type"] == "error"
        bad_bundle = dict(make_bundle(), signature=_b64(64))
        found.bundle(bad_bundle)
        assert (await ws_json.request("register", {"username": f"zq{tag}-dave", "password": wrong, "publicKey": bad_bundle}))["type"] == "error"
        nobody_id = str(uuid.uuid4())
        found.text(nobody_id)
        refused = await _reply(ws, "sendMessage", found.message(alice["userId"], nobody_id))
        assert refused["payload"]["code"] == "USER_NOT_FOUND", refused
        assert (await _reply(ws, "getPublicKey", {"userId": nobody_id}))["payload"]["code"] == "USER_NOT_FOUND"
        assert (await http.call("GET", "/v1/keys/prekeys/count", token=bogus_token))[0] == 401
        assert (await http.call("POST", "/v1/messages", raw=b'{"content": "' + wrong.encode() + b'"')) [0] == 400
        _bad_websocket_handshake(server.ports["http"])
        if trap:
            trapped = await ws_json.request(
                "register", {"username": f"trap{tag}", "password": passwords["bob"], "publicKey": make_bundle()})
            assert trapped["payload"]["code"] == "SERVER_ERROR", trapped
            found.text(f"trap{tag}")

        # Deletions: over WebSocket with the current password, and over HTTP.
        assert (await _reply(ws, "deleteAccount", {"password": passwords["alice2"]}))["type"] == "accountDeleted"
        assert await http.call("DELETE", "/v1/accounts/current", {"password": passwords["carol2"]}) == (204, None)
        return {"bob": bob["userId"]}
    finally:
        for client in (ws, ws_json, tcp):
            await client.close()


def _as_b64(message: dict) -> str:
    return base64.b64encode(message["ephemeralPublicKey"]).decode()


def _password_hash(database: str, user_id: str) -> str:
    conn = psycopg2.connect(database) if database.startswith("postgres") else sqlite3.connect(database)
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT password_hash FROM users WHERE id = " + ("%s" if database.startswith("postgres") else "?"), (user_id,))
        return cursor.fetchone()[0]
    finally:
        conn.close()


def _leaks(log: str, found: Secrets) -> list[str]:
    leaked = sorted(secret for secret in found.values if secret in log or secret.lower() in log.lower())
    if LOOPBACK in OWN_ADDRESS.sub("", log):
        leaked.append(LOOPBACK)
    return leaked


@pytest.mark.parametrize("mode, log_format", [("embedded", "json"), ("embedded", "text"), ("production", "json")])
@pytest_twisted.ensureDeferred
async def test_the_log_holds_no_secrets(mode, log_format, tmp_path, request):
    """Traffic on WebSocket, TCP and HTTP, errors included: not one secret, id, name or client address in the log."""
    args = ["--bcrypt-cost", "4", "--log-format", log_format]
    processes = []
    if mode == "embedded":
        database = str(tmp_path / "data" / "construct.sqlite3")
        args += ["--data-dir", str(tmp_path / "data")]
    else:
        database = request.getfixturevalue("postgres_url")
        prefix = request.getfixturevalue("redis_prefix")
        prepare_database(PostgresEngine(database))
        conn = psycopg2.connect(database)
        with conn, conn.cursor() as cursor:
            cursor.execute(TRAP_TRIGGER)
        conn.close()
        redis_args = ["--redis", REDIS_URL, "--redis-prefix", prefix, "--log-format", log_format]
        args += ["--database", database, *redis_args]
        processes.append(ServerProcess(tmp_path, *redis_args, "--health", "tcp:0:interface=127.0.0.1",
                                       plugin="construct-worker", expect=("health",)))
    server = ServerProcess(tmp_path, *args)
    processes.insert(0, server)
    found = Secrets()
    try:
        for process in processes:
            await process.start_async()
        ids = await _traffic(server, found, trap=mode == "production")
        found.text(_password_hash(database, ids["bob"]))
        await task.deferLater(reactor, 0.3, lambda: None)
    finally:
        for process in processes:
            process.stop()
        if mode == "production":
            redis = await redis_client()
            dump = await redis_dump(redis, prefix)
            if dump:
                await redis.execute("DEL", *dump)
            await redis.stop()

    logs = {process.plugin: process.log_text() for process in processes}
    log = "\n".join(logs.values())
    assert "authenticated on a" in log and "failing WebSocket opening handshake" in log, log
    if log_format == "json":
        for line in filter(None, log.splitlines()):
            assert line.startswith("{") and json.loads(line), line
    if mode == "production":
        # The trap's failure was logged, as a traceback without its message.
        assert "SQLSTATE P0001" in log and "RaiseException" in log, log
    assert len(found.values) > 60
    assert _leaks(log, found) == [], log


@pytest_twisted.ensureDeferred
async def test_client_addresses_are_logged_when_asked_for(tmp_path):
    """--log-client-addresses: the address appears where a connection authenticates and where Autobahn drops one."""
    server = ServerProcess(tmp_path, "--bcrypt-cost", "4", "--log-client-addresses", "--data-dir", str(tmp_path / "data"))
    found = Secrets()
    try:
        await server.start_async()
        tcp = await TcpClient.connect(server.ports["tcp"])
        bundle = make_bundle()
        found.bundle(bundle)
        username, password = f"zq{secrets.token_hex(4)}-erin", f"Pw{secrets.token_hex(8)}"
        found.text(username, password)
        found.session((await tcp.request("register", {"username": username, "password": password, "publicKey": bundle}))["payload"])
        _bad_websocket_handshake(server.ports["http"])
        await tcp.close()
        await task.deferLater(reactor, 0.3, lambda: None)
    finally:
        server.stop()
    log = server.log_text()
    assert re.search(r"authenticated on a tcp connection from 127\.0\.0\.1\b", log), log
    assert re.search(r"dropping connection to peer tcp4:127\.0\.0\.1:\d+", log), log
    found.values.discard(LOOPBACK)
    assert [secret for secret in found.values if secret in log] == []
