"""`construct-admin`: migrate the schema, show or delete a user, print counts, print the obfs4 bridge line,
show or rotate the keys that sign sender certificates.

It reads the same settings as the server (CONSTRUCT_DATABASE, CONSTRUCT_DATA_DIR, CONSTRUCT_REDIS,
CONSTRUCT_REDIS_PREFIX, or their _FILE forms, or the options below), so it runs beside the
server with the server's environment file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python import usage

from construct.config import Setting, SettingsOptions, non_empty
from construct.core.deletion import AccountDeletion
from construct.obfs4 import BRIDGE_LINE_FILE, STATE_DIRECTORY
from construct.redis.client import RedisClient
from construct.redis.inbox import RedisInbox
from construct.redis.presence import RedisPresence
from construct.redis.wakeups import RedisWakeUps
from construct.storage.accounts import AccountStore
from construct.storage.admin import AdminStore
from construct.storage.database import SCHEMA_VERSION, Database, engine_from_options, prepare_database, schema_version
from construct.storage.inbox import SqlInbox
from construct.storage import server_keys as key_file
from construct.tap import redis_address

PROGRAM = "construct-admin"
REDIS_CONNECT_SECONDS = 5.0
# Fields of `user show` that are unix seconds: JSON keeps the number, people get a date.
TIME_FIELDS = ("createdAt", "keysUpdatedAt")


def readable_time(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class UsernameOptions(usage.Options):
    def parseArgs(self, username: str) -> None:
        self["username"] = username.lower()


class DeleteOptions(UsernameOptions):
    optFlags = [["yes", "y", "do not ask for confirmation"]]


class UserOptions(usage.Options):
    subCommands = [
        ["show", None, UsernameOptions, "show a user's account, sessions, keys and pending messages"],
        ["delete", None, DeleteOptions, "delete a user and everything the server holds about them"],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say 'user show USERNAME' or 'user delete USERNAME'")


class RotateOptions(usage.Options):
    optFlags = [["drop-old", None, "publish only the new key (a key leaked): older certificates stop verifying"]]


class SenderKeyOptions(usage.Options):
    subCommands = [
        ["show", None, usage.Options, "the public keys clients verify sender certificates with"],
        ["rotate", None, RotateOptions, "sign with a new key from now on (running servers pick it up within seconds)"],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say 'sender-key show' or 'sender-key rotate'")


class Options(SettingsOptions):
    program = PROGRAM
    synopsis = ("Usage: construct-admin [options] "
                "(migrate | user show NAME | user delete [--yes] NAME | stats | obfs4-bridge | sender-key show|rotate)")
    optFlags = [["json", None, "print JSON"]]
    settings = (
        Setting("data-dir", "construct-data", "directory of the embedded SQLite database", non_empty),
        Setting("database", None, "postgresql://user@host/db URL", non_empty),
        Setting("redis", None, "redis://host:port/db URL (production mode)", redis_address),
        Setting("redis-prefix", "construct:", "prefix of every Redis key and channel", non_empty),
        Setting("sender-key-path", None, "file of the keys that sign sender certificates (default: in --data-dir)",
                non_empty),
    )
    subCommands = [
        ["migrate", None, usage.Options, "create or upgrade the database schema"],
        ["user", None, UserOptions, "show or delete a user"],
        ["stats", None, usage.Options, "counts of users, sessions, keys and pending messages"],
        ["obfs4-bridge", None, usage.Options, "the obfs4 bridge line clients connect with (construct --obfs4)"],
        ["sender-key", None, SenderKeyOptions, "show or rotate the keys that sign sender certificates"],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self.subCommand is None:
            raise usage.UsageError("a command is required: migrate, user, stats, obfs4-bridge or sender-key")


class Admin:
    def __init__(self, reactor: Any, options: Options) -> None:
        self._reactor = reactor
        self._options = options
        self._redis: RedisClient | None = None
        self._confirm = _confirm_on_terminal

    def _print(self, record: dict, lines: list[str]) -> None:
        print(json.dumps(record) if self._options["json"] else "\n".join(lines))

    async def run(self) -> int:
        if self._options.subCommand == "obfs4-bridge":
            return self._bridge_line()
        if self._options.subCommand == "sender-key":
            return self._sender_key()
        try:
            engine = engine_from_options(self._options["database"], self._options["data-dir"])
        except ValueError as e:
            raise SystemExit(f"{PROGRAM}: {e}") from None
        try:
            if self._options.subCommand == "migrate":
                version = prepare_database(engine)
                self._print({"schemaVersion": version}, [f"schema is at version {version}"])
                return 0
            current = schema_version(engine)
        except engine.driver.Error as e:
            raise SystemExit(f"{PROGRAM}: cannot use the {engine.describe()}: {str(e).strip().splitlines()[0]}") from None
        if current != SCHEMA_VERSION:
            raise SystemExit(f"{PROGRAM}: the schema is at version {current}, not {SCHEMA_VERSION}: run 'construct-admin migrate'")
        db = Database(engine, self._reactor)
        try:
            inbox = await self._inbox(db)
            if self._options.subCommand == "stats":
                return await self._stats(db, inbox)
            user_options = self._options.subOptions
            if user_options.subCommand == "show":
                return await self._show(db, inbox, user_options.subOptions["username"])
            return await self._delete(db, inbox, user_options.subOptions["username"], user_options.subOptions["yes"])
        finally:
            db.close()
            if self._redis is not None:
                await self._redis.stop()

    def _bridge_line(self) -> int:
        """What the server wrote at its last start with --obfs4; no database needed."""
        path = os.path.join(self._options["data-dir"], STATE_DIRECTORY, BRIDGE_LINE_FILE)
        try:
            with open(path, encoding="utf-8") as file:
                line = file.read().strip()
        except FileNotFoundError:
            print(f"{PROGRAM}: no bridge line in {path}: start construct with --obfs4 (and this --data-dir) first",
                  file=sys.stderr)
            return 1
        self._print({"bridgeLine": line}, [line])
        return 0

    def _sender_key(self) -> int:
        """The key file the server reads (construct.storage.server_keys); no database needed."""
        path = self._options["sender-key-path"] or key_file.default_path(self._options["data-dir"])
        command = self._options.subOptions
        try:
            if command.subCommand == "rotate":
                keys = key_file.rotated(key_file.load_or_create(path, time.time()), time.time(),
                                        command.subOptions["drop-old"])
                key_file.write(path, keys)
            elif not os.path.exists(path):
                print(f"{PROGRAM}: no key file at {path}: the server makes it on its first start", file=sys.stderr)
                return 1
            else:
                keys = key_file.load(path)
        except (key_file.KeyFileError, OSError) as e:
            print(f"{PROGRAM}: {e}", file=sys.stderr)
            return 1
        published = keys.public()
        self._print({"signingKeyId": keys.current.key_id, "keys": published},
                    [f"signing with key {keys.current.key_id}"]
                    + [f"key {key['keyId']}: {key['publicKey']}" for key in published])
        return 0

    async def _inbox(self, db: Database) -> Any:
        if self._options["redis"] is None:
            return SqlInbox(db)
        self._redis = RedisClient(self._options["redis"], self._reactor, name=f"{self._options['redis-prefix']}admin")
        self._redis.start()
        deadline = time.monotonic() + REDIS_CONNECT_SECONDS
        while not self._redis.connected:
            if time.monotonic() > deadline:
                raise SystemExit(f"{PROGRAM}: cannot reach Redis at {self._options['redis'].host}:{self._options['redis'].port}")
            await task.deferLater(self._reactor, 0.05, lambda: None)
        return RedisInbox(self._redis, self._options["redis-prefix"], self._reactor)

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    async def _stats(self, db: Database, inbox: Any) -> int:
        counts = await AdminStore(db).counts(self._now_ms())
        counts["pendingMessages"] = (await inbox.survey(0, self._now_ms())).depth
        self._print(counts, [f"{name}: {value}" for name, value in counts.items()])
        return 0

    async def _show(self, db: Database, inbox: Any, username: str) -> int:
        user = await AdminStore(db).find_user(username)
        if user is None:
            print(f"{PROGRAM}: no user {username!r}", file=sys.stderr)
            return 1
        record = {
            "userId": user.id,
            "username": user.username,
            "createdAt": user.created_at_ms // 1000,
            "sessions": user.sessions,
            "keysUpdatedAt": user.keys_updated_at_ms // 1000 if user.keys_updated_at_ms else None,
            "pendingMessages": await inbox.depth(user.id, self._now_ms()),
        }
        self._print(record, [
            f"{name}: {readable_time(value) if name in TIME_FIELDS else value}" for name, value in record.items()
        ])
        return 0

    async def _delete(self, db: Database, inbox: Any, username: str, confirmed: bool) -> int:
        store = AdminStore(db)
        user = await store.find_user(username)
        if user is None:
            print(f"{PROGRAM}: no user {username!r}", file=sys.stderr)
            return 1
        if not confirmed and not self._confirm(f"Delete {user.username} ({user.id}) with its keys, sessions and messages?"):
            print("nothing deleted (pass --yes to delete without a question)", file=sys.stderr)
            return 1
        notices: list[Deferred] = []
        wakeups = None
        if isinstance(inbox, RedisInbox):
            prefix = self._options["redis-prefix"]
            presence = RedisPresence(self._redis, prefix, self._reactor)
            wakeups = RedisWakeUps(self._redis, prefix, presence, PROGRAM)

        def revoked(user_id: str, token_hashes: list[str], reason: str | None) -> None:
            # Live connections of the user, on any instance, are told their session ended. The
            # presence lookup goes out now, ahead of the inbox deletion that removes presence.
            if wakeups is not None:
                notices.append(ensureDeferred(wakeups.revoked_elsewhere(user_id, token_hashes, reason)))

        # The same deletion as the user's own deleteAccount (construct.core.deletion).
        deletion = await AccountDeletion(AccountStore(db), inbox, revoked).delete(user.id)
        for notice in notices:
            await notice
        if deletion is None:
            print(f"{PROGRAM}: no user {username!r}", file=sys.stderr)
            return 1
        if not deletion.inbox_cleared:
            print(f"{PROGRAM}: the account is deleted, but its pending messages could not be removed now;"
                  " they expire by themselves", file=sys.stderr)
        self._print({"deleted": user.id}, [f"deleted {user.username} ({user.id})"])
        return 0


def _confirm_on_terminal(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        raise SystemExit(f"{options}\n{PROGRAM}: {e}") from None

    async def run(reactor: Any) -> None:
        code = await Admin(reactor, options).run()
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
