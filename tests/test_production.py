"""Production mode in one process: several instances and a worker on the real Redis and PostgreSQL."""

from __future__ import annotations


import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from construct.core.worker import DeliveryWorker
from construct.errors import ConstructError
from construct.metrics import Metrics
from construct.redis.client import RedisAddress, RedisClient, RedisLeases, ResponseError
from construct.redis.inbox import RedisInbox
from construct.redis.presence import RedisPresence
from construct.redis.wakeups import RedisWakeUps
from construct.tap import build_production
from tests.conftest import REDIS_URL, _delete_keys, kill_redis_connections, make_options
from tests.helpers import PASSWORD, MemoryClient, chat_message, register


@pytest.fixture
def backend():
    return "redis"


def _worker(redis_prefix: str, clock, redelivery_seconds: float = 60) -> tuple[DeliveryWorker, RedisClient]:
    redis = RedisClient(RedisAddress.parse(REDIS_URL), reactor)
    redis.start()
    presence = RedisPresence(redis, redis_prefix, clock)
    wakeups = RedisWakeUps(redis, redis_prefix, presence, "worker-1")
    inbox = RedisInbox(redis, redis_prefix, clock)
    leases = RedisLeases(redis, redis_prefix, "worker-1")
    return DeliveryWorker(inbox, presence.is_online, wakeups, leases, clock, Metrics(), redelivery_seconds), redis


async def _until_connected(redis) -> None:
    for _ in range(300):
        if redis.connected:
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("Redis did not connect")


@pytest_twisted.ensureDeferred
async def test_cross_instance_live_delivery_and_revocation(core_factory):
    """A sender on one instance reaches a recipient on another live; revocations cross instances too."""
    first = await core_factory("instance-a")
    second = await core_factory("instance-b")
    alice, a = await register(first, "alice")
    bob, b = await register(second, "bob")
    message = chat_message(a["userId"], b["userId"])
    ack = await alice.request("sendMessage", message)
    assert ack["payload"]["status"] == "delivered"
    assert (await bob.next())["payload"]["id"] == message["id"]

    bob_elsewhere = MemoryClient(first)
    assert (await bob_elsewhere.request("login", {"username": "bob", "password": PASSWORD}))["type"] == "loginSuccess"
    new = "BatteryStaple42"
    bob_elsewhere.send("changePassword", {"oldPassword": PASSWORD, "newPassword": new, "newPasswordConfirm": new})
    assert (await bob_elsewhere.next_of("changePasswordSuccess")) == {"type": "changePasswordSuccess"}
    assert (await bob.next()) == {"type": "sessionExpired"}


@pytest_twisted.ensureDeferred
async def test_worker_drains_redelivers_and_expires(core_factory, redis_prefix, clock):
    """The worker wakes the holder of a new connection, re-pushes stale unacknowledged messages, expires old ones."""
    instance = await core_factory("instance-a", message_ttl=3600)
    # Below the presence TTL: the fake clock stops the heartbeat, and bob must still count as online.
    worker, redis = _worker(redis_prefix, clock, redelivery_seconds=30)
    await _until_connected(redis)
    try:
        alice, a = await register(instance, "alice")
        bob, b = await register(instance, "bob")
        message = chat_message(a["userId"], b["userId"])
        await alice.request("sendMessage", message)
        assert (await bob.next())["payload"]["id"] == message["id"]

        assert await worker.user_online(b["userId"])
        assert not await worker.user_online(b["userId"]), "a second worker must not drain the same user at once"
        assert await worker.sweep() == (0, 0)
        clock.advance(31)
        assert await worker.sweep() == (0, 1)
        assert (await bob.next())["payload"]["id"] == message["id"]
        assert await worker.sweep() == (0, 0), "at most one redelivery per user per timeout"

        bob.send("ackMessage", {"messageIds": [message["id"]]})
        assert (await bob.request("ping"))["type"] == "pong"
        await bob.request("logout")
        await alice.request("sendMessage", chat_message(a["userId"], b["userId"]))
        clock.advance(3601)
        assert await worker.sweep() == (1, 0)
        assert await worker.sweep() == (0, 0)
    finally:
        await redis.stop()


@pytest_twisted.ensureDeferred
async def test_subscriber_recovers_after_client_kill(core_factory, redis_prefix):
    """After CLIENT KILL the subscriber re-subscribes and rescans: a hint lost meanwhile only delays."""
    first = await core_factory("instance-a")
    second = await core_factory("instance-b")
    alice, a = await register(first, "alice")
    bob, b = await register(second, "bob")
    assert kill_redis_connections(redis_prefix, "subscriber") == 2
    messages = [chat_message(a["userId"], b["userId"], content=f"bTk{i}") for i in range(5)]
    for message in messages:
        reply = await alice.request("sendMessage", message)
        assert reply["type"] in ("ack", "error")
        if reply["type"] == "error":
            assert reply["payload"]["code"] == "SERVICE_UNAVAILABLE"
            assert (await alice.request("sendMessage", message))["type"] == "ack"
    received = [(await bob.next(timeout=15))["payload"]["id"] for _ in messages]
    assert received == [m["id"] for m in messages]


@pytest_twisted.ensureDeferred
async def test_redis_down_means_service_unavailable_not_a_false_ack(database):
    """With Redis unreachable a send is refused with SERVICE_UNAVAILABLE and nothing claims success."""
    options = make_options()
    options["redis"] = RedisAddress.parse("redis://127.0.0.1:1/0")
    core, _, redis, _ = build_production(database, reactor, reactor, options, Metrics(), defer.maybeDeferred)
    redis.start()
    alice = None
    try:
        alice, a = await register(core, "alice")
        reply = await alice.request("sendMessage", chat_message(a["userId"], a["userId"]))
        assert reply["type"] == "error" and reply["payload"]["code"] == "SERVICE_UNAVAILABLE"
        with pytest.raises(ConstructError) as refused:
            await redis.ping()
        assert refused.value.code == "SERVICE_UNAVAILABLE"
    finally:
        # Gone from the hub: its delivery retries (on the real reactor) stop with the test.
        if alice is not None:
            alice.connection.connection_lost()
        await redis.stop()


@pytest_twisted.ensureDeferred
async def test_stores_of_one_turn_are_one_script_call_decided_message_by_message(redis_prefix, monkeypatch):
    """Messages to one recipient in one reactor turn go to Redis as one PUT; each gets the outcome
    it would get alone, in call order: stored, a duplicate of one earlier in the same call, another
    sender's id, the quota; and one ackMessage listing an id twice removes it once."""
    from construct.delivery.types import Submission
    from construct.redis import inbox as inbox_module

    redis = RedisClient(RedisAddress.parse(REDIS_URL), reactor)
    redis.start()
    await _until_connected(redis)
    scripts: list[str] = []
    real_eval = redis.eval

    def counting_eval(script, keys, args):
        scripts.append(script.sha)
        return real_eval(script, keys, args)

    monkeypatch.setattr(redis, "eval", counting_eval)
    try:
        inbox = RedisInbox(redis, redis_prefix, reactor)
        alice, carol, bob, gone = (f"00000000-0000-4000-8000-00000000000{n}" for n in range(4))
        m1, m2, m3, m4 = (f"10000000-0000-4000-8000-00000000000{n}" for n in range(4))
        now_ms, ttl_ms, quota = 1_000_000, 60_000, 3

        def put(sender: str, message_id: str, recipient: str = bob) -> defer.Deferred:
            return inbox.put(Submission(sender, recipient, message_id, f"envelope {message_id}", False, now_ms, ttl_ms, quota, sender))

        one_turn = [put(alice, m1), put(alice, m1), put(carol, m1), put(alice, m2), put(carol, m3), put(alice, m4)]
        outcomes = await defer.DeferredList(one_turn, consumeErrors=True)
        assert scripts == [inbox_module.PUT.sha], "six stores, one script call"
        first, again = outcomes[0][1], outcomes[1][1]
        assert (first.duplicate, first.seq, again.duplicate) == (False, 1, True)
        assert (again.reached, again.expires_at_ms) == (first.reached, first.expires_at_ms) == (False, now_ms + ttl_ms)
        assert outcomes[2][1].value.code == "DUPLICATE_MESSAGE"
        assert (outcomes[3][1].seq, outcomes[4][1].seq) == (2, 3)
        assert outcomes[5][1].value.code == "INBOX_FULL"
        assert [entry.message_id for entry in await inbox.fetch(bob, 0, 10, now_ms)] == [m1, m2, m3]
        assert (await put(alice, m1)).duplicate, "a later turn sees the stored record"

        assert len(await inbox.ack(bob, [m1, m1, m2, m4])) == 2
        assert [entry.message_id for entry in await inbox.fetch(bob, 0, 10, now_ms)] == [m3]

        await inbox.delete_user(gone)
        refused = await defer.DeferredList([put(alice, m1, gone), put(alice, m2, gone)], consumeErrors=True)
        assert [failure.value.code for _, failure in refused] == ["USER_NOT_FOUND", "USER_NOT_FOUND"]
    finally:
        await _delete_keys(redis, redis_prefix)
        await redis.stop()


@pytest_twisted.ensureDeferred
async def test_more_stores_in_one_turn_than_one_script_call_takes_stay_in_order(redis_prefix, monkeypatch):
    """Past PUT_BATCH messages to one recipient in one turn, the turn is split into calls sent in
    order: the recipient's inbox numbers them consecutively in the order they were sent."""
    from construct.delivery.types import Submission
    from construct.redis import inbox as inbox_module

    redis = RedisClient(RedisAddress.parse(REDIS_URL), reactor)
    redis.start()
    await _until_connected(redis)
    calls: list[int] = []
    real_eval = redis.eval

    def counting_eval(script, keys, args):
        if script is inbox_module.PUT:
            calls.append((len(args) - 5) // 4)
        return real_eval(script, keys, args)

    monkeypatch.setattr(redis, "eval", counting_eval)
    try:
        inbox = RedisInbox(redis, redis_prefix, reactor)
        count = inbox_module.PUT_BATCH + 10
        ids = [f"20000000-0000-4000-8000-{n:012d}" for n in range(count)]
        recipient = "00000000-0000-4000-8000-000000000001"
        stores = [
            inbox.put(Submission("00000000-0000-4000-8000-000000000002", recipient, message_id, "e", False,
                                 1_000_000, 60_000, 10_000, "00000000-0000-4000-8000-000000000002"))
            for message_id in ids
        ]
        accepted = [await store for store in stores]
        assert calls == [inbox_module.PUT_BATCH, 10]
        assert [entry.seq for entry in accepted] == list(range(1, count + 1))
        assert [entry.message_id for entry in await inbox.fetch(recipient, 0, count, 1_000_000)] == ids
    finally:
        await _delete_keys(redis, redis_prefix)
        await redis.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_of_plain_commands_answers_in_order_and_fails_with_its_first_error(redis_prefix):
    """execute_batch: every command runs, the replies come in order; an error reply fails the
    batch only once all have answered (the commands after it ran too)."""
    redis = RedisClient(RedisAddress.parse(REDIS_URL), reactor)
    redis.start()
    await _until_connected(redis)
    key, other = f"{redis_prefix}batch", f"{redis_prefix}batch:other"
    try:
        assert await redis.execute_batch([("SET", key, "1"), ("INCR", key), ("GET", key)]) == ["OK", 2, "2"]
        with pytest.raises(ResponseError):
            await redis.execute_batch([("HSET", key, "f", "v"), ("SET", other, "after the error")])
        assert await redis.execute("GET", other) == "after the error"
        await redis.stop()
        with pytest.raises(ConstructError) as refused:
            await redis.execute_batch([("GET", key)])
        assert refused.value.code == "SERVICE_UNAVAILABLE"
    finally:
        if not redis.connected:
            redis.start()
            await _until_connected(redis)
        await _delete_keys(redis, redis_prefix)
        await redis.stop()
