// Primitives and wire formats, exactly as construct/client/crypto.py and docs/crypto.md define them.
import sodium from "./sodium.mjs";
import {
  CryptoError, DecryptionError, InvalidBundle, MessageTooLarge,
  b64decode, b64encode, concat, equal, fromUtf8, utf8,
} from "./bytes.mjs";

export const KEY_SIZE = 32;
export const SIGNATURE_SIZE = 64;
export const NONCE_SIZE = 24; // XChaCha20-Poly1305-IETF
export const TAG_SIZE = 16;
export const SUITE_CLASSIC_X25519 = 1;
export const NO_ONE_TIME_PREKEY = 0xffffffff;
export const PAD_BUCKETS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
export const MAX_PLAINTEXT = PAD_BUCKETS[PAD_BUCKETS.length - 1] - 1;
const SAFETY_NUMBER_ITERATIONS = 5200;
const RFC3339 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

// Randomness, replaceable by the test-vector runner only (as the Python side's hooks are).
export const random = {
  bytes: (count) => sodium.randombytes_buf(count),
};

// -- primitives --------------------------------------------------------------

export function hmacSha256(key, data) {
  const state = sodium.crypto_auth_hmacsha256_init(key);
  sodium.crypto_auth_hmacsha256_update(state, data);
  return sodium.crypto_auth_hmacsha256_final(state);
}

export function sha256(data) {
  return sodium.crypto_hash_sha256(data);
}

export function hkdfSha256(ikm, salt, info, length) {
  if (!(length >= 0 && length <= 255 * 32)) throw new RangeError("HKDF-SHA256 output length out of range");
  const prk = hmacSha256(salt.length ? salt : new Uint8Array(32), ikm);
  const blocks = [];
  let block = new Uint8Array(0);
  for (let counter = 1, have = 0; have < length; counter++) {
    block = hmacSha256(prk, concat(block, info, new Uint8Array([counter])));
    blocks.push(block);
    have += block.length;
  }
  return concat(...blocks).slice(0, length);
}

export function generateX25519() {
  const privateKey = random.bytes(KEY_SIZE);
  return [privateKey, x25519Public(privateKey)];
}

export function x25519Public(privateKey) {
  return sodium.crypto_scalarmult_base(privateKey);
}

export function x25519(privateKey, publicKey, ErrorType = CryptoError) {
  if (!(publicKey instanceof Uint8Array) || publicKey.length !== KEY_SIZE) {
    throw new ErrorType("X25519 public key must be 32 bytes");
  }
  let shared;
  try {
    shared = sodium.crypto_scalarmult(privateKey, publicKey);
  } catch {
    throw new ErrorType("X25519 produced an all-zero shared secret");
  }
  if (equal(shared, new Uint8Array(KEY_SIZE))) throw new ErrorType("X25519 produced an all-zero shared secret");
  return shared;
}

export function aeadEncrypt(key, nonce, plaintext, associatedData) {
  return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, associatedData, null, nonce, key);
}

export function aeadDecrypt(key, nonce, ciphertext, associatedData) {
  try {
    return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(null, ciphertext, associatedData, nonce, key);
  } catch {
    throw new DecryptionError("message authentication failed");
  }
}

// -- padding -----------------------------------------------------------------

export function pad(plaintext) {
  if (plaintext.length > MAX_PLAINTEXT) {
    throw new MessageTooLarge(`plaintext is ${plaintext.length} bytes, limit ${MAX_PLAINTEXT}`);
  }
  const size = PAD_BUCKETS.find((bucket) => bucket > plaintext.length);
  const padded = new Uint8Array(size);
  padded.set(plaintext);
  padded[plaintext.length] = 0x80;
  return padded;
}

export function unpad(padded) {
  if (!PAD_BUCKETS.includes(padded.length)) throw new DecryptionError("padded plaintext has no bucket size");
  let end = padded.length;
  while (end > 0 && padded[end - 1] === 0) end--;
  if (end === 0 || padded[end - 1] !== 0x80) throw new DecryptionError("invalid padding");
  return padded.slice(0, end - 1);
}

// -- keys ----------------------------------------------------------------------

export function signedPrekeyId(publicKey) {
  const digest = sha256(publicKey);
  return ((digest[0] << 24) >>> 0) + (digest[1] << 16) + (digest[2] << 8) + digest[3];
}

export class IdentityKeys {
  constructor(signingSeed, dhPrivate) {
    if (signingSeed.length !== KEY_SIZE || dhPrivate.length !== KEY_SIZE) throw new CryptoError("identity keys must be 32 bytes");
    this.signingSeed = signingSeed;
    this.dhPrivate = dhPrivate;
    const pair = sodium.crypto_sign_seed_keypair(signingSeed);
    this.masterPublic = pair.publicKey;
    this.signingKey = pair.privateKey;
    this.dhPublic = x25519Public(dhPrivate);
  }

  static generate() {
    return new IdentityKeys(random.bytes(KEY_SIZE), generateX25519()[0]);
  }

  sign(data) {
    return sodium.crypto_sign_detached(data, this.signingKey);
  }

  toDict() {
    return { masterSeed: b64encode(this.signingSeed), identityPrivate: b64encode(this.dhPrivate) };
  }

  static fromDict(data) {
    return new IdentityKeys(b64decode(data.masterSeed, CryptoError, KEY_SIZE), b64decode(data.identityPrivate, CryptoError, KEY_SIZE));
  }
}

export function isKeyId(value) {
  return Number.isInteger(value) && value >= 0 && value < NO_ONE_TIME_PREKEY;
}

export function parseOneTimePrekey(data) {
  if (data === null || typeof data !== "object" || Array.isArray(data)) throw new InvalidBundle("one-time prekey must be an object");
  if (!isKeyId(data.keyId)) throw new InvalidBundle("one-time prekey id must be an integer in [0, 2**32 - 2]");
  return [data.keyId, b64decode(data.publicKey, InvalidBundle, KEY_SIZE)];
}

// -- key bundles -------------------------------------------------------------------

export function rfc3339(date) {
  return date.toISOString().replace(/\.\d{3}Z$/, "Z");
}

export function makeKeyBundle(identity, signedPrekeyPublic, userId = "", timestamp = new Date()) {
  const bundleData = {
    userId,
    timestamp: rfc3339(timestamp),
    supportedSuites: [{
      suiteId: SUITE_CLASSIC_X25519,
      identityKey: b64encode(identity.dhPublic),
      signedPrekey: b64encode(signedPrekeyPublic),
    }],
  };
  const raw = utf8(JSON.stringify(bundleData));
  return {
    masterIdentityKey: b64encode(identity.masterPublic),
    bundleData: b64encode(raw),
    signature: b64encode(identity.sign(raw)),
  };
}

function validTimestamp(value) {
  if (typeof value !== "string" || !RFC3339.test(value)) return false;
  const [year, month, day] = value.slice(0, 10).split("-").map(Number);
  const [hour, minute, second] = value.slice(11, 19).split(":").map(Number);
  const date = new Date(Date.UTC(year, month - 1, day));
  return date.getUTCMonth() === month - 1 && date.getUTCDate() === day && hour < 24 && minute < 60 && second < 60;
}

// Checks a key bundle as verify_key_bundle does, in the same order; returns its keys.
export function verifyKeyBundle(bundle, expectedUserId = null) {
  if (bundle === null || typeof bundle !== "object" || Array.isArray(bundle)) throw new InvalidBundle("key bundle must be an object");
  const masterKey = b64decode(bundle.masterIdentityKey, InvalidBundle, KEY_SIZE);
  const raw = b64decode(bundle.bundleData, InvalidBundle);
  const signature = b64decode(bundle.signature, InvalidBundle, SIGNATURE_SIZE);
  let verified = false;
  try {
    verified = sodium.crypto_sign_verify_detached(signature, raw, masterKey);
  } catch {
    verified = false;
  }
  if (!verified) throw new InvalidBundle("bundle signature does not verify");
  let data;
  try {
    data = JSON.parse(fromUtf8(raw));
  } catch {
    throw new InvalidBundle("bundleData is not UTF-8 JSON");
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) throw new InvalidBundle("bundleData must be a JSON object");
  if (typeof data.userId !== "string") throw new InvalidBundle("userId must be a string");
  if (expectedUserId !== null && data.userId !== expectedUserId) throw new InvalidBundle("bundle userId does not match the expected user");
  if (!validTimestamp(data.timestamp)) throw new InvalidBundle("timestamp must be RFC 3339");
  const suites = data.supportedSuites;
  if (!Array.isArray(suites) || suites.length === 0) throw new InvalidBundle("supportedSuites must be a non-empty list");
  for (const suite of suites) {
    const suiteId = suite !== null && typeof suite === "object" && !Array.isArray(suite) ? suite.suiteId : undefined;
    if (suiteId !== SUITE_CLASSIC_X25519 || !Number.isInteger(suiteId)) throw new InvalidBundle(`unsupported suite ${suiteId}`);
  }
  const suite = suites[0];
  const signedPrekey = b64decode(suite.signedPrekey, InvalidBundle, KEY_SIZE);
  return {
    userId: data.userId,
    timestamp: data.timestamp,
    masterKey,
    identityKey: b64decode(suite.identityKey, InvalidBundle, KEY_SIZE),
    signedPrekey,
    signedPrekeyId: signedPrekeyId(signedPrekey),
  };
}

// -- envelope binding and safety numbers ----------------------------------------------

export function envelopeContext(senderId, recipientId, messageId) {
  const parts = [];
  for (const field of [senderId, recipientId, messageId]) {
    const raw = utf8(field);
    if (raw.length > 0xffff) throw new RangeError("envelope field too long");
    parts.push(new Uint8Array([raw.length >> 8, raw.length & 0xff]), raw);
  }
  return concat(...parts);
}

function fingerprintDigits(userId, key) {
  let digest = concat(new Uint8Array([0, 0]), key, utf8(userId));
  for (let i = 0; i < SAFETY_NUMBER_ITERATIONS; i++) digest = sodium.crypto_hash_sha512(concat(digest, key));
  let digits = "";
  for (let i = 0; i < 30; i += 5) {
    // 5 bytes exceed 32-bit arithmetic: build the number with multiplications.
    let value = 0;
    for (let j = 0; j < 5; j++) value = value * 256 + digest[i + j];
    digits += String(value % 100000).padStart(5, "0");
  }
  return digits;
}

export function safetyNumber(localUserId, localMasterKey, remoteUserId, remoteMasterKey) {
  const local = fingerprintDigits(localUserId, localMasterKey);
  const remote = fingerprintDigits(remoteUserId, remoteMasterKey);
  const digits = local <= remote ? local + remote : remote + local;
  return digits.match(/.{5}/g).join(" ");
}
