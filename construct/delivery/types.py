"""Records shared by every inbox backend (SQL and Redis).

Not frozen: several are built for every message, and a frozen dataclass costs about five
times as much to build.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Submission:
    """A message to store: its parties, id and envelope, and the limits it is stored under."""

    sender_id: str
    recipient_id: str
    message_id: str
    envelope: str
    # A connection of the recipient is attached to this process now.
    held_here: bool
    now_ms: int
    ttl_ms: int
    quota: int
    # What the duplicate-send record keeps instead of the sender: a keyed digest of the sender
    # and the message id (construct.core.messaging.sender_digest).
    sender_digest: str


@dataclass(slots=True)
class Accepted:
    """The outcome of storing a message, from which the sender's `ack` is made."""

    # A connection of the recipient was known (here or on another instance) when the message
    # was first stored; a duplicate gets the first store's answer.
    reached: bool
    expires_at_ms: int
    duplicate: bool
    # The message's place in the recipient's inbox, and the highest place any earlier message
    # of the recipient had then (0: none): a connection that has pushed up to `previous_seq`
    # and not past it may be handed the message at once. None for a duplicate.
    seq: int | None = None
    previous_seq: int | None = None
    # Other instances holding a connection of the recipient when it was stored (their ids), as
    # far as the inbox knows: the ones to wake.
    holders: tuple[str, ...] = ()


@dataclass(slots=True)
class InboxEntry:
    """One pending message; `seq` orders a recipient's inbox (FIFO)."""

    seq: int
    message_id: str
    envelope: str


@dataclass(frozen=True)
class Survey:
    """What a worker sweep learns of all inboxes."""

    stale_recipients: list[str]
    depth: int
