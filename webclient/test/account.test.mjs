// The account logic (account.mjs) between in-memory accounts, as the messenger drives it; the
// same cases as tests/test_client_account.py, so the two clients agree.
import { test } from "node:test";
import assert from "node:assert/strict";

import * as account from "../../construct/web/static/js/account.mjs";
import { verifyKeyBundle } from "../../construct/web/static/js/crypto.mjs";
import { T, fetched, person } from "./helpers.mjs";

// What the messenger does for a message: queue it, look the name up (the server's answer:
// `to.userId`), encrypt (with `to`'s bundle when there is no session), and the server's ack.
function send(from, to, text, { bundle = null } = {}) {
  const entry = account.queueOutgoing(from.data, to.username, text, T);
  account.resolveOutgoing(from.data, entry.id, to.userId);
  const message = account.encryptOutgoing(from.data, entry.id, null, T) ?? account.encryptOutgoing(from.data, entry.id, bundle ?? fetched(to), T);
  account.outgoingSettled(from.data, entry.id, "sent");
  return account.wireMessage(message);
}

function deliver(message, to, from, now = T) {
  const copy = structuredClone(to.data);
  let outcome = account.acceptIncoming(copy, message, null, now);
  if (outcome.status === "need-bundle") outcome = account.acceptIncoming(copy, message, fetched(from, { takePrekey: false }), now);
  to.data = copy;
  return outcome;
}

const texts = (person, userId) => account.conversation(person.data, userId).map((e) => [e.direction, e.text, e.status]);

const alice = () => person("alice", "3f2b8c1e-7a4d-4e2b-9c61-0d5e8f7a1b2c");
const bob = () => person("bob", "9a7c4e12-5b3f-4d8e-a1c6-2f0b9d8e7c65");

test("a conversation both ways: queued before anything else, pinned on first contact, one-time prekey used once", () => {
  const [a, b] = [alice(), bob()];
  const entry = account.queueOutgoing(a.data, "bob", "Hi Bob", T);
  assert.deepEqual(a.data.outbox, [{ id: entry.id, peerName: "bob", peer: null, text: "Hi Bob", createdAt: T, message: null }]);
  assert.match(entry.id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  account.resolveOutgoing(a.data, entry.id, b.userId);
  assert.equal(account.encryptOutgoing(a.data, entry.id, null, T), null);
  const first = account.wireMessage(account.encryptOutgoing(a.data, entry.id, fetched(b), T));
  assert.deepEqual(texts(a, b.userId), [["out", "Hi Bob", "pending"]]);
  account.outgoingSettled(a.data, entry.id, "delivered");
  assert.deepEqual(texts(a, b.userId), [["out", "Hi Bob", "delivered"]]);
  const second = send(a, b, "still there?");

  const opksBefore = b.data.oneTimePrekeys.length;
  const got = deliver(first, b, a);
  assert.equal(got.status, "received");
  assert.equal(got.entry.text, "Hi Bob");
  assert.equal(got.usedOneTimePrekey, true);
  assert.equal(b.data.oneTimePrekeys.length, opksBefore - 1);
  assert.equal(b.data.contacts[a.userId].username, "alice");
  assert.equal(deliver(first, b, a).status, "duplicate");
  assert.equal(deliver(second, b, a).entry.text, "still there?");

  assert.equal(deliver(send(b, a, "Hello Alice ✓"), a, b).entry.text, "Hello Alice ✓");
  const after = send(a, b, "no header now");
  assert.equal(Buffer.from(after.content, "base64")[0], 0x21);
  assert.equal(deliver(after, b, a).entry.text, "no header now");
  assert.equal(b.data.sessions[a.userId][0].version, 2);
});

test("a changed master key is refused and warned about until the user trusts it", () => {
  const [a, b] = [alice(), bob()];
  account.pinContact(a.data, b.userId, fetched(b), T);
  const impostor = person("bob", b.userId);
  assert.throws(() => account.pinContact(a.data, b.userId, fetched(impostor), T), account.IdentityChanged);
  // A message from the impostor's keys is rejected, and the contact carries the warning.
  const outcome = deliver(send(impostor, a, "it's me", { bundle: fetched(a) }), a, impostor);
  assert.equal(outcome.status, "rejected");
  assert.match(a.data.contacts[b.userId].identityWarning, /not the one you first saw/);
  assert.equal(a.data.contacts[b.userId].offeredMasterKey, impostor.bundle.masterIdentityKey);
  assert.equal(account.conversation(a.data, b.userId).length, 0, "a refused message is not kept");
  assert.throws(() => account.queueOutgoing(a.data, "bob", "x", T), account.IdentityChanged);
  assert.deepEqual(a.data.outbox, []);
  account.trustContact(a.data, "bob", b.userId, fetched(impostor, { takePrekey: false }), T);
  assert.equal(a.data.contacts[b.userId].identityWarning, undefined);
  assert.equal(a.data.contacts[b.userId].masterKey, impostor.bundle.masterIdentityKey);
  assert.equal(a.data.sessions[b.userId], undefined);
});

test("a reused name is an identity change until trusted, as in construct-chat", () => {
  // Bob deletes his account and someone registers `bob` again: sending to the name and the
  // newcomer's messages are refused; trust replaces the contact, keeping the former one's history.
  const [a, b] = [alice(), bob()];
  assert.equal(deliver(send(a, b, "hello bob"), b, a).status, "received");
  assert.equal(deliver(send(b, a, "hi"), a, b).status, "received");
  const newcomer = person("bob", "11111111-2222-4333-8444-555555555555");

  const queued = account.queueOutgoing(a.data, "bob", "for bob", T);
  assert.throws(() => account.resolveOutgoing(a.data, queued.id, newcomer.userId), (error) => {
    assert.ok(error instanceof account.IdentityChanged);
    assert.deepEqual([error.pinnedId, error.offeredUserId], [b.userId, newcomer.userId]);
    return true;
  });
  const outcome = deliver(send(newcomer, a, "it's me, bob", { bundle: fetched(a) }), a, newcomer);
  assert.equal(outcome.status, "rejected");
  assert.deepEqual(Object.keys(a.data.contacts), [b.userId], "the newcomer is not pinned");
  const warned = a.data.contacts[b.userId];
  assert.match(warned.identityWarning, /different account/);
  assert.deepEqual([warned.offeredUserId, warned.offeredMasterKey], [newcomer.userId, newcomer.bundle.masterIdentityKey]);
  assert.deepEqual(account.offered(a.data, b.userId), { userId: newcomer.userId, masterKey: newcomer.bundle.masterIdentityKey });
  assert.ok(!texts(a, b.userId).some(([, text]) => text === "it's me, bob"));
  assert.throws(() => account.queueOutgoing(a.data, "bob", "x", T), account.IdentityChanged);

  account.trustContact(a.data, "bob", newcomer.userId, fetched(newcomer, { takePrekey: false }), T);
  assert.deepEqual(Object.keys(a.data.contacts), [newcomer.userId]);
  assert.deepEqual(a.data.contacts[newcomer.userId].formerIds, [b.userId]);
  assert.equal(a.data.contacts[newcomer.userId].identityWarning, undefined);
  assert.equal(a.data.sessions[b.userId], undefined);
  account.resolveOutgoing(a.data, queued.id, newcomer.userId);
  assert.deepEqual(texts(a, newcomer.userId), [["out", "hello bob", "sent"], ["in", "hi", "received"], ["out", "for bob", "pending"]]);
  assert.equal(deliver(send(newcomer, a, "again, trusted now"), a, newcomer).status, "received");
});

test("an account pinned under another name is refused", () => {
  const [a, b] = [alice(), bob()];
  send(a, b, "hi");
  const entry = account.queueOutgoing(a.data, "robert", "hi", T);
  assert.throws(() => account.resolveOutgoing(a.data, entry.id, b.userId), /you pinned as bob/);
});

test("sessions start only on a bundle no older than one seen", () => {
  const [a, b] = [alice(), bob()];
  const old = fetched(b);
  const later = T + account.SIGNED_PREKEY_ROTATION_SECONDS;
  const { bundle, keyId } = account.signedPrekeyToPublish(b.data, later);
  account.signedPrekeyPublished(b.data, keyId, later);
  b.bundle = bundle;
  account.pinContact(a.data, b.userId, fetched(b, { takePrekey: false }), T);
  const entry = account.queueOutgoing(a.data, "bob", "x", T);
  account.resolveOutgoing(a.data, entry.id, b.userId);
  assert.throws(() => account.encryptOutgoing(a.data, entry.id, old, T), account.StaleBundle);
});

test("sending to yourself and too long messages are refused before anything is queued", () => {
  const a = alice();
  assert.throws(() => account.queueOutgoing(a.data, "alice", "note", T), account.SelfMessage);
  assert.throws(() => account.queueOutgoing(a.data, "bob", "x".repeat(32768), T), /at most 32767/);
  assert.deepEqual(a.data.outbox, []);
});

test("what is not a ratchet message, or reuses a message number, is refused and not kept", () => {
  const [a, b] = [alice(), bob()];
  const message = send(a, b, "x");
  const v1 = { ...message, id: "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", content: Buffer.alloc(300, 7).toString("base64") };
  const outcome = deliver(v1, b, a);
  assert.equal(outcome.status, "undecryptable");
  assert.deepEqual(b.data.history, []);
  assert.equal(deliver(message, b, a).status, "received");
  const replayed = deliver({ ...message, id: "7f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f" }, b, a);
  assert.equal(replayed.status, "undecryptable");
  assert.match(replayed.reason, /was used already/);
});

test("the history keeps the newest keepMessages messages", () => {
  const [a, b] = [alice(), bob()];
  a.data.keepMessages = 3;
  for (const text of ["1", "2", "3", "4", "5"]) send(a, b, text);
  assert.deepEqual(a.data.history.map((e) => e.text), ["3", "4", "5"]);
});

test("version 1 records: a newcomer pinned under a reused name becomes an offer, a trusted one takes the name", () => {
  const [a, b] = [alice(), bob()];
  send(a, b, "hi");
  const newcomer = person("bob", "11111111-2222-4333-8444-555555555555");
  const v1 = (trusted) => {
    const data = structuredClone(a.data);
    delete data.historyKey;
    delete data.keepMessages;
    data.version = 1;
    data.outbox = [];
    data.contacts[b.userId].replacedBy = newcomer.userId;
    data.contacts[newcomer.userId] = { username: "bob", masterKey: newcomer.bundle.masterIdentityKey, pinnedAt: T,
      ...(trusted ? {} : { identityWarning: "The name bob now belongs to a different account" }) };
    return data;
  };
  const untrusted = v1(false);
  account.upgrade(untrusted);
  assert.deepEqual(Object.keys(untrusted.contacts), [b.userId]);
  assert.equal(untrusted.contacts[b.userId].offeredUserId, newcomer.userId);
  assert.equal(untrusted.contacts[b.userId].replacedBy, undefined);
  const trusted = v1(true);
  account.upgrade(trusted);
  assert.deepEqual(Object.keys(trusted.contacts), [newcomer.userId]);
  assert.deepEqual(trusted.contacts[newcomer.userId].formerIds, [b.userId]);
  assert.deepEqual(account.conversation(trusted, newcomer.userId).map((e) => e.text), ["hi"]);
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
