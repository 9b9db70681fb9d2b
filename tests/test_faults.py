"""Redis or PostgreSQL going away under a running production server, and coming back.

Each service is reached through a TCP proxy in the test process, so the test can cut it (close
the listener and every proxied connection) and restore it without touching the real service.
"""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols import portforward

from tests.clients import TcpClient
from tests.conftest import REDIS_URL
from tests.helpers import PASSWORD, chat_message, make_bundle
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration


class _TrackedProxyServer(portforward.ProxyServer):
    def connectionMade(self):
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.live.discard(self)
        super().connectionLost(reason)


class CuttableProxy(portforward.ProxyFactory):
    """A TCP proxy to a real service that can be cut and restored on the same port."""

    protocol = _TrackedProxyServer
    noisy = False

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.live: set = set()
        self.listening = None
        # Not `port`: ProxyFactory keeps the target's port there.
        self.listen_port = 0

    async def up(self) -> None:
        self.listening = await TCP4ServerEndpoint(reactor, self.listen_port, interface="127.0.0.1").listen(self)
        self.listen_port = self.listening.getHost().port

    async def down(self) -> None:
        await self.listening.stopListening()
        for connection in list(self.live):
            connection.transport.abortConnection()
            if connection.peer is not None:
                connection.peer.transport.abortConnection()


async def _health(server) -> tuple[int, dict]:
    response = await treq.get(f"http://127.0.0.1:{server.ports['health']}/health")
    return response.code, await response.json()


async def _eventually(check, seconds: float = 30.0):
    for _ in range(int(seconds / 0.25)):
        result = await check()
        if result:
            return result
        await task.deferLater(reactor, 0.25, lambda: None)
    raise AssertionError("did not recover in time")


@pytest_twisted.ensureDeferred
async def test_service_outages_refuse_sends_and_recover_without_restart(tmp_path, postgres_url, redis_prefix):
    """While Redis is cut, sends get SERVICE_UNAVAILABLE; while PostgreSQL is, registrations do but sends still
    work; /health says what is down; then all recovers."""
    redis_port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    redis_proxy, pg_proxy = CuttableProxy("127.0.0.1", redis_port), CuttableProxy("127.0.0.1", 5432)
    await redis_proxy.up()
    await pg_proxy.up()
    database = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.listen_port}")
    server = ServerProcess(
        tmp_path, "--database", database, "--redis", f"redis://127.0.0.1:{redis_proxy.listen_port}/0",
        "--redis-prefix", redis_prefix, "--bcrypt-cost", "4", "--instance-id", "faulty",
    )
    await server.start_async()
    try:
        alice = await TcpClient.connect(server.ports["tcp"])
        bob = await TcpClient.connect(server.ports["tcp"])
        a = (await alice.request("register", {"username": "alice", "password": PASSWORD, "publicKey": make_bundle()}))["payload"]
        b = (await bob.request("register", {"username": "bob", "password": PASSWORD, "publicKey": make_bundle()}))["payload"]
        acked = []

        async def send_once():
            message = chat_message(a["userId"], b["userId"])
            reply = await alice.request("sendMessage", message)
            if reply["type"] == "ack":
                acked.append(message["id"])
                return True
            assert reply["payload"]["code"] == "SERVICE_UNAVAILABLE", reply
            return False

        async def register_once():
            carol = await TcpClient.connect(server.ports["tcp"])
            reply = await carol.request(
                "register", {"username": f"carol{len(acked)}", "password": PASSWORD, "publicKey": make_bundle()}
            )
            await carol.close()
            if reply["type"] == "registerSuccess":
                return True
            assert reply["payload"]["code"] == "SERVICE_UNAVAILABLE", reply
            return False

        assert await send_once()
        for proxy, name in ((redis_proxy, "redis"), (pg_proxy, "database")):
            await proxy.down()
            if name == "redis":
                assert not await send_once(), "a send was acknowledged with Redis down"
            else:
                # Accounts are down, messaging between known users is not: a send needs no SQL.
                assert not await register_once(), "a registration succeeded with the database down"
                assert await send_once(), "a send between known users failed with the database down"
            code, body = await _health(server)
            assert code == 503 and body["checks"][name].startswith("down"), body
            await proxy.up()
            await _eventually(send_once)

            async def healthy():
                return (await _health(server))[0] == 200

            await _eventually(healthy)
        received = []
        while len(received) < len(acked):
            received.append((await bob.next_of("message", 30))["payload"]["id"])
        assert received == acked
        await alice.close()
        await bob.close()
    finally:
        server.stop()
        for proxy in (redis_proxy, pg_proxy):
            if proxy.listening is not None and proxy.listening.connected:
                await proxy.down()
