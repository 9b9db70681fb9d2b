"""HTTP long-polls (GET /v1/messages?wait=S): a few per user, none outliving its client or its
session, and no "delivered" on their account once they are gone."""

from __future__ import annotations

import time
import uuid

import pytest_twisted
import treq
from twisted.internet import defer, reactor, task

from construct.core.delivery import DEFAULT_LONG_POLLS_PER_USER, DeliveryHub
from construct.metrics import Metrics
from tests.helpers import PASSWORD, chat_message, make_bundle, register

NEW_PASSWORD = "AnotherHorse7"


async def _until(predicate, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await task.deferLater(reactor, 0.02, lambda: None)


async def _http_user(http) -> dict:
    """An account used over HTTP only: no live connection holds it."""
    name = f"bob{uuid.uuid4().hex[:8]}"
    status, body = await http.call(
        "POST", "/v1/accounts", {"username": name, "password": PASSWORD, "publicKey": make_bundle()}
    )
    assert status == 201, body
    return {**body, "username": name}


def _poll(http, token: str) -> defer.Deferred:
    return defer.ensureDeferred(http.call("GET", "/v1/messages?wait=60", token=token))


async def _send(alice, a: dict, b: dict) -> str:
    """Alice's ack status for a message to `b`."""
    reply = await alice.request("sendMessage", chat_message(a["userId"], b["userId"]))
    assert reply["type"] == "ack", reply
    return reply["payload"]["status"]


@pytest_twisted.ensureDeferred
async def test_past_the_limit_a_new_long_poll_ends_the_oldest(core, http):
    alice, a = await register(core, "alice")
    b = await _http_user(http)
    polls = []
    for count in range(1, DEFAULT_LONG_POLLS_PER_USER + 1):
        polls.append(_poll(http, b["sessionToken"]))
        await _until(lambda: len(core.hub._polls.get(b["userId"], ())) == count)
    newest = _poll(http, b["sessionToken"])
    # The oldest answers at once, as if its time were up; the others and the newest wait on.
    assert await polls[0].addTimeout(10, reactor) == (200, {"messages": []})
    await _until(lambda: len(core.hub._polls.get(b["userId"], ())) == DEFAULT_LONG_POLLS_PER_USER)
    assert not any(poll.called for poll in polls[1:] + [newest])
    assert await _send(alice, a, b) == "delivered"
    for poll in polls[1:] + [newest]:
        status, body = await poll.addTimeout(10, reactor)
        assert status == 200 and len(body["messages"]) == 1


@pytest_twisted.ensureDeferred
async def test_a_long_poll_whose_client_left_lets_go_of_the_user_at_once(core, http):
    alice, a = await register(core, "alice")
    b = await _http_user(http)
    poll = treq.get(f"{http.base}/v1/messages?wait=60", headers={"Authorization": [f"Bearer {b['sessionToken']}"]})
    await _until(lambda: core.hub.holds(b["userId"]))
    poll.cancel()  # the client closes its connection
    await _until(lambda: not core.hub.holds(b["userId"]))
    # Nobody is waiting for it: the sender is told it waits in the inbox.
    assert await _send(alice, a, b) == "queued"


@pytest_twisted.ensureDeferred
async def test_a_long_poll_ends_when_its_session_is_revoked_and_gets_nothing_after(core, http):
    alice, a = await register(core, "alice")
    b = await _http_user(http)
    poll = _poll(http, b["sessionToken"])
    await _until(lambda: core.hub.holds(b["userId"]))
    # Bob changes his password from another session, which revokes the long-poll's.
    status, other = await http.call("POST", "/v1/sessions", {"username": b["username"], "password": PASSWORD})
    assert status == 200, other
    status, _ = await http.call(
        "PUT", "/v1/accounts/current/password",
        {"oldPassword": PASSWORD, "newPassword": NEW_PASSWORD, "newPasswordConfirm": NEW_PASSWORD},
        token=other["sessionToken"],
    )
    assert status == 204
    status, body = await poll.addTimeout(10, reactor)
    assert (status, body["code"]) == (401, "SESSION_EXPIRED")
    assert not core.hub.holds(b["userId"])
    assert await _send(alice, a, b) == "queued"


@pytest_twisted.ensureDeferred
async def test_a_long_poll_ends_when_its_session_logs_out(core, http):
    b = await _http_user(http)
    poll = _poll(http, b["sessionToken"])
    await _until(lambda: core.hub.holds(b["userId"]))
    status, _ = await http.call("DELETE", "/v1/sessions/current", token=b["sessionToken"])
    assert status == 204
    status, body = await poll.addTimeout(10, reactor)
    assert (status, body["code"]) == (401, "SESSION_EXPIRED")


def test_a_long_poll_revoked_after_it_was_woken_is_marked_before_it_answers():
    """Woken by a message, it reads the inbox; a revocation meanwhile still reaches it, so what
    it read is not sent (the API answers SESSION_EXPIRED), and it stops holding the user."""
    clock = task.Clock()
    hub = DeliveryHub(None, clock, Metrics(), long_polls_per_user=2)
    poll, other = hub.long_poll("u1", "t1", 60), hub.long_poll("u1", "t2", 60)
    hub.on_stored("u1", None, None, {})
    assert poll.woken.result is True and hub.holds("u1")
    hub.on_sessions_revoked("u1", ["t1"])
    assert poll.revoked and not other.revoked and hub.holds("u1")
    hub.end_long_poll(other)
    assert not hub.holds("u1")
    # Its time running out later does nothing.
    clock.advance(60)
    hub.end_long_poll(poll)
    assert not hub.holds("u1")


def test_a_long_poll_times_out_with_false_and_holds_until_it_is_ended():
    clock = task.Clock()
    hub = DeliveryHub(None, clock, Metrics())
    poll = hub.long_poll("u1", "t1", 5)
    clock.advance(5)
    assert poll.woken.result is False and hub.holds("u1")
    hub.end_long_poll(poll)
    assert not hub.holds("u1") and not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_a_long_poll_woken_after_its_session_went_unheard_of_answers_session_expired(core, http):
    """A revocation this instance was not told of (made on another instance, its event still on
    the way): the session is checked again before messages go out."""
    alice, a = await register(core, "alice")
    b = await _http_user(http)
    poll = _poll(http, b["sessionToken"])
    await _until(lambda: core.hub.holds(b["userId"]))
    [waiting] = core.hub._polls[b["userId"]]
    await core.accounts._store.delete_session(waiting.token_hash)
    await _send(alice, a, b)
    status, body = await poll.addTimeout(10, reactor)
    assert (status, body["code"]) == (401, "SESSION_EXPIRED")
