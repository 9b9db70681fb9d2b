"""Abuse limits through the core on every backend (memory counters in embedded mode, Redis in
production), and the per-connection limits of ClientConnection on a fake clock."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, task

from construct.core.limits import Limit
from construct.protocol.timeouts import AUTH_TIMEOUT, IDLE, STOPPED_READING, ConnectionLimits
from tests.helpers import PASSWORD, MemoryClient, b64, chat_message, error_reply, make_bundle, register

WRONG = "Wrong-password-42"


def _rate_limited(error: dict, most_seconds: float) -> None:
    assert error["code"] == "RATE_LIMITED", error
    assert isinstance(error["retryAfter"], int) and 1 <= error["retryAfter"] <= most_seconds, error


async def _login(core, username: str, password: str, address: str) -> dict:
    client = MemoryClient(core, address=address)
    return await client.request("login", {"username": username, "password": password})


# Messages


@pytest_twisted.ensureDeferred
async def test_messages_per_sender_and_per_recipient_are_limited_and_nothing_is_stored_past_them(core_factory):
    core = await core_factory(limit_messages=Limit(5, 60), limit_messages_per_recipient=Limit(3, 60))
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    carol, c = await register(core, "carol")
    for _ in range(3):
        assert (await alice.request("sendMessage", chat_message(a["userId"], b["userId"])))["type"] == "ack"
    refused = chat_message(a["userId"], b["userId"])
    _rate_limited(await error_reply(alice, "sendMessage", refused), 60)
    # Another recipient still has room under the sender's own limit (5), until that is spent too.
    for _ in range(2):
        assert (await alice.request("sendMessage", chat_message(a["userId"], c["userId"])))["type"] == "ack"
    _rate_limited(await error_reply(alice, "sendMessage", chat_message(a["userId"], c["userId"])), 60)
    # Bob is not limited by Alice's sending.
    bob.send("sendMessage", chat_message(b["userId"], a["userId"]))
    frames = [await bob.next() for _ in range(4)]
    assert sorted(frame["type"] for frame in frames) == ["ack", "message", "message", "message"]
    assert refused["id"] not in {frame["payload"].get("id") for frame in frames}


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_a_message_limit_window_ends_and_sending_resumes(core_factory, clock):
    core = await core_factory(limit_messages=Limit(2, 60))
    alice, a = await register(core, "alice")
    _, b = await register(core, "bob")
    for _ in range(2):
        await alice.request("sendMessage", chat_message(a["userId"], b["userId"]))
    error = await error_reply(alice, "sendMessage", chat_message(a["userId"], b["userId"]))
    _rate_limited(error, 60)
    clock.advance(error["retryAfter"])
    assert (await alice.request("sendMessage", chat_message(a["userId"], b["userId"])))["type"] == "ack"


# Registrations and keys


@pytest_twisted.ensureDeferred
async def test_registrations_per_address(core_factory):
    core = await core_factory(limit_registrations=Limit(2, 3600))

    async def attempt(name: str, address: str) -> dict:
        client = MemoryClient(core, address=address)
        return await client.request("register", {"username": name, "password": PASSWORD, "publicKey": make_bundle()})

    assert (await attempt("first", "198.51.100.1"))["type"] == "registerSuccess"
    # A taken name counts too: each attempt costs a hash, and probing names is what is limited.
    assert (await attempt("first", "198.51.100.1"))["payload"]["code"] == "USERNAME_TAKEN"
    _rate_limited((await attempt("third", "198.51.100.1"))["payload"], 3600)
    assert (await attempt("third", "198.51.100.2"))["type"] == "registerSuccess"


@pytest_twisted.ensureDeferred
async def test_key_fetches_per_requester_and_target(core_factory):
    core = await core_factory(limit_key_fetches=Limit(2, 3600))
    alice, a = await register(core, "alice")
    carol, _ = await register(core, "carol")
    _, b = await register(core, "bob")
    for _ in range(2):
        assert (await alice.request("getPublicKey", {"userId": b["userId"]}))["type"] == "publicKeyBundle"
    _rate_limited(await error_reply(alice, "getPublicKey", {"userId": b["userId"]}), 3600)
    # Other requesters, and Alice's own bundle, are not affected.
    assert (await carol.request("getPublicKey", {"userId": b["userId"]}))["type"] == "publicKeyBundle"
    assert (await alice.request("getPublicKey", {"userId": a["userId"]}))["type"] == "publicKeyBundle"


@pytest_twisted.ensureDeferred
async def test_sender_checks_have_their_own_limit_and_spend_nothing_of_the_key_fetch_budget(core_factory):
    """Bundles read without a one-time prekey (a client checking who sent a message) count on
    their own per-requester limit: a stranger who makes a client check them many times cannot
    use up that client's fetches of them, which it needs to start a session."""
    core = await core_factory(limit_key_fetches=Limit(2, 3600), limit_bundle_checks=Limit(40, 3600))
    alice, _ = await register(core, "alice")
    _, m = await register(core, "mallory")
    _, b = await register(core, "bob")
    for _ in range(31):
        reply = await alice.request("getPublicKey", {"userId": m["userId"], "oneTimePrekey": False})
        assert reply["type"] == "publicKeyBundle"
    for _ in range(2):
        assert (await alice.request("getPublicKey", {"userId": m["userId"]}))["type"] == "publicKeyBundle"
    for _ in range(9):
        assert (await alice.request("getPublicKey", {"userId": b["userId"], "oneTimePrekey": False}))["type"] == (
            "publicKeyBundle"
        )
    _rate_limited(await error_reply(alice, "getPublicKey", {"userId": b["userId"], "oneTimePrekey": False}), 3600)


@pytest_twisted.ensureDeferred
async def test_key_fetches_per_requester_bound_made_up_targets_too(core_factory):
    """Asking for made-up users counts too: no one can create counters without bound."""
    core = await core_factory(limit_key_fetches_by_user=Limit(3, 3600))
    alice, _ = await register(core, "alice")
    for _ in range(3):
        assert (await error_reply(alice, "getPublicKey", {"userId": str(uuid.uuid4())}))["code"] == "USER_NOT_FOUND"
    _rate_limited(await error_reply(alice, "getPublicKey", {"userId": str(uuid.uuid4())}), 3600)


@pytest_twisted.ensureDeferred
async def test_one_time_prekeys_cannot_be_drained_past_the_budget(core_factory):
    """Past the owner's budget, bundles come without a one-time prekey and the pool keeps the rest."""
    core = await core_factory(limit_prekeys_served=Limit(2, 3600))
    bob, b = await register(core, "bob")
    prekeys = [{"keyId": i, "publicKey": b64(os.urandom(32))} for i in range(5)]
    assert (await bob.request("uploadPrekeys", {"prekeys": prekeys}))["payload"]["count"] == 5
    served = []
    for name in ("mallory1", "mallory2", "mallory3", "mallory4"):
        client, _ = await register(core, name)
        reply = await client.request("getPublicKey", {"userId": b["userId"]})
        assert reply["type"] == "publicKeyBundle"
        served.append(reply["payload"].get("oneTimePrekey"))
    assert [prekey is not None for prekey in served] == [True, True, False, False]
    assert (await bob.request("getPrekeyCount", {}))["payload"]["count"] == 3


@pytest_twisted.ensureDeferred
async def test_one_time_prekeys_are_budgeted_per_requester_and_pair_so_sybils_leave_some_for_an_honest_contact(
    core_factory,
):
    """A few accounts cannot take an owner's whole budget: each gets its share per pair (then
    bundles without a one-time prekey, never a refusal), and a first contact still gets one."""
    core = await core_factory(limit_prekeys_served=Limit(10, 3600), limit_prekeys_taken_per_user=Limit(2, 3600))
    bob, b = await register(core, "bob")
    prekeys = [{"keyId": i, "publicKey": b64(os.urandom(32))} for i in range(20)]
    assert (await bob.request("uploadPrekeys", {"prekeys": prekeys}))["payload"]["count"] == 20
    for name in ("sybil1", "sybil2", "sybil3"):
        sybil, _ = await register(core, name)
        served = []
        for _ in range(5):
            reply = await sybil.request("getPublicKey", {"userId": b["userId"]})
            assert reply["type"] == "publicKeyBundle", reply
            served.append("oneTimePrekey" in reply["payload"])
        assert served == [True, True, False, False, False]
    honest, _ = await register(core, "honest")
    assert "oneTimePrekey" in (await honest.request("getPublicKey", {"userId": b["userId"]}))["payload"]
    assert (await bob.request("getPrekeyCount", {}))["payload"]["count"] == 13


@pytest_twisted.ensureDeferred
async def test_one_time_prekeys_one_user_takes_of_anyone_are_budgeted(core_factory):
    core = await core_factory(limit_prekeys_taken=Limit(2, 3600))
    mallory, _ = await register(core, "mallory")
    targets = []
    for name in ("bob", "carol", "dave"):
        owner, payload = await register(core, name)
        await owner.request("uploadPrekeys", {"prekeys": [{"keyId": 1, "publicKey": b64(os.urandom(32))}]})
        targets.append(payload["userId"])
    served = [
        "oneTimePrekey" in (await mallory.request("getPublicKey", {"userId": target}))["payload"] for target in targets
    ]
    assert served == [True, True, False]
    # What Mallory was refused is still there for others.
    other, _ = await register(core, "erin")
    assert "oneTimePrekey" in (await other.request("getPublicKey", {"userId": targets[2]}))["payload"]


# Username lookups


@pytest_twisted.ensureDeferred
async def test_lookups_are_limited_per_user_and_per_address(core_factory):
    """Many probes of names are refused with RATE_LIMITED: per user, and per address across accounts."""
    core = await core_factory(limit_lookups=Limit(3, 3600), limit_lookups_per_address=Limit(5, 3600))
    alice, _ = await register(core, "alice")
    bob, _ = await register(core, "bob")
    names = iter(f"probe{i}" for i in range(100))
    for _ in range(3):
        assert (await error_reply(alice, "lookupUser", {"username": next(names)}))["code"] == "USER_NOT_FOUND"
    _rate_limited(await error_reply(alice, "lookupUser", {"username": "bob"}), 3600)
    # Bob, from the same address (every MemoryClient's), has what the address has left: two.
    assert (await bob.request("lookupUser", {"username": "alice"}))["type"] == "userFound"
    assert (await error_reply(bob, "lookupUser", {"username": next(names)}))["code"] == "USER_NOT_FOUND"
    _rate_limited(await error_reply(bob, "lookupUser", {"username": "alice"}), 3600)
    # Bob from another address still has his own limit's room: the refusals counted nothing.
    elsewhere = MemoryClient(core, address="198.51.100.20")
    assert (await elsewhere.request("login", {"username": "bob", "password": PASSWORD}))["type"] == "loginSuccess"
    assert (await elsewhere.request("lookupUser", {"username": "alice"}))["type"] == "userFound"
    _rate_limited(await error_reply(elsewhere, "lookupUser", {"username": "alice"}), 3600)


# Logins


@pytest_twisted.ensureDeferred
async def test_failed_logins_slow_the_address_but_the_owner_gets_in_from_elsewhere(core_factory):
    core = await core_factory(limit_login_failures_per_account=Limit(3, 900))
    await register(core, "alice")
    for _ in range(3):
        assert (await _login(core, "alice", WRONG, "203.0.113.9"))["payload"]["code"] == "INVALID_CREDENTIALS"
    # Refused before the password is looked at: even the right one, from that address.
    _rate_limited((await _login(core, "alice", PASSWORD, "203.0.113.9"))["payload"], 900)
    assert (await _login(core, "ALICE", PASSWORD, "198.51.100.7"))["type"] == "loginSuccess"


@pytest_twisted.ensureDeferred
async def test_concurrent_guesses_cannot_all_pass_the_check_before_any_failed(core_factory):
    """Each attempt is counted before its password is checked, atomically: of twelve wrong
    guesses sent at once, only the five the limit allows reach the password check."""
    core = await core_factory(limit_login_failures_per_account=Limit(5, 900))
    await register(core, "alice")
    guesses = [defer.ensureDeferred(_login(core, "alice", WRONG, "203.0.113.9")) for _ in range(12)]
    codes = sorted(reply["payload"]["code"] for reply in [await guess for guess in guesses])
    assert codes == ["INVALID_CREDENTIALS"] * 5 + ["RATE_LIMITED"] * 7


@pytest_twisted.ensureDeferred
async def test_failed_logins_per_address_cover_every_account(core_factory):
    core = await core_factory(limit_login_failures=Limit(3, 900))
    await register(core, "alice")
    for name in ("alice", "bob", "nobody"):
        assert (await _login(core, name, WRONG, "203.0.113.9"))["payload"]["code"] == "INVALID_CREDENTIALS"
    _rate_limited((await _login(core, "alice", PASSWORD, "203.0.113.9"))["payload"], 900)
    assert (await _login(core, "alice", PASSWORD, "203.0.113.10"))["type"] == "loginSuccess"


@pytest_twisted.ensureDeferred
async def test_an_account_under_attack_gives_each_address_one_try_and_never_locks_the_owner_out(core_factory):
    core = await core_factory(
        limit_login_failures_account_wide=Limit(3, 3600), limit_login_failures_per_account=Limit(5, 900)
    )
    await register(core, "alice")
    for host in range(1, 4):
        assert (await _login(core, "alice", WRONG, f"203.0.113.{host}"))["payload"]["code"] == "INVALID_CREDENTIALS"
    # The account is now hot: an address that already failed on it must wait ...
    _rate_limited((await _login(core, "alice", WRONG, "203.0.113.1"))["payload"], 900)
    # ... a fresh address gets one try, and only one ...
    assert (await _login(core, "alice", WRONG, "203.0.113.50"))["payload"]["code"] == "INVALID_CREDENTIALS"
    _rate_limited((await _login(core, "alice", PASSWORD, "203.0.113.50"))["payload"], 900)
    # ... and the owner, from a fresh address, gets in with the right password.
    assert (await _login(core, "alice", PASSWORD, "198.51.100.7"))["type"] == "loginSuccess"


@pytest_twisted.ensureDeferred
async def test_a_stolen_session_gives_no_extra_guesses_at_the_password(core_factory):
    """changePassword and deleteAccount check the password under the login limits."""
    core = await core_factory(limit_login_failures_per_account=Limit(2, 900))
    alice, _ = await register(core, "alice")
    change = {"oldPassword": WRONG, "newPassword": "Another-password-7", "newPasswordConfirm": "Another-password-7"}
    assert (await error_reply(alice, "changePassword", change))["code"] == "INVALID_PASSWORD"
    assert (await error_reply(alice, "deleteAccount", {"password": WRONG}))["code"] == "INVALID_PASSWORD"
    _rate_limited(await error_reply(alice, "deleteAccount", {"password": PASSWORD}), 900)
    # The login form from that address is refused too; the account is intact.
    _rate_limited((await _login(core, "alice", PASSWORD, "192.0.2.1"))["payload"], 900)
    assert (await _login(core, "alice", PASSWORD, "198.51.100.7"))["type"] == "loginSuccess"


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_a_successful_login_forgets_that_address_s_failures_on_the_account(core_factory):
    core = await core_factory(limit_login_failures_per_account=Limit(3, 900))
    await register(core, "alice")
    for _ in range(2):
        await _login(core, "alice", WRONG, "203.0.113.9")
    assert (await _login(core, "alice", PASSWORD, "203.0.113.9"))["type"] == "loginSuccess"
    for _ in range(2):
        assert (await _login(core, "alice", WRONG, "203.0.113.9"))["payload"]["code"] == "INVALID_CREDENTIALS"


@pytest_twisted.ensureDeferred
async def test_successful_logins_are_limited_per_account_and_address_too(core_factory):
    """Every password check costs a hash: right ones count as well as wrong ones."""
    core = await core_factory(limit_password_checks_per_account=Limit(3, 900))
    await register(core, "alice")
    for _ in range(3):
        assert (await _login(core, "alice", PASSWORD, "203.0.113.9"))["type"] == "loginSuccess"
    _rate_limited((await _login(core, "alice", PASSWORD, "203.0.113.9"))["payload"], 900)
    assert (await _login(core, "alice", PASSWORD, "198.51.100.7"))["type"] == "loginSuccess"


@pytest_twisted.ensureDeferred
async def test_password_checks_per_address_cover_every_account_right_or_wrong(core_factory):
    """A client logging in to its own accounts, again and again, is held to its address's limit."""
    core = await core_factory(limit_password_checks=Limit(4, 900))
    for name in ("sybil1", "sybil2"):
        await register(core, name)
    for name in ("sybil1", "sybil2", "sybil1", "sybil2"):
        assert (await _login(core, name, PASSWORD, "203.0.113.9"))["type"] == "loginSuccess"
    _rate_limited((await _login(core, "sybil1", PASSWORD, "203.0.113.9"))["payload"], 900)
    _rate_limited((await _login(core, "nobody", WRONG, "203.0.113.9"))["payload"], 900)
    assert (await _login(core, "sybil1", PASSWORD, "203.0.113.10"))["type"] == "loginSuccess"


@pytest_twisted.ensureDeferred
async def test_change_password_and_delete_account_password_checks_count_as_logins(core_factory):
    core = await core_factory(limit_password_checks_per_account=Limit(2, 900))
    alice, _ = await register(core, "alice")
    address = "192.0.2.1"  # the registering MemoryClient's
    assert (await _login(core, "alice", PASSWORD, address))["type"] == "loginSuccess"
    change = {"oldPassword": PASSWORD, "newPassword": "Another-password-7", "newPasswordConfirm": "Another-password-7"}
    assert (await alice.request("changePassword", change))["type"] == "changePasswordSuccess"
    _rate_limited(await error_reply(alice, "deleteAccount", {"password": "Another-password-7"}), 900)
    assert (await _login(core, "alice", "Another-password-7", "198.51.100.7"))["type"] == "loginSuccess"


@pytest_twisted.ensureDeferred
async def test_live_sessions_per_user_are_capped_and_a_login_past_the_cap_ends_the_oldest(core_factory, clock):
    core = await core_factory(max_sessions_per_user=2)
    first, a = await register(core, "alice")
    tokens = [a["sessionToken"]]
    for _ in range(2):
        clock.advance(1)
        tokens.append((await _login(core, "alice", PASSWORD, "198.51.100.7"))["payload"]["sessionToken"])
    # The registering connection's session was the oldest: it is told, and its token is gone.
    assert (await first.next_of("sessionExpired"))["type"] == "sessionExpired"
    replies = [await MemoryClient(core).request("connect", {"sessionToken": token}) for token in tokens]
    assert [reply["type"] for reply in replies] == ["sessionExpired", "connectSuccess", "connectSuccess"]


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_http_answers_429_with_retry_after(http):
    # The `http` fixture serves a core with the default limits: 5 failures per account and address.
    for _ in range(5):
        status, body = await http.call("POST", "/v1/sessions", {"username": "alice", "password": WRONG})
        assert status == 401, body
    response = await treq.post(http.base + "/v1/sessions", json={"username": "alice", "password": WRONG})
    body = await response.json()
    assert response.code == 429 and body["code"] == "RATE_LIMITED" and 1 <= body["retryAfter"] <= 900
    assert response.headers.getRawHeaders("retry-after") == [str(body["retryAfter"])]


# Connections (one instance, fake clock)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_connections_per_user(core_factory):
    core = await core_factory()
    limits = ConnectionLimits(per_user=2)
    _, alice = await register(core, "alice")
    token = alice["sessionToken"]
    clients = [MemoryClient(core, limits=limits) for _ in range(3)]
    # The registering connection is one of Alice's two.
    assert (await clients[0].request("connect", {"sessionToken": token}))["type"] == "connectSuccess"
    _rate_limited(await error_reply(clients[1], "connect", {"sessionToken": token}), 60)
    # Authenticating again on a connection already hers does not count twice.
    assert (await clients[0].request("connect", {"sessionToken": token}))["type"] == "connectSuccess"
    clients[0].close()
    assert (await clients[2].request("connect", {"sessionToken": token}))["type"] == "connectSuccess"


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_auth_idle_and_slow_client_deadlines(core_factory):
    core = await core_factory()
    clock = task.Clock()
    clock.advance(1000)
    limits = ConnectionLimits(auth_timeout=60, idle_timeout=300, slow_client_timeout=30)
    client = MemoryClient(core, limits=limits, clock=clock)
    connection = client.connection
    clock.advance(61)
    assert connection.overdue(clock.seconds(), pings=True) == AUTH_TIMEOUT
    _, alice = await register(core, "alice")
    assert (await client.request("connect", {"sessionToken": alice["sessionToken"]}))["type"] == "connectSuccess"
    assert connection.overdue(clock.seconds(), pings=True) is None
    clock.advance(301)
    # Idle counts only where the transport has no pings of its own (TCP).
    assert connection.overdue(clock.seconds(), pings=False) == IDLE
    assert connection.overdue(clock.seconds(), pings=True) is None
    connection.pauseProducing()
    clock.advance(29)
    assert connection.overdue(clock.seconds(), pings=True) is None
    connection.resumeProducing()
    connection.pauseProducing()
    clock.advance(31)
    assert connection.overdue(clock.seconds(), pings=True) == STOPPED_READING


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_not_read_and_not_pushed_to_until_it_reads_again(core_factory):
    """Backpressure: while the transport says the client is not reading, the server reads none
    of its requests and holds its pushes in the inbox; then everything comes, in order."""
    core = await core_factory()
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    connection = bob.connection
    connection.pauseProducing()
    assert not bob.reading and not connection.writable
    sent = [chat_message(a["userId"], b["userId"]) for _ in range(5)]
    for message in sent:
        assert (await alice.request("sendMessage", message))["type"] == "ack"
    assert bob.pending() == []
    connection.resumeProducing()
    assert bob.reading
    received = [(await bob.next_of("message"))["payload"]["id"] for _ in sent]
    assert received == [message["id"] for message in sent]


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_a_connection_is_cut_off_once_too_much_waits_unread(core_factory):
    """What is still written to a stalled connection (replies to requests read before the stall)
    is bounded: past the allowance the connection is dropped; its messages wait in the inbox."""
    core = await core_factory()
    alice, a = await register(core, "alice")
    bob, b = await register(core, "bob")
    await alice.request("sendMessage", chat_message(a["userId"], b["userId"]))
    bob.connection.pauseProducing()
    # MemoryClient frames go up to 256 KB, so the allowance is 2 MB.
    big = {"id": "x", "content": "y" * 64 * 1024}
    for _ in range(40):
        bob.connection.push_message(big)
        if bob.closed:
            break
    assert bob.closed
    again = MemoryClient(core)
    assert (await again.request("connect", {"sessionToken": b["sessionToken"]}))["type"] == "connectSuccess"
    assert (await again.next_of("message"))["payload"]["from"] == a["userId"]


def test_limits_count_ipv4_as_is_and_ipv6_by_its_64_prefix():
    """A host that rotates through its IPv6 /64, or writes its IPv4 address IPv4-mapped, is one client."""
    from twisted.internet.address import IPv4Address, IPv6Address

    from construct.protocol.connection import client_address

    assert client_address(IPv4Address("TCP", "203.0.113.5", 4000)) == "203.0.113.5"
    assert client_address(IPv6Address("TCP", "::ffff:203.0.113.5", 4000)) == "203.0.113.5"
    assert client_address(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 4000)) == client_address(
        IPv6Address("TCP", "2001:db8:1:2:bbbb:cccc:dddd:eeee", 4000)
    ) == "2001:db8:1:2::/64"
    assert client_address(IPv6Address("TCP", "2001:db8:1:3::1", 4000)) != "2001:db8:1:2::/64"


def test_limit_and_origin_options_parse_as_documented_and_refuse_the_rest():
    """COUNT/SECONDS or 0; origins get their scheme's default port; anything else is one line naming the option."""
    from construct.tap import Options

    options = Options(environ={"CONSTRUCT_LIMIT_MESSAGES": "120/30"})
    options.parseOptions(["--limit-registrations", "0", "--allowed-origins", "https://chat.example.org, http://*.example.net:8080"])
    assert options["limit-messages"] == Limit(120, 30)
    assert not options["limit-registrations"].enabled
    assert options["allowed-origins"] == ["https://chat.example.org:443", "http://*.example.net:8080"]
    for bad in ("many", "10/x", "-1/60", "10/0", "10/9999999", "5"):
        with pytest.raises(SystemExit, match="--limit-messages must be COUNT/SECONDS"):
            Options(environ={}).parseOptions(["--limit-messages", bad])
    with pytest.raises(SystemExit, match="such as 5/60 .a count alone has no period"):
        Options(environ={}).parseOptions(["--limit-messages", "5"])
    with pytest.raises(SystemExit, match="--allowed-origins must be comma-separated origin patterns"):
        Options(environ={}).parseOptions(["--allowed-origins", "https://a.example,,"])
