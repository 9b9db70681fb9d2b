"""The two delivery ports the core works through, each with two implementations.

| port | embedded mode | production mode |
|---|---|---|
| `Inbox` | `construct.storage.inbox.SqlInbox` (SQLite or PostgreSQL) | `construct.redis.inbox.RedisInbox` |
| `WakeUps` | `construct.core.delivery.LocalWakeUps` (this process's hub) | `construct.redis.wakeups.RedisWakeUps` (the hub, and pub/sub to other instances) |

The core (MessageService, the delivery hub, the worker) relies on the guarantees written here
and on nothing else about a backend.
"""

from __future__ import annotations

from typing import Awaitable, Protocol

from twisted.internet.defer import Deferred

from construct.delivery.types import Accepted, Submission


class Inbox(Protocol):
    """Each recipient's durable queue of envelopes, in the order they were accepted.

    - `put` returns a Deferred (it runs for every message, so no coroutine) that fires with an `Accepted` only once the message is durable (committed, fsynced in
      SQLite; in Redis), or fails with a ConstructError (`DUPLICATE_MESSAGE_ID`, `INBOX_FULL`,
      `USER_NOT_FOUND`) having stored nothing. Stores to one recipient take effect in the order
      `put` was called, also when a caller issues the next before the previous one has fired:
      callers never wait for a store before issuing the next.
    - `put` is idempotent on (recipient, message id) while the id's record lives (its TTL): the
      same sender gets the first outcome again (`duplicate`), another sender an error.
    - Each stored message gets a `seq`, strictly increasing per recipient; `fetch(after_seq)`
      returns the unexpired messages after it, oldest first.
    - `ack` removes the messages at once, bodies included; ids not pending are ignored.
    - Messages and records expire after their TTL (`expire`, run by the worker's sweeps).
    """

    def put(self, message: Submission) -> Deferred: ...

    def fetch(self, recipient_id: str, after_seq: int, limit: int, now_ms: int) -> Awaitable:
        """Fires with a list of InboxEntry."""

    def ack(self, recipient_id: str, message_ids: list[str]) -> Awaitable: ...

    def depth(self, recipient_id: str, now_ms: int) -> Awaitable: ...

    def survey(self, accepted_before_ms: int, now_ms: int) -> Awaitable:
        """Fires with a Survey."""

    def expire(self, now_ms: int) -> Awaitable: ...

    def delete_user(self, user_id: str) -> Awaitable: ...


class WakeUps(Protocol):
    """Tells whoever holds a user's connections (this process, other instances) that something
    changed for the user.

    A wake-up is a hint, never a carrier: it is sent only after the change it announces is
    durable; it may be lost (a holder looks at its users' inboxes again after it (re)subscribes,
    and the worker's sweeps find stale messages), so a lost one delays a delivery, never loses
    it; the wake-ups one instance sends another arrive in the order sent.
    """

    def stored(self, recipient_id: str, accepted: Accepted, message: dict) -> None:
        """A new message for the recipient was stored (not called for a duplicate)."""

    def sessions_revoked(self, user_id: str, token_hashes: list[str]) -> None:
        """These sessions ended: their connections are told `sessionExpired`, everywhere."""

    def pending(self, user_id: str) -> Awaitable:
        """The user's inbox holds messages: the holders push what they have not yet (worker)."""

    def redeliver(self, user_id: str, attached_before: float) -> Awaitable:
        """Push the unacknowledged messages again to connections attached before then (worker)."""
