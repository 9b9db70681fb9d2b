// The account state and what sending and receiving do to it, without I/O: a port of
// construct/client/account.py. The state is construct-chat's own document, field for field, so
// that a key file exported from the browser is a construct-chat state file and the reverse:
//
//   {version: 1, server, identity: {masterSeed, identityPrivate},
//    account: {userId, username, sessionToken, expires} | null,
//    signedPrekeys: [{keyId, privateKey, createdAt, published, retiredAt}]  newest first,
//    oneTimePrekeys: [{keyId, privateKey}], nextPrekeyId,
//    contacts: {userId: {username, masterKey, identityKey, pinnedAt, identityWarning?, replacedBy?}},
//    sessions: {userId: [Session.toDict()]}  the one to send on first,
//    history: [entry], outbox: [ChatMessage]}
//
// `identityWarning` and `replacedBy` are the web client's (construct-chat ignores them). Every
// function changes `data` in place; the store runs it on a copy and saves the copy, so one that
// throws changes nothing. Times are unix seconds passed in by the caller.
import { CryptoError, DecryptionError, ReplayError, b64decode, b64encode, fromUtf8, utf8 } from "./bytes.mjs";
import {
  IdentityKeys, envelopeContext, generateX25519, makeKeyBundle, random, signedPrekeyId, x25519Public,
} from "./crypto.mjs";
import { Session, VERSION_INITIAL, isRatchetContent } from "./ratchet.mjs";

export const STATE_VERSION = 1;
export const PREKEY_BATCH = 100;
export const PREKEY_LOW_WATER = 25;
export const SIGNED_PREKEY_ROTATION_SECONDS = 7 * 24 * 3600;
export const SIGNED_PREKEY_RETENTION_SECONDS = 30 * 24 * 3600;
export const MAX_SESSIONS_PER_CONTACT = 2;
export const SENDER_GONE = "sender-gone";

export class NotRegistered extends Error {}

export class IdentityChanged extends Error {
  constructor(username, message = null, offeredMasterKey = null) {
    super(message ?? `${username}'s identity key has changed since you first talked. The server may be ` +
      "impersonating them: compare safety numbers with them before you trust this account.");
    this.username = username;
    this.offeredMasterKey = offeredMasterKey;
  }
}

export class SenderUnverified extends Error {}

const warningFor = {
  keyChanged: (name) => `${name}'s identity key is not the one you first saw. If ${name} did not tell you they ` +
    "reinstalled, the server may be impersonating them: compare safety numbers with them before you trust it.",
  newAccount: (name) => `The name ${name} now belongs to a different account (new keys) than the one you talked ` +
    `to before. If ${name} did not tell you they made a new account, someone may be impersonating them: ` +
    "compare safety numbers with them before you trust it.",
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
    history: [],
    outbox: [],
  };
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

export function contactByName(data, username, exceptUserId = null) {
  for (const [userId, contact] of Object.entries(data.contacts)) {
    if (contact.username === username && userId !== exceptUserId && !contact.replacedBy) return [userId, contact];
  }
  return null;
}

// Trust on first use: pin the master key; a different one later is refused (IdentityChanged).
// A first contact whose name an earlier contact had is pinned with a warning: the name now
// belongs to another account, which the user should check before trusting it.
// `bundle` is {username, keys (verifyKeyBundle's result), oneTimePrekey}.
export function pinContact(data, userId, bundle, now) {
  const master = b64encode(bundle.keys.masterKey);
  let contact = data.contacts[userId];
  if (contact === undefined) {
    contact = { username: bundle.username, masterKey: master, pinnedAt: Math.floor(now) };
    const earlier = contactByName(data, bundle.username, userId);
    if (earlier) {
      earlier[1].replacedBy = userId;
      contact.identityWarning = warningFor.newAccount(bundle.username);
    }
    data.contacts[userId] = contact;
  } else if (contact.masterKey !== master) {
    throw new IdentityChanged(contact.username, null, master);
  }
  contact.identityKey = b64encode(bundle.keys.identityKey);
  return contact;
}

// Remembers that the server offered another master key for a pinned contact, and warns.
export function markKeyChanged(data, userId, offeredMasterKey) {
  const contact = data.contacts[userId];
  contact.identityWarning = warningFor.keyChanged(contact.username);
  if (offeredMasterKey) contact.offeredMasterKey = offeredMasterKey;
}

// The user compared safety numbers and trusts the contact's current keys: pin them (dropping the
// sessions made with the old ones) and clear the warning.
export function trustIdentity(data, userId) {
  const contact = data.contacts[userId];
  if (contact.offeredMasterKey && contact.offeredMasterKey !== contact.masterKey) {
    contact.masterKey = contact.offeredMasterKey;
    delete data.sessions[userId];
  }
  delete contact.offeredMasterKey;
  delete contact.identityWarning;
}

// Sending

function uuid4() {
  const bytes = random.bytes(16);
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export function prepareOutgoing(data, peerId, text, bundle, now) {
  const me = account(data).userId;
  const contact = data.contacts[peerId];
  if (contact?.identityWarning) throw new IdentityChanged(contact.username, contact.identityWarning);
  const stored = data.sessions[peerId] ?? [];
  let session;
  let rest = [];
  if (stored.length) {
    session = Session.fromDict(stored[0]);
    rest = stored.slice(1);
  } else if (!bundle) {
    return null;
  } else {
    pinContact(data, peerId, bundle, now);
    if (data.contacts[peerId].identityWarning) throw new IdentityChanged(bundle.username, data.contacts[peerId].identityWarning);
    session = Session.initiate(identity(data), bundle.keys, bundle.oneTimePrekey ?? null);
  }
  const messageId = uuid4();
  const out = session.encrypt(utf8(text), envelopeContext(me, peerId, messageId));
  data.sessions[peerId] = [session.toDict(), ...rest];
  const message = {
    id: messageId, from: me, to: peerId, ephemeralPublicKey: b64encode(out.ratchetPublic),
    messageNumber: out.messageNumber, content: out.content, timestamp: Math.floor(now),
  };
  data.outbox.push(message);
  data.history.push({ id: messageId, peer: peerId, direction: "out", text, timestamp: Math.floor(now), status: "pending" });
  return message;
}

// The server acknowledged the message ("sent" when queued, "delivered" when pushed to a
// connected device of the recipient), or refused it for good ("failed").
export function outgoingSettled(data, messageId, status) {
  data.outbox = data.outbox.filter((m) => m.id !== messageId);
  for (let i = data.history.length - 1; i >= 0; i--) {
    const entry = data.history[i];
    if (entry.id === messageId && entry.direction === "out") {
      entry.status = status;
      break;
    }
  }
}

export function wireMessage(stored) {
  return { ...stored, ephemeralPublicKey: b64decode(stored.ephemeralPublicKey) };
}

// Receiving

function bytesField(value) {
  if (value instanceof Uint8Array) return value;
  return b64decode(value, DecryptionError);
}

// Decrypts a pushed ChatMessage with the Double Ratchet and stores it in the history.
// `sender` is {username, keys} of the sender's fetched bundle, SENDER_GONE, or null when not
// fetched yet. Returns {status, entry, reason, usedOneTimePrekey}; status is "received",
// "duplicate", "rejected", "undecryptable" (acknowledge all of these) or "need-bundle".
export function acceptIncoming(data, message, sender, now) {
  const messageId = String(message.id);
  const peerId = String(message.from);
  if (data.history.some((e) => e.id === messageId && e.direction === "in")) return { status: "duplicate" };
  let ratchetKey, number, content, context;
  try {
    ratchetKey = bytesField(message.ephemeralPublicKey);
    number = message.messageNumber;
    content = message.content;
    if (typeof content !== "string") throw new DecryptionError("content must be a string");
    context = envelopeContext(peerId, account(data).userId, messageId);
  } catch {
    return refused(data, message, "undecryptable", "malformed message", now);
  }
  if (!isRatchetContent(content)) {
    return refused(data, message, "undecryptable", "not a Double Ratchet message (the seed's unauthenticated scheme is not accepted)", now);
  }
  let outcome = null;
  try {
    outcome = acceptRatchet(data, message, ratchetKey, number, content, context, sender, now);
  } catch (error) {
    if (error instanceof ReplayError) return { status: "duplicate" };
    if (error instanceof IdentityChanged || error instanceof SenderUnverified) return refused(data, message, "rejected", error.message, now);
    if (!(error instanceof CryptoError)) throw error;
  }
  return outcome ?? refused(data, message, "undecryptable", "no session or prekey of ours opens it", now);
}

function acceptRatchet(data, message, ratchetKey, number, content, context, sender, now) {
  const peerId = String(message.from);
  const stored = (data.sessions[peerId] ?? []).map((item) => Session.fromDict(item));
  const initial = b64decode(content)[0] === VERSION_INITIAL;
  const candidates = initial ? stored.filter((s) => s.knowsInitial(content)) : stored;
  for (const session of candidates) {
    let plaintext;
    try {
      plaintext = session.decrypt(ratchetKey, number, content, context);
    } catch (error) {
      if (error instanceof DecryptionError) continue;
      throw error;
    }
    data.sessions[peerId] = [session.toDict(), ...stored.filter((s) => s !== session).map((s) => s.toDict())];
    return received(data, message, plaintext, now);
  }
  if (candidates.length || !initial) return null;
  const spks = new Map(data.signedPrekeys.map((item) => {
    const privateKey = b64decode(item.privateKey);
    return [signedPrekeyId(x25519Public(privateKey)), privateKey];
  }));
  const opks = new Map(data.oneTimePrekeys.map((item) => [item.keyId, b64decode(item.privateKey)]));
  const { session, plaintext, oneTimePrekeyId } = Session.fromInitial(identity(data), spks, opks, ratchetKey, number, content, context);
  const checked = checkSenderKeys(data, peerId, session, sender, now);
  if (checked !== null) return checked;
  if (oneTimePrekeyId !== null) data.oneTimePrekeys = data.oneTimePrekeys.filter((item) => item.keyId !== oneTimePrekeyId);
  data.sessions[peerId] = [session.toDict(), ...(data.sessions[peerId] ?? [])].slice(0, MAX_SESSIONS_PER_CONTACT);
  return { ...received(data, message, plaintext, now), usedOneTimePrekey: oneTimePrekeyId !== null };
}

// The X3DH header's keys are claims: they must be the pinned ones or the sender's signed ones.
function checkSenderKeys(data, peerId, session, sender, now) {
  const master = b64encode(session.remoteMasterKey);
  const identityKey = b64encode(session.remoteIdentityKey);
  const contact = data.contacts[peerId];
  if (contact !== undefined && contact.masterKey !== master) {
    markKeyChanged(data, peerId, master);
    throw new IdentityChanged(contact.username);
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
  data.history.push(entry);
  return { status: "received", entry };
}

function refused(data, message, status, reason, now) {
  const entry = historyEntry(data, message, now, status);
  entry.reason = reason;
  data.history.push(entry);
  return { status, entry, reason };
}

function historyEntry(data, message, now, status) {
  const peerId = String(message.from);
  const contact = data.contacts[peerId];
  const timestamp = message.timestamp;
  return {
    id: String(message.id), peer: peerId, peerName: contact ? contact.username : null, direction: "in",
    timestamp: Number.isInteger(timestamp) ? timestamp : null, receivedAt: Math.floor(now), status,
  };
}
