"""The reference client: an account's state file and its connection to the server, together.

`Messenger` registers or logs in, keeps the account's keys published (the bundle with the real
user id, a fresh signed prekey every week, one-time prekeys topped up), sends messages and
receives them. The rules it follows (docs/crypto.md, docs/protocol.md §8):

- a message is put in the outbox before anything goes over the network, then looked up,
  encrypted and saved, and sent (the same ChatMessage again until the server acknowledges it);
- an incoming message is decrypted and saved before it is acknowledged; duplicates are
  acknowledged and dropped;
- a contact's name, user id and master identity key are pinned on first contact, and a change
  of any is refused until the user accepts it (`trust`);
- no incoming message holds up the ones behind it: one that cannot be decided now (its
  sender's bundle cannot be fetched) is set aside, unacknowledged, and comes again later;
- a message to a contact whose bundle gave an access key goes sealed (docs/crypto.md, "Sealed
  sender"): over a second connection that never authenticates, without looking the name up
  first; refused, it goes as a plain message instead.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from construct.client import account
from construct.client.account import SENDER_GONE, Incoming, PeerBundle, SelfMessage
from construct.client.crypto import CryptoError, InvalidBundle, b64decode, b64encode, safety_number, verify_key_bundle
from construct.client.sealed import InvalidCertificate
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
# Refused for now, not for good: the message stays in the outbox for a later run. SERVER_BUSY: the
# server is past its capacity and sheds new sends (with a retryAfter, like RATE_LIMITED).
RATE_LIMITED = "RATE_LIMITED"
NOT_NOW_CODES = frozenset({RATE_LIMITED, "INBOX_FULL", "SERVER_BUSY"})
TRANSIENT_ERRORS = (RequestTimeout, ConnectionClosed)
# What a long-running listener waits out instead of giving up.
NETWORK_ERRORS = (RequestTimeout, ConnectionClosed, ConnectFailed)
# A sender's bundle, once fetched (or found missing), answers for that sender this long: a
# stranger sending many forged messages costs one fetch, not one each.
SENDER_CACHE_SECONDS = 600.0
SENDER_CACHE_SIZE = 1000
# The reason `sessionExpired` gives when the account itself was deleted.
ACCOUNT_DELETED = "accountDeleted"
# The server refuses a sealed send: the access key is not (or no longer) the recipient's, or
# there is no such recipient.
ACCESS_DENIED = "UNIDENTIFIED_ACCESS_DENIED"
# A sealed send's ack has no status of its own.
SEALED = "sealed"


class UnusableUsername(Exception):
    """Not a username any account can have."""


class SessionEnded(AuthenticationFailed):
    """The server ended the session (expired, logged out, password changed): log in again."""


class AccountDeleted(AuthenticationFailed):
    """The account itself is gone."""


class SetAside(Exception):
    """A message cannot be decided now (its sender cannot be checked); it comes again later."""


@dataclass(frozen=True)
class Sent:
    message_id: str
    username: str
    user_id: str
    status: str
    timestamp: int


def normalize_username(text: str) -> str:
    username = text.lower()
    if not USERNAME_PATTERN.fullmatch(username):
        raise UnusableUsername(f"{text!r} is not a username (3 to 32 characters of a-z 0-9 _ . -)")
    return username


class Messenger:
    log = Logger()

    def __init__(self, reactor: Any, store: StateStore, address: ServerAddress, encoding: str) -> None:
        self._reactor = reactor
        self._store = store
        self._link = Link(reactor, address, encoding, self._pushed, on_status=self._connection_status)
        self._link.authenticate = self._resume_session
        # Sealed sends: a connection of its own, never authenticated, opened when needed.
        self._anonymous = Link(reactor, address, encoding, lambda frame: None)
        # While False (during register and login) a new connection is not resumed with the
        # stored token, which may be the very thing that stopped working.
        self._resume = True
        self._incoming: defer.DeferredQueue = defer.DeferredQueue()
        self._senders: OrderedDict[str, tuple[float, PeerBundle | str]] = OrderedDict()
        # Until when the server refuses sender checks (RATE_LIMITED): none is asked for meanwhile.
        self._checks_refused_until = 0.0
        self._set_aside: set[str] = set()
        self._username: str | None = None
        self.on_warning: Callable[[str], None] = lambda text: self.log.warn("{text}", text=text)
        # ("lost", reason) and ("reconnected", address) from the connection.
        self.on_status: Callable[[str, str], None] = lambda event, detail: None

    def _now(self) -> float:
        return self._reactor.seconds()

    async def open(self, keep_messages: int | None = None) -> None:
        """Bring an older state file up to date; set how many messages the history keeps."""
        await self._store.transact(_opened)
        if keep_messages is not None:
            await self._store.update(partial(account.set_keep, keep=keep_messages))
        self._username = await self._store.read(lambda data: (data.get("account") or {}).get("username"))

    async def close(self) -> None:
        await self._anonymous.stop()
        await self._link.stop()
        await self._store.close()

    def _connection_status(self, event: str, detail: str) -> None:
        self.on_status(event, detail)

    # Sessions with the server

    async def _resume_session(self, channel: Channel) -> None:
        if not self._resume:
            return
        token = await self._store.read(lambda data: account.account(data)["sessionToken"])
        try:
            reply = await channel.request("connect", {"sessionToken": token})
        except ServerError as e:
            if e.code in ("INVALID_TOKEN", "SESSION_EXPIRED"):
                self._session_lost(None)
            raise
        if reply["type"] == "sessionExpired":
            self._session_lost(reply.get("payload"))

    def _session_lost(self, payload: dict | None) -> None:
        error = self._ended(payload)
        self._incoming.put(error)
        raise error

    def _ended(self, payload: dict | None) -> AuthenticationFailed:
        if (payload or {}).get("reason") == ACCOUNT_DELETED:
            return AccountDeleted(
                "the account was deleted on the server (by its owner or the operator); this state file "
                "can no longer be used: register a new account with another --state"
            )
        return SessionEnded(
            "the server ended this session (it expired, or a logout or password change revoked it); "
            f"log in again with: construct-chat login {self._username or 'USERNAME'}"
        )

    def _pushed(self, frame: dict) -> None:
        if frame["type"] == "message":
            self._incoming.put(frame["payload"])
        elif frame["type"] == "sessionExpired":
            self._incoming.put(self._ended(frame.get("payload")))

    async def _request(self, message_type: str, payload: dict | None = None) -> dict:
        return await self._link.request(message_type, payload, fail_after=CONNECT_ATTEMPTS)

    async def register(self, server: str, username: str, password: str, keep_messages: int | None = None) -> dict:
        """Create the account: keys in memory, `register`, and only once the server has the
        account is the state file written (so a failed attempt leaves nothing behind); then
        the bundle with the real user id and the one-time prekeys are published."""
        username = normalize_username(username)
        if os.path.exists(self._store.path):
            raise StateExists(f"{self._store.path} already exists; use another --state for a new account")
        state = account.new_state(server, self._now())
        if keep_messages is not None:
            account.set_keep(state, keep_messages)
        self._resume = False
        reply = await self._request("register", {
            "username": username, "password": password, "publicKey": account.registration_bundle(state),
            "unidentifiedAccessKey": state["accessKey"],
        })
        account.set_account(state, reply["payload"])
        account.access_key_published(state)
        await self._store.create(state)
        self._username = username
        self._resume = True
        await self._keep_keys()
        return reply["payload"]

    async def login(self, username: str, password: str) -> dict:
        """A new session for the account in this state file (the keys never leave it)."""
        username = normalize_username(username)
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
                "keepMessages": data["keepMessages"],
            }

        return await self._store.read(describe)

    # Keys on the server

    async def maintain_keys(self) -> None:
        """Publish the bundle (rotating the signed prekey weekly) and top up one-time prekeys."""
        now = self._now()
        bundle = await self._store.update(partial(account.signed_prekey_to_publish, now=now))
        if bundle is not None:
            access_key = await self._store.read(lambda data: data["accessKey"])
            await self._request("rotatePrekey", {"update": bundle, "unidentifiedAccessKey": access_key})
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
        reply = await self._request("lookupUser", {"username": normalize_username(username)})
        return reply["payload"]["userId"], reply["payload"]["username"]

    async def _fetch_bundle(self, user_id: str, take_prekey: bool) -> PeerBundle:
        """The peer's verified bundle, with one of their one-time prekeys when starting a session."""
        payload = (await self._request("getPublicKey", {"userId": user_id, "oneTimePrekey": take_prekey}))["payload"]
        keys = verify_key_bundle(payload, expected_user_id=user_id)
        access_key = payload.get("unidentifiedAccessKey")
        return PeerBundle(
            payload["username"], keys, payload.get("oneTimePrekey"),
            access_key if isinstance(access_key, str) else None, payload.get("unrestrictedUnidentifiedAccess") is True,
        )

    async def safety_number(self, username: str) -> dict:
        """The safety number with a contact, pinning their key first if they are new."""
        me = await self._my_id()
        user_id, name = await self._lookup(username)
        if user_id == me:
            raise SelfMessage("that is your own account; a safety number is between two people")
        await self._store.read(partial(account.check_name, username=name, user_id=user_id))
        known = await self._store.read(lambda data: data["contacts"].get(user_id))
        if known is None:
            bundle = await self._fetch_bundle(user_id, take_prekey=False)
            await self._store.update(partial(account.pin_contact, user_id=user_id, bundle=bundle, now=self._now()))

        def compute(data: dict) -> dict:
            contact = data["contacts"][user_id]
            return {"username": name, "userId": user_id, "safetyNumber": _safety_number(data, user_id, contact["masterKey"]),
                    "pinnedAt": contact["pinnedAt"]}

        return await self._store.read(compute)

    async def trust(self, username: str, confirm: Callable[[dict], Awaitable[bool]]) -> dict:
        """Accept the account the server now gives for `username`, with its current key, in
        place of what was pinned: after `confirm` (shown both safety numbers) says yes.

        Returns what was shown, with `changed` (False: nothing to accept) and `trusted`.
        """
        me = await self._my_id()
        user_id, name = await self._lookup(username)
        if user_id == me:
            raise SelfMessage("that is your own account")
        bundle = await self._fetch_bundle(user_id, take_prekey=False)
        master = b64encode(bundle.keys.master_key)

        def describe(data: dict) -> dict:
            found = account.contact_by_name(data, name)
            if found is None and user_id in data["contacts"]:
                found = (user_id, data["contacts"][user_id])
            info: dict[str, Any] = {"username": name, "userId": user_id,
                                    "safetyNumber": _safety_number(data, user_id, master), "pinned": None}
            if found is not None:
                old_id, old = found
                info["pinned"] = {"username": old["username"], "userId": old_id,
                                  "safetyNumber": _safety_number(data, old_id, old["masterKey"])}
            info["changed"] = found is None or found[0] != user_id or found[1]["masterKey"] != master
            return info

        info = await self._store.read(describe)
        info["trusted"] = False
        if info["changed"] and await confirm(info):
            await self._store.update(
                partial(account.trust_contact, username=name, user_id=user_id, bundle=bundle, now=self._now())
            )
            info["trusted"] = True
        return info

    async def export(self, path: str) -> int:
        """Write the key file (the state with its messages inline) to `path`, under the same
        passphrase; returns how many messages it holds."""
        data = await self._store.transact(account.key_file, save=False)
        await self._store.write_copy(path, data)
        return len(data["history"])

    async def history(self, username: str) -> list[dict]:
        return await self._store.transact(partial(account.history_of, username=normalize_username(username)), save=False)

    # Sending

    async def send(self, username: str, text: str) -> Sent:
        """Put the message in the outbox at once, then send the outbox in order, this one last."""
        entry = await self._store.update(
            partial(account.queue_outgoing, peer_name=normalize_username(username), text=text, now=self._now())
        )
        sent = await self.flush_outbox(own=entry["id"])
        # After the message: a bundle left unpublished at registration gets published here.
        await self._keep_keys()
        assert sent is not None
        return sent

    async def flush_outbox(self, own: str | None = None) -> Sent | None:
        """Send, in order, what the outbox holds (earlier runs' messages first); returns how `own`
        went. A message that cannot go for good is marked failed (an error for `own`, a warning
        for the others); one that cannot go now stops the flush, so the order is kept."""
        result = None
        for entry in await self._store.read(lambda data: list(data["outbox"])):
            try:
                sent = await self._send_entry(entry["id"])
            except (ServerError, *NETWORK_ERRORS) as e:
                if not isinstance(e, ServerError) or e.code in RETRYABLE_CODES or e.code in NOT_NOW_CODES:
                    raise
                await self._settle(entry["id"], "failed", _refusal(e))
                if entry["id"] == own:
                    raise
                self.on_warning(f"an earlier message to {entry['peerName']} was not sent: {_refusal(e)}")
                continue
            except (account.IdentityChanged, CryptoError, SelfMessage) as e:
                await self._settle(entry["id"], "failed", str(e))
                if entry["id"] == own:
                    raise
                self.on_warning(f"an earlier message to {entry['peerName']} was not sent: {e}")
                continue
            if entry["id"] == own:
                result = sent
        return result

    async def _send_entry(self, entry_id: str) -> Sent:
        entry = await self._store.read(partial(account.outbox_entry, entry_id=entry_id))
        # Whether this run asked the server who the name is (None: an earlier run did).
        looked_up: bool | None = None
        if entry["peer"] is None:
            # A contact we may seal to is not looked up: that would tell the server whom we write to.
            user_id = await self._store.read(partial(account.sealable_contact, peer_name=entry["peerName"]))
            looked_up = user_id is None
            if user_id is None:
                user_id, _ = await self._lookup(entry["peerName"])
            await self._store.update(partial(account.resolve_outgoing, entry_id=entry_id, user_id=user_id))
        now = self._now()
        message = await self._store.update(partial(account.encrypt_outgoing, entry_id=entry_id, bundle=None, now=now))
        if message is None:
            peer = await self._store.read(lambda data: account.outbox_entry(data, entry_id)["peer"])
            bundle = await self._fetch_bundle(peer, take_prekey=True)
            message = await self._store.update(
                partial(account.encrypt_outgoing, entry_id=entry_id, bundle=bundle, now=now)
            )
        peer = message["to"]
        if await self._store.read(partial(account.access_check_due, peer_id=peer, now=now)):
            await self._refresh_contact(peer)
        sealed = await self._send_sealed(entry_id, peer)
        if sealed is True:
            return Sent(entry_id, entry["peerName"], peer, SEALED, entry["createdAt"])
        if looked_up is False or (sealed is False and looked_up is None):
            # Going plain after a sealed try: the name may have come to mean another account
            # (IdentityChanged), which the lookup skipped for sealing would have said.
            user_id, _ = await self._lookup(entry["peerName"])
            await self._store.read(partial(account.check_name, username=entry["peerName"], user_id=user_id))
        ack = await self._deliver(entry_id, partial(self._request, "sendMessage", account.wire_message(message)), False)
        return Sent(entry_id, entry["peerName"], message["to"], ack["status"], entry["createdAt"])

    async def _send_sealed(self, entry_id: str, peer: str) -> bool | None:
        """Send an encrypted outbox entry sealed, if its recipient's bundle gave us the means;
        otherwise it must go as a plain message: None when there are no means, False when the
        server refused."""
        access = await self._store.read(partial(account.sealing_access, peer_id=peer))
        if access is None:
            return None
        content = await self._sealed_content(entry_id)
        for attempt in (1, 2):
            payload = {"id": entry_id, "to": peer, "content": content}
            if access["accessKey"]:
                payload["accessKey"] = access["accessKey"]
            try:
                await self._deliver(
                    entry_id, partial(self._anonymous.request, "sendSealed", payload, fail_after=CONNECT_ATTEMPTS), True
                )
                return True
            except ServerError as e:
                if e.code != ACCESS_DENIED:
                    raise
            # Their access key may have changed: read their bundle again (the server sees this fetch).
            if attempt == 2 or not await self._refresh_contact(peer):
                break
            access = await self._store.read(partial(account.sealing_access, peer_id=peer))
            if access is None:
                break
        await self._store.update(partial(account.forget_access, peer_id=peer, now=self._now()))
        return False

    async def _sealed_content(self, entry_id: str) -> str:
        """The entry sealed, with our sender certificate (a new one fetched when it runs out)."""
        content = await self._store.update(partial(account.seal_outgoing, entry_id=entry_id, now=self._now()))
        if content is None:
            certificate = (await self._request("getSenderCertificate"))["payload"]
            await self._store.update(partial(account.set_certificate, payload=certificate))
            content = await self._store.update(partial(account.seal_outgoing, entry_id=entry_id, now=self._now()))
            if content is None:
                raise InvalidCertificate(f"from the server expires too soon ({certificate.get('expires')})")
        return content

    async def _refresh_contact(self, user_id: str) -> bool:
        """Read a contact's bundle again, for their access key; False when there is none to read."""
        try:
            bundle = await self._fetch_bundle(user_id, take_prekey=False)
        except (ServerError, InvalidBundle):
            return False
        await self._store.update(partial(account.pin_contact, user_id=user_id, bundle=bundle, now=self._now()))
        return True

    async def _settle(self, entry_id: str, status: str, reason: str = "", sealed: bool = False) -> None:
        await self._store.transact(
            partial(account.outgoing_settled, entry_id=entry_id, status=status, reason=reason, sealed=sealed)
        )

    async def _deliver(self, entry_id: str, request: Callable[[], Awaitable[dict]], sealed: bool) -> dict:
        """Send with `request` until the server has it; the same message every time (sealed
        anew only when its certificate ran out)."""
        last_error: Exception | None = None
        for attempt in range(SEND_ATTEMPTS):
            if attempt:
                await task.deferLater(self._reactor, RETRY_DELAY_SECONDS * 2 ** (attempt - 1), lambda: None)
            try:
                reply = await request()
            except ServerError as e:
                if e.code == "DUPLICATE_MESSAGE":
                    # Our ids are random: another copy of this very message is what the server has,
                    # one sealed before (the server keeps no sender for it) or sent before sealing.
                    await self._settle(entry_id, "sent", sealed=sealed)
                    return {"status": SEALED if sealed else "queued"}
                if e.code not in RETRYABLE_CODES:
                    raise
                last_error = e
                continue
            except TRANSIENT_ERRORS as e:
                last_error = e
                continue
            await self._settle(entry_id, "sent", sealed=sealed)
            return reply["payload"]
        # Still in the outbox: the next run sends it again, unchanged.
        assert last_error is not None
        raise last_error

    # Receiving

    async def listen(
        self, on_message: Callable[[dict], Awaitable[None] | None], count: int | None = None,
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        """Receive until `count` messages were stored (forever when None).

        Connects (giving up after a few failed attempts at first, retrying forever once it has
        been connected), sends what the outbox holds, keeps the keys published, tells
        `on_ready`, then handles each pushed message in order: decrypt, save, tell
        `on_message`, acknowledge.
        """
        await self._my_id()
        await self._link.channel(fail_after=CONNECT_ATTEMPTS)
        try:
            await self.flush_outbox()
        except (ServerError, *NETWORK_ERRORS) as e:
            self.on_warning(f"messages in the outbox stay there for now: {e}")
        # Nothing more is sent while listening: the server would close an idle anonymous connection.
        await self._anonymous.stop()
        await self._keep_keys()
        on_ready()
        received = 0
        while count is None or received < count:
            item = await self._incoming.get()
            if isinstance(item, Exception):
                raise item
            try:
                outcome = await self._receive(item)
            except SetAside as e:
                # Not acknowledged: the server pushes it again later, and the next ones go on now.
                if item.get("id") not in self._set_aside:
                    self._set_aside.add(item.get("id"))
                    self.on_warning(f"message {item.get('id')} from {item.get('from')} waits: {e}")
                continue
            except (AuthenticationFailed, defer.CancelledError):
                raise
            except Exception as e:
                self.log.failure("handling message {id} failed", id=item.get("id"))
                self.on_warning(f"could not handle message {item.get('id')} now: {e}")
                continue
            self._set_aside.discard(item.get("id"))
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
                sender = outcome.entry["peerName"] or outcome.entry["peer"] or "a sealed sender"
                self.on_warning(f"dropped message {outcome.entry['id']} from {sender}: {outcome.reason}")
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
        """Decrypt and save one message, checking its sender's bundle when that is needed."""
        now = self._now()
        outcome = await self._store.transact(partial(account.accept_incoming, message=message, sender=None, now=now))
        if outcome.status == "need-server-keys":
            await self._refresh_server_keys()
            outcome = await self._store.transact(
                partial(account.accept_incoming, message=message, sender=None, now=now)
            )
        if outcome.status != "need-bundle":
            return outcome
        sender = await self._sender_bundle(outcome.sender)
        return await self._store.transact(partial(account.accept_incoming, message=message, sender=sender, now=now))

    async def _refresh_server_keys(self) -> None:
        """The keys the server signs sender certificates with, fetched again; SetAside if not now."""
        try:
            reply = await self._request("getServerKeys")
        except (ServerError, *NETWORK_ERRORS) as e:
            raise SetAside(f"the server's keys cannot be had now ({e})") from None
        await self._store.update(partial(account.set_server_keys, payload=reply["payload"], now=self._now()))

    async def _sender_bundle(self, sender_id: str) -> PeerBundle | str:
        """The sender's verified bundle (or SENDER_GONE), from the cache or the server; SetAside
        when it cannot be had now."""
        now = self._now()
        cached = self._senders.get(sender_id)
        if cached is not None and now - cached[0] < SENDER_CACHE_SECONDS:
            return cached[1]
        if now < self._checks_refused_until:
            raise SetAside(f"the server refuses key bundle checks for {self._checks_refused_until - now:.0f} s more")
        sender: PeerBundle | str
        try:
            sender = await self._fetch_bundle(sender_id, take_prekey=False)
        except ServerError as e:
            if e.code == RATE_LIMITED:
                self._checks_refused_until = now + (e.retry_after or RETRY_DELAY_SECONDS)
                raise SetAside(f"the server refuses key bundle checks for {e.retry_after or 0:.0f} s") from None
            if e.code != "USER_NOT_FOUND":
                raise SetAside(f"the sender's key bundle cannot be had now ({e.code})") from None
            sender = SENDER_GONE
        except NETWORK_ERRORS as e:
            raise SetAside(f"the sender's key bundle cannot be had now ({e})") from None
        except InvalidBundle as e:
            self.on_warning(f"the key bundle of {sender_id} does not verify: {e}")
            sender = SENDER_GONE
        self._senders[sender_id] = (now, sender)
        self._senders.move_to_end(sender_id)
        while len(self._senders) > SENDER_CACHE_SIZE:
            self._senders.popitem(last=False)
        return sender

    async def _acknowledge(self, message_id: str) -> None:
        """Acknowledge a saved message; if the connection drops first, it comes again and is a duplicate."""
        try:
            channel = await self._link.channel()
            await channel.acknowledge([message_id])
        except TRANSIENT_ERRORS:
            pass


def _opened(data: dict, history: Any) -> None:
    account.upgrade(data, history)
    account.prepare_sealing(data)


def _safety_number(data: dict, user_id: str, master_key: str) -> str:
    me = account.account(data)
    return safety_number(me["userId"], account.identity(data).master_public, user_id, b64decode(master_key))


def _refusal(error: ServerError) -> str:
    if error.code == "USER_NOT_FOUND":
        return "no account has that username"
    return f"{error.message} ({error.code})"
