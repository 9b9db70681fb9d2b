"""The reference client's account state and what happens to it, without any I/O.

The state is one JSON-able dict, kept encrypted by `construct.client.store`:

    {"version": 2, "server": "ws://…",
     "identity": IdentityKeys.to_dict(),
     "account": {"userId", "username", "sessionToken", "expires"} or None,
     "signedPrekeys": [{"keyId", "privateKey", "createdAt", "published", "retiredAt"}, …]  newest first,
     "oneTimePrekeys": [{"keyId", "privateKey"}, …], "nextPrekeyId": int,
     "contacts": {userId: {"username", "masterKey", "identityKey", "pinnedAt", "bundleTime",
                           "formerIds": [userId, …]}},
     "sessions": {userId: [Session.to_dict(), …]}   the one to send on first,
     "outbox": [{"id", "peerName", "peer", "text", "createdAt", "message"}, …]   in the order
         written; `peer` is None until the name is looked up, `message` (the ChatMessage) None
         until encrypted; an entry leaves when the server has it or refused it for good,
     "historyKey": b64 of 32 bytes, "keepMessages": int   the history file's (construct.client.history),
     "accessKey": b64 of 16 bytes, "accessKeyPublished": bool   our unidentified-access key (sealed sender),
     "senderCertificate": SenderCertificate.to_dict() or None   ours, for sealing,
     "serverKeys": {"fetchedAt": int, "keys": {keyId: b64 Ed25519 public}} or None   to verify others'}

A contact also keeps what its bundle said of sealed sending to it: "accessKey" (b64, or None),
"unrestrictedAccess" and "accessCheckedAt". An outbox entry sealed for sending keeps
"sealed": {"content", "certificateExpires"}, sent again unchanged until the server has it.

A key file (`key_file`: what `construct-chat export` writes and the web client exports and keeps)
is this state with one more field, "history": [entry, …], the messages kept, oldest first, as
the history file holds them. Opening one moves them into the history file (`upgrade`).

A contact is pinned on first contact: its user id, under its username, and its master key. A
name that comes to mean another account, or a master key that changes, is an IdentityChanged
until the user runs `trust` (`trust_contact`).

Every function here takes the dict (and the history, for those that record messages), changes
it in place and returns what the caller needs; the store runs them on a copy and saves the
copy, so a function that raises changes nothing. Times are unix seconds passed in by the caller.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Mapping

from construct.client.crypto import (
    CryptoError,
    DecryptionError,
    IdentityKeys,
    MAX_PLAINTEXT,
    InvalidBundle,
    MessageTooLarge,
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
from construct.client.history import DEFAULT_KEEP, HistoryLog
from construct.client.ratchet import VERSION_INITIAL, Session, is_ratchet_content
from construct.client.sealed import ACCESS_KEY_SIZE, InvalidCertificate, SenderCertificate, open_sealed, seal
from construct.client.x3dh import HEADER_SIZE, InitialHeader

STATE_VERSION = 2
PREKEY_BATCH = 100
# Top the server's pool up to PREKEY_BATCH when fewer than this many are left.
PREKEY_LOW_WATER = 25
SIGNED_PREKEY_ROTATION_SECONDS = 7 * 24 * 3600
# Messages in flight may still use a retired signed prekey.
SIGNED_PREKEY_RETENTION_SECONDS = 30 * 24 * 3600
# The session to send on and the one before it (both sides may start a session at once).
MAX_SESSIONS_PER_CONTACT = 2
# A sender certificate is renewed when less than this is left of it, so that a sealed message
# still has a valid one when the server accepts it.
CERTIFICATE_MARGIN_SECONDS = 3600
# The server's keys are fetched again after a day (one may have been withdrawn), and at once
# for a certificate signed by an unknown key, unless they were fetched within ten minutes (a
# stranger's made-up key ids cost one fetch, not one each).
SERVER_KEYS_MAX_AGE_SECONDS = 24 * 3600
SERVER_KEYS_REFRESH_SECONDS = 600
# A contact whose bundle gave no access key is asked again after this long.
ACCESS_RECHECK_SECONDS = 24 * 3600


class NotRegistered(Exception):
    """The state holds no account yet."""


class IdentityChanged(Exception):
    """A contact is not who was pinned: another master key, or the name now means another account."""

    def __init__(self, username: str, detail: str) -> None:
        super().__init__(
            f"{detail} The server may be impersonating {username}. Check the safety number with "
            f"{username} in person or over another channel, then run: construct-chat trust {username}"
        )
        self.username = username


class SenderUnverified(Exception):
    """The keys an initial message claims cannot be matched with the sender's signed bundle."""


class StaleBundle(InvalidBundle):
    """A contact's bundle is older than one already seen: a server replaying an old signed prekey."""


class SelfMessage(Exception):
    """Messages to oneself are not supported (one state cannot be both ends of a session)."""


class NoSuchContact(Exception):
    """No contact of this name in the state file."""


@dataclass(frozen=True)
class PeerBundle:
    """A peer's bundle as fetched for this message: verified, with the one-time prekey handed
    out, and what it says of sealed sends to the peer (its access key, b64)."""

    username: str
    keys: VerifiedBundle
    one_time_prekey: Mapping[str, Any] | None
    access_key: str | None = None
    unrestricted: bool = False


# No usable bundle of the sender exists: the account is gone or its bundle does not verify.
SENDER_GONE = "sender-gone"


@dataclass(frozen=True)
class Incoming:
    """What became of one pushed message.

    `status`: "received" (decrypted and stored), "duplicate" (seen before), "rejected" (the
    sender's keys or sender certificate did not check out), "undecryptable", "need-bundle"
    (call again with the bundle of `sender`) or "need-server-keys" (fetch the server's keys,
    set_server_keys, call again). Every status but the "need-" ones means: acknowledge it.
    """

    status: str
    entry: dict | None = None
    reason: str = ""
    used_one_time_prekey: bool = False
    sender: str = ""


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
        "outbox": [],
        "historyKey": b64encode(os.urandom(32)),
        "keepMessages": DEFAULT_KEEP,
        **_sealing_fields(),
    }


def _sealing_fields() -> dict[str, Any]:
    # A random access key: whoever has it (from our bundle) may send us sealed messages.
    return {"accessKey": b64encode(os.urandom(ACCESS_KEY_SIZE)), "accessKeyPublished": False,
            "senderCertificate": None, "serverKeys": None}


# The statuses of messages shown in a history: received, and sent ("delivered": the web client's
# "sent" to a connected device), or not sent. Others ("pending", refusals) are not messages to keep.
SHOWN_STATUSES = ("received", "sent", "delivered", "failed")


def upgrade(data: dict[str, Any], history: HistoryLog) -> None:
    """Bring a state of an earlier version up to this one, and move a key file's messages into
    the history file (nothing to do for a current state file).

    Version 1 kept the history (and the text of unsent messages) in the state file; a key file
    (`key_file`) is a current state with its history inline. (The web client upgrades the same
    way: tests/vectors/formats.json.)
    """
    if data.get("version") == 1:
        data["historyKey"] = b64encode(os.urandom(32))
        data["keepMessages"] = DEFAULT_KEEP
        history.begin(b64decode(data["historyKey"]), DEFAULT_KEEP)
        old = data.get("history", [])
        texts = {entry["id"]: entry.get("text", "") for entry in old if entry["direction"] == "out"}
        data["outbox"] = [
            {"id": message["id"], "peerName": _contact_name(data, message["to"]), "peer": message["to"],
             "text": texts.get(message["id"], ""), "createdAt": message["timestamp"], "message": message}
            for message in data["outbox"]
        ]
        data["version"] = STATE_VERSION
    for entry in data.pop("history", []):
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), str) and "peer" in entry
                and entry.get("direction") in ("in", "out")):
            continue
        if entry["direction"] == "in":
            history.mark_seen(entry["id"])
        if "text" in entry and entry.get("status") in SHOWN_STATUSES:
            history.add_message({key: value for key, value in entry.items() if key != "verified"})


def prepare_sealing(data: dict[str, Any]) -> None:
    """A state from before sealed sender (or from the web client) gets an access key, which
    maintain_keys then publishes."""
    if "accessKey" not in data:
        data.update(_sealing_fields())


def key_file(data: dict[str, Any], history: HistoryLog) -> dict[str, Any]:
    """The state with its messages inline: the one file another client (the web client) imports."""
    return dict(data, history=history.messages())


def set_keep(data: dict[str, Any], keep: int) -> None:
    """How many messages the history keeps from now on (older ones go as new ones come)."""
    data["keepMessages"] = keep


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


def access_key_published(data: dict[str, Any]) -> None:
    """The server has our access key (sent with `register` or `rotatePrekey`)."""
    data["accessKeyPublished"] = True


# Keys on the server


def signed_prekey_to_publish(data: dict[str, Any], now: float) -> dict[str, str] | None:
    """The bundle to upload with `rotatePrekey` (and our access key with it), or None when the
    published one is fresh and the server has the access key.

    A new signed prekey is made when the newest is older than a week; its private key is saved
    before the bundle leaves, so any message to it can be read.
    """
    newest = data["signedPrekeys"][0]
    if newest["published"]:
        if now - newest["createdAt"] < SIGNED_PREKEY_ROTATION_SECONDS:
            if data["accessKeyPublished"]:
                return None
        else:
            data["signedPrekeys"].insert(0, _new_signed_prekey(now))
    timestamp = datetime.fromtimestamp(now, timezone.utc)
    spk = SignedPrekey.from_dict(data["signedPrekeys"][0])
    return make_key_bundle(identity(data), spk, account(data)["userId"], timestamp)


def signed_prekey_published(data: dict[str, Any], bundle_key_id: int, now: float) -> None:
    """Record a successful rotatePrekey (which carried our access key too); retire older keys,
    forget long-retired ones."""
    data["accessKeyPublished"] = True
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


def _contact_name(data: Mapping[str, Any], user_id: str) -> str | None:
    contact = data["contacts"].get(user_id)
    return contact["username"] if contact else None


def check_name(data: Mapping[str, Any], username: str, user_id: str) -> None:
    """The server says `username` is `user_id`: refuse it if a pinned contact says otherwise."""
    found = contact_by_name(data, username)
    if found is not None and found[0] != user_id:
        raise IdentityChanged(
            username,
            f"The server now gives another account for {username} (user id {user_id}) than the one "
            f"you pinned (user id {found[0]}): {username} may have deleted their account and someone "
            f"else registered the name.",
        )
    known = _contact_name(data, user_id)
    if known is not None and known != username:
        raise IdentityChanged(
            username, f"The server says {username} is the account you pinned as {known} (user id {user_id})."
        )


def bundle_time(keys: VerifiedBundle) -> int:
    """The bundle's signed timestamp, in unix seconds."""
    return int(datetime.fromisoformat(keys.timestamp.replace("Z", "+00:00")).timestamp())


def pin_contact(
    data: dict[str, Any], user_id: str, bundle: PeerBundle, now: float, for_session: bool = False
) -> dict[str, Any]:
    """Trust on first use: remember the peer's id under its name and its master key, and refuse
    either changing later (IdentityChanged).

    The X25519 identity key may change (the owner signs a new bundle), so it is updated when a
    bundle signed by the pinned master key says so. The newest bundle time seen is kept, and a
    session (`for_session`) starts only on a bundle at least that new: old bundles stay validly
    signed forever, and a server serving one could make a first message use a signed prekey its
    owner no longer has (or whose private key leaked). Age alone is not refused: someone offline
    for months still has a bundle only they could have signed.
    """
    check_name(data, bundle.username, user_id)
    master = b64encode(bundle.keys.master_key)
    signed_at = bundle_time(bundle.keys)
    contact = data["contacts"].get(user_id)
    if contact is None:
        contact = {"username": bundle.username, "masterKey": master, "pinnedAt": int(now), "formerIds": []}
        data["contacts"][user_id] = contact
    elif contact["masterKey"] != master:
        raise IdentityChanged(
            contact["username"], f"{contact['username']}'s identity key has changed since you first talked."
        )
    elif for_session and signed_at < contact.get("bundleTime", 0):
        raise StaleBundle(
            f"the server sent {contact['username']}'s key bundle of {bundle.keys.timestamp}, older than one "
            "seen before (a replayed old bundle)"
        )
    contact["identityKey"] = b64encode(bundle.keys.identity_key)
    contact["bundleTime"] = max(contact.get("bundleTime", 0), signed_at)
    # What the server says of sealed sends to them, as of this bundle.
    contact["accessKey"] = bundle.access_key
    contact["unrestrictedAccess"] = bundle.unrestricted
    contact["accessCheckedAt"] = int(now)
    return contact


def trust_contact(data: dict[str, Any], username: str, user_id: str, bundle: PeerBundle, now: float) -> None:
    """Accept, on the user's word, `user_id` with this bundle as `username`: what was pinned
    under that name (or for that id) before is replaced, and its sessions are dropped. The
    history of a former account stays, shown under the name."""
    replaced = {user_id} | {found[0] for found in [contact_by_name(data, username)] if found is not None}
    former: list[str] = []
    for old_id in replaced:
        old = data["contacts"].pop(old_id, None)
        data["sessions"].pop(old_id, None)
        if old is not None:
            former += old.get("formerIds", []) + ([old_id] if old_id != user_id else [])
    contact = pin_contact(data, user_id, replace(bundle, username=username, one_time_prekey=None), now)
    contact["formerIds"] = sorted(set(former) - {user_id})


def history_of(data: Mapping[str, Any], history: HistoryLog, username: str) -> list[dict]:
    """The messages with a contact, oldest first: kept ones, then those still in the outbox.

    Messages written to the name but never looked up (the server was down, or the name had come
    to mean another account) count as the contact's too."""
    found = contact_by_name(data, username)
    ids = {found[0], *found[1].get("formerIds", [])} if found is not None else set()

    def mine(entry: Mapping[str, Any]) -> bool:
        return entry["peer"] in ids or (entry["peer"] is None and entry.get("peerName") == username)

    kept = [dict(entry, peerName=username) for entry in history.messages() if mine(entry)]
    queued = [
        {"id": entry["id"], "peer": entry["peer"], "peerName": username, "direction": "out", "text": entry["text"],
         "timestamp": entry["createdAt"], "status": "pending"}
        for entry in data["outbox"] if mine(entry)
    ]
    if found is None and not kept and not queued:
        raise NoSuchContact(f"you have no conversation with {username} in this state file")
    return kept + queued


# Sending


def queue_outgoing(data: dict[str, Any], peer_name: str, text: str, now: float) -> dict[str, Any]:
    """Put a message for `peer_name` in the outbox, before anything goes over the network.

    It is looked up, encrypted and sent from there (`resolve_outgoing`, `encrypt_outgoing`), in
    order, by this or a later run."""
    if peer_name == account(data)["username"]:
        raise SelfMessage("sending to yourself is not supported: one state file cannot be both ends of a session")
    if len(text.encode("utf-8")) > MAX_PLAINTEXT:
        raise MessageTooLarge(f"the message is {len(text.encode('utf-8'))} bytes, at most {MAX_PLAINTEXT} fit")
    entry = {"id": str(uuid.uuid4()), "peerName": peer_name, "peer": None, "text": text, "createdAt": int(now),
             "message": None}
    data["outbox"].append(entry)
    return entry


def outbox_entry(data: Mapping[str, Any], entry_id: str) -> dict[str, Any]:
    for entry in data["outbox"]:
        if entry["id"] == entry_id:
            return entry
    raise KeyError(f"no outbox entry {entry_id}")


def resolve_outgoing(data: dict[str, Any], entry_id: str, user_id: str) -> None:
    """The server says the entry's name is `user_id`; IdentityChanged if pinning disagrees."""
    entry = outbox_entry(data, entry_id)
    check_name(data, entry["peerName"], user_id)
    if user_id == account(data)["userId"]:
        raise SelfMessage("sending to yourself is not supported")
    entry["peer"] = user_id


def encrypt_outgoing(data: dict[str, Any], entry_id: str, bundle: PeerBundle | None, now: float) -> dict[str, Any] | None:
    """Encrypt an outbox entry for its peer; returns the ChatMessage, also kept in the entry.

    Returns None when there is no session yet and no bundle was given: fetch the peer's bundle
    (which hands out one of their one-time prekeys) and call again with it.
    """
    entry = outbox_entry(data, entry_id)
    if entry["message"] is not None:
        return entry["message"]
    me, peer_id = account(data)["userId"], entry["peer"]
    stored = data["sessions"].get(peer_id, [])
    if stored:
        session = Session.from_dict(stored[0])
        rest = stored[1:]
    elif bundle is None:
        return None
    else:
        pin_contact(data, peer_id, bundle, now, for_session=True)
        session = Session.initiate(identity(data), bundle.keys, bundle.one_time_prekey)
        rest = []
    ratchet_key, number, content = session.encrypt(
        entry["text"].encode("utf-8"), envelope_context(me, peer_id, entry["id"])
    )
    data["sessions"][peer_id] = [session.to_dict(), *rest]
    entry["message"] = {
        "id": entry["id"],
        "from": me,
        "to": peer_id,
        "ephemeralPublicKey": b64encode(ratchet_key),
        "messageNumber": number,
        "content": content,
        "timestamp": int(now),
    }
    return entry["message"]


def outgoing_settled(
    data: dict[str, Any], history: HistoryLog, entry_id: str, status: str, reason: str = "", sealed: bool = False
) -> None:
    """The server has the message ("sent", `sealed` or not), or it cannot go ("failed", saying
    why): it leaves the outbox for the history."""
    entry = outbox_entry(data, entry_id)
    data["outbox"].remove(entry)
    record = {"id": entry["id"], "peer": entry["peer"], "peerName": entry["peerName"], "direction": "out",
              "text": entry["text"], "timestamp": entry["createdAt"], "status": status}
    if reason:
        record["reason"] = reason
    if sealed:
        record["sealed"] = True
    history.add_message(record)


# Sealed sending: the server stores the message without learning who sent it.


def _may_seal(contact: Mapping[str, Any]) -> bool:
    return bool(contact.get("accessKey")) or bool(contact.get("unrestrictedAccess"))


def sealable_contact(data: Mapping[str, Any], peer_name: str) -> str | None:
    """The user id of the contact pinned as `peer_name`, when a message to them can go sealed
    without asking the server anything first (a `lookupUser` would tell it whom we write to):
    we have a session with them, and their access key. Otherwise None: look the name up."""
    found = contact_by_name(data, peer_name)
    if found is None or not data["sessions"].get(found[0]) or not _may_seal(found[1]):
        return None
    return found[0]


def sealing_access(data: Mapping[str, Any], peer_id: str) -> dict[str, Any] | None:
    """How a message to `peer_id` is sealed (`{"accessKey": b64 or None}`), or None when it
    cannot be (their bundle gave no access key): it goes as a plain sendMessage then."""
    contact = data["contacts"].get(peer_id)
    if contact is None or not _may_seal(contact) or not contact.get("identityKey"):
        return None
    return {"accessKey": contact.get("accessKey")}


def access_check_due(data: Mapping[str, Any], peer_id: str, now: float) -> bool:
    """Whether to read the bundle of a contact that gave no access key, to see if it has one now."""
    contact = data["contacts"].get(peer_id)
    if contact is None or _may_seal(contact):
        return False
    return now - contact.get("accessCheckedAt", 0) >= ACCESS_RECHECK_SECONDS


def forget_access(data: dict[str, Any], peer_id: str, now: float) -> None:
    """The server refused our sealed send to them, and their bundle says nothing newer."""
    contact = data["contacts"].get(peer_id)
    if contact is not None:
        contact.update(accessKey=None, unrestrictedAccess=False, accessCheckedAt=int(now))


def set_certificate(data: dict[str, Any], payload: Mapping[str, Any]) -> None:
    """Keep a `senderCertificate` reply, which must be for this account and its identity key."""
    certificate = SenderCertificate.from_dict(payload)
    if certificate.sender_id != account(data)["userId"] or certificate.identity_key != identity(data).master_public:
        raise InvalidCertificate("from the server is not for this account's identity key")
    data["senderCertificate"] = certificate.to_dict()


def seal_outgoing(data: dict[str, Any], entry_id: str, now: float) -> str | None:
    """The sealed content of an encrypted outbox entry: the one made before while its
    certificate is good, else a new one. None when we have no certificate good for long enough
    (fetch one: `set_certificate`)."""
    entry = outbox_entry(data, entry_id)
    sealed = entry.get("sealed")
    if sealed is not None and sealed["certificateExpires"] - now > CERTIFICATE_MARGIN_SECONDS:
        return sealed["content"]
    stored = data.get("senderCertificate")
    certificate = SenderCertificate.from_dict(stored) if stored else None
    if certificate is None or certificate.expires - now <= CERTIFICATE_MARGIN_SECONDS:
        return None
    recipient_key = b64decode(data["contacts"][entry["peer"]]["identityKey"])
    content = seal(entry["message"], certificate, recipient_key)
    entry["sealed"] = {"content": content, "certificateExpires": certificate.expires}
    return content


def set_server_keys(data: dict[str, Any], payload: Mapping[str, Any], now: float) -> None:
    """Keep a `serverKeys` reply: the keys sender certificates are verified with."""
    keys: dict[str, str] = {}
    for entry in payload.get("keys") or []:
        key_id = entry.get("keyId") if isinstance(entry, Mapping) else None
        if isinstance(key_id, int) and not isinstance(key_id, bool):
            keys[str(key_id)] = b64encode(b64decode(entry.get("publicKey"), InvalidCertificate, 32))
    data["serverKeys"] = {"fetchedAt": int(now), "keys": keys}


def wire_message(stored: Mapping[str, Any]) -> dict[str, Any]:
    """An outbox message as sent: the key as bytes (MessagePack `bin`, base64 in JSON)."""
    return dict(stored, ephemeralPublicKey=b64decode(stored["ephemeralPublicKey"]))


# Receiving


def accept_incoming(
    data: dict[str, Any], history: HistoryLog, message: Mapping[str, Any], sender: PeerBundle | str | None, now: float
) -> Incoming:
    """Decrypt a pushed ChatMessage with the Double Ratchet and store it in the history; a
    sealed one is opened first (`_open_sealed`).

    Anything else, such as the seed's unauthenticated per-message scheme ("v1"), is refused.
    `sender` is the sender's fetched bundle, SENDER_GONE, or None when not fetched yet.
    """
    message_id = str(message.get("id"))
    if history.seen(message_id):
        return Incoming("duplicate")
    certificate = None
    if message.get("sealed") is True:
        opened = _open_sealed(data, history, message, now)
        if isinstance(opened, Incoming):
            return opened
        message, certificate = opened
    peer_id = str(message.get("from"))
    try:
        ratchet_key = _bytes_field(message.get("ephemeralPublicKey"))
        number, content = message["messageNumber"], message["content"]
        context = envelope_context(peer_id, account(data)["userId"], message_id)
    except (KeyError, TypeError, ValueError, CryptoError):
        return _refused(data, history, message, "undecryptable", "malformed message")
    if not is_ratchet_content(content):
        return _refused(
            data, history, message, "undecryptable",
            "not a Double Ratchet message (the seed's unauthenticated scheme is not accepted)",
        )
    try:
        outcome = _accept_ratchet(
            data, history, message, ratchet_key, number, content, context, sender, now, certificate
        )
    except ReplayError as e:
        return _refused(data, history, message, "undecryptable", str(e))
    except (IdentityChanged, SenderUnverified) as e:
        return _refused(data, history, message, "rejected", str(e))
    except CryptoError:
        outcome = None
    if outcome is not None:
        return replace(outcome, sender=peer_id) if outcome.status == "need-bundle" else outcome
    return _refused(data, history, message, "undecryptable", "no session or prekey of ours opens it")


def _open_sealed(
    data: dict[str, Any], history: HistoryLog, message: Mapping[str, Any], now: float
) -> tuple[dict[str, Any], SenderCertificate] | Incoming:
    """The ChatMessage inside a sealed message, and its sender certificate, checked: signed by
    a key the server publishes, not expired when the server accepted the message, and, for a
    pinned sender, for the identity key pinned for them (the message itself must then be the
    sender's, which the ratchet checks). Or what became of it."""
    try:
        opened = open_sealed(message.get("content"), identity(data))
    except InvalidCertificate as e:
        return _refused(data, history, message, "rejected", f"its sender certificate {e}")
    except CryptoError as e:
        return _refused(data, history, message, "undecryptable", str(e))
    server_keys = data.get("serverKeys") or {"fetchedAt": 0, "keys": {}}
    age = now - server_keys["fetchedAt"]
    known = str(opened.certificate.key_id) in server_keys["keys"]
    if age > SERVER_KEYS_MAX_AGE_SECONDS or (not known and age > SERVER_KEYS_REFRESH_SECONDS):
        return Incoming("need-server-keys")
    accepted_at = message.get("acceptedAt")
    # The server's word for when it took the message: a certificate then valid still counts.
    at = min(accepted_at, now) if isinstance(accepted_at, int) and not isinstance(accepted_at, bool) else now
    try:
        opened.certificate.verify({int(key_id): b64decode(key) for key_id, key in server_keys["keys"].items()}, at)
    except InvalidCertificate as e:
        return _refused(data, history, message, "rejected", f"its sender certificate {e}")
    inner = opened.chat_message(str(message.get("id")), account(data)["userId"])
    contact = data["contacts"].get(opened.certificate.sender_id)
    if contact is not None and contact["masterKey"] != b64encode(opened.certificate.identity_key):
        return _refused(
            data, history, inner, "rejected",
            f"its sender certificate is for another identity key than the one pinned for {contact['username']}",
        )
    return inner, opened.certificate


def _accept_ratchet(
    data: dict[str, Any], history: HistoryLog, message: Mapping[str, Any], ratchet_key: bytes, number: int,
    content: str, context: bytes, sender: PeerBundle | str | None, now: float,
    certificate: SenderCertificate | None = None,
) -> Incoming | None:
    """Decrypt with a session of the sender's, or start one from an initial (0x20) message.

    None means "not ours". ReplayError means a message whose keys were used already.
    """
    peer_id = str(message["from"])
    stored = [Session.from_dict(item) for item in data["sessions"].get(peer_id, [])]
    initial = b64decode(content)[0] == VERSION_INITIAL
    # An initial message belongs to the session it started, if we have it; otherwise it starts one.
    candidates = [s for s in stored if s.knows_initial(content)] if initial else stored
    for session in candidates:
        try:
            plaintext = session.decrypt(ratchet_key, number, content, context, now=now)
        except ReplayError as e:
            # Its id is new (duplicates are caught before), its message number is not.
            raise ReplayError(
                f"its message number ({number}) was used already: a replay, or the sender restored an old "
                "copy of their state, or it came so late that its key expired (30 days)"
            ) from e
        except DecryptionError:
            continue
        # Send on the session that last decrypted a message.
        data["sessions"][peer_id] = [session.to_dict()] + [s.to_dict() for s in stored if s is not session]
        return _received(data, history, message, plaintext, now, certificate is not None)
    if candidates or not initial:
        return None
    spks = {SignedPrekey.from_dict(item).key_id: SignedPrekey.from_dict(item) for item in data["signedPrekeys"]}
    opks = {item["keyId"]: OneTimePrekey.from_dict(item) for item in data["oneTimePrekeys"]}
    try:
        session, plaintext, used_opk = Session.from_initial(
            identity(data), spks, opks, ratchet_key, number, content, context, now=now
        )
    except ReplayError as e:
        header = InitialHeader.from_bytes(b64decode(content)[5:5 + HEADER_SIZE])
        raise ReplayError(
            f"it starts a session with one-time prekey {header.one_time_prekey_id}, which was already used: "
            "the server handed it out twice, or this is a replay. Ask the sender to write again"
        ) from e
    checked = _check_sender_keys(data, peer_id, session, sender, now, certificate)
    if checked is not None:
        return checked
    if used_opk is not None:
        # Only now that the first message decrypted and its sender checked out.
        data["oneTimePrekeys"] = [item for item in data["oneTimePrekeys"] if item["keyId"] != used_opk]
    data["sessions"][peer_id] = [session.to_dict(), *data["sessions"].get(peer_id, [])][:MAX_SESSIONS_PER_CONTACT]
    received = _received(data, history, message, plaintext, now, certificate is not None)
    return Incoming(received.status, received.entry, used_one_time_prekey=used_opk is not None)


def _check_sender_keys(
    data: dict[str, Any], peer_id: str, session: Session, sender: PeerBundle | str | None, now: float,
    certificate: SenderCertificate | None = None,
) -> Incoming | None:
    """The X3DH header's keys are claims: they must be the sender's pinned or signed ones, and
    those of its sender certificate for a sealed message.

    None when they check out (the contact is pinned on first contact).
    """
    if certificate is not None and certificate.identity_key != session.remote_master_key:
        raise SenderUnverified("its sender certificate is for another identity key than the message's")
    master, identity_key = b64encode(session.remote_master_key), b64encode(session.remote_identity_key)
    contact = data["contacts"].get(peer_id)
    if contact is not None and contact["masterKey"] != master:
        raise IdentityChanged(contact["username"], f"{contact['username']}'s identity key has changed.")
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


def _received(
    data: dict[str, Any], history: HistoryLog, message: Mapping[str, Any], plaintext: bytes, now: float,
    sealed: bool = False,
) -> Incoming:
    entry = _history_entry(data, message, now, "received")
    entry["text"] = plaintext.decode("utf-8", errors="replace")
    if sealed:
        entry["sealed"] = True
    history.mark_seen(entry["id"])
    history.add_message(entry)
    return Incoming("received", entry)


def _refused(data: dict[str, Any], history: HistoryLog, message: Mapping[str, Any], status: str, reason: str) -> Incoming:
    """Remembered as seen only (so a redelivery is a duplicate); nothing of it is kept."""
    entry = _history_entry(data, message, 0, status)
    entry["reason"] = reason
    history.mark_seen(entry["id"])
    return Incoming(status, entry, reason)


def _history_entry(data: Mapping[str, Any], message: Mapping[str, Any], now: float, status: str) -> dict[str, Any]:
    # None: a sealed message that was not opened, whose sender nobody knows.
    peer_id = None if message.get("from") is None else str(message.get("from"))
    timestamp = message.get("timestamp")
    return {
        "id": str(message.get("id")),
        "peer": peer_id,
        "peerName": _contact_name(data, peer_id),
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
