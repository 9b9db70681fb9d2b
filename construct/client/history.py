"""The messages of an account, in an encrypted SQLite file next to its state file.

Kept out of the state file so that a message costs the same however long the history is: the
state file (keys, sessions, contacts) is rewritten on every change, the history only gets a
row, and dropping the oldest rows past the bound costs the same every time. Two tables:

- `messages`: one message shown to the user, sent or received, as a SecretBox of its JSON
  entry under the history key (which lives in the encrypted state file). The newest `keep`
  are kept; older ones are deleted as new ones come.
- `seen`: the ids of incoming messages that were handled (shown or refused), so that a message
  delivered again is recognised. The newest SEEN_KEPT are kept, so refused junk goes too.

Rows are only ever deleted from the oldest end and `seq` only grows, so the newest N of a table
are exactly those with `seq > max(seq) - N`.

What the file shows without the key: how many rows there are, and an opaque tag per row
(HMAC of the message id under the history key). No text, no names, no times.

Writes are buffered and committed by `commit`, which the state store calls after the change
that made them succeeded and before it saves the state file: a crash in between leaves the
message recorded as seen, so it comes again as a duplicate and is acknowledged, never decrypted
twice (the ratchet could not) and never lost.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3

from nacl.secret import SecretBox

# At least as many as a server's inbox holds for one user by default: a message can only come
# again while it is unacknowledged, and only that many can be.
SEEN_KEPT = 10_000
DEFAULT_KEEP = 10_000
MESSAGE = "messages"
SEEN = "seen"


class HistoryLog:
    """The history file of one state file; blocking (the store runs it on its thread)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._key: bytes | None = None
        self._pending: list[tuple[str, str, dict | None]] = []
        self._pending_tags: set[tuple[str, bytes]] = set()
        self.keep = DEFAULT_KEEP

    def begin(self, key: bytes, keep: int) -> None:
        """Start a change under the history key, keeping at most `keep` messages."""
        self._key = key
        self.keep = keep
        self._pending, self._pending_tags = [], set()

    # Reading and writing, inside a change

    def seen(self, message_id: str) -> bool:
        """Whether this incoming message was handled before."""
        tag = self._tag(SEEN, message_id)
        if (SEEN, tag) in self._pending_tags:
            return True
        return self._connection().execute("SELECT 1 FROM seen WHERE tag = ?", (tag,)).fetchone() is not None

    def mark_seen(self, message_id: str) -> None:
        self._add(SEEN, message_id, None)

    def add_message(self, entry: dict) -> None:
        """A message shown to the user; `entry` has at least `id` and `direction`."""
        self._add(MESSAGE, f"{entry['direction']}:{entry['id']}", entry)

    def messages(self) -> list[dict]:
        """Every message kept, oldest first (those added in this change too)."""
        box = SecretBox(self._opened())
        rows = self._connection().execute("SELECT box FROM messages ORDER BY seq")
        kept = [json.loads(box.decrypt(row[0])) for row in rows]
        return kept + [entry for kind, _, entry in self._pending if kind == MESSAGE and entry is not None]

    def _add(self, kind: str, name: str, entry: dict | None) -> None:
        tag = self._tag(kind, name)
        if (kind, tag) not in self._pending_tags:
            self._pending_tags.add((kind, tag))
            self._pending.append((kind, name, entry))

    def _tag(self, kind: str, name: str) -> bytes:
        return hmac.new(self._opened(), f"{kind}:{name}".encode("utf-8"), hashlib.sha256).digest()[:16]

    def _opened(self) -> bytes:
        if self._key is None:
            raise RuntimeError("the history is used outside a change (begin was not called)")
        return self._key

    # Ending a change

    def commit(self) -> None:
        """Write what this change added, in one transaction, and drop what is past the bounds."""
        pending, self._pending, self._pending_tags = self._pending, [], set()
        if not pending:
            return
        box = SecretBox(self._opened())
        db = self._connection()
        with db:
            for kind, name, entry in pending:
                if entry is None:
                    db.execute("INSERT OR IGNORE INTO seen (tag) VALUES (?)", (self._tag(kind, name),))
                else:
                    sealed = bytes(box.encrypt(json.dumps(entry, ensure_ascii=False).encode("utf-8")))
                    db.execute("INSERT OR IGNORE INTO messages (tag, box) VALUES (?, ?)", (self._tag(kind, name), sealed))
            for table, keep in ((MESSAGE, self.keep), (SEEN, SEEN_KEPT)):
                if any(item[0] == table for item in pending):
                    db.execute(f"DELETE FROM {table} WHERE seq <= (SELECT max(seq) FROM {table}) - ?", (keep,))

    def rollback(self) -> None:
        self._pending, self._pending_tags = [], set()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            if not os.path.exists(self.path):
                # Created private: it holds nothing readable, but it is nobody else's business.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            db = sqlite3.connect(self.path, isolation_level="DEFERRED", check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS messages"
                " (seq INTEGER PRIMARY KEY AUTOINCREMENT, tag BLOB NOT NULL UNIQUE, box BLOB NOT NULL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY AUTOINCREMENT, tag BLOB NOT NULL UNIQUE)")
            self._db = db
        return self._db
