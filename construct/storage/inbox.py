"""The SQL inbox: used in embedded mode (SQLite) and with PostgreSQL when no Redis is configured."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from construct.delivery.types import Accepted, InboxEntry, Submission, Survey
from construct.errors import duplicate_id_error, inbox_full_error, user_not_found_error
from construct.storage.database import Database, GroupCommit, Txn


# The status column predates Accepted.reached and keeps its words.
_REACHED = {True: "delivered", False: "queued"}


class SqlInbox:
    """Stores and acknowledgements share commits (GroupCommit): one transaction, one fsync,
    for all those of a reactor turn, or of all that came while the previous commit ran."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._writes = GroupCommit(db, "inbox_write")

    def put(self, message: Submission) -> Deferred:
        """Store a message once (idempotent on its id) or say why not."""
        return self._writes.add(self._put_txn, message)

    def _put_txn(self, txn: Txn, message: Submission) -> Accepted:
        recipient, message_id = message.recipient_id, message.message_id
        if self._db.engine.name == "postgres":
            # Locking the recipient's row keeps two copies of one id, written by two of the
            # pool's connections, from both passing the duplicate check.
            txn.execute("SELECT id FROM users WHERE id = ? FOR UPDATE", (recipient,))
        # One statement for every fact the store depends on: each statement costs the pool
        # thread a turn at the GIL, which the busy reactor thread holds most of the time.
        exists, sender_digest, status, record_expires, pending, previous = txn.execute(
            "SELECT (SELECT 1 FROM users WHERE id = ?), s.sender_digest, s.status, s.expires_at,"
            " (SELECT COUNT(*) FROM inbox WHERE recipient_id = ? AND expires_at > ?),"
            " (SELECT MAX(seq) FROM inbox WHERE recipient_id = ? AND expires_at > ?)"
            " FROM (SELECT 1) AS one LEFT JOIN sent_messages AS s ON s.recipient_id = ? AND s.message_id = ?",
            (recipient, recipient, message.now_ms, recipient, message.now_ms, recipient, message_id),
        ).fetchone()
        if exists is None:
            raise user_not_found_error()
        if sender_digest is not None and record_expires > message.now_ms:
            if sender_digest != message.sender_digest:
                raise duplicate_id_error()
            return Accepted(status == _REACHED[True], record_expires, duplicate=True)
        if pending >= message.quota:
            raise inbox_full_error(message.quota)
        if sender_digest is not None:
            # The id expired but the sweep has not removed it yet: the new message replaces it.
            for table in ("sent_messages", "inbox"):
                txn.execute(f"DELETE FROM {table} WHERE recipient_id = ? AND message_id = ?", (recipient, message_id))
        expires_ms = message.now_ms + message.ttl_ms
        txn.execute(
            "INSERT INTO sent_messages (recipient_id, message_id, sender_digest, status, expires_at) VALUES (?, ?, ?, ?, ?)",
            (recipient, message_id, message.sender_digest, _REACHED[message.held_here], expires_ms),
        )
        seq = txn.execute(
            "INSERT INTO inbox (recipient_id, message_id, envelope, accepted_at, expires_at) VALUES (?, ?, ?, ?, ?)"
            " RETURNING seq",
            (recipient, message_id, message.envelope, message.now_ms, expires_ms),
        ).fetchone()[0]
        return Accepted(message.held_here, expires_ms, duplicate=False, seq=seq, previous_seq=previous or 0)

    async def fetch(self, recipient_id: str, after_seq: int, limit: int, now_ms: int) -> list[InboxEntry]:
        """Unexpired messages after `after_seq`, oldest first."""
        return await self._db.run("inbox_fetch", self._fetch_txn, recipient_id, after_seq, limit, now_ms)

    def _fetch_txn(self, txn: Txn, recipient_id: str, after_seq: int, limit: int, now_ms: int) -> list[InboxEntry]:
        rows = txn.execute(
            "SELECT seq, message_id, envelope FROM inbox WHERE recipient_id = ? AND seq > ? AND expires_at > ?"
            " ORDER BY seq LIMIT ?",
            (recipient_id, after_seq, now_ms, limit),
        ).fetchall()
        return [InboxEntry(*row) for row in rows]

    def ack(self, recipient_id: str, message_ids: list[str]) -> Deferred:
        """Delete acknowledged messages; fires with when each removed one was accepted (ms).

        Unknown ids are ignored: a repeated ack is harmless."""
        return self._writes.add(self._ack_txn, recipient_id, message_ids)

    def _ack_txn(self, txn: Txn, recipient_id: str, message_ids: list[str]) -> list[int]:
        if not message_ids:
            return []
        placeholders = ", ".join("?" for _ in message_ids)
        return [row[0] for row in txn.execute(
            f"DELETE FROM inbox WHERE recipient_id = ? AND message_id IN ({placeholders}) RETURNING accepted_at",
            (recipient_id, *message_ids),
        ).fetchall()]

    async def depth(self, recipient_id: str, now_ms: int) -> int:
        return await self._db.run("inbox_depth", self._depth_txn, recipient_id, now_ms)

    def _depth_txn(self, txn: Txn, recipient_id: str, now_ms: int) -> int:
        return txn.execute(
            "SELECT COUNT(*) FROM inbox WHERE recipient_id = ? AND expires_at > ?", (recipient_id, now_ms)
        ).fetchone()[0]

    async def survey(self, accepted_before_ms: int, now_ms: int) -> Survey:
        """Recipients holding an unexpired message accepted before the given time, and the total depth."""
        return await self._db.run("inbox_survey", self._survey_txn, accepted_before_ms, now_ms)

    def _survey_txn(self, txn: Txn, accepted_before_ms: int, now_ms: int) -> Survey:
        rows = txn.execute(
            "SELECT DISTINCT recipient_id FROM inbox WHERE accepted_at < ? AND expires_at > ?",
            (accepted_before_ms, now_ms),
        ).fetchall()
        depth = txn.execute("SELECT COUNT(*) FROM inbox WHERE expires_at > ?", (now_ms,)).fetchone()[0]
        return Survey([row[0] for row in rows], depth)

    async def delete_user(self, user_id: str) -> None:
        """Remove a deleted account's inbox: its messages and their dedup records.

        Usually nothing is left by then: the account's deletion cascades to these rows."""
        await self._db.run("inbox_delete_user", self._delete_user_txn, user_id)

    def _delete_user_txn(self, txn: Txn, user_id: str) -> None:
        for table in ("inbox", "sent_messages"):
            txn.execute(f"DELETE FROM {table} WHERE recipient_id = ?", (user_id,))

    async def expire(self, now_ms: int) -> int:
        """Remove expired messages and dedup records; return how many messages expired."""
        return await self._db.run("inbox_expire", self._expire_txn, now_ms)

    def _expire_txn(self, txn: Txn, now_ms: int) -> int:
        txn.execute("DELETE FROM sent_messages WHERE expires_at <= ?", (now_ms,))
        return txn.execute("DELETE FROM inbox WHERE expires_at <= ?", (now_ms,)).rowcount
