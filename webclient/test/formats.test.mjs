// tests/vectors/formats.json, written by the Python client: padding, envelope binding, safety
// numbers, key bundles, the state file and MessagePack frames must be the same bytes in JS.
import { test } from "node:test";
import assert from "node:assert/strict";

import { InvalidBundle, MessageTooLarge, WrongPassphrase, b64decode } from "../../construct/web/static/js/bytes.mjs";
import {
  IdentityKeys, MAX_PLAINTEXT, envelopeContext, makeKeyBundle, pad, safetyNumber, unpad, verifyKeyBundle, x25519Public,
} from "../../construct/web/static/js/crypto.mjs";
import * as account from "../../construct/web/static/js/account.mjs";
import * as msgpack from "../../construct/web/static/js/msgpack.mjs";
import { Session } from "../../construct/web/static/js/ratchet.mjs";
import * as statefile from "../../construct/web/static/js/statefile.mjs";
import { hex, replaying, toHex, vectors } from "./helpers.mjs";

const V = vectors("formats.json");
const R = vectors("ratchet.json");

test("padding buckets", () => {
  for (const { length, bucket } of V.padding) {
    const data = new Uint8Array(length).fill(0x80);
    const padded = pad(data);
    assert.equal(padded.length, bucket);
    assert.deepEqual(unpad(padded), data);
  }
  assert.throws(() => pad(new Uint8Array(MAX_PLAINTEXT + 1)), MessageTooLarge);
  for (const bad of [new Uint8Array(256), new Uint8Array(255).fill(1), pad(new Uint8Array([1])).slice(0, 255)]) {
    assert.throws(() => unpad(bad), /padding|bucket/);
  }
});

test("envelope context", () => {
  for (const v of V.envelopeContext) assert.equal(toHex(envelopeContext(v.from, v.to, v.id)), v.context);
});

test("safety numbers, including libsignal's vector", () => {
  for (const v of V.safetyNumbers) {
    assert.equal(safetyNumber(v.localUserId, hex(v.localKey), v.remoteUserId, hex(v.remoteKey)), v.safetyNumber);
    assert.equal(safetyNumber(v.remoteUserId, hex(v.remoteKey), v.localUserId, hex(v.localKey)), v.safetyNumber);
  }
});

test("key bundles: the same bytes and signature, the same rejections", () => {
  const b = V.bundles;
  const identity = new IdentityKeys(hex(b.masterSeed), hex(b.identityPrivate));
  const spkPublic = x25519Public(hex(b.signedPrekeyPrivate));
  assert.deepEqual(makeKeyBundle(identity, spkPublic, b.userId, new Date(b.timestamp)), b.good);
  const verified = verifyKeyBundle(b.good, b.userId);
  assert.deepEqual([verified.masterKey, verified.identityKey, verified.signedPrekey, verified.signedPrekeyId],
    [identity.masterPublic, identity.dhPublic, spkPublic, b.signedPrekeyId]);
  for (const { name, bundle } of b.rejected) {
    assert.throws(() => verifyKeyBundle(bundle, b.userId), InvalidBundle, name);
  }
  assert.equal(verifyKeyBundle(b.rejected.at(-1).bundle).userId, "");
});

test("the state file opens, and seals to the same bytes with the same nonce", () => {
  const s = V.stateFile;
  const text = JSON.stringify(s.document);
  const { data, stateKey } = statefile.open(text, s.passphrase);
  assert.deepEqual(data, s.data);
  assert.equal(toHex(stateKey.key), s.key);
  const resealed = replaying([s.nonce], () => statefile.seal(stateKey, data));
  assert.deepEqual(JSON.parse(resealed), s.document);
  assert.deepEqual(statefile.open(resealed, "ignored: the key is known", stateKey).data, s.data);
  assert.throws(() => statefile.open(text, "not the passphrase"), WrongPassphrase);
  const tampered = { ...s.document, box: s.document.box.replace(/^./, (c) => (c === "A" ? "B" : "A")) };
  assert.throws(() => statefile.open(JSON.stringify(tampered), s.passphrase), WrongPassphrase);
  for (const bad of ["not json", "[]", JSON.stringify({ ...s.document, memlimit: 2 ** 40 }), JSON.stringify({ ...s.document, version: 2 })]) {
    assert.throws(() => statefile.open(bad, s.passphrase), WrongPassphrase);
  }
});

test("a key file as construct-chat exports it opens here as it is, and the account reads on", () => {
  const k = V.keyFile;
  const { data } = statefile.open(JSON.stringify(k.document), k.passphrase);
  assert.deepEqual(data, k.data);
  account.upgrade(data);
  assert.deepEqual(data, k.data, "a current key file needs no upgrade");
  for (const stored of Object.values(data.sessions).flat()) assert.deepEqual(Session.fromDict(stored).toDict(), stored);
  // Message 4 of ratchet.json's conversation arrives after 5: from the key skipped then.
  const [alice, bob] = [R.parties.alice, R.parties.bob];
  const wire = (m) => ({ id: m.id, from: bob.userId, to: alice.userId, ephemeralPublicKey: b64decode(m.ephemeralPublicKey),
    messageNumber: m.messageNumber, content: m.content, timestamp: m.timestamp });
  const now = R.timeline.at(-1).now;
  assert.equal(account.acceptIncoming(data, wire(R.messages[5]), null, now).status, "duplicate");
  const outcome = account.acceptIncoming(data, wire(R.messages[4]), null, now);
  assert.deepEqual([outcome.status, outcome.entry.text], ["received", "Two messages,"]);
  assert.deepEqual(data.sessions[bob.userId][0].skipped, []);
  // The message construct-chat left in the outbox goes out on the session it holds.
  const [queued] = data.outbox;
  account.resolveOutgoing(data, queued.id, bob.userId);
  const message = account.encryptOutgoing(data, queued.id, null, now);
  assert.deepEqual([message.from, message.to, message.id], [alice.userId, bob.userId, queued.id]);
  assert.deepEqual(account.conversation(data, bob.userId).map((e) => [e.direction, e.status]), [
    ["out", "sent"], ["out", "sent"], ["in", "received"], ["out", "sent"], ["in", "received"], ["in", "received"], ["out", "pending"]]);
});

test("a version 1 state upgrades to what construct-chat makes of it, its messages kept inline", () => {
  const k = V.keyFile;
  const data = structuredClone(k.version1);
  account.upgrade(data);
  assert.equal(b64decode(data.historyKey).length, 32);
  delete data.historyKey;
  assert.deepEqual(data, k.upgraded);
});

function native(value) {
  if (Array.isArray(value)) return value.map(native);
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === "$bin") return hex(value.$bin);
    return Object.fromEntries(keys.map((key) => [key, native(value[key])]));
  }
  return value;
}

test("MessagePack frames are the bytes msgpack-python writes", () => {
  for (const v of V.msgpack) {
    const frame = native(v.frame);
    assert.equal(toHex(msgpack.encode(frame)), v.msgpack);
    assert.deepEqual(msgpack.decode(hex(v.msgpack)), frame);
  }
  assert.throws(() => msgpack.decode(hex("81a1")), msgpack.MsgpackError);
  assert.throws(() => msgpack.decode(hex("8101c0")), msgpack.MsgpackError);
  assert.throws(() => msgpack.decode(hex("c0c0")), msgpack.MsgpackError);
});
