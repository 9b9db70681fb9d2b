// The Double Ratchet mapped onto ChatMessage, as construct/client/ratchet.py (docs/crypto.md):
// KDF_RK = HKDF(salt=rk, ikm=dh, "construct/ratchet/root", 64); KDF_CK = HMAC(ck, 1) / HMAC(ck, 2);
// ENCRYPT = XChaCha20-Poly1305-IETF, key = HKDF(mk, 0*32, "construct/ratchet/message", 32), nonce random.
// content = b64(version ‖ PN(4) [‖ X3DH header] ‖ nonce(24) ‖ ciphertext ‖ tag(16)).
import {
  CryptoError, DecryptionError, InvalidBundle, ReplayError, TooManySkipped,
  b64decode, b64encode, concat, equal, isU32, readU32, u32, utf8,
} from "./bytes.mjs";
import {
  KEY_SIZE, NONCE_SIZE, TAG_SIZE, aeadDecrypt, aeadEncrypt, generateX25519, hkdfSha256, hmacSha256,
  pad, random, unpad, x25519, x25519Public,
} from "./crypto.mjs";
import * as x3dh from "./x3dh.mjs";

export const VERSION_INITIAL = 0x20;
export const VERSION_NORMAL = 0x21;
export const MAX_SKIP = 1000;
export const MAX_SKIPPED_TOTAL = 2000;
// A skipped message key is kept for a message that may still come; past this age it is dropped.
export const MAX_SKIPPED_AGE_SECONDS = 30 * 24 * 3600;
const RK_INFO = utf8("construct/ratchet/root");
const MESSAGE_INFO = utf8("construct/ratchet/message");
// Version 2 stamps each skipped message key with the time it was skipped; version 1 has none.
const STATE_VERSION = 2;
const ONE = new Uint8Array([1]);
const TWO = new Uint8Array([2]);

function kdfRk(rootKey, dhOutput) {
  const out = hkdfSha256(dhOutput, rootKey, RK_INFO, 2 * KEY_SIZE);
  return [out.slice(0, KEY_SIZE), out.slice(KEY_SIZE)];
}

// Returns [next chain key, message key].
function kdfCk(chainKey) {
  return [hmacSha256(chainKey, TWO), hmacSha256(chainKey, ONE)];
}

function messageKey(mk) {
  return hkdfSha256(mk, new Uint8Array(KEY_SIZE), MESSAGE_INFO, KEY_SIZE);
}

function parseContent(content) {
  const raw = b64decode(content, DecryptionError);
  if (raw.length === 0) throw new DecryptionError("empty content");
  let headerSize;
  if (raw[0] === VERSION_NORMAL) headerSize = 1 + 4;
  else if (raw[0] === VERSION_INITIAL) headerSize = 1 + 4 + x3dh.HEADER_SIZE;
  else throw new DecryptionError("not a ratchet message");
  if (raw.length < headerSize + NONCE_SIZE + TAG_SIZE) throw new DecryptionError("content too short");
  return {
    header: raw.slice(0, headerSize),
    previousChainLength: readU32(raw, 1),
    initialHeader: raw[0] === VERSION_INITIAL ? raw.slice(5, headerSize) : null,
    nonce: raw.slice(headerSize, headerSize + NONCE_SIZE),
    ciphertext: raw.slice(headerSize + NONCE_SIZE),
  };
}

export function isRatchetContent(content) {
  try {
    parseContent(content);
    return true;
  } catch {
    return false;
  }
}

export function isInitialContent(content) {
  try {
    return parseContent(content).initialHeader !== null;
  } catch {
    return false;
  }
}

const skippedKey = (dh, number) => `${b64encode(dh)}:${number}`;

function copyState(state) {
  return { ...state, skipped: new Map(state.skipped) };
}

// `skipped` maps a position to [message key, when it was skipped (null: unknown, from a version 1
// state; stamped at the next decrypt)], oldest first.
function skipMessageKeys(state, until, now) {
  if (state.ckr === null || state.dhr === null) return;
  if (until > state.nr + MAX_SKIP) throw new TooManySkipped(`message ${until} is more than ${MAX_SKIP} ahead of ${state.nr}`);
  while (state.nr < until) {
    const [next, mk] = kdfCk(state.ckr);
    state.ckr = next;
    state.skipped.set(skippedKey(state.dhr, state.nr), [mk, now]);
    state.nr += 1;
    if (state.skipped.size > MAX_SKIPPED_TOTAL) state.skipped.delete(state.skipped.keys().next().value);
  }
}

function expireSkipped(state, now) {
  for (const [slot, [mk, skippedAt]] of [...state.skipped]) {
    if (skippedAt === null) state.skipped.set(slot, [mk, now]);
    else if (now - skippedAt > MAX_SKIPPED_AGE_SECONDS) state.skipped.delete(slot);
  }
}

function dhRatchet(state, remotePublic) {
  state.pn = state.ns;
  state.ns = 0;
  state.nr = 0;
  state.dhr = remotePublic;
  [state.rk, state.ckr] = kdfRk(state.rk, x25519(state.dhsPrivate, remotePublic, DecryptionError));
  state.dhsPrivate = generateX25519()[0];
  [state.rk, state.cks] = kdfRk(state.rk, x25519(state.dhsPrivate, remotePublic, DecryptionError));
}

const optionalB64 = (value) => (value === null ? null : b64encode(value));
const optionalKey = (value) => (value === null ? null : b64decode(value, CryptoError, KEY_SIZE));

function counter(value) {
  if (!isU32(value)) throw new CryptoError("malformed counter");
  return value;
}

export class Session {
  constructor(state, associatedData, initialHeader, sendInitial, remoteIdentityKey, remoteMasterKey) {
    this.state = state;
    this.ad = associatedData;
    this.initialHeader = initialHeader;
    this.sendInitial = sendInitial;
    this.remoteIdentityKey = remoteIdentityKey;
    this.remoteMasterKey = remoteMasterKey;
  }

  // X3DH initiator; messages carry the X3DH header (0x20) until a reply decrypts.
  static initiate(identity, bundle, oneTimePrekey = null) {
    const { secret, ad, header } = x3dh.initiate(identity, bundle, oneTimePrekey);
    const dhsPrivate = generateX25519()[0];
    const [rk, cks] = kdfRk(secret, x25519(dhsPrivate, bundle.signedPrekey, InvalidBundle));
    const state = { dhsPrivate, dhr: bundle.signedPrekey, rk, cks, ckr: null, ns: 0, nr: 0, pn: 0, skipped: new Map() };
    return new Session(state, ad, x3dh.encodeHeader(header), true, bundle.identityKey, bundle.masterKey);
  }

  // X3DH responder for a 0x20 message. Returns {session, plaintext, oneTimePrekeyId}; the caller
  // checks the remote keys against the sender's bundle or pin before keeping anything.
  static fromInitial(identity, signedPrekeys, oneTimePrekeys, ratchetPublic, messageNumber, content, context, now) {
    const parsed = parseContent(content);
    if (parsed.initialHeader === null) throw new DecryptionError("not an initial message");
    const header = x3dh.decodeHeader(parsed.initialHeader);
    const { secret, ad, oneTimePrekeyId } = x3dh.respond(identity, signedPrekeys, oneTimePrekeys, header);
    const dhsPrivate = signedPrekeys.get(header.signedPrekeyId);
    const state = { dhsPrivate, dhr: null, rk: secret, cks: null, ckr: null, ns: 0, nr: 0, pn: 0, skipped: new Map() };
    const session = new Session(state, ad, parsed.initialHeader, false, header.identityKey, header.masterKey);
    const plaintext = session.decrypt(ratchetPublic, messageNumber, content, context, now);
    return { session, plaintext, oneTimePrekeyId };
  }

  knowsInitial(content) {
    let parsed;
    try {
      parsed = parseContent(content);
    } catch {
      return false;
    }
    return parsed.initialHeader !== null && equal(parsed.initialHeader, this.initialHeader);
  }

  // Returns {ratchetPublic, messageNumber, content} for the ChatMessage fields.
  encrypt(plaintext, context) {
    const padded = pad(plaintext);
    const state = this.state;
    if (state.cks === null) throw new CryptoError("session has no sending chain");
    if (state.ns >= 0xffffffff) throw new CryptoError("sending chain exhausted");
    const [nextChainKey, mk] = kdfCk(state.cks);
    const number = state.ns;
    const header = this.sendInitial
      ? concat(new Uint8Array([VERSION_INITIAL]), u32(state.pn), this.initialHeader)
      : concat(new Uint8Array([VERSION_NORMAL]), u32(state.pn));
    const ratchetPublic = x25519Public(state.dhsPrivate);
    const nonce = random.bytes(NONCE_SIZE);
    const ciphertext = aeadEncrypt(messageKey(mk), nonce, padded, this.aeadAd(header, ratchetPublic, number, context));
    state.cks = nextChainKey;
    state.ns += 1;
    return { ratchetPublic, messageNumber: number, content: b64encode(concat(header, nonce, ciphertext)) };
  }

  // Transactional: when it throws, the session is exactly as before. `now` (unix seconds) stamps
  // the message keys skipped here; keys skipped more than MAX_SKIPPED_AGE_SECONDS before it go.
  decrypt(ratchetPublic, messageNumber, content, context, now) {
    if (typeof now !== "number") throw new TypeError("decrypt needs the time");
    const parsed = parseContent(content);
    if (parsed.initialHeader !== null && !equal(parsed.initialHeader, this.initialHeader)) {
      throw new DecryptionError("initial message of another session");
    }
    if (!(ratchetPublic instanceof Uint8Array) || ratchetPublic.length !== KEY_SIZE) throw new DecryptionError("ratchet key must be 32 bytes");
    if (!isU32(messageNumber)) throw new DecryptionError("message number must be a u32");

    const state = copyState(this.state);
    expireSkipped(state, now);
    const slot = skippedKey(ratchetPublic, messageNumber);
    let mk = state.skipped.get(slot)?.[0];
    if (mk !== undefined) {
      state.skipped.delete(slot);
    } else {
      const sameChain = state.dhr !== null && equal(ratchetPublic, state.dhr);
      if (sameChain && messageNumber < state.nr) throw new ReplayError(`message ${messageNumber} was already received`);
      if (!sameChain) {
        skipMessageKeys(state, parsed.previousChainLength, now);
        dhRatchet(state, ratchetPublic);
      }
      skipMessageKeys(state, messageNumber, now);
      if (state.ckr === null) throw new DecryptionError("no receiving chain for this ratchet key");
      [state.ckr, mk] = kdfCk(state.ckr);
      state.nr += 1;
    }
    const ad = this.aeadAd(parsed.header, ratchetPublic, messageNumber, context);
    const plaintext = unpad(aeadDecrypt(messageKey(mk), parsed.nonce, parsed.ciphertext, ad));
    this.state = state;
    this.sendInitial = false;
    return plaintext;
  }

  aeadAd(header, ratchetPublic, number, context) {
    return concat(this.ad, header, ratchetPublic, u32(number), context);
  }

  // The JSON form of Session.to_dict() in ratchet.py, field for field.
  toDict() {
    const s = this.state;
    return {
      version: STATE_VERSION,
      associatedData: b64encode(this.ad),
      initialHeader: b64encode(this.initialHeader),
      sendInitial: this.sendInitial,
      remoteIdentityKey: b64encode(this.remoteIdentityKey),
      remoteMasterKey: b64encode(this.remoteMasterKey),
      dhsPrivate: b64encode(s.dhsPrivate),
      dhr: optionalB64(s.dhr),
      rootKey: b64encode(s.rk),
      sendingChainKey: optionalB64(s.cks),
      receivingChainKey: optionalB64(s.ckr),
      ns: s.ns,
      nr: s.nr,
      pn: s.pn,
      skipped: [...s.skipped].map(([slot, [key, skippedAt]]) => {
        const [dh, number] = slot.split(":");
        return [dh, Number(number), b64encode(key), skippedAt];
      }),
    };
  }

  static fromDict(data) {
    try {
      if (data.version !== 1 && data.version !== STATE_VERSION) throw new CryptoError("unsupported session state version");
      if (typeof data.sendInitial !== "boolean") throw new CryptoError("malformed sendInitial");
      const skipped = new Map();
      for (const item of data.skipped) {
        const [dh, number, key] = item;
        const skippedAt = data.version === STATE_VERSION ? item[3] : null;
        if (skippedAt !== null && typeof skippedAt !== "number") throw new CryptoError("malformed skipped key time");
        skipped.set(skippedKey(b64decode(dh, CryptoError, KEY_SIZE), counter(number)), [b64decode(key, CryptoError, KEY_SIZE), skippedAt]);
      }
      const state = {
        dhsPrivate: b64decode(data.dhsPrivate, CryptoError, KEY_SIZE),
        dhr: optionalKey(data.dhr),
        rk: b64decode(data.rootKey, CryptoError, KEY_SIZE),
        cks: optionalKey(data.sendingChainKey),
        ckr: optionalKey(data.receivingChainKey),
        ns: counter(data.ns),
        nr: counter(data.nr),
        pn: counter(data.pn),
        skipped,
      };
      return new Session(
        state,
        b64decode(data.associatedData, CryptoError, 4 * KEY_SIZE),
        b64decode(data.initialHeader, CryptoError, x3dh.HEADER_SIZE),
        data.sendInitial,
        b64decode(data.remoteIdentityKey, CryptoError, KEY_SIZE),
        b64decode(data.remoteMasterKey, CryptoError, KEY_SIZE),
      );
    } catch (error) {
      if (error instanceof CryptoError) throw error;
      throw new CryptoError("malformed session state");
    }
  }
}
