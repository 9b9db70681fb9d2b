"""A fuzz run against a live server: hostile WebSocket, TCP and HTTP clients next to two honest users.

Many connections at once send random and mutated frames, lines and HTTP requests while two
registered users chat over WebSocket and acknowledge what they receive. Afterwards the server
still runs and answers /health, each honest user got every message its peer was acknowledged
for exactly once and in order, no HTTP answer was a 5xx, no reply was SERVER_ERROR, and the
server's log holds no traceback.

Bounded by default (CONSTRUCT_FUZZ_SECONDS, default 3 per mode). Longer runs and reproducing a
failure: docs/fuzzing.md (CONSTRUCT_FUZZ_SECONDS, CONSTRUCT_FUZZ_SEED).
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import time
import uuid
from dataclasses import dataclass, field

import msgpack
import pytest
import pytest_twisted
import treq
from autobahn.exception import Disconnected
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from construct.protocol import codec
from construct.protocol.ws import ConstructWebSocketProtocol
from tests.clients import WsClient
from tests.conftest import REDIS_URL
from tests.helpers import PASSWORD, chat_message, make_bundle
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("CONSTRUCT_FUZZ_SECONDS", "3"))
SEED = int(os.environ.get("CONSTRUCT_FUZZ_SEED", str(random.SystemRandom().randrange(2**32))))
WS_FUZZERS = 6
TCP_FUZZERS = 4
HTTP_FUZZERS = 4
IDLE_CONNECTIONS = 40
# Refusals that mean "not now, try again": the honest users wait and go on.
NOT_NOW = ("RATE_LIMITED", "SERVER_BUSY")
# The server's limits with default options (docs/protocol.md §2.3).
FRAME_LIMIT = 2 * 65536 + 16384
WS_HARD_CAP = 4 * FRAME_LIMIT


# Hostile values and frames


HOSTILE_VALUES = [
    None, True, False, 0, -1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("nan"), float("inf"), "", " ",
    "\x00", "a\x00b", "\u202e", "\ufeff", "é" * 50, "\U0001d54f" * 10, "x" * 5000, "../../etc/passwd", "' OR 1=1 --",
    "%s%n", "null", "00000000-0000-0000-0000-000000000000", "A" * 43, "AAAA", b"", b"\x00" * 32, b"\xff" * 33, [],
    [None], [[[[[]]]]], {}, {"a": {"b": {"c": []}}}, ["x"] * 200,
]
TYPES = [
    "register", "login", "connect", "getPublicKey", "sendMessage", "sendSealed", "ackMessage", "rotatePrekey",
    "uploadPrekeys", "getPrekeyCount", "lookupUser", "changePassword", "logout", "deleteAccount", "ping", "", "PING",
    "message", "error", "__proto__",
]


@dataclass
class Context:
    """What the fuzzers know and what they saw."""

    rng_seed: int
    deadline: float
    alice_id: str = ""
    bob_id: str = ""
    http_token: str = ""
    ws_token: str = ""
    server_errors: list = field(default_factory=list)
    http_5xx: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def count(self, name: str, by: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + by

    def saw(self, frame: object, where: str) -> None:
        if isinstance(frame, dict) and frame.get("type") == "error":
            payload = frame.get("payload") or {}
            if payload.get("code") == "SERVER_ERROR":
                self.server_errors.append((where, frame))


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def first_of(seconds: float, *sources: defer.Deferred) -> defer.Deferred:
    """Fires with the first result of `sources`, or with None after `seconds`; never cancels a source."""
    result: defer.Deferred = defer.Deferred()

    def fire(value):
        if not result.called:
            result.callback(value)
        return value

    for source in sources:
        source.addBoth(fire)
    timer = reactor.callLater(seconds, fire, None)
    result.addBoth(lambda value: (timer.cancel() if timer.active() else None, value)[1])
    return result


def hostile(rng: random.Random, depth: int = 0):
    choice = rng.random()
    if choice < 0.6 or depth > 3:
        return rng.choice(HOSTILE_VALUES)
    if choice < 0.8:
        return [hostile(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["id", "to", "x", "", "payload", "type"]): hostile(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def valid_payload(rng: random.Random, ctx: Context, message_type: str) -> dict:
    """A payload that would pass (or nearly pass) validation; mutated afterwards."""
    target = rng.choice([ctx.alice_id, ctx.bob_id, str(uuid.uuid4())])
    payloads = {
        "register": {"username": f"f{rng.getrandbits(40):x}", "password": PASSWORD, "publicKey": make_bundle()},
        "login": {"username": rng.choice(["alice", "bob", "nobody"]), "password": rng.choice([PASSWORD, "Wrong1password"])},
        "connect": {"sessionToken": rng.choice(["A" * 43, ctx.ws_token])},
        "getPublicKey": {"userId": target, "oneTimePrekey": rng.choice([True, False])},
        "sendMessage": chat_message(rng.choice([ctx.alice_id, str(uuid.uuid4())]), target, content=base64.b64encode(rng.randbytes(rng.randint(1, 64))).decode()),
        "sendSealed": {"id": str(uuid.uuid4()), "to": target, "content": base64.b64encode(rng.randbytes(64)).decode(),
                       "accessKey": base64.b64encode(rng.randbytes(16)).decode()},
        "ackMessage": {"messageIds": [str(uuid.uuid4()) for _ in range(rng.randint(1, 3))]},
        "rotatePrekey": {"update": make_bundle()},
        "uploadPrekeys": {"prekeys": [{"keyId": rng.randint(0, 100), "publicKey": base64.b64encode(rng.randbytes(32)).decode()}]},
        "lookupUser": {"username": rng.choice(["alice", "bob", "zz"])},
        "changePassword": {"oldPassword": PASSWORD, "newPassword": "Other9Password", "newPasswordConfirm": "Other9Password"},
        "deleteAccount": {"password": PASSWORD},
    }
    return dict(payloads.get(message_type, {}))


def mutate_payload(rng: random.Random, payload: dict) -> dict:
    for _ in range(rng.randint(0, 3)):
        action = rng.random()
        if payload and action < 0.5:
            payload[rng.choice(list(payload))] = hostile(rng)
        elif payload and action < 0.7:
            del payload[rng.choice(list(payload))]
        else:
            payload[rng.choice(["extra", "from", "to", "content", "id", "\x00"])] = hostile(rng)
    return payload


def to_json(value):
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def frame_bytes(rng: random.Random, ctx: Context, binary: bool) -> bytes:
    """One frame: random bytes, random text, or a valid-shaped message with mutated fields (and bytes)."""
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randint(0, 300))
    if kind < 0.25:
        return "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(0, 100))).encode()
    if kind < 0.27:
        return b"[" * rng.randint(500, 5000) + b"]" * rng.randint(0, 5000)
    if kind < 0.29:
        return b"\x91" * rng.randint(500, 5000)
    message_type = rng.choice(TYPES)
    message = {"type": message_type, "payload": mutate_payload(rng, valid_payload(rng, ctx, message_type))}
    if rng.random() < 0.5:
        message["requestId"] = rng.choice(["1", "x" * 129, None, 5, "é"])
    if rng.random() < 0.1:
        message = mutate_payload(rng, message)
    if binary:
        try:
            data = msgpack.packb(message, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            data = msgpack.packb({"type": message_type}, use_bin_type=True)
    else:
        data = json.dumps(to_json(message)).encode()
    if rng.random() < 0.2 and data:
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    if rng.random() < 0.05:
        data = data[: rng.randrange(len(data) + 1)]
    return data


# Honest users


class HonestUser:
    """A WebSocket client that sends to its peer one message at a time and acknowledges every push."""

    def __init__(self, name: str, client: WsClient, ctx: Context) -> None:
        self.name = name
        self.client = client
        self.ctx = ctx
        self.user_id = ""
        self.waiting: dict[str, defer.Deferred] = {}
        self.received: list[tuple[str, str]] = []
        self.acked: list[str] = []
        self.refused: list[dict] = []
        self.stray: list[dict] = []
        client.received = self  # frames are handed to put() as they arrive

    def put(self, frame: dict) -> None:
        self.ctx.saw(frame, self.name)
        request_id = frame.get("requestId")
        if frame["type"] == "message" and request_id is None:
            message = frame["payload"]
            self.received.append((message["from"], message["id"]))
            self.client.send("ackMessage", {"messageIds": [message["id"]]}, f"ack-{message['id']}")
        elif request_id in self.waiting:
            self.waiting.pop(request_id).callback(frame)
        else:
            self.stray.append(frame)

    async def request(self, message_type: str, payload: dict, request_id: str) -> dict:
        waiter = self.waiting[request_id] = defer.Deferred()
        self.client.send(message_type, payload, request_id)
        return await waiter.addTimeout(30, reactor)

    async def register(self, username: str) -> dict:
        reply = await self.request("register", {"username": username, "password": PASSWORD, "publicKey": make_bundle()}, "reg")
        assert reply["type"] == "registerSuccess", reply
        self.user_id = reply["payload"]["userId"]
        return reply["payload"]

    async def chat(self, peer_id: str) -> None:
        number = 0
        while self.ctx.running():
            message = chat_message(self.user_id, peer_id, content=f"{self.name}-{number}", messageNumber=number)
            reply = await self.request("sendMessage", message, f"send-{number}")
            if reply["type"] == "ack":
                assert reply["payload"]["messageId"] == message["id"], reply
                self.acked.append(message["id"])
            else:
                self.refused.append(reply)
                # A long run can reach the send limit, and the fuzzers can load the server past what
                # it takes (SERVER_BUSY): both say "not now", as a real client would hear them.
                if reply["payload"]["code"] in NOT_NOW:
                    await sleep(min(reply["payload"].get("retryAfter", 1), max(0.0, self.ctx.deadline - time.monotonic())))
            number += 1
            if number % 10 == 0:
                await sleep(0.01)


# Fuzzers


class Collector:
    """Frames a fuzzer's connection receives: checked, then resolving its ping probes."""

    def __init__(self, ctx: Context, where: str) -> None:
        self.ctx = ctx
        self.where = where
        self.probes: dict[str, defer.Deferred] = {}

    def put(self, frame: object) -> None:
        self.ctx.count(f"{self.where} replies")
        self.ctx.saw(frame, self.where)
        if isinstance(frame, dict) and frame.get("requestId") in self.probes:
            self.probes.pop(frame["requestId"]).callback(frame)


async def probe_ws(client: WsClient, collector: Collector, ctx: Context, number: int) -> None:
    """A ping must be answered while the connection stays open."""
    request_id = f"probe-{number}"
    answered = collector.probes[request_id] = defer.Deferred()
    try:
        client.send("ping", None, request_id)
    except Disconnected:
        return
    if await first_of(30, answered, client.closed) is None:
        ctx.problems.append(f"websocket ping {request_id} unanswered for 30 s on an open connection")


async def ws_fuzzer(ctx: Context, port: int, index: int) -> None:
    rng = random.Random(ctx.rng_seed * 1000 + index)
    number = 0
    while ctx.running():
        binary = rng.random() < 0.5
        try:
            client = await WsClient.connect(port, codec.MSGPACK if binary else codec.JSON, rng.choice(["/ws", "/"]))
        except Exception:
            ctx.count("ws connect failed")
            await sleep(0.05)
            continue
        ctx.count("ws connections")
        collector = client.received = Collector(ctx, "websocket")
        for _ in range(rng.randint(1, 40)):
            if client.closed.called or not ctx.running():
                break
            choice = rng.random()
            if choice < 0.01:
                data, frame_binary = b"x" * rng.choice([FRAME_LIMIT + 1, WS_HARD_CAP + 1]), rng.random() < 0.5
            else:
                frame_binary = binary if rng.random() < 0.8 else not binary
                data = frame_bytes(rng, ctx, frame_binary)
                if not frame_binary:
                    # Invalid UTF-8 in a text frame closes the connection (1007): only sometimes.
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError:
                        if rng.random() < 0.9:
                            data = data.decode("utf-8", "replace").encode("utf-8")
            try:
                client.send_raw(data, frame_binary)
            except Disconnected:  # the server is closing it (1007, 1009): expected for some frames
                break
            ctx.count("ws frames")
            number += 1
            if number % 8 == 0:
                await probe_ws(client, collector, ctx, number)
            await sleep(0)
        if not client.closed.called:
            if rng.random() < 0.3:
                client.protocol.transport.abortConnection()
            else:
                client.protocol.sendClose()
            if await first_of(30, client.closed) is None:
                ctx.problems.append("a websocket connection did not close within 30 s")


class RawProtocol(protocol.Protocol):
    """Collects everything the server sends; `done` fires with it when the connection closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.data)


async def raw_connection(port: int) -> RawProtocol:
    return await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10).connect(
        protocol.Factory.forProtocol(RawProtocol)
    )


def tcp_chunk(rng: random.Random, ctx: Context) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return b"{" + b"x" * (FRAME_LIMIT + rng.randint(1, 50_000)) + b"\n"  # a line over the limit
    if kind < 0.1:
        return b"y" * rng.randint(1, 20_000)  # half a line, maybe finished by what follows
    if kind < 0.2:
        return rng.randbytes(rng.randint(0, 300))
    if kind < 0.25:
        return b"\r\n \n\n"
    return frame_bytes(rng, ctx, binary=False).replace(b"\n", b" ") + rng.choice([b"\n", b"\r\n", b"\n\n"])


async def tcp_fuzzer(ctx: Context, port: int, index: int) -> None:
    rng = random.Random(ctx.rng_seed * 1000 + 100 + index)
    while ctx.running():
        try:
            connection = await raw_connection(port)
        except Exception:
            ctx.count("tcp connect failed")
            await sleep(0.05)
            continue
        ctx.count("tcp connections")
        for _ in range(rng.randint(1, 30)):
            if connection.done.called or not ctx.running():
                break
            connection.transport.write(tcp_chunk(rng, ctx))
            ctx.count("tcp writes")
            await sleep(0)
        if not connection.done.called:
            if rng.random() < 0.5:
                # Still answering: a ping on a fresh line gets its pong.
                connection.transport.write(b'\n{"type":"ping","requestId":"tcp-probe"}\n')
                for _ in range(300):
                    if b'"requestId":"tcp-probe"' in connection.data or connection.done.called:
                        break
                    await sleep(0.1)
                else:
                    ctx.problems.append("tcp ping unanswered for 30 s on an open connection")
            connection.transport.abortConnection() if rng.random() < 0.3 else connection.transport.loseConnection()
        if await first_of(30, connection.done) is None:
            ctx.problems.append("a tcp connection did not close within 30 s")
            connection.transport.abortConnection()
        # Complete lines only: an aborted connection may end mid-line.
        for line in connection.data.split(b"\n")[:-1]:
            if line:
                try:
                    ctx.saw(json.loads(line), "tcp")
                except ValueError:
                    ctx.problems.append(f"tcp reply line is not JSON: {line[:200]!r}")


HTTP_PATHS = [
    "/v1/accounts", "/v1/sessions", "/v1/sessions/current", "/v1/accounts/current/password", "/v1/keys",
    "/v1/keys/{id}", "/v1/keys/{id}?oneTimePrekey={junk}", "/v1/keys/prekeys", "/v1/keys/prekeys/count",
    "/v1/users/{junk}", "/v1/users/alice", "/v1/messages", "/v1/messages?wait={wait}", "/v1/messages/ack",
    "/v1/openapi.json", "/v1/{junk}", "/v1", "/v1/", "/v1/keys/%00", "/v1/users/%ff%fe", "/v1/../v1/keys",
    "/v1/keys/" + "a" * 5000, "/ws", "/", "/v1/messages?wait=1e309", "/v1/messages?wait=nan",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "FOO", "CONNECT"]


def http_request(rng: random.Random, ctx: Context) -> bytes:
    junk = rng.choice(["x", "%00", "%20", "..", "é", "a" * 300, "%zz", "null", str(uuid.uuid4())])
    path = rng.choice(HTTP_PATHS).format(
        id=rng.choice([ctx.alice_id, ctx.bob_id, str(uuid.uuid4()), junk]), junk=junk,
        wait=rng.choice(["0", "0.5", "-1", "61", "abc", "", "1" * 400]),
    )
    method = rng.choice(METHODS)
    headers = ["Host: 127.0.0.1", "Connection: close"]
    token = rng.choice([ctx.http_token, ctx.http_token, "", "A" * 43, "\x01", "x" * 2000])
    auth = rng.random()
    if auth < 0.6:
        headers.append(f"Authorization: Bearer {token}")
    elif auth < 0.7:
        headers.append(f"Authorization: {rng.choice(['Basic abc', 'Bearer', 'bearer  ' + token, ''])}")
    if rng.random() < 0.3:
        headers.append(f"Content-Type: {rng.choice(['application/json', 'text/plain', 'multipart/form-data; boundary=x', ''])}")
    if rng.random() < 0.2:
        name = rng.choice(["X-Junk", "Upgrade", "Range", "Cookie"])
        headers.append(name + ": " + rng.choice(["websocket", "bytes=0-1", "x" * 100, "\x7f"]))
    body_kind = rng.random()
    if body_kind < 0.4:
        body = json.dumps(to_json(mutate_payload(rng, valid_payload(rng, ctx, rng.choice(TYPES))))).encode()
    elif body_kind < 0.6:
        body = rng.randbytes(rng.randint(0, 200))
    elif body_kind < 0.65:
        body = b"[" * 3000 + b"]" * 3000
    elif body_kind < 0.67:
        body = b"x" * (FRAME_LIMIT + 10)
    else:
        body = b""
    if rng.random() < 0.9:
        headers.append(f"Content-Length: {len(body) if rng.random() < 0.9 else max(0, len(body) - rng.randint(1, 10))}")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{header}\r\n" for header in headers) + "\r\n"
    return head.encode("utf-8") + body


async def http_fuzzer(ctx: Context, port: int, index: int) -> None:
    rng = random.Random(ctx.rng_seed * 1000 + 200 + index)
    while ctx.running():
        request = http_request(rng, ctx)
        try:
            connection = await raw_connection(port)
        except Exception:
            ctx.count("http connect failed")
            await sleep(0.05)
            continue
        connection.transport.write(request)
        ctx.count("http requests")
        response = await first_of(5, connection.done)
        if response is None:
            ctx.count("http timeouts")
            connection.transport.abortConnection()
            continue
        status_line = response.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ")
        if len(parts) >= 2 and parts[1].isdigit():
            ctx.count(f"http {parts[1].decode()[0]}xx")
            if parts[1].startswith(b"5"):
                ctx.http_5xx.append((request[:300], response[:500]))


async def idle_connections(ctx: Context, ports: dict, rng: random.Random) -> list:
    """Many connections opened at once, each sent one hostile frame, held open until the end."""
    opened = []
    for index in range(IDLE_CONNECTIONS):
        try:
            if index % 2:
                client = await WsClient.connect(ports["http"], codec.MSGPACK)
                client.received = Collector(ctx, "websocket")
                client.send_raw(frame_bytes(rng, ctx, True), True)
                opened.append(client.protocol.transport)
            else:
                connection = await raw_connection(ports["tcp"])
                connection.transport.write(frame_bytes(rng, ctx, False).replace(b"\n", b" ") + b"\n")
                opened.append(connection.transport)
        except Exception:
            ctx.count("idle connect failed")
    ctx.count("idle connections", len(opened))
    return opened


# The run


@pytest.fixture(params=["embedded", "production"])
def server(request, tmp_path):
    if request.param == "embedded":
        process = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
        yield process
        process.stop()
        return
    postgres_url = request.getfixturevalue("postgres_url")
    prefix = f"fuzz:{uuid.uuid4().hex[:12]}:"
    process = ServerProcess(
        tmp_path, "--database", postgres_url, "--redis", REDIS_URL, "--redis-prefix", prefix, "--bcrypt-cost", "4",
        "--instance-id", "fuzz",
    ).start()
    yield process
    process.stop()
    subprocess.run(["sh", "-c", f"redis-cli --scan --pattern '{prefix}*' | xargs -r redis-cli DEL"], capture_output=True)


@pytest_twisted.ensureDeferred
async def test_fuzz_live_server(server):
    """Hostile clients on every transport leave the server up and honest users' chat intact."""
    print(f"fuzz seed {SEED} for {SECONDS} s (repeat with CONSTRUCT_FUZZ_SEED={SEED})")
    ctx = Context(SEED, deadline=float("inf"))
    rng = random.Random(SEED)
    ports = server.ports

    alice = HonestUser("alice", await WsClient.connect(ports["http"], codec.MSGPACK), ctx)
    bob = HonestUser("bob", await WsClient.connect(ports["http"], codec.JSON), ctx)
    ctx.alice_id = (await alice.register(f"alice{uuid.uuid4().hex[:8]}"))["userId"]
    ctx.bob_id = (await bob.register(f"bob{uuid.uuid4().hex[:8]}"))["userId"]
    response = await treq.post(
        f"http://127.0.0.1:{ports['http']}/v1/accounts",
        data=codec.json_bytes({"username": f"h{uuid.uuid4().hex[:10]}", "password": PASSWORD, "publicKey": make_bundle()}),
        headers={"Content-Type": "application/json"},
    )
    assert response.code == 201, await treq.content(response)
    ctx.http_token = json.loads(await treq.content(response))["sessionToken"]
    fuzz_ws = await WsClient.connect(ports["http"], codec.JSON)
    ctx.ws_token = (await fuzz_ws.request("register", {"username": f"w{uuid.uuid4().hex[:10]}", "password": PASSWORD, "publicKey": make_bundle()}))["payload"]["sessionToken"]
    await fuzz_ws.close()

    idle = await idle_connections(ctx, ports, rng)
    ctx.deadline = time.monotonic() + SECONDS
    fuzzers = (
        [ws_fuzzer(ctx, ports["http"], i) for i in range(WS_FUZZERS)]
        + [tcp_fuzzer(ctx, ports["tcp"], i) for i in range(TCP_FUZZERS)]
        + [http_fuzzer(ctx, ports["http"], i) for i in range(HTTP_FUZZERS)]
        + [alice.chat(ctx.bob_id), bob.chat(ctx.alice_id)]
    )
    results = await defer.DeferredList([defer.ensureDeferred(f) for f in fuzzers], consumeErrors=True)
    for ok, result in results:
        assert ok, f"seed {SEED}: a client task failed: {result.getTraceback()}"
    for transport in idle:
        transport.abortConnection()

    # Every acknowledged message arrives, exactly once and in order.
    def delivered(recipient: HonestUser, sender: HonestUser) -> list[str]:
        return [message_id for who, message_id in recipient.received if who == sender.user_id]

    for _ in range(300):
        if len(delivered(alice, bob)) >= len(bob.acked) and len(delivered(bob, alice)) >= len(alice.acked):
            break
        await sleep(0.1)
    ping = await alice.request("ping", {}, "final")
    assert ping["type"] == "pong", ping
    print(f"counts: {ctx.counts}; alice sent {len(alice.acked)}, bob sent {len(bob.acked)}")
    for sender, recipient in ((alice, bob), (bob, alice)):
        from_sender = delivered(recipient, sender)
        assert from_sender == sender.acked, f"seed {SEED}: {recipient.name} got {len(from_sender)} of {len(sender.acked)}"
        assert not [r for r in sender.refused if r["payload"]["code"] not in NOT_NOW], (SEED, sender.refused[:5])
        assert not [f for f in recipient.stray if f.get("type") != "message"], (SEED, recipient.stray[:5])
    assert alice.acked and bob.acked, f"seed {SEED}: the honest users sent nothing"

    assert not ctx.server_errors, f"seed {SEED}: SERVER_ERROR replies: {ctx.server_errors[:5]}"
    assert not ctx.http_5xx, f"seed {SEED}: 5xx answers: {ctx.http_5xx[:5]}"
    assert not ctx.problems, f"seed {SEED}: {ctx.problems[:5]}"
    assert server.process.poll() is None, f"seed {SEED}: the server exited:\n{server.log_text()[-5000:]}"
    health = await treq.get(f"http://127.0.0.1:{ports['health']}/health")
    assert health.code == 200, await treq.content(health)
    log = server.log_text()
    bad = [line for line in log.splitlines() if "Traceback" in line or "Unhandled" in line]
    assert not bad, f"seed {SEED}: the server logged failures:\n{log[-20000:]}"
    await alice.client.close()
    await bob.client.close()


# Regressions: what the fuzz run found, as fixed examples


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("fuzz-regressions"), "--data-dir", "data", "--bcrypt-cost", "4").start()
    yield process
    process.stop()


def tracebacks_since(server: ServerProcess, offset: int) -> str:
    text = server.log_text()[offset:]
    return text if "Traceback" in text or "Unhandled" in text else ""


@pytest.mark.parametrize("state", ["closing", "closed"])
def test_reply_after_the_websocket_began_closing_is_dropped(state):
    """A reply ready after Autobahn began failing the connection (here: invalid UTF-8, 1007) and
    before onClose is dropped; it was an unhandled Disconnected out of the connection's backlog."""
    protocol = ConstructWebSocketProtocol()
    protocol.state = {"closing": WebSocketProtocol.STATE_CLOSING, "closed": WebSocketProtocol.STATE_CLOSED}[state]
    protocol.write_frame(codec.encode("pong", None, "1", codec.JSON), codec.JSON)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/users/%ff%fe HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /v1/keys/%c3%28 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /v1/openapi.json HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n",
    ],
)
@pytest_twisted.ensureDeferred
async def test_non_utf8_url_is_400_without_a_traceback(embedded, request_bytes):
    """A path or Host that is not UTF-8 gets 400 and leaves no traceback in the log (Klein logged one each time)."""
    offset = len(embedded.log_text())
    connection = await raw_connection(embedded.ports["http"])
    connection.transport.write(request_bytes)
    response = await first_of(10, connection.done)
    assert response is not None and response.startswith(b"HTTP/1.1 400 "), response
    await sleep(0.1)
    assert not tracebacks_since(embedded, offset)
