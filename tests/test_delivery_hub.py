"""The delivery hub against a scripted inbox and a fake clock: ordering races, decided exactly."""

from __future__ import annotations

import json

from twisted.internet import defer, task

from construct.core.delivery import DeliveryHub
from construct.delivery.types import InboxEntry
from construct.metrics import Metrics


class ScriptedInbox:
    """Each fetch waits until the test answers it."""

    def __init__(self) -> None:
        self.fetches: list[tuple[int, defer.Deferred]] = []

    def fetch(self, user_id: str, after_seq: int, limit: int, now_ms: int) -> defer.Deferred:
        answer: defer.Deferred = defer.Deferred()
        self.fetches.append((after_seq, answer))
        return answer


class Connection:
    def __init__(self) -> None:
        self.pushed: list[str] = []
        self.writable = True

    def push_message(self, message: dict) -> None:
        self.pushed.append(message["id"])

    def session_revoked(self) -> None:
        raise AssertionError("not expected")


def _entry(seq: int) -> InboxEntry:
    envelope = json.dumps({"id": f"m{seq}", "ephemeralPublicKey": ""})
    return InboxEntry(seq, f"m{seq}", envelope)


def test_redelivery_during_a_fetch_is_not_lost():
    """A redeliver arriving while a fetch is in flight restarts from the inbox's start after that fetch."""
    clock = task.Clock()
    clock.advance(100)
    inbox = ScriptedInbox()
    hub = DeliveryHub(inbox, clock, Metrics())
    connection = Connection()
    hub.attach(connection, "bob", "token")
    after, answer = inbox.fetches.pop()
    assert after == 0
    answer.callback([_entry(1), _entry(2)])
    assert connection.pushed == ["m1", "m2"]

    hub.on_pending("bob")
    after, in_flight = inbox.fetches.pop()
    assert after == 2
    hub.redeliver("bob", attached_before=clock.seconds() + 1)
    in_flight.callback([_entry(3)])
    # The batch fetched before the redelivery is dropped; the next fetch starts over.
    after, answer = inbox.fetches.pop()
    assert after == 0
    answer.callback([_entry(1), _entry(2), _entry(3)])
    assert connection.pushed == ["m1", "m2", "m1", "m2", "m3"]
    assert inbox.fetches == []


def test_redelivery_spares_connections_attached_after_the_cutoff():
    """Only connections attached before the cutoff can have held a message that long."""
    clock = task.Clock()
    inbox = ScriptedInbox()
    hub = DeliveryHub(inbox, clock, Metrics())
    old, new = Connection(), Connection()
    hub.attach(old, "bob", "token")
    inbox.fetches.pop()[1].callback([])
    clock.advance(60)
    hub.attach(new, "bob", "token")
    inbox.fetches.pop()[1].callback([])
    hub.redeliver("bob", attached_before=30)
    assert [after for after, _ in inbox.fetches] == [0]
    inbox.fetches.pop()[1].callback([_entry(1)])
    assert (old.pushed, new.pushed) == (["m1"], [])


def test_a_stored_message_goes_straight_to_a_caught_up_connection_and_never_out_of_order():
    """A connection that pushed everything up to the message's predecessor gets it without a fetch;
    one behind, or still fetching, or with no place in the inbox (None) reads it from the inbox."""
    clock = task.Clock()
    inbox = ScriptedInbox()
    hub = DeliveryHub(inbox, clock, Metrics())
    connection = Connection()
    hub.attach(connection, "bob", "token")
    in_flight = inbox.fetches.pop()[1]
    hub.on_stored("bob", 1, 0, {"id": "m1"})
    assert connection.pushed == [], "a fetch is in flight: it, not the sender, delivers m1"
    in_flight.callback([_entry(1)])
    assert connection.pushed == ["m1"]
    inbox.fetches.pop()[1].callback([])  # the fetch the store asked for finds nothing newer

    hub.on_stored("bob", 2, 1, {"id": "m2"})
    assert connection.pushed == ["m1", "m2"] and inbox.fetches == []

    hub.on_stored("bob", 4, 3, {"id": "m4"})  # seq 3 was stored by another instance
    assert connection.pushed == ["m1", "m2"]
    after, answer = inbox.fetches.pop()
    assert after == 2
    answer.callback([_entry(3), _entry(4)])
    assert connection.pushed == ["m1", "m2", "m3", "m4"]

    hub.on_stored("bob", 9, 7, {"id": "m9"})  # numbered with gaps (SQL): 7 is the last before it
    assert connection.pushed == ["m1", "m2", "m3", "m4"]
    after, answer = inbox.fetches.pop()
    assert after == 4
    answer.callback([_entry(7), _entry(9)])
    assert connection.pushed == ["m1", "m2", "m3", "m4", "m7", "m9"]

    hub.on_stored("bob", 12, 9, {"id": "m12"})
    assert connection.pushed[-1] == "m12" and inbox.fetches == [], "9 was the last before it: no gap to fill"
    hub.on_stored("bob", 12, 9, {"id": "m12"})
    assert connection.pushed.count("m12") == 1, "a connection already past a message is not handed it again"

    hub.on_stored("bob", None, None, {"id": "m13"})
    assert connection.pushed[-1] == "m12" and [after for after, _ in inbox.fetches] == [12]
