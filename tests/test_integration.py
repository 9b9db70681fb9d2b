"""Real `twistd construct` processes on port 0, driven as clients drive them."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.plugin import getPlugins

from construct.protocol import codec
from tests.clients import HttpClient, TcpClient, WsClient
from tests.helpers import PASSWORD, chat_message, make_bundle
from tests.processes import REPO, ServerProcess, run_twistd

# Autobahn's closeHandshakeTimeout as the server sets it (construct.protocol.ws).
CLOSE_HANDSHAKE_TIMEOUT_SECONDS = 5

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server"), "--data-dir", "data", "--bcrypt-cost", "4").start()
    yield process
    assert process.stop() in (0, -15, 143)


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def _register(client, username: str) -> dict:
    reply = await client.request("register", {"username": username, "password": PASSWORD, "publicKey": make_bundle()})
    assert reply["type"] == "registerSuccess", reply
    return reply["payload"]


async def _tcp_alice_and_ws_bob(server) -> tuple:
    """alice registered over TCP, bob over WebSocket-MessagePack, on a server of their own."""
    alice = await TcpClient.connect(server.ports["tcp"])
    bob = await WsClient.connect(server.ports["http"], codec.MSGPACK)
    return alice, bob, await _register(alice, "alice"), await _register(bob, "bob")


def test_plugin_is_discoverable():
    """twistd finds the construct plugin through Twisted's plugin system."""
    import sys

    sys.path.insert(0, str(REPO))
    from twisted.application.service import IServiceMaker

    names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
    assert "construct" in names


@pytest_twisted.ensureDeferred
async def test_users_on_every_transport_chat(server):
    """WebSocket-MessagePack, WebSocket-JSON, TCP and HTTP users register, look up keys and exchange messages."""
    ws_bin = await WsClient.connect(server.ports["http"], codec.MSGPACK, "/ws")
    ws_json = await WsClient.connect(server.ports["http"], codec.JSON, "/")
    tcp = await TcpClient.connect(server.ports["tcp"])
    http = HttpClient(server.ports["http"])
    a = await _register(ws_bin, _name("wsbin"))
    b = await _register(ws_json, _name("wsjson"))
    c = await _register(tcp, _name("tcp"))
    status, d = await http.call("POST", "/v1/accounts", {"username": _name("http"), "password": PASSWORD, "publicKey": make_bundle()})
    assert status == 201
    http.token = d["sessionToken"]

    for client, target in ((ws_bin, b), (ws_json, c), (tcp, d)):
        bundle = await client.request("getPublicKey", {"userId": target["userId"]}, request_id="k")
        assert bundle["type"] == "publicKeyBundle" and bundle["requestId"] == "k"
        assert bundle["payload"]["username"] == target["username"]
    status, bundle = await http.call("GET", f"/v1/keys/{a['userId']}")
    assert status == 200 and bundle["username"] == a["username"]

    ring = [(ws_bin, a, ws_json, b), (ws_json, b, tcp, c), (tcp, c, None, d)]
    for sender, s, receiver, r in ring:
        message = chat_message(s["userId"], r["userId"])
        ack = await sender.request("sendMessage", message)
        assert ack["type"] == "ack" and ack["payload"]["status"] == ("delivered" if receiver else "queued")
        if receiver is not None:
            pushed = await receiver.next_of("message")
            assert pushed["payload"]["id"] == message["id"]
            receiver.send("ackMessage", {"messageIds": [message["id"]]})
    status, pending = await http.call("GET", "/v1/messages?wait=0")
    assert status == 200 and [m["from"] for m in pending["messages"]] == [c["userId"]]
    assert (await http.call("POST", "/v1/messages/ack", {"messageIds": [pending["messages"][0]["id"]]}))[0] == 204

    # HTTP sends; the WebSocket user is online and gets it live. A long-poll wakes on a send.
    status, ack = await http.call("POST", "/v1/messages", chat_message(d["userId"], a["userId"]))
    assert status == 200 and ack["status"] == "delivered"
    assert (await ws_bin.next_of("message"))["payload"]["from"] == d["userId"]
    poll = defer.ensureDeferred(http.call("GET", "/v1/messages?wait=10"))
    await task.deferLater(reactor, 0.3, lambda: None)
    late = chat_message(a["userId"], d["userId"])
    # A waiting long-poll counts as connected (protocol.md §7.6): the sender hears "delivered".
    assert (await ws_bin.request("sendMessage", late))["payload"]["status"] == "delivered"
    status, pending = await poll
    assert status == 200 and [m["id"] for m in pending["messages"]] == [late["id"]]

    # A new connection with the stored token gets nothing already acknowledged.
    await ws_json.close()
    again = await WsClient.connect(server.ports["http"], codec.JSON)
    assert (await again.request("connect", {"sessionToken": b["sessionToken"]}))["type"] == "connectSuccess"
    assert (await again.request("ping"))["type"] == "pong"
    for client in (ws_bin, again, tcp):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_garbage_on_every_port_leaves_others_chatting(server):
    """Malformed input on each transport gets an error; the offender and everyone else carry on."""
    alice_ws = await WsClient.connect(server.ports["http"], codec.MSGPACK)
    bob_tcp = await TcpClient.connect(server.ports["tcp"])
    a = await _register(alice_ws, _name("alice"))
    b = await _register(bob_tcp, _name("bob"))

    ws = await WsClient.connect(server.ports["http"], codec.MSGPACK)
    ws.send_raw(b"\xc1garbage", True)
    assert (await ws.next())["payload"]["code"] == "INVALID_FORMAT"
    ws.send_raw(b"not json", False)
    assert (await ws.next())["payload"]["code"] == "INVALID_FORMAT"
    ws.send_raw(b"\x00" * (200 * 1024), True)
    assert (await ws.next())["payload"]["code"] == "MESSAGE_TOO_LARGE"
    assert (await ws.request("ping"))["type"] == "pong"

    tcp = await TcpClient.connect(server.ports["tcp"])
    tcp.send_raw(b"\x00\xff garbage\n{\"type\": 5}\n")
    assert (await tcp.next())["payload"]["code"] == "INVALID_FORMAT"
    assert (await tcp.next())["payload"]["code"] == "INVALID_FORMAT"
    tcp.send_raw(b"x" * (400 * 1024) + b"\n")
    assert (await tcp.next())["payload"]["code"] == "MESSAGE_TOO_LARGE"
    assert (await tcp.request("ping"))["type"] == "pong"

    http = HttpClient(server.ports["http"])
    status, body = await http.call("POST", "/v1/accounts", raw=b"{{{")
    assert (status, body["code"]) == (400, "INVALID_FORMAT")
    status, body = await http.call("POST", "/v1/accounts", raw=b"x" * (2 * 1024 * 1024))
    assert (status, body["code"]) == (413, "MESSAGE_TOO_LARGE")
    status, body = await http.call("GET", "/v1/nowhere")
    assert (status, body["code"]) == (404, "NOT_FOUND")
    status, body = await http.call("POST", "/v1/messages", chat_message(a["userId"], b["userId"]))
    assert (status, body["code"]) == (401, "AUTH_REQUIRED")

    with socket.create_connection(("127.0.0.1", server.ports["health"])) as raw:
        raw.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        raw.recv(100)

    message = chat_message(a["userId"], b["userId"])
    assert (await alice_ws.request("sendMessage", message))["payload"]["status"] == "delivered"
    assert (await bob_tcp.next_of("message"))["payload"]["id"] == message["id"]
    response = await treq.get(f"http://127.0.0.1:{server.ports['health']}/health")
    assert response.code == 200 and (await response.json())["checks"] == {"database": "ok"}
    for client in (alice_ws, bob_tcp, ws, tcp):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_metrics_are_prometheus_text(server):
    """/metrics serves Prometheus text: open connections by transport and the message counters."""
    ws = await WsClient.connect(server.ports["http"], codec.JSON)
    tcp = await TcpClient.connect(server.ports["tcp"])
    await tcp.request("ping")
    response = await treq.get(f"http://127.0.0.1:{server.ports['health']}/metrics")
    text = (await treq.content(response)).decode()
    assert response.code == 200
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values['construct_connections{transport="websocket"}']) >= 1
    assert float(values['construct_connections{transport="tcp"}']) >= 1
    for name in ("construct_messages_accepted_total", "construct_messages_acknowledged_total",
                 "construct_send_to_ack_seconds_count", "construct_messages_expired_total"):
        assert name in values, name
    await ws.close()
    await tcp.close()


@pytest_twisted.ensureDeferred
async def test_sigkill_loses_no_unacknowledged_message(tmp_path):
    """Messages accepted before a SIGKILL are all delivered, in order, after a restart; acked ones never again."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    try:
        alice, bob, a, b = await _tcp_alice_and_ws_bob(server)
        messages = [chat_message(a["userId"], b["userId"], content=f"bXNn{i}") for i in range(30)]
        for message in messages:
            alice.send("sendMessage", message)
        acks = [await alice.next() for _ in messages]
        assert all(ack["type"] == "ack" for ack in acks)
        received = [(await bob.next_of("message"))["payload"]["id"] for _ in range(10)]
        assert received == [m["id"] for m in messages[:10]]
        bob.send("ackMessage", {"messageIds": received})
        # Frames are answered in order: once pong is back, the ack has been committed.
        bob.send("ping")
        await bob.next_of("pong")
        server.kill()

        server.start()
        bob = await WsClient.connect(server.ports["http"], codec.JSON)
        assert (await bob.request("connect", {"sessionToken": b["sessionToken"]}))["type"] == "connectSuccess"
        ids = [(await bob.next_of("message"))["payload"]["id"] for _ in range(20)]
        assert ids == [m["id"] for m in messages[10:]]
        bob.send("ackMessage", {"messageIds": ids})
        assert (await bob.request("ping"))["type"] == "pong"
        await bob.close()
    finally:
        server.stop()


def test_bad_options_and_unreachable_database_exit_with_one_line(tmp_path):
    """Startup problems end the process non-zero with one readable line, no traceback."""
    cases = [
        (["construct", "--bcrypt-cost", "many"], "--bcrypt-cost"),
        (["construct", "--listen", "bogus:1"], "--listen"),
        (["construct", "--database", "postgresql://127.0.0.1:1/none"], "cannot use the PostgreSQL"),
        (["construct", "--database", "mysql://x"], "postgresql://"),
        # An unreachable Redis is the same at startup (afterwards, outages are ridden out).
        (["construct", "--redis", "redis://127.0.0.1:1/0"], "cannot use Redis at 127.0.0.1:1"),
        (["construct-worker", "--redis", "redis://127.0.0.1:1/0"], "cannot use Redis at 127.0.0.1:1"),
    ]
    for args, expected in cases:
        result = run_twistd(tmp_path, *args)
        assert result.returncode != 0, args
        output = (result.stdout + result.stderr).strip()
        assert "Traceback" not in output, output
        assert expected in output.splitlines()[-1], output
    result = run_twistd(tmp_path, "construct", env={"CONSTRUCT_INBOX_QUOTA": "-5"})
    assert result.returncode != 0 and "CONSTRUCT_INBOX_QUOTA" in result.stderr


@pytest_twisted.ensureDeferred
async def test_server_on_postgresql(tmp_path, postgres_url):
    """The whole stack runs on PostgreSQL with --database."""
    server = ServerProcess(tmp_path, "--database", postgres_url, "--bcrypt-cost", "4").start()
    try:
        alice = await TcpClient.connect(server.ports["tcp"])
        a = await _register(alice, "alice")
        http = HttpClient(server.ports["http"])
        status, b = await http.call("POST", "/v1/accounts", {"username": "bob", "password": PASSWORD, "publicKey": make_bundle()})
        assert status == 201
        message = chat_message(a["userId"], b["userId"])
        assert (await alice.request("sendMessage", message))["payload"]["status"] == "queued"
        status, session = await http.call("POST", "/v1/sessions", {"username": "BOB", "password": PASSWORD})
        assert status == 200
        status, pending = await http.call("GET", "/v1/messages", token=session["sessionToken"])
        assert [m["id"] for m in pending["messages"]] == [message["id"]]
        response = await treq.get(f"http://127.0.0.1:{server.ports['health']}/health")
        assert response.code == 200
        await alice.close()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_under_traffic_drains_and_loses_nothing(tmp_path):
    """SIGTERM finishes in-flight sends, closes WebSockets with 1001, and every message arrives once after restart."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    try:
        alice, bob, a, b = await _tcp_alice_and_ws_bob(server)
        messages = [chat_message(a["userId"], b["userId"], content=f"dGVybQ{i}") for i in range(150)]
        for message in messages:
            alice.send("sendMessage", message)
        acked = []
        while len(acked) < 20:
            reply = await alice.next()
            assert reply["type"] == "ack"
            acked.append(reply["payload"]["messageId"])
        server.process.terminate()
        await alice.closed.addTimeout(15, reactor)
        while alice.received.pending:
            reply = await alice.next()
            if reply["type"] == "ack":
                acked.append(reply["payload"]["messageId"])
            else:
                assert reply["payload"]["code"] == "SERVICE_UNAVAILABLE"
        assert await bob.closed == 1001
        assert server.process.wait(15) in (0, -15)
        # Serial processing per connection: what was accepted is a prefix of what was sent.
        assert acked == [m["id"] for m in messages[: len(acked)]]

        server.start()
        alice = await TcpClient.connect(server.ports["tcp"])
        assert (await alice.request("connect", {"sessionToken": a["sessionToken"]}))["type"] == "connectSuccess"
        for message in messages[len(acked):]:
            assert (await alice.request("sendMessage", message))["type"] == "ack"
        bob = await WsClient.connect(server.ports["http"], codec.JSON)
        assert (await bob.request("connect", {"sessionToken": b["sessionToken"]}))["type"] == "connectSuccess"
        received = [(await bob.next_of("message"))["payload"]["id"] for _ in messages]
        assert received == [m["id"] for m in messages]
        assert (await bob.request("ping"))["type"] == "pong"
        await alice.close()
        await bob.close()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_completes_the_closing_handshake_instead_of_waiting_it_out(tmp_path):
    """The server reads the clients' answers to its close frames, so a shutdown with clients
    connected does not wait for Autobahn's closing-handshake timeout (5 s) on each of them."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    try:
        clients = [await WsClient.connect(server.ports["http"], codec.JSON) for _ in range(3)]
        for number, client in enumerate(clients):
            await _register(client, f"closer{number}")
        started = time.monotonic()
        server.process.terminate()
        assert [await client.closed.addTimeout(15, reactor) for client in clients] == [1001] * 3
        assert server.process.wait(15) in (0, -15)
        assert time.monotonic() - started < CLOSE_HANDSHAKE_TIMEOUT_SECONDS - 1, server.log_text()[-2000:]
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_json_log_under_traffic_holds_no_secrets(tmp_path):
    """--log-format json gives one JSON object a line; user ids appear only as salted hashes, secrets never."""
    from construct.logs import user_id_hasher

    salt = "test-salt-0123456789"
    server = ServerProcess(
        tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--log-format", "json",
        env={"CONSTRUCT_LOG_SALT": salt},
    ).start()
    secrets: list[str] = [PASSWORD]
    try:
        alice = await WsClient.connect(server.ports["http"], codec.JSON)
        bob = await TcpClient.connect(server.ports["tcp"])
        bundle = make_bundle()
        reply = await alice.request("register", {"username": "alice", "password": PASSWORD, "publicKey": bundle})
        a = reply["payload"]
        b = await _register(bob, "bob")
        secrets += [a["sessionToken"], b["sessionToken"], a["userId"], b["userId"], bundle["bundleData"],
                    bundle["signature"], bundle["masterIdentityKey"]]
        for i in range(5):
            message = chat_message(a["userId"], b["userId"], content=f"c2VjcmV0LWNpcGhlcnRleHQt{i}")
            secrets += [message["content"], base64.b64encode(message["ephemeralPublicKey"]).decode()]
            await alice.request("sendMessage", message)
        await bob.next_of("message")
        alice.send_raw(b"{garbage", False)
        await alice.next()
        await bob.request("login", {"username": "bob", "password": "WrongPassword1"})
        await alice.close()
        await bob.close()
    finally:
        server.stop()
    log = server.log_text()
    lines = [line for line in log.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "namespace", "message"} <= set(records[0])
    for secret in secrets:
        assert secret not in log, f"{secret!r} leaked into the log"
    hashed = user_id_hasher(salt)
    assert hashed(a["userId"]) in log and hashed(b["userId"]) in log
