// Where the page connects: the WebSocket beside it, at / and under a camouflaged server's secret path.
import { test } from "node:test";
import assert from "node:assert/strict";

import { serverUrl } from "../../construct/web/static/js/client.mjs";

test("the page's WebSocket is beside the page", () => {
  assert.equal(serverUrl(new URL("http://127.0.0.1:8080/")), "ws://127.0.0.1:8080/ws");
  assert.equal(serverUrl(new URL("https://chat.example.org/")), "wss://chat.example.org/ws");
  assert.equal(serverUrl(new URL("https://chat.example.org/Hk3v9QeLrT2pWz8xYb1mNa/")),
    "wss://chat.example.org/Hk3v9QeLrT2pWz8xYb1mNa/ws");
});
