"""The web client end to end in a real browser: Debian's Chromium driven by Playwright, against a
real `twistd construct` process, next to the real `construct-chat`.

One server and one browser serve the whole module; each test registers its own users, each
browser user in a context of its own (its own IndexedDB). Screenshots of the main screens go to
build/screenshots/ (override with CONSTRUCT_SCREENSHOTS).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers import PASSWORD
from tests.processes import REPO, ServerProcess
from tests.test_chat_e2e import Chat

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keeps it from reaching for the network on its own.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"]
SCREENSHOTS = Path(os.environ.get("CONSTRUCT_SCREENSHOTS", REPO / "build" / "screenshots"))
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("webclient"), "--data-dir", "data", "--bcrypt-cost", "4").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class BrowserUser:
    """One person with the web client open, in a browser context of their own."""

    def __init__(self, browser: Browser, server: ServerProcess, name: str) -> None:
        self.name = name
        self.origin = f"http://127.0.0.1:{server.ports['http']}"
        self.context = browser.new_context(accept_downloads=True)
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.open()

    def open(self) -> Page:
        page = self.context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("console", lambda message: message.type == "error" and self.problems.append(f"console: {message.text}"))
        page.goto(self.origin + "/")
        page.wait_for_selector("body[data-ready=true]")
        return page

    def register(self, username: str | None = None) -> None:
        page = self.page
        page.fill("#register-username", username or self.name)
        page.fill("#register-password", PASSWORD)
        page.fill("#register-passphrase", f"{self.name} browser passphrase")
        page.fill("#register-passphrase2", f"{self.name} browser passphrase")
        page.click("#register-form button")
        self.wait_online()

    def wait_online(self) -> None:
        self.page.wait_for_selector("#chat:not([hidden])")
        self.page.wait_for_selector("#status[data-state=online]")

    def unlock(self) -> None:
        self.page.select_option("#unlock-account", self.name)
        self.page.fill("#unlock-passphrase", f"{self.name} browser passphrase")
        self.page.click("#unlock-form button")
        self.wait_online()

    def open_chat(self, username: str) -> None:
        self.page.fill("#new-chat-username", username)
        self.page.click("#new-chat-form button")
        expect(self.page.locator("#peer-name")).to_have_text(username)

    def select(self, username: str) -> None:
        self.page.locator("#contacts li", has_text=username).click()
        expect(self.page.locator("#peer-name")).to_have_text(username)

    def send(self, text: str) -> None:
        self.page.fill("#compose-text", text)
        self.page.press("#compose-text", "Enter")
        self.page.wait_for_selector(f"#messages li.out >> text={text}")

    def outgoing_status(self, text: str) -> str:
        return self.page.locator("#messages li.out", has_text=text).get_attribute("data-status")

    def wait_for_incoming(self, count: int) -> list[str]:
        self.page.wait_for_function("n => document.querySelectorAll('#messages li.in').length >= n", arg=count)
        return self.page.locator("#messages li.in .text").all_inner_texts()

    def safety_number(self) -> str:
        self.page.click("#show-safety")
        number = self.page.inner_text("#safety-number")
        assert re.fullmatch(r"(\d{5} ){11}\d{5}", number), number
        return number

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))

    def check_clean(self) -> None:
        """No script error, no policy violation, and nothing fetched from anywhere but the server."""
        assert self.problems == []
        assert self.requests and all(url.startswith(self.origin + "/") for url in self.requests), self.requests
        self.context.close()


def _cli(tmp_path: Path, server: ServerProcess, name: str) -> Chat:
    return Chat(tmp_path, name, f"ws://127.0.0.1:{server.ports['http']}/ws")


def _first_contact(browser, server, tmp_path: Path, web_name: str, cli_name: str, text: str) -> tuple[BrowserUser, Chat]:
    """A construct-chat user and a browser user register; the browser user writes first (X3DH
    from JavaScript, answered in Python), and the message arrives."""
    cli = _cli(tmp_path, server, cli_name)
    cli.ok("register", cli_name)
    web = BrowserUser(browser, server, web_name)
    web.register()
    web.open_chat(cli_name)
    web.send(text)
    received = cli.ok("listen", "--count", "1", "--timeout", "30")
    assert [(m["peer"], m["text"]) for m in received] == [(web_name, text)]
    return web, cli


def test_two_browser_users_chat(browser, server):
    """Alice and Bob register in their browsers and chat; delivery shows, safety numbers agree."""
    alice = BrowserUser(browser, server, "alice")
    alice.screenshot("1-welcome")
    alice.register()
    bob = BrowserUser(browser, server, "bob")
    bob.register()

    alice.open_chat("bob")
    alice.send("Hi Bob, it's Alice")
    bob.page.wait_for_selector("#contacts li >> text=alice")
    bob.select("alice")
    assert bob.wait_for_incoming(1) == ["Hi Bob, it's Alice"]
    bob.send("Hi Alice! Multi-line\nworks too")
    assert alice.wait_for_incoming(1) == ["Hi Alice! Multi-line\nworks too"]
    # Both were online: the server pushed each message at once.
    expect(alice.page.locator("#messages li.out")).to_have_attribute("data-status", "delivered")
    expect(bob.page.locator("#messages li.out")).to_have_attribute("data-status", "delivered")
    assert alice.safety_number() == bob.safety_number()
    alice.screenshot("2-conversation")

    # Bob deletes his account elsewhere: his page says the account is gone (not "log in again"),
    # and can remove it from the browser.
    _delete_account(server, "bob")
    expect(bob.page.locator("#gone")).to_be_visible()
    expect(bob.page.locator("#gone")).to_contain_text("deleted")
    expect(bob.page.locator("#relogin")).to_be_hidden()
    bob.page.click("#gone-remove")
    bob.page.wait_for_selector("body[data-ready=true]")
    expect(bob.page.locator("#unlock-account option")).to_have_count(0)
    alice.check_clean()
    bob.check_clean()


def test_a_browser_user_and_a_construct_chat_user_chat_both_ways(browser, server, tmp_path):
    """Carol in the browser and Dave on construct-chat: each reads the other, the safety numbers
    agree, Carol's exported key file is a state file construct-chat reads with its history, and
    the key file `construct-chat export` writes opens in a browser with Dave's history (his bare
    state file too, without it, saying so)."""
    carol, dave = _first_contact(browser, server, tmp_path, "carol", "dave", "Hello Dave, from the browser")
    assert dave.ok("send", "carol", "Hello Carol, from the terminal ✓")[0]["status"] == "delivered"
    assert carol.wait_for_incoming(1) == ["Hello Carol, from the terminal ✓"]
    carol.send("Got it")
    assert [m["text"] for m in dave.ok("listen", "--count", "1", "--timeout", "30")] == ["Got it"]
    expect(carol.page.locator("#messages li.out", has_text="Got it")).to_have_attribute("data-status", "sent")
    digits = dave.ok("fingerprint", "carol")[0]["safetyNumber"]
    assert carol.safety_number() == digits

    with carol.page.expect_download() as download:
        carol.page.click("#export")
    exported = tmp_path / "carol-exported.json"
    download.value.save_as(exported)
    document = json.loads(exported.read_text())
    assert (document["kdf"], document["opslimit"], document["memlimit"]) == ("argon2id", 3, 64 * 1024 * 1024)
    carol_cli = Chat(tmp_path, "carol", dave.server)
    carol_cli.state = exported
    carol_cli.env["CONSTRUCT_CHAT_PASSPHRASE"] = "carol browser passphrase"
    history = carol_cli.ok("history", "dave")
    assert [(h["direction"], h["text"]) for h in history] == [
        ("out", "Hello Dave, from the browser"), ("in", "Hello Carol, from the terminal ✓"), ("out", "Got it")]
    carol.check_clean()

    # And the other way: Dave's state file (version 2, its history in the file beside it) opens in a
    # browser without the messages, saying where they are; the key file `export` writes has them.
    def imported(path: Path) -> BrowserUser:
        user = BrowserUser(browser, server, "dave")
        user.page.set_input_files("#import-file", str(path))
        user.page.fill("#import-passphrase", dave.env["CONSTRUCT_CHAT_PASSPHRASE"])
        user.page.click("#import-form button")
        user.wait_online()
        user.select("carol")
        return user

    bare = imported(dave.state)
    expect(bare.page.locator("#toast")).to_contain_text("construct-chat export")
    expect(bare.page.locator("#messages li")).to_have_count(0)
    bare.check_clean()
    key_file = tmp_path / "dave-key-file.json"
    assert dave.ok("export", str(key_file))[0]["messages"] == 3
    dave_web = imported(key_file)
    assert dave_web.wait_for_incoming(2) == ["Hello Dave, from the browser", "Got it"]
    expect(dave_web.page.locator("#messages li.out")).to_have_text(re.compile("Hello Carol, from the terminal"))
    dave_web.check_clean()


def test_offline_messages_arrive_on_next_open(browser, server):
    """Messages sent while Frank's page is closed wait on the server ("sent", not "delivered"); when
    he opens the page and unlocks, they arrive in order, and only then leave the server."""
    erin = BrowserUser(browser, server, "erin")
    erin.register()
    frank = BrowserUser(browser, server, "frank")
    frank.register()
    frank.page.close()

    erin.open_chat("frank")
    texts = ["first while you were away", "second", "third"]
    for text in texts:
        erin.send(text)
        expect(erin.page.locator("#messages li.out", has_text=text)).to_have_attribute("data-status", "sent")
    inbox = Path(server.tmp_path) / "data" / "construct.sqlite3"
    with sqlite3.connect(inbox) as db:
        assert db.execute("SELECT count(*) FROM inbox").fetchone()[0] == 3

    frank.page = frank.open()
    frank.page.wait_for_selector("#accounts:not([hidden])")
    frank.unlock()
    frank.page.wait_for_selector("#contacts li >> text=erin")
    frank.select("erin")
    assert frank.wait_for_incoming(3) == texts
    # Acknowledged once saved: nothing is left for Frank on the server.
    for _ in range(50):
        with sqlite3.connect(inbox) as db:
            if db.execute("SELECT count(*) FROM inbox").fetchone()[0] == 0:
                break
        frank.page.wait_for_timeout(100)
    else:
        pytest.fail("the messages were never acknowledged")
    frank.screenshot("3-offline-messages")
    erin.check_clean()
    frank.check_clean()


def _delete_account(server: ServerProcess, username: str) -> None:
    def call(method: str, path: str, body: dict, token: str | None = None) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.ports['http']}{path}", json.dumps(body).encode(), method=method,
            headers={"Content-Type": "application/json"},
        )
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    token = json.loads(call("POST", "/v1/sessions", {"username": username, "password": PASSWORD}))["sessionToken"]
    call("DELETE", "/v1/accounts/current", {"password": PASSWORD}, token)


def test_an_identity_change_shows_the_warning(browser, server, tmp_path):
    """Gina's name passes to a new account with new keys: as construct-chat does, Hank's browser
    refuses the newcomer's message and sending to the name, and says why on the pinned contact,
    with both safety numbers, until he has compared the new one and trusts the new account; the
    earlier conversation stays under the name."""
    hank, gina = _first_contact(browser, server, tmp_path, "hank", "gina", "Hi Gina")
    pinned = gina.ok("fingerprint", "hank")[0]["safetyNumber"]

    _delete_account(server, "gina")
    (tmp_path / "new").mkdir()
    new_gina = _cli(tmp_path / "new", server, "gina")
    new_gina.ok("register", "gina")
    new_gina.ok("send", "hank", "It's Gina, I lost my phone")

    hank.page.wait_for_selector("#contacts li:has(.alert) >> text=gina")
    expect(hank.page.locator("#toast")).to_contain_text("dropped")
    hank.select("gina")
    warning = hank.page.locator("#identity-warning")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("different account")
    expect(hank.page.locator("#compose-text")).to_be_disabled()
    assert hank.page.locator("#messages li .text").all_inner_texts() == ["Hi Gina"]
    assert hank.safety_number() == new_gina.ok("fingerprint", "hank")[0]["safetyNumber"]
    assert hank.page.inner_text("#safety-pinned-number") == pinned
    hank.screenshot("4-identity-warning")

    hank.page.click("#trust-identity")
    expect(warning).to_be_hidden()
    hank.send("Welcome back")
    assert [m["text"] for m in new_gina.ok("listen", "--count", "1", "--timeout", "30")] == ["Welcome back"]
    new_gina.ok("send", "hank", "Thanks, it's me")
    assert hank.wait_for_incoming(1) == ["Thanks, it's me"]
    assert hank.page.locator("#messages li .text").all_inner_texts() == ["Hi Gina", "Welcome back", "Thanks, it's me"]
    hank.check_clean()


def test_the_page_reconnects_and_sends_what_waited(browser, tmp_path):
    """The server goes down (killed, as in a crash) and comes back: the page shows it is offline,
    retries with backoff, and on its return sends the message written meanwhile."""
    first = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    port = first.ports["http"]
    ivan, judy = BrowserUser(browser, first, "ivan"), BrowserUser(browser, first, "judy")
    for user in (ivan, judy):
        user.register()
    ivan.open_chat("judy")
    ivan.send("before the restart")
    judy.page.wait_for_selector("#contacts li >> text=ivan")
    first.kill()
    ivan.page.wait_for_selector("#status[data-state=waiting]")
    ivan.send("written while the server was down")
    assert ivan.outgoing_status("written while the server was down") == "pending"
    ivan.screenshot("5-reconnecting")
    again = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--listen", f"tcp:{port}:interface=127.0.0.1")
    again.start()
    try:
        ivan.page.wait_for_selector("#status[data-state=online]", timeout=45_000)
        expect(ivan.page.locator("#messages li.out", has_text="while the server")).not_to_have_attribute("data-status", "pending", timeout=TIMEOUT_MS)
        judy.page.wait_for_selector("#status[data-state=online]", timeout=45_000)
        judy.select("ivan")
        assert judy.wait_for_incoming(2) == ["before the restart", "written while the server was down"]
        # The pages logged the dropped connections as errors; nothing else may have failed.
        for user in (ivan, judy):
            user.problems = [p for p in user.problems if "WebSocket connection" not in p and "ERR_CONNECTION_REFUSED" not in p]
            user.check_clean()
    finally:
        again.stop()
