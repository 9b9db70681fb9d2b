"""twisted.web resources for the web client: the page at `/`, its files under `/web/`."""

from __future__ import annotations

import functools
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

STATIC = Path(__file__).with_name("static")
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".txt": b"text/plain; charset=utf-8",
}
# Scripts only from this origin; WebAssembly (libsodium) needs 'wasm-unsafe-eval', which allows
# compiling WebAssembly and nothing else (no eval of JavaScript). The WebSocket is `connect-src
# 'self'` (same host and port, ws: or wss:). Nothing may frame the page, no form posts anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode(),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    # Always revalidate (cheap: the ETag answers 304), so an upgraded server is picked up at once.
    b"cache-control": b"no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: bytes
    etag: bytes


@functools.cache
def load_assets(directory: Path = STATIC) -> dict[str, Asset]:
    """Every file under `directory` by its relative path, read and compressed once per process."""
    assets = {}
    for path in sorted(directory.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
        assets[path.relative_to(directory).as_posix()] = Asset(body, zlib.compress(body, 6, wbits=31), content_type, etag)
    return assets


def _serve(request: Request, asset: Asset | None) -> bytes:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    if asset is None:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Not found\n"
    request.setHeader(b"content-type", asset.content_type)
    request.setHeader(b"etag", asset.etag)
    request.setHeader(b"vary", b"accept-encoding")
    if asset.etag in (request.getHeader(b"if-none-match") or b"").replace(b" ", b"").split(b","):
        request.setResponseCode(304)
        return b""
    body = asset.body
    if b"gzip" in (request.getHeader(b"accept-encoding") or b"").lower():
        request.setHeader(b"content-encoding", b"gzip")
        body = asset.gzipped
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


class WebFiles(Resource):
    """The page's files, `/web/<path>`; nothing else (no listing, no files outside `static/`)."""

    isLeaf = True

    def __init__(self, assets: dict[str, Asset]) -> None:
        super().__init__()
        self._assets = assets

    def render_GET(self, request: Request) -> bytes:
        path = b"/".join(request.postpath).decode("utf-8", "replace")
        return _serve(request, None if path == INDEX else self._assets.get(path))

    render_HEAD = render_GET


class PageOrWebSocket(Resource):
    """`/`: a WebSocket upgrade goes to the WebSocket resource (seed clients connect here), any
    other GET gets the web client's page."""

    isLeaf = True

    def __init__(self, websocket: Resource, assets: dict[str, Asset]) -> None:
        super().__init__()
        self._websocket = websocket
        self._page = assets[INDEX]

    def render(self, request: Request) -> Any:
        if b"websocket" in (request.getHeader(b"upgrade") or b"").lower():
            return self._websocket.render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        return _serve(request, self._page)
