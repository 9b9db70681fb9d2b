"""Deterministic units: option resolution, the codec, and TCP line framing over an in-memory transport."""

from __future__ import annotations

import json

import msgpack
import pytest
from twisted.internet.testing import StringTransport
from twisted.python import usage

from construct.config import Setting, SettingsOptions, int_between
from construct.errors import ConstructError
from construct.protocol import codec
from construct.protocol.connection import ConnectionTracker
from construct.protocol.tcp import JsonLinesProtocol
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
    protocol = JsonLinesProtocol(core=None, max_line_bytes=max_line, tracker=ConnectionTracker(clock=None))
    recorder = RecordingConnection()
    # Framing only: stand in for the ClientConnection that connectionMade would build.
    protocol._connection = recorder
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


class _ScriptedRedisFactory:
    """Stands in for txredisapi's factory: one live connection answering as the test says."""

    def __init__(self, answer) -> None:
        self.size = 1
        self.handler = self
        self._answer = answer

    def execute_command(self, *args):
        return self._answer()


def _redis_client(answer, clock):
    from construct.redis.client import RedisAddress, RedisClient

    client = RedisClient(RedisAddress.parse("redis://127.0.0.1:6379/0"), clock)
    client._factory = _ScriptedRedisFactory(answer)
    return client


def _outcome(deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0] if results else None


def test_redis_refusals_and_silence_are_service_unavailable_and_bugs_are_not():
    """READONLY/OOM replies, a missing connection and a reply that never comes are SERVICE_UNAVAILABLE;
    any other error reply is a bug and propagates."""
    import txredisapi
    from twisted.internet import defer, task

    clock = task.Clock()
    for reply in ("READONLY You can't write against a read only replica.", "OOM command not allowed"):
        client = _redis_client(lambda reply=reply: defer.fail(txredisapi.ResponseError(reply)), clock)
        failure = _outcome(defer.ensureDeferred(client.execute("SET", "k", "v")))
        assert failure.value.code == "SERVICE_UNAVAILABLE"
    broken = _redis_client(lambda: defer.fail(txredisapi.ResponseError("ERR wrong number of arguments")), clock)
    assert _outcome(defer.ensureDeferred(broken.execute("SET"))).check(txredisapi.ResponseError)

    silent = _redis_client(defer.Deferred, clock)
    pending = defer.ensureDeferred(silent.execute("GET", "k"))
    assert not pending.called
    clock.advance(3.0)
    assert _outcome(pending).value.code == "SERVICE_UNAVAILABLE"

    disconnected = _redis_client(lambda: defer.succeed("never asked"), clock)
    disconnected._factory.size = 0
    assert _outcome(defer.ensureDeferred(disconnected.execute("GET", "k"))).value.code == "SERVICE_UNAVAILABLE"
