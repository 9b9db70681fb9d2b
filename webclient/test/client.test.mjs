// The messenger: where the page connects (the WebSocket beside it, at / and under a camouflaged
// server's secret path), and what it does with the server's answers.
import { test } from "node:test";
import assert from "node:assert/strict";

import * as account from "../../construct/web/static/js/account.mjs";
import { Messenger, serverUrl } from "../../construct/web/static/js/client.mjs";
import { ServerError } from "../../construct/web/static/js/connection.mjs";
import { T, fetched, person } from "./helpers.mjs";

test("the page's WebSocket is beside the page", () => {
  assert.equal(serverUrl(new URL("http://127.0.0.1:8080/")), "ws://127.0.0.1:8080/ws");
  assert.equal(serverUrl(new URL("https://chat.example.org/")), "wss://chat.example.org/ws");
  assert.equal(serverUrl(new URL("https://chat.example.org/Hk3v9QeLrT2pWz8xYb1mNa/")),
    "wss://chat.example.org/Hk3v9QeLrT2pWz8xYb1mNa/ws");
});

// The messenger with its state in memory and a scripted server: what it sends, and what it does
// with the answers.

function messenger(me, answer) {
  const store = {
    username: me.username, data: me.data,
    async update(fn) {
      const copy = structuredClone(this.data);
      const result = fn(copy);
      this.data = copy;
      return result;
    },
  };
  const m = new Messenger(store, "ws://127.0.0.1:1/ws");
  m.requests = [];
  m.warnings = [];
  m.addEventListener("warning", ({ detail }) => m.warnings.push(detail.text));
  m.connection = {
    async call(type, payload) {
      m.requests.push([type, structuredClone(payload)]);
      return answer(type, payload);
    },
    whenOnline: async () => {},
    send: (type, payload) => m.requests.push([type, payload]),
    stop: () => {},
  };
  return m;
}

function bundleOf(peer, takePrekey) {
  return { payload: { ...peer.bundle, username: peer.username, oneTimePrekey: takePrekey ? peer.prekeys.shift() : null } };
}

test("SERVER_BUSY and RATE_LIMITED mean not now: the message stays in the outbox and the same one goes again", async () => {
  for (const code of ["SERVER_BUSY", "RATE_LIMITED"]) {
    const [a, b] = [person("alice", "3f2b8c1e-7a4d-4e2b-9c61-0d5e8f7a1b2c"), person("bob", "9a7c4e12-5b3f-4d8e-a1c6-2f0b9d8e7c65")];
    account.pinContact(a.data, b.userId, fetched(b, { takePrekey: false }), T);
    let refusals = 1;
    const m = messenger(a, (type, payload) => {
      if (type === "lookupUser") return { payload: { userId: b.userId, username: "bob" } };
      if (type === "getPublicKey") return bundleOf(b, payload.oneTimePrekey);
      assert.equal(type, "sendMessage");
      assert.equal(m.store.data.outbox.length, 1, "still in the outbox while the server refuses it");
      if (refusals-- > 0) throw new ServerError({ code, message: "not now", retryAfter: 0.01 });
      return { payload: { status: "queued" } };
    });
    await m.store.update((data) => account.queueOutgoing(data, "bob", "held back", T));
    await m.flushOutbox();
    const sends = m.requests.filter(([type]) => type === "sendMessage").map(([, message]) => message);
    assert.equal(sends.length, 2);
    assert.deepEqual(sends[0], sends[1], "the very same ChatMessage again");
    assert.deepEqual(m.store.data.outbox, []);
    assert.deepEqual(account.conversation(m.store.data, b.userId).map((e) => [e.text, e.status]), [["held back", "sent"]]);
    assert.match(m.warnings.join(), new RegExp(`not now \\(${code}\\)`));
  }
});

test("a name that now means another account: the message fails, the contact shows the offer to compare", async () => {
  const [a, b] = [person("alice", "3f2b8c1e-7a4d-4e2b-9c61-0d5e8f7a1b2c"), person("bob", "9a7c4e12-5b3f-4d8e-a1c6-2f0b9d8e7c65")];
  const newcomer = person("bob", "11111111-2222-4333-8444-555555555555");
  account.pinContact(a.data, b.userId, fetched(b, { takePrekey: false }), T);
  const m = messenger(a, (type, payload) => {
    if (type === "lookupUser") return { payload: { userId: newcomer.userId, username: "bob" } };
    if (type === "getPublicKey") return bundleOf(payload.userId === newcomer.userId ? newcomer : b, payload.oneTimePrekey);
    throw new Error(`nothing may be sent (${type})`);
  });
  await m.send(b.userId, "meant for the real bob");
  await m.flushOutbox();
  await new Promise((resolve) => setTimeout(resolve, 20));
  const [entry] = account.conversation(m.store.data, b.userId);
  assert.deepEqual([entry.text, entry.status], ["meant for the real bob", "failed"]);
  assert.match(entry.reason, /another account for bob/);
  const contact = m.store.data.contacts[b.userId];
  assert.deepEqual([contact.offeredUserId, contact.offeredMasterKey], [newcomer.userId, newcomer.bundle.masterIdentityKey]);
  assert.equal(m.safetyNumbers(b.userId).pinned.length, 71);
  await assert.rejects(m.send(b.userId, "again"), account.IdentityChanged);
  assert.ok(!m.requests.some(([type]) => type === "sendMessage"));

  const trusted = await m.trust(b.userId);
  assert.equal(trusted, newcomer.userId);
  assert.deepEqual(m.store.data.contacts[newcomer.userId].formerIds, [b.userId]);
});

test("sessionExpired says the account is gone when its reason is accountDeleted, else log in again", () => {
  const m = messenger(person("alice", "3f2b8c1e-7a4d-4e2b-9c61-0d5e8f7a1b2c"), () => ({}));
  const events = [];
  for (const type of ["account-deleted", "session-expired"]) m.addEventListener(type, () => events.push(type));
  m.pushed({ type: "sessionExpired", payload: { reason: "accountDeleted" } });
  m.pushed({ type: "sessionExpired" });
  m.pushed({ type: "sessionExpired", payload: { reason: "somethingNew" } });
  assert.deepEqual(events, ["account-deleted", "session-expired", "session-expired"]);
});
