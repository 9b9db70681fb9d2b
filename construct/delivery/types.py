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
    status: str
    now_ms: int
    ttl_ms: int
    quota: int


@dataclass(slots=True)
class Accepted:
    """The outcome of storing a message: what the sender's `ack` says."""

    status: str
    expires_at_ms: int
    duplicate: bool
    # The message's place in the recipient's inbox, where the inbox numbers each recipient's
    # messages consecutively (Redis); None where it does not (SQL: one sequence for all).
    seq: int | None = None


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
