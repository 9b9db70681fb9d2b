"""Production mode as deployed: two `construct` and two `construct-worker` processes on Redis and PostgreSQL."""

from __future__ import annotations

import subprocess

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task

from construct.protocol import codec
from tests.clients import TcpClient, WsClient
from tests.conftest import REDIS_URL, kill_redis_connections
from tests.helpers import PASSWORD, chat_message, make_bundle
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration


class Cluster:
    def __init__(self, tmp_path, postgres_url: str, prefix: str) -> None:
        self.prefix = prefix
        common = ["--redis", REDIS_URL, "--redis-prefix", prefix]
        self.servers = {
            name: ServerProcess(
                tmp_path, *common, "--database", postgres_url, "--bcrypt-cost", "4", "--instance-id", f"server-{name}"
            )
            for name in ("a", "b")
        }
        self.workers = {
            name: ServerProcess(
                tmp_path, *common, "--instance-id", f"worker-{name}", "--health", "tcp:0:interface=127.0.0.1",
                "--sweep-interval", "1", "--redelivery-timeout", "5", plugin="construct-worker", expect=("health",),
            )
            for name in ("1", "2")
        }

    def start(self) -> "Cluster":
        for process in [*self.servers.values(), *self.workers.values()]:
            process.start()
        return self

    def stop(self) -> None:
        for process in [*self.servers.values(), *self.workers.values()]:
            process.stop()

    def port(self, server: str, listener: str) -> int:
        return self.servers[server].ports[listener]


@pytest.fixture
def cluster(tmp_path, postgres_url, redis_prefix):
    cluster = Cluster(tmp_path, postgres_url, redis_prefix).start()
    yield cluster
    cluster.stop()
    subprocess.run(
        ["sh", "-c", f"redis-cli --scan --pattern '{redis_prefix}*' | xargs -r redis-cli DEL"], capture_output=True
    )


async def _register(client, username: str) -> dict:
    reply = await client.request("register", {"username": username, "password": PASSWORD, "publicKey": make_bundle()})
    assert reply["type"] == "registerSuccess", reply
    return reply["payload"]


async def _send_until_acked(client, message: dict) -> dict:
    """What a client does: resend the same id until the server acknowledges it."""
    for _ in range(50):
        reply = await client.request("sendMessage", message)
        if reply["type"] == "ack":
            return reply
        assert reply["payload"]["code"] == "SERVICE_UNAVAILABLE", reply
        await task.deferLater(reactor, 0.2, lambda: None)
    raise AssertionError(f"never acknowledged: {message['id']}")


async def _receive(client, count: int, timeout: float = 20) -> list[str]:
    return [(await client.next_of("message", timeout))["payload"]["id"] for _ in range(count)]


@pytest_twisted.ensureDeferred
async def test_cross_instance_live_offline_and_fifo(cluster):
    """Live delivery across instances, a backlog drained in order, and live sends during the drain stay in order."""
    alice = await WsClient.connect(cluster.port("a", "http"), codec.MSGPACK)
    bob = await TcpClient.connect(cluster.port("b", "tcp"))
    a = await _register(alice, "alice")
    b = await _register(bob, "bob")
    live = chat_message(a["userId"], b["userId"])
    assert (await alice.request("sendMessage", live))["payload"]["status"] == "delivered"
    assert await _receive(bob, 1) == [live["id"]]
    bob.send("ackMessage", {"messageIds": [live["id"]]})
    await bob.close()

    backlog = [chat_message(a["userId"], b["userId"], content=f"b{i}") for i in range(25)]
    for message in backlog:
        assert (await alice.request("sendMessage", message))["type"] == "ack"
    bob = await WsClient.connect(cluster.port("a", "http"), codec.JSON)
    bob.send("connect", {"sessionToken": b["sessionToken"]})
    during = [chat_message(a["userId"], b["userId"], content=f"d{i}") for i in range(10)]
    for message in during:
        alice.send("sendMessage", message)
    ids = await _receive(bob, 35)
    assert ids == [m["id"] for m in backlog + during]
    for client in (alice, bob):
        await client.close()
    # A worker starting with Redis up does not sweep before its connection is ready.
    for worker in cluster.workers.values():
        assert "failed" not in worker.log_text() and "#critical]" not in worker.log_text(), worker.log_text()


@pytest_twisted.ensureDeferred
async def test_killed_worker_and_server_lose_nothing(cluster):
    """SIGKILL a worker mid-drain and the server holding unacknowledged messages: all arrive after restart, in order."""
    alice = await TcpClient.connect(cluster.port("a", "tcp"))
    a = await _register(alice, "alice")
    bob = await WsClient.connect(cluster.port("b", "http"), codec.MSGPACK)
    b = await _register(bob, "bob")
    await bob.request("logout")
    messages = [chat_message(a["userId"], b["userId"], content=f"k{i}") for i in range(40)]
    for message in messages:
        alice.send("sendMessage", message)
    assert [(await alice.next())["type"] for _ in messages] == ["ack"] * len(messages)

    bob.send("login", {"username": "bob", "password": PASSWORD})
    first = await _receive(bob, 15)
    bob.send("ackMessage", {"messageIds": first[:10]})
    bob.send("ping")
    await bob.next_of("pong")
    cluster.workers["1"].kill()
    cluster.servers["b"].kill()

    bob = await WsClient.connect(cluster.port("a", "http"), codec.MSGPACK)
    assert (await bob.request("login", {"username": "bob", "password": PASSWORD}))["type"] == "loginSuccess"
    rest = await _receive(bob, 30)
    assert rest == [m["id"] for m in messages[10:]]
    bob.send("ackMessage", {"messageIds": rest})

    cluster.servers["b"].start()
    cluster.workers["1"].start()
    again = await TcpClient.connect(cluster.port("b", "tcp"))
    assert (await again.request("login", {"username": "bob", "password": PASSWORD}))["type"] == "loginSuccess"
    assert (await again.request("ping"))["type"] == "pong"
    assert again.received.pending == []
    for client in (alice, bob, again):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_redis_connections_killed_during_traffic(cluster):
    """CLIENT KILL under traffic: no false ack, no loss, order kept, and recovery without restarts."""
    alice = await TcpClient.connect(cluster.port("a", "tcp"))
    bob = await TcpClient.connect(cluster.port("b", "tcp"))
    a = await _register(alice, "alice")
    b = await _register(bob, "bob")
    messages = [chat_message(a["userId"], b["userId"], content=f"c{i}") for i in range(60)]
    for i, message in enumerate(messages):
        if i in (15, 40):
            # Both servers' and the worker's connections, commands and subscriptions.
            assert kill_redis_connections(cluster.prefix) >= 6
        await _send_until_acked(alice, message)
    received: list[str] = []
    while len(set(received)) < len(messages):
        received.append((await bob.next_of("message", 30))["payload"]["id"])
    first_seen = list(dict.fromkeys(received))
    assert first_seen == [m["id"] for m in messages]
    for server in ("a", "b"):
        response = await treq.get(f"http://127.0.0.1:{cluster.port(server, 'health')}/health")
        assert response.code == 200, await response.text()
    for client in (alice, bob):
        await client.close()
