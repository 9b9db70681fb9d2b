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
    # Past any of these, a user's bundle is still served, without a one-time prekey (X3DH does
    # not need one). Per requester and per pair as well as per owner, so that a few accounts
    # cannot take an owner's whole budget and leave an honest first contact none.
    prekeys_served_per_user: Limit = Limit(100, 3600)
    prekeys_taken_per_requester: Limit = Limit(100, 3600)
    prekeys_taken_per_pair: Limit = Limit(3, 3600)
    # Name lookups: per user, and per address so that many accounts of one client add no more.
    # Room for clients that look a name up before each message to a contact they cannot seal to.
    lookups_per_user: Limit = Limit(1000, 3600)
    lookups_per_address: Limit = Limit(3000, 3600)
    login_failures_per_address: Limit = Limit(20, 900)
    login_failures_per_account_address: Limit = Limit(5, 900)
    # Past this, each address gets one attempt per window on the account, not a lockout.
    login_failures_per_account: Limit = Limit(50, 3600)
    # Every password check, right or wrong (each costs a hash): per address, and per account
    # from one address (per account alone would let anyone lock its owner out).
    password_checks_per_address: Limit = Limit(100, 900)
    password_checks_per_account_address: Limit = Limit(20, 900)
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

    async def may_serve_prekey(self, requester_id: str, target_id: str) -> bool:
        """Count a one-time prekey handed out; False once the requester's, the pair's or the
        owner's budget for the window is spent (then nothing is counted)."""
        # The requester's hash tag on both of its keys: one atomic call, then the owner's.
        requester, target = self._private(requester_id), self._private(target_id)
        by_requester = (
            Charge(f"{{{requester}}}:prekeys-taken", self.settings.prekeys_taken_per_requester),
            Charge(f"{{{requester}}}:prekeys-taken:{target}", self.settings.prekeys_taken_per_pair),
        )
        if await self._counters.take(by_requester) is not None:
            return False
        if await self._counters.take([Charge(f"{{{target}}}:prekeys", self.settings.prekeys_served_per_user)]) is None:
            return True
        await self._counters.give_back(by_requester)
        return False

    async def check_lookup(self, requester_id: str, address: str) -> None:
        """Count a username lookup, per user and per client address (two hash tags: two calls,
        the first given back when the second refuses)."""
        by_address = Charge(f"{{{self._private(address)}}}:lookups", self.settings.lookups_per_address)
        await self._take(self._counters, "Too many user lookups from this address", by_address)
        by_user = Charge(f"{{{self._private(requester_id)}}}:lookups", self.settings.lookups_per_user)
        retry_after = await self._counters.take([by_user])
        if retry_after is not None:
            await self._counters.give_back([by_address])
            raise rate_limited(retry_after, "Too many user lookups")

    # Logins: failures slow an address and an account down, and never lock the owner out.

    def _login_keys(self, username: str, address: str) -> tuple[Charge, Charge, Charge]:
        account = self._private(username.lower())
        return (
            Charge(f"{{{self._private(address)}}}:login-failures", self.settings.login_failures_per_address),
            Charge(f"{{{account}}}:login-failures:{self._private(address)}", self.settings.login_failures_per_account_address),
            Charge(f"{{{account}}}:login-failures", self.settings.login_failures_per_account),
        )

    def _check_keys(self, username: str, address: str) -> tuple[Charge, Charge]:
        """Every password check, never given back: each one cost a hash. Same hash tags as
        the failures' keys, so that each is counted with them in one call."""
        account = self._private(username.lower())
        return (
            Charge(f"{{{self._private(address)}}}:password-checks", self.settings.password_checks_per_address),
            Charge(f"{{{account}}}:password-checks:{self._private(address)}", self.settings.password_checks_per_account_address),
        )

    async def begin_login(self, username: str, address: str) -> None:
        """Count a password check, and count it as failed before it runs, or refuse it (RATE_LIMITED).

        Counted first, atomically, so that concurrent attempts cannot all pass a check made
        before any of them failed; `login_succeeded` gives the failure back. An account under
        attack from many addresses leaves each address one attempt per window: the owner, who
        gets it right the first time, still gets in from anywhere.
        """
        by_address, by_pair, by_account = self._login_keys(username, address)
        checks_by_address, checks_by_pair = self._check_keys(username, address)
        await self._take(self._login_counters, "Too many logins from this address", by_address, checks_by_address)
        pair = by_pair
        if by_account.limit.enabled:
            failures, _ = await self._login_counters.window(by_account.key)
            if failures >= by_account.limit.count:
                period = by_pair.limit.period if by_pair.limit.enabled else by_account.limit.period
                pair = Charge(by_pair.key, Limit(1, period))
        retry_after = await self._login_counters.take([pair, checks_by_pair])
        if retry_after is not None:
            await self._login_counters.give_back([by_address, checks_by_address])
            raise rate_limited(retry_after, "Too many logins for this account")
        await self._login_counters.add([by_account])

    async def login_succeeded(self, username: str, address: str) -> None:
        """Give back what begin_login counted, and forget this address's failures on the account."""
        by_address, by_pair, by_account = self._login_keys(username, address)
        # One call per hash tag (the address's, the account's).
        await self._login_counters.give_back([by_address])
        await self._login_counters.give_back([by_account])
        await self._login_counters.clear([by_pair.key])
