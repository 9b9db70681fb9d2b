// The web client's messenger: the account store and the connection together, following the
// rules of construct/client/messenger.py (docs/crypto.md, docs/protocol.md §8):
// - a message is encrypted and saved (outbox, session, history) before it is sent, and resent
//   unchanged until the server acknowledges it;
// - an incoming message is decrypted and saved before it is acknowledged; duplicates are
//   acknowledged and dropped;
// - a contact's master identity key is pinned on first contact; a different one is refused and
//   the conversation shows a warning until the user, having compared safety numbers, trusts it.
import { InvalidBundle, b64decode } from "./bytes.mjs";
import { safetyNumber, verifyKeyBundle } from "./crypto.mjs";
import * as account from "./account.mjs";
import { Connection, ConnectionLost, ServerError } from "./connection.mjs";
import { AccountStore, removeAccount } from "./store.mjs";

const USERNAME = /^[a-z0-9_.-]{3,32}$/;
const RETRYABLE = new Set(["SERVICE_UNAVAILABLE", "SERVER_ERROR", "RATE_LIMITED"]);
const RETRY_DELAY_MS = 1000;

export class SessionExpired extends Error {}

const now = () => Date.now() / 1000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The WebSocket beside the page: /ws for the page at /, /<secret>/ws for the page of a camouflaged
// server, which is under its secret path.
export function serverUrl(location = globalThis.location) {
  const socket = new URL("ws", location.href);
  return `${socket.protocol === "https:" ? "wss" : "ws"}://${socket.host}${socket.pathname}`;
}

export function checkUsername(text) {
  const username = text.trim().toLowerCase();
  if (!USERNAME.test(username)) throw new Error("A username is 3 to 32 characters of a-z, 0-9, _ . and -");
  return username;
}

// The server's rules (docs/protocol.md §6.1), checked here to answer at once.
export function checkPassword(password) {
  const size = new TextEncoder().encode(password).length;
  if (size < 10 || size > 72) throw new Error("The password must be 10 to 72 bytes long");
  if (!/[A-Z]/.test(password) || !/[a-z]/.test(password) || !/[0-9]/.test(password)) {
    throw new Error("The password needs an upper-case letter, a lower-case letter and a digit");
  }
}

export class Messenger extends EventTarget {
  constructor(store, url = serverUrl()) {
    super();
    this.store = store;
    this.pendingLogin = null;
    this.incoming = [];
    this.draining = false;
    this.flushing = false;
    this.checked = new Set();
    this.maintaining = null;
    this.connection = new Connection(url, {
      authenticate: (connection) => this.authenticate(connection),
      onPush: (frame) => this.pushed(frame),
      onState: (state, detail) => this.emit("status", { state, ...detail }),
      isPermanent: (error) => error.duringLogin || !(error instanceof ConnectionLost || (error instanceof ServerError && RETRYABLE.has(error.code))),
    });
  }

  // A new account: keys made and saved in this browser first, then `register`, then the
  // bundle with the real user id and 100 one-time prekeys. A refused registration leaves nothing.
  static async register(username, password, passphrase, url = serverUrl()) {
    username = checkUsername(username);
    checkPassword(password);
    const store = await AccountStore.create(username, passphrase, account.newState(url, now()));
    const messenger = new Messenger(store, url);
    try {
      await messenger.logIn("register", password);
    } catch (error) {
      messenger.stop();
      await removeAccount(username);
      throw error;
    }
    // Done when the bundle naming the real user id is up: peers refuse the registration one.
    await messenger.maintainKeys().catch((error) => messenger.warn(`Could not publish your keys yet (retried on the next connection): ${error.message}`));
    return messenger;
  }

  static async unlock(username, passphrase, url = serverUrl()) {
    const messenger = new Messenger(await AccountStore.unlock(username, passphrase), url);
    messenger.start();
    return messenger;
  }

  static async import(text, passphrase, url = serverUrl()) {
    const messenger = new Messenger(await AccountStore.import(text, passphrase), url);
    messenger.start();
    return messenger;
  }

  get me() {
    return this.store.data.account;
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  start() {
    this.connection.start();
  }

  stop() {
    this.connection.stop();
  }

  // `register` or `login` with the password (the keys stay); resolves once the server answered.
  logIn(kind, password) {
    return new Promise((resolve, reject) => {
      this.pendingLogin = { kind, password, resolve, reject };
      this.connection.stop();
      this.connection.start();
    });
  }

  async authenticate(connection) {
    const pending = this.pendingLogin;
    if (pending) {
      this.pendingLogin = null;
      try {
        await this.passwordLogin(connection, pending);
      } catch (error) {
        error.duringLogin = true;
        pending.reject(error);
        throw error;
      }
      pending.resolve();
    } else {
      const reply = await connection.request("connect", { sessionToken: this.me.sessionToken }).catch((error) => {
        if (error instanceof ServerError && error.code === "INVALID_TOKEN") return { type: "sessionExpired" };
        throw error;
      });
      if (reply.type === "sessionExpired") {
        this.emit("session-expired");
        throw new SessionExpired("the session has expired or was revoked: log in again");
      }
    }
    // Not awaited: the connection must be online for these, and pushes may already arrive.
    this.afterAuthenticated();
  }

  async passwordLogin(connection, { kind, password }) {
    const username = this.store.username;
    const payload = kind === "register"
      ? { username, password, publicKey: account.registrationBundle(this.store.data) }
      : { username, password };
    const reply = await connection.request(kind, payload);
    if (kind === "login" && reply.payload.userId !== this.me.userId) {
      throw new Error(`the server's ${username} is another account than the one in this browser`);
    }
    await this.store.update((data) => account.setAccount(data, reply.payload));
  }

  async afterAuthenticated() {
    try {
      await this.maintainKeys();
    } catch (error) {
      this.warn(`Could not update your keys on the server (retried on the next connection): ${error.message}`);
    }
    this.flushOutbox();
    this.emit("change");
  }

  warn(text) {
    this.emit("warning", { text });
  }

  // Keys on the server: the bundle with the real user id (a new signed prekey weekly), and the
  // one-time prekey pool topped up to 100 when fewer than 25 are left.
  maintainKeys() {
    // One run at a time: a second caller waits for the run in progress.
    this.maintaining ??= this.publishKeys().finally(() => { this.maintaining = null; });
    return this.maintaining;
  }

  async publishKeys() {
    const publish = await this.store.update((data) => account.signedPrekeyToPublish(data, now()));
    if (publish) {
      const withdrawn = publish.withdrawAccess ? { unidentifiedAccessKey: null } : {};
      await this.connection.call("rotatePrekey", { update: publish.bundle, ...withdrawn });
      await this.store.update((data) => account.signedPrekeyPublished(data, publish.keyId, now()));
    }
    const count = (await this.connection.call("getPrekeyCount")).payload.count;
    if (count < account.PREKEY_LOW_WATER) {
      const upload = await this.store.update((data) => account.newOneTimePrekeys(data, account.PREKEY_BATCH - count));
      await this.connection.call("uploadPrekeys", { prekeys: upload });
    }
  }

  // Contacts

  async fetchBundle(userId, takePrekey) {
    const payload = (await this.connection.call("getPublicKey", { userId, oneTimePrekey: takePrekey })).payload;
    return { username: payload.username, keys: verifyKeyBundle(payload, userId), oneTimePrekey: payload.oneTimePrekey ?? null };
  }

  // Pins `bundle` for `userId`; a different master key than the pinned one is remembered and warned about.
  async pin(userId, bundle) {
    try {
      await this.store.update((data) => account.pinContact(data, userId, bundle, now()));
    } catch (error) {
      if (!(error instanceof account.IdentityChanged)) throw error;
      await this.store.update((data) => account.markKeyChanged(data, userId, error.offeredMasterKey));
    }
    this.emit("change");
  }

  // The user id to chat with `name`, pinning a new contact's keys.
  async openChat(name) {
    const username = checkUsername(name);
    const found = (await this.connection.call("lookupUser", { username })).payload;
    if (found.userId === this.me.userId) throw new Error("Messages to yourself are not supported");
    if (!this.store.data.contacts[found.userId]) await this.pin(found.userId, await this.fetchBundle(found.userId, false));
    return found.userId;
  }

  // Once per unlock, when a conversation opens: is the server still serving the pinned key?
  async checkIdentity(userId) {
    if (this.checked.has(userId)) return;
    this.checked.add(userId);
    try {
      await this.pin(userId, await this.fetchBundle(userId, false));
    } catch (error) {
      this.checked.delete(userId);
      if (!(error instanceof ServerError && error.code === "USER_NOT_FOUND")) throw error;
    }
  }

  async trust(userId) {
    await this.store.update((data) => account.trustIdentity(data, userId));
    this.emit("change");
  }

  safetyNumber(userId) {
    const data = this.store.data;
    const contact = data.contacts[userId];
    const master = b64decode(contact.offeredMasterKey ?? contact.masterKey);
    return safetyNumber(data.account.userId, account.identity(data).masterPublic, userId, master);
  }

  // Sending

  async send(peerId, text) {
    let message = await this.store.update((data) => account.prepareOutgoing(data, peerId, text, null, now()));
    if (message === null) {
      const bundle = await this.fetchBundle(peerId, true);
      await this.pin(peerId, bundle);
      message = await this.store.update((data) => account.prepareOutgoing(data, peerId, text, bundle, now()));
    }
    this.emit("change");
    this.flushOutbox();
    return message;
  }

  // Sends what the outbox holds, in order, until each one is acknowledged or refused for good.
  async flushOutbox() {
    if (this.flushing) return;
    this.flushing = true;
    try {
      while (this.store.data.outbox.length) {
        const message = this.store.data.outbox[0];
        let status;
        try {
          const ack = await this.connection.call("sendMessage", account.wireMessage(message));
          status = ack.payload.status === "delivered" ? "delivered" : "sent";
        } catch (error) {
          if (error instanceof ConnectionLost) continue; // the same message again, once reconnected
          if (error instanceof ServerError && RETRYABLE.has(error.code)) {
            await sleep(error.retryAfter ? error.retryAfter * 1000 : RETRY_DELAY_MS);
            continue;
          }
          this.warn(`A message could not be sent: ${error.message}`);
          status = "failed";
        }
        await this.store.update((data) => account.outgoingSettled(data, message.id, status));
        this.emit("change");
      }
    } finally {
      this.flushing = false;
    }
  }

  // Receiving: one message at a time, in the order the server pushes them.

  pushed(frame) {
    if (frame.type === "message" && frame.payload) {
      this.incoming.push(frame.payload);
      this.drain();
    } else if (frame.type === "sessionExpired") {
      this.emit("session-expired");
      this.connection.stop();
    }
  }

  async drain() {
    if (this.draining) return;
    this.draining = true;
    try {
      while (this.incoming.length) {
        const message = this.incoming[0];
        try {
          await this.receive(message);
          this.incoming.shift();
        } catch (error) {
          // Not acknowledged: the server pushes it again on the next connection.
          this.incoming.shift();
          if (!(error instanceof ConnectionLost)) this.warn(`Could not handle a message now: ${error.message}`);
        }
      }
    } finally {
      this.draining = false;
    }
  }

  async receive(message) {
    let outcome = await this.store.update((data) => account.acceptIncoming(data, message, null, now()));
    if (outcome.status === "need-bundle") {
      let sender;
      try {
        sender = await this.fetchBundle(String(message.from), false);
      } catch (error) {
        if (error instanceof InvalidBundle || (error instanceof ServerError && error.code === "USER_NOT_FOUND")) sender = account.SENDER_GONE;
        else throw error;
      }
      outcome = await this.store.update((data) => account.acceptIncoming(data, message, sender, now()));
    }
    if (outcome.status === "rejected" || outcome.status === "undecryptable") {
      this.warn(`A message was dropped: ${outcome.reason}`);
    }
    this.emit("change", { received: outcome.status === "received" ? outcome.entry : null });
    // Saved: only now acknowledge it. If the connection drops first, it comes again as a duplicate.
    await this.connection.whenOnline();
    this.connection.send("ackMessage", { messageIds: [String(message.id)] });
    if (outcome.usedOneTimePrekey) this.maintainKeys().catch(() => {});
  }

  exportFile() {
    return this.store.file;
  }
}
