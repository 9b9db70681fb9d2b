// The MessagePack subset the protocol uses (docs/protocol.md §3): maps with string keys, strings,
// integers, booleans, nil, arrays, bin (Uint8Array) and floats. Encodes as msgpack-python does
// (smallest form for each value), so frames are the same bytes the reference client sends.
import { fromUtf8, utf8 } from "./bytes.mjs";

class Writer {
  constructor() {
    this.buffer = new Uint8Array(256);
    this.view = new DataView(this.buffer.buffer);
    this.length = 0;
  }

  reserve(size) {
    if (this.length + size <= this.buffer.length) return;
    const grown = new Uint8Array(Math.max(this.buffer.length * 2, this.length + size));
    grown.set(this.buffer.subarray(0, this.length));
    this.buffer = grown;
    this.view = new DataView(grown.buffer);
  }

  byte(value) { this.reserve(1); this.buffer[this.length++] = value; }
  u16(value) { this.reserve(2); this.view.setUint16(this.length, value); this.length += 2; }
  u32(value) { this.reserve(4); this.view.setUint32(this.length, value); this.length += 4; }
  bytes(data) { this.reserve(data.length); this.buffer.set(data, this.length); this.length += data.length; }

  sized(size, small, codes) {
    if (small !== null && size < small[1]) this.byte(small[0] | size);
    else if (codes[0] !== null && size < 0x100) { this.byte(codes[0]); this.byte(size); }
    else if (size < 0x10000) { this.byte(codes[1]); this.u16(size); }
    else { this.byte(codes[2]); this.u32(size); }
  }

  integer(value) {
    if (value >= 0) {
      if (value < 0x80) this.byte(value);
      else if (value < 0x100) { this.byte(0xcc); this.byte(value); }
      else if (value < 0x10000) { this.byte(0xcd); this.u16(value); }
      else if (value < 0x100000000) { this.byte(0xce); this.u32(value); }
      else { this.byte(0xcf); this.u32(Math.floor(value / 0x100000000)); this.u32(value >>> 0); }
    } else if (value >= -32) this.byte(value & 0xff);
    else if (value >= -0x80) { this.byte(0xd0); this.byte(value & 0xff); }
    else if (value >= -0x8000) { this.byte(0xd1); this.u16(value & 0xffff); }
    else if (value >= -0x80000000) { this.byte(0xd2); this.u32(value >>> 0); }
    else { this.byte(0xd3); this.u32(Math.floor(value / 0x100000000) >>> 0); this.u32(value >>> 0); }
  }

  value(value) {
    if (value === null || value === undefined) this.byte(0xc0);
    else if (value === false) this.byte(0xc2);
    else if (value === true) this.byte(0xc3);
    else if (typeof value === "number") {
      if (Number.isSafeInteger(value)) this.integer(value);
      else { this.byte(0xcb); this.reserve(8); this.view.setFloat64(this.length, value); this.length += 8; }
    } else if (typeof value === "string") {
      const raw = utf8(value);
      this.sized(raw.length, [0xa0, 32], [0xd9, 0xda, 0xdb]);
      this.bytes(raw);
    } else if (value instanceof Uint8Array) {
      this.sized(value.length, null, [0xc4, 0xc5, 0xc6]);
      this.bytes(value);
    } else if (Array.isArray(value)) {
      this.sized(value.length, [0x90, 16], [null, 0xdc, 0xdd]);
      for (const item of value) this.value(item);
    } else if (typeof value === "object") {
      const entries = Object.entries(value).filter(([, item]) => item !== undefined);
      this.sized(entries.length, [0x80, 16], [null, 0xde, 0xdf]);
      for (const [key, item] of entries) {
        this.value(key);
        this.value(item);
      }
    } else {
      throw new TypeError(`cannot encode ${typeof value} as MessagePack`);
    }
  }
}

export function encode(value) {
  const writer = new Writer();
  writer.value(value);
  return writer.buffer.slice(0, writer.length);
}

export class MsgpackError extends Error {}

class Reader {
  constructor(data) {
    this.data = data;
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    this.offset = 0;
  }

  take(size) {
    if (this.offset + size > this.data.length) throw new MsgpackError("truncated MessagePack");
    const start = this.offset;
    this.offset += size;
    return start;
  }

  u8() { return this.data[this.take(1)]; }
  u16() { return this.view.getUint16(this.take(2)); }
  u32() { return this.view.getUint32(this.take(4)); }
  bytes(size) { const start = this.take(size); return this.data.slice(start, start + size); }
  string(size) { return fromUtf8(this.bytes(size)); }

  array(size) {
    const out = [];
    for (let i = 0; i < size; i++) out.push(this.value());
    return out;
  }

  map(size) {
    const out = {};
    for (let i = 0; i < size; i++) {
      const key = this.value();
      if (typeof key !== "string") throw new MsgpackError("map keys must be strings");
      out[key] = this.value();
    }
    return out;
  }

  value() {
    const code = this.u8();
    if (code < 0x80) return code;
    if (code >= 0xe0) return code - 0x100;
    if ((code & 0xf0) === 0x80) return this.map(code & 0x0f);
    if ((code & 0xf0) === 0x90) return this.array(code & 0x0f);
    if ((code & 0xe0) === 0xa0) return this.string(code & 0x1f);
    switch (code) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.bytes(this.u8());
      case 0xc5: return this.bytes(this.u16());
      case 0xc6: return this.bytes(this.u32());
      case 0xca: return this.view.getFloat32(this.take(4));
      case 0xcb: return this.view.getFloat64(this.take(8));
      case 0xcc: return this.u8();
      case 0xcd: return this.u16();
      case 0xce: return this.u32();
      case 0xcf: return this.u32() * 0x100000000 + this.u32();
      case 0xd0: return this.view.getInt8(this.take(1));
      case 0xd1: return this.view.getInt16(this.take(2));
      case 0xd2: return this.view.getInt32(this.take(4));
      case 0xd3: { const high = this.view.getInt32(this.take(4)); return high * 0x100000000 + this.u32(); }
      case 0xd9: return this.string(this.u8());
      case 0xda: return this.string(this.u16());
      case 0xdb: return this.string(this.u32());
      case 0xdc: return this.array(this.u16());
      case 0xdd: return this.array(this.u32());
      case 0xde: return this.map(this.u16());
      case 0xdf: return this.map(this.u32());
      default: throw new MsgpackError(`unsupported MessagePack type 0x${code.toString(16)}`);
    }
  }
}

export function decode(data) {
  const reader = new Reader(data);
  const value = reader.value();
  if (reader.offset !== data.length) throw new MsgpackError("trailing bytes after MessagePack value");
  return value;
}
