"""construct-admin against real servers: migrate, user show, user delete, stats, in both modes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import pytest_twisted

from tests.clients import TcpClient
from tests.conftest import REDIS_URL
from tests.helpers import PASSWORD, chat_message, make_bundle
from tests.processes import ServerProcess, process_env

pytestmark = pytest.mark.integration


def admin(cwd, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "construct.admin", *args], cwd=cwd, env=process_env(**(env or {})),
        capture_output=True, text=True, timeout=60,
    )


async def _register(client, username: str) -> dict:
    reply = await client.request("register", {"username": username, "password": PASSWORD, "publicKey": make_bundle()})
    assert reply["type"] == "registerSuccess", reply
    return reply["payload"]


@pytest.mark.parametrize("mode", ["embedded", "production"])
@pytest_twisted.ensureDeferred
async def test_admin_shows_counts_and_deletes_a_user(mode, tmp_path, request):
    """user show and stats report what the server stored; user delete removes account, keys, sessions and inbox."""
    if mode == "embedded":
        settings = {"CONSTRUCT_DATA_DIR": str(tmp_path / "data")}
    else:
        settings = {
            "CONSTRUCT_DATABASE": request.getfixturevalue("postgres_url"),
            "CONSTRUCT_REDIS": REDIS_URL,
            "CONSTRUCT_REDIS_PREFIX": request.getfixturevalue("redis_prefix"),
        }
    migrated = admin(tmp_path, "--json", "migrate", env=settings)
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout)["schemaVersion"] >= 1
    server = ServerProcess(tmp_path, "--bcrypt-cost", "4", env=settings).start()
    try:
        alice = await TcpClient.connect(server.ports["tcp"])
        bob = await TcpClient.connect(server.ports["tcp"])
        a = await _register(alice, "alice")
        b = await _register(bob, "bob")
        await alice.request("logout")
        for _ in range(3):
            assert (await bob.request("sendMessage", chat_message(b["userId"], a["userId"])))["type"] == "ack"

        shown = admin(tmp_path, "--json", "user", "show", "ALICE", env=settings)
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        assert (record["userId"], record["username"], record["pendingMessages"]) == (a["userId"], "alice", 3)
        # People read dates; JSON keeps unix seconds.
        assert abs(record["createdAt"] - time.time()) < 600
        human = admin(tmp_path, "user", "show", "alice", env=settings).stdout
        created = datetime.fromtimestamp(record["createdAt"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        assert f"createdAt: {created}" in human and str(record["createdAt"]) not in human
        stats = json.loads(admin(tmp_path, "--json", "stats", env=settings).stdout)
        assert stats["users"] == 2 and stats["pendingMessages"] == 3 and stats["keyBundles"] == 2

        assert admin(tmp_path, "user", "delete", "alice", env=settings).returncode == 1, "needs --yes without a terminal"
        deleted = admin(tmp_path, "user", "delete", "--yes", "alice", env=settings)
        assert deleted.returncode == 0 and a["userId"] in deleted.stdout
        assert admin(tmp_path, "user", "show", "alice", env=settings).returncode == 1
        stats = json.loads(admin(tmp_path, "--json", "stats", env=settings).stdout)
        assert stats["users"] == 1 and stats["pendingMessages"] == 0

        again = await TcpClient.connect(server.ports["tcp"])
        assert (await again.request("login", {"username": "alice", "password": PASSWORD}))["payload"]["code"] == "INVALID_CREDENTIALS"
        assert (await bob.request("getPublicKey", {"userId": a["userId"]}))["payload"]["code"] == "USER_NOT_FOUND"
        refused = await bob.request("sendMessage", chat_message(b["userId"], a["userId"]))
        assert refused["payload"]["code"] == "USER_NOT_FOUND"
        for client in (alice, bob, again):
            await client.close()
    finally:
        server.stop()


def test_admin_errors_are_one_line(tmp_path):
    """Usage mistakes and an unreachable database give a clear message and a non-zero exit."""
    missing = admin(tmp_path)
    assert missing.returncode != 0 and "a command is required" in missing.stderr
    unreachable = admin(tmp_path, "stats", env={"CONSTRUCT_DATABASE": "postgresql://127.0.0.1:1/none"})
    assert unreachable.returncode != 0 and "Traceback" not in unreachable.stderr
    assert "cannot use the PostgreSQL" in unreachable.stderr.strip().splitlines()[-1]
    fresh = admin(tmp_path, "stats", env={"CONSTRUCT_DATA_DIR": str(tmp_path / "empty")})
    assert fresh.returncode != 0 and "construct-admin migrate" in fresh.stderr
