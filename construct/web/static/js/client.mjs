// The web client's messenger: the account store and the connection together, following the
// rules of construct/client/messenger.py (docs/crypto.md, docs/protocol.md §8):
// - a message is put in the outbox before anything goes over the network, then looked up,
//   encrypted and saved, and sent (the same ChatMessage again until the server acknowledges it);
// - an incoming message is decrypted and saved before it is acknowledged; duplicates are
//   acknowledged and dropped;
// - a contact's name, user id and master identity key are pinned on first contact; a change of
//   any is refused (messages from it dropped, nothing sent to it) and the conversation shows a
//   warning until the user, having compared safety numbers, trusts it.
import { InvalidBundle, b64decode, b64encode } from "./bytes.mjs";
import { safetyNumber, verifyKeyBundle } from "./crypto.mjs";
import * as account from "./account.mjs";
import { Connection, ConnectionLost, ServerError } from "./connection.mjs";
import { AccountStore, removeAccount } from "./store.mjs";

const USERNAME = /^[a-z0-9_.-]{3,32}$/;
// Worth sending the very same message again: the server may not have stored it.
const RETRYABLE = new Set(["SERVICE_UNAVAILABLE", "SERVER_ERROR"]);
// Refused for now, not for good: the message stays in the outbox and goes again later (SERVER_BUSY:
// the server is past its capacity and sheds sends; it and RATE_LIMITED say when, in retryAfter).
const NOT_NOW = new Set(["RATE_LIMITED", "INBOX_FULL", "SERVER_BUSY"]);
const RETRY_DELAY_MS = 1000;
const MAX_RETRY_DELAY_MS = 60_000;
// The reason `sessionExpired` gives when the account itself was deleted.
const ACCOUNT_DELETED = "accountDeleted";

export class SessionExpired extends Error {}
export class AccountDeleted extends SessionExpired {}

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

function refusal(error) {
  if (error instanceof ServerError && error.code === "USER_NOT_FOUND") return "no account has that username";
  if (error instanceof ServerError) return `${error.message} (${error.code})`;
  return error.message;
}

// Whether the history of a key file came with it: a construct-chat state file keeps it apart.
function prepareImport(data) {
  if (!data.account?.username || !data.identity) throw new Error("this key file holds no registered account");
  if (data.version !== 1 && data.version !== account.STATE_VERSION) {
    throw new Error(`this key file is of a newer version (${data.version}) than this web client knows`);
  }
  const withHistory = Array.isArray(data.history);
  account.upgrade(data);
  return { withHistory };
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
      isPermanent: (error) => error.duringLogin || !(error instanceof ConnectionLost ||
        (error instanceof ServerError && (RETRYABLE.has(error.code) || NOT_NOW.has(error.code)))),
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

  // Records of an earlier version are upgraded as they are opened.
  static async unlock(username, passphrase, url = serverUrl()) {
    const store = await AccountStore.unlock(username, passphrase);
    if (store.data.version !== account.STATE_VERSION || !Array.isArray(store.data.history)) await store.update(account.upgrade);
    const messenger = new Messenger(store, url);
    messenger.start();
    return messenger;
  }

  // `importedWithHistory` says whether the file brought its messages (a key file) or not (a
  // construct-chat state file, whose history is in the file beside it).
  static async import(text, passphrase, url = serverUrl()) {
    const { store, prepared } = await AccountStore.import(text, passphrase, prepareImport);
    const messenger = new Messenger(store, url);
    messenger.importedWithHistory = prepared.withHistory;
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
      if (reply.type === "sessionExpired") throw this.sessionEnded(reply.payload);
    }
    // Not awaited: the connection must be online for these, and pushes may already arrive.
    this.afterAuthenticated();
  }

  // The server ended the session: log in again, unless the account itself was deleted.
  sessionEnded(payload) {
    if (payload?.reason === ACCOUNT_DELETED) {
      this.emit("account-deleted");
      return new AccountDeleted("the account was deleted on the server (by its owner or the operator)");
    }
    this.emit("session-expired");
    return new SessionExpired("the session has expired or was revoked: log in again");
  }

  async passwordLogin(connection, { kind, password }) {
    const username = this.store.username;
    const payload = kind === "register"
      ? { username, password, publicKey: account.registrationBundle(this.store.data) }
      : { username, password };
    let reply;
    try {
      reply = await connection.request(kind, payload);
    } catch (error) {
      if (kind === "login" && error instanceof ServerError && error.code === "INVALID_CREDENTIALS") {
        throw new Error(`Wrong password, or there is no account ${username} on this server any more (it may have been deleted)`);
      }
      throw error;
    }
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

  async lookup(username) {
    return (await this.connection.call("lookupUser", { username })).payload;
  }

  async fetchBundle(userId, takePrekey) {
    const payload = (await this.connection.call("getPublicKey", { userId, oneTimePrekey: takePrekey })).payload;
    return { username: payload.username, keys: verifyKeyBundle(payload, userId), oneTimePrekey: payload.oneTimePrekey ?? null };
  }

  // Pins `bundle` for `userId` (a new contact), or checks it against the pins. Returns the id of the
  // contact to show: when the name or the key is not the pinned one, the pinned contact, which
  // now carries the warning.
  async pin(userId, bundle) {
    try {
      await this.store.update((data) => account.pinContact(data, userId, bundle, now()));
      return userId;
    } catch (error) {
      if (!(error instanceof account.IdentityChanged) || !error.pinnedId) throw error;
      await this.store.update((data) => account.markIdentityChanged(data, error));
      return error.pinnedId;
    } finally {
      this.emit("change");
    }
  }

  // The contact to chat with `name`: a new one is pinned; a name pinned to another account than
  // the server's is that contact, with the warning.
  async openChat(name) {
    const username = checkUsername(name);
    const found = await this.lookup(username);
    if (found.userId === this.me.userId) throw new Error("Messages to yourself are not supported");
    const known = this.store.data.contacts[found.userId];
    if (known && known.username === found.username) return found.userId;
    return this.pin(found.userId, await this.fetchBundle(found.userId, false));
  }

  // Once per unlock, when a conversation opens: does the name still mean the pinned account, with
  // the pinned key? (A key fetch that takes no one-time prekey.)
  async checkIdentity(userId) {
    if (this.checked.has(userId)) return;
    this.checked.add(userId);
    try {
      await this.verifyContact(userId);
    } catch (error) {
      this.checked.delete(userId);
      throw error;
    }
  }

  async verifyContact(userId) {
    const contact = this.store.data.contacts[userId];
    let target = userId;
    try {
      target = (await this.lookup(contact.username)).userId;
    } catch (error) {
      // Nobody has the name now (the account was deleted): nothing to compare.
      if (error instanceof ServerError && error.code === "USER_NOT_FOUND") return;
      throw error;
    }
    let bundle;
    try {
      bundle = await this.fetchBundle(target, false);
    } catch (error) {
      if (error instanceof ServerError && error.code === "USER_NOT_FOUND") return;
      throw error;
    }
    await this.pin(target, bundle);
  }

  // The user compared the safety number shown for the contact's offered account and key, and
  // trusts them: the server must still give exactly those (else the new ones are shown, to be
  // compared again). Returns the contact's user id from now on.
  async trust(userId) {
    const data = this.store.data;
    const username = data.contacts[userId].username;
    const wanted = account.offered(data, userId);
    const found = await this.lookup(username);
    const bundle = await this.fetchBundle(found.userId, false);
    if (found.userId !== wanted.userId || b64encode(bundle.keys.masterKey) !== wanted.masterKey) {
      await this.pin(found.userId, bundle);
      throw new Error(`The server now gives yet another identity for ${username}: compare the new safety number before you trust it`);
    }
    await this.store.update((state) => account.trustContact(state, username, found.userId, bundle, now()));
    this.checked.add(found.userId);
    this.emit("change");
    return found.userId;
  }

  // The 60 digits to compare for a contact: of the offered account and key while it has a
  // warning (null while that key is not known yet), with those pinned before as `pinned`.
  safetyNumbers(userId) {
    const data = this.store.data;
    const contact = data.contacts[userId];
    const mine = [data.account.userId, account.identity(data).masterPublic];
    const number = (id, key) => safetyNumber(...mine, id, b64decode(key));
    const wanted = account.offered(data, userId);
    const pinned = number(userId, contact.masterKey);
    if (!contact.identityWarning) return { current: pinned, pinned: null };
    const keyKnown = !(contact.offeredUserId && !contact.offeredMasterKey);
    return { current: keyKnown ? number(wanted.userId, wanted.masterKey) : null, pinned };
  }

  // Sending

  // Puts the message in the outbox at once, then sends the outbox in order.
  async send(peerId, text) {
    const username = this.store.data.contacts[peerId].username;
    const entry = await this.store.update((data) => account.queueOutgoing(data, username, text, now()));
    this.emit("change");
    this.flushOutbox();
    return entry;
  }

  // Sends what the outbox holds, in order, until each one is acknowledged or refused for good. One
  // the server refuses for now waits (the order is kept) and goes again after `retryAfter`.
  async flushOutbox() {
    if (this.flushing) return;
    this.flushing = true;
    let attempts = 0;
    try {
      while (this.store.data.outbox.length) {
        const entry = this.store.data.outbox[0];
        let status;
        let reason = "";
        try {
          status = await this.sendEntry(entry.id);
        } catch (error) {
          if (error instanceof ConnectionLost) continue; // the same message again, once reconnected
          if (error instanceof ServerError && (RETRYABLE.has(error.code) || NOT_NOW.has(error.code))) {
            const delay = error.retryAfter ? error.retryAfter * 1000 : Math.min(RETRY_DELAY_MS * 2 ** attempts, MAX_RETRY_DELAY_MS);
            if (NOT_NOW.has(error.code) && attempts === 0) {
              this.warn(`The server says not now (${error.code}): the message waits and goes again in ${Math.ceil(delay / 1000)} s.`);
            }
            attempts += 1;
            await sleep(delay);
            continue;
          }
          if (error instanceof account.IdentityChanged) {
            await this.store.update((data) => account.markIdentityChanged(data, error));
            if (error.offeredUserId) this.verifyContact(error.pinnedId).catch(() => {});
          }
          status = "failed";
          reason = refusal(error);
          this.warn(`A message to ${entry.peerName} was not sent: ${reason}`);
        }
        attempts = 0;
        await this.store.update((data) => account.outgoingSettled(data, entry.id, status, reason));
        this.emit("change");
      }
    } finally {
      this.flushing = false;
    }
  }

  // Looks up, encrypts (fetching the peer's bundle for a first message) and sends one outbox entry.
  async sendEntry(entryId) {
    if (account.outboxEntry(this.store.data, entryId).peer === null) {
      const found = await this.lookup(account.outboxEntry(this.store.data, entryId).peerName);
      await this.store.update((data) => account.resolveOutgoing(data, entryId, found.userId));
    }
    let message = await this.store.update((data) => account.encryptOutgoing(data, entryId, null, now()));
    if (message === null) {
      const bundle = await this.fetchBundle(account.outboxEntry(this.store.data, entryId).peer, true);
      message = await this.store.update((data) => account.encryptOutgoing(data, entryId, bundle, now()));
    }
    const ack = await this.connection.call("sendMessage", account.wireMessage(message));
    return ack.payload.status === "delivered" ? "delivered" : "sent";
  }

  // Receiving: one message at a time, in the order the server pushes them.

  pushed(frame) {
    if (frame.type === "message" && frame.payload) {
      this.incoming.push(frame.payload);
      this.drain();
    } else if (frame.type === "sessionExpired") {
      this.sessionEnded(frame.payload);
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
