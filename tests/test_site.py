"""The public site in-process: what a WebSocket upgrade leaves behind."""

from __future__ import annotations

import gc
import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.http import HTTPChannel, Request

from construct.http.api import HttpApi
from construct.http.health import build_health_site
from construct.http.site import build_site
from construct.metrics import Metrics
from construct.protocol.connection import AddressCounts, ConnectionTracker
from construct.protocol.timeouts import ConnectionLimits
from construct.protocol.ws import ConstructWebSocketFactory
from construct.tap import origins
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


@pytest_twisted.async_yield_fixture
async def site_port(core):
    """The open site with --allowed-origins https://chat.example.org, on a loopback port."""
    allowed = origins("https://chat.example.org")
    factory = ConstructWebSocketFactory(core, 1 << 16, ConnectionTracker(reactor), AddressCounts(0), ConnectionLimits(),
                                        reactor, allowed)
    port = reactor.listenTCP(0, build_site(factory, HttpApi(core, allowed), 1 << 16), interface="127.0.0.1")
    yield port.getHost().port
    await port.stopListening()


async def _call(port: int, method: str, path: str, body: bytes | None = None, **headers: str):
    response = await treq.request(method, f"http://127.0.0.1:{port}{path}", data=body,
                                  headers={name.replace("_", "-"): [value] for name, value in headers.items()})
    content = await treq.content(response)
    return response, content


LOGIN = json.dumps({"username": "alice", "password": "Wrong-password-42"}).encode()


@pytest_twisted.ensureDeferred
async def test_api_bodies_must_be_sent_as_application_json(site_port):
    """A page of another site can make a browser POST text/plain or a form without a CORS
    preflight; those are refused before anything is done, with a clear JSON error."""
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        headers = {} if content_type is None else {"Content_Type": content_type}
        response, body = await _call(site_port, "POST", "/v1/sessions", LOGIN, **headers)
        assert response.code == 415, (content_type, body)
        assert json.loads(body)["code"] == "UNSUPPORTED_MEDIA_TYPE"
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
    response, body = await _call(site_port, "POST", "/v1/sessions", LOGIN, Content_Type="application/json; charset=utf-8")
    assert response.code == 401 and json.loads(body)["code"] == "INVALID_CREDENTIALS"


@pytest_twisted.ensureDeferred
async def test_api_checks_a_browser_s_origin_as_the_websocket_does(site_port):
    allowed = {"Content_Type": "application/json"}
    for origin in ("https://evil.example", "http://chat.example.org", "https://chat.example.org:8443", "garbage"):
        response, body = await _call(site_port, "POST", "/v1/sessions", LOGIN, Origin=origin, **allowed)
        assert response.code == 403 and json.loads(body)["code"] == "ORIGIN_NOT_ALLOWED", (origin, body)
    response, body = await _call(site_port, "GET", "/v1/server-keys", Origin="https://evil.example")
    assert response.code == 403, body
    # The allowed origin, and clients that send none (not browsers), pass.
    response, _ = await _call(site_port, "POST", "/v1/sessions", LOGIN, Origin="https://chat.example.org", **allowed)
    assert response.code == 401
    response, _ = await _call(site_port, "POST", "/v1/sessions", LOGIN, **allowed)
    assert response.code == 401
    response, _ = await _call(site_port, "GET", "/v1/server-keys")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_no_response_names_twisted_web(site_port):
    """Not the site, the web client, the API (answers and errors), nor the health endpoint."""
    answers = [
        await _call(site_port, "GET", "/"),
        await _call(site_port, "GET", "/web/app.css"),
        await _call(site_port, "GET", "/nothing-here"),
        await _call(site_port, "GET", "/v1/server-keys"),
        await _call(site_port, "GET", "/v1/openapi.json"),
        await _call(site_port, "GET", "/v1/no-such-route"),
        await _call(site_port, "POST", "/v1/sessions", b"x", Content_Type="text/plain"),
        await _call(site_port, "POST", "/v1/sessions", b"x" * (1 << 17), Content_Type="application/json"),
    ]
    health = reactor.listenTCP(0, build_health_site({}, Metrics(), reactor), interface="127.0.0.1")
    try:
        for path in ("/health", "/metrics", "/nothing-here"):
            answers.append(await _call(health.getHost().port, "GET", path))
    finally:
        await health.stopListening()
    for response, _ in answers:
        assert response.headers.getRawHeaders("server") is None, response.headers
