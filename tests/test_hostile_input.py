"""Hostile input to the codec and the dispatcher: any frame gets an error or nothing, never a crash.

Property tests (hypothesis) feed a ClientConnection on an in-memory core with arbitrary bytes,
arbitrary JSON and MessagePack values, frame-shaped values and every operation with hostile
payload values, authenticated and not. After each frame: no reply but errors (or, for
valid-shaped operations, their documented replies), never SERVER_ERROR, nothing logged as a
failure, and the connection still answers a `ping`. Regression tests for what they found are
at the end.
"""

from __future__ import annotations

import base64
import json
import uuid

import msgpack
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from twisted.logger import LogLevel, globalLogPublisher

from construct.core.keys import MAX_BUNDLE_DATA_BYTES
from construct.protocol import codec, operations
from tests.helpers import PASSWORD, MemoryClient, b64, make_bundle, register

# Modest budgets: the whole file is part of the normal suite.
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
PER_OPERATION = settings(SETTINGS, max_examples=20)

# Every reply type an operation may legitimately produce (valid-shaped input may succeed).
REPLY_TYPES = {
    "registerSuccess", "loginSuccess", "connectSuccess", "sessionExpired", "publicKeyBundle", "ack",
    "keyRotationSuccess", "prekeysUploaded", "prekeyCount", "userFound", "changePasswordSuccess",
    "logoutSuccess", "accountDeleted", "pong", "senderCertificate", "serverKeys",
}
PROBE = "probe-after-hostile-frame"


# pytest-twisted and parametrized hypothesis tests

_INNER_TESTS: dict = {}


@pytest.fixture(autouse=True)
def fresh_inner_test(request):
    """pytest-twisted wraps a hypothesis test's `inner_test` in place each time it runs one, and
    the items of a parametrized test share one function: hand each item the original again, or
    the second item nests the wrappers (and fails with "blockon cannot be called from the twisted greenlet")."""
    handle = getattr(request.function, "hypothesis", None)
    if handle is not None:
        handle.inner_test = _INNER_TESTS.setdefault(request.function, handle.inner_test)


# Logged failures


@pytest.fixture
def logged_failures():
    """Every failure or error logged through twisted.logger while the test runs."""
    events: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def describe(events: list[dict]) -> str:
    lines = []
    for event in events:
        failure = event.get("log_failure")
        lines.append(failure.getTraceback() if failure is not None else repr(event.get("log_format")))
    return "\n".join(lines)


# Sending one frame and checking what comes back


async def exchange(client: MemoryClient, data: bytes, encoding: str) -> list[dict]:
    """Send one frame, then a ping probe; return the frames that came before the probe's pong."""
    client.send_raw(data, encoding)
    return await probe(client)


async def probe(client: MemoryClient) -> list[dict]:
    """Send a ping; return the frames that came before its pong (which must come)."""
    client.connection.frame_received(codec.encode("ping", None, PROBE, codec.JSON), codec.JSON)
    before = []
    while True:
        frame = await client.next(timeout=10)
        if frame.get("requestId") == PROBE:
            assert frame["type"] == "pong", frame
            return before
        before.append(frame)


def check_replies(frames: list[dict], failures: list[dict], allow_success: bool = False) -> None:
    assert not failures, describe(failures)
    replies = [frame for frame in frames if frame["type"] != "message"]
    assert len(replies) <= 1, frames
    for frame in replies:
        if frame["type"] == "error":
            assert isinstance(frame["payload"]["code"], str) and frame["payload"]["code"] != "SERVER_ERROR", frame
            assert isinstance(frame["payload"]["message"], str), frame
        else:
            assert allow_success and frame["type"] in REPLY_TYPES, frame


# Value strategies

UTF8_TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
_TRICKY = [
    "", " ", "\x00", "a\x00b", "\u202e\u0645", "\ufeff", "\U0001d54f" * 8, "é" * 40, "İ" * 20,
    "../../etc/passwd", "' OR 1=1 --", "%s%n%x", "\\u0000", "null", "NaN", "-0", "1e999", "{}", "[]",
    "<script>alert(1)</script>", "00000000-0000-0000-0000-000000000000", "urn:uuid:" + "0" * 32,
    "{" + "f" * 32 + "}", "٠" * 32, "AAAA", "====", "A" * 43, "alice", PASSWORD,
]
# Built when drawn: hypothesis spells out a sampled_from's values in reprs.
LONG_STRINGS = st.sampled_from([("x", 70_000), ("é", 40_000), ("\U0001f600", 20_000)]).map(lambda pair: pair[0] * pair[1])
# Half of them with a NUL character (which PostgreSQL refuses in text) at the end.
TRICKY_STRINGS = (st.sampled_from(_TRICKY) | LONG_STRINGS).flatmap(lambda text: st.sampled_from([text, text + "\x00"]))
HUGE_INTS = st.sampled_from([
    -1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
    10**30, -(10**30), 10**400,
])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), UTF8_TEXT, TRICKY_STRINGS,
    st.binary(max_size=40),
)
HOSTILE = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(UTF8_TEXT, children, max_size=4),
    max_leaves=12,
)
DEEP = st.integers(1, 3000).map(lambda depth: json.loads("[" * min(depth, 500) + "]" * min(depth, 500)))


def msgpack_extras(children):
    """MessagePack-only values: extension types, timestamps, maps with non-string keys."""
    return (
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
        | st.builds(msgpack.Timestamp, st.integers(0, 2**33), st.integers(0, 999_999_999))
        | st.dictionaries(st.one_of(st.binary(max_size=4), st.integers(), st.none(), UTF8_TEXT), children, max_size=3)
    )


MSGPACK_VALUES = st.recursive(
    SCALARS | msgpack_extras(SCALARS),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(UTF8_TEXT, children, max_size=4),
    max_leaves=12,
)


def for_json(value):
    """Something Python's json module writes (it keeps huge ints and writes NaN as the server must refuse it)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
        return repr(value)
    if isinstance(value, list):
        return [for_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key) if not isinstance(key, bytes) else key.decode("latin-1"): for_json(item) for key, item in value.items()}
    return value


def for_msgpack(value):
    """Something MessagePack holds: integers past 64 bits become floats (the format has no bigger ints)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float("inf") if value > 0 else float("-inf") if value > 10**308 or value < -(10**308) else float(value)
    if isinstance(value, list):
        return [for_msgpack(item) for item in value]
    if isinstance(value, dict):
        return {for_msgpack(key) if isinstance(key, int) else key: for_msgpack(item) for key, item in value.items()}
    return value


def encode_value(value, encoding: str) -> bytes:
    if encoding == codec.MSGPACK:
        return msgpack.packb(for_msgpack(value), use_bin_type=True)
    return json.dumps(for_json(value)).encode("utf-8")


ENCODINGS = st.sampled_from([codec.JSON, codec.MSGPACK])


# Frames with anything in them (one backend: these rarely get past the codec)


@given(data=st.binary(max_size=600), encoding=ENCODINGS)
@SETTINGS
@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_any_bytes_get_an_error(core, logged_failures, data, encoding):
    """Arbitrary bytes as a JSON or MessagePack frame get at most an error, and ping still works."""
    client = MemoryClient(core, encoding)
    try:
        check_replies(await exchange(client, data, encoding), logged_failures)
    finally:
        client.close()


@given(value=st.one_of(HOSTILE, DEEP), raw=st.sampled_from([False, True]))
@SETTINGS
@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_any_json_value_gets_an_error(core, logged_failures, value, raw):
    """Any JSON value (huge integers, NaN, deep nesting) as a text frame gets at most an error."""
    client = MemoryClient(core)
    data = json.dumps(for_json(value)).encode("utf-8")
    if raw:
        data = data + b"\n" + data  # two values glued: not one JSON document
    try:
        check_replies(await exchange(client, data, codec.JSON), logged_failures)
    finally:
        client.close()


@given(value=st.one_of(MSGPACK_VALUES, DEEP))
@SETTINGS
@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_any_msgpack_value_gets_an_error(core, logged_failures, value):
    """Any MessagePack value (bin, ext types, NaN, non-string keys) as a binary frame gets at most an error."""
    client = MemoryClient(core, codec.MSGPACK)
    try:
        check_replies(await exchange(client, encode_value(value, codec.MSGPACK), codec.MSGPACK), logged_failures)
    finally:
        client.close()


FRAME_TYPES = st.one_of(st.sampled_from(sorted(operations.OPERATIONS)), UTF8_TEXT, TRICKY_STRINGS, HOSTILE)


@given(
    message_type=FRAME_TYPES,
    payload=st.one_of(HOSTILE, st.dictionaries(UTF8_TEXT, HOSTILE, max_size=5)),
    request_id=st.one_of(st.none(), UTF8_TEXT, TRICKY_STRINGS, HOSTILE, st.just("r" * 129)),
    keys=st.sets(st.sampled_from(["type", "payload", "requestId"])),
    encoding=ENCODINGS,
)
@SETTINGS
@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_frame_shaped_values_get_an_error_or_a_reply(core, logged_failures, message_type, payload, request_id, keys, encoding):
    """Frames with hostile type, payload and requestId get one reply at most, never a crash."""
    frame = {"type": message_type, "payload": payload, "requestId": request_id}
    frame = {key: value for key, value in frame.items() if key in keys}
    client = MemoryClient(core, encoding)
    try:
        frames = await exchange(client, encode_value(frame, encoding), encoding)
        check_replies(frames, logged_failures, allow_success=True)
    finally:
        client.close()


@given(
    encoding=ENCODINGS,
    message_type=st.sampled_from(sorted(operations.OPERATIONS)),
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    truncate=st.one_of(st.none(), st.integers(0, 400)),
)
@SETTINGS
@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_mutated_valid_frames_get_an_error_or_a_reply(core, logged_failures, encoding, message_type, cuts, truncate):
    """A valid-looking frame with bytes flipped or cut off gets one reply at most, never a crash."""
    payload = {
        "username": "mutant", "password": PASSWORD, "publicKey": make_bundle(), "sessionToken": "A" * 43,
        "userId": str(uuid.uuid4()), "messageIds": [str(uuid.uuid4())],
    }
    data = bytearray(codec.encode(message_type, payload, "7", encoding))
    for position, byte in cuts:
        data[position % len(data)] = byte
    if truncate is not None:
        del data[truncate:]
    client = MemoryClient(core, encoding)
    try:
        check_replies(await exchange(client, bytes(data), encoding), logged_failures, allow_success=True)
    finally:
        client.close()


# Every operation with hostile payload values, on every backend, authenticated and not


def signed_bundle(data: bytes, signing_key: SigningKey | None = None) -> dict:
    """An UploadableKeyBundle whose bundleData is exactly `data`, correctly signed."""
    signing_key = signing_key or SigningKey.generate()
    return {
        "masterIdentityKey": b64(bytes(signing_key.verify_key)),
        "bundleData": b64(data),
        "signature": b64(signing_key.sign(data).signature),
    }


def suite_values():
    key = st.one_of(st.binary(min_size=32, max_size=32).map(b64), HOSTILE)
    return st.fixed_dictionaries(
        {},
        optional={
            "suiteId": st.one_of(st.just(1), st.just(1.0), st.just(True), HOSTILE),
            "identityKey": key,
            "signedPrekey": key,
            "oneTimePrekeys": st.one_of(st.lists(key, max_size=3), HOSTILE),
        },
    )


def bundle_data_values(user_id: str):
    """What a signer may put in bundleData: hostile JSON, deep nesting, not JSON, not UTF-8."""
    document = st.fixed_dictionaries(
        {},
        optional={
            "userId": st.one_of(st.just(""), st.just(user_id), HOSTILE),
            "timestamp": st.one_of(st.just("2026-01-02T10:00:00Z"), HOSTILE),
            "supportedSuites": st.one_of(st.lists(suite_values(), max_size=3), HOSTILE),
        },
    ).map(lambda value: json.dumps(for_json(value)).encode("utf-8"))
    depths = st.sampled_from([900, 1000, 3000, 6000]) | st.integers(1, 6000)
    nested = depths.map(lambda depth: b"[" * depth + b"]" * depth)
    nested_in_field = depths.map(
        lambda depth: b'{"userId": "", "timestamp": "t", "supportedSuites": [{"suiteId": ' + b"[" * depth + b"]" * depth + b"}]}"
    )
    return st.one_of(document, nested, nested_in_field, st.binary(max_size=64), st.just(b"NaN"), st.just(b"\xff\xfe"))


def hostile_bundles(user_id: str):
    """Key bundles that are wrong in one way or many; most are correctly signed, so every check runs."""
    signed = bundle_data_values(user_id).filter(lambda data: len(b64(data)) <= MAX_BUNDLE_DATA_BYTES).map(signed_bundle)
    return st.one_of(
        signed,
        signed,
        st.builds(lambda: make_bundle(user_id=str(uuid.uuid4()))),
        st.fixed_dictionaries({}, optional={"masterIdentityKey": HOSTILE, "bundleData": HOSTILE, "signature": HOSTILE}),
        HOSTILE,
    )


HOSTILE_ANYTHING = st.one_of(TRICKY_STRINGS, SCALARS, HOSTILE)


def field_values(context: dict) -> dict:
    """For each payload field of any operation: (a valid value, a hostile one)."""
    ids = [context["self_id"], context["other_id"]]
    prekey = st.builds(lambda key_id: {"keyId": key_id, "publicKey": b64(uuid.uuid4().bytes * 2)}, st.integers(0, 2**32 - 2))
    hostile_prekey = st.fixed_dictionaries(
        {}, optional={"keyId": st.one_of(HUGE_INTS, HOSTILE_ANYTHING), "publicKey": HOSTILE_ANYTHING}
    )
    hostile_ids = st.lists(st.one_of(st.sampled_from(ids), HOSTILE_ANYTHING), max_size=4)
    return {
        "username": (
            st.sampled_from([context["self_name"], context["other_name"]]) | st.uuids().map(lambda u: "u" + u.hex[:12]),
            HOSTILE_ANYTHING,
        ),
        "password": (st.just(PASSWORD), HOSTILE_ANYTHING),
        "publicKey": (st.builds(lambda: make_bundle()), hostile_bundles("")),
        "sessionToken": (st.just(context["token"]), HOSTILE_ANYTHING | st.just("A" * 43)),
        "userId": (st.sampled_from(ids), HOSTILE_ANYTHING),
        "oneTimePrekey": (st.booleans(), HOSTILE_ANYTHING),
        "id": (st.uuids().map(str), HOSTILE_ANYTHING),
        "from": (st.just(context["self_id"]), HOSTILE_ANYTHING | st.just(context["other_id"])),
        "to": (st.just(context["other_id"]), HOSTILE_ANYTHING | st.sampled_from([context["self_id"], str(uuid.uuid4())])),
        "ephemeralPublicKey": (st.binary(min_size=32, max_size=32), HOSTILE_ANYTHING),
        "messageNumber": (st.integers(0, 2**32 - 1), HUGE_INTS | HOSTILE_ANYTHING),
        "content": (st.just("Y2lwaGVydGV4dA==") | UTF8_TEXT.filter(bool), HOSTILE_ANYTHING),
        "timestamp": (st.integers(0, 2**64 - 1), HUGE_INTS | HOSTILE_ANYTHING),
        "messageIds": (st.lists(st.uuids().map(str), min_size=1, max_size=3), hostile_ids | HOSTILE_ANYTHING),
        "update": (st.builds(lambda: make_bundle(user_id=context["self_id"])), hostile_bundles(context["self_id"])),
        "prekeys": (
            st.lists(prekey, min_size=1, max_size=3, unique_by=lambda p: p["keyId"]),
            st.lists(prekey | hostile_prekey, max_size=4) | HOSTILE_ANYTHING,
        ),
        "oldPassword": (st.just(PASSWORD), HOSTILE_ANYTHING),
        "newPassword": (st.just("Another9Password"), HOSTILE_ANYTHING),
        "newPasswordConfirm": (st.just("Another9Password"), HOSTILE_ANYTHING),
        "accessKey": (st.binary(min_size=16, max_size=16).map(b64), HOSTILE_ANYTHING),
        "unidentifiedAccessKey": (st.none() | st.binary(min_size=16, max_size=16).map(b64), HOSTILE_ANYTHING),
        "unrestrictedUnidentifiedAccess": (st.booleans(), HOSTILE_ANYTHING),
    }


# The payload fields each operation reads (docs/protocol.md §6).
OPERATION_FIELDS = {
    "register": ["username", "password", "publicKey", "unidentifiedAccessKey", "unrestrictedUnidentifiedAccess"],
    "login": ["username", "password"],
    "connect": ["sessionToken"],
    "getPublicKey": ["userId", "oneTimePrekey"],
    "sendMessage": ["id", "from", "to", "ephemeralPublicKey", "messageNumber", "content", "timestamp"],
    "ackMessage": ["messageIds"],
    "sendSealed": ["id", "to", "content", "accessKey"],
    "getSenderCertificate": [],
    "getServerKeys": [],
    "rotatePrekey": ["userId", "update", "unidentifiedAccessKey", "unrestrictedUnidentifiedAccess"],
    "uploadPrekeys": ["prekeys"],
    "getPrekeyCount": [],
    "lookupUser": ["username"],
    "changePassword": ["sessionToken", "oldPassword", "newPassword", "newPasswordConfirm"],
    "logout": ["sessionToken"],
    "deleteAccount": ["sessionToken", "password"],
    "ping": [],
}


def test_every_operation_is_covered():
    """The hostile-payload test knows the fields of every operation in the table."""
    assert set(OPERATION_FIELDS) == set(operations.OPERATIONS)


@pytest_twisted.async_fixture
async def other_user(core):
    """A user to write to and look up; registered once per test, then offline."""
    client, payload = await register(core, f"other-{uuid.uuid4().hex[:8]}")
    client.close()
    return payload


# Accounts and keys live in SQL in both modes: Redis only adds the inbox and presence.
REDIS_OPERATIONS = {
    "register", "login", "connect", "sendMessage", "sendSealed", "ackMessage", "logout", "changePassword", "deleteAccount",
}
BACKEND_OPERATIONS = (
    [("sqlite", name) for name in sorted(OPERATION_FIELDS)]
    + [("postgres", name) for name in sorted(OPERATION_FIELDS) if name != "ping"]
    + [("redis", name) for name in sorted(REDIS_OPERATIONS)]
)


@pytest.mark.parametrize("backend, operation", BACKEND_OPERATIONS)
@given(data=st.data())
@PER_OPERATION
@pytest_twisted.ensureDeferred
async def test_operations_with_hostile_payloads(core, other_user, logged_failures, operation, data):
    """Each operation, with each field plausible, hostile or missing, answers with its reply or an error."""
    encoding = data.draw(ENCODINGS, label="encoding")
    authenticated = data.draw(st.booleans(), label="authenticated")
    if authenticated:
        client, me = await register(core, f"m-{uuid.uuid4().hex[:12]}", encoding)
    else:
        client, me = MemoryClient(core, encoding), {"userId": str(uuid.uuid4()), "username": "anonymous", "sessionToken": "B" * 43}
    context = {
        "self_id": me["userId"], "self_name": me["username"], "token": me["sessionToken"],
        "other_id": other_user["userId"], "other_name": other_user["username"],
    }
    fields = field_values(context)
    names = OPERATION_FIELDS[operation]
    extras = st.dictionaries(UTF8_TEXT, HOSTILE, max_size=2)
    count = data.draw(st.integers(1, 3), label="frames")
    try:
        for index in range(count):
            # Some fields hostile, a few missing, the others valid: each check gets its turn.
            one = st.sets(st.sampled_from(names), min_size=1, max_size=1)
            hostile = data.draw(one | st.sets(st.sampled_from(names), min_size=1) if names else st.just(set()), label="hostile")
            missing = data.draw(st.sets(st.sampled_from(names), max_size=1) if names else st.just(set()), label="missing")
            payload = data.draw(extras, label="extra fields")
            for name in names:
                if name not in missing:
                    payload[name] = data.draw(fields[name][name in hostile], label=name)
            client.send_raw(encode_value({"type": operation, "payload": payload, "requestId": f"h{index}"}, encoding))
        frames = await probe(client)
        assert not logged_failures, describe(logged_failures)
        replies = [frame for frame in frames if frame["type"] not in ("message", "sessionExpired") or "requestId" in frame]
        # One reply at most per frame, in order; the error for a frame too large or not parsed has no requestId.
        ids = [frame.get("requestId") for frame in replies]
        assert [i for i in ids if i is not None] == sorted({i for i in ids if i is not None}), frames
        assert set(ids) <= {f"h{index}" for index in range(count)} | {None}, frames
        for frame in replies:
            check_replies([frame], logged_failures, allow_success=True)
            if "requestId" not in frame:
                assert frame["payload"]["code"] in ("MESSAGE_TOO_LARGE", "INVALID_FORMAT"), frame
    finally:
        client.close()


@given(data=bundle_data_values("").filter(lambda data: len(b64(data)) <= MAX_BUNDLE_DATA_BYTES), rotate=st.booleans())
@settings(SETTINGS, max_examples=80)
@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_signed_bundles_with_hostile_data(core, other_user, logged_failures, data, rotate):
    """A correctly signed bundle whose bundleData is anything gets INVALID_KEY_BUNDLE or is accepted."""
    if rotate:
        client, me = await register(core, f"k-{uuid.uuid4().hex[:12]}")
        data = data.replace(b'"userId": ""', b'"userId": "%s"' % me["userId"].encode())
        message = {"type": "rotatePrekey", "payload": {"update": signed_bundle(data)}, "requestId": "b"}
    else:
        client = MemoryClient(core)
        payload = {"username": f"k-{uuid.uuid4().hex[:12]}", "password": PASSWORD, "publicKey": signed_bundle(data)}
        message = {"type": "register", "payload": payload, "requestId": "b"}
    try:
        frames = await exchange(client, encode_value(message, codec.JSON), codec.JSON)
        check_replies(frames, logged_failures, allow_success=True)
        assert frames[0]["type"] in ("registerSuccess", "keyRotationSuccess") or frames[0]["payload"]["code"] == "INVALID_KEY_BUNDLE", frames
    finally:
        client.close()


# Regressions: inputs the tests above found, kept as plain examples


def _nested_bundle(depth: int, user_id: str = "") -> dict:
    return signed_bundle(b'{"userId": "%s", "timestamp": "t", "supportedSuites": ' % user_id.encode() + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest_twisted.ensureDeferred
async def test_deeply_nested_bundle_data_is_invalid_not_a_crash(core, logged_failures):
    """A signed bundleData nested thousands deep is INVALID_KEY_BUNDLE (it was a RecursionError, SERVER_ERROR)."""
    client = MemoryClient(core)
    reply = await client.request("register", {"username": "deep", "password": PASSWORD, "publicKey": _nested_bundle(4000)})
    assert reply["type"] == "error" and reply["payload"]["code"] == "INVALID_KEY_BUNDLE", reply
    assert not logged_failures, describe(logged_failures)


@pytest.mark.parametrize("backend", ["postgres"])
@pytest_twisted.ensureDeferred
async def test_nul_in_login_username_is_invalid_credentials(core, logged_failures):
    """A NUL character in a login username is a wrong login, also on PostgreSQL (which refuses NUL in text)."""
    client = MemoryClient(core)
    for username in ("alice\x00", "\x00"):
        reply = await client.request("login", {"username": username, "password": PASSWORD})
        assert reply["type"] == "error" and reply["payload"]["code"] == "INVALID_CREDENTIALS", reply
    assert not logged_failures, describe(logged_failures)
