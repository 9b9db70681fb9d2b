"""Deleting an account and everything the server holds about it.

One place for both ways an account goes: the user's own `deleteAccount` (after
`AccountService.confirm_password`) and `construct-admin user delete`.

What goes: the account row, its sessions, key bundle and one-time prekeys (SQL), and its inbox:
in SQL (embedded mode) or in Redis (production mode: the pending messages, their dedup records,
the sequence counter, the pending-index entry, presence and worker leases), where a tombstone
then refuses sends for a day to instances that still remember the account. The user's live
connections are told `sessionExpired` with the reason `accountDeleted`. What stays: messages the user sent that wait in other
users' inboxes (they are the recipients' data and go when acknowledged or expired), the
tombstone, and rate-limit counters, which expire on their own (docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.logger import Logger

from construct.storage.accounts import AccountStore

# Why the sessions ended, as `sessionExpired` tells the connections (so a client does not ask
# its user to log in to an account that is gone).
ACCOUNT_DELETED = "accountDeleted"


@dataclass(frozen=True)
class Deletion:
    # The deleted account's sessions, whose connections were told they ended.
    token_hashes: list[str]
    # False when the inbox could not be cleared (Redis unreachable): its messages expire by themselves.
    inbox_cleared: bool


class AccountDeletion:
    log = Logger()

    def __init__(
        self, store: AccountStore, inbox: Any, on_sessions_revoked: Callable[[str, list[str], str | None], None]
    ) -> None:
        self._store = store
        self._inbox = inbox
        self._on_sessions_revoked = on_sessions_revoked

    async def delete(self, user_id: str) -> Deletion | None:
        """Delete the account with this id and everything about it; None when there is none.

        The SQL deletion commits first and is what makes the account gone (no login, no key
        fetch, no send from then on, the tombstone covering instances that cached it); an
        inbox that cannot be cleared then is reported, not raised: its messages have a TTL.
        """
        token_hashes = await self._store.delete_account(user_id)
        if token_hashes is None:
            return None
        if token_hashes:
            self._on_sessions_revoked(user_id, token_hashes, ACCOUNT_DELETED)
        try:
            await self._inbox.delete_user(user_id)
        except Exception:
            self.log.failure("clearing a deleted account's inbox failed; its messages expire by themselves")
            return Deletion(token_hashes, inbox_cleared=False)
        try:
            await self._store.discard_deleted()
        except Exception:
            self.log.failure("checkpointing after an account deletion failed; the next checkpoint does it")
        return Deletion(token_hashes, inbox_cleared=True)
