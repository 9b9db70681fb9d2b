// X3DH as construct/client/x3dh.py: X25519, SHA-256, info "construct/x3dh", AD with both master keys.
import { DecryptionError, InvalidBundle, ReplayError, concat, readU32, u32, utf8 } from "./bytes.mjs";
import { KEY_SIZE, NO_ONE_TIME_PREKEY, generateX25519, hkdfSha256, parseOneTimePrekey, x25519 } from "./crypto.mjs";

const INFO = utf8("construct/x3dh");
const F = new Uint8Array(KEY_SIZE).fill(0xff);
export const HEADER_SIZE = 3 * KEY_SIZE + 4 + 4;

// IKa_dh(32) ‖ IKa_master(32) ‖ EKa(32) ‖ SPK id(4) ‖ OPK id(4, 0xFFFFFFFF = none)
export function encodeHeader({ identityKey, masterKey, ephemeralKey, signedPrekeyId, oneTimePrekeyId }) {
  return concat(identityKey, masterKey, ephemeralKey, u32(signedPrekeyId),
    u32(oneTimePrekeyId === null ? NO_ONE_TIME_PREKEY : oneTimePrekeyId));
}

export function decodeHeader(data) {
  if (data.length !== HEADER_SIZE) throw new DecryptionError(`X3DH header must be ${HEADER_SIZE} bytes`);
  const opkId = readU32(data, 100);
  return {
    identityKey: data.slice(0, 32),
    masterKey: data.slice(32, 64),
    ephemeralKey: data.slice(64, 96),
    signedPrekeyId: readU32(data, 96),
    oneTimePrekeyId: opkId === NO_ONE_TIME_PREKEY ? null : opkId,
  };
}

function kdf(dhOutputs) {
  return hkdfSha256(concat(F, ...dhOutputs), new Uint8Array(KEY_SIZE), INFO, KEY_SIZE);
}

// Initiator: `bundle` from verifyKeyBundle, `oneTimePrekey` the server's {keyId, publicKey} or null.
export function initiate(identity, bundle, oneTimePrekey = null) {
  const [ephemeralPrivate, ephemeralPublic] = generateX25519();
  const dhOutputs = [
    x25519(identity.dhPrivate, bundle.signedPrekey, InvalidBundle),
    x25519(ephemeralPrivate, bundle.identityKey, InvalidBundle),
    x25519(ephemeralPrivate, bundle.signedPrekey, InvalidBundle),
  ];
  let opkId = null;
  if (oneTimePrekey !== null && oneTimePrekey !== undefined) {
    const [keyId, opkPublic] = parseOneTimePrekey(oneTimePrekey);
    opkId = keyId;
    dhOutputs.push(x25519(ephemeralPrivate, opkPublic, InvalidBundle));
  }
  const header = {
    identityKey: identity.dhPublic,
    masterKey: identity.masterPublic,
    ephemeralKey: ephemeralPublic,
    signedPrekeyId: bundle.signedPrekeyId,
    oneTimePrekeyId: opkId,
  };
  const ad = concat(identity.dhPublic, bundle.identityKey, identity.masterPublic, bundle.masterKey);
  return { secret: kdf(dhOutputs), ad, header };
}

// Responder: `signedPrekeys` and `oneTimePrekeys` are Maps from key id to private key.
// Nothing is consumed here: the caller deletes the used one-time prekey once the message decrypted.
export function respond(identity, signedPrekeys, oneTimePrekeys, header) {
  const signedPrekey = signedPrekeys.get(header.signedPrekeyId);
  if (signedPrekey === undefined) throw new DecryptionError(`unknown signed prekey id ${header.signedPrekeyId}`);
  const dhOutputs = [
    x25519(signedPrekey, header.identityKey, DecryptionError),
    x25519(identity.dhPrivate, header.ephemeralKey, DecryptionError),
    x25519(signedPrekey, header.ephemeralKey, DecryptionError),
  ];
  if (header.oneTimePrekeyId !== null) {
    const oneTimePrekey = oneTimePrekeys.get(header.oneTimePrekeyId);
    if (oneTimePrekey === undefined) throw new ReplayError(`one-time prekey ${header.oneTimePrekeyId} was already used`);
    dhOutputs.push(x25519(oneTimePrekey, header.ephemeralKey, DecryptionError));
  }
  const ad = concat(header.identityKey, identity.dhPublic, header.masterKey, identity.masterPublic);
  return { secret: kdf(dhOutputs), ad, oneTimePrekeyId: header.oneTimePrekeyId };
}
