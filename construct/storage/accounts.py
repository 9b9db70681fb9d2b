"""Users and session tokens."""

from __future__ import annotations

from dataclasses import dataclass

from construct.errors import ConstructError
from construct.storage.database import Database, Txn
from construct.storage.keys import AccessUpdate, StoredBundle, put_access_txn, put_bundle_txn


@dataclass(frozen=True)
class User:
    id: str
    username: str
    password_hash: str


@dataclass(frozen=True)
class SessionRecord:
    user_id: str
    username: str
    expires_at_ms: int


class AccountStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create_account(
        self,
        user: User,
        bundle: StoredBundle,
        token_hash: str,
        now_ms: int,
        session_expires_ms: int,
        access: AccessUpdate = AccessUpdate(),
    ) -> None:
        """Create the user, its key bundle (with its unidentified access) and its first session
        in one transaction."""
        try:
            await self._db.run(
                "create_account", self._create_account_txn, user, bundle, token_hash, now_ms, session_expires_ms, access
            )
        except Exception as e:
            if self._db.engine.is_conflict(e):
                raise ConstructError("USERNAME_TAKEN", "That username is already taken", 409) from e
            raise

    def _create_account_txn(
        self, txn: Txn, user: User, bundle: StoredBundle, token_hash: str, now_ms: int, expires_ms: int,
        access: AccessUpdate,
    ) -> None:
        txn.execute(
            "INSERT INTO users (id, username, password_hash, created_at) VALUES (?, ?, ?, ?)",
            (user.id, user.username, user.password_hash, now_ms),
        )
        put_bundle_txn(txn, user.id, bundle, now_ms)
        put_access_txn(txn, user.id, access, now_ms)
        _insert_session_txn(txn, token_hash, user.id, now_ms, expires_ms)

    async def get_user_by_name(self, username: str) -> User | None:
        return await self._db.run("get_user_by_name", self._get_user_txn, "username", username)

    async def get_user(self, user_id: str) -> User | None:
        return await self._db.run("get_user", self._get_user_txn, "id", user_id)

    def _get_user_txn(self, txn: Txn, column: str, value: str) -> User | None:
        row = txn.execute(
            f"SELECT id, username, password_hash FROM users WHERE {column} = ?", (value,)
        ).fetchone()
        return User(*row) if row else None

    async def user_exists(self, user_id: str) -> bool:
        return await self.get_user(user_id) is not None

    async def create_session(self, token_hash: str, user_id: str, now_ms: int, expires_ms: int) -> None:
        await self._db.run("create_session", _insert_session_txn, token_hash, user_id, now_ms, expires_ms)

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        return await self._db.run("get_session", self._get_session_txn, token_hash)

    def _get_session_txn(self, txn: Txn, token_hash: str) -> SessionRecord | None:
        row = txn.execute(
            "SELECT s.user_id, u.username, s.expires_at FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.token_hash = ?",
            (token_hash,),
        ).fetchone()
        return SessionRecord(*row) if row else None

    async def delete_session(self, token_hash: str) -> bool:
        return await self._db.run("delete_session", self._delete_session_txn, token_hash)

    def _delete_session_txn(self, txn: Txn, token_hash: str) -> bool:
        return txn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,)).rowcount > 0

    async def change_password(self, user_id: str, password_hash: str, keep_token_hash: str) -> list[str]:
        """Set the password and revoke every other session; return the revoked token hashes."""
        return await self._db.run("change_password", self._change_password_txn, user_id, password_hash, keep_token_hash)

    def _change_password_txn(self, txn: Txn, user_id: str, password_hash: str, keep_token_hash: str) -> list[str]:
        txn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))
        rows = txn.execute(
            "SELECT token_hash FROM sessions WHERE user_id = ? AND token_hash <> ?", (user_id, keep_token_hash)
        ).fetchall()
        txn.execute("DELETE FROM sessions WHERE user_id = ? AND token_hash <> ?", (user_id, keep_token_hash))
        return [row[0] for row in rows]

    async def delete_account(self, user_id: str) -> list[str] | None:
        """Delete the account and every row about it in one transaction: its sessions, key bundle,
        one-time prekeys, unidentified access and SQL inbox (messages to it, and their dedup records). Returns the
        deleted sessions' token hashes, or None when there is no such account.

        Rows of other users that name it stay: the messages it sent them, in their inboxes."""
        return await self._db.run("delete_account", self._delete_account_txn, user_id)

    def _delete_account_txn(self, txn: Txn, user_id: str) -> list[str] | None:
        if txn.execute("SELECT id FROM users WHERE id = ?", (user_id,)).fetchone() is None:
            return None
        rows = txn.execute("SELECT token_hash FROM sessions WHERE user_id = ?", (user_id,)).fetchall()
        # The foreign keys cascade too; naming each table keeps the list of what goes in one place.
        for table, column in (
            ("sessions", "user_id"),
            ("one_time_prekeys", "user_id"),
            ("key_bundles", "user_id"),
            ("unidentified_access", "user_id"),
            ("inbox", "recipient_id"),
            ("sent_messages", "recipient_id"),
        ):
            txn.execute(f"DELETE FROM {table} WHERE {column} = ?", (user_id,))
        txn.execute("DELETE FROM users WHERE id = ?", (user_id,))
        return [row[0] for row in rows]

    async def discard_deleted(self) -> None:
        """Make what deletions removed leave the database's files too (SQLite's write-ahead log)."""
        await self._db.run("discard_deleted", self._db.engine.discard_deleted)

    async def delete_expired_sessions(self, now_ms: int) -> list[tuple[str, str]]:
        """Delete expired sessions; return their (user id, token hash) pairs."""
        return await self._db.run("delete_expired_sessions", self._delete_expired_sessions_txn, now_ms)

    def _delete_expired_sessions_txn(self, txn: Txn, now_ms: int) -> list[tuple[str, str]]:
        rows = txn.execute("SELECT user_id, token_hash FROM sessions WHERE expires_at <= ?", (now_ms,)).fetchall()
        txn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now_ms,))
        return [(row[0], row[1]) for row in rows]


def _insert_session_txn(txn: Txn, token_hash: str, user_id: str, now_ms: int, expires_ms: int) -> None:
    txn.execute(
        "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
        (token_hash, user_id, now_ms, expires_ms),
    )
