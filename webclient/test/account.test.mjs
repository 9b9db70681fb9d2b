// The account logic (account.mjs) between two in-memory accounts, as the messenger drives it.
import { test } from "node:test";
import assert from "node:assert/strict";

import * as account from "../../construct/web/static/js/account.mjs";
import { verifyKeyBundle } from "../../construct/web/static/js/crypto.mjs";

const T = 1_772_357_400;

function person(username, userId) {
  const data = account.newState("ws://127.0.0.1:8080/ws", T);
  account.setAccount(data, { userId, username, sessionToken: "t", expires: T + 1000 });
  const { bundle, keyId } = account.signedPrekeyToPublish(data, T);
  account.signedPrekeyPublished(data, keyId, T);
  const upload = account.newOneTimePrekeys(data, 3);
  return { data, username, userId, bundle, prekeys: upload };
}

// What getPublicKey hands out: the verified bundle and one one-time prekey.
function fetched(peer, { takePrekey = true } = {}) {
  return { username: peer.username, keys: verifyKeyBundle(peer.bundle, peer.userId), oneTimePrekey: takePrekey ? peer.prekeys.shift() : null };
}

function deliver(message, to, from) {
  const copy = structuredClone(to.data);
  let outcome = account.acceptIncoming(copy, account.wireMessage(message), null, T);
  if (outcome.status === "need-bundle") outcome = account.acceptIncoming(copy, account.wireMessage(message), fetched(from, { takePrekey: false }), T);
  to.data = copy;
  return outcome;
}

const alice = () => person("alice", "3f2b8c1e-7a4d-4e2b-9c61-0d5e8f7a1b2c");
const bob = () => person("bob", "9a7c4e12-5b3f-4d8e-a1c6-2f0b9d8e7c65");

test("a conversation both ways: pinned on first contact, one-time prekey used once, duplicates dropped", () => {
  const [a, b] = [alice(), bob()];
  assert.equal(account.prepareOutgoing(a.data, b.userId, "hi", null, T), null);
  const first = account.prepareOutgoing(a.data, b.userId, "Hi Bob", fetched(b), T);
  const second = account.prepareOutgoing(a.data, b.userId, "still there?", null, T);
  assert.deepEqual(a.data.outbox.map((m) => m.id), [first.id, second.id]);
  assert.match(first.id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  account.outgoingSettled(a.data, first.id, "delivered");
  assert.equal(a.data.history[0].status, "delivered");

  const opksBefore = b.data.oneTimePrekeys.length;
  const got = deliver(first, b, a);
  assert.equal(got.status, "received");
  assert.equal(got.entry.text, "Hi Bob");
  assert.equal(got.usedOneTimePrekey, true);
  assert.equal(b.data.oneTimePrekeys.length, opksBefore - 1);
  assert.equal(b.data.contacts[a.userId].username, "alice");
  assert.equal(deliver(first, b, a).status, "duplicate");
  assert.equal(deliver(second, b, a).entry.text, "still there?");

  const reply = account.prepareOutgoing(b.data, a.userId, "Hello Alice ✓", null, T);
  assert.equal(deliver(reply, a, b).entry.text, "Hello Alice ✓");
  const after = account.prepareOutgoing(a.data, b.userId, "no header now", null, T);
  assert.equal(Buffer.from(after.content, "base64")[0], 0x21);
  assert.equal(deliver(after, b, a).entry.text, "no header now");
});

test("a changed master key is refused and warned about until the user trusts it", () => {
  const [a, b] = [alice(), bob()];
  account.pinContact(a.data, b.userId, fetched(b), T);
  const impostor = person("bob", b.userId);
  assert.throws(() => account.pinContact(a.data, b.userId, fetched(impostor), T), account.IdentityChanged);
  // A message from the impostor's keys is rejected, and the contact carries the warning.
  const forged = account.prepareOutgoing(impostor.data, a.userId, "it's me", fetched(a), T);
  const outcome = deliver(forged, a, impostor);
  assert.equal(outcome.status, "rejected");
  assert.match(a.data.contacts[b.userId].identityWarning, /not the one you first saw/);
  assert.throws(() => account.prepareOutgoing(a.data, b.userId, "x", null, T), account.IdentityChanged);
  account.trustIdentity(a.data, b.userId);
  assert.equal(a.data.contacts[b.userId].identityWarning, undefined);
  assert.equal(a.data.contacts[b.userId].masterKey, impostor.bundle.masterIdentityKey);
});

test("a name that now belongs to another account is pinned with a warning, the old contact marked replaced", () => {
  const [a, b] = [alice(), bob()];
  account.pinContact(a.data, b.userId, fetched(b), T);
  const newBob = person("bob", "11111111-2222-4333-8444-555555555555");
  const message = account.prepareOutgoing(newBob.data, a.userId, "new phone, new account", fetched(a), T);
  const outcome = deliver(message, a, newBob);
  assert.equal(outcome.status, "received");
  assert.match(a.data.contacts[newBob.userId].identityWarning, /different account/);
  assert.equal(a.data.contacts[b.userId].replacedBy, newBob.userId);
  assert.throws(() => account.prepareOutgoing(a.data, newBob.userId, "x", null, T), account.IdentityChanged);
});

test("what is not a ratchet message is refused and recorded, not shown", () => {
  const [a, b] = [alice(), bob()];
  const message = account.prepareOutgoing(a.data, b.userId, "x", fetched(b), T);
  const v1 = { ...message, id: "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", content: Buffer.alloc(300, 7).toString("base64") };
  const outcome = deliver(v1, b, a);
  assert.equal(outcome.status, "undecryptable");
  assert.equal(b.data.history.at(-1).text, undefined);
  assert.equal(deliver(v1, b, a).status, "duplicate");
});

test("a construct-chat state's access key is withdrawn with the next bundle, at once", () => {
  const a = alice();
  assert.equal(account.signedPrekeyToPublish(a.data, T + 60), null);
  a.data.accessKey = "q3m1y0C8bA2Xv9v0p3lW0Q==";
  a.data.accessKeyPublished = true;
  const publish = account.signedPrekeyToPublish(a.data, T + 60);
  assert.equal(publish.withdrawAccess, true);
  assert.equal(verifyKeyBundle(publish.bundle, a.userId).userId, a.userId);
  account.signedPrekeyPublished(a.data, publish.keyId, T + 60);
  assert.equal("accessKey" in a.data, false);
  assert.equal(account.signedPrekeyToPublish(a.data, T + 120), null);
});
