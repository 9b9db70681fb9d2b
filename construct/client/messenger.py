"""The reference client: an account's state file and its connection to the server, together.

`Messenger` registers or logs in, keeps the account's keys published (the bundle with the real
user id, a fresh signed prekey every week, one-time prekeys topped up), sends messages and
receives them. The rules it follows (docs/crypto.md, docs/protocol.md §8):

- a message is encrypted and saved (outbox, session, history) before it is sent, and resent
  unchanged until the server acknowledges it;
- an incoming message is decrypted and saved before it is acknowledged; duplicates are
  acknowledged and dropped;
- a contact's master identity key is pinned on first contact and a different one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from construct.client import account
from construct.client.account import SENDER_GONE, Incoming, PeerBundle
from construct.client.crypto import InvalidBundle, b64decode, b64encode, safety_number, verify_key_bundle
from construct.client.store import StateExists, StateStore
from construct.client.transport import (
    AuthenticationFailed,
    Channel,
    ConnectFailed,
    ConnectionClosed,
    Link,
    RequestTimeout,
    ServerAddress,
    ServerError,
)
from construct.core.validation import USERNAME_PATTERN

# One-shot commands give up after this many failed connection attempts (with backoff).
CONNECT_ATTEMPTS = 3
SEND_ATTEMPTS = 5
RETRY_DELAY_SECONDS = 0.5
# Worth resending the very same message: the server may not have stored it.
RETRYABLE_CODES = frozenset({"SERVICE_UNAVAILABLE", "SERVER_ERROR"})
# Refused for now, not for good: the message stays in the outbox for a later run.
RATE_LIMITED = "RATE_LIMITED"
TRANSIENT_ERRORS = (RequestTimeout, ConnectionClosed)
# What a long-running listener waits out instead of giving up.
NETWORK_ERRORS = (RequestTimeout, ConnectionClosed, ConnectFailed)


class UnusableUsername(Exception):
    """Not a username any account can have."""


class SelfMessage(Exception):
    """Messages to oneself are not supported (one state cannot be both ends of a session)."""


@dataclass(frozen=True)
class Sent:
    message_id: str
    username: str
    user_id: str
    status: str
    timestamp: int


def _username(text: str) -> str:
    username = text.lower()
    if not USERNAME_PATTERN.fullmatch(username):
        raise UnusableUsername(f"{text!r} is not a username (3 to 32 characters of a-z 0-9 _ . -)")
    return username


class Messenger:
    log = Logger()

    def __init__(self, reactor: Any, store: StateStore, address: ServerAddress, encoding: str) -> None:
        self._reactor = reactor
        self._store = store
        self._link = Link(reactor, address, encoding, self._pushed)
        self._link.authenticate = self._resume_session
        # While False (during register and login) a new connection is not resumed with the
        # stored token, which may be the very thing that stopped working.
        self._resume = True
        self._incoming: defer.DeferredQueue = defer.DeferredQueue()
        self.on_warning: Callable[[str], None] = lambda text: self.log.warn("{text}", text=text)

    def _now(self) -> float:
        return self._reactor.seconds()

    async def close(self) -> None:
        await self._link.stop()

    # Sessions with the server

    async def _resume_session(self, channel: Channel) -> None:
        if not self._resume:
            return
        token = await self._store.read(lambda data: account.account(data)["sessionToken"])
        try:
            reply = await channel.request("connect", {"sessionToken": token})
        except ServerError as e:
            if e.code in ("INVALID_TOKEN", "SESSION_EXPIRED"):
                self._session_lost()
            raise
        if reply["type"] == "sessionExpired":
            self._session_lost()

    def _session_lost(self) -> None:
        error = AuthenticationFailed("the session has expired or was revoked; log in again")
        self._incoming.put(error)
        raise error

    def _pushed(self, frame: dict) -> None:
        if frame["type"] == "message":
            self._incoming.put(frame["payload"])
        elif frame["type"] == "sessionExpired":
            self._incoming.put(AuthenticationFailed("the session was revoked (logout or password change); log in again"))

    async def _request(self, message_type: str, payload: dict | None = None) -> dict:
        return await self._link.request(message_type, payload, fail_after=CONNECT_ATTEMPTS)

    async def register(self, server: str, username: str, password: str) -> dict:
        """Create the account: keys first (saved), then `register`, then publish the real bundle."""
        username = _username(username)
        now = self._now()
        try:
            await self._store.create(account.new_state(server, now))
        except StateExists:
            # A state without an account is what an earlier failed attempt left: reuse its keys.
            existing = await self._store.read(lambda data: data.get("account"))
            if existing:
                raise RuntimeError(
                    f"{self._store.path} already holds the account {existing['username']!r}; use another --state"
                ) from None
        bundle = await self._store.read(account.registration_bundle)
        self._resume = False
        reply = await self._request("register", {"username": username, "password": password, "publicKey": bundle})
        await self._store.update(partial(account.set_account, payload=reply["payload"]))
        self._resume = True
        await self._keep_keys()
        return reply["payload"]

    async def login(self, username: str, password: str) -> dict:
        """A new session for the account in this state file (the keys never leave it)."""
        username = _username(username)
        current = await self._store.read(account.account)
        if current["username"] != username:
            raise RuntimeError(f"{self._store.path} holds the account {current['username']!r}, not {username!r}")
        self._resume = False
        reply = await self._request("login", {"username": username, "password": password})
        if reply["payload"]["userId"] != current["userId"]:
            raise RuntimeError(f"the server's {username!r} is another account than the one in {self._store.path}")
        await self._store.update(partial(account.set_account, payload=reply["payload"]))
        self._resume = True
        await self._keep_keys()
        return reply["payload"]

    async def _my_id(self) -> str:
        """The account's user id; NotRegistered, before any connection, when there is none."""
        return await self._store.read(lambda data: account.account(data)["userId"])

    async def whoami(self) -> dict:
        def describe(data: dict) -> dict:
            me = account.account(data)
            return {
                "username": me["username"],
                "userId": me["userId"],
                "server": data["server"],
                "sessionExpires": me["expires"],
                "masterIdentityKey": b64encode(account.identity(data).master_public),
            }

        return await self._store.read(describe)

    # Keys on the server

    async def maintain_keys(self) -> None:
        """Publish the bundle (rotating the signed prekey weekly) and top up one-time prekeys."""
        now = self._now()
        bundle = await self._store.update(partial(account.signed_prekey_to_publish, now=now))
        if bundle is not None:
            await self._request("rotatePrekey", {"update": bundle})
            key_id = verify_key_bundle(bundle).signed_prekey_id
            await self._store.update(partial(account.signed_prekey_published, bundle_key_id=key_id, now=now))
        await self._refill_prekeys()

    async def _refill_prekeys(self) -> None:
        count = (await self._request("getPrekeyCount"))["payload"]["count"]
        if count >= account.PREKEY_LOW_WATER:
            return
        # The private halves are saved before the public ones are handed out.
        upload = await self._store.update(partial(account.new_one_time_prekeys, count=account.PREKEY_BATCH - count))
        await self._request("uploadPrekeys", {"prekeys": upload})

    # Contacts

    async def _lookup(self, username: str) -> tuple[str, str]:
        username = _username(username)
        reply = await self._request("lookupUser", {"username": username})
        return reply["payload"]["userId"], reply["payload"]["username"]

    async def _fetch_bundle(self, user_id: str, take_prekey: bool) -> PeerBundle:
        """The peer's verified bundle, with one of their one-time prekeys when starting a session."""
        payload = (await self._request("getPublicKey", {"userId": user_id, "oneTimePrekey": take_prekey}))["payload"]
        keys = verify_key_bundle(payload, expected_user_id=user_id)
        return PeerBundle(payload["username"], keys, payload.get("oneTimePrekey"))

    async def safety_number(self, username: str) -> dict:
        """The safety number with a contact, pinning their key first if they are new."""
        await self._my_id()
        user_id, name = await self._lookup(username)
        known = await self._store.read(lambda data: data["contacts"].get(user_id))
        if known is None:
            bundle = await self._fetch_bundle(user_id, take_prekey=False)
            await self._store.update(partial(account.pin_contact, user_id=user_id, bundle=bundle, now=self._now()))

        def compute(data: dict) -> dict:
            me, contact = account.account(data), data["contacts"][user_id]
            number = safety_number(
                me["userId"], account.identity(data).master_public, user_id, b64decode(contact["masterKey"])
            )
            return {"username": name, "userId": user_id, "safetyNumber": number, "pinnedAt": contact["pinnedAt"]}

        return await self._store.read(compute)

    async def history(self, username: str) -> list[dict]:
        username = _username(username)

        def entries(data: dict) -> list[dict]:
            found = account.contact_by_name(data, username)
            if found is None:
                return []
            user_id, contact = found
            return [dict(entry, peerName=contact["username"]) for entry in data["history"] if entry["peer"] == user_id]

        return await self._store.read(entries)

    # Sending

    async def send(self, username: str, text: str) -> Sent:
        """Encrypt, save, send; resend the same message until the server has it."""
        me = await self._my_id()
        user_id, name = await self._lookup(username)
        if user_id == me:
            raise SelfMessage("sending to yourself is not supported")
        await self.flush_outbox()
        now = self._now()
        message = await self._store.update(
            partial(account.prepare_outgoing, peer_id=user_id, text=text, bundle=None, now=now)
        )
        if message is None:
            bundle = await self._fetch_bundle(user_id, take_prekey=True)
            message = await self._store.update(
                partial(account.prepare_outgoing, peer_id=user_id, text=text, bundle=bundle, now=now)
            )
        ack = await self._deliver(message)
        # After the message: a bundle left unpublished at registration gets published here.
        await self._keep_keys()
        return Sent(message["id"], name, user_id, ack["status"], message["timestamp"])

    async def flush_outbox(self) -> None:
        """Send, in order, what an earlier run encrypted and saved but never got acknowledged."""
        for message in await self._store.read(lambda data: list(data["outbox"])):
            try:
                await self._deliver(message)
            except ServerError as e:
                if e.code in RETRYABLE_CODES or e.code == RATE_LIMITED:
                    raise
                self.on_warning(f"an earlier message ({message['id']}) was refused for good: {e.code}")

    async def _deliver(self, message: dict) -> dict:
        last_error: Exception | None = None
        for attempt in range(SEND_ATTEMPTS):
            if attempt:
                await task.deferLater(self._reactor, RETRY_DELAY_SECONDS * 2 ** (attempt - 1), lambda: None)
            try:
                reply = await self._request("sendMessage", account.wire_message(message))
            except ServerError as e:
                if e.code == RATE_LIMITED:
                    raise
                if e.code not in RETRYABLE_CODES:
                    await self._store.update(partial(account.outgoing_settled, message_id=message["id"], status="failed"))
                    raise
                last_error = e
                continue
            except TRANSIENT_ERRORS as e:
                last_error = e
                continue
            await self._store.update(partial(account.outgoing_settled, message_id=message["id"], status="sent"))
            return reply["payload"]
        # Still in the outbox: the next run sends it again, unchanged.
        assert last_error is not None
        raise last_error

    # Receiving

    async def listen(self, on_message: Callable[[dict], Awaitable[None] | None], count: int | None = None) -> None:
        """Receive until `count` messages were stored (forever when None).

        Connects (giving up after a few failed attempts at first, retrying forever once it has
        been connected), sends what the outbox holds, keeps the keys published, then handles
        each pushed message in order: decrypt, save, tell `on_message`, acknowledge.
        """
        await self._my_id()
        await self._link.channel(fail_after=CONNECT_ATTEMPTS)
        try:
            await self.flush_outbox()
        except NETWORK_ERRORS as e:
            self.on_warning(f"messages in the outbox stay there for now: {e}")
        await self._keep_keys()
        received = 0
        while count is None or received < count:
            item = await self._incoming.get()
            if isinstance(item, Exception):
                raise item
            try:
                outcome = await self._receive(item)
            except (AuthenticationFailed, defer.CancelledError):
                raise
            except Exception as e:
                # Not acknowledged: it comes again later, and the messages after it go on.
                self.log.failure("handling message {id} failed", id=item.get("id"))
                self.on_warning(f"could not handle message {item.get('id')} now: {e}")
                continue
            if outcome.status == "received":
                received += 1
                try:
                    result = on_message(outcome.entry)
                    if result is not None:
                        await result
                except Exception:
                    # It is saved already; a display problem must not stop the acknowledgement.
                    self.log.failure("showing message {id} failed", id=outcome.entry["id"])
            elif outcome.status in ("rejected", "undecryptable"):
                self.on_warning(f"dropped message {outcome.entry['id']} from {outcome.entry['peer']}: {outcome.reason}")
            await self._acknowledge(item["id"])
            if outcome.used_one_time_prekey:
                await self._keep_keys()

    async def _keep_keys(self) -> None:
        """maintain_keys, where a failure is only a warning: the next run tries again."""
        try:
            await self.maintain_keys()
        except (ServerError, *NETWORK_ERRORS) as e:
            self.on_warning(f"could not update the keys on the server (the next send or listen retries): {e}")

    async def _receive(self, message: dict) -> Incoming:
        """Decrypt and save one message, fetching the sender's bundle when it is needed."""
        now = self._now()
        outcome = await self._store.update(partial(account.accept_incoming, message=message, sender=None, now=now))
        if outcome.status != "need-bundle":
            return outcome
        sender_id = str(message.get("from"))
        sender: PeerBundle | str
        while True:
            try:
                sender = await self._fetch_bundle(sender_id, take_prekey=False)
                break
            except ServerError as e:
                if e.code == "USER_NOT_FOUND":
                    sender = SENDER_GONE
                    break
                if e.code == RATE_LIMITED:
                    # Keys for this sender are refused for now: wait as long as the server asks.
                    await task.deferLater(self._reactor, e.retry_after or RETRY_DELAY_SECONDS, lambda: None)
                    continue
                if e.code not in RETRYABLE_CODES:
                    raise
            except NETWORK_ERRORS:
                pass
            except InvalidBundle as e:
                self.on_warning(f"the key bundle of {sender_id} does not verify: {e}")
                sender = SENDER_GONE
                break
            # Keep the order: this message is handled before any later one.
            await task.deferLater(self._reactor, RETRY_DELAY_SECONDS, lambda: None)
        return await self._store.update(partial(account.accept_incoming, message=message, sender=sender, now=now))

    async def _acknowledge(self, message_id: str) -> None:
        """Acknowledge a saved message; if the connection drops first, it comes again and is a duplicate."""
        try:
            channel = await self._link.channel()
            await channel.acknowledge([message_id])
        except TRANSIENT_ERRORS:
            pass
