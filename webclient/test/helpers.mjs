// Shared by the node tests: the vector files, hex, a replay of recorded randomness, and accounts.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

import sodium from "../../construct/web/static/js/sodium.mjs";
import * as account from "../../construct/web/static/js/account.mjs";
import { random, verifyKeyBundle } from "../../construct/web/static/js/crypto.mjs";

const VECTORS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "tests", "vectors");

export function vectors(name) {
  return JSON.parse(readFileSync(join(VECTORS, name), "utf8"));
}

export const hex = (text) => sodium.from_hex(text);
export const toHex = (data) => sodium.to_hex(data);

// Makes `random.bytes` hand out exactly `chunks` (hex), in order, while `fn` runs; asserts all were used.
export function replaying(chunks, fn) {
  const queue = chunks.map(hex);
  const original = random.bytes;
  random.bytes = (size) => {
    const chunk = queue.shift();
    assert.ok(chunk, `drew more random bytes than recorded (${size})`);
    assert.equal(chunk.length, size);
    return chunk;
  };
  try {
    return fn();
  } finally {
    random.bytes = original;
    assert.equal(queue.length, 0, "recorded random bytes left unused");
  }
}

export const T = 1_772_357_400;

// A registered account's state, with its published bundle and three one-time prekeys.
export function person(username, userId) {
  const data = account.newState("ws://127.0.0.1:8080/ws", T);
  account.setAccount(data, { userId, username, sessionToken: "t", expires: T + 1000 });
  const { bundle, keyId } = account.signedPrekeyToPublish(data, T);
  account.signedPrekeyPublished(data, keyId, T);
  const upload = account.newOneTimePrekeys(data, 3);
  return { data, username, userId, bundle, prekeys: upload };
}

// What getPublicKey hands out: the verified bundle and one one-time prekey.
export function fetched(peer, { takePrekey = true } = {}) {
  return { username: peer.username, keys: verifyKeyBundle(peer.bundle, peer.userId), oneTimePrekey: takePrekey ? peer.prekeys.shift() : null };
}
