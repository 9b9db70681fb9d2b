"""--camouflage: an ordinary static website to everyone but Construct clients, who use the secret --ws-path.

In process: the site's files, redirects, error pages and headers, what happens to the paths a
censor would try (`/`, `/ws`, `/v1`), and that Construct still works under the secret path.
On the wire: a real server with an `ssl:` listener answers `/`, `/robots.txt` and a random
path over HTTPS like a static site, and a WebSocket client registers through the secret path.
"""

from __future__ import annotations

import base64
import json
import os
import secrets

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from construct.http.api import HttpApi
from construct.http.camouflage import MAX_SITE_BYTES, SiteError, StaticSite, build_camouflaged_site, error_page
from construct.protocol.connection import AddressCounts, ConnectionLimits, ConnectionTracker
from construct.protocol.ws import ConstructWebSocketFactory
from construct.tap import Options
from tests.clients import WsClient
from tests.helpers import PASSWORD, make_bundle
from tests.processes import ServerProcess
from tests.test_tls import _wss, make_certificates

SECRET = "/" + secrets.token_urlsafe(18)
# What must never appear in anything the site answers to a stranger.
GIVEAWAYS = (b"twisted", b"construct", b"autobahn", b"klein", b"websocket", b"upgrade required", b"426")
UPGRADE = {"Upgrade": ["websocket"], "Connection": ["Upgrade"], "Sec-WebSocket-Version": ["13"],
           "Sec-WebSocket-Key": [base64.b64encode(os.urandom(16)).decode()]}


@pytest.fixture
def backend():
    return "sqlite"


@pytest.fixture
def site_dir(tmp_path):
    root = tmp_path / "www"
    (root / "about").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / ".git").mkdir()
    (root / "index.html").write_text("<h1>Home of the gardening club</h1>")
    (root / "about" / "index.html").write_text("<p>About us</p>")
    (root / "style.css").write_text("body { color: green }")
    (root / "empty" / "notes.txt").write_text("notes")
    (root / ".git" / "config").write_text("[core] secret")
    return root


def _listen(core, site_dir, web_client: bool = False):
    tracker = ConnectionTracker(reactor)
    factory = ConstructWebSocketFactory(core, 1 << 16, tracker, AddressCounts(0), ConnectionLimits(), reactor, ["*"])
    site = build_camouflaged_site(StaticSite.load(str(site_dir)), factory, HttpApi(core), 1 << 16, SECRET, web_client)
    return reactor.listenTCP(0, site, interface="127.0.0.1")


@pytest_twisted.async_yield_fixture
async def camouflaged(core, site_dir):
    """A camouflaged site on a loopback port; yields (base URL, port number)."""
    port = _listen(core, site_dir)
    yield f"http://127.0.0.1:{port.getHost().port}", port.getHost().port
    await port.stopListening()


async def _get(url: str, method: str = "GET", **kwargs):
    response = await treq.request(method, url, **kwargs)
    return response, await treq.content(response)


def _assert_plain(response, body: bytes) -> None:
    """Nothing in the answer names the software behind it, except as nginx."""
    headers = b" ".join(b"%s: %s" % (name, b",".join(values)) for name, values in response.headers.getAllRawHeaders())
    assert response.headers.getRawHeaders("server") == ["nginx"]
    for word in GIVEAWAYS:
        assert word not in headers.lower() and word not in body.lower(), word


@pytest_twisted.ensureDeferred
async def test_the_site_serves_its_files_like_a_static_web_server(camouflaged):
    base, _ = camouflaged
    response, body = await _get(base + "/")
    assert (response.code, body) == (200, b"<h1>Home of the gardening club</h1>")
    assert response.headers.getRawHeaders("content-type") == ["text/html"]
    etag = response.headers.getRawHeaders("etag")[0]
    assert response.headers.getRawHeaders("last-modified")
    _assert_plain(response, body)

    response, body = await _get(base + "/style.css?v=2")
    assert (response.code, body, response.headers.getRawHeaders("content-type")) == \
        (200, b"body { color: green }", ["text/css"])
    response, body = await _get(base + "/about", allow_redirects=False)
    assert (response.code, response.headers.getRawHeaders("location")) == (301, ["/about/"])
    assert b"301 Moved Permanently" in body
    response, body = await _get(base + "/about/")
    assert (response.code, body) == (200, b"<p>About us</p>")
    response, body = await _get(base + "/", headers={"If-None-Match": [etag]})
    assert (response.code, body) == (304, b"")
    response, body = await _get(base + "/", method="HEAD")
    assert (response.code, body, response.headers.getRawHeaders("content-length")) == (200, b"", ["35"])


@pytest_twisted.ensureDeferred
async def test_errors_are_nginx_pages(camouflaged):
    base, _ = camouflaged
    for path, code in (("/no-such-page", 404), ("/empty/", 403), ("/.git/config", 404), ("/%2e%2e/%2e%2e/etc/passwd", 400),
                       ("/%ff", 400)):
        response, body = await _get(base + path)
        assert (response.code, body) == (code, error_page(code)), path
        _assert_plain(response, body)
    response, body = await _get(base + "/", method="POST", data=b"x=1")
    assert (response.code, body) == (405, error_page(405))
    response, body = await _get(base + "/nothing", method="DELETE")
    assert response.code == 404
    response, body = await _get(base + "/", method="POST", data=b"x" * (1 << 17))
    assert (response.code, body) == (413, error_page(413))
    _assert_plain(response, body)


@pytest_twisted.ensureDeferred
async def test_only_the_secret_path_is_construct(camouflaged):
    """A censor trying the usual places finds the website; a client with the secret path finds Construct."""
    base, port = camouflaged
    for path in ("/", "/ws", "/v1", "/v1/openapi.json", SECRET, SECRET + "/ws", SECRET + "/"):
        # A plain GET of the secret path is a 404 too; only an upgrade there is Construct's.
        for headers in ({}, UPGRADE) if path != SECRET else ({},):
            response, body = await _get(base + path, headers=headers)
            assert response.code in (200, 404), (path, response.code)
            _assert_plain(response, body)
    response, body = await _get(base + SECRET + "/v1/openapi.json")
    assert response.code == 200 and json.loads(body)["openapi"]
    client = await WsClient.connect(port, path=SECRET)
    try:
        reply = await client.request("register", {"username": "gardener", "password": PASSWORD,
                                                  "publicKey": make_bundle()})
        assert reply["type"] == "registerSuccess"
        response, body = await _get(base + SECRET + "/v1/sessions", method="POST",
                                    data=json.dumps({"username": "gardener", "password": PASSWORD}).encode(),
                                    headers={"Content-Type": "application/json"})
        assert response.code == 200 and json.loads(body)["username"] == "gardener"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_the_web_client_is_only_under_the_secret_path(core, site_dir):
    """With --camouflage-web-client the page and its files are under <ws-path>/, its WebSocket at
    <ws-path>/ws; at / and /web/ there is only the website, as without it."""
    port = _listen(core, site_dir, web_client=True)
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        response, body = await _get(base + SECRET, allow_redirects=False)
        assert (response.code, response.headers.getRawHeaders("location")) == (301, [SECRET + "/"])
        response, body = await _get(base + SECRET + "/")
        assert response.code == 200 and b'src="web/js/app.mjs"' in body
        assert response.headers.getRawHeaders("content-security-policy")
        response, body = await _get(base + SECRET + "/web/js/client.mjs")
        assert response.code == 200 and b"export function serverUrl" in body
        for path in ("/web/js/client.mjs", "/web/app.css"):
            response, body = await _get(base + path)
            assert (response.code, body) == (404, error_page(404)), path
        client = await WsClient.connect(port.getHost().port, path=SECRET + "/ws")
        assert (await client.request("ping"))["type"] == "pong"
        await client.close()
    finally:
        await port.stopListening()
    # Without the option, nothing of it anywhere.
    port = _listen(core, site_dir)
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        for path in (SECRET + "/", SECRET + "/web/app.css"):
            response, body = await _get(base + path)
            assert (response.code, body) == (404, error_page(404)), path
    finally:
        await port.stopListening()


def test_a_site_needs_an_index_and_a_bounded_size(tmp_path):
    with pytest.raises(SiteError, match="no index.html"):
        StaticSite.load(str(tmp_path))
    (tmp_path / "index.html").write_bytes(b"x" * (MAX_SITE_BYTES + 1))
    with pytest.raises(SiteError, match="more than"):
        StaticSite.load(str(tmp_path))
    with pytest.raises(SiteError, match="not a directory"):
        StaticSite.load(str(tmp_path / "missing"))
    default = StaticSite.default()
    assert set(default.files) == {"index.html", "robots.txt"}


def test_camouflage_refuses_a_guessable_websocket_path():
    options = Options(environ={})
    with pytest.raises(SystemExit, match="--ws-path nobody can guess"):
        options.parseOptions(["--camouflage"])
    options = Options(environ={})
    options.parseOptions(["--camouflage", "--ws-path", SECRET])
    assert options["ws-path"] == SECRET
    for bad in ("ws", "/a/b", "/v1", "/"):
        with pytest.raises(SystemExit, match="--ws-path"):
            Options(environ={}).parseOptions(["--ws-path", bad])


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_https_listener_looks_like_a_static_site(tmp_path):
    """A real server on ssl: with --camouflage and the default site; what a prober and a client see."""
    ca_pem, _ = make_certificates(tmp_path)
    tls = f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'server.key'}:certKey={tmp_path / 'server.crt'}"
    server = await ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--listen", tls,
                                 "--camouflage", "--ws-path", SECRET).start_async()
    try:
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca_pem)))
        https = treq.client.HTTPClient(agent)
        base = f"https://localhost:{server.ports['http']}"

        async def get(path: str, **kwargs):
            response = await https.get(base + path, **kwargs)
            return response, await treq.content(response)

        response, body = await get("/")
        assert response.code == 200 and b"<title>Welcome</title>" in body
        _assert_plain(response, body)
        response, body = await get("/robots.txt")
        assert (response.code, body) == (200, b"User-agent: *\nDisallow:\n")
        assert response.headers.getRawHeaders("content-type") == ["text/plain"]
        for path in ("/" + secrets.token_hex(6), "/ws", "/v1/openapi.json"):
            response, body = await get(path, headers=UPGRADE if path == "/ws" else {})
            assert (response.code, body) == (404, error_page(404)), path
            _assert_plain(response, body)

        client = await _wss(server.ports["http"], ca_pem, SECRET)
        reply = await client.request("register", {"username": "visitor", "password": PASSWORD,
                                                  "publicKey": make_bundle()})
        assert reply["type"] == "registerSuccess"
        await client.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()
