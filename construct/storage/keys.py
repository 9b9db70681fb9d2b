"""Public key bundles."""

from __future__ import annotations

from dataclasses import dataclass

from construct.storage.database import Database, Txn


@dataclass(frozen=True)
class StoredBundle:
    """The seed's UploadableKeyBundle exactly as uploaded (base64 strings, never rewritten)."""

    master_identity_key: str
    bundle_data: str
    signature: str


@dataclass(frozen=True)
class PublishedBundle:
    user_id: str
    username: str
    bundle: StoredBundle


class KeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def put_bundle(self, user_id: str, bundle: StoredBundle, now_ms: int) -> None:
        await self._db.run("put_bundle", put_bundle_txn, user_id, bundle, now_ms)

    async def get_bundle(self, user_id: str) -> PublishedBundle | None:
        return await self._db.run("get_bundle", self._get_bundle_txn, user_id)

    def _get_bundle_txn(self, txn: Txn, user_id: str) -> PublishedBundle | None:
        row = txn.execute(
            "SELECT u.username, k.master_identity_key, k.bundle_data, k.signature"
            " FROM users u JOIN key_bundles k ON k.user_id = u.id WHERE u.id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        return PublishedBundle(user_id, row[0], StoredBundle(row[1], row[2], row[3]))


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
