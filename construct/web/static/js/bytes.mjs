// Byte helpers shared by the crypto modules. Base64 is standard with padding, and decoding
// refuses anything that does not re-encode to the same text (docs/crypto.md, Conventions).
import sodium from "./sodium.mjs";

const ORIGINAL = sodium.base64_variants.ORIGINAL;
const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });
const lenientDecoder = new TextDecoder("utf-8");

export class CryptoError extends Error {
  get name() { return this.constructor.name; }
}
export class InvalidBundle extends CryptoError {}
export class DecryptionError extends CryptoError {}
export class MessageTooLarge extends CryptoError {}
export class ReplayError extends CryptoError {}
export class TooManySkipped extends CryptoError {}
export class WrongPassphrase extends CryptoError {}

export function b64encode(data) {
  return data.length ? sodium.to_base64(data, ORIGINAL) : "";
}

export function b64decode(text, ErrorType = CryptoError, length = null) {
  if (typeof text !== "string") throw new ErrorType("expected a base64 string");
  let raw;
  try {
    raw = text === "" ? new Uint8Array(0) : sodium.from_base64(text, ORIGINAL);
  } catch {
    throw new ErrorType("invalid base64");
  }
  if (b64encode(raw) !== text) throw new ErrorType("non-canonical base64");
  if (length !== null && raw.length !== length) throw new ErrorType(`expected ${length} bytes, got ${raw.length}`);
  return raw;
}

export function utf8(text) {
  return utf8Encoder.encode(text);
}

export function fromUtf8(data, { lenient = false } = {}) {
  return (lenient ? lenientDecoder : utf8Decoder).decode(data);
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

export function u32(value) {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new RangeError("not a u32");
  return new Uint8Array([value >>> 24, (value >>> 16) & 0xff, (value >>> 8) & 0xff, value & 0xff]);
}

export function readU32(data, offset) {
  return ((data[offset] << 24) >>> 0) + (data[offset + 1] << 16) + (data[offset + 2] << 8) + data[offset + 3];
}

export function equal(a, b) {
  return a.length === b.length && (a.length === 0 || sodium.memcmp(a, b));
}

export function isU32(value) {
  return Number.isInteger(value) && value >= 0 && value <= 0xffffffff;
}
