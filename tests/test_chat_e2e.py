"""Two people chat with the real `construct-chat` CLI through a real server, embedded and production.

Alice writes while Bob is offline; Bob comes back and gets everything decrypted, in order. While
the messages wait on the server, and again at the end, the test searches everything the server
keeps (the SQLite files, or the Redis keys and a dump of PostgreSQL, and the server's logs) for
the plaintexts and their base64, and finds none, while it does find the stored ciphertexts.

The messages go sealed: the same capture shows the recipient's id and the size of each
ciphertext, and no form of the sender's id, name or identity keys outside her own account's
records (and in the JSON log, nowhere); a third user without Bob's access key cannot send him
a sealed message.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from construct.client import account
from construct.client.state import load_state
from construct.core.certificates import certificate_body
from tests.conftest import REDIS_URL
from tests.helpers import PASSWORD, make_bundle
from tests.privacy_scan import redis_entries_mentioning, sql_rows_mentioning
from tests.processes import REPO, ServerProcess, process_env

pytestmark = pytest.mark.integration

PASSPHRASE = "state file passphrase"


class Chat:
    """One person's `construct-chat`, run as a separate process with its own state file."""

    def __init__(self, tmp_path: Path, name: str, server: str) -> None:
        self.name = name
        self.state = tmp_path / f"{name}.state"
        self.server = server
        self.env = process_env(
            CONSTRUCT_CHAT_PASSPHRASE=PASSPHRASE, CONSTRUCT_CHAT_PASSWORD=PASSWORD, CONSTRUCT_CHAT_KDF_COST="interactive"
        )

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "construct.client", "--server", self.server, "--state", str(self.state),
                   "--json", *args]
        # A new session has no controlling terminal, so a missing secret fails instead of prompting.
        return subprocess.run(
            command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )

    def ok(self, *args: str) -> list[dict]:
        result = self.run(*args)
        assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
        return [json.loads(line) for line in result.stdout.splitlines()]


def _needles(texts: list[str]) -> list[bytes]:
    """Each plaintext as bytes and in base64, the forms a leak would most likely take."""
    forms = []
    for text in texts:
        raw = text.encode()
        forms += [raw, base64.b64encode(raw)]
    return forms


def _assert_absent(haystack: bytes, texts: list[str], where: str) -> None:
    for needle in _needles(texts):
        assert needle not in haystack, f"{needle!r} found in {where}"


def _secrets(count: int) -> list[str]:
    # Unique and long enough that a hit can only be a leak.
    return [f"secret {i} {uuid.uuid4().hex} meet at the old mill" for i in range(count)]


class Sealed:
    """What the sealed messages of a conversation must show, and must not, to whoever reads the server."""

    def __init__(self, alice: Chat, bob_id: str) -> None:
        me = alice.ok("whoami")[0]
        self.sender_id, self.recipient_id = me["userId"], bob_id
        dh_key = account.identity(load_state(alice.state, PASSPHRASE)).dh_public
        master = base64.b64decode(me["masterIdentityKey"])
        self.sender = [me["userId"], me["userId"].replace("-", ""), me["username"],
                       me["masterIdentityKey"], master.hex(), base64.b64encode(dh_key).decode(), dh_key.hex()]
        # The bytes the server sees of each: a sealed box (48) around version, key id, certificate
        # length (7), the certificate and its signature (64), ratchet key, N and timestamp (44),
        # and an initial ratchet message (149 + a 256-byte bucket): Alice has not heard from Bob yet.
        certificate = certificate_body(1, me["userId"], me["masterIdentityKey"], 1_000_000_000)
        self.size = 48 + 7 + len(certificate) + 64 + 44 + 149 + 256

    def check_envelopes(self, envelopes: list[dict], message_ids: list[str]) -> None:
        """The recipient's id and the ciphertext sizes, and not the sender."""
        assert [e["id"] for e in envelopes] == message_ids
        for envelope in envelopes:
            assert set(envelope) == {"id", "to", "sealed", "content", "acceptedAt"}, envelope
            assert envelope["to"] == self.recipient_id and envelope["sealed"] is True
            assert len(base64.b64decode(envelope["content"])) == self.size
            self.check_absent(json.dumps(envelope).encode(), "a stored envelope")

    def check_absent(self, haystack: bytes, where: str) -> None:
        for needle in self.sender:
            assert needle.encode().lower() not in haystack.lower(), f"the sender's {needle!r} found in {where}"


def _third_user_cannot_send_sealed(server: ServerProcess, bob_id: str) -> None:
    """Carol has an account but not Bob's access key: from an anonymous connection she gets the
    one refusal, with no key and with a guessed one, as a stranger to the server would."""
    def request(lines, message_type: str, payload: dict) -> dict:
        lines.write(json.dumps({"type": message_type, "payload": payload}) + "\n")
        lines.flush()
        return json.loads(lines.readline())

    with socket.create_connection(("127.0.0.1", server.ports["tcp"]), timeout=10) as registration:
        reply = request(registration.makefile("rw"), "register",
                        {"username": "carol", "password": PASSWORD, "publicKey": make_bundle()})
        assert reply["type"] == "registerSuccess", reply
    with socket.create_connection(("127.0.0.1", server.ports["tcp"]), timeout=10) as anonymous:
        lines = anonymous.makefile("rw")
        for key in ({}, {"accessKey": base64.b64encode(os.urandom(16)).decode()}):
            content = base64.b64encode(os.urandom(600)).decode()
            payload = {"id": str(uuid.uuid4()), "to": bob_id, "content": content, **key}
            reply = request(lines, "sendSealed", payload)
            assert reply["payload"]["code"] == "UNIDENTIFIED_ACCESS_DENIED", reply


def _converse(tmp_path: Path, server: ServerProcess, inspect_pending) -> tuple[list[str], Chat, Chat, Sealed]:
    """Register, send while the recipient is offline, check the server's storage, receive, reply."""
    alice = Chat(tmp_path, "alice", f"ws://127.0.0.1:{server.ports['http']}/ws")
    bob = Chat(tmp_path, "bob", f"tcp://127.0.0.1:{server.ports['tcp']}")
    registered = {chat.name: chat.ok("register", chat.name)[0] for chat in (alice, bob)}
    assert registered["bob"]["event"] == "registered"

    texts = _secrets(4)
    sent = [alice.ok("send", "bob", text)[0] for text in texts]
    # Bob's bundle gave Alice his access key: sealed, so the ack says nothing of Bob's presence.
    assert [s["status"] for s in sent] == ["sealed"] * len(texts)
    assert {s["toUserId"] for s in sent} == {registered["bob"]["userId"]}
    sealed = Sealed(alice, registered["bob"]["userId"])
    inspect_pending([s["id"] for s in sent], texts, sealed)
    _third_user_cannot_send_sealed(server, sealed.recipient_id)

    received = bob.ok("listen", "--count", str(len(texts)), "--timeout", "60")
    assert [(m["peer"], m["text"], m["status"], m.get("sealed")) for m in received] == [
        ("alice", t, "received", True) for t in texts
    ]
    assert [m["id"] for m in received] == [s["id"] for s in sent]

    reply = _secrets(1)
    assert bob.ok("send", "alice", reply[0])[0]["status"] == "sealed"
    assert [(m["text"], m.get("sealed")) for m in alice.ok("listen", "--once", "--timeout", "60")] == [(reply[0], True)]
    # Both see the same safety number; nothing is left to deliver.
    assert alice.ok("fingerprint", "bob")[0]["safetyNumber"] == bob.ok("fingerprint", "alice")[0]["safetyNumber"]
    nothing = bob.run("listen", "--count", "1", "--timeout", "1")
    assert nothing.returncode == 6, nothing.stderr
    for chat in (alice, bob):
        _assert_absent(chat.state.read_bytes(), texts + reply, f"{chat.name}'s encrypted state file")
    return texts + reply, alice, bob, sealed


# The sender's own account: these rows are about her, not about any message.
ACCOUNT_TABLES = {"users", "sessions", "key_bundles", "one_time_prekeys", "unidentified_access"}


def _files_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def test_embedded_server_stores_only_ciphertext(tmp_path):
    """Embedded mode: the chat works, the SQLite files and the log never hold a plaintext, and
    the sealed messages waiting show their recipient and sizes, never their sender."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--log-format", "json").start()
    data = tmp_path / "data"
    database = str(data / "construct.sqlite3")

    def inspect_pending(message_ids: list[str], texts: list[str], sealed: Sealed) -> None:
        with sqlite3.connect(database) as db:
            rows = db.execute("SELECT recipient_id, envelope FROM inbox ORDER BY seq").fetchall()
            digests = [row[0] for row in db.execute("SELECT sender_digest FROM sent_messages")]
        assert {row[0] for row in rows} == {sealed.recipient_id}
        # In place of a sender, each record keeps a digest of its own.
        assert len(set(digests)) == len(digests) == len(rows) and all(len(d) == 32 for d in digests)
        envelopes = [json.loads(row[1]) for row in rows]
        sealed.check_envelopes(envelopes, message_ids)
        found = sql_rows_mentioning(database, *sealed.sender)
        assert found and {table for table, _ in found} <= ACCOUNT_TABLES, found
        assert not [row for _, row in found if sealed.recipient_id in str(row)], found
        stored = _files_bytes(data)
        for envelope in envelopes:
            assert envelope["content"].encode() in stored
        _assert_absent(stored, texts, "the SQLite files")

    try:
        texts, _, _, sealed = _converse(tmp_path, server, inspect_pending)
    finally:
        server.stop()
    assert stat.S_IMODE(os.stat(data / "sender-certificate-keys.json").st_mode) == 0o600
    _assert_absent(_files_bytes(data), texts, "the SQLite files")
    log = server.log_path.read_bytes()
    assert b"listening on" in log and log.startswith(b"{")
    _assert_absent(log, texts, "the server log")
    sealed.check_absent(log, "the server log")


def _redis(*args: str) -> str:
    host, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].split(":")
    result = subprocess.run(["redis-cli", "-h", host, "-p", port, *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _redis_entries(prefix: str) -> dict[str, str]:
    """Every key under the prefix with its value (as redis-cli prints it), whatever the type."""
    readers = {"string": ["GET"], "hash": ["HGETALL"], "zset": ["ZRANGE", "0", "-1", "WITHSCORES"],
               "list": ["LRANGE", "0", "-1"], "set": ["SMEMBERS"], "stream": ["XRANGE", "-", "+"]}
    entries = {}
    for key in _redis("--scan", "--pattern", f"{prefix}*").split():
        kind = _redis("TYPE", key).strip()
        if kind == "none":
            continue  # gone since the scan (a worker's lease expires, an acknowledged inbox is deleted)
        entries[key] = _redis(readers[kind][0], key, *readers[kind][1:])
    return entries


def _redis_contents(prefix: str) -> bytes:
    return "\n".join(f"{key}\n{value}" for key, value in _redis_entries(prefix).items()).encode()


def test_production_servers_store_only_ciphertext(tmp_path, postgres_url, redis_prefix):
    """Production mode: the chat works, Redis holds only ciphertext, PostgreSQL and the logs no
    plaintext; the sealed messages waiting in Redis show their recipient and sizes, and the
    sender only in records of her own."""
    common = ["--redis", REDIS_URL, "--redis-prefix", redis_prefix, "--log-format", "json"]
    server = ServerProcess(tmp_path, *common, "--database", postgres_url, "--bcrypt-cost", "4").start()
    worker = ServerProcess(
        tmp_path, *common, "--health", "tcp:0:interface=127.0.0.1", plugin="construct-worker", expect=("health",)
    ).start()

    def inspect_pending(message_ids: list[str], texts: list[str], sealed: Sealed) -> None:
        entries = _redis_entries(redis_prefix)
        stored = _redis_contents(redis_prefix)
        for message_id in message_ids:
            assert message_id.encode() in stored
        assert stored.count(b'"content":') >= len(message_ids)
        _assert_absent(stored, texts, "Redis")
        inbox = f"{redis_prefix}{{{sealed.recipient_id}}}"
        ids = _redis("ZRANGE", f"{inbox}:inbox", "0", "-1").split()
        sealed.check_envelopes([json.loads(_redis("HGET", f"{inbox}:msgs", i)) for i in ids], message_ids)
        digests = [record.split(" ")[0] for record in _redis("HVALS", f"{inbox}:sent").split("\n") if record]
        assert len(set(digests)) == len(digests) == len(ids) and all(len(d) == 32 for d in digests)
        mentioning = redis_entries_mentioning(entries, *sealed.sender)
        assert all(f"{{{sealed.sender_id}}}" in key for key in mentioning), mentioning
        # Not even the rate-limit counter of Alice's fetch of Bob's bundle names them both.
        assert not redis_entries_mentioning(mentioning, sealed.recipient_id), mentioning
        dump = subprocess.run(["pg_dump", postgres_url], capture_output=True, timeout=30, check=True).stdout
        assert b"one_time_prekeys" in dump and b"unidentified_access" in dump and b"sealed:" not in dump
        for message_id in message_ids:
            assert message_id.encode() not in dump, "a message reached PostgreSQL"
        _assert_absent(dump, texts, "PostgreSQL")

    try:
        texts, _, _, sealed = _converse(tmp_path, server, inspect_pending)
        _assert_absent(_redis_contents(redis_prefix), texts, "Redis")
    finally:
        server.stop()
        worker.stop()
        subprocess.run(
            ["sh", "-c", f"redis-cli --scan --pattern '{redis_prefix}*' | xargs -r redis-cli DEL"], capture_output=True
        )
    for process in (server, worker):
        log = process.log_path.read_bytes()
        assert b"listening on" in log and log.startswith(b"{")
        _assert_absent(log, texts, f"the {process.plugin} log")
        sealed.check_absent(log, f"the {process.plugin} log")


def test_exit_statuses_and_json_errors(tmp_path):
    """Scripts can tell usage, authentication and network failures apart, with --json errors on stderr."""
    from construct.client import account
    from construct.client.cli import KDF_COSTS
    from construct.client.state import save_state

    state = account.new_state("ws://127.0.0.1:1/ws", 1_800_000_000)
    account.set_account(state, {"userId": str(uuid.uuid4()), "username": "alice", "sessionToken": "t", "expires": 0})
    save_state(tmp_path / "alice.state", PASSPHRASE, state, KDF_COSTS["interactive"])
    chat = Chat(tmp_path, "alice", "ws://127.0.0.1:1/ws")

    def error(result: subprocess.CompletedProcess) -> str:
        return json.loads(result.stderr.strip().splitlines()[-1])["error"]["code"]

    assert chat.run("send").returncode == 1
    assert chat.run("listen", "--count", "0").returncode == 1
    whoami = chat.ok("whoami")[0]
    assert (whoami["username"], whoami["server"]) == ("alice", "ws://127.0.0.1:1/ws")
    unreachable = chat.run("send", "bob", "hello")
    assert (unreachable.returncode, error(unreachable)) == (3, "NETWORK")
    chat.env["CONSTRUCT_CHAT_PASSPHRASE"] = "not the passphrase"
    wrong = chat.run("whoami")
    assert (wrong.returncode, error(wrong)) == (2, "WRONG_PASSPHRASE")
    chat.state = tmp_path / "nobody.state"
    missing = chat.run("whoami")
    assert (missing.returncode, error(missing)) == (1, "NO_STATE")
    chat.state = tmp_path / "alice.state"
    del chat.env["CONSTRUCT_CHAT_PASSPHRASE"]
    unattended = chat.run("whoami")
    assert unattended.returncode == 1 and "CONSTRUCT_CHAT_PASSPHRASE" in unattended.stderr
