"""Accounts and sessions: register, login, resume, logout, change password."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

import bcrypt
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from construct.core.abuse import AbuseLimits
from construct.core.fairness import FairShare
from construct.core.keys import validate_bundle
from construct.core.sealed import parse_access_update
from construct.core.validation import USERNAME_PATTERN, check_password_strength, normalize_username
from construct.errors import ConstructError, user_not_found_error
from construct.storage.accounts import AccountStore, User

SESSION_TTL_SECONDS = 30 * 24 * 3600
# Live sessions one user may have; a login past it ends the oldest.
MAX_SESSIONS_PER_USER = 10
# secrets.token_urlsafe(32): 43 characters of the URL-safe base64 alphabet.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def invalid_credentials() -> ConstructError:
    return ConstructError("INVALID_CREDENTIALS", "Invalid credentials", 401)


def invalid_token() -> ConstructError:
    return ConstructError("INVALID_TOKEN", "Session token is invalid or expired", 401)


def session_expired() -> ConstructError:
    return ConstructError("SESSION_EXPIRED", "The session has expired; log in again", 401)


@dataclass(frozen=True)
class Identity:
    """Who a connection or request is authenticated as, and by which session."""

    user_id: str
    username: str
    token_hash: str


@dataclass(frozen=True)
class IssuedSession:
    identity: Identity
    token: str
    expires: int


class KnownUsers:
    """Which user ids exist, remembered for a while, so a send costs no SQL query.

    Only existence is remembered: an account is found the moment it is registered. An account
    deleted meanwhile can still be sent to for up to `ttl_seconds`; those messages expire unread.
    """

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[bool]],
        clock: IReactorTime,
        ttl_seconds: float = 60.0,
        capacity: int = 100_000,
    ) -> None:
        self._lookup = lookup
        self._clock = clock
        self._ttl = ttl_seconds
        self._capacity = capacity
        # user id -> when it was last seen to exist; insertion order is age order.
        self._seen: dict[str, float] = {}

    def exists(self, user_id: str) -> bool | Deferred:
        """True at once for a user seen lately (every send asks), else a Deferred of the lookup."""
        now = self._clock.seconds()
        seen = self._seen.get(user_id)
        if seen is not None and now - seen < self._ttl:
            return True
        return ensureDeferred(self._look_up(user_id, now))

    async def _look_up(self, user_id: str, now: float) -> bool:
        found = await self._lookup(user_id)
        self._seen.pop(user_id, None)
        if found:
            if len(self._seen) >= self._capacity:
                del self._seen[next(iter(self._seen))]
            self._seen[user_id] = now
        return found


def dummy_hash(cost: int) -> bytes:
    """A well-formed bcrypt hash of no password, made without hashing: checking a password
    against it costs what checking against a real hash of that cost does (bcrypt hashes the
    candidate with the stored salt and cost, then compares)."""
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return bcrypt.gensalt(cost) + "".join(secrets.choice(alphabet) for _ in range(31)).encode("ascii")


class PasswordHasher:
    """bcrypt, always on a thread: `run_blocking(fn, *args)` returns a Deferred and runs at most
    `slots` at once. Each hash has an owner (the client address it is for), and owners take
    turns, so that one client's many hashes leave others their share."""

    def __init__(self, cost: int, run_blocking: Callable[..., Deferred], slots: int = 1) -> None:
        self._cost = cost
        self._share = FairShare(run_blocking, slots)
        # Ready from the start, so even the first unknown user costs one check and nothing more.
        self._dummy_hash = dummy_hash(cost)

    async def hash(self, password: str, owner: str) -> str:
        hashed = await self._share.run(owner, bcrypt.hashpw, password.encode("utf-8"), bcrypt.gensalt(self._cost))
        return hashed.decode("ascii")

    async def verify(self, password: str, hashed: str | None, owner: str) -> bool:
        """Check a password; with no hash, burn the same time so unknown users look like wrong passwords."""
        encoded = password.encode("utf-8")
        # bcrypt refuses more than 72 bytes, and no stored password is longer.
        if hashed is None or len(encoded) > 72:
            await self._share.run(owner, bcrypt.checkpw, encoded[:72], self._dummy_hash)
            return False
        return await self._share.run(owner, bcrypt.checkpw, encoded, hashed.encode("ascii"))


class AccountService:
    def __init__(
        self,
        store: AccountStore,
        hasher: PasswordHasher,
        clock: IReactorTime,
        on_sessions_revoked: Callable[[str, list[str]], None],
        limits: AbuseLimits,
        session_ttl: float = SESSION_TTL_SECONDS,
        max_sessions: int = MAX_SESSIONS_PER_USER,
    ) -> None:
        self._store = store
        self._max_sessions = max_sessions
        self._limits = limits
        self._hasher = hasher
        self._clock = clock
        self._on_sessions_revoked = on_sessions_revoked
        self._session_ttl = session_ttl

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _new_token(self) -> tuple[str, int]:
        return secrets.token_urlsafe(32), self._now_ms() + int(self._session_ttl * 1000)

    async def register(
        self, username: Any, password: Any, raw_bundle: Any, address: str, access_fields: Mapping[str, Any] = {}
    ) -> IssuedSession:
        """`access_fields`: the request's, of which the unidentified access registered with the
        bundle is read (construct.core.sealed.parse_access_update)."""
        username = normalize_username(username)
        if not isinstance(password, str):
            raise ConstructError("INVALID_FORMAT", "'password' is required and must be a str")
        check_password_strength(password)
        bundle = validate_bundle(raw_bundle, None)
        access = parse_access_update(access_fields)
        # Counted once the request is well formed: each one costs a hash, taken or not.
        await self._limits.check_registration(address)
        user = User(str(uuid.uuid4()), username, await self._hasher.hash(password, address))
        token, expires_ms = self._new_token()
        await self._store.create_account(user, bundle, token_hash(token), self._now_ms(), expires_ms, access)
        return IssuedSession(Identity(user.id, user.username, token_hash(token)), token, expires_ms // 1000)

    async def login(self, username: Any, password: Any, address: str) -> IssuedSession:
        if not isinstance(username, str) or not isinstance(password, str) or len(password) > 1024:
            raise invalid_credentials()
        await self._limits.begin_login(username, address)
        username = username.lower()
        # A name no account can have is not looked up (PostgreSQL refuses NUL characters, for one).
        user = await self._store.get_user_by_name(username) if USERNAME_PATTERN.fullmatch(username) else None
        # Verify even for unknown users, against a dummy hash, so timing does not reveal them.
        password_ok = await self._hasher.verify(password, user.password_hash if user else None, address)
        if user is None or not password_ok:
            raise invalid_credentials()
        await self._limits.login_succeeded(username, address)
        token, expires_ms = self._new_token()
        revoked = await self._store.create_session(token_hash(token), user.id, self._now_ms(), expires_ms, self._max_sessions)
        if revoked:
            self._on_sessions_revoked(user.id, revoked)
        return IssuedSession(Identity(user.id, user.username, token_hash(token)), token, expires_ms // 1000)

    async def authenticate(self, token: Any) -> Identity:
        """The identity behind a session token; SESSION_EXPIRED or INVALID_TOKEN otherwise."""
        if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
            raise invalid_token()
        hashed = token_hash(token)
        record = await self._store.get_session(hashed)
        if record is None:
            # A token of ours that is gone was revoked or swept after expiry: as the seed
            # did for a missing session, tell the client to log in again.
            raise session_expired()
        if record.expires_at_ms <= self._now_ms():
            await self._store.delete_session(hashed)
            raise session_expired()
        return Identity(record.user_id, record.username, hashed)

    async def lookup(self, username: Any, requester: Identity, address: str) -> User:
        """The account with this username (any letter case); USER_NOT_FOUND otherwise.

        Limited per requester and address: names are what an enumeration of users probes."""
        username = normalize_username(username)
        await self._limits.check_lookup(requester.user_id, address)
        user = await self._store.get_user_by_name(username)
        if user is None:
            raise user_not_found_error()
        return user

    async def logout(self, identity: Identity) -> None:
        await self._store.delete_session(identity.token_hash)
        self._on_sessions_revoked(identity.user_id, [identity.token_hash])

    async def change_password(self, identity: Identity, old: Any, new: Any, confirm: Any, address: str) -> None:
        """Change the password and revoke every other session of the user."""
        for name, value in (("oldPassword", old), ("newPassword", new), ("newPasswordConfirm", confirm)):
            if not isinstance(value, str):
                raise ConstructError("INVALID_FORMAT", f"'{name}' is required and must be a str")
        if new != confirm:
            raise ConstructError("PASSWORD_MISMATCH", "New passwords do not match")
        if new == old:
            raise ConstructError("SAME_PASSWORD", "New password must be different from old password")
        check_password_strength(new)
        user = await self._store.get_user(identity.user_id)
        if user is None:
            raise invalid_token()
        if not await self._password_matches(user, old, address):
            raise ConstructError("INVALID_PASSWORD", "Old password is incorrect", 401)
        revoked = await self._store.change_password(user.id, await self._hasher.hash(new, address), identity.token_hash)
        if revoked:
            self._on_sessions_revoked(user.id, revoked)

    async def confirm_password(self, identity: Identity, password: Any, address: str) -> None:
        """INVALID_PASSWORD unless `password` is the user's current one (before deleteAccount)."""
        if not isinstance(password, str):
            raise ConstructError("INVALID_FORMAT", "'password' is required and must be a str")
        user = await self._store.get_user(identity.user_id)
        if user is None:
            raise invalid_token()
        if not await self._password_matches(user, password, address):
            raise ConstructError("INVALID_PASSWORD", "The password is incorrect", 401)

    async def _password_matches(self, user: User, password: str, address: str) -> bool:
        """A password check under the login limits: a stolen session token gives no more
        guesses at the password than the login form does."""
        await self._limits.begin_login(user.username, address)
        if not await self._hasher.verify(password, user.password_hash, address):
            return False
        await self._limits.login_succeeded(user.username, address)
        return True

    async def delete_expired_sessions(self) -> None:
        """Remove expired sessions and unbind the connections still using them."""
        by_user: dict[str, list[str]] = {}
        for user_id, hashed in await self._store.delete_expired_sessions(self._now_ms()):
            by_user.setdefault(user_id, []).append(hashed)
        for user_id, hashes in by_user.items():
            self._on_sessions_revoked(user_id, hashes)
