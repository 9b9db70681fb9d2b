// One WebSocket to the server (MessagePack binary frames), reconnecting with backoff. Replies are
// matched to requests by requestId; pushes go to `onPush`. After every (re)connect `authenticate`
// runs before anything else may use the connection.
import * as msgpack from "./msgpack.mjs";

export const REQUEST_TIMEOUT_MS = 20000;
const PING_EVERY_MS = 25000;
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000, 30000];

export class ServerError extends Error {
  constructor(payload) {
    super(payload?.message ?? "the server refused the request");
    this.code = payload?.code ?? "SERVER_ERROR";
    this.retryAfter = payload?.retryAfter ?? null;
  }
}

export class ConnectionLost extends Error {}

export class Connection {
  constructor(url, { authenticate, onPush, onState, isPermanent }) {
    this.url = url;
    this.authenticate = authenticate;
    this.isPermanent = isPermanent;
    this.onPush = onPush;
    this.onState = onState;
    this.socket = null;
    this.pending = new Map();
    this.nextId = 1;
    this.failures = 0;
    this.stopped = true;
    this.online = null;
    this.waiters = [];
    this.retryTimer = null;
    this.pingTimer = null;
    this.state = "offline";
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.open();
    globalThis.addEventListener?.("online", this.retryNow);
  }

  stop() {
    this.stopped = true;
    globalThis.removeEventListener?.("online", this.retryNow);
    clearTimeout(this.retryTimer);
    this.socket?.close(1000);
    this.closed();
  }

  retryNow = () => {
    if (!this.stopped && !this.socket) {
      clearTimeout(this.retryTimer);
      this.open();
    }
  };

  setState(state, detail = {}) {
    this.state = state;
    this.onState?.(state, detail);
  }

  open() {
    this.setState("connecting");
    const socket = new WebSocket(this.url);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.onopen = () => this.opened(socket);
    socket.onmessage = (event) => this.received(event.data);
    socket.onclose = () => {
      if (this.socket === socket) this.closed();
    };
  }

  async opened(socket) {
    try {
      await this.authenticate(this);
    } catch (error) {
      // A refused login stops here; a network problem or a busy server is tried again.
      if (this.socket === socket && this.isPermanent(error)) this.setState("failed", { error });
      if (this.socket === socket) socket.close(1000);
      return;
    }
    if (this.socket !== socket) return;
    this.failures = 0;
    this.online = socket;
    this.setState("online");
    for (const resolve of this.waiters.splice(0)) resolve();
    this.pingTimer = setInterval(() => this.request("ping", null, { timeout: 10000 }).catch(() => socket.close(4000)), PING_EVERY_MS);
  }

  closed() {
    clearInterval(this.pingTimer);
    this.socket = null;
    this.online = null;
    for (const { reject, timer } of this.pending.values()) {
      clearTimeout(timer);
      reject(new ConnectionLost("the connection to the server was lost"));
    }
    this.pending.clear();
    if (this.stopped || this.state === "failed") {
      if (this.state !== "failed") this.setState("offline");
      return;
    }
    const delay = BACKOFF_MS[Math.min(this.failures, BACKOFF_MS.length - 1)] * (0.75 + Math.random() / 2);
    this.failures += 1;
    this.setState("waiting", { retryInMs: delay });
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  received(data) {
    let frame;
    try {
      frame = typeof data === "string" ? JSON.parse(data) : msgpack.decode(new Uint8Array(data));
    } catch {
      return;
    }
    const waiting = frame.requestId !== undefined ? this.pending.get(frame.requestId) : undefined;
    if (waiting) {
      this.pending.delete(frame.requestId);
      clearTimeout(waiting.timer);
      if (frame.type === "error") waiting.reject(new ServerError(frame.payload));
      else waiting.resolve(frame);
    } else if (frame.requestId === undefined) {
      this.onPush(frame);
    }
  }

  // Sends one request on the current socket (authenticated or not) and resolves with the reply frame.
  request(type, payload = null, { timeout = REQUEST_TIMEOUT_MS } = {}) {
    const socket = this.socket;
    if (!socket || socket.readyState !== WebSocket.OPEN) return Promise.reject(new ConnectionLost("not connected"));
    const requestId = String(this.nextId++);
    const frame = payload === null ? { type, requestId } : { type, payload, requestId };
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(new ConnectionLost(`no reply to ${type} in time`));
        socket.close(4000);
      }, timeout);
      this.pending.set(requestId, { resolve, reject, timer });
      socket.send(msgpack.encode(frame));
    });
  }

  // A frame that gets no reply on success (ackMessage).
  send(type, payload) {
    if (this.online && this.online.readyState === WebSocket.OPEN) this.online.send(msgpack.encode({ type, payload }));
  }

  whenOnline() {
    // A socket that is closing is not online: its close event comes later, and what waits for it
    // must not be woken again and again meanwhile.
    if (this.online && this.online.readyState === WebSocket.OPEN) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  // Waits for an authenticated connection, then requests.
  async call(type, payload = null, options = {}) {
    await this.whenOnline();
    return this.request(type, payload, options);
  }
}
