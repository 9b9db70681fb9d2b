// The account's state in IndexedDB, always encrypted: each record holds the text of a key file
// (statefile.mjs, account.mjs), so exporting is handing out the record as it is. The passphrase's
// Argon2id runs once per unlock; every save seals under the same key with a fresh nonce.
import * as statefile from "./statefile.mjs";

const DATABASE = "construct";
const ACCOUNTS = "accounts";

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

let opened = null;
function database() {
  opened ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(DATABASE, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(ACCOUNTS, { keyPath: "username" });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return opened;
}

async function transaction(mode, fn) {
  const db = await database();
  const tx = db.transaction(ACCOUNTS, mode, { durability: "strict" });
  const result = fn(tx.objectStore(ACCOUNTS));
  await new Promise((resolve, reject) => {
    tx.oncomplete = resolve;
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
  });
  return result instanceof IDBRequest ? result.result : result;
}

// The accounts kept in this browser: [{username, savedAt}].
export async function listAccounts() {
  const records = await transaction("readonly", (store) => store.getAll());
  return records.map(({ username, savedAt }) => ({ username, savedAt })).sort((a, b) => b.savedAt - a.savedAt);
}

export async function removeAccount(username) {
  await transaction("readwrite", (store) => store.delete(username));
}

export class AccountStore {
  constructor(username, stateKey, data) {
    this.username = username;
    this.stateKey = stateKey;
    this.data = data;
    this.file = null;
    this.queue = Promise.resolve();
  }

  // A new record (the account need not be registered yet); refuses to overwrite one.
  static async create(username, passphrase, data) {
    if (await transaction("readonly", (store) => store.get(username))) throw new Error(`this browser already holds the account ${username}`);
    const store = new AccountStore(username, statefile.newStateKey(passphrase), data);
    await store.save(data);
    return store;
  }

  static async unlock(username, passphrase) {
    const record = await transaction("readonly", (store) => store.get(username));
    if (!record) throw new Error(`no account ${username} in this browser`);
    const { data, stateKey } = statefile.open(record.file, passphrase);
    const store = new AccountStore(username, stateKey, data);
    store.file = record.file;
    return store;
  }

  // A key file (exported from here or by `construct-chat export`) or a construct-chat state file,
  // sealed again under the same key once `prepare` has checked and upgraded it (so the same
  // passphrase opens it). Returns {store, prepared: what `prepare` returned}.
  static async import(text, passphrase, prepare) {
    const { data, stateKey } = statefile.open(text, passphrase);
    const prepared = prepare(data);
    const username = data.account.username;
    if (await transaction("readonly", (store) => store.get(username))) throw new Error(`this browser already holds the account ${username}`);
    const store = new AccountStore(username, stateKey, data);
    await store.save(data);
    return { store, prepared };
  }

  async save(data) {
    const file = statefile.seal(this.stateKey, data);
    await transaction("readwrite", (store) => store.put({ username: this.username, file, savedAt: Date.now() }));
    this.file = file;
  }

  // Runs `fn` on a copy of the state, saves the copy and only then makes it current: when `fn`
  // throws or the save fails, nothing changed. One change at a time; returns what `fn` returns.
  update(fn) {
    const run = this.queue.then(async () => {
      const copy = structuredClone(this.data);
      const result = fn(copy);
      await this.save(copy);
      this.data = copy;
      return result;
    });
    this.queue = run.catch(() => {});
    return run;
  }
}
