// Shared by the node tests: the vector files, hex, and a replay of recorded randomness.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

import sodium from "../../construct/web/static/js/sodium.mjs";
import { random } from "../../construct/web/static/js/crypto.mjs";

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
