"""Queries for `construct-admin`: one user's records, counts (deletion: construct.core.deletion)."""

from __future__ import annotations

from dataclasses import dataclass

from construct.storage.database import Database, Txn


@dataclass(frozen=True)
class UserRecord:
    id: str
    username: str
    created_at_ms: int
    sessions: int
    keys_updated_at_ms: int | None


class AdminStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def find_user(self, username: str) -> UserRecord | None:
        return await self._db.run("admin_find_user", self._find_user_txn, username)

    def _find_user_txn(self, txn: Txn, username: str) -> UserRecord | None:
        row = txn.execute(
            "SELECT u.id, u.username, u.created_at,"
            " (SELECT COUNT(*) FROM sessions s WHERE s.user_id = u.id),"
            " (SELECT k.updated_at FROM key_bundles k WHERE k.user_id = u.id)"
            " FROM users u WHERE u.username = ?",
            (username,),
        ).fetchone()
        return UserRecord(*row) if row else None

    async def counts(self, now_ms: int) -> dict[str, int]:
        return await self._db.run("admin_counts", self._counts_txn, now_ms)

    def _counts_txn(self, txn: Txn, now_ms: int) -> dict[str, int]:
        return {
            "users": txn.execute("SELECT COUNT(*) FROM users").fetchone()[0],
            "sessions": txn.execute("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (now_ms,)).fetchone()[0],
            "keyBundles": txn.execute("SELECT COUNT(*) FROM key_bundles").fetchone()[0],
        }
