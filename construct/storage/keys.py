"""Public key bundles and X3DH one-time prekeys."""

from __future__ import annotations

from dataclasses import dataclass

from construct.errors import ConstructError, user_not_found_error
from construct.storage.database import Database, Txn


def too_many_prekeys_error(limit: int) -> ConstructError:
    return ConstructError(
        "TOO_MANY_PREKEYS", f"At most {limit} one-time prekeys can wait on the server per user", 409
    )


@dataclass(frozen=True)
class StoredBundle:
    """The seed's UploadableKeyBundle exactly as uploaded (base64 strings, never rewritten)."""

    master_identity_key: str
    bundle_data: str
    signature: str


@dataclass(frozen=True)
class OneTimePrekeyRecord:
    """One uploaded one-time prekey: the owner's id for it and its base64 public key."""

    key_id: int
    public_key: str


@dataclass(frozen=True)
class AccessRecord:
    """An account's unidentified access (sealed sender): its access key (base64 of 16 bytes,
    None when it has none) and whether it takes sealed messages from anyone."""

    access_key: str | None
    unrestricted: bool


@dataclass(frozen=True)
class AccessUpdate:
    """A change of an account's unidentified access, registered with its bundle. `set_key`:
    the key becomes `key` (None removes it); `unrestricted` None leaves that as it is."""

    set_key: bool = False
    key: str | None = None
    unrestricted: bool | None = None

    @property
    def empty(self) -> bool:
        return not self.set_key and self.unrestricted is None


@dataclass(frozen=True)
class PublishedBundle:
    user_id: str
    username: str
    bundle: StoredBundle
    # Claimed (and so deleted) for this fetch; None when none was asked for or none was left.
    one_time_prekey: OneTimePrekeyRecord | None = None
    # Handed out with the bundle: whoever fetched it may send the owner sealed messages.
    access: AccessRecord = AccessRecord(None, False)


class KeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def put_bundle(
        self, user_id: str, bundle: StoredBundle, now_ms: int, access: AccessUpdate = AccessUpdate()
    ) -> None:
        """Replace the bundle, and change the unidentified access registered with it, in one transaction."""
        await self._db.run("put_bundle", self._put_bundle_txn, user_id, bundle, now_ms, access)

    @staticmethod
    def _put_bundle_txn(txn: Txn, user_id: str, bundle: StoredBundle, now_ms: int, access: AccessUpdate) -> None:
        put_bundle_txn(txn, user_id, bundle, now_ms)
        put_access_txn(txn, user_id, access, now_ms)

    async def get_access(self, user_id: str) -> AccessRecord | None:
        """The account's unidentified access; None when there is no such account.

        One statement, the same whether the account exists or not, so that a sealed send to an
        unknown account costs what one with a wrong key does."""
        return await self._db.run("get_access", self._get_access_txn, user_id)

    @staticmethod
    def _get_access_txn(txn: Txn, user_id: str) -> AccessRecord | None:
        row = txn.execute(
            "SELECT a.access_key, a.unrestricted FROM users u"
            " LEFT JOIN unidentified_access a ON a.user_id = u.id WHERE u.id = ?",
            (user_id,),
        ).fetchone()
        return None if row is None else AccessRecord(row[0], bool(row[1]))

    async def get_bundle(self, user_id: str, claim_one_time_prekey: bool = False) -> PublishedBundle | None:
        """The user's bundle; with `claim_one_time_prekey`, also one of their prekeys, deleted as it is read."""
        return await self._db.run("get_bundle", self._get_bundle_txn, user_id, claim_one_time_prekey)

    def _get_bundle_txn(self, txn: Txn, user_id: str, claim_one_time_prekey: bool) -> PublishedBundle | None:
        row = txn.execute(
            "SELECT u.username, k.master_identity_key, k.bundle_data, k.signature, a.access_key, a.unrestricted"
            " FROM users u JOIN key_bundles k ON k.user_id = u.id"
            " LEFT JOIN unidentified_access a ON a.user_id = u.id WHERE u.id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        prekey = self._claim_txn(txn, user_id) if claim_one_time_prekey else None
        access = AccessRecord(row[4], bool(row[5]))
        return PublishedBundle(user_id, row[0], StoredBundle(row[1], row[2], row[3]), prekey, access)

    def _claim_txn(self, txn: Txn, user_id: str) -> OneTimePrekeyRecord | None:
        """Delete and return the user's lowest-numbered prekey in one statement.

        On PostgreSQL, SKIP LOCKED lets concurrent fetches each take a different row instead of
        queueing on (and then missing) the same one. SQLite's single pool connection already
        runs one transaction at a time.
        """
        if self._db.engine.name == "postgres":
            sql = (
                "DELETE FROM one_time_prekeys WHERE (user_id, key_id) = ("
                " SELECT user_id, key_id FROM one_time_prekeys WHERE user_id = ?"
                " ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING key_id, public_key"
            )
            params: tuple = (user_id,)
        else:
            sql = (
                "DELETE FROM one_time_prekeys WHERE user_id = ? AND key_id ="
                " (SELECT MIN(key_id) FROM one_time_prekeys WHERE user_id = ?)"
                " RETURNING key_id, public_key"
            )
            params = (user_id, user_id)
        rows = txn.execute(sql, params).fetchall()
        return OneTimePrekeyRecord(int(rows[0][0]), rows[0][1]) if rows else None

    async def add_one_time_prekeys(
        self, user_id: str, prekeys: list[OneTimePrekeyRecord], now_ms: int, pool_limit: int
    ) -> int:
        """Store prekeys (a key id already waiting is replaced); return how many now wait.

        Raises TOO_MANY_PREKEYS, storing nothing, when the pool would exceed `pool_limit`.
        """
        return await self._db.run("add_one_time_prekeys", self._add_txn, user_id, prekeys, now_ms, pool_limit)

    def _add_txn(
        self, txn: Txn, user_id: str, prekeys: list[OneTimePrekeyRecord], now_ms: int, pool_limit: int
    ) -> int:
        # Locking the owner's row serialises its uploads, so two cannot both pass the limit.
        lock = " FOR UPDATE" if self._db.engine.name == "postgres" else ""
        if txn.execute(f"SELECT id FROM users WHERE id = ?{lock}", (user_id,)).fetchone() is None:
            raise user_not_found_error()
        if prekeys:
            values = ", ".join("(?, ?, ?, ?)" for _ in prekeys)
            params = [value for p in prekeys for value in (user_id, p.key_id, p.public_key, now_ms)]
            txn.execute(
                "INSERT INTO one_time_prekeys (user_id, key_id, public_key, uploaded_at)"
                f" VALUES {values} ON CONFLICT (user_id, key_id)"
                " DO UPDATE SET public_key = excluded.public_key, uploaded_at = excluded.uploaded_at",
                params,
            )
        count = self._count_txn(txn, user_id)
        if count > pool_limit:
            # Raising rolls the insert back.
            raise too_many_prekeys_error(pool_limit)
        return count

    async def count_one_time_prekeys(self, user_id: str) -> int:
        return await self._db.run("count_one_time_prekeys", self._count_txn, user_id)

    @staticmethod
    def _count_txn(txn: Txn, user_id: str) -> int:
        return txn.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE user_id = ?", (user_id,)).fetchone()[0]


def put_bundle_txn(txn: Txn, user_id: str, bundle: StoredBundle, now_ms: int) -> None:
    updated = txn.execute(
        "UPDATE key_bundles SET master_identity_key = ?, bundle_data = ?, signature = ?, updated_at = ?"
        " WHERE user_id = ?",
        (bundle.master_identity_key, bundle.bundle_data, bundle.signature, now_ms, user_id),
    ).rowcount
    if not updated:
        txn.execute(
            "INSERT INTO key_bundles (user_id, master_identity_key, bundle_data, signature, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (user_id, bundle.master_identity_key, bundle.bundle_data, bundle.signature, now_ms),
        )


def put_access_txn(txn: Txn, user_id: str, update: AccessUpdate, now_ms: int) -> None:
    """Apply an AccessUpdate (nothing when it is empty)."""
    if update.empty:
        return
    row = txn.execute(
        "SELECT access_key, unrestricted FROM unidentified_access WHERE user_id = ?", (user_id,)
    ).fetchone()
    key = update.key if update.set_key else (row[0] if row else None)
    unrestricted = update.unrestricted if update.unrestricted is not None else bool(row and row[1])
    txn.execute(
        "INSERT INTO unidentified_access (user_id, access_key, unrestricted, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET access_key = excluded.access_key,"
        " unrestricted = excluded.unrestricted, updated_at = excluded.updated_at",
        (user_id, key, unrestricted, now_ms),
    )
