"""Abuse limits: how often one sender, address or account may do the costly or dangerous things.

Each check counts in `counters` (Redis in production mode, so every instance sees the same
counts; memory in embedded mode) and refuses with RATE_LIMITED and `retryAfter`, never by
dropping anything silently. A limit whose count is 0 is off.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from construct.core.limits import Allowance, Charge, Limit
from construct.errors import rate_limited


@dataclass(frozen=True)
class AbuseSettings:
    messages_per_sender: Limit = Limit(600, 60)
    messages_per_pair: Limit = Limit(300, 60)
    registrations_per_address: Limit = Limit(10, 3600)
    # Fetches that take one of the owner's one-time prekeys (to start a session).
    key_fetches_per_pair: Limit = Limit(30, 3600)
    # Also bounds the counters one user can create by asking for many (even made-up) users.
    key_fetches_per_requester: Limit = Limit(300, 3600)
    # Fetches without a one-time prekey (checking a sender, a safety number): they use up
    # nothing of the owner's, so one counter per requester suffices. Apart from the budget of
    # the fetches above, so that a stranger whose messages make a client check them many
    # times cannot use up that client's fetches of the stranger (or of anyone).
    bundle_checks_per_requester: Limit = Limit(600, 3600)
    # Past this, a user's bundle is still served, without a one-time prekey (X3DH does not need one).
    prekeys_served_per_user: Limit = Limit(100, 3600)
    login_failures_per_address: Limit = Limit(20, 900)
    login_failures_per_account_address: Limit = Limit(5, 900)
    # Past this, each address gets one attempt per window on the account, not a lockout.
    login_failures_per_account: Limit = Limit(50, 3600)
    # Sealed sends have no sender to count: they are counted by recipient (only once allowed
    # by the recipient's access key), by connection and by client address.
    sealed_per_recipient: Limit = Limit(600, 60)
    sealed_per_connection: Limit = Limit(300, 60)
    sealed_per_address: Limit = Limit(600, 60)


def _refuse_if_limited(retry_after: float | None, what: str) -> None:
    if retry_after is not None:
        raise rate_limited(retry_after, what)


class AbuseLimits:
    def __init__(
        self, counters: Any, settings: AbuseSettings, key_salt: bytes = b"", login_counters: Any = None
    ) -> None:
        """`login_counters` keep the login and registration windows apart from the traffic ones
        (default: the same store), so that a bounded in-memory store full of traffic counters
        never evicts them. `key_salt`, a secret every instance shares, keeps the counters' keys
        from being reversed to user ids, usernames and addresses by hashing guesses."""
        self._counters = counters
        self._login_counters = login_counters if login_counters is not None else counters
        self.settings = settings
        self._salt = key_salt

    def _private(self, value: str) -> str:
        """User ids, usernames and client addresses stay out of the counters' keys (Redis dumps,
        MONITOR): no key pairs two users, so Redis holds no table of who writes to whom."""
        return hmac.new(self._salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    @staticmethod
    async def _take(counters: Any, what: str, *charges: Charge) -> None:
        """Count the charges, all or none; RATE_LIMITED (saying `what`) if one is at its limit."""
        _refuse_if_limited(await counters.take(charges), what)

    def check_send(self, sender_id: str, recipient_id: str) -> Deferred | None:
        """Count a message: None when no message limit is on, else a Deferred that fires once
        it is counted or fails with RATE_LIMITED. Not a coroutine: it runs for every message."""
        if not (self.settings.messages_per_sender.enabled or self.settings.messages_per_pair.enabled):
            return None
        # Both keys carry the sender's hash tag: one atomic script in Redis Cluster too.
        sender = self._private(sender_id)
        charges = (
            Charge(f"{{{sender}}}:send", self.settings.messages_per_sender),
            Charge(f"{{{sender}}}:send:{self._private(recipient_id)}", self.settings.messages_per_pair),
        )
        return ensureDeferred(self._counters.take(charges)).addCallback(_refuse_if_limited, "Too many messages")

    def check_sealed_connection(self, allowance: Allowance | None, now: float) -> None:
        """Count a sealed send on its connection (None: not a connection, an HTTP request)."""
        if allowance is not None:
            retry_after = allowance.take(self.settings.sealed_per_connection, now)
            _refuse_if_limited(retry_after, "Too many sealed messages on this connection")

    def check_sealed_address(self, address: str) -> Deferred | None:
        """Count a sealed send from a client address: None when the limit is off, else a
        Deferred that fires once counted or fails with RATE_LIMITED."""
        return self._check_one(
            Charge(f"{{{self._private(address)}}}:sealed", self.settings.sealed_per_address),
            "Too many sealed messages from this address",
        )

    def check_sealed_recipient(self, recipient_id: str) -> Deferred | None:
        """Count a sealed send the recipient's access key allowed (so that counting it tells a
        sender nothing it did not know)."""
        return self._check_one(
            Charge(f"{{{self._private(recipient_id)}}}:sealed", self.settings.sealed_per_recipient),
            "Too many sealed messages to this recipient",
        )

    def _check_one(self, charge: Charge, what: str) -> Deferred | None:
        if not charge.limit.enabled:
            return None
        return ensureDeferred(self._counters.take([charge])).addCallback(_refuse_if_limited, what)

    async def check_registration(self, address: str) -> None:
        await self._take(
            self._login_counters,
            "Too many registrations from this address",
            Charge(f"{{{self._private(address)}}}:register", self.settings.registrations_per_address),
        )

    async def check_key_fetch(self, requester_id: str, target_id: str) -> None:
        requester = self._private(requester_id)
        await self._take(
            self._counters,
            "Too many key bundle requests",
            Charge(f"{{{requester}}}:keys", self.settings.key_fetches_per_requester),
            Charge(f"{{{requester}}}:keys:{self._private(target_id)}", self.settings.key_fetches_per_pair),
        )

    async def check_bundle_check(self, requester_id: str) -> None:
        await self._take(
            self._counters,
            "Too many key bundle checks",
            Charge(f"{{{self._private(requester_id)}}}:bundle-checks", self.settings.bundle_checks_per_requester),
        )

    async def may_serve_prekey(self, target_id: str) -> bool:
        """Count a one-time prekey handed out; False once the user's budget for the window is spent."""
        charge = Charge(f"{{{self._private(target_id)}}}:prekeys", self.settings.prekeys_served_per_user)
        return await self._counters.take([charge]) is None

    # Logins: failures slow an address and an account down, and never lock the owner out.

    def _login_keys(self, username: str, address: str) -> tuple[Charge, Charge, Charge]:
        account = self._private(username.lower())
        return (
            Charge(f"{{{self._private(address)}}}:login-failures", self.settings.login_failures_per_address),
            Charge(f"{{{account}}}:login-failures:{self._private(address)}", self.settings.login_failures_per_account_address),
            Charge(f"{{{account}}}:login-failures", self.settings.login_failures_per_account),
        )

    async def begin_login(self, username: str, address: str) -> None:
        """Count a password check as failed before it runs, or refuse it (RATE_LIMITED).

        Counted first, atomically, so that concurrent attempts cannot all pass a check made
        before any of them failed; `login_succeeded` gives the count back. An account under
        attack from many addresses leaves each address one attempt per window: the owner, who
        gets it right the first time, still gets in from anywhere.
        """
        by_address, by_pair, by_account = self._login_keys(username, address)
        await self._take(self._login_counters, "Too many failed logins from this address", by_address)
        pair = by_pair
        if by_account.limit.enabled:
            failures, _ = await self._login_counters.window(by_account.key)
            if failures >= by_account.limit.count:
                period = by_pair.limit.period if by_pair.limit.enabled else by_account.limit.period
                pair = Charge(by_pair.key, Limit(1, period))
        retry_after = await self._login_counters.take([pair])
        if retry_after is not None:
            await self._login_counters.give_back([by_address])
            raise rate_limited(retry_after, "Too many failed logins for this account")
        await self._login_counters.add([by_account])

    async def login_succeeded(self, username: str, address: str) -> None:
        """Give back what begin_login counted, and forget this address's failures on the account."""
        by_address, by_pair, by_account = self._login_keys(username, address)
        # One call per hash tag (the address's, the account's).
        await self._login_counters.give_back([by_address])
        await self._login_counters.give_back([by_account])
        await self._login_counters.clear([by_pair.key])
