// The page: welcome (create, unlock, import), the chat screen, logging in again, and an account
// that is gone. Text from other people only ever goes into the page as textContent.
import { conversation, contactOf } from "./account.mjs";
import { Messenger } from "./client.mjs";
import { listAccounts, removeAccount } from "./store.mjs";

const $ = (id) => document.getElementById(id);
const STATUS_TEXT = { online: "online", connecting: "connecting…", waiting: "offline, retrying", offline: "offline", failed: "not logged in" };
const DELIVERY_TEXT = { pending: "sending…", sent: "sent", delivered: "delivered", failed: "not sent" };

let messenger = null;
let releaseLock = () => {};
let selected = null;
const unread = new Map();

function show(screen) {
  for (const id of ["welcome", "relogin", "gone", "chat"]) $(id).hidden = id !== screen;
}

function element(tag, { text, className, attrs } = {}, children = []) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  for (const [name, value] of Object.entries(attrs ?? {})) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

let toastTimer = null;
function toast(text) {
  $("toast").textContent = text;
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").hidden = true; }, 6000);
}

// Runs a form's action with its button disabled, showing any error in `errorId`.
function onSubmit(formId, errorId, action) {
  const form = $(formId);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    $(errorId).textContent = "";
    // Let the page paint the disabled button before a slow key derivation starts.
    await new Promise((resolve) => setTimeout(resolve, 20));
    try {
      await action(form);
    } catch (error) {
      $(errorId).textContent = error.message;
    } finally {
      button.disabled = false;
    }
  });
}

// One tab per account: two would advance the same ratchets independently.
function holdLock(username) {
  if (!navigator.locks) return Promise.resolve(() => {});
  return new Promise((resolve, reject) => {
    navigator.locks.request(`construct-account:${username}`, { ifAvailable: true }, (lock) => {
      if (!lock) {
        reject(new Error("This account is already open in another tab of this browser."));
        return undefined;
      }
      return new Promise((release) => resolve(release));
    });
  });
}

async function open(username, makeMessenger) {
  const release = await holdLock(username);
  try {
    enter(await makeMessenger());
    releaseLock = release;
  } catch (error) {
    release();
    throw error;
  }
}

function enter(m) {
  messenger = m;
  messenger.addEventListener("status", ({ detail }) => {
    $("status").dataset.state = detail.state;
    $("status").textContent = STATUS_TEXT[detail.state] ?? detail.state;
    if (detail.state === "failed" && detail.error && !$("chat").hidden) toast(`Not connected: ${detail.error.message}`);
  });
  messenger.addEventListener("change", ({ detail }) => {
    const from = detail.received && contactOf(messenger.store.data, detail.received);
    if (from && from !== selected) unread.set(from, (unread.get(from) ?? 0) + 1);
    if (selected && !messenger.store.data.contacts[selected]) selected = null;
    render();
  });
  messenger.addEventListener("warning", ({ detail }) => toast(detail.text));
  messenger.addEventListener("session-expired", () => show("relogin"));
  messenger.addEventListener("account-deleted", () => {
    $("gone-username").textContent = messenger.me.username;
    show("gone");
  });
  $("status").dataset.state = messenger.connection.state;
  $("status").textContent = STATUS_TEXT[messenger.connection.state];
  $("me").textContent = messenger.me.username;
  $("export").hidden = $("lock").hidden = false;
  show("chat");
  render();
}

function lastActivity(userId) {
  const last = conversation(messenger.store.data, userId).at(-1);
  return last ? last.timestamp ?? last.receivedAt ?? 0 : messenger.store.data.contacts[userId].pinnedAt ?? 0;
}

function renderContacts() {
  const contacts = messenger.store.data.contacts;
  const ids = Object.keys(contacts).sort((a, b) => lastActivity(b) - lastActivity(a));
  $("contacts").replaceChildren(...ids.map((userId) => {
    const contact = contacts[userId];
    const extras = [];
    if (contact.identityWarning) extras.push(element("span", { text: "⚠", className: "alert", attrs: { title: "identity changed" } }));
    if (unread.get(userId)) extras.push(element("span", { text: String(unread.get(userId)), className: "badge" }));
    const item = element("li", {
      attrs: { "data-user-id": userId, "aria-current": String(userId === selected) },
    }, [element("span", { text: contact.username }), element("span", {}, extras)]);
    item.addEventListener("click", () => select(userId));
    return item;
  }));
}

function time(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
}

function renderConversation() {
  const contact = selected && messenger.store.data.contacts[selected];
  $("no-conversation").hidden = Boolean(contact);
  $("conversation").hidden = !contact;
  if (!contact) return;
  $("peer-name").textContent = contact.username;
  $("identity-warning").hidden = !contact.identityWarning;
  $("identity-warning-text").textContent = contact.identityWarning ?? "";
  $("compose-text").disabled = Boolean(contact.identityWarning);
  $("safety-peer").textContent = contact.username;
  if (!$("safety").hidden) {
    const numbers = messenger.safetyNumbers(selected);
    $("safety-number").textContent = numbers.current ?? "(fetching the new keys…)";
    $("safety-pinned").hidden = !numbers.pinned;
    $("safety-pinned-number").textContent = numbers.pinned ?? "";
  }
  const entries = conversation(messenger.store.data, selected);
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...entries.map((entry) => {
    const status = entry.direction === "out" ? DELIVERY_TEXT[entry.status] ?? entry.status : "";
    return element("li", {
      className: entry.direction,
      attrs: { "data-id": entry.id, "data-status": entry.status, title: entry.reason ?? "" },
    }, [element("span", { text: entry.text, className: "text" }), element("span", { text: [time(entry.timestamp ?? entry.receivedAt), status].filter(Boolean).join(" · "), className: "meta" })]);
  }));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function render() {
  renderContacts();
  renderConversation();
}

function select(userId) {
  selected = userId;
  unread.delete(userId);
  $("safety").hidden = true;
  $("compose-error").textContent = "";
  render();
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
  messenger.checkIdentity(userId).then(render, (error) => toast(`Could not check ${messenger.store.data.contacts[userId].username}'s keys: ${error.message}`));
}

async function refreshAccounts() {
  const accounts = await listAccounts();
  $("accounts").hidden = accounts.length === 0;
  $("unlock-account").replaceChildren(...accounts.map(({ username }) => element("option", { text: username, attrs: { value: username } })));
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const link = element("a", { attrs: { href: url, download: name } });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function wire() {
  onSubmit("register-form", "welcome-error", async () => {
    if ($("register-passphrase").value !== $("register-passphrase2").value) throw new Error("The two passphrases differ");
    const username = $("register-username").value.trim().toLowerCase();
    await open(username, () => Messenger.register(username, $("register-password").value, $("register-passphrase").value));
    $("register-form").reset();
  });
  onSubmit("unlock-form", "welcome-error", async () => {
    const username = $("unlock-account").value;
    await open(username, () => Messenger.unlock(username, $("unlock-passphrase").value));
    $("unlock-form").reset();
  });
  onSubmit("import-form", "welcome-error", async () => {
    const file = $("import-file").files[0];
    if (!file) throw new Error("Choose a key file");
    const text = await file.text();
    const imported = await Messenger.import(text, $("import-passphrase").value);
    try {
      releaseLock = await holdLock(imported.me.username);
    } catch (error) {
      imported.stop();
      throw error;
    }
    enter(imported);
    $("import-form").reset();
    if (!imported.importedWithHistory) {
      toast("Imported the keys and contacts without the messages: a construct-chat state file keeps them in the " +
        "file beside it. To bring them too, import the key file that construct-chat export FILE writes.");
    }
  });
  onSubmit("relogin-form", "relogin-error", async () => {
    await messenger.logIn("login", $("relogin-password").value);
    $("relogin-form").reset();
    show("chat");
  });
  onSubmit("new-chat-form", "new-chat-error", async () => {
    const userId = await messenger.openChat($("new-chat-username").value);
    $("new-chat-form").reset();
    select(userId);
  });
  onSubmit("compose-form", "compose-error", async () => {
    const text = $("compose-text").value;
    if (!text.trim()) return;
    await messenger.send(selected, text);
    $("compose-text").value = "";
    $("compose-text").focus();
  });
  $("compose-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("compose-form").requestSubmit();
    }
  });
  $("show-safety").addEventListener("click", () => {
    $("safety").hidden = !$("safety").hidden;
    renderConversation();
  });
  $("trust-identity").addEventListener("click", () => messenger.trust(selected).then(select, (error) => toast(error.message)));
  $("gone-remove").addEventListener("click", async () => {
    messenger.stop();
    await removeAccount(messenger.me.username);
    releaseLock();
    location.reload();
  });
  $("export").addEventListener("click", () => download(`construct-${messenger.me.username}.json`, messenger.exportFile()));
  $("lock").addEventListener("click", () => {
    messenger.stop();
    releaseLock();
    // Reloading is the sure way to drop every key from memory.
    location.reload();
  });
}

$("insecure").hidden = window.isSecureContext;
wire();
refreshAccounts().then(() => {
  $("loading").hidden = true;
  document.body.dataset.ready = "true";
}, (error) => {
  $("loading").textContent = `This browser cannot keep keys (IndexedDB: ${error.message}).`;
});
