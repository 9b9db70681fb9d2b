"""WebSocket messages that do not arrive whole: one fixed cap, a deadline to finish, and one budget
for the whole process. Raw client frames into the server's protocol, a fake clock, no network."""

from __future__ import annotations

import base64
import json
import os
from types import SimpleNamespace

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from construct.metrics import Metrics
from construct.protocol.connection import AddressCounts, ConnectionTracker
from construct.protocol.timeouts import MESSAGE_TIMEOUT, ConnectionLimits
from construct.protocol.ws import (
    CHUNK_OVERHEAD_BYTES,
    FRAME_OVERHEAD_BYTES,
    MAX_MESSAGE_BYTES,
    TRY_AGAIN_LATER,
    ConstructWebSocketFactory,
)

PROTOCOL_LIMIT = 2 * 64 * 1024 + 16 * 1024
TEXT, BINARY, CONTINUATION = 1, 2, 0
ZERO_MASK = bytes(4)  # masked as clients must, with a key that leaves the bytes as they are


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    return head + ZERO_MASK + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole frame the server wrote after its handshake answer."""
    data = data.split(b"\r\n\r\n", 1)[1]
    frames = []
    while len(data) >= 2:
        opcode, size, head = data[0] & 0x0F, data[1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(data[2:4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(data[2:10], "big"), 10
        frames.append((opcode, data[head:head + size]))
        data = data[head + size:]
    return frames


def close_code(transport: StringTransport) -> int | None:
    closes = [payload for opcode, payload in server_frames(transport.value()) if opcode == 8]
    return int.from_bytes(closes[0][:2], "big") if closes else None


def errors(transport: StringTransport) -> list[str]:
    return [json.loads(payload)["payload"]["code"] for opcode, payload in server_frames(transport.value()) if opcode == 1]


class Server:
    def __init__(self, max_frame_bytes: int = PROTOCOL_LIMIT, budget: int = 1 << 24, message_timeout: float = 10):
        self.clock = task.Clock()
        self.tracker = ConnectionTracker(self.clock)
        core = SimpleNamespace(metrics=Metrics(), hub=SimpleNamespace(detach=lambda connection: None))
        limits = ConnectionLimits(message_timeout=message_timeout)
        self.factory = ConstructWebSocketFactory(
            core, max_frame_bytes, self.tracker, AddressCounts(0), limits, self.clock, ["*"], unfinished_budget=budget
        )
        self.open: list = []

    def connect(self):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.5", 40000))
        protocol.makeConnection(transport)
        key = base64.b64encode(os.urandom(16))
        protocol.dataReceived(
            b"GET /ws HTTP/1.1\r\nHost: chat.example.org\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert transport.value().startswith(b"HTTP/1.1 101")
        self.open.append(protocol)
        return protocol, transport

    def close_all(self) -> None:
        for protocol in self.open:
            protocol.connectionLost(Failure(ConnectionDone()))


def sweep(websocket: Server) -> None:
    sweep = websocket.tracker.sweep()
    # The sweep never waits: its coroutine is done once started.
    with pytest.raises(StopIteration):
        sweep.send(None)


@pytest.fixture
def server():
    made: list[Server] = []

    def make(**options) -> Server:
        made.append(Server(**options))
        return made[-1]

    yield make
    for each in made:
        each.close_all()


@pytest.mark.parametrize("max_message_bytes", [64 * 1024, 2**24])
def test_the_cap_on_a_message_is_1_mib_whatever_max_message_bytes(server, max_message_bytes):
    websocket = server(max_frame_bytes=2 * max_message_bytes + 16 * 1024)
    protocol, transport = websocket.connect()
    assert protocol.maxMessagePayloadSize == protocol.maxFramePayloadSize == MAX_MESSAGE_BYTES == 1 << 20
    # Fragments count together: one byte past the cap in all closes with 1009.
    protocol.dataReceived(client_frame(BINARY, bytes(MAX_MESSAGE_BYTES // 2), fin=False))
    protocol.dataReceived(client_frame(CONTINUATION, bytes(MAX_MESSAGE_BYTES // 2 + 1)))
    assert close_code(transport) == 1009


def test_a_message_over_the_protocol_limit_but_within_the_cap_is_answered_and_the_connection_stays(server):
    websocket = server()
    protocol, transport = websocket.connect()
    # Between the old cap (4 x the protocol limit) and 1 MiB.
    protocol.dataReceived(client_frame(TEXT, b"x" * (900 * 1024)))
    websocket.clock.advance(0)  # replies go out at the end of the turn
    assert errors(transport) == ["MESSAGE_TOO_LARGE"] and close_code(transport) is None
    assert websocket.factory.unfinished.held == 0


def test_a_fragmented_message_not_finished_in_time_closes_the_connection(server):
    websocket = server(message_timeout=10)
    slow, slow_transport = websocket.connect()
    prompt, prompt_transport = websocket.connect()
    slow.dataReceived(client_frame(TEXT, b'{"type":', fin=False))
    prompt.dataReceived(client_frame(TEXT, b'{"type":', fin=False))
    for _ in range(2):
        websocket.clock.advance(5)
        # Fragments keep coming, which does not move the deadline.
        slow.dataReceived(client_frame(CONTINUATION, b" ", fin=False))
        sweep(websocket)
    assert close_code(slow_transport) is None
    prompt.dataReceived(client_frame(CONTINUATION, b'"nosuchtype"}'))
    websocket.clock.advance(1)
    sweep(websocket)
    # 11 s after its first frame.
    websocket.clock.advance(0)
    assert close_code(slow_transport) == 1008 and errors(slow_transport) == ["CONNECTION_TIMEOUT"]
    assert MESSAGE_TIMEOUT.encode() in dict(server_frames(slow_transport.value()))[8]
    # Finished in time: answered (an unknown type), and its clock stopped with it.
    assert errors(prompt_transport) == ["UNKNOWN_TYPE"] and close_code(prompt_transport) is None
    websocket.clock.advance(30)
    sweep(websocket)
    assert close_code(prompt_transport) is None
    # What the slow one held was let go as it was given up.
    assert websocket.factory.unfinished.held == 0


def test_unfinished_messages_share_one_budget_and_the_connection_that_would_pass_it_is_closed(server):
    websocket = server(budget=100_000)
    budget = websocket.factory.unfinished
    first, first_transport = websocket.connect()
    second, second_transport = websocket.connect()
    first.dataReceived(client_frame(TEXT, b" " * 60_000, fin=False))
    held = 60_000 + FRAME_OVERHEAD_BYTES + CHUNK_OVERHEAD_BYTES
    assert budget.held == held
    second.dataReceived(client_frame(BINARY, bytes(60_000), fin=False))
    assert close_code(second_transport) == TRY_AGAIN_LATER and budget.held == held
    # What the second one sends from now on is not kept either.
    second.dataReceived(client_frame(CONTINUATION, bytes(30_000), fin=False))
    assert budget.held == held
    # The first one was within the budget: it goes on, and its message, once whole, is answered.
    first.dataReceived(client_frame(CONTINUATION, b"[]"))
    websocket.clock.advance(0)
    assert close_code(first_transport) is None and errors(first_transport) == ["INVALID_FORMAT"]
    assert budget.held == 0


def test_a_message_in_tiny_fragments_is_counted_with_what_each_fragment_costs(server):
    """2,000 one-byte fragments hold far more than 2,000 bytes: counted as such, they pass a
    budget of 200 kB long before the 1 MiB cap."""
    websocket = server(budget=200_000)
    protocol, transport = websocket.connect()
    protocol.dataReceived(client_frame(BINARY, b"\x00", fin=False))
    protocol.dataReceived(b"".join(client_frame(CONTINUATION, b"\x00", fin=False) for _ in range(2000)))
    assert close_code(transport) == TRY_AGAIN_LATER and websocket.factory.unfinished.held == 0


def test_a_closed_connection_gives_back_what_its_unfinished_message_held(server):
    websocket = server()
    protocol, _ = websocket.connect()
    protocol.dataReceived(client_frame(BINARY, bytes(1000), fin=False))
    assert websocket.factory.unfinished.held > 1000
    protocol.connectionLost(Failure(ConnectionDone()))
    websocket.open.remove(protocol)
    assert websocket.factory.unfinished.held == 0
