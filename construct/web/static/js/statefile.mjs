// construct-chat's passphrase-encrypted state file (construct/client/state.py, docs/crypto.md):
// {"version":1,"kdf":"argon2id","opslimit","memlimit","salt":b64(16),"box":b64(nonce(24) ‖ tag(16) ‖ ciphertext)}.
// The key is Argon2id(passphrase, salt); the box is libsodium's secretbox (XSalsa20-Poly1305, the
// tag before the ciphertext) of the state as JSON.
import sodium from "./sodium.mjs";
import { WrongPassphrase, b64decode, b64encode, concat, fromUtf8, utf8 } from "./bytes.mjs";
import { random } from "./crypto.mjs";

const FILE_VERSION = 1;
const KDF_NAME = "argon2id";
const SALT_SIZE = sodium.crypto_pwhash_SALTBYTES;
const NONCE_SIZE = sodium.crypto_secretbox_NONCEBYTES;
const MAX_OPSLIMIT = 64;
const MAX_MEMLIMIT = 4 * 1024 ** 3;
// RFC 9106's second recommended Argon2id setting (3 passes over 64 MiB): about a second or
// less in a browser, and memory a phone can spare. construct-chat's default is 256 MiB.
export const BROWSER_KDF = { opslimit: 3, memlimit: 64 * 1024 * 1024 };

function deriveKey(passphrase, salt, kdf) {
  return sodium.crypto_pwhash(sodium.crypto_secretbox_KEYBYTES, utf8(passphrase), salt, kdf.opslimit, kdf.memlimit,
    sodium.crypto_pwhash_ALG_ARGON2ID13);
}

// A fresh salt and the key derived from it (slow on purpose).
export function newStateKey(passphrase, kdf = BROWSER_KDF) {
  const salt = random.bytes(SALT_SIZE);
  return { salt, kdf: { ...kdf }, key: deriveKey(passphrase, salt, kdf) };
}

// The state file's text for `data`, sealed under a fresh random nonce.
export function seal(stateKey, data) {
  const nonce = random.bytes(NONCE_SIZE);
  const box = concat(nonce, sodium.crypto_secretbox_easy(utf8(JSON.stringify(data)), nonce, stateKey.key));
  return JSON.stringify({
    version: FILE_VERSION, kdf: KDF_NAME, opslimit: stateKey.kdf.opslimit, memlimit: stateKey.kdf.memlimit,
    salt: b64encode(stateKey.salt), box: b64encode(box),
  });
}

function inRange(value, low, high) {
  return Number.isInteger(value) && value >= low && value <= high;
}

// Parses and decrypts a state file's text. `known` (a key from an earlier open or newStateKey)
// skips Argon2id when the salt and cost are the same. Returns {data, stateKey}.
export function open(text, passphrase, known = null) {
  let document, salt, box;
  try {
    document = JSON.parse(text);
    if (document === null || typeof document !== "object" || Array.isArray(document)) throw new Error("not an object");
    if (document.version !== FILE_VERSION || document.kdf !== KDF_NAME) throw new Error("unsupported version or KDF");
    if (!inRange(document.opslimit, sodium.crypto_pwhash_OPSLIMIT_MIN, MAX_OPSLIMIT) ||
        !inRange(document.memlimit, sodium.crypto_pwhash_MEMLIMIT_MIN, MAX_MEMLIMIT)) throw new Error("KDF cost out of range");
    salt = b64decode(document.salt, Error, SALT_SIZE);
    box = b64decode(document.box);
    if (box.length < NONCE_SIZE + sodium.crypto_secretbox_MACBYTES) throw new Error("box too short");
  } catch {
    throw new WrongPassphrase("this is not a Construct key file, or it was damaged");
  }
  const kdf = { opslimit: document.opslimit, memlimit: document.memlimit };
  const reuse = known && b64encode(known.salt) === document.salt && known.kdf.opslimit === kdf.opslimit && known.kdf.memlimit === kdf.memlimit;
  const stateKey = reuse ? known : { salt, kdf, key: deriveKey(passphrase, salt, kdf) };
  let plaintext;
  try {
    plaintext = sodium.crypto_secretbox_open_easy(box.subarray(NONCE_SIZE), box.subarray(0, NONCE_SIZE), stateKey.key);
  } catch {
    throw new WrongPassphrase("wrong passphrase, or the key file was tampered with");
  }
  const data = JSON.parse(fromUtf8(plaintext));
  if (data === null || typeof data !== "object" || Array.isArray(data)) throw new WrongPassphrase("the key file does not hold a state");
  return { data, stateKey };
}
