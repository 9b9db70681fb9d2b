"""The reference client's account state and what happens to it, without any I/O.

The state is one JSON-able dict, kept encrypted by `construct.client.store`:

    {"version": 1, "server": "ws://…",
     "identity": IdentityKeys.to_dict(),
     "account": {"userId", "username", "sessionToken", "expires"} or None,
     "signedPrekeys": [{"keyId", "privateKey", "createdAt", "published", "retiredAt"}, …]  newest first,
     "oneTimePrekeys": [{"keyId", "privateKey"}, …], "nextPrekeyId": int,
     "contacts": {userId: {"username", "masterKey", "identityKey", "pinnedAt"}},
     "sessions": {userId: [Session.to_dict(), …]}   the one to send on first,
     "history": [entry, …]   in the order sent or received,
     "outbox": [ChatMessage, …]   encrypted and saved, not yet acknowledged by the server}

Every function here takes the dict, changes it in place and returns what the caller needs; the
store runs them on a copy and saves the copy, so a function that raises changes nothing.
Times are unix seconds passed in by the caller.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from construct.client.crypto import (
    CryptoError,
    DecryptionError,
    IdentityKeys,
    OneTimePrekey,
    ReplayError,
    SignedPrekey,
    VerifiedBundle,
    b64decode,
    b64encode,
    envelope_context,
    generate_one_time_prekeys,
    make_key_bundle,
)
from construct.client.ratchet import VERSION_INITIAL, Session, is_ratchet_content

STATE_VERSION = 1
PREKEY_BATCH = 100
# Top the server's pool up to PREKEY_BATCH when fewer than this many are left.
PREKEY_LOW_WATER = 25
SIGNED_PREKEY_ROTATION_SECONDS = 7 * 24 * 3600
# Messages in flight may still use a retired signed prekey.
SIGNED_PREKEY_RETENTION_SECONDS = 30 * 24 * 3600
# The session to send on and the one before it (both sides may start a session at once).
MAX_SESSIONS_PER_CONTACT = 2


class NotRegistered(Exception):
    """The state holds no account yet."""


class IdentityChanged(Exception):
    """A contact's master identity key is not the one pinned on first contact."""

    def __init__(self, username: str) -> None:
        super().__init__(
            f"{username}'s identity key has changed since you first talked. The server may be "
            f"impersonating them; compare safety numbers out of band before trusting this account."
        )
        self.username = username


class SenderUnverified(Exception):
    """The keys an initial message claims cannot be matched with the sender's signed bundle."""


@dataclass(frozen=True)
class PeerBundle:
    """A peer's bundle as fetched for this message: verified, with the one-time prekey handed out."""

    username: str
    keys: VerifiedBundle
    one_time_prekey: Mapping[str, Any] | None


# No usable bundle of the sender exists: the account is gone or its bundle does not verify.
SENDER_GONE = "sender-gone"


@dataclass(frozen=True)
class Incoming:
    """What became of one pushed message.

    `status`: "received" (decrypted and stored), "duplicate" (seen before), "rejected" (the
    sender's keys did not check out), "undecryptable", or "need-bundle" (call again with the
    sender's bundle). Every status but "need-bundle" means: acknowledge it.
    """

    status: str
    entry: dict | None = None
    reason: str = ""
    used_one_time_prekey: bool = False


def new_state(server: str, now: float) -> dict[str, Any]:
    """Fresh identity and signed prekey, no account yet."""
    return {
        "version": STATE_VERSION,
        "server": server,
        "identity": IdentityKeys.generate().to_dict(),
        "account": None,
        "signedPrekeys": [_new_signed_prekey(now)],
        "oneTimePrekeys": [],
        "nextPrekeyId": 1,
        "contacts": {},
        "sessions": {},
        "history": [],
        "outbox": [],
    }


def _new_signed_prekey(now: float) -> dict[str, Any]:
    return dict(SignedPrekey.generate().to_dict(), createdAt=int(now), published=False, retiredAt=None)


def account(data: Mapping[str, Any]) -> dict[str, Any]:
    if not data.get("account"):
        raise NotRegistered("this state file holds no account yet; run register first")
    return data["account"]


def identity(data: Mapping[str, Any]) -> IdentityKeys:
    return IdentityKeys.from_dict(data["identity"])


def set_account(data: dict[str, Any], payload: Mapping[str, Any]) -> None:
    """Store a registerSuccess/loginSuccess payload."""
    data["account"] = {
        "userId": payload["userId"],
        "username": payload["username"],
        "sessionToken": payload["sessionToken"],
        "expires": payload["expires"],
    }


def registration_bundle(data: Mapping[str, Any]) -> dict[str, str]:
    """The bundle for `register`: no user id yet (publish_signed_prekey re-uploads it with one)."""
    return make_key_bundle(identity(data), SignedPrekey.from_dict(data["signedPrekeys"][0]), "")


# Keys on the server


def signed_prekey_to_publish(data: dict[str, Any], now: float) -> dict[str, str] | None:
    """The bundle to upload with `rotatePrekey`, or None when the published one is fresh.

    A new signed prekey is made when the newest is older than a week; its private key is saved
    before the bundle leaves, so any message to it can be read.
    """
    newest = data["signedPrekeys"][0]
    if newest["published"]:
        if now - newest["createdAt"] < SIGNED_PREKEY_ROTATION_SECONDS:
            return None
        data["signedPrekeys"].insert(0, _new_signed_prekey(now))
    timestamp = datetime.fromtimestamp(now, timezone.utc)
    spk = SignedPrekey.from_dict(data["signedPrekeys"][0])
    return make_key_bundle(identity(data), spk, account(data)["userId"], timestamp)


def signed_prekey_published(data: dict[str, Any], bundle_key_id: int, now: float) -> None:
    """Record a successful rotatePrekey; retire older keys, forget long-retired ones."""
    for entry in data["signedPrekeys"]:
        if entry["keyId"] == bundle_key_id:
            entry["published"] = True
        elif entry["retiredAt"] is None:
            entry["retiredAt"] = int(now)
    data["signedPrekeys"] = [
        entry
        for entry in data["signedPrekeys"]
        if entry["retiredAt"] is None or now - entry["retiredAt"] < SIGNED_PREKEY_RETENTION_SECONDS
    ]


def new_one_time_prekeys(data: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Make `count` one-time prekeys with fresh ids, keep their private halves, return the upload form."""
    keys, upload = generate_one_time_prekeys(data["nextPrekeyId"], count)
    data["nextPrekeyId"] += count
    data["oneTimePrekeys"].extend(key.to_dict() for key in keys)
    return upload


# Contacts


def contact_by_name(data: Mapping[str, Any], username: str) -> tuple[str, dict] | None:
    for user_id, contact in data["contacts"].items():
        if contact["username"] == username:
            return user_id, contact
    return None


def pin_contact(data: dict[str, Any], user_id: str, bundle: PeerBundle, now: float) -> dict[str, Any]:
    """Trust on first use: remember the peer's master key, and refuse a different one later.

    The X25519 identity key may change (the owner signs a new bundle), so it is updated when a
    bundle signed by the pinned master key says so.
    """
    master = b64encode(bundle.keys.master_key)
    contact = data["contacts"].get(user_id)
    if contact is None:
        contact = {"username": bundle.username, "masterKey": master, "pinnedAt": int(now)}
        data["contacts"][user_id] = contact
    elif contact["masterKey"] != master:
        raise IdentityChanged(contact["username"])
    contact["identityKey"] = b64encode(bundle.keys.identity_key)
    return contact


# Sending


def prepare_outgoing(
    data: dict[str, Any], peer_id: str, text: str, bundle: PeerBundle | None, now: float
) -> dict[str, Any] | None:
    """Encrypt `text` for the peer and put the ChatMessage in the outbox and history.

    Returns None when there is no session yet and no bundle was given: fetch the peer's bundle
    (which hands out one of their one-time prekeys) and call again with it.
    """
    me = account(data)["userId"]
    stored = data["sessions"].get(peer_id, [])
    if stored:
        session = Session.from_dict(stored[0])
        rest = stored[1:]
    elif bundle is None:
        return None
    else:
        pin_contact(data, peer_id, bundle, now)
        session = Session.initiate(identity(data), bundle.keys, bundle.one_time_prekey)
        rest = []
    message_id = str(uuid.uuid4())
    ratchet_key, number, content = session.encrypt(text.encode("utf-8"), envelope_context(me, peer_id, message_id))
    data["sessions"][peer_id] = [session.to_dict(), *rest]
    message = {
        "id": message_id,
        "from": me,
        "to": peer_id,
        "ephemeralPublicKey": b64encode(ratchet_key),
        "messageNumber": number,
        "content": content,
        "timestamp": int(now),
    }
    data["outbox"].append(message)
    data["history"].append(
        {"id": message_id, "peer": peer_id, "direction": "out", "text": text, "timestamp": int(now), "status": "pending"}
    )
    return message


def outgoing_settled(data: dict[str, Any], message_id: str, status: str) -> None:
    """The server acknowledged the message ("sent"), or refused it for good ("failed")."""
    data["outbox"] = [message for message in data["outbox"] if message["id"] != message_id]
    for entry in reversed(data["history"]):
        if entry["id"] == message_id and entry["direction"] == "out":
            entry["status"] = status
            break


def wire_message(stored: Mapping[str, Any]) -> dict[str, Any]:
    """An outbox entry as sent: the key as bytes (MessagePack `bin`, base64 in JSON)."""
    return dict(stored, ephemeralPublicKey=b64decode(stored["ephemeralPublicKey"]))


# Receiving


def accept_incoming(
    data: dict[str, Any], message: Mapping[str, Any], sender: PeerBundle | str | None, now: float
) -> Incoming:
    """Decrypt a pushed ChatMessage with the Double Ratchet and store it in the history.

    Anything else, such as the seed's unauthenticated per-message scheme ("v1"), is refused.

    `sender` is the sender's fetched bundle, SENDER_GONE, or None when not fetched yet.
    """
    message_id, peer_id = str(message.get("id")), str(message.get("from"))
    if any(entry["id"] == message_id and entry["direction"] == "in" for entry in data["history"]):
        return Incoming("duplicate")
    try:
        ratchet_key = _bytes_field(message.get("ephemeralPublicKey"))
        number, content = message["messageNumber"], message["content"]
        context = envelope_context(peer_id, account(data)["userId"], message_id)
    except (KeyError, TypeError, ValueError, CryptoError):
        return _refused(data, message, "undecryptable", "malformed message", now)
    if not is_ratchet_content(content):
        return _refused(
            data, message, "undecryptable",
            "not a Double Ratchet message (the seed's unauthenticated scheme is not accepted)", now,
        )
    try:
        outcome = _accept_ratchet(data, message, ratchet_key, number, content, context, sender, now)
    except ReplayError:
        return Incoming("duplicate")
    except (IdentityChanged, SenderUnverified) as e:
        return _refused(data, message, "rejected", str(e), now)
    except CryptoError:
        outcome = None
    if outcome is not None:
        return outcome
    return _refused(data, message, "undecryptable", "no session or prekey of ours opens it", now)


def _accept_ratchet(
    data: dict[str, Any], message: Mapping[str, Any], ratchet_key: bytes, number: int, content: str,
    context: bytes, sender: PeerBundle | str | None, now: float,
) -> Incoming | None:
    """Decrypt with a session of the sender's, or start one from an initial (0x20) message.

    None means "not ours". ReplayError means a duplicate.
    """
    peer_id = str(message["from"])
    stored = [Session.from_dict(item) for item in data["sessions"].get(peer_id, [])]
    initial = b64decode(content)[0] == VERSION_INITIAL
    # An initial message belongs to the session it started, if we have it; otherwise it starts one.
    candidates = [s for s in stored if s.knows_initial(content)] if initial else stored
    for session in candidates:
        try:
            plaintext = session.decrypt(ratchet_key, number, content, context)
        except DecryptionError:
            continue
        # Send on the session that last decrypted a message.
        data["sessions"][peer_id] = [session.to_dict()] + [s.to_dict() for s in stored if s is not session]
        return _received(data, message, plaintext, now)
    if candidates or not initial:
        return None
    spks = {SignedPrekey.from_dict(item).key_id: SignedPrekey.from_dict(item) for item in data["signedPrekeys"]}
    opks = {item["keyId"]: OneTimePrekey.from_dict(item) for item in data["oneTimePrekeys"]}
    session, plaintext, used_opk = Session.from_initial(
        identity(data), spks, opks, ratchet_key, number, content, context
    )
    checked = _check_sender_keys(data, peer_id, session, sender, now)
    if checked is not None:
        return checked
    if used_opk is not None:
        # Only now that the first message decrypted and its sender checked out.
        data["oneTimePrekeys"] = [item for item in data["oneTimePrekeys"] if item["keyId"] != used_opk]
    data["sessions"][peer_id] = [session.to_dict(), *data["sessions"].get(peer_id, [])][:MAX_SESSIONS_PER_CONTACT]
    received = _received(data, message, plaintext, now)
    return Incoming(received.status, received.entry, used_one_time_prekey=used_opk is not None)


def _check_sender_keys(
    data: dict[str, Any], peer_id: str, session: Session, sender: PeerBundle | str | None, now: float
) -> Incoming | None:
    """The X3DH header's keys are claims: they must be the sender's pinned or signed ones.

    None when they check out (the contact is pinned on first contact).
    """
    master, identity_key = b64encode(session.remote_master_key), b64encode(session.remote_identity_key)
    contact = data["contacts"].get(peer_id)
    if contact is not None and contact["masterKey"] != master:
        raise IdentityChanged(contact["username"])
    if contact is not None and contact.get("identityKey") == identity_key:
        return None
    if sender is None:
        return Incoming("need-bundle")
    if not isinstance(sender, PeerBundle):
        raise SenderUnverified("the sender has no verifiable key bundle")
    if b64encode(sender.keys.master_key) != master or b64encode(sender.keys.identity_key) != identity_key:
        raise SenderUnverified("the message's identity keys are not those of the sender's signed bundle")
    pin_contact(data, peer_id, sender, now)
    return None


def _received(data: dict[str, Any], message: Mapping[str, Any], plaintext: bytes, now: float) -> Incoming:
    entry = _history_entry(data, message, now, "received")
    entry["text"] = plaintext.decode("utf-8", errors="replace")
    data["history"].append(entry)
    return Incoming("received", entry)


def _refused(data: dict[str, Any], message: Mapping[str, Any], status: str, reason: str, now: float) -> Incoming:
    """Kept in the history without text, so a redelivery is recognised as a duplicate."""
    entry = _history_entry(data, message, now, status)
    entry["reason"] = reason
    data["history"].append(entry)
    return Incoming(status, entry, reason)


def _history_entry(data: Mapping[str, Any], message: Mapping[str, Any], now: float, status: str) -> dict[str, Any]:
    peer_id = str(message.get("from"))
    contact = data["contacts"].get(peer_id)
    timestamp = message.get("timestamp")
    return {
        "id": str(message.get("id")),
        "peer": peer_id,
        "peerName": contact["username"] if contact else None,
        "direction": "in",
        "timestamp": timestamp if isinstance(timestamp, int) and not isinstance(timestamp, bool) else None,
        "receivedAt": int(now),
        "status": status,
    }


def _bytes_field(value: Any) -> bytes:
    """`ephemeralPublicKey`: MessagePack `bin`, or base64 in JSON."""
    if isinstance(value, bytes):
        return value
    return b64decode(value, DecryptionError)
