"""Two people chat with the real `construct-chat` CLI through a real server, embedded and production.

Alice writes while Bob is offline; Bob comes back and gets everything decrypted, in order. While
the messages wait on the server, and again at the end, the test searches everything the server
keeps (the SQLite files, or the Redis keys and a dump of PostgreSQL, and the server's logs) for
the plaintexts and their base64, and finds none, while it does find the stored ciphertexts.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.helpers import PASSWORD
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


def _converse(tmp_path: Path, server: ServerProcess, inspect_pending) -> tuple[list[str], Chat, Chat]:
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
    inspect_pending([s["id"] for s in sent], texts)

    received = bob.ok("listen", "--count", str(len(texts)), "--timeout", "60")
    assert [(m["peer"], m["text"], m["status"]) for m in received] == [("alice", t, "received") for t in texts]
    assert [m["id"] for m in received] == [s["id"] for s in sent]

    reply = _secrets(1)
    assert bob.ok("send", "alice", reply[0])[0]["status"] == "sealed"
    assert [m["text"] for m in alice.ok("listen", "--once", "--timeout", "60")] == reply
    # Both see the same safety number; nothing is left to deliver.
    assert alice.ok("fingerprint", "bob")[0]["safetyNumber"] == bob.ok("fingerprint", "alice")[0]["safetyNumber"]
    nothing = bob.run("listen", "--count", "1", "--timeout", "1")
    assert nothing.returncode == 6, nothing.stderr
    for chat in (alice, bob):
        _assert_absent(chat.state.read_bytes(), texts + reply, f"{chat.name}'s encrypted state file")
    return texts + reply, alice, bob


def _files_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def test_embedded_server_stores_only_ciphertext(tmp_path):
    """Embedded mode: the chat works, and the SQLite files and the log never hold a plaintext."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    data = tmp_path / "data"

    def inspect_pending(message_ids: list[str], texts: list[str]) -> None:
        with sqlite3.connect(data / "construct.sqlite3") as db:
            envelopes = [json.loads(row[0]) for row in db.execute("SELECT envelope FROM inbox ORDER BY seq")]
        assert [e["id"] for e in envelopes] == message_ids
        stored = _files_bytes(data)
        for envelope in envelopes:
            assert envelope["content"].encode() in stored
        _assert_absent(stored, texts, "the SQLite files")

    try:
        texts, _, _ = _converse(tmp_path, server, inspect_pending)
    finally:
        server.stop()
    _assert_absent(_files_bytes(data), texts, "the SQLite files")
    log = server.log_path.read_bytes()
    assert b"listening on" in log
    _assert_absent(log, texts, "the server log")


def _redis(*args: str) -> str:
    host, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].split(":")
    result = subprocess.run(["redis-cli", "-h", host, "-p", port, *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _redis_contents(prefix: str) -> bytes:
    """Every key under the prefix with its value, whatever the type."""
    readers = {"string": ["GET"], "hash": ["HGETALL"], "zset": ["ZRANGE", "0", "-1", "WITHSCORES"],
               "list": ["LRANGE", "0", "-1"], "set": ["SMEMBERS"], "stream": ["XRANGE", "-", "+"]}
    out = []
    for key in _redis("--scan", "--pattern", f"{prefix}*").split():
        kind = _redis("TYPE", key).strip()
        if kind == "none":
            continue  # gone since the scan (a worker's lease expires, an acknowledged inbox is deleted)
        out.append(key + "\n" + _redis(readers[kind][0], key, *readers[kind][1:]))
    return "\n".join(out).encode()


def test_production_servers_store_only_ciphertext(tmp_path, postgres_url, redis_prefix):
    """Production mode: the chat works, Redis holds only ciphertext, PostgreSQL and the logs no plaintext."""
    common = ["--redis", REDIS_URL, "--redis-prefix", redis_prefix]
    server = ServerProcess(tmp_path, *common, "--database", postgres_url, "--bcrypt-cost", "4").start()
    worker = ServerProcess(
        tmp_path, *common, "--health", "tcp:0:interface=127.0.0.1", plugin="construct-worker", expect=("health",)
    ).start()

    def inspect_pending(message_ids: list[str], texts: list[str]) -> None:
        stored = _redis_contents(redis_prefix)
        for message_id in message_ids:
            assert message_id.encode() in stored
        assert stored.count(b'"content":') >= len(message_ids)
        _assert_absent(stored, texts, "Redis")
        dump = subprocess.run(["pg_dump", postgres_url], capture_output=True, timeout=30, check=True).stdout
        assert b"one_time_prekeys" in dump
        for message_id in message_ids:
            assert message_id.encode() not in dump, "a message reached PostgreSQL"
        _assert_absent(dump, texts, "PostgreSQL")

    try:
        texts, _, _ = _converse(tmp_path, server, inspect_pending)
        _assert_absent(_redis_contents(redis_prefix), texts, "Redis")
    finally:
        server.stop()
        worker.stop()
        subprocess.run(
            ["sh", "-c", f"redis-cli --scan --pattern '{redis_prefix}*' | xargs -r redis-cli DEL"], capture_output=True
        )
    for process in (server, worker):
        log = process.log_path.read_bytes()
        assert b"listening on" in log
        _assert_absent(log, texts, f"the {process.plugin} log")


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
