"""The web client as the site serves it: the page at /, its files under /web/, their headers,
and WebSocket upgrades at / that still reach the WebSocket (seed clients connect there)."""

from __future__ import annotations

import ast
import fnmatch
import gzip

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, PartialDownloadError, readBody
from twisted.web.http_headers import Headers

from construct.http.api import HttpApi
from construct.http.site import build_site
from construct.protocol.connection import AddressCounts, ConnectionLimits, ConnectionTracker
from construct.protocol.ws import ConstructWebSocketFactory
from construct.web.resource import CONTENT_SECURITY_POLICY, STATIC, load_assets
from tests.clients import WsClient
from tests.processes import REPO


@pytest.fixture
def backend():
    return "sqlite"


@pytest_twisted.async_yield_fixture
async def site_port(core):
    tracker = ConnectionTracker(reactor)
    factory = ConstructWebSocketFactory(core, 1 << 16, tracker, AddressCounts(0), ConnectionLimits(), reactor, ["*"])
    port = reactor.listenTCP(0, build_site(factory, HttpApi(core), 1 << 16), interface="127.0.0.1")
    yield port.getHost().port
    await port.stopListening()


async def _get(port: int, path: str, method: str = "GET", **headers: str):
    """A plain Agent: treq would ask for gzip and decode it itself."""
    agent = Agent(reactor)
    raw = Headers({name.replace("_", "-"): [value] for name, value in headers.items()})
    response = await agent.request(method.encode(), f"http://127.0.0.1:{port}{path}".encode(), raw)
    return response, await readBody(response)


def _assert_secured(response) -> None:
    header = response.headers.getRawHeaders
    assert header("content-security-policy") == [CONTENT_SECURITY_POLICY]
    assert header("x-content-type-options") == ["nosniff"]
    assert header("referrer-policy") == ["no-referrer"]
    assert header("x-frame-options") == ["DENY"]


@pytest_twisted.ensureDeferred
async def test_the_page_is_at_the_root_with_a_strict_policy(site_port):
    """GET / is the web client's page, saying what the server is and where the docs are; the policy
    allows scripts and connections to this origin only, and WebAssembly but no eval."""
    response, body = await _get(site_port, "/")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    _assert_secured(response)
    page = body.decode()
    assert "Construct</strong> server" in page and "docs/protocol.md" in page and "/v1/openapi.json" in page
    assert '<script type="module" src="web/js/app.mjs">' in page and "<script>" not in page
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"] == "'self' 'wasm-unsafe-eval'"
    head, _ = await _get(site_port, "/", "HEAD")
    assert head.code == 200
    post, _ = await _get(site_port, "/", "POST")
    assert post.code == 405


@pytest_twisted.ensureDeferred
async def test_files_are_served_typed_compressed_and_revalidated(site_port):
    """Modules are JavaScript (nosniff would refuse them otherwise), gzip when asked, and an ETag
    answers 304."""
    plain, body = await _get(site_port, "/web/vendor/libsodium-sumo.mjs", accept_encoding="identity")
    assert plain.code == 200 and body == (STATIC / "vendor" / "libsodium-sumo.mjs").read_bytes()
    assert plain.headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    _assert_secured(plain)
    packed, packed_body = await _get(site_port, "/web/vendor/libsodium-sumo.mjs", accept_encoding="gzip, deflate")
    assert packed.headers.getRawHeaders("content-encoding") == ["gzip"]
    assert len(packed_body) < len(body) / 2 and gzip.decompress(packed_body) == body
    etag = plain.headers.getRawHeaders("etag")[0]
    again, again_body = await _get(site_port, "/web/js/app.mjs", if_none_match=load_assets()["js/app.mjs"].etag.decode())
    assert (again.code, again_body) == (304, b"")
    assert etag != load_assets()["js/app.mjs"].etag.decode()


@pytest.mark.parametrize("path", ["/web/", "/web/js/", "/web/nope.mjs", "/web/index.html", "/web/../setup.py",
                                  "/web/%2e%2e/%2e%2e/setup.py", "/index.html", "/app.css"])
@pytest_twisted.ensureDeferred
async def test_nothing_else_is_served(site_port, path):
    """No listings, nothing outside the static folder, the page only at /."""
    response, body = await _get(site_port, path)
    assert response.code == 404
    assert b"def " not in body and b"<li>" not in body


@pytest_twisted.ensureDeferred
async def test_a_websocket_upgrade_to_the_root_still_reaches_the_websocket(site_port):
    """Seed clients connect at /: the page must not take their upgrade."""
    for path in ("/", "/ws"):
        client = await WsClient.connect(site_port, path=path)
        try:
            assert (await client.request("ping", {}))["type"] == "pong"
        finally:
            await client.close()
    with pytest.raises(PartialDownloadError, match="426"):  # Autobahn's answer has no length
        await _get(site_port, "/ws")


def test_every_static_file_is_packaged():
    """setup.py's package_data ships every file the page needs, so `pip install .` serves it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    patterns = package_data["construct.web"]
    files = [path.relative_to(STATIC.parent).as_posix() for path in STATIC.rglob("*") if path.is_file()]
    assert files and all(any(fnmatch.fnmatch(name, pattern) and name.count("/") == pattern.count("/") for pattern in patterns) for name in files)
    assert set(load_assets()) >= {"index.html", "app.css", "js/app.mjs", "vendor/libsodium-sumo.mjs"}
