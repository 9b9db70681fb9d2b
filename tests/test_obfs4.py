"""obfs4 in front of Construct: the managed-proxy plumbing in memory, then on the wire with obfs4proxy.

On the wire: construct-chat over obfs4 and over WebSocket chat end to end, through a killed
obfs4proxy and a restarted server with the same bridge line; the bytes on the obfs4 port have
no fixed header, no JSON or protocol strings and pass a chi-square test of uniformity while the
plain TCP port's fail it; probes of the obfs4 port with HTTP, a TLS ClientHello or random bytes
get nothing back, where the same probe of the plain port gets a Construct error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ProcessTerminated
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from construct import pt
from construct.bench.obfuscation import Tunnel
from construct.client.obfs4 import ClientProxy, Obfs4Address, Obfs4Endpoint, Socks5Factory
from construct.client.transport import ServerAddress
from construct.obfs4 import BRIDGE_LINE_FILE, STATE_DIRECTORY, BindAddress, Bridge, Obfs4Service, bridge_from_smethod
from construct.protocol import codec
from construct.protocol.extorport import (
    CLIENT_HASH_CONTEXT,
    COOKIE_HEADER,
    SERVER_HASH_CONTEXT,
    ExtOrPortFactory,
    write_cookie_file,
)
from construct.tap import Options, makeService
from tests.clients import TcpClient, WsClient, _LineProtocol, _WsProtocol
from tests.helpers import PASSWORD, make_bundle
from tests.processes import ServerProcess
from tests.test_admin import admin
from tests.test_chat_e2e import Chat

CERT = "ukxSNLoQ1uv2Mjc73sa4Xuvl3fYvHArBqqDna3qNaZVxPmf1DGbPdACztSUAkBD+wBCYHQ"
PROXY_PID = re.compile(r"obfs4proxy started \(pid (\d+)\)")
SAMPLE_BYTES = 10 * 1024
# Chi-square over 256 byte values (255 degrees of freedom): random bytes exceed this with
# probability about 1e-6 (Wilson-Hilferty); JSON text exceeds it many times over.
CHI_SQUARE_LIMIT = 377.0
# At least five bytes each, so that random bytes contain none by chance (about 1e-8 per string).
PROTOCOL_STRINGS = [b'{"type"', b'"payload"', b"sendMessage", b"register", b"requestId", b"HTTP/", b"Upgrade",
                    b"websocket", b"Construct", b"obfs4", b"msgpack"]


# -- in memory: addresses, bridge lines, the Extended ORPort ---------------------------------


def test_bind_addresses_come_from_endpoint_strings():
    assert BindAddress.parse("tcp:8443:interface=0.0.0.0") == BindAddress("0.0.0.0", 8443)
    assert BindAddress.parse("tcp:8443") == BindAddress("0.0.0.0", 8443)
    assert BindAddress.parse("tcp:port=0:interface=127.0.0.1") == BindAddress("127.0.0.1", 0)
    assert str(BindAddress.parse(r"tcp6:443:interface=\:\:")) == "[::]:443"
    for bad in ("ssl:443", "tcp:http", "tcp:443:interface=example.org", "tcp6:443:interface=0.0.0.0", "tcp:1:backlog=5"):
        with pytest.raises(ValueError):
            BindAddress.parse(bad)


def test_the_bridge_line_is_the_smethod_line_as_a_client_address():
    bridge = bridge_from_smethod(["obfs4", "127.0.0.1:8443", f"ARGS:cert={CERT},iat-mode=1"])
    assert bridge == Bridge("127.0.0.1", 8443, CERT, "1")
    assert bridge.url() == f"obfs4://127.0.0.1:8443?cert={CERT}&iat-mode=1"
    # On every interface only the operator knows the public address.
    assert Bridge("0.0.0.0", 8443, CERT, "0").url().startswith("obfs4://<ADDRESS>:8443?")
    with pytest.raises(ValueError):
        bridge_from_smethod(["obfs4", "127.0.0.1:8443"])


def test_obfs4_addresses_round_trip_and_keep_the_certificate_intact():
    tcp = ServerAddress.parse(f"obfs4://127.0.0.1:8443?cert={CERT}&iat-mode=0")
    assert isinstance(tcp, Obfs4Address)
    # A certificate is base64: its "+" must not become a space, as form decoding would make it.
    assert (tcp.scheme, tcp.host, tcp.port, tcp.cert, tcp.iat_mode) == ("tcp", "127.0.0.1", 8443, CERT, "0")
    assert ServerAddress.parse(str(tcp)) == tcp
    ws = ServerAddress.parse(f"obfs4://bridge.example.org:443/ws?iat-mode=2&cert={CERT}")
    assert (ws.scheme, ws.path, ws.iat_mode) == ("ws", "/ws", "2")
    assert str(ws) == f"obfs4://bridge.example.org:443/ws?cert={CERT}&iat-mode=2"
    for bad in ("obfs4://127.0.0.1?cert=x", "obfs4://127.0.0.1:1", "obfs4://127.0.0.1:1?cert=x&iat-mode=3"):
        with pytest.raises(ValueError):
            ServerAddress.parse(bad)


def test_socks_arguments_escape_the_separators():
    assert pt.socks_arguments({"cert": CERT, "iat-mode": "0"}) == f"cert={CERT};iat-mode=0"
    assert pt.socks_arguments({"k": "a;b=c\\"}) == "k=a\\;b\\=c\\\\"
    assert pt.parse_method_options("cert=a\\,b,iat-mode=0") == {"cert": "a,b", "iat-mode": "0"}


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _handover(cookie: bytes, clock: task.Clock):
    recorder = _Recorder()
    factory = ExtOrPortFactory(Factory.forProtocol(lambda: recorder), cookie, clock)
    wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    wrapper.makeConnection(transport)
    return wrapper, transport, recorder


def _authenticate(wrapper, transport, cookie: bytes, tamper: bool = False) -> bytes:
    assert transport.value() == b"\x01\x00"  # SAFE_COOKIE offered
    transport.clear()
    client_nonce = os.urandom(32)
    wrapper.dataReceived(b"\x01" + client_nonce)
    reply = transport.value()
    server_hash, server_nonce = reply[:32], reply[32:64]
    assert server_hash == hmac.new(cookie, SERVER_HASH_CONTEXT + client_nonce + server_nonce, hashlib.sha256).digest()
    transport.clear()
    client_hash = hmac.new(cookie, CLIENT_HASH_CONTEXT + client_nonce + server_nonce, hashlib.sha256).digest()
    wrapper.dataReceived(bytes(32) if tamper else client_hash)
    return transport.value()


def _command(number: int, body: bytes = b"") -> bytes:
    return number.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def test_the_handover_port_authenticates_the_proxy_and_passes_on_the_clients_address():
    cookie, clock = os.urandom(32), task.Clock()
    wrapper, transport, recorder = _handover(cookie, clock)
    assert _authenticate(wrapper, transport, cookie) == b"\x01"
    transport.clear()
    wrapper.dataReceived(_command(1, b"[2001:db8::7]:41000") + _command(2, b"obfs4"))
    assert not recorder.made  # nothing reaches the listener before DONE
    wrapper.dataReceived(_command(0) + b'{"type":"ping"}\n')
    assert transport.value() == b"\x10\x00\x00\x00"  # OKAY
    assert recorder.made and recorder.received == b'{"type":"ping"}\n'
    assert wrapper.getPeer() == IPv6Address("TCP", "2001:db8::7", 41000)
    wrapper.dataReceived(b"more")
    assert recorder.received.endswith(b"more")
    clock.advance(60)
    assert not transport.disconnecting  # the handshake timer is gone once open


def test_the_handover_port_refuses_a_wrong_cookie_and_a_silent_peer():
    cookie, clock = os.urandom(32), task.Clock()
    wrapper, transport, recorder = _handover(cookie, clock)
    assert _authenticate(wrapper, transport, cookie, tamper=True) == b"\x00"
    assert transport.disconnecting and not recorder.made
    wrapper, transport, recorder = _handover(cookie, clock)
    clock.advance(11)
    assert transport.disconnecting and not recorder.made


class _ProcessReactor(MemoryReactorClock):
    """A fake reactor that records spawned processes and runs "threads" at once."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []

    def spawnProcess(self, protocol, executable, args, env=None, **kwargs):
        transport = StringTransport()
        transport.pid, transport.closeStdin = 4242, lambda: self.spawned[-1][0].processEnded(_exited(0))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, executable, env))
        return transport

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        on_result(True, function(*args, **kwargs))

    def callFromThread(self, function, *args, **kwargs):
        function(*args, **kwargs)


def _exited(code: int) -> Failure:
    return Failure(ProcessTerminated(exitCode=code))


def test_the_service_runs_obfs4proxy_keeps_its_port_and_restarts_it_ever_more_slowly(tmp_path):
    reactor_ = _ProcessReactor()
    service = Obfs4Service(reactor_, "/usr/bin/obfs4proxy", BindAddress("127.0.0.1", 0), str(tmp_path / "obfs4"), 1,
                           Factory.forProtocol(Protocol))
    service.startService()
    proxy, executable, env = reactor_.spawned[0]
    assert executable == "/usr/bin/obfs4proxy"
    assert env["TOR_PT_SERVER_BINDADDR"] == "obfs4-127.0.0.1:0"
    assert env["TOR_PT_SERVER_TRANSPORT_OPTIONS"] == "obfs4:iat-mode=1"
    assert env["TOR_PT_EXIT_ON_STDIN_CLOSE"] == "1" and env["TOR_PT_STATE_LOCATION"] == str(tmp_path / "obfs4")
    assert (tmp_path / "obfs4" / "extended-orport-cookie").read_bytes().startswith(COOKIE_HEADER)
    # The parent's settings and secrets stay out of the proxy's environment.
    assert not [name for name in env if name.startswith("CONSTRUCT_")]
    proxy.outReceived(f"VERSION 1\nSMETHOD obfs4 127.0.0.1:40123 ARGS:cert={CERT},iat-mode=1\nSMETHODS DONE\n".encode())
    assert (tmp_path / "obfs4" / "bridge-line.txt").read_text() == f"obfs4://127.0.0.1:40123?cert={CERT}&iat-mode=1\n"

    delays = []
    for _ in range(3):
        proxy.processEnded(_exited(2))
        started = len(reactor_.spawned)
        delay = reactor_.getDelayedCalls()[0].getTime() - reactor_.seconds()
        reactor_.advance(delay)
        assert len(reactor_.spawned) == started + 1
        delays.append(delay)
        proxy, _, env = reactor_.spawned[-1]
        # The port it was given the first time, so the bridge line stays valid.
        assert env["TOR_PT_SERVER_BINDADDR"] == "obfs4-127.0.0.1:40123"
    assert delays == [1.0, 2.0, 5.0]
    reactor_.advance(61)  # a run that lasted: the next restart is quick again
    proxy.processEnded(_exited(2))
    assert reactor_.getDelayedCalls()[0].getTime() - reactor_.seconds() == 1.0
    reactor_.advance(1)
    outcome = []
    service.stopService().addBoth(outcome.append)
    assert outcome == [None]  # closing its stdin ended it
    assert not reactor_.getDelayedCalls()


def test_the_cookie_file_has_the_format_the_proxy_reads(tmp_path):
    path = tmp_path / "cookie"
    cookie = write_cookie_file(str(path))
    assert path.read_bytes() == COOKIE_HEADER + cookie and len(cookie) == 32
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_missing_obfs4proxy_stops_startup_with_one_line(tmp_path):
    options = Options(environ={})
    options.parseOptions(["--data-dir", str(tmp_path), "--obfs4", "tcp:0:interface=127.0.0.1",
                          "--obfs4proxy", str(tmp_path / "no-such-obfs4proxy")])
    with pytest.raises(SystemExit) as stopped:
        makeService(options)
    assert "needs obfs4proxy" in str(stopped.value) and "\n" not in str(stopped.value)


def test_the_socks_handshake_carries_the_bridge_arguments():
    recorder = _Recorder()
    factory = Socks5Factory(Factory.forProtocol(lambda: recorder), "192.0.2.9", 8443, f"cert={CERT};iat-mode=0")
    wrapper = factory.buildProtocol(None)
    transport = StringTransport()
    wrapper.makeConnection(transport)
    assert transport.value() == b"\x05\x01\x02"
    transport.clear()
    wrapper.dataReceived(b"\x05\x02")
    username = f"cert={CERT};iat-mode=0".encode()
    assert transport.value() == b"\x01" + bytes((len(username),)) + username + b"\x01\x00"
    transport.clear()
    wrapper.dataReceived(b"\x01\x00")
    assert transport.value() == b"\x05\x01\x00\x01" + bytes((192, 0, 2, 9)) + (8443).to_bytes(2, "big")
    opened = []
    wrapper.handshake_done.addCallback(opened.append)
    wrapper.dataReceived(b"\x05\x00\x00\x01" + bytes(6) + b"first bytes")
    assert opened == [recorder] and recorder.made and recorder.received == b"first bytes"


# -- on the wire ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bridge_line(server: ServerProcess) -> str:
    path = server.tmp_path / "data" / STATE_DIRECTORY / BRIDGE_LINE_FILE
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.05)
    return path.read_text().strip()


def _proxy_pids(server: ServerProcess) -> list[int]:
    return [int(pid) for pid in PROXY_PID.findall(server.log_text())]


def _wait_for(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.integration
def test_chat_over_obfs4_and_websocket_survives_obfs4proxy_and_server_restarts(tmp_path):
    """Alice on obfs4, Bob on WebSocket; obfs4proxy is killed, then the server restarted: the
    same bridge line keeps working, and the log names neither user nor any address."""
    args = ("--data-dir", "data", "--bcrypt-cost", "4", "--obfs4", f"tcp:{_free_port()}:interface=127.0.0.1")
    server = ServerProcess(tmp_path, *args, expect=("http", "tcp", "health", "obfs4")).start()
    try:
        bridge_line = _bridge_line(server)
        assert f"obfs4 bridge line: {bridge_line}" in server.log_text()
        shown = admin(tmp_path, "--data-dir", "data", "obfs4-bridge")
        assert (shown.returncode, shown.stdout.strip()) == (0, bridge_line)
        alice = Chat(tmp_path, "alice", bridge_line)
        bob = Chat(tmp_path, "bob", f"ws://127.0.0.1:{server.ports['http']}/ws")
        assert alice.ok("register", "alice")[0]["server"] == bridge_line
        bob.ok("register", "bob")
        assert alice.ok("send", "bob", "over obfs4")[0]["status"] == "sealed"
        assert [m["text"] for m in bob.ok("listen", "--once", "--timeout", "30")] == ["over obfs4"]
        bob.ok("send", "alice", "over WebSocket")
        assert [m["text"] for m in alice.ok("listen", "--once", "--timeout", "30")] == ["over WebSocket"]

        first_proxy = _proxy_pids(server)[-1]
        os.kill(first_proxy, signal.SIGKILL)
        _wait_for(lambda: len(_proxy_pids(server)) == 2 and server.log_text().count("obfs4 bridge line: ") == 2,
                  "obfs4proxy was not restarted")
        assert "obfs4proxy ended (killed by signal 9); restarting it" in server.log_text()
        assert alice.ok("send", "bob", "after obfs4proxy died")[0]["status"] == "sealed"
    finally:
        server.stop()
    # The server's shutdown took its obfs4proxy with it.
    _wait_for(lambda: not Path(f"/proc/{_proxy_pids(server)[-1]}").exists(), "obfs4proxy outlived the server", 5)

    restarted = ServerProcess(tmp_path, *args, expect=("http", "tcp", "health", "obfs4")).start()
    try:
        assert _bridge_line(restarted) == bridge_line
        bob.server = f"ws://127.0.0.1:{restarted.ports['http']}/ws"
        assert alice.ok("send", "bob", "after the server restarted")[0]["status"] == "sealed"
        received = bob.ok("listen", "--count", "2", "--timeout", "30")
        assert [m["text"] for m in received] == ["after obfs4proxy died", "after the server restarted"]
    finally:
        restarted.stop()
    log = server.log_text() + restarted.log_text()
    for secret in (b"alice", b"bob", b"over obfs4"):
        assert secret.decode() not in log


def chi_square(sample: bytes) -> float:
    expected = len(sample) / 256
    counts = [0] * 256
    for byte in sample:
        counts[byte] += 1
    return sum((count - expected) ** 2 / expected for count in counts)


def test_chi_square_tells_random_bytes_from_text():
    assert chi_square(os.urandom(SAMPLE_BYTES)) < CHI_SQUARE_LIMIT
    assert chi_square(json.dumps({"type": "sendMessage", "payload": {"content": "x" * 9000}}).encode()) \
        > CHI_SQUARE_LIMIT


async def _ws_through(endpoint) -> WsClient:
    client = WsClient(codec.MSGPACK)
    factory = WebSocketClientFactory("ws://127.0.0.1/ws")
    factory.protocol = _WsProtocol
    factory.client = client
    factory.opened = defer.Deferred()
    await endpoint.connect(factory)
    await factory.opened.addTimeout(10, reactor)
    return client


async def _lines_through(endpoint) -> TcpClient:
    client = TcpClient()
    client.protocol = await endpoint.connect(protocol.Factory.forProtocol(_LineProtocol))
    client.protocol.client = client
    return client


async def _exchange(alice, bob, rounds: int = 10) -> None:
    """Register both, then each sends the other `rounds` messages of 1 KB: over 10 KB each way."""
    users = {}
    for name, client in (("alice", alice), ("bob", bob)):
        reply = await client.request("register", {"username": f"{name}-{os.urandom(4).hex()}", "password": PASSWORD,
                                                  "publicKey": make_bundle()})
        assert reply["type"] == "registerSuccess", reply
        users[name] = reply["payload"]["userId"]
    for index in range(rounds):
        for sender, recipient, client in (("alice", "bob", alice), ("bob", "alice", bob)):
            client.send("sendMessage", {
                "id": str(uuid.uuid4()),
                "from": users[sender], "to": users[recipient], "ephemeralPublicKey": os.urandom(32),
                "messageNumber": index, "content": os.urandom(768).hex()[:1024], "timestamp": 1_767_348_000,
            })
    for client in (alice, bob):
        acks = pushes = 0
        while acks < rounds or pushes < rounds:
            frame = await client.next(15)
            if frame["type"] == "ack":
                acks += 1
            elif frame["type"] == "message":
                pushes += 1
            else:
                raise AssertionError(frame)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_obfs4_bytes_look_random_and_identify_nothing_while_plain_tcp_does_not(tmp_path):
    """WebSocket over obfs4 and JSON lines over plain TCP carry the same exchange; a proxy in the
    test keeps the first 10 KB of each direction of every connection."""
    server = await ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--obfs4",
                                 "tcp:0:interface=127.0.0.1", "--obfs4-target", "websocket",
                                 expect=("http", "tcp", "health", "obfs4")).start_async()
    proxy = ClientProxy(reactor, "obfs4proxy")
    tunnels = []
    try:
        bridge = ServerAddress.parse(_bridge_line(server))
        hidden = Tunnel(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", server.ports["obfs4"]), keep=SAMPLE_BYTES)
        plain = Tunnel(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", server.ports["tcp"]), keep=SAMPLE_BYTES)
        tunnels = [hidden, plain]
        hidden_port, plain_port = await hidden.start(), await plain.start()
        # obfs4proxy (client) connects to the capturing tunnel, which forwards to the obfs4 port.
        through_obfs4 = Obfs4Endpoint(reactor, proxy, "127.0.0.1", hidden_port, bridge.arguments())
        clients = [await _ws_through(through_obfs4), await _ws_through(through_obfs4)]
        await _exchange(*clients)
        plain_clients = [await _lines_through(TCP4ClientEndpoint(reactor, "127.0.0.1", plain_port)) for _ in range(2)]
        await _exchange(*plain_clients)
        for client in clients + plain_clients:
            await client.close()

        samples = [sample for passage in hidden.passages for sample in (passage.first_up, passage.first_down)]
        assert len(samples) == 4 and all(len(sample) == SAMPLE_BYTES for sample in samples)
        for sample in samples:
            assert chi_square(sample) < CHI_SQUARE_LIMIT
            for text in PROTOCOL_STRINGS:
                assert text not in sample
        # No fixed header: two connections' first bytes differ from the start, both ways.
        for first, second in ((samples[0], samples[2]), (samples[1], samples[3])):
            assert first[:3] != second[:3]

        plain_samples = [s for passage in plain.passages for s in (passage.first_up, passage.first_down)]
        assert len(plain_samples) == 4 and all(len(sample) == SAMPLE_BYTES for sample in plain_samples)
        for sample in plain_samples:
            assert chi_square(sample) > CHI_SQUARE_LIMIT
            assert b'"type"' in sample and b'{"' in sample
    finally:
        for tunnel in tunnels:
            await tunnel.stop()
        await proxy.stop()
        server.stop()


class _Listener(Protocol):
    def connectionMade(self) -> None:
        self.factory.received[self] = b""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received[self] += data


def _client_hello() -> bytes:
    """The first flight of an ordinary TLS 1.3 client, as a censor's prober would send."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="www.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_probes_of_the_obfs4_port_get_no_answer(tmp_path):
    """HTTP, a TLS ClientHello and random bytes: the plain TCP port answers the HTTP probe with a
    Construct error (so the probe would notice), the obfs4 port answers nothing at all."""
    server = await ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--obfs4",
                                 "tcp:0:interface=127.0.0.1", expect=("http", "tcp", "health", "obfs4")).start_async()
    try:
        probes = [b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", _client_hello(), os.urandom(2048),
                  b'{"type":"ping"}\n']
        factory = Factory.forProtocol(_Listener)
        factory.received = {}
        connections = []
        for port in (server.ports["obfs4"], server.ports["tcp"]):
            for probe in probes:
                connection = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
                connection.transport.write(probe)
                connections.append(connection)
        await task.deferLater(reactor, 2.0, lambda: None)
        answers = [factory.received[connection] for connection in connections]
        for connection in connections:
            connection.transport.abortConnection()
        assert answers[: len(probes)] == [b""] * len(probes), answers[: len(probes)]
        assert b"INVALID_FORMAT" in answers[len(probes)] and b"pong" in answers[-1]
    finally:
        server.stop()
