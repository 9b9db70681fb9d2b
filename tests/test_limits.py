"""Rate-limit counters: the same behaviour from the in-memory store and the Redis store.

The memory store runs on a fake clock. Redis keeps real time, so the Redis runs use long
windows where nothing must end and a short one (SHORT) with a real wait where a window must.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from construct.core.limits import Charge, Limit, MemoryCounters
from construct.errors import ConstructError
from construct.redis.client import RedisAddress, RedisClient
from construct.redis.limits import SCRIPTS, RedisCounters
from tests.conftest import REDIS_URL, _delete_keys, until_redis_connected

LONG = 60.0
SHORT = 0.2


class Store:
    """Counters under test, and a way to let time pass for them."""

    def __init__(self, counters, sleep, redis=None, prefix=""):
        self.counters = counters
        self._sleep = sleep
        self.redis = redis
        self.prefix = prefix

    async def wait(self, seconds: float) -> None:
        await self._sleep(seconds)


@pytest_twisted.async_yield_fixture
async def redis_store(redis_prefix):
    """RedisCounters on the real Redis under a prefix of this test's own, deleted afterwards."""
    redis = RedisClient(RedisAddress.parse(REDIS_URL), reactor)
    redis.start()
    try:
        await until_redis_connected(redis)

        async def sleep(seconds: float) -> None:
            # A little more than asked: Redis expires a key only once its PTTL has passed.
            await task.deferLater(reactor, seconds + 0.05, lambda: None)

        yield Store(RedisCounters(redis, redis_prefix, reactor), sleep, redis, redis_prefix)
        await _delete_keys(redis, redis_prefix)
    finally:
        await redis.stop()


@pytest.fixture(params=["memory", "redis"])
def store(request, clock):
    if request.param == "redis":
        return request.getfixturevalue("redis_store")

    async def advance(seconds: float) -> None:
        clock.advance(seconds)

    return Store(MemoryCounters(clock), advance)


async def used(counters, key: str) -> int:
    """Events counted in the key's current window."""
    return (await counters.window(key))[0]


def charge(key: str, count: int, period: float = LONG) -> Charge:
    return Charge(f"{{user-1}}:{key}", Limit(count, period))


@pytest_twisted.ensureDeferred
async def test_under_the_limit_every_take_counts(store):
    """Takes under the limit are allowed and each counts one event on every key."""
    counters = store.counters
    for expected in (1, 2, 3):
        assert await counters.take([charge("send", 3), charge("any", 10)]) is None
        assert await used(counters, "{user-1}:send") == expected
        assert await used(counters, "{user-1}:any") == expected


@pytest_twisted.ensureDeferred
async def test_at_the_limit_a_take_is_refused_with_a_retry_after(store):
    """The take past the limit is refused, counts nothing, and says to wait at most one window."""
    counters = store.counters
    assert await counters.take([charge("send", 2)]) is None
    assert await counters.take([charge("send", 2)]) is None
    for _ in range(3):
        wait = await counters.take([charge("send", 2)])
        assert wait is not None and 0 < wait <= LONG
    assert await used(counters, "{user-1}:send") == 2


@pytest_twisted.ensureDeferred
async def test_a_refused_take_counts_nothing_on_the_other_keys(store):
    """All or nothing: one full key refuses the whole take, and the wait is the longest of the full keys."""
    counters = store.counters
    await counters.take([charge("short", 1, period=1.0), charge("long", 1)])
    wait = await counters.take([charge("free", 5), charge("short", 1, period=1.0), charge("long", 1)])
    assert wait is not None and 1.0 < wait <= LONG
    assert await used(counters, "{user-1}:free") == 0
    assert await used(counters, "{user-1}:short") == 1
    assert await used(counters, "{user-1}:long") == 1
    # A full key still refuses when the other keys are fresh ones.
    assert await counters.take([charge("other", 5), charge("long", 1)]) is not None
    assert await used(counters, "{user-1}:other") == 0


@pytest_twisted.ensureDeferred
async def test_windows_end_and_counting_starts_again(store):
    """When a window ends its key counts from zero, whether it was filled by take or by add."""
    counters = store.counters
    assert await counters.take([charge("send", 1, SHORT)]) is None
    await counters.add([charge("added", 1, SHORT), charge("added", 1, SHORT)])
    wait = await counters.take([charge("send", 1, SHORT)])
    assert wait is not None and 0 < wait <= SHORT
    await store.wait(SHORT)
    assert await used(counters, "{user-1}:send") == 0
    assert await used(counters, "{user-1}:added") == 0
    assert await counters.take([charge("send", 1, SHORT)]) is None
    assert await counters.take([charge("added", 1, SHORT)]) is None
    assert await used(counters, "{user-1}:send") == 1
    assert await used(counters, "{user-1}:added") == 1


@pytest_twisted.ensureDeferred
async def test_add_counts_past_the_limit(store):
    """add() counts on every key without checking, so later takes are refused."""
    counters = store.counters
    for _ in range(3):
        await counters.add([charge("failed-login", 1), charge("failed-any", 5)])
    assert await used(counters, "{user-1}:failed-login") == 3
    assert await used(counters, "{user-1}:failed-any") == 3
    wait = await counters.take([charge("failed-login", 1)])
    assert wait is not None and 0 < wait <= LONG


@pytest_twisted.ensureDeferred
async def test_count_and_clear(store):
    """An unknown key has counted nothing; clear() forgets keys so they count from zero."""
    counters = store.counters
    assert await used(counters, "{user-1}:never") == 0
    await counters.take([charge("a", 1), charge("b", 1), charge("c", 1)])
    await counters.clear(["{user-1}:a", "{user-1}:b", "{user-1}:unknown"])
    await counters.clear([])
    assert [await used(counters, f"{{user-1}}:{key}") for key in "abc"] == [0, 0, 1]
    assert await counters.take([charge("a", 1), charge("b", 1)]) is None
    assert await counters.take([charge("a", 1)]) is not None


@pytest_twisted.ensureDeferred
async def test_window_reports_the_count_and_the_time_left(store):
    """window() is (events, seconds until the window ends), or (0, 0.0) when there is no window."""
    counters = store.counters
    assert await counters.window("{user-1}:send") == (0, 0.0)
    await counters.take([charge("send", 5, 30.0)])
    await counters.add([charge("send", 5, 30.0)])
    used, left = await counters.window("{user-1}:send")
    assert used == 2 and 0 < left <= 30.0
    await counters.add([charge("brief", 5, SHORT)])
    await store.wait(SHORT)
    assert await counters.window("{user-1}:brief") == (0, 0.0)


@pytest_twisted.ensureDeferred
async def test_a_limit_of_zero_or_less_is_off(store):
    """A disabled limit always allows and stores nothing; it neither blocks nor unblocks the others."""
    counters = store.counters
    off, negative = Charge("{user-1}:off", Limit(0, LONG)), Charge("{user-1}:neg", Limit(-1, 0))
    for _ in range(5):
        assert await counters.take([off, negative]) is None
    await counters.add([off, negative])
    assert await counters.take([]) is None
    assert await used(counters, "{user-1}:off") == 0
    assert await used(counters, "{user-1}:neg") == 0
    assert await counters.take([off, charge("on", 1)]) is None
    assert await counters.take([off, charge("on", 1)]) is not None
    assert await used(counters, "{user-1}:on") == 1
    assert await used(counters, "{user-1}:off") == 0


def test_an_enabled_limit_needs_a_positive_period():
    """Limit(1, 0) is refused at once; a disabled limit may have any period."""
    for period in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="period"):
            Limit(1, period)
    assert not Limit(0, 0).enabled and Limit(1, 0.5).enabled


@pytest_twisted.ensureDeferred
async def test_memory_retry_after_follows_the_clock(clock):
    """The retry-after is the time left in the window, rounded up to the millisecond."""
    counters = MemoryCounters(clock)
    await counters.take([charge("send", 1, 10.0)])
    clock.advance(2.0004)
    assert await counters.take([charge("send", 1, 10.0)]) == 8.0
    clock.advance(7.9995)
    assert await counters.take([charge("send", 1, 10.0)]) == 0.001
    assert await counters.window("{user-1}:send") == (1, 0.001)
    clock.advance(0.0001)
    assert await counters.take([charge("send", 1, 10.0)]) is None


@pytest_twisted.ensureDeferred
async def test_memory_store_drops_ended_windows_first_then_the_oldest(clock):
    """When full, ended windows go first; only if none has ended does the oldest window go."""
    counters = MemoryCounters(clock, max_keys=2)
    await counters.take([charge("oldest", 5, LONG)])
    clock.advance(1)
    await counters.take([charge("brief", 5, 1.0)])
    clock.advance(1)
    await counters.take([charge("new", 5, LONG)])  # "brief" has ended: it goes, "oldest" stays
    assert await used(counters, "{user-1}:oldest") == 1
    assert await used(counters, "{user-1}:new") == 1
    await counters.take([charge("newer", 5, LONG)])  # none ended: "oldest" goes
    assert await used(counters, "{user-1}:oldest") == 0
    assert await used(counters, "{user-1}:new") == 1
    assert await used(counters, "{user-1}:newer") == 1
    assert len(counters._windows) == 2


@pytest_twisted.ensureDeferred
async def test_memory_store_stays_bounded_under_churn(clock):
    """Many keys, restarts and clears never hold more than max_keys windows, nor a heap that grows without bound."""
    counters = MemoryCounters(clock, max_keys=10)
    for i in range(5000):
        await counters.take([charge(f"k{i}", 1, LONG), charge("hot", 10**6, 0.5)])
        if i % 3 == 0:
            await counters.clear([f"{{user-1}}:k{i}"])
        clock.advance(0.1)
        assert len(counters._windows) <= 10
        assert len(counters._ends) <= 2 * 10 + 64 + 1
    assert await used(counters, f"{{user-1}}:k{4999}") == 1


@pytest_twisted.ensureDeferred
async def test_redis_keys_are_prefixed_windows_that_always_expire(redis_store):
    """A counter is <prefix>limit:<key> with a PTTL; one found without expiry is given a window."""
    redis, prefix, counters = redis_store.redis, redis_store.prefix, redis_store.counters
    assert {script.sha for script in SCRIPTS} <= {script.sha for script in redis._scripts}
    await counters.take([charge("send", 3)])
    assert await redis.execute("GET", f"{prefix}limit:{{user-1}}:send") == "1"
    assert 0 < await redis.execute("PTTL", f"{prefix}limit:{{user-1}}:send") <= LONG * 1000
    # Counters left without expiry (by hand, or PERSIST): full, under the limit, and added to.
    for key, value in (("full", "5"), ("under", "1"), ("added", "1"), ("read", "3")):
        await redis.execute("SET", f"{prefix}limit:{{user-1}}:{key}", value)
    assert await counters.window("{user-1}:read") == (3, 0.001)
    assert await counters.take([charge("full", 5, 30.0)]) == 30.0
    assert await counters.take([charge("under", 5, 30.0)]) is None
    await counters.add([charge("added", 5, 30.0)])
    for key, expected in (("full", "5"), ("under", "2"), ("added", "2")):
        name = f"{prefix}limit:{{user-1}}:{key}"
        assert await redis.execute("GET", name) == expected
        assert 0 < await redis.execute("PTTL", name) <= 30_000


@pytest_twisted.ensureDeferred
async def test_takes_of_one_turn_are_decided_in_order_as_if_made_one_by_one(store):
    """Several takes at once (Redis sends them as one script): each is all or nothing, in call order."""
    counters = store.counters
    takes = [counters.take([charge("send", 3), charge(f"to-{n % 2}", 2)]) for n in range(5)]
    results = [await taken for taken in takes]
    # to-0 is full after takes 0 and 2, so take 4 is refused; send is full after 0, 1, 2, so take 3 is.
    assert [result is None for result in results] == [True, True, True, False, False]
    assert await used(counters, "{user-1}:send") == 3
    assert (await used(counters, "{user-1}:to-0"), await used(counters, "{user-1}:to-1")) == (2, 1)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_redis_fails_every_take_of_the_batch():
    """The takes batched into one call all fail with it (SERVICE_UNAVAILABLE), none is left waiting."""
    counters = RedisCounters(RedisClient(RedisAddress.parse(REDIS_URL), reactor), "unused:", reactor)
    takes = [counters.take([charge("send", 3)]) for _ in range(3)]
    codes = []
    for taken in takes:
        with pytest.raises(ConstructError) as caught:
            await taken
        codes.append(caught.value.code)
    assert codes == ["SERVICE_UNAVAILABLE"] * 3


@pytest_twisted.ensureDeferred
async def test_give_back_uncounts_one_event_and_never_goes_below_zero(store):
    counters = store.counters
    for _ in range(2):
        await counters.take([charge("login", 5)])
    await counters.give_back([charge("login", 5)])
    assert await used(counters, "{user-1}:login") == 1
    await counters.give_back([charge("login", 5)])
    await counters.give_back([charge("login", 5)])
    assert await used(counters, "{user-1}:login") == 0
    assert await counters.take([charge("login", 5)]) is None
    assert await used(counters, "{user-1}:login") == 1
