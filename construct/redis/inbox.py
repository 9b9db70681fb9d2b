"""The Redis inbox (production mode): same contract as the SQL inbox, no message ever in SQL.

Per user, all in one hash slot (the `{userId}` tag) so Redis Cluster could serve them and
each script stays atomic:

    <prefix>{<userId>}:inbox   ZSET  message id -> seq (FIFO order)
    <prefix>{<userId>}:msgs    HASH  message id -> envelope (JSON)
    <prefix>{<userId>}:exp     ZSET  message id -> expiry (ms)
    <prefix>{<userId>}:sent    HASH  message id -> "sender-digest status expiry accepted" (dedup, kept
                                     until expiry; the digest is Submission.sender_digest)
    <prefix>{<userId>}:seq     STRING per-user sequence

and one index, `<prefix>pending` (ZSET user id -> earliest expiry), that the worker's sweeps walk.
The index is a hint, written once per reactor turn for that turn's sends; the per-user keys
also carry a TTL, so nothing outlives its messages for long even if the index misses a user.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.delivery.types import Accepted, InboxEntry, Submission, Survey
from construct.redis.client import RedisClient, Script, TurnBatches, fail_unanswered
from construct.redis.presence import presence_key
from construct.errors import duplicate_id_error, inbox_full_error, user_not_found_error

# Keys of a user survive this long after their last message expires.
KEY_GRACE_MS = 24 * 3600 * 1000
SWEEP_BATCH = 500
INDEX_RETRY_SECONDS = 1.0
# Longer than any instance remembers that a user exists (KnownUsers).
TOMBSTONE_MS = 24 * 3600 * 1000

# One round trip for all the messages to one recipient in one reactor turn (up to PUT_BATCH):
# store them in order, and read the recipient's presence (same hash slot) once, for whether a
# connection of the recipient is known anywhere and which other instances to wake. A duplicate
# gets the first store's answer.
# KEYS: inbox, msgs, exp, sent, seq, presence, and the tombstone of a deleted account, which
# instances may still believe exists. ARGV: now, ttl, quota, key grace, this instance; then id,
# sender, envelope, held here ("1"/"0") of each message. Returns, per message, {outcome,
# reached ("1"/"0"), expires, seq}, outcome stored, duplicate, other (the id is another
# sender's), full or gone; then the other instances holding the recipient.
# The records keep the status words they always had ("delivered": reached).
PUT = Script("""
local now, ttl, quota, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local count = (#ARGV - 5) / 4
local results = {}
if redis.call('EXISTS', KEYS[7]) == 1 then
  for m = 1, count do results[m] = {'gone'} end
  results[count + 1] = {}
  return results
end
local ids = {}
for m = 1, count do ids[m] = ARGV[4 * m + 2] end
local priors = redis.call('HMGET', KEYS[4], unpack(ids))
local holders, others = redis.call('ZRANGEBYSCORE', KEYS[6], now, '+inf'), {}
for _, holder in ipairs(holders) do
  if holder ~= ARGV[5] then others[#others + 1] = holder end
end
local room = quota - redis.call('ZCARD', KEYS[1])
local expires = string.format('%d', now + ttl)
local batch, fresh = {}, {}
for m = 1, count do
  local id, sender = ARGV[4 * m + 2], ARGV[4 * m + 3]
  local psender, pstatus, pexpires = nil, nil, nil
  if batch[id] then
    psender, pstatus, pexpires = batch[id][1], batch[id][2], expires
  elseif priors[m] then
    psender, pstatus, pexpires = string.match(priors[m], '^(%S+) (%S+) (%d+)')
    if tonumber(pexpires) <= now then psender = nil end
  end
  if psender then
    if psender ~= sender then
      results[m] = {'other'}
    else
      results[m] = {'duplicate', pstatus == 'delivered' and '1' or '0', pexpires}
    end
  elseif room <= 0 then
    results[m] = {'full'}
  else
    room = room - 1
    local reached = (#holders > 0 or ARGV[4 * m + 5] == '1') and '1' or '0'
    batch[id] = {sender, reached == '1' and 'delivered' or 'queued'}
    fresh[#fresh + 1] = m
    results[m] = {'stored', reached, expires, 0}
  end
end
results[count + 1] = others
if #fresh == 0 then return results end
local seq = redis.call('INCRBY', KEYS[5], #fresh) - #fresh
if #fresh == 1 then
  -- The usual case under many users: one message per recipient and turn, without the tables.
  local m = fresh[1]
  local id = ARGV[4 * m + 2]
  seq = seq + 1
  results[m][4] = seq
  redis.call('ZADD', KEYS[1], seq, id)
  redis.call('HSET', KEYS[2], id, ARGV[4 * m + 4])
  redis.call('ZADD', KEYS[3], expires, id)
  redis.call('HSET', KEYS[4], id, ARGV[4 * m + 3] .. ' ' .. batch[id][2] .. ' ' .. expires .. ' ' .. ARGV[1])
else
  local order, bodies, expiry, records = {}, {}, {}, {}
  for _, m in ipairs(fresh) do
    local id = ARGV[4 * m + 2]
    seq = seq + 1
    results[m][4] = seq
    order[#order + 1] = seq
    order[#order + 1] = id
    bodies[#bodies + 1] = id
    bodies[#bodies + 1] = ARGV[4 * m + 4]
    expiry[#expiry + 1] = expires
    expiry[#expiry + 1] = id
    records[#records + 1] = id
    records[#records + 1] = ARGV[4 * m + 3] .. ' ' .. batch[id][2] .. ' ' .. expires .. ' ' .. ARGV[1]
  end
  redis.call('ZADD', KEYS[1], unpack(order))
  redis.call('HSET', KEYS[2], unpack(bodies))
  redis.call('ZADD', KEYS[3], unpack(expiry))
  redis.call('HSET', KEYS[4], unpack(records))
end
-- The inbox and bodies empty (and vanish) with every full ack; the expiry index and records
-- live on: their TTL is refreshed only when half its grace has gone.
local keep = ttl + grace
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
if redis.call('PTTL', KEYS[3]) < keep - grace / 2 then
  redis.call('PEXPIRE', KEYS[3], keep)
  redis.call('PEXPIRE', KEYS[4], keep)
end
return results
""")
# Messages per PUT call: Lua's unpack() takes at most about 8,000 values.
PUT_BATCH = 256

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


def _accepted_times(replies: list) -> list[int]:
    """From an ack's ZMSCORE and HMGET: when each id that was pending was accepted (ms)."""
    pending, _, _, records = replies
    return [int(record.rsplit(" ", 1)[1]) if record else 0
            for seq, record in zip(pending, records) if seq is not None]


class RedisInbox:
    """`instance_id` is this instance: a store answers which other instances hold the recipient."""

    log = Logger()

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        clock: IReactorTime,
        instance_id: str = "",
        reactor: IReactorTime | None = None,
    ) -> None:
        """`reactor` ends a reactor turn's batch of stores (default: `clock`; a test's fake
        clock would hold every store)."""
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._instance_id = instance_id
        redis.preload(PUT, FETCH, SWEEP_USER, SURVEY_USER)
        self._pending_index = f"{prefix}pending"
        # user id -> earliest expiry (ms) not yet written to the pending index.
        self._unindexed: dict[str, int] = {}
        self._index_call: Any = None
        # The stores of this reactor turn, by recipient, in call order.
        self._puts = TurnBatches(reactor or clock, self._put_batch)

    def keys(self, user_id: str) -> list[str]:
        base = f"{self._prefix}{{{user_id}}}"
        return [f"{base}:inbox", f"{base}:msgs", f"{base}:exp", f"{base}:sent", f"{base}:seq"]

    def put(self, message: Submission) -> Deferred:
        """Store a message; fires with its Accepted. The caller has checked that the recipient
        exists (KnownUsers).

        The messages to one recipient of one reactor turn go to Redis as one script call, in the
        order of these calls, and every call goes down one pipelined connection, so they take
        effect in the order of these calls (Inbox.put).
        """
        stored: Deferred = Deferred()
        self._puts.add(message.recipient_id, (message, stored))
        return stored

    def _put_batch(self, recipient: str, messages: list[tuple[Submission, Deferred]]) -> None:
        for start in range(0, len(messages), PUT_BATCH):
            batch = messages[start:start + PUT_BATCH]
            try:
                stored = ensureDeferred(self._redis.eval(PUT, self._put_keys(recipient), self._put_args(batch)))
            except Exception:
                stored = fail()
            stored.addCallback(self._stored, recipient, batch).addErrback(fail_unanswered, batch)

    def _put_keys(self, recipient: str) -> list[str]:
        return [*self.keys(recipient), presence_key(self._prefix, recipient), self._tombstone(recipient)]

    def _put_args(self, batch: list[tuple[Submission, Deferred]]) -> list[Any]:
        # The messages of one call come from one reactor turn: they share the time, TTL and quota of the first.
        first = batch[0][0]
        args: list[Any] = [first.now_ms, first.ttl_ms, first.quota, KEY_GRACE_MS, self._instance_id]
        for message, _ in batch:
            args += (message.message_id, message.sender_digest, message.envelope, "1" if message.held_here else "0")
        return args

    def _stored(self, results: list, recipient: str, batch: list[tuple[Submission, Deferred]]) -> None:
        if len(results) != len(batch) + 1:
            raise ValueError(f"PUT answered {len(results) - 1} of {len(batch)} messages")
        holders = tuple(results.pop())
        # Indexed before any sender hears back. Every message stored by one call expires at once.
        expiries = [int(result[2]) for result in results if result[0] == "stored"]
        if expiries:
            self._index_later(recipient, expiries[0])
        for (_, stored), result in zip(batch, results):
            outcome = result[0]
            if outcome == "stored":
                seq = result[3]
                stored.callback(Accepted(
                    result[1] == "1", int(result[2]), duplicate=False, seq=seq, previous_seq=seq - 1, holders=holders
                ))
            elif outcome == "duplicate":
                stored.callback(Accepted(result[1] == "1", int(result[2]), duplicate=True))
            elif outcome == "gone":
                stored.errback(user_not_found_error())
            elif outcome == "other":
                stored.errback(duplicate_id_error())
            else:
                stored.errback(inbox_full_error(batch[0][0].quota))

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

    def ack(self, recipient_id: str, message_ids: list[str]) -> Deferred:
        """Plain commands, no script (a script costs Redis several times as much): which of the
        ids are pending, remove them, and when those were accepted. Between the commands another
        instance may remove one too; then both count it, in metrics only."""
        inbox, msgs, _, sent, _ = self.keys(recipient_id)
        ids = list(dict.fromkeys(message_ids))
        return self._redis.execute_batch(
            [("ZMSCORE", inbox, *ids), ("ZREM", inbox, *ids), ("HDEL", msgs, *ids), ("HMGET", sent, *ids)]
        ).addCallback(_accepted_times)

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
