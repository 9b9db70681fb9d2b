"""The public site in-process: what a WebSocket upgrade leaves behind."""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.http import HTTPChannel, Request

from construct.http.api import HttpApi
from construct.http.site import build_site
from construct.protocol.connection import AddressCounts, ConnectionTracker
from construct.protocol.timeouts import ConnectionLimits
from construct.protocol.ws import ConstructWebSocketFactory
from tests.clients import WsClient


@pytest.fixture
def backend():
    return "sqlite"


def _alive(kind: type, site) -> int:
    """Objects of `kind` serving `site` that are still reachable, without collecting cycles."""
    def serves(candidate) -> bool:
        channel = candidate if isinstance(candidate, HTTPChannel) else getattr(candidate, "channel", None)
        return getattr(channel, "site", None) is site or getattr(candidate, "site", None) is site

    return sum(1 for candidate in gc.get_objects() if isinstance(candidate, kind) and serves(candidate))


@pytest_twisted.ensureDeferred
async def test_an_upgraded_connection_keeps_no_http_channel_or_request(core):
    """After the upgrade only the WebSocket protocol remains: the HTTP channel and request are freed
    at once (no timer, no cycle), and the handshake text is dropped."""
    tracker = ConnectionTracker(reactor)
    factory = ConstructWebSocketFactory(core, 1 << 16, tracker, AddressCounts(0), ConnectionLimits(), reactor, ["*"])
    site = build_site(factory, HttpApi(core), 1 << 16)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    clients = [await WsClient.connect(port.getHost().port) for _ in range(3)]
    try:
        for client in clients:
            assert (await client.request("ping", {}))["type"] == "pong"
        # Only this site's: HTTP objects of other tests may come and go meanwhile.
        assert (_alive(HTTPChannel, site), _alive(Request, site)) == (0, 0)
        for protocol in tracker._protocols:
            assert protocol.http_request_data is None and protocol.http_headers is None
    finally:
        for client in clients:
            await client.close()
        await port.stopListening()
