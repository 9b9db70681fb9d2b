"""--ws-padding: WebSocket messages padded to size buckets, still readable as they are."""

from __future__ import annotations

import json
import os

import msgpack
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from construct.http.api import HttpApi
from construct.http.site import build_site
from construct.protocol import codec
from construct.protocol.connection import AddressCounts, ConnectionLimits, ConnectionTracker
from construct.protocol.padding import LARGE_STEP, SMALLEST_BUCKET, bucket, pad
from construct.protocol.ws import ConstructWebSocketFactory
from tests.clients import WsClient, _WsProtocol
from tests.helpers import PASSWORD, make_bundle


def test_buckets_are_powers_of_two_then_multiples_of_64_kib():
    assert [bucket(n) for n in (0, 1, 512, 513, 1024, 1025, 65536, 65537, 200_000)] == \
        [512, 512, 512, 1024, 1024, 2048, 65536, 131072, 262144]


@settings(max_examples=50)
@given(st.dictionaries(st.text(max_size=8), st.binary(max_size=3000) | st.text(max_size=3000), max_size=3),
       st.sampled_from([codec.JSON, codec.MSGPACK]))
def test_a_padded_message_fills_its_bucket_and_decodes_to_the_same_message(payload, encoding):
    data = codec.encode("message", payload, "7", encoding)
    padded = pad(data, encoding == codec.MSGPACK)
    assert len(padded) == bucket(len(padded)) and len(padded) >= len(data)
    frame = codec.decode(padded, encoding)
    assert (frame.type, frame.request_id) == ("message", "7")
    original = codec.decode(data, encoding)
    assert frame.payload == original.payload


class _SizedProtocol(_WsProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.sizes.append(len(payload))
        super().onMessage(payload, isBinary)


async def _connect(port: int, encoding: str, sizes: list[int]) -> WsClient:
    """A test client that also notes the size of every message it receives."""
    client = WsClient(encoding)
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws")
    factory.protocol = _SizedProtocol
    factory.client, factory.sizes, factory.opened = client, sizes, defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await factory.opened.addTimeout(10, reactor)
    return client


@pytest.fixture
def backend():
    return "sqlite"


@pytest.mark.parametrize("encoding", [codec.MSGPACK, codec.JSON])
@pytest_twisted.ensureDeferred
async def test_a_padding_server_sends_only_bucket_sizes_and_reads_padded_requests(core, encoding):
    tracker = ConnectionTracker(reactor)
    factory = ConstructWebSocketFactory(core, 1 << 17, tracker, AddressCounts(0), ConnectionLimits(), reactor, ["*"],
                                        padding=True)
    port = reactor.listenTCP(0, build_site(factory, HttpApi(core), 1 << 17), interface="127.0.0.1")
    try:
        sizes: list[int] = []
        client = await _connect(port.getHost().port, encoding, sizes)
        # A padded request is read like any other.
        register = codec.encode("register", {"username": "padded", "password": PASSWORD, "publicKey": make_bundle()},
                                None, encoding)
        client.send_raw(pad(register, encoding == codec.MSGPACK), encoding == codec.MSGPACK)
        assert (await client.next())["type"] == "registerSuccess"
        assert (await client.request("ping"))["type"] == "pong"
        lookup = await client.request("lookupUser", {"username": "x" * 30})
        assert lookup["type"] == "error"
        assert sizes == [SMALLEST_BUCKET] * 3
        await client.close()
    finally:
        await port.stopListening()


def test_padding_never_shrinks_and_caps_its_overhead_past_64_kib():
    for size in (100, 5000, LARGE_STEP + 1, 3 * LARGE_STEP - 10):
        data = json.dumps({"type": "message", "payload": {"content": "y" * size}}).encode()
        padded = pad(data, binary=False)
        assert len(data) <= len(padded) < max(2 * len(data), len(data) + LARGE_STEP)
    packed = msgpack.packb({"type": "message", "payload": {"content": os.urandom(70_000)}}, use_bin_type=True)
    assert len(pad(packed, binary=True)) == 2 * LARGE_STEP
