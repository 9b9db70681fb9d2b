"""Deterministic units: option resolution, the codec, and TCP line framing over an in-memory transport."""

from __future__ import annotations

import json

import msgpack
import pytest
import pytest_twisted
from twisted.internet.testing import StringTransport
from twisted.python import usage

from construct.config import Setting, SettingsOptions, int_between
from construct.errors import ConstructError
from construct.protocol import codec
from construct.protocol.connection import AddressCounts, ConnectionTracker
from construct.protocol.timeouts import ConnectionLimits
from construct.protocol.tcp import JsonLinesFactory, JsonLinesProtocol
from construct.tap import Options, default_instance_id


class DemoOptions(SettingsOptions):
    program = "demo"
    settings = (
        Setting("size", 5, "a size", int_between(1, 10)),
        Setting("name", "default", "a name"),
        Setting("token", None, "a secret", secret=True),
    )


def test_options_precedence_command_line_environment_file_default(tmp_path):
    """The command line beats the environment, which beats a _FILE, which beats the default."""
    secret = tmp_path / "name"
    secret.write_text("from-file\n")
    options = DemoOptions(environ={"CONSTRUCT_SIZE": "7", "CONSTRUCT_NAME_FILE": str(secret)})
    options.parseOptions([])
    assert (options["size"], options["name"], options["token"]) == (7, "from-file", None)
    options = DemoOptions(environ={"CONSTRUCT_SIZE": "7", "CONSTRUCT_NAME": "env"})
    options.parseOptions(["--size", "3"])
    assert (options["size"], options["name"]) == (3, "env")


def test_bad_values_and_secrets_on_the_command_line_are_refused(tmp_path):
    """A bad value is one line naming its source; a secret cannot be given as an option."""
    with pytest.raises(SystemExit, match="demo: CONSTRUCT_SIZE must be between 1 and 10, not 11"):
        DemoOptions(environ={"CONSTRUCT_SIZE": "11"}).parseOptions([])
    with pytest.raises(SystemExit, match="--size must be an integer"):
        DemoOptions(environ={}).parseOptions(["--size", "x"])
    with pytest.raises(SystemExit, match="cannot read"):
        DemoOptions(environ={"CONSTRUCT_NAME_FILE": str(tmp_path / "missing")}).parseOptions([])
    with pytest.raises(usage.UsageError, match="token"):
        DemoOptions(environ={}).parseOptions(["--token", "visible-in-ps"])
    from_environment = DemoOptions(environ={"CONSTRUCT_TOKEN": "s3"})
    from_environment.parseOptions([])
    assert from_environment["token"] == "s3"


def test_server_options_parse_redis_and_derive_instance_ids():
    """--redis is parsed into an address; the default instance id follows the listen port."""
    options = Options(environ={"CONSTRUCT_REDIS": "redis://:pw@cache:6380/2"})
    options.parseOptions(["--listen", "tcp:9000:interface=127.0.0.1"])
    address = options["redis"]
    assert (address.host, address.port, address.db, address.password) == ("cache", 6380, 2, "pw")
    assert options["instance-id"].endswith("-9000")
    assert default_instance_id("ssl:8443:privateKey=k.pem").endswith("-8443")
    with pytest.raises(SystemExit, match="redis:// or rediss://"):
        Options(environ={"CONSTRUCT_REDIS": "http://x"}).parseOptions([])


def test_codec_round_trips_bytes_per_encoding():
    """Bytes are MessagePack bin, or base64 in JSON; requestId and payload-less messages survive."""
    payload = {"ephemeralPublicKey": b"\x01" * 32, "nested": [{"raw": b"\xff"}]}
    packed = msgpack.unpackb(codec.encode("message", payload, "r1", codec.MSGPACK), raw=False)
    assert packed == {"type": "message", "payload": payload, "requestId": "r1"}
    as_json = json.loads(codec.encode("message", payload, None, codec.JSON))
    assert as_json["payload"] == {"ephemeralPublicKey": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "nested": [{"raw": "/w=="}]}
    assert json.loads(codec.encode("pong", None, None, codec.JSON)) == {"type": "pong"}
    frame = codec.decode(b'{"type":"ping","requestId":"x"}', codec.JSON)
    assert (frame.type, frame.payload, frame.request_id) == ("ping", {}, "x")


@pytest.mark.parametrize(
    "data, encoding",
    [
        (b"\xc1", codec.MSGPACK),
        (b"\xff\xfe", codec.JSON),
        (b"[" * 100000, codec.JSON),
        (b'"just a string"', codec.JSON),
        (b'{"type": "ping", "requestId": 5}', codec.JSON),
        (b'{"type": "ping", "requestId": "' + b"x" * 200 + b'"}', codec.JSON),
        (msgpack.packb({1: 2}), codec.MSGPACK),
    ],
)
def test_codec_rejects_malformed_frames_with_one_error_type(data, encoding):
    """Every malformation, even deep nesting, is an INVALID_FORMAT error and nothing else."""
    with pytest.raises(ConstructError) as caught:
        codec.decode(data, encoding)
    assert caught.value.code == "INVALID_FORMAT"


class RecordingConnection:
    def __init__(self):
        self.frames: list[bytes] = []
        self.too_large = 0

    def frame_received(self, data, encoding):
        self.frames.append(data)

    def frame_too_large(self, encoding):
        self.too_large += 1


def _tcp(max_line: int = 32) -> tuple[JsonLinesProtocol, RecordingConnection]:
    factory = JsonLinesFactory(None, max_line, ConnectionTracker(clock=None), AddressCounts(0), ConnectionLimits(), None)
    protocol = factory.buildProtocol(None)
    recorder = RecordingConnection()
    # Framing only: stand in for the ClientConnection that the first bytes would build.
    protocol.connection = recorder
    protocol.transport = StringTransport()
    return protocol, recorder


def test_tcp_framing_splits_lines_across_packets():
    """Lines end at \\n (a \\r before it is dropped), may span packets, and blank lines are ignored."""
    protocol, recorder = _tcp()
    for chunk in (b'{"a":', b"1}\r\n\n", b'{"b":2}\n{"c"', b":3}\n"):
        protocol.dataReceived(chunk)
    assert recorder.frames == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_tcp_oversize_line_is_skipped_once_and_the_stream_recovers():
    """A line over the limit is dropped with one error, even when it arrives in pieces; the next line works."""
    protocol, recorder = _tcp(max_line=16)
    protocol.dataReceived(b"x" * 20)
    protocol.dataReceived(b"y" * 20)
    protocol.dataReceived(b'z\n{"ok":1}\n')
    assert recorder.too_large == 1
    assert recorder.frames == [b'{"ok":1}']


def test_seed_clients_messagepack_frames_are_understood_byte_for_byte():
    """The seed's own MessagePack bytes decode here, and a payload-less reply encodes exactly as the seed's."""
    login = bytes.fromhex(
        "82a474797065a56c6f67696ea77061796c6f616482a8757365726e616d65a5616c696365a870617373776f7264ad"
        "436f7272656374486f72736539"
    )
    frame = codec.decode(login, codec.MSGPACK)
    assert (frame.type, frame.payload, frame.request_id) == ("login", {"username": "alice", "password": "CorrectHorse9"}, None)
    assert codec.encode("sessionExpired", None, None, codec.MSGPACK) == bytes.fromhex("81a474797065ae73657373696f6e45787069726564")


def _redis_client(clock, url: str = "redis://127.0.0.1:6379/0"):
    """A RedisClient whose connection is a real RespProtocol on an in-memory transport."""
    from twisted.internet.testing import StringTransport

    from construct.redis.client import RedisAddress, RedisClient

    client = RedisClient(RedisAddress.parse(url), clock)
    protocol = client._new_protocol()
    protocol.makeConnection(StringTransport())
    return client, protocol


def _outcome(deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0] if results else None


def test_redis_refusals_and_silence_are_service_unavailable_and_bugs_are_not():
    """READONLY/OOM replies, a missing connection and a reply that never comes are SERVICE_UNAVAILABLE;
    any other error reply is a bug and propagates."""
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from construct.redis.client import ResponseError

    clock = MemoryReactorClock()
    for reply in (b"-READONLY You can't write against a read only replica.\r\n", b"-OOM command not allowed\r\n"):
        client, protocol = _redis_client(clock)
        pending = defer.ensureDeferred(client.execute("SET", "k", "v"))
        protocol.dataReceived(reply)
        assert _outcome(pending).value.code == "SERVICE_UNAVAILABLE"
    client, protocol = _redis_client(clock)
    pending = defer.ensureDeferred(client.execute("SET"))
    protocol.dataReceived(b"-ERR wrong number of arguments\r\n")
    assert _outcome(pending).check(ResponseError)

    silent, protocol = _redis_client(clock)
    pending = defer.ensureDeferred(silent.execute("GET", "k"))
    clock.advance(2.9)
    assert not pending.called
    clock.advance(0.1)
    assert _outcome(pending).value.code == "SERVICE_UNAVAILABLE"
    assert protocol.transport.disconnecting, "a silent connection is dropped so a new one is made"

    gone, protocol = _redis_client(clock)
    protocol.connectionLost(None)
    assert not gone.connected
    assert _outcome(defer.ensureDeferred(gone.execute("GET", "k"))).value.code == "SERVICE_UNAVAILABLE"


def test_redis_commands_pipeline_in_order_and_scripts_load_once():
    """Commands are written at once and answered in order; a script Redis lacks is sent in full once."""
    import hiredis
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from construct.redis.client import Script

    client, protocol = _redis_client(MemoryReactorClock())
    first = defer.ensureDeferred(client.execute("GET", "a"))
    second = defer.ensureDeferred(client.execute("INCR", "b"))
    assert protocol.transport.value() == hiredis.pack_command(("GET", "a")) + hiredis.pack_command(("INCR", "b"))
    protocol.dataReceived(b"$1\r\nx\r\n:")
    assert _outcome(first) == "x" and not second.called
    protocol.dataReceived(b"7\r\n")
    assert _outcome(second) == 7

    script = Script("return ARGV[1]")
    protocol.transport.clear()
    result = defer.ensureDeferred(client.eval(script, ["k"], [5]))
    assert protocol.transport.value() == hiredis.pack_command(("EVALSHA", script.sha, 1, "k", 5))
    protocol.transport.clear()
    protocol.dataReceived(b"-NOSCRIPT No matching script.\r\n")
    assert protocol.transport.value() == hiredis.pack_command(("EVAL", script.text, 1, "k", 5))
    protocol.dataReceived(b"$1\r\n5\r\n")
    assert _outcome(result) == "5"


def test_redis_connection_authenticates_before_it_is_used():
    """AUTH and SELECT go first; the client takes commands only once both succeeded, and a refusal drops the connection."""
    import hiredis
    from twisted.internet.testing import MemoryReactorClock

    client, protocol = _redis_client(MemoryReactorClock(), "redis://app:s3cret@127.0.0.1:6379/3")
    assert protocol.transport.value() == hiredis.pack_command(("AUTH", "app", "s3cret"))
    assert not client.connected
    protocol.dataReceived(b"+OK\r\n")
    assert protocol.transport.value().endswith(hiredis.pack_command(("SELECT", 3)))
    protocol.dataReceived(b"+OK\r\n")
    assert client.connected

    refused, protocol = _redis_client(MemoryReactorClock(), "redis://:wrong@127.0.0.1:6379/0")
    protocol.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
    assert not refused.connected and protocol.transport.disconnecting


def test_redis_subscriber_subscribes_after_each_connect_and_survives_a_bad_handler():
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from construct.redis.client import RedisAddress, RedisSubscriber

    received, subscriptions = [], []

    def on_message(channel, message):
        if message == "boom":
            raise ValueError("handler bug")
        received.append((channel, message))

    subscriber = RedisSubscriber(
        RedisAddress.parse("redis://127.0.0.1:6379/0"), MemoryReactorClock(), ["a", "b"], on_message,
        lambda: subscriptions.append(True),
    )
    for _ in range(2):
        protocol = subscriber._new_protocol()
        protocol.makeConnection(StringTransport())
        assert b"SUBSCRIBE" in protocol.transport.value()
        protocol.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
        assert not subscriber.connected
        protocol.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n")
        assert subscriber.connected
        protocol.dataReceived(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$4\r\nboom\r\n")
        protocol.dataReceived(b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\nhi\r\n")
        protocol.connectionLost(None)
        assert not subscriber.connected
    assert subscriptions == [True, True]
    assert received == [("b", "hi"), ("b", "hi")]


def test_a_silent_subscriber_connection_is_pinged_and_then_made_again():
    """A half-open subscriber connection would leave the instance deaf to wake-ups: it PINGs on
    a timer, and one that answers nothing for an interval after a PING is aborted (ClientService
    then connects, subscribes and rescans again). A connection that answers is kept."""
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from construct.redis.client import SUBSCRIBER_PING_SECONDS, RedisAddress, RedisSubscriber

    clock = MemoryReactorClock()
    subscriber = RedisSubscriber(
        RedisAddress.parse("redis://127.0.0.1:6379/0"), clock, ["a"], lambda *_: None, lambda: None, name="p x:subscriber"
    )
    protocol = subscriber._new_protocol()
    protocol.makeConnection(StringTransport())
    assert protocol.transport.value().endswith(b"SETNAME\r\n$14\r\np_x:subscriber\r\n")
    protocol.dataReceived(b"+OK\r\n")
    assert b"SUBSCRIBE" in protocol.transport.value()
    protocol.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
    protocol.transport.clear()
    clock.advance(SUBSCRIBER_PING_SECONDS)
    assert protocol.transport.value() == b"*1\r\n$4\r\nPING\r\n"
    protocol.dataReceived(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    clock.advance(SUBSCRIBER_PING_SECONDS)
    assert subscriber.connected and not protocol.transport.disconnecting
    clock.advance(SUBSCRIBER_PING_SECONDS)  # the second PING gets no answer
    assert protocol.transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_password_hashing_runs_on_few_threads_at_low_priority():
    """A login storm must leave the reactor a core: at most `size` hashes at once, each thread at nice +10."""
    import os
    import threading
    import time

    from twisted.internet import defer, reactor

    from construct.services import LOW_PRIORITY_NICE, HashingThreads

    hashing = HashingThreads(1, reactor)
    hashing.startService()
    running, peak, lock = [], [0], threading.Lock()

    def hash_password():
        with lock:
            running.append(1)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.02)
        with lock:
            running.pop()
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    niceness = await defer.gatherResults([hashing.run(hash_password) for _ in range(4)])
    await hashing.stopService()
    assert peak[0] == 1
    assert niceness == [LOW_PRIORITY_NICE] * 4


def test_message_tallies_render_as_prometheus_counters_and_histogram():
    from prometheus_client.parser import text_string_to_metric_families

    from construct.metrics import Metrics

    metrics = Metrics()
    for _ in range(3):
        metrics.accepted()
    metrics.delivered("live", 2)
    metrics.delivered("inbox")
    metrics.acknowledged([0.01, 0.2, 10**7])
    for code in ("SERVER_BUSY", "SERVER_BUSY", "INBOX_FULL"):
        metrics.error(code)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    assert samples[("construct_messages_accepted_total", ())] == 3
    assert samples[("construct_messages_delivered_total", (("path", "live"),))] == 2
    assert samples[("construct_messages_delivered_total", (("path", "inbox"),))] == 1
    assert samples[("construct_messages_acknowledged_total", ())] == 3
    assert samples[("construct_errors_total", (("code", "SERVER_BUSY"),))] == 2
    assert samples[("construct_errors_total", (("code", "INBOX_FULL"),))] == 1
    bucket = "construct_send_to_ack_seconds_bucket"
    assert samples[(bucket, (("le", "0.01"),))] == 1, "a bound is inclusive"
    assert samples[(bucket, (("le", "0.5"),))] == 2
    assert samples[(bucket, (("le", "604800.0"),))] == 2
    assert samples[(bucket, (("le", "+Inf"),))] == 3
    assert samples[("construct_send_to_ack_seconds_sum", ())] == pytest.approx(10**7 + 0.21)


def test_collector_tuning_freezes_startup_objects_and_collects_the_young_generation_less_often():
    import gc

    from construct.services import YOUNG_GENERATION_THRESHOLD, CollectorTuning

    threshold = gc.get_threshold()
    try:
        CollectorTuning().startService()
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *threshold[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_known_users_remember_existence_for_a_while_and_never_absence():
    from twisted.internet import defer, task

    from construct.core.accounts import KnownUsers

    clock = task.Clock()
    accounts = {"a", "b", "c"}
    lookups: list[str] = []

    def lookup(user_id: str) -> defer.Deferred:
        lookups.append(user_id)
        return defer.succeed(user_id in accounts)

    known = KnownUsers(lookup, clock, ttl_seconds=60, capacity=2)

    def exists(user_id: str) -> bool:
        found = known.exists(user_id)
        return found if found is True else _outcome(found)

    assert exists("a") and exists("a") and lookups == ["a"]
    assert not exists("new") and not exists("new") and lookups == ["a", "new", "new"], "absence is not remembered"
    accounts.add("new")
    assert exists("new"), "an account registered a moment ago is found at once"
    clock.advance(61)
    accounts.discard("a")
    assert not exists("a"), "after the TTL the store is asked again"
    lookups.clear()
    assert exists("b") and exists("c") and exists("new")
    assert lookups == ["b", "c", "new"], "at capacity the oldest entry gives way"
    assert exists("new") and exists("c") and lookups == ["b", "c", "new"]
    assert exists("b") and lookups == ["b", "c", "new", "b"]


def test_unreadable_redis_data_drops_the_connection_and_fails_its_commands():
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    client, protocol = _redis_client(MemoryReactorClock())
    pending = defer.ensureDeferred(client.execute("GET", "k"))
    protocol.dataReceived(b"!not a reply type\r\n")
    assert protocol.transport.disconnecting
    protocol.connectionLost(None)
    assert _outcome(pending).value.code == "SERVICE_UNAVAILABLE"


def test_a_store_batch_that_redis_answers_wrongly_or_not_at_all_fails_every_send_in_it():
    """No send of a batch is left unanswered: not on a short reply, not when the call cannot be made."""
    from twisted.internet import defer, task

    from construct.delivery.types import Submission
    from construct.redis.inbox import RedisInbox

    class ScriptedRedis:
        def __init__(self) -> None:
            self.replies: list = []

        def preload(self, *scripts) -> None:
            pass

        def eval(self, script, keys, args):
            reply = self.replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return defer.succeed(reply)

        def execute(self, *command):
            return defer.succeed(0)  # the pending index's ZADD

    redis, clock = ScriptedRedis(), task.Clock()
    inbox = RedisInbox(redis, "test:", clock)

    def two_sends() -> list:
        sends = [inbox.put(Submission("a", "b", f"m{n}", "e", False, 0, 1000, 10, "a")) for n in range(2)]
        clock.advance(0)
        return [_outcome(send) for send in sends]

    redis.replies.append([["stored", "0", "1000", 1], []])
    assert all(outcome.check(ValueError) for outcome in two_sends()), "one result for two messages"
    redis.replies.append(ConnectionError("no connection to write to"))
    assert all(outcome.check(ConnectionError) for outcome in two_sends())
    redis.replies.append([["stored", "0", "1000", 1], ["full"], []])
    stored, full = two_sends()
    assert stored.seq == 1 and full.value.code == "INBOX_FULL"


def test_a_take_batch_that_redis_answers_wrongly_or_not_at_all_fails_every_take_in_it():
    """As for stores: a short reply, or a call that cannot be made, leaves no take waiting."""
    from twisted.internet import defer, task

    from construct.core.limits import Charge, Limit
    from construct.redis.limits import RedisCounters

    class ScriptedRedis:
        def __init__(self) -> None:
            self.replies: list = []

        def preload(self, *scripts) -> None:
            pass

        def eval(self, script, keys, args):
            reply = self.replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return defer.succeed(reply)

    redis, clock = ScriptedRedis(), task.Clock()
    counters = RedisCounters(redis, "test:", clock)

    def two_takes() -> list:
        takes = [counters.take([Charge("{u}:send", Limit(5, 60))]) for _ in range(2)]
        clock.advance(0)
        return [_outcome(taken) for taken in takes]

    redis.replies.append([0])
    assert all(outcome.check(ValueError) for outcome in two_takes()), "one result for two takes"
    redis.replies.append(ConnectionError("no connection to write to"))
    assert all(outcome.check(ConnectionError) for outcome in two_takes())
    redis.replies.append([0, 1500])
    assert two_takes() == [None, 1.5]
