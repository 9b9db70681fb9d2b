"""Connection limits on a real server: per address, origins, and the auth, idle and slow-client
timeouts, seen from the outside as clients see them."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task, threads

from construct.protocol.timeouts import AUTH_TIMEOUT, IDLE, STOPPED_READING
from tests.clients import TcpClient, WsClient
from tests.helpers import PASSWORD, chat_message, make_bundle
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration


async def _register(client) -> dict:
    name = f"user{uuid.uuid4().hex[:10]}"
    reply = await client.request("register", {"username": name, "password": PASSWORD, "publicKey": make_bundle()})
    assert reply["type"] == "registerSuccess", reply
    return reply["payload"]


async def _until(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_connections_per_address_and_allowed_origins(tmp_path):
    server = await ServerProcess(
        tmp_path, "--bcrypt-cost", "4", "--max-connections-per-address", "3",
        "--allowed-origins", "https://chat.example.org",
    ).start_async()
    http, tcp_port = server.ports["http"], server.ports["tcp"]
    try:
        first, second = await TcpClient.connect(tcp_port), await TcpClient.connect(tcp_port)
        ws = await WsClient.connect(http)
        # `second` never sends a byte: it counts all the same.
        for client in (first, ws):
            assert (await client.request("ping"))["type"] == "pong"
        # A fourth connection from the same address is told why, then closed.
        refused = await TcpClient.connect(tcp_port)
        refused.send("ping")
        error = await refused.next()
        assert error["type"] == "error" and error["payload"]["code"] == "RATE_LIMITED"
        assert error["payload"]["retryAfter"] >= 1
        await refused.closed.addTimeout(10, reactor)
        with pytest.raises(ConnectionError, match="429"):
            await WsClient.connect(http)
        # A closed connection frees its slot.
        await first.close()
        replacement = await TcpClient.connect(tcp_port)
        assert (await replacement.request("ping"))["type"] == "pong"
        for client in (second, replacement):
            await client.close()
        await ws.close()

        # Browsers from another origin are refused; the allowed one and clients without Origin are not.
        with pytest.raises(ConnectionError, match="origin .* not allowed"):
            await WsClient.connect(http, origin="https://evil.example")
        allowed = await WsClient.connect(http, origin="https://chat.example.org")
        assert (await allowed.request("ping"))["type"] == "pong"
        await allowed.close()

        # No status page, and so no open redirect.
        response = await treq.get(f"http://127.0.0.1:{http}/?redirect=https%3A%2F%2Fevil.example", allow_redirects=False)
        await treq.content(response)
        assert response.code < 300 or response.code >= 400
        assert not response.headers.hasHeader("location")
    finally:
        server.stop()
    assert "Unhandled" not in server.log_text() and "Traceback" not in server.log_text()


def _flood_without_reading(port: int, stop_after: float) -> bool:
    """Send pings and never read the replies; True once the server has cut the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(1.0)
    line = b'{"type":"ping","requestId":"' + b"r" * 200 + b'"}\n'
    deadline = time.monotonic() + stop_after
    try:
        while time.monotonic() < deadline:
            try:
                sock.sendall(line * 100)
            except socket.timeout:
                continue  # the server stopped reading us: keep the pressure on until it gives up
            except OSError:
                return True
        return False
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_silent_unauthenticated_and_non_reading_clients_are_closed_and_others_are_not_disturbed(tmp_path):
    server = await ServerProcess(
        tmp_path, "--bcrypt-cost", "4", "--idle-timeout", "1", "--auth-timeout", "2", "--slow-client-timeout", "1",
    ).start_async()
    http, tcp_port = server.ports["http"], server.ports["tcp"]
    try:
        honest = await WsClient.connect(http)
        await _register(honest)
        silent_tcp = await TcpClient.connect(tcp_port)
        await _register(silent_tcp)
        anonymous_ws = await WsClient.connect(http)
        flood = threads.deferToThread(_flood_without_reading, tcp_port, 30)
        # The sweep runs every 5 seconds: each of them is gone within a few sweeps, told why.
        await silent_tcp.closed.addTimeout(15, reactor)
        goodbye = await silent_tcp.next_of("error")
        assert goodbye["payload"]["code"] == "CONNECTION_TIMEOUT" and IDLE in goodbye["payload"]["message"]
        assert await anonymous_ws.closed.addTimeout(15, reactor) == 1008
        goodbye = await anonymous_ws.next_of("error")
        assert goodbye["payload"]["code"] == "CONNECTION_TIMEOUT" and AUTH_TIMEOUT in goodbye["payload"]["message"]
        assert await flood, "the server kept a client that never reads"
        # WebSocket pings keep an idle, authenticated WebSocket alive; it still works.
        assert not honest.closed.called
        assert (await honest.request("ping"))["type"] == "pong"
        await honest.close()
    finally:
        server.stop()
    log = server.log_text()
    assert "Unhandled" not in log and "Traceback" not in log
    assert all(reason in log for reason in (STOPPED_READING, IDLE, AUTH_TIMEOUT))


def _proxied(port: int, client_address: str, data: bytes, replies: int = 1) -> list[bytes]:
    """Connect as a PROXY-protocol (v1) proxy would for `client_address`, send, read `replies` lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"PROXY TCP4 {client_address} 127.0.0.1 40000 {port}\r\n".encode() + data)
        buffer = b""
        while buffer.count(b"\n") < replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        return buffer.split(b"\n")[:replies]


def _http_register(port: int, client_address: str, name: str) -> int:
    body = json.dumps({"username": name, "password": PASSWORD, "publicKey": make_bundle()}).encode()
    request = (
        b"POST /v1/accounts HTTP/1.1\r\nHost: chat\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    status_line = _proxied(port, client_address, request)[0]
    return int(status_line.split()[1])


@pytest_twisted.ensureDeferred
async def test_behind_a_proxy_limits_apply_to_each_client_address(tmp_path):
    """With haproxy: endpoints the PROXY header's address is the one limited, not the proxy's."""
    server = await ServerProcess(
        tmp_path, "--bcrypt-cost", "4", "--listen", "haproxy:tcp:0:interface=127.0.0.1",
        "--tcp", "haproxy:tcp:0:interface=127.0.0.1", "--max-connections-per-address", "1",
        "--limit-registrations", "1/3600",
    ).start_async()
    http, tcp_port = server.ports["http"], server.ports["tcp"]
    try:
        ping = b'{"type":"ping"}\n'
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as held:
            held.sendall(f"PROXY TCP4 203.0.113.7 127.0.0.1 40000 {tcp_port}\r\n".encode() + ping)
            assert json.loads(held.recv(65536).split(b"\n")[0])["type"] == "pong"
            # The same client address is over its limit of one; another client address is not.
            refused = json.loads(_proxied(tcp_port, "203.0.113.7", ping)[0])
            assert refused["payload"]["code"] == "RATE_LIMITED"
            assert json.loads(_proxied(tcp_port, "203.0.113.8", ping)[0])["type"] == "pong"
        assert _http_register(http, "198.51.100.1", f"u{uuid.uuid4().hex[:10]}") == 201
        assert _http_register(http, "198.51.100.1", f"u{uuid.uuid4().hex[:10]}") == 429
        assert _http_register(http, "198.51.100.2", f"u{uuid.uuid4().hex[:10]}") == 201
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_large_backlog_reaches_a_client_that_reads_it(tmp_path):
    """Pushes wait for a client that is reading (backpressure), and it is not taken for a slow client."""
    server = await ServerProcess(tmp_path, "--bcrypt-cost", "4").start_async()
    try:
        alice, bob = await TcpClient.connect(server.ports["tcp"]), await TcpClient.connect(server.ports["tcp"])
        a, b = await _register(alice), await _register(bob)
        await bob.close()
        content = base64.b64encode(os.urandom(30 * 1024)).decode()
        sent = [chat_message(a["userId"], b["userId"], content=content) for _ in range(100)]
        for message in sent:
            alice.send("sendMessage", message)
        for _ in sent:
            assert (await alice.next_of("ack"))["type"] == "ack"
        bob = await TcpClient.connect(server.ports["tcp"])
        assert (await bob.request("connect", {"sessionToken": b["sessionToken"]}))["type"] == "connectSuccess"
        received = [(await bob.next_of("message"))["payload"]["id"] for _ in sent]
        assert received == [message["id"] for message in sent]
        await alice.close()
        await bob.close()
    finally:
        server.stop()
    assert "stopped reading" not in server.log_text()


def _line(kind: str, payload: dict) -> bytes:
    return json.dumps({"type": kind, "requestId": "1", "payload": payload}).encode() + b"\n"


def test_a_client_logging_in_from_many_threads_does_not_make_another_s_login_wait_behind_its_hashes(tmp_path):
    """One hashing thread; one address logs in to its own accounts on many connections at
    once. A login from another address is served in the next free turn, not after them all."""
    server = ServerProcess(
        tmp_path, "--bcrypt-cost", "11", "--hash-threads", "1", "--tcp", "haproxy:tcp:0:interface=127.0.0.1",
    ).start()
    port = server.ports["tcp"]
    attacker, honest = "203.0.113.5", "198.51.100.9"
    names = [f"sybil{uuid.uuid4().hex[:10]}" for _ in range(12)]
    honest_name = f"honest{uuid.uuid4().hex[:10]}"
    try:
        for name, address in [(name, attacker) for name in names] + [(honest_name, honest)]:
            reply = _proxied(port, address, _line("register", {"username": name, "password": PASSWORD,
                                                               "publicKey": make_bundle()}))
            assert json.loads(reply[0])["type"] == "registerSuccess", reply
        finished: list[str] = []
        lock = threading.Lock()

        def log_in(name: str, address: str) -> None:
            reply = json.loads(_proxied(port, address, _line("login", {"username": name, "password": PASSWORD}))[0])
            assert reply["type"] == "loginSuccess", reply
            with lock:
                finished.append(name)

        flood = [threading.Thread(target=log_in, args=(name, attacker)) for name in names]
        for thread in flood:
            thread.start()
        # Once one of them is answered, the others wait for the hashing thread.
        deadline = time.monotonic() + 30
        while not finished:
            assert time.monotonic() < deadline, "no login was answered"
            time.sleep(0.01)
        log_in(honest_name, honest)
        for thread in flood:
            thread.join(30)
        assert len(finished) == len(names) + 1
        # First come, first served would answer the honest login after all the flood's.
        assert finished.index(honest_name) <= 3, finished
    finally:
        server.stop()


def _half_sent_upgrades(port: int, count: int, seconds: float) -> tuple[dict[int, float], set[int]]:
    """Open `count` sockets at once and trickle `GET /ws` into each, a byte every half second,
    never finishing the headers. Returns when each socket was closed by the server (seconds
    after it was opened), and which ones were refused with 429 first."""
    request = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" * 10
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    start = time.monotonic()
    closed: dict[int, float] = {}
    refused: set[int] = set()
    for sock in sockets:
        sock.setblocking(False)
    try:
        for offset in range(len(request)):
            if len(closed) == count or time.monotonic() - start > seconds:
                break
            for number, sock in enumerate(sockets):
                if number in closed:
                    continue
                try:
                    data = sock.recv(65536)
                    if data.startswith(b"HTTP/1.1 429"):
                        refused.add(number)
                    elif not data:
                        closed[number] = time.monotonic() - start
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed[number] = time.monotonic() - start
                    continue
                try:
                    sock.send(request[offset:offset + 1])
                except OSError:
                    closed[number] = time.monotonic() - start
            time.sleep(0.5)
        return closed, refused
    finally:
        for sock in sockets:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_half_sent_websocket_upgrades_are_counted_per_address_and_cut_at_the_header_deadline(tmp_path):
    """A slow-loris client trickling `GET /ws` holds at most its address's share of sockets, and
    none of them past the header deadline however often it sends a byte."""
    server = await ServerProcess(
        tmp_path, "--bcrypt-cost", "4", "--max-connections-per-address", "5", "--header-timeout", "3",
    ).start_async()
    http = server.ports["http"]
    try:
        closed, refused = await threads.deferToThread(_half_sent_upgrades, http, 12, 40)
        assert len(refused) == 7, "past 5 sockets per address, each is refused at once"
        assert sorted(closed) == list(range(12)), "every socket was closed"
        held = [closed[number] for number in range(12) if number not in refused]
        # Bytes kept coming every half second; twisted.web's idle timeout alone (75 s) never fires.
        assert max(held) < 20
        # Their slots are free again.
        client = await WsClient.connect(http)
        assert (await client.request("ping"))["type"] == "pong"
        await client.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()


@pytest_twisted.ensureDeferred
async def test_unfinished_websocket_messages_are_cut_by_deadline_and_budget_and_others_go_on(tmp_path):
    """Real Autobahn clients that begin a large message and never finish it: past the process's
    budget the one that would pass it is closed at once (1013), the rest at the deadline (1008)."""
    server = await ServerProcess(
        tmp_path, "--bcrypt-cost", "4", "--ws-message-timeout", "2", "--ws-unfinished-budget", "2000000",
    ).start_async()
    http = server.ports["http"]
    try:
        honest = await WsClient.connect(http)
        await _register(honest)
        holders = [await WsClient.connect(http) for _ in range(3)]
        for holder in holders:
            holder.protocol.beginMessage(isBinary=True)
            holder.protocol.sendMessageFrame(bytes(900_000))
        codes = [await holder.closed.addTimeout(20, reactor) for holder in holders]
        assert sorted(codes) == [1008, 1008, 1013], codes
        # A message that arrives whole, however large within the limits, is answered as ever.
        assert (await honest.request("ping"))["type"] == "pong"
        honest.send_raw(bytes(900_000), True)
        assert (await honest.next_of("error"))["payload"]["code"] == "MESSAGE_TOO_LARGE"
        assert (await honest.request("ping"))["type"] == "pong"
        await honest.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()
