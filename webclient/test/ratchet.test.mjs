// tests/vectors/ratchet.json, written by the Python client: the JS ratchet must replay it byte for byte.
import { test } from "node:test";
import assert from "node:assert/strict";

import { b64decode, utf8, fromUtf8, DecryptionError, ReplayError } from "../../construct/web/static/js/bytes.mjs";
import {
  IdentityKeys, aeadDecrypt, aeadEncrypt, envelopeContext, hkdfSha256, pad, signedPrekeyId, unpad, verifyKeyBundle, x25519Public,
} from "../../construct/web/static/js/crypto.mjs";
import { MAX_SKIPPED_AGE_SECONDS, Session } from "../../construct/web/static/js/ratchet.mjs";
import { hex, replaying, toHex, vectors } from "./helpers.mjs";

const V = vectors("ratchet.json");

test("ENCRYPT vectors: HKDF key, XChaCha20-Poly1305 of the padded plaintext", () => {
  for (const v of V.encrypt) {
    const key = hkdfSha256(hex(v.messageKey), new Uint8Array(32), utf8("construct/ratchet/message"), 32);
    assert.equal(toHex(key), v.aeadKey);
    const ciphertext = aeadEncrypt(key, hex(v.nonce), pad(hex(v.plaintext)), hex(v.associatedData));
    assert.equal(toHex(ciphertext), v.ciphertext);
    assert.equal(toHex(unpad(aeadDecrypt(key, hex(v.nonce), ciphertext, hex(v.associatedData)))), v.plaintext);
  }
});

function identities() {
  return Object.fromEntries(Object.entries(V.parties).map(([name, p]) => [name, new IdentityKeys(hex(p.masterSeed), hex(p.identityPrivate))]));
}

test("the recorded conversation replays byte for byte, both ways, out of order", () => {
  const ids = identities();
  const sessions = {};
  for (const event of V.timeline) {
    if ("send" in event) {
      const m = V.messages[event.send];
      const [sender, recipient] = [V.parties[m.from], V.parties[m.to]];
      const out = replaying(m.senderRandom, () => {
        if (!sessions[m.from]) {
          const bundle = verifyKeyBundle(recipient.bundle, recipient.userId);
          const { keyId, publicKey } = recipient.oneTimePrekey;
          sessions[m.from] = Session.initiate(ids[m.from], bundle, { keyId, publicKey });
        }
        // Through the stored form, as the client does between messages.
        sessions[m.from] = Session.fromDict(JSON.parse(JSON.stringify(sessions[m.from].toDict())));
        return sessions[m.from].encrypt(utf8(m.plaintext), envelopeContext(sender.userId, recipient.userId, m.id));
      });
      assert.deepEqual([b64decode(m.ephemeralPublicKey), m.messageNumber, m.content], [out.ratchetPublic, out.messageNumber, out.content]);
      // And the session is stored as construct-chat stores it.
      assert.deepEqual(sessions[m.from].toDict(), event.session);
    } else {
      const m = V.messages[event.deliver];
      const [sender, recipient] = [V.parties[m.from], V.parties[m.to]];
      const context = envelopeContext(sender.userId, recipient.userId, m.id);
      const ratchetPublic = b64decode(m.ephemeralPublicKey);
      const plaintext = replaying(m.recipientRandom, () => {
        if (!sessions[m.to]) {
          const spk = hex(recipient.signedPrekeyPrivate);
          const opk = recipient.oneTimePrekey;
          const started = Session.fromInitial(ids[m.to], new Map([[signedPrekeyId(x25519Public(spk)), spk]]),
            new Map([[opk.keyId, hex(opk.privateKey)]]), ratchetPublic, m.messageNumber, m.content, context, event.now);
          assert.equal(started.oneTimePrekeyId, opk.keyId);
          assert.deepEqual(started.session.remoteMasterKey, b64decode(sender.bundle.masterIdentityKey));
          sessions[m.to] = started.session;
          return started.plaintext;
        }
        sessions[m.to] = Session.fromDict(sessions[m.to].toDict());
        return sessions[m.to].decrypt(ratchetPublic, m.messageNumber, m.content, context, event.now);
      });
      assert.equal(fromUtf8(plaintext), m.plaintext);
      assert.deepEqual(sessions[m.to].toDict(), event.session);
      // A second delivery is refused and leaves the session as it was.
      const before = JSON.stringify(sessions[m.to].toDict());
      assert.throws(() => sessions[m.to].decrypt(ratchetPublic, m.messageNumber, m.content, context, event.now), (e) => e instanceof ReplayError || e instanceof DecryptionError);
      assert.equal(JSON.stringify(sessions[m.to].toDict()), before);
    }
  }
  assert.deepEqual(V.messages.map((m) => b64decode(m.content)[0]), [0x20, 0x20, 0x21, 0x21, 0x21, 0x21]);
});

test("a skipped message key expires 30 days after it was skipped; a version 1 session's keys are stamped first", () => {
  const skippedAt = V.timeline.find((e) => e.deliver === 5);
  const m = V.messages[4];
  const context = envelopeContext(V.parties.bob.userId, V.parties.alice.userId, m.id);
  const open = (dict, now) => Session.fromDict(structuredClone(dict)).decrypt(b64decode(m.ephemeralPublicKey), m.messageNumber, m.content, context, now);
  assert.equal(skippedAt.session.skipped[0][3], skippedAt.now);
  assert.equal(fromUtf8(open(skippedAt.session, skippedAt.now + MAX_SKIPPED_AGE_SECONDS)), m.plaintext);
  // Gone: on the current chain, like a message number used before.
  assert.throws(() => open(skippedAt.session, skippedAt.now + MAX_SKIPPED_AGE_SECONDS + 1), ReplayError);
  const version1 = { ...skippedAt.session, version: 1, skipped: skippedAt.session.skipped.map((item) => item.slice(0, 3)) };
  assert.equal(fromUtf8(open(version1, skippedAt.now + 10 * MAX_SKIPPED_AGE_SECONDS)), m.plaintext);
});

test("a tampered message is refused and changes nothing", () => {
  const ids = identities();
  const m = V.messages[0];
  const bob = V.parties.bob;
  const spk = hex(bob.signedPrekeyPrivate);
  const raw = b64decode(m.content);
  const spks = new Map([[signedPrekeyId(x25519Public(spk)), spk]]);
  const opks = new Map([[1, hex(bob.oneTimePrekey.privateKey)]]);
  for (const index of [0, 5, 120, raw.length - 1]) {
    const tampered = raw.slice();
    tampered[index] ^= 1;
    const content = Buffer.from(tampered).toString("base64");
    assert.throws(() => Session.fromInitial(ids.bob, spks, opks, b64decode(m.ephemeralPublicKey), m.messageNumber, content,
      envelopeContext(V.parties.alice.userId, bob.userId, m.id), 0), /./);
  }
  // Another envelope (message id) fails authentication.
  assert.throws(() => Session.fromInitial(ids.bob, spks, opks, b64decode(m.ephemeralPublicKey), m.messageNumber, m.content,
    envelopeContext(V.parties.alice.userId, bob.userId, "another id"), 0), DecryptionError);
});
