"""Live delivery: this process's connections, each fed from the recipient's inbox in order.

A connection never receives a message straight from a sender. Every push is read back from
the durable inbox after a cursor (the last seq pushed on that connection), so live delivery and
the drain after a (re)connect are one mechanism: FIFO holds, and a message is pushed once per
connection until it is acknowledged or the connection authenticates again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from construct.core.messaging import decode_envelope
from construct.delivery.types import Accepted

FETCH_BATCH = 100
RETRY_DELAY_SECONDS = 2.0
# Long-polls one user may have waiting at once on this instance; a newer one ends the oldest.
DEFAULT_LONG_POLLS_PER_USER = 4


class LiveConnection(Protocol):
    """What the hub needs from a transport connection."""

    # False while the client is not reading what it was sent: pushes wait (see DeliveryHub.resume).
    writable: bool

    def push_message(self, message: dict) -> None: ...

    def session_revoked(self, reason: str | None = None) -> None: ...


@dataclass(eq=False, slots=True)
class _Cursor:
    connection: LiveConnection
    user_id: str
    token_hash: str
    attached_at: float
    after_seq: int = 0
    # Set by redeliver: start again from the beginning of the inbox at the next fetch.
    rewind: bool = False
    running: bool = False
    again: bool = False
    attached: bool = True
    drained_once: bool = False
    # Pushes stopped because the connection was not writable; resume() goes on.
    held: bool = False
    retry_call: Any = None


@dataclass(eq=False, slots=True)
class LongPoll:
    """One HTTP long-poll of a user. It holds the user here, as a connection does, from
    DeliveryHub.long_poll to DeliveryHub.end_long_poll, also after `woken` fired: a session
    revoked while it reads the inbox still sets `revoked` before it answers."""

    user_id: str
    token_hash: str
    # Fires True when a message arrives for the user, else False: the wait is over, a newer
    # long-poll of the user replaced this one, its session was revoked or its client left.
    woken: Deferred
    revoked: bool = False
    # Its client disconnected: nobody is left to answer.
    gone: bool = False
    timer: Any = None


class PresenceListener(Protocol):
    """Told when a user's first connection here attaches and when the last one detaches."""

    def user_attached(self, user_id: str) -> None: ...

    def user_detached(self, user_id: str) -> None: ...


class DeliveryHub:
    log = Logger()

    def __init__(
        self, inbox: Any, clock: IReactorTime, metrics: Any, long_polls_per_user: int = DEFAULT_LONG_POLLS_PER_USER
    ) -> None:
        """`long_polls_per_user`: 0 for no limit."""
        self.listener: PresenceListener | None = None
        self._inbox = inbox
        self._clock = clock
        self._metrics = metrics
        self._long_polls_per_user = long_polls_per_user
        self._by_user: dict[str, dict[LiveConnection, _Cursor]] = {}
        self._user_of: dict[LiveConnection, str] = {}
        # Oldest first.
        self._polls: dict[str, list[LongPoll]] = {}

    def attach(self, connection: LiveConnection, user_id: str, token_hash: str) -> None:
        """Bind a connection to a user and push everything still unacknowledged, in order."""
        if self._user_of.get(connection) == user_id:
            # Authenticated again as the same user: start over without leaving presence.
            self._retire(self._by_user[user_id][connection])
        else:
            self.detach(connection)
        cursor = _Cursor(connection, user_id, token_hash, self._clock.seconds())
        first = not self.holds(user_id)
        self._by_user.setdefault(user_id, {})[connection] = cursor
        self._user_of[connection] = user_id
        self._pump(cursor)
        if first:
            self._attached(user_id)

    def detach(self, connection: LiveConnection) -> None:
        user_id = self._user_of.pop(connection, None)
        if user_id is None:
            return
        cursors = self._by_user[user_id]
        self._retire(cursors.pop(connection))
        if not cursors:
            del self._by_user[user_id]
        self._maybe_detached(user_id)

    @staticmethod
    def _retire(cursor: _Cursor) -> None:
        cursor.attached = False
        if cursor.retry_call is not None and cursor.retry_call.active():
            cursor.retry_call.cancel()

    def holds(self, user_id: str) -> bool:
        """A live connection or a waiting long-poll of the user is here."""
        return user_id in self._by_user or user_id in self._polls

    def _attached(self, user_id: str) -> None:
        if self.listener is not None:
            self.listener.user_attached(user_id)

    def _maybe_detached(self, user_id: str) -> None:
        if not self.holds(user_id) and self.listener is not None:
            self.listener.user_detached(user_id)

    def connection_count(self, user_id: str) -> int:
        """The user's live connections here."""
        return len(self._by_user.get(user_id, ()))

    async def is_online(self, user_id: str) -> bool:
        return self.holds(user_id)

    def online_users(self) -> list[str]:
        return list(set(self._by_user) | set(self._polls))

    def on_pending(self, user_id: str) -> None:
        """The user's inbox has new messages: feed every connection of theirs, wake long-polls."""
        for cursor in list(self._by_user.get(user_id, {}).values()):
            self._pump(cursor)
        self._wake_long_polls(user_id)

    def _wake_long_polls(self, user_id: str) -> None:
        # A copy: a woken long-poll may end before the next one is woken.
        for poll in list(self._polls.get(user_id, ())):
            if not poll.woken.called:
                poll.woken.callback(True)

    def on_stored(self, user_id: str, seq: int | None, previous_seq: int | None, message: dict) -> None:
        """A message for the user was stored here as `seq`, after messages up to `previous_seq`:
        hand it straight to each connection that has pushed everything before it and not it,
        and let the others read it back from the inbox."""
        delivered = 0
        for cursor in list(self._by_user.get(user_id, {}).values()):
            if (
                seq is not None and not cursor.running and not cursor.rewind and not cursor.held
                and previous_seq <= cursor.after_seq < seq and cursor.connection.writable
            ):
                cursor.after_seq = seq
                cursor.connection.push_message(message)
                delivered += 1
            else:
                self._pump(cursor)
        if delivered:
            self._metrics.delivered("live", delivered)
        self._wake_long_polls(user_id)

    def on_sessions_revoked(self, user_id: str, token_hashes: list[str], reason: str | None = None) -> None:
        revoked = set(token_hashes)
        for connection, cursor in list(self._by_user.get(user_id, {}).items()):
            if cursor.token_hash in revoked:
                self.detach(connection)
                connection.session_revoked(reason)
        for poll in list(self._polls.get(user_id, ())):
            if poll.token_hash in revoked:
                # Let go of the user at once, so a message sent from now on is not "delivered".
                poll.revoked = True
                self.end_long_poll(poll)

    def redeliver(self, user_id: str, attached_before: float) -> None:
        """Push again what the user's connections have not acknowledged.

        Only connections attached before `attached_before` (seconds): a newer one is still
        receiving its backlog, so nothing it holds has been waiting long.
        """
        for cursor in list(self._by_user.get(user_id, {}).values()):
            if cursor.attached_at < attached_before:
                cursor.rewind = True
                self._pump(cursor)

    def long_poll(self, user_id: str, token_hash: str, timeout: float) -> LongPoll:
        """Start waiting for a message for the user, for at most `timeout` seconds, on behalf of
        the session `token_hash`. Past the user's limit of long-polls the oldest one ends."""
        polls = self._polls.get(user_id)
        if polls and self._long_polls_per_user and len(polls) >= self._long_polls_per_user:
            self.end_long_poll(polls[0])
            polls = self._polls.get(user_id)
        poll = LongPoll(user_id, token_hash, Deferred())
        if polls is None:
            self._polls[user_id] = [poll]
            if user_id not in self._by_user:
                self._attached(user_id)
        else:
            polls.append(poll)
        poll.timer = self._clock.callLater(timeout, self._poll_timed_out, poll)
        return poll

    @staticmethod
    def _poll_timed_out(poll: LongPoll) -> None:
        poll.timer = None
        if not poll.woken.called:
            poll.woken.callback(False)

    def end_long_poll(self, poll: LongPoll) -> None:
        """The long-poll no longer holds the user (answered, replaced, revoked or left); wakes it
        with False if it still waits. Ending one twice does nothing."""
        if poll.timer is not None:
            poll.timer.cancel()
            poll.timer = None
        if not poll.woken.called:
            poll.woken.callback(False)
        polls = self._polls.get(poll.user_id)
        if polls is None or poll not in polls:
            return
        polls.remove(poll)
        if not polls:
            del self._polls[poll.user_id]
            self._maybe_detached(poll.user_id)

    def resume(self, connection: LiveConnection) -> None:
        """The connection is writable again: push what waited meanwhile."""
        user_id = self._user_of.get(connection)
        cursor = self._by_user[user_id][connection] if user_id is not None else None
        if cursor is not None and cursor.held:
            self._pump(cursor)

    def _pump(self, cursor: _Cursor) -> None:
        if not cursor.connection.writable:
            # The client is not reading: what arrives stays in the inbox until resume().
            cursor.held = True
            return
        cursor.held = False
        if cursor.running:
            cursor.again = True
            return
        cursor.running = True
        ensureDeferred(self._drain(cursor))

    async def _drain(self, cursor: _Cursor) -> None:
        try:
            while cursor.attached:
                cursor.again = False
                if cursor.rewind:
                    cursor.rewind, cursor.after_seq = False, 0
                entries = await self._inbox.fetch(
                    cursor.user_id, cursor.after_seq, FETCH_BATCH, int(self._clock.seconds() * 1000)
                )
                if not cursor.attached:
                    return
                if cursor.rewind:
                    # A redelivery came in while fetching; this batch would move the cursor past it.
                    continue
                pushed = 0
                for entry in entries:
                    if not cursor.connection.writable:
                        break
                    cursor.after_seq = entry.seq
                    cursor.connection.push_message(decode_envelope(entry.envelope))
                    pushed += 1
                if pushed:
                    self._metrics.delivered("live" if cursor.drained_once else "inbox", pushed)
                if not cursor.connection.writable:
                    # Backpressure: the rest waits in the inbox until the client reads (resume()).
                    cursor.held = True
                    return
                if len(entries) < FETCH_BATCH:
                    cursor.drained_once = True
                    if not cursor.again:
                        return
        except Exception:
            # The inbox is unreachable: try again later; the messages stay stored meanwhile.
            self.log.failure("delivery to a connection failed; retrying in {delay}s", delay=RETRY_DELAY_SECONDS)
            if cursor.attached:
                cursor.retry_call = self._clock.callLater(RETRY_DELAY_SECONDS, self._retry, cursor)
        finally:
            cursor.running = False

    def _retry(self, cursor: _Cursor) -> None:
        cursor.retry_call = None
        if cursor.attached:
            self._pump(cursor)


class LocalWakeUps:
    """WakeUps within one process (embedded mode): the hub is every holder there is."""

    def __init__(self, hub: DeliveryHub) -> None:
        self._hub = hub

    def stored(self, recipient_id: str, accepted: Accepted, message: dict) -> None:
        self._hub.on_stored(recipient_id, accepted.seq, accepted.previous_seq, message)

    def sessions_revoked(self, user_id: str, token_hashes: list[str], reason: str | None = None) -> None:
        self._hub.on_sessions_revoked(user_id, token_hashes, reason)

    async def pending(self, user_id: str) -> None:
        self._hub.on_pending(user_id)

    async def redeliver(self, user_id: str, attached_before: float) -> None:
        self._hub.redeliver(user_id, attached_before)
