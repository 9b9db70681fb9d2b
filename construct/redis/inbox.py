"""The Redis inbox (production mode): same contract as the SQL inbox, no message ever in SQL.

Per user, all in one hash slot (the `{userId}` tag) so Redis Cluster could serve them and
each script stays atomic:

    <prefix>{<userId>}:inbox   ZSET  message id -> seq (FIFO order)
    <prefix>{<userId>}:msgs    HASH  message id -> envelope (JSON)
    <prefix>{<userId>}:exp     ZSET  message id -> expiry (ms)
    <prefix>{<userId>}:sent    HASH  message id -> "sender status expiry accepted" (dedup, kept until expiry)
    <prefix>{<userId>}:seq     STRING per-user sequence

and one index, `<prefix>pending` (ZSET user id -> earliest expiry), that the worker's sweeps walk.
The index is a hint, written once per reactor turn for that turn's sends; the per-user keys
also carry a TTL, so nothing outlives its messages for long even if the index misses a user.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.delivery.types import Accepted, InboxEntry, Submission, Survey
from construct.redis.client import RedisClient, Script
from construct.redis.presence import event_message, instance_channel, presence_key
from construct.errors import duplicate_id_error, inbox_full_error, user_not_found_error

# Keys of a user survive this long after their last message expires.
KEY_GRACE_MS = 24 * 3600 * 1000
SWEEP_BATCH = 500
INDEX_RETRY_SECONDS = 1.0
# Longer than any instance remembers that a user exists (KnownUsers).
TOMBSTONE_MS = 24 * 3600 * 1000

# One round trip per send: store, read the recipient's presence (same hash slot) to upgrade
# a "queued" status, and wake the other instances holding the recipient (PUBLISH from a script
# is allowed, in Cluster too). A duplicate was announced the first time and is not again.
# KEYS[7] is the tombstone of a deleted account, which instances may still believe exists.
PUT = Script("""
local id, sender, now, ttl, quota = ARGV[1], ARGV[2], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('EXISTS', KEYS[7]) == 1 then return {'gone'} end
local prior = redis.call('HGET', KEYS[4], id)
if prior then
  local psender, pstatus, pexpires = string.match(prior, '^(%S+) (%S+) (%d+)')
  if tonumber(pexpires) > now then
    if psender ~= sender then return {'other'} end
    return {'duplicate', pstatus, pexpires}
  end
end
if redis.call('ZCARD', KEYS[1]) >= quota then return {'full'} end
local holders = redis.call('ZRANGEBYSCORE', KEYS[6], now, '+inf')
local status = ARGV[4]
if #holders > 0 then status = 'delivered' end
local seq = redis.call('INCR', KEYS[5])
local expires = now + ttl
redis.call('ZADD', KEYS[1], seq, id)
redis.call('HSET', KEYS[2], id, ARGV[3])
redis.call('ZADD', KEYS[3], expires, id)
redis.call('HSET', KEYS[4], id, sender .. ' ' .. status .. ' ' .. string.format('%d', expires) .. ' ' .. ARGV[5])
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl + tonumber(ARGV[8])) end
for _, holder in ipairs(holders) do
  if holder ~= ARGV[10] then redis.call('PUBLISH', ARGV[9] .. holder, ARGV[11]) end
end
return {'stored', status, string.format('%d', expires), seq}
""")

# Scans past expired entries (not yet swept) so a batch is full whenever more live ones exist.
FETCH = Script("""
local after, limit, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, found = {}, 0
while found < limit do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. after, '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
  if #page == 0 then break end
  for i = 1, #page, 2 do
    local id, seq = page[i], page[i + 1]
    after = seq
    local expires = redis.call('ZSCORE', KEYS[3], id)
    local envelope = redis.call('HGET', KEYS[2], id)
    if expires and envelope and tonumber(expires) > now and found < limit then
      out[#out + 1] = seq
      out[#out + 1] = id
      out[#out + 1] = envelope
      found = found + 1
    end
  end
end
return out
""")

ACK = Script("""
local accepted = {}
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HDEL', KEYS[2], id)
    local record = redis.call('HGET', KEYS[3], id)
    accepted[#accepted + 1] = record and string.match(record, '(%d+)$') or '0'
  end
end
return accepted
""")

SWEEP_USER = Script("""
local expired = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])) do
  expired = expired + redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', KEYS[3], id)
end
return {expired, redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2] or ''}
""")

# Read only: when the oldest pending message was accepted, and how many are pending.
SURVEY_USER = Script("""
local accepted = ''
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if oldest then
  local record = redis.call('HGET', KEYS[2], oldest)
  if record then accepted = string.match(record, '(%d+)$') end
end
return {accepted, redis.call('ZCARD', KEYS[1])}
""")


class RedisInbox:
    """`instance_id` is this instance, whose own connections the caller feeds after a send;
    a send wakes every other instance holding the recipient."""

    log = Logger()
    # Every command goes down one pipelined connection: scripts run in the order issued.
    stores_in_issue_order = True

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        clock: IReactorTime,
        instance_id: str = "",
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._instance_id = instance_id
        redis.preload(PUT, FETCH, ACK, SWEEP_USER, SURVEY_USER)
        self._pending_index = f"{prefix}pending"
        # user id -> earliest expiry (ms) not yet written to the pending index.
        self._unindexed: dict[str, int] = {}
        self._index_call: Any = None

    def keys(self, user_id: str) -> list[str]:
        base = f"{self._prefix}{{{user_id}}}"
        return [f"{base}:inbox", f"{base}:msgs", f"{base}:exp", f"{base}:sent", f"{base}:seq"]

    async def put(self, message: Submission) -> Accepted:
        """The caller has checked that the recipient exists (KnownUsers)."""
        recipient = message.recipient_id
        result = await self._redis.eval(
            PUT,
            [*self.keys(recipient), presence_key(self._prefix, recipient), self._tombstone(recipient)],
            [
                message.message_id, message.sender_id, message.envelope, message.status,
                message.now_ms, message.ttl_ms, message.quota, KEY_GRACE_MS,
                instance_channel(self._prefix, ""), self._instance_id, event_message("pending", recipient),
            ],
        )
        outcome = result[0]
        if outcome == "gone":
            raise user_not_found_error()
        if outcome == "other":
            raise duplicate_id_error()
        if outcome == "full":
            raise inbox_full_error(message.quota)
        if outcome == "duplicate":
            return Accepted(result[1], int(result[2]), duplicate=True)
        self._index_later(recipient, int(result[2]))
        return Accepted(result[1], int(result[2]), duplicate=False, seq=result[3])

    def _index_later(self, user_id: str, expires_ms: int) -> None:
        """Add the user to the pending index with the sends of this reactor turn, in one ZADD.

        The sender's ack does not wait for it: the index only guides the sweeps, and a failed
        write is retried (the per-user keys' TTL is the backstop meanwhile).
        """
        known = self._unindexed.get(user_id)
        if known is None or expires_ms < known:
            self._unindexed[user_id] = expires_ms
        if self._index_call is None:
            self._index_call = self._clock.callLater(0, self._write_index)

    def _write_index(self) -> None:
        self._index_call = None
        batch, self._unindexed = self._unindexed, {}
        scores = [value for user_id, expires_ms in batch.items() for value in (expires_ms, user_id)]
        ensureDeferred(self._redis.execute("ZADD", self._pending_index, "LT", *scores)).addErrback(
            self._index_failed, batch
        )

    def _index_failed(self, failure: Failure, batch: dict[str, int]) -> None:
        self.log.warn("updating the pending index failed; retrying: {error}", error=failure.value)
        for user_id, expires_ms in batch.items():
            self._unindexed[user_id] = min(expires_ms, self._unindexed.get(user_id, expires_ms))
        if self._index_call is None:
            self._index_call = self._clock.callLater(INDEX_RETRY_SECONDS, self._write_index)

    async def fetch(self, recipient_id: str, after_seq: int, limit: int, now_ms: int) -> list[InboxEntry]:
        flat = await self._redis.eval(FETCH, self.keys(recipient_id)[:3], [after_seq, limit, now_ms])
        return [InboxEntry(int(flat[i]), flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]

    async def ack(self, recipient_id: str, message_ids: list[str]) -> list[int]:
        if not message_ids:
            return []
        keys = self.keys(recipient_id)
        accepted = await self._redis.eval(ACK, [keys[0], keys[1], keys[3]], message_ids)
        return [int(value) for value in accepted]

    async def depth(self, recipient_id: str, now_ms: int) -> int:
        return int(await self._redis.execute("ZCARD", self.keys(recipient_id)[0]))

    async def _sweep_user(self, user_id: str, now_ms: int) -> int:
        """Expire one user's old messages and re-index the user; return how many expired."""
        expired, next_expiry = await self._redis.eval(SWEEP_USER, self.keys(user_id)[:4], [now_ms])
        if next_expiry:
            await self._redis.execute("ZADD", self._pending_index, int(float(next_expiry)), user_id)
        else:
            await self._redis.execute("ZREM", self._pending_index, user_id)
            # A message stored between the script and the ZREM must stay indexed.
            racing = await self._redis.execute("ZRANGE", self.keys(user_id)[2], 0, 0, "WITHSCORES")
            if racing:
                await self._redis.execute("ZADD", self._pending_index, "LT", int(float(racing[1])), user_id)
        return int(expired)

    async def expire(self, now_ms: int) -> int:
        """Expire every due message; returns how many were still unacknowledged."""
        total = 0
        while True:
            due = await self._redis.execute(
                "ZRANGEBYSCORE", self._pending_index, "-inf", now_ms, "LIMIT", 0, SWEEP_BATCH
            )
            for user_id in due:
                total += await self._sweep_user(user_id, now_ms)
            if len(due) < SWEEP_BATCH:
                return total

    async def survey(self, accepted_before_ms: int, now_ms: int) -> Survey:
        """Users whose oldest unacknowledged message was accepted before the given time, and the total depth."""
        stale, depth = [], 0
        cursor = "0"
        while True:
            cursor, page = await self._redis.execute("ZSCAN", self._pending_index, cursor, "COUNT", SWEEP_BATCH)
            for user_id in page[::2]:
                keys = self.keys(user_id)
                accepted, user_depth = await self._redis.eval(SURVEY_USER, [keys[0], keys[3]], [])
                depth += int(user_depth)
                if accepted and int(accepted) < accepted_before_ms:
                    stale.append(user_id)
            if cursor == "0":
                return Survey(stale, depth)

    def _tombstone(self, user_id: str) -> str:
        return f"{self._prefix}{{{user_id}}}:deleted"

    async def delete_user(self, user_id: str) -> None:
        """Remove everything of a deleted account (construct.core.deletion): its inbox, dedup
        records, sequence, presence, the workers' leases on it, and its pending-index entry.

        The tombstone, set first, refuses sends from instances that still remember the account
        existing; a send stored before it is deleted with the rest.
        """
        base = f"{self._prefix}{{{user_id}}}"
        await self._redis.execute("SET", self._tombstone(user_id), "1", "PX", TOMBSTONE_MS)
        await self._redis.execute(
            # The leases are construct.redis.client.RedisLeases' "online:" and "redeliver:" ones.
            "DEL", *self.keys(user_id), presence_key(self._prefix, user_id), f"{base}:lease:online", f"{base}:lease:redeliver"
        )
        await self._redis.execute("ZREM", self._pending_index, user_id)
