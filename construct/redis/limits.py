"""Rate-limit counters in Redis (production mode), shared by every instance.

Same contract as `construct.core.limits.MemoryCounters`. A window is one key,

    <prefix>limit:<key>   STRING  events counted, with a PEXPIRE of the window's length

set when the first event creates it, so the window ends when the key expires and PTTL is the
retry-after. Each method is one script, so a take is all or nothing across instances. A
counter must never be left without an expiry (it would refuse for good), so a script that
meets one (PTTL -1: written by hand, PERSISTed) gives it a fresh window.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from construct.core.limits import Charge
from construct.redis.client import RedisClient, Script, TurnBatches, fail_unanswered

# Takes in groups, in order, each all or nothing; a key may appear in several groups (one
# sender's messages of one reactor turn). KEYS: every group's counters, group after group;
# ARGV: the number of groups, the size of each, then (count, window ms) of each key in pairs.
# Returns, per group, 0 when counted, else the milliseconds until the latest-ending full window
# of the group ends (at least 1). Each distinct key is read once and written once, whatever
# the number of groups: the decisions are made on a copy in Lua, in order.
TAKE = Script("""
local groups = tonumber(ARGV[1])
local results, counters = {}, {}
local first = 1
for g = 1, groups do
  local last = first + tonumber(ARGV[1 + g]) - 1
  local wait = 0
  for i = first, last do
    local counter = counters[KEYS[i]]
    if not counter then
      local ttl = redis.call('PTTL', KEYS[i])
      if ttl == -1 then
        ttl = tonumber(ARGV[groups + 2 * i + 1])
        redis.call('PEXPIRE', KEYS[i], ttl)
      end
      counter = {ttl = ttl, used = tonumber(redis.call('GET', KEYS[i]) or '0'), added = 0, new = false}
      counters[KEYS[i]] = counter
    end
    if counter.ttl >= 0 and counter.used >= tonumber(ARGV[groups + 2 * i]) then
      wait = math.max(wait, counter.ttl, 1)
    end
  end
  if wait == 0 then
    for i = first, last do
      local counter = counters[KEYS[i]]
      if counter.used == 0 then
        counter.new, counter.ttl = true, tonumber(ARGV[groups + 2 * i + 1])
      end
      counter.used, counter.added = counter.used + 1, counter.added + 1
    end
  end
  results[g] = wait
  first = last + 1
end
for key, counter in pairs(counters) do
  if counter.added > 0 then
    redis.call('INCRBY', key, counter.added)
    if counter.new then redis.call('PEXPIRE', key, counter.ttl) end
  end
end
return results
""")

# KEYS: the counters; ARGV: the window ms of each.
ADD = Script("""
for i, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 or redis.call('PTTL', key) == -1 then
    redis.call('PEXPIRE', key, ARGV[i])
  end
end
return 0
""")

# A counter without expiry (PTTL -1) reports 1 ms: its period is not known here, and the
# next take or add on it gives it a window.
WINDOW = Script("""
local used = redis.call('GET', KEYS[1])
if not used then return {0, 0} end
return {tonumber(used), math.max(redis.call('PTTL', KEYS[1]), 1)}
""")

# KEYS: the counters. A window that falls back to zero is deleted (its next event starts one).
GIVE_BACK = Script("""
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 and redis.call('DECR', key) < 1 then redis.call('DEL', key) end
end
return 0
""")

CLEAR = Script("""
for _, key in ipairs(KEYS) do redis.call('DEL', key) end
return 0
""")

# For the composition root's `redis.preload(*SCRIPTS)` (RedisCounters also preloads them).
SCRIPTS = (TAKE, ADD, WINDOW, GIVE_BACK, CLEAR)


def _window_ms(period: float) -> int:
    return max(1, round(period * 1000))


class RedisCounters:
    """Counters under `<prefix>limit:`; a call with only disabled limits sends nothing.

    The takes of one reactor turn that share a hash tag (one sender's pipelined messages) go to
    Redis as one script call, in the order they were made: the same outcome as one call each,
    at a fraction of the cost per message.
    """

    def __init__(self, redis: RedisClient, prefix: str, reactor: IReactorTime) -> None:
        self._redis = redis
        self._prefix = prefix
        # The takes of this reactor turn, by hash tag, in call order.
        self._batches = TurnBatches(reactor, self._take_batch)
        redis.preload(*SCRIPTS)

    def _key(self, key: str) -> str:
        return f"{self._prefix}limit:{key}"

    def take(self, charges: Sequence[Charge]) -> Deferred:
        """Count one event on every key, or on none if any key is at its limit.

        Fires with None when counted, else the seconds until the latest-ending full window ends.
        """
        charges = [charge for charge in charges if charge.limit.enabled]
        if not charges:
            return succeed(None)
        taken: Deferred = Deferred()
        self._batches.add(charges[0].key.partition("}")[0], (charges, taken))
        return taken

    def _take_batch(self, tag: str, batch: list[tuple[list[Charge], Deferred]]) -> None:
        keys = [self._key(charge.key) for charges, _ in batch for charge in charges]
        args = [len(batch), *(len(charges) for charges, _ in batch)]
        args += [value for charges, _ in batch for charge in charges
                 for value in (charge.limit.count, _window_ms(charge.limit.period))]
        try:
            taking = ensureDeferred(self._redis.eval(TAKE, keys, args))
        except Exception:
            taking = fail()
        taking.addCallback(self._taken, batch).addErrback(fail_unanswered, batch)

    @staticmethod
    def _taken(waits: list[int], batch: list[tuple[list[Charge], Deferred]]) -> None:
        if len(waits) != len(batch):
            raise ValueError(f"TAKE answered {len(waits)} of {len(batch)} takes")
        for (_, taken), wait_ms in zip(batch, waits):
            if not taken.called:  # cancelled meanwhile
                taken.callback(wait_ms / 1000 if wait_ms else None)

    async def add(self, charges: Sequence[Charge]) -> None:
        """Count one event on every key, even past its limit."""
        charges = [charge for charge in charges if charge.limit.enabled]
        if charges:
            await self._redis.eval(
                ADD,
                [self._key(charge.key) for charge in charges],
                [_window_ms(charge.limit.period) for charge in charges],
            )

    async def window(self, key: str) -> tuple[int, float]:
        """Events counted in the key's current window and the seconds until it ends ((0, 0.0) if none)."""
        used, left_ms = await self._redis.eval(WINDOW, [self._key(key)], [])
        return (int(used), left_ms / 1000) if used else (0, 0.0)

    async def give_back(self, charges: Sequence[Charge]) -> None:
        """Uncount one event on every key (an event counted ahead that did not happen)."""
        charges = [charge for charge in charges if charge.limit.enabled]
        if charges:
            await self._redis.eval(GIVE_BACK, [self._key(charge.key) for charge in charges], [])

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the keys' windows."""
        if keys:
            await self._redis.eval(CLEAR, [self._key(key) for key in keys], [])
