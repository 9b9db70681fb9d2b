// The account state and what sending and receiving do to it, without I/O: a port of
// construct/client/account.py. The state is construct-chat's own document (version 2), field for
// field, plus the messages inline, which makes it a key file (`construct-chat export` writes one,
// construct-chat opens one and moves the messages into its history file):
//
//   {version: 2, server, identity: {masterSeed, identityPrivate},
//    account: {userId, username, sessionToken, expires} | null,
//    signedPrekeys: [{keyId, privateKey, createdAt, published, retiredAt}]  newest first,
//    oneTimePrekeys: [{keyId, privateKey}], nextPrekeyId,
//    contacts: {userId: {username, masterKey, identityKey, pinnedAt, bundleTime, formerIds,
//                        identityWarning?, offeredUserId?, offeredMasterKey?}},
//    sessions: {userId: [Session.toDict()]}  the one to send on first,
//    outbox: [{id, peerName, peer, text, createdAt, message}]  in the order written; `peer` is null
//      until the name is looked up, `message` (the ChatMessage) null until encrypted,
//    historyKey, keepMessages, history: [entry]  the messages shown, oldest first, at most keepMessages}
//
// A contact is pinned on first contact: its user id under its username, and its master key. A name
// that comes to mean another account, or another master key, is an IdentityChanged until the user
// trusts it (`trustContact`); meanwhile the pinned contact carries the web client's own fields
// (construct-chat ignores them): `identityWarning` (the text shown), `offeredUserId` and
// `offeredMasterKey` (the account and key the server now gives). Every function changes `data` in
// place; the store runs it on a copy and saves the copy, so one that throws changes nothing.
// Times are unix seconds passed in by the caller.
import { CryptoError, DecryptionError, InvalidBundle, MessageTooLarge, ReplayError, b64decode, b64encode, fromUtf8, utf8 } from "./bytes.mjs";
import {
  IdentityKeys, MAX_PLAINTEXT, envelopeContext, generateX25519, makeKeyBundle, random, signedPrekeyId, x25519Public,
} from "./crypto.mjs";
import { Session, VERSION_INITIAL, isRatchetContent } from "./ratchet.mjs";
import * as x3dh from "./x3dh.mjs";

export const STATE_VERSION = 2;
export const DEFAULT_KEEP = 10_000;
export const PREKEY_BATCH = 100;
export const PREKEY_LOW_WATER = 25;
export const SIGNED_PREKEY_ROTATION_SECONDS = 7 * 24 * 3600;
export const SIGNED_PREKEY_RETENTION_SECONDS = 30 * 24 * 3600;
export const MAX_SESSIONS_PER_CONTACT = 2;
export const SENDER_GONE = "sender-gone";
// Messages kept in a history; others ("pending", refusals) are not messages to show.
const SHOWN_STATUSES = new Set(["received", "sent", "delivered", "failed"]);

export class NotRegistered extends Error {}

// `pinnedId`: the contact whose pin this breaks; `offeredUserId`/`offeredMasterKey`: what the
// server gives now, when known.
export class IdentityChanged extends Error {
  constructor(username, message, { pinnedId = null, offeredUserId = null, offeredMasterKey = null } = {}) {
    super(message);
    this.username = username;
    this.pinnedId = pinnedId;
    this.offeredUserId = offeredUserId;
    this.offeredMasterKey = offeredMasterKey;
  }
}

export class SenderUnverified extends Error {}
export class StaleBundle extends InvalidBundle {}
export class SelfMessage extends Error {}

const warningFor = {
  keyChanged: (name) => `${name}'s identity key is not the one you first saw. If ${name} did not tell you they ` +
    "reinstalled, the server may be impersonating them. Their messages made with the new key are refused and " +
    "nothing can be sent until you have compared the safety number with them and trust the new key.",
  newAccount: (name) => `The name ${name} now belongs to a different account than the one you talked to before: ` +
    `${name} may have deleted their account and someone else registered the name, or the server may be ` +
    "impersonating them. Messages from that account are refused and nothing can be sent to it until you have " +
    `compared the safety number with ${name} and trust it (ask them to write again then).`,
};

function newSignedPrekey(now) {
  const privateKey = generateX25519()[0];
  return { keyId: signedPrekeyId(x25519Public(privateKey)), privateKey: b64encode(privateKey), createdAt: Math.floor(now), published: false, retiredAt: null };
}

export function newState(server, now) {
  return {
    version: STATE_VERSION,
    server,
    identity: IdentityKeys.generate().toDict(),
    account: null,
    signedPrekeys: [newSignedPrekey(now)],
    oneTimePrekeys: [],
    nextPrekeyId: 1,
    contacts: {},
    sessions: {},
    outbox: [],
    historyKey: b64encode(random.bytes(32)),
    keepMessages: DEFAULT_KEEP,
    history: [],
  };
}

function isHistoryEntry(entry) {
  return entry !== null && typeof entry === "object" && typeof entry.id === "string" && "peer" in entry &&
    (entry.direction === "in" || entry.direction === "out");
}

// Brings an older state up to this version, as construct-chat's `upgrade` does, but the messages
// stay inline: version 1 (the web client's earlier records and exports, construct-chat's earlier
// state files) kept unsent messages as ChatMessages and their text in the history. A
// construct-chat state file (no history: that is in its history file) gets an empty one.
export function upgrade(data) {
  if (data.version === 1) {
    data.historyKey = b64encode(random.bytes(32));
    data.keepMessages = DEFAULT_KEEP;
    const old = Array.isArray(data.history) ? data.history : [];
    const texts = new Map(old.filter((e) => e.direction === "out").map((e) => [e.id, e.text ?? ""]));
    data.outbox = data.outbox.map((message) => ({
      id: message.id, peerName: contactName(data, message.to), peer: message.to, text: texts.get(message.id) ?? "",
      createdAt: message.timestamp, message,
    }));
    upgradeReplacedContacts(data);
    data.version = STATE_VERSION;
  }
  const kept = (Array.isArray(data.history) ? data.history : [])
    .filter((e) => isHistoryEntry(e) && "text" in e && SHOWN_STATUSES.has(e.status))
    .map(({ verified, ...entry }) => entry);
  data.history = kept.slice(Math.max(0, kept.length - data.keepMessages));
}

// The web client's version 1 pinned a newcomer under a reused name at once, with a warning, and
// marked the earlier contact `replacedBy` it. Now the name stays pinned until trusted: a trusted
// newcomer takes the earlier account's place (its id in `formerIds`), an untrusted one becomes an
// offer on the earlier contact.
function upgradeReplacedContacts(data) {
  for (const [oldId, old] of Object.entries(data.contacts)) {
    const newId = old.replacedBy;
    delete old.replacedBy;
    const newcomer = newId && data.contacts[newId];
    if (!newcomer) continue;
    if (newcomer.identityWarning) {
      delete data.contacts[newId];
      delete data.sessions[newId];
      Object.assign(old, { identityWarning: warningFor.newAccount(old.username), offeredUserId: newId, offeredMasterKey: newcomer.masterKey });
    } else {
      newcomer.formerIds = [...new Set([...(newcomer.formerIds ?? []), ...(old.formerIds ?? []), oldId])];
      delete data.contacts[oldId];
      delete data.sessions[oldId];
    }
  }
}

export function account(data) {
  if (!data.account) throw new NotRegistered("this key file holds no account yet");
  return data.account;
}

export function identity(data) {
  return IdentityKeys.fromDict(data.identity);
}

export function setAccount(data, payload) {
  data.account = { userId: payload.userId, username: payload.username, sessionToken: payload.sessionToken, expires: payload.expires };
}

export function registrationBundle(data) {
  return makeKeyBundle(identity(data), x25519Public(b64decode(data.signedPrekeys[0].privateKey)), "");
}

// Keys on the server

// `withdrawAccess`: the state came from construct-chat, which registered an access key for
// sealed messages (docs/crypto.md, "Sealed sender"). This page cannot open them, so the bundle
// goes out at once with the key withdrawn, and construct-chat then sends this account plain
// messages. (A construct-chat that opens the state again registers a new key.)
export function signedPrekeyToPublish(data, now) {
  const newest = data.signedPrekeys[0];
  const withdrawAccess = Boolean(data.accessKey);
  if (newest.published) {
    const fresh = now - newest.createdAt < SIGNED_PREKEY_ROTATION_SECONDS;
    if (fresh && !withdrawAccess) return null;
    if (!fresh) data.signedPrekeys.unshift(newSignedPrekey(now));
  }
  const spkPublic = x25519Public(b64decode(data.signedPrekeys[0].privateKey));
  const bundle = makeKeyBundle(identity(data), spkPublic, account(data).userId, new Date(now * 1000));
  return { keyId: data.signedPrekeys[0].keyId, bundle, withdrawAccess };
}

export function signedPrekeyPublished(data, keyId, now) {
  delete data.accessKey;
  delete data.accessKeyPublished;
  for (const entry of data.signedPrekeys) {
    if (entry.keyId === keyId) entry.published = true;
    else if (entry.retiredAt === null) entry.retiredAt = Math.floor(now);
  }
  data.signedPrekeys = data.signedPrekeys.filter((e) => e.retiredAt === null || now - e.retiredAt < SIGNED_PREKEY_RETENTION_SECONDS);
}

export function newOneTimePrekeys(data, count) {
  const upload = [];
  for (let i = 0; i < count; i++) {
    const keyId = data.nextPrekeyId + i;
    const privateKey = random.bytes(32);
    data.oneTimePrekeys.push({ keyId, privateKey: b64encode(privateKey) });
    upload.push({ keyId, publicKey: b64encode(x25519Public(privateKey)) });
  }
  data.nextPrekeyId += count;
  return upload;
}

// Contacts

export function contactByName(data, username) {
  for (const [userId, contact] of Object.entries(data.contacts)) {
    if (contact.username === username) return [userId, contact];
  }
  return null;
}

function contactName(data, userId) {
  return data.contacts[userId]?.username ?? null;
}

// The server says `username` is `userId`: refuse it if a pinned contact says otherwise.
export function checkName(data, username, userId, offeredMasterKey = null) {
  const found = contactByName(data, username);
  if (found !== null && found[0] !== userId) {
    throw new IdentityChanged(username,
      `The server now gives another account for ${username} than the one you pinned: ${username} may have deleted ` +
      "their account and someone else registered the name. Compare the safety number with them before you trust it.",
      { pinnedId: found[0], offeredUserId: userId, offeredMasterKey });
  }
  const known = contactName(data, userId);
  if (known !== null && known !== username) {
    throw new IdentityChanged(username, `The server says ${username} is the account you pinned as ${known}.`);
  }
}

export function bundleTime(keys) {
  return Math.floor(Date.parse(keys.timestamp) / 1000);
}

// Trust on first use: remember the peer's id under its name and its master key, and refuse either
// changing later (IdentityChanged). A session (`forSession`) starts only on a bundle at least as
// new as the newest seen: an old bundle stays validly signed forever. `bundle` is {username, keys
// (verifyKeyBundle's result), oneTimePrekey}.
export function pinContact(data, userId, bundle, now, forSession = false) {
  const master = b64encode(bundle.keys.masterKey);
  checkName(data, bundle.username, userId, master);
  const signedAt = bundleTime(bundle.keys);
  let contact = data.contacts[userId];
  if (contact === undefined) {
    contact = { username: bundle.username, masterKey: master, pinnedAt: Math.floor(now), formerIds: [] };
    data.contacts[userId] = contact;
  } else if (contact.masterKey !== master) {
    throw new IdentityChanged(contact.username, `${contact.username}'s identity key has changed since you first talked.`,
      { pinnedId: userId, offeredUserId: userId, offeredMasterKey: master });
  } else if (forSession && signedAt < (contact.bundleTime ?? 0)) {
    throw new StaleBundle(`the server sent ${contact.username}'s key bundle of ${bundle.keys.timestamp}, older than one seen before (a replayed old bundle)`);
  }
  contact.identityKey = b64encode(bundle.keys.identityKey);
  contact.bundleTime = Math.max(contact.bundleTime ?? 0, signedAt);
  return contact;
}

// Shows an IdentityChanged on the contact it concerns, until the user trusts or it goes away.
export function markIdentityChanged(data, error) {
  const contact = error.pinnedId && data.contacts[error.pinnedId];
  if (!contact || error.offeredUserId === null) return;
  const newAccount = error.offeredUserId !== error.pinnedId;
  contact.identityWarning = newAccount ? warningFor.newAccount(contact.username) : warningFor.keyChanged(contact.username);
  if (newAccount) contact.offeredUserId = error.offeredUserId;
  else delete contact.offeredUserId;
  if (error.offeredMasterKey) contact.offeredMasterKey = error.offeredMasterKey;
  else if (newAccount) delete contact.offeredMasterKey;
}

// The account and key to compare and trust for a contact: the offered ones while there is a warning.
export function offered(data, userId) {
  const contact = data.contacts[userId];
  return { userId: contact.offeredUserId ?? userId, masterKey: contact.offeredMasterKey ?? contact.masterKey };
}

// Accepts, on the user's word, `userId` with this bundle as `username`: what was pinned under that
// name (or for that id) before is replaced and its sessions dropped; the former account's id is
// kept in `formerIds`, so its history still shows under the name (as construct-chat's trust).
export function trustContact(data, username, userId, bundle, now) {
  const replaced = new Set([userId]);
  const found = contactByName(data, username);
  if (found) replaced.add(found[0]);
  const former = [];
  for (const oldId of replaced) {
    const old = data.contacts[oldId];
    delete data.contacts[oldId];
    delete data.sessions[oldId];
    if (old) former.push(...(old.formerIds ?? []), ...(oldId !== userId ? [oldId] : []));
  }
  const contact = pinContact(data, userId, { username, keys: bundle.keys, oneTimePrekey: null }, now);
  contact.formerIds = [...new Set(former)].filter((id) => id !== userId).sort();
}

// The messages with a contact, oldest first: kept ones, then those still in the outbox ("pending").
// Messages written to the name but not looked up yet count as the contact's too.
export function conversation(data, userId) {
  const contact = data.contacts[userId];
  const ids = new Set([userId, ...(contact?.formerIds ?? [])]);
  const mine = (entry) => ids.has(entry.peer) || (entry.peer === null && entry.peerName === contact?.username);
  const queued = data.outbox.filter(mine).map((entry) => ({
    id: entry.id, peer: entry.peer, peerName: entry.peerName, direction: "out", text: entry.text, timestamp: entry.createdAt, status: "pending",
  }));
  return [...data.history.filter(mine), ...queued];
}

// The contact a history or outbox entry belongs to (following a former id to its successor).
export function contactOf(data, entry) {
  if (data.contacts[entry.peer]) return entry.peer;
  for (const [userId, contact] of Object.entries(data.contacts)) {
    if (contact.formerIds?.includes(entry.peer) || (entry.peer === null && contact.username === entry.peerName)) return userId;
  }
  return null;
}

// Sending

function uuid4() {
  const bytes = random.bytes(16);
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// Puts a message for `peerName` in the outbox, before anything goes over the network; it is looked
// up, encrypted and sent from there, in order. A contact under a warning takes nothing.
export function queueOutgoing(data, peerName, text, now) {
  if (peerName === account(data).username) throw new SelfMessage("Messages to yourself are not supported");
  const size = utf8(text).length;
  if (size > MAX_PLAINTEXT) throw new MessageTooLarge(`The message is ${size} bytes; at most ${MAX_PLAINTEXT} fit in one`);
  const pinned = contactByName(data, peerName);
  if (pinned?.[1].identityWarning) throw new IdentityChanged(peerName, pinned[1].identityWarning, { pinnedId: pinned[0] });
  const entry = { id: uuid4(), peerName, peer: null, text, createdAt: Math.floor(now), message: null };
  data.outbox.push(entry);
  return entry;
}

export function outboxEntry(data, entryId) {
  const entry = data.outbox.find((e) => e.id === entryId);
  if (!entry) throw new Error(`no outbox entry ${entryId}`);
  return entry;
}

// The server says the entry's name is `userId`; IdentityChanged if pinning disagrees.
export function resolveOutgoing(data, entryId, userId) {
  const entry = outboxEntry(data, entryId);
  checkName(data, entry.peerName, userId);
  if (userId === account(data).userId) throw new SelfMessage("Messages to yourself are not supported");
  entry.peer = userId;
}

// Encrypts an outbox entry for its peer; returns the ChatMessage, also kept in the entry. Null
// when there is no session yet and no bundle was given: fetch the peer's bundle (which hands out
// one of their one-time prekeys) and call again with it.
export function encryptOutgoing(data, entryId, bundle, now) {
  const entry = outboxEntry(data, entryId);
  if (entry.message !== null) return entry.message;
  const me = account(data).userId;
  const peerId = entry.peer;
  const stored = data.sessions[peerId] ?? [];
  let session;
  let rest = [];
  if (stored.length) {
    session = Session.fromDict(stored[0]);
    rest = stored.slice(1);
  } else if (!bundle) {
    return null;
  } else {
    pinContact(data, peerId, bundle, now, true);
    session = Session.initiate(identity(data), bundle.keys, bundle.oneTimePrekey ?? null);
  }
  const out = session.encrypt(utf8(entry.text), envelopeContext(me, peerId, entry.id));
  data.sessions[peerId] = [session.toDict(), ...rest];
  entry.message = {
    id: entry.id, from: me, to: peerId, ephemeralPublicKey: b64encode(out.ratchetPublic),
    messageNumber: out.messageNumber, content: out.content, timestamp: Math.floor(now),
  };
  return entry.message;
}

// The server has the message ("sent" when queued, "delivered" when pushed to a connected device of
// the recipient), or it cannot go ("failed", saying why): it leaves the outbox for the history.
export function outgoingSettled(data, entryId, status, reason = "") {
  const entry = outboxEntry(data, entryId);
  data.outbox = data.outbox.filter((e) => e !== entry);
  const record = { id: entry.id, peer: entry.peer, peerName: entry.peerName, direction: "out", text: entry.text, timestamp: entry.createdAt, status };
  if (reason) record.reason = reason;
  keep(data, record);
}

function keep(data, entry) {
  data.history.push(entry);
  if (data.history.length > data.keepMessages) data.history.splice(0, data.history.length - data.keepMessages);
}

export function wireMessage(stored) {
  return { ...stored, ephemeralPublicKey: b64decode(stored.ephemeralPublicKey) };
}

// Receiving

function bytesField(value) {
  if (value instanceof Uint8Array) return value;
  return b64decode(value, DecryptionError);
}

// Decrypts a pushed ChatMessage with the Double Ratchet and keeps it in the history. Anything
// else, such as the seed's unauthenticated scheme ("v1"), is refused. `sender` is {username, keys}
// of the sender's fetched bundle, SENDER_GONE, or null when not fetched yet. Returns {status,
// entry, reason, usedOneTimePrekey}; status is "received", "duplicate", "rejected" (the sender's
// keys or name did not check out), "undecryptable" (acknowledge all of these) or "need-bundle"
// (call again with the sender's bundle). Refused messages are not kept.
export function acceptIncoming(data, message, sender, now) {
  const messageId = String(message.id);
  if (data.history.some((e) => e.id === messageId && e.direction === "in")) return { status: "duplicate" };
  let ratchetKey, number, content, context;
  try {
    ratchetKey = bytesField(message.ephemeralPublicKey);
    number = message.messageNumber;
    content = message.content;
    if (typeof content !== "string") throw new DecryptionError("content must be a string");
    context = envelopeContext(String(message.from), account(data).userId, messageId);
  } catch {
    return refused(data, message, "undecryptable", "malformed message");
  }
  if (!isRatchetContent(content)) {
    return refused(data, message, "undecryptable", "not a Double Ratchet message (the seed's unauthenticated scheme is not accepted)");
  }
  try {
    const outcome = acceptRatchet(data, message, ratchetKey, number, content, context, sender, now);
    if (outcome !== null) return outcome;
  } catch (error) {
    if (error instanceof ReplayError) return refused(data, message, "undecryptable", error.message);
    if (error instanceof IdentityChanged) {
      markIdentityChanged(data, error);
      return refused(data, message, "rejected", error.message);
    }
    if (error instanceof SenderUnverified) return refused(data, message, "rejected", error.message);
    if (!(error instanceof CryptoError)) throw error;
  }
  return refused(data, message, "undecryptable", "no session or prekey of ours opens it");
}

function acceptRatchet(data, message, ratchetKey, number, content, context, sender, now) {
  const peerId = String(message.from);
  const stored = (data.sessions[peerId] ?? []).map((item) => Session.fromDict(item));
  const initial = b64decode(content)[0] === VERSION_INITIAL;
  // An initial message belongs to the session it started, if we have it; otherwise it starts one.
  const candidates = initial ? stored.filter((s) => s.knowsInitial(content)) : stored;
  for (const session of candidates) {
    let plaintext;
    try {
      plaintext = session.decrypt(ratchetKey, number, content, context, now);
    } catch (error) {
      if (error instanceof ReplayError) {
        // Its id is new (duplicates are caught before), its message number is not.
        throw new ReplayError(`its message number (${number}) was used already: a replay, or the sender restored an old ` +
          "copy of their state, or it came so late that its key expired (30 days)");
      }
      if (error instanceof DecryptionError) continue;
      throw error;
    }
    // Send on the session that last decrypted a message.
    data.sessions[peerId] = [session.toDict(), ...stored.filter((s) => s !== session).map((s) => s.toDict())];
    return received(data, message, plaintext, now);
  }
  if (candidates.length || !initial) return null;
  const spks = new Map(data.signedPrekeys.map((item) => {
    const privateKey = b64decode(item.privateKey);
    return [signedPrekeyId(x25519Public(privateKey)), privateKey];
  }));
  const opks = new Map(data.oneTimePrekeys.map((item) => [item.keyId, b64decode(item.privateKey)]));
  let started;
  try {
    started = Session.fromInitial(identity(data), spks, opks, ratchetKey, number, content, context, now);
  } catch (error) {
    if (!(error instanceof ReplayError)) throw error;
    const header = x3dh.decodeHeader(b64decode(content).slice(5, 5 + x3dh.HEADER_SIZE));
    throw new ReplayError(`it starts a session with one-time prekey ${header.oneTimePrekeyId}, which was already used: ` +
      "the server handed it out twice, or this is a replay. Ask the sender to write again");
  }
  const { session, plaintext, oneTimePrekeyId } = started;
  const checked = checkSenderKeys(data, peerId, session, sender, now);
  if (checked !== null) return checked;
  // Only now that the first message decrypted and its sender checked out.
  if (oneTimePrekeyId !== null) data.oneTimePrekeys = data.oneTimePrekeys.filter((item) => item.keyId !== oneTimePrekeyId);
  data.sessions[peerId] = [session.toDict(), ...(data.sessions[peerId] ?? [])].slice(0, MAX_SESSIONS_PER_CONTACT);
  return { ...received(data, message, plaintext, now), usedOneTimePrekey: oneTimePrekeyId !== null };
}

// The X3DH header's keys are claims: they must be the pinned ones or the sender's signed ones.
// Null when they check out (the contact is pinned on first contact).
function checkSenderKeys(data, peerId, session, sender, now) {
  const master = b64encode(session.remoteMasterKey);
  const identityKey = b64encode(session.remoteIdentityKey);
  const contact = data.contacts[peerId];
  if (contact !== undefined && contact.masterKey !== master) {
    throw new IdentityChanged(contact.username, `${contact.username}'s identity key has changed.`,
      { pinnedId: peerId, offeredUserId: peerId, offeredMasterKey: master });
  }
  if (contact !== undefined && contact.identityKey === identityKey) return null;
  if (sender === null) return { status: "need-bundle" };
  if (sender === SENDER_GONE) throw new SenderUnverified("the sender has no verifiable key bundle");
  if (b64encode(sender.keys.masterKey) !== master || b64encode(sender.keys.identityKey) !== identityKey) {
    throw new SenderUnverified("the message's identity keys are not those of the sender's signed bundle");
  }
  pinContact(data, peerId, sender, now);
  return null;
}

function received(data, message, plaintext, now) {
  const entry = historyEntry(data, message, now, "received");
  entry.text = fromUtf8(plaintext, { lenient: true });
  keep(data, entry);
  return { status: "received", entry };
}

function refused(data, message, status, reason) {
  const entry = historyEntry(data, message, 0, status);
  entry.reason = reason;
  return { status, entry, reason };
}

function historyEntry(data, message, now, status) {
  const peerId = String(message.from);
  const timestamp = message.timestamp;
  return {
    id: String(message.id), peer: peerId, peerName: contactName(data, peerId), direction: "in",
    timestamp: Number.isInteger(timestamp) ? timestamp : null, receivedAt: Math.floor(now), status,
  };
}
