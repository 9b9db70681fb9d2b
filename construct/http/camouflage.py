"""`--camouflage`: to anything that is not a Construct client, the listener is an ordinary static website.

A censor probing the port (or a crawler) gets the files of `--camouflage-site` (by default a
plain placeholder page and a robots.txt), with the status codes, error pages and headers of a
stock nginx: 404 for what does not exist, 301 to add a directory's slash, 403 for a directory
without an index, 405 for other methods than GET and HEAD on a file, 304 for conditional
requests, `Server: nginx` and never a word of Twisted, Autobahn or Construct. Construct itself
answers only under the one secret path `--ws-path`: a WebSocket upgrade there is a Construct
connection and `<ws-path>/v1/…` is the HTTP API; a plain request there gets the site's 404 like
any other path, or, with `--camouflage-web-client`, a redirect to the web client's page at
`<ws-path>/`. The WebSocket upgrade at `/` that seed clients use and the web client at `/` are
not served: `/` is the site's home page.

The files are read once, at startup, into memory (at most MAX_SITE_BYTES): no request reads
the disk, and no path can reach outside the directory.
"""

from __future__ import annotations

import mimetypes
import os
import posixpath
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request

from construct.http.api import HttpApi
from construct.http.site import ConstructSite, LimitedRequest, UpgradeResource, Utf8Only
from construct.web.resource import PageOrWebSocket, WebFiles, load_assets

SERVER_NAME = b"nginx"
MAX_SITE_BYTES = 64 * 2**20
INDEX = "index.html"
# A site may bring its own page for missing files, as nginx's `error_page 404 /404.html` does.
NOT_FOUND_PAGE = "404.html"
REASONS = {
    301: b"Moved Permanently",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Not Allowed",
    413: b"Request Entity Too Large",
    500: b"Internal Server Error",
    503: b"Service Temporarily Unavailable",
}


def error_page(code: int) -> bytes:
    """nginx's own error page for `code`."""
    title = b"%d %s" % (code, REASONS[code])
    return (
        b"<html>\r\n<head><title>" + title + b"</title></head>\r\n<body>\r\n<center><h1>" + title
        + b"</h1></center>\r\n<hr><center>" + SERVER_NAME + b"</center>\r\n</body>\r\n</html>\r\n"
    )


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: bytes
    modified: float
    etag: bytes


class SiteError(Exception):
    """The site directory cannot be served; the message says why."""


class StaticSite:
    """The files of a directory, by their path relative to it (`about/index.html`)."""

    def __init__(self, files: dict[str, StaticFile]) -> None:
        self.files = files
        self.directories = {""} | {
            "/".join(parts[:depth]) for parts in (name.split("/") for name in files) for depth in range(1, len(parts))
        }

    @classmethod
    def load(cls, directory: str) -> "StaticSite":
        """Every regular file under `directory` except hidden ones (a `.git` must not be served)."""
        if not os.path.isdir(directory):
            raise SiteError(f"{directory} is not a directory")
        files: dict[str, StaticFile] = {}
        total = 0
        for folder, subfolders, names in os.walk(directory):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.startswith(".") or not os.path.isfile(path):
                    continue
                with open(path, "rb") as file:
                    body = file.read(MAX_SITE_BYTES + 1 - total)
                total += len(body)
                if total > MAX_SITE_BYTES:
                    raise SiteError(f"{directory} holds more than {MAX_SITE_BYTES // 2**20} MiB; serve a bigger site "
                                    "from a web server in front (docs/operations.md)")
                modified = os.stat(path).st_mtime
                relative = os.path.relpath(path, directory).replace(os.sep, "/")
                content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
                etag = b'"%x-%x"' % (int(modified), len(body))
                files[relative] = StaticFile(body, content_type.encode(), modified, etag)
        if INDEX not in files:
            raise SiteError(f"{directory} has no {INDEX}")
        return cls(files)

    @classmethod
    def default(cls) -> "StaticSite":
        """The placeholder shipped with Construct: a page saying the site is being set up."""
        with resources.as_file(resources.files("construct.http") / "camouflage_site") as directory:
            return cls.load(str(directory))


class StaticPage(Resource):
    """Any path of the site: its file, a redirect, or one of nginx's error pages."""

    isLeaf = True

    def __init__(self, site: StaticSite) -> None:
        super().__init__()
        self._site = site

    def render(self, request: Request) -> bytes:
        raw = unquote_to_bytes(request.path)
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self.error(request, 400)
        normal = posixpath.normpath(path.lstrip("/"))
        if "\x00" in path or normal.startswith(".."):
            return self.error(request, 400)
        name = "" if normal == "." else normal
        if name in self._site.directories:
            if not path.endswith("/"):
                return self.redirect(request, "/" + name + "/")
            name = f"{name}/{INDEX}" if name else INDEX
            if name not in self._site.files:
                return self.error(request, 403)
        found = self._site.files.get(name)
        if found is None:
            return self.error(request, 404)
        if request.method not in (b"GET", b"HEAD"):
            return self.error(request, 405)
        request.setHeader(b"content-type", found.content_type)
        if request.setLastModified(found.modified) is http.CACHED or request.setETag(found.etag) is http.CACHED:
            return b""
        return self._body(request, found.body)

    def error(self, request: Request, code: int) -> bytes:
        request.setResponseCode(code, REASONS[code])
        page = self._site.files.get(NOT_FOUND_PAGE) if code == 404 else None
        request.setHeader(b"content-type", page.content_type if page else b"text/html")
        return self._body(request, page.body if page else error_page(code))

    def redirect(self, request: Request, location: str) -> bytes:
        request.setResponseCode(301, REASONS[301])
        request.setHeader(b"location", location.encode("utf-8"))
        request.setHeader(b"content-type", b"text/html")
        return self._body(request, error_page(301))

    @staticmethod
    def _body(request: Request, body: bytes) -> bytes:
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body


class ConstructEntrance(Resource):
    """The secret `--ws-path`: WebSocket upgrades, the API under `v1`, and with the web client its
    page under `/` (files under `web/`, its WebSocket at `ws`); the site for anything else."""

    def __init__(self, websocket: UpgradeResource, children: dict[bytes, Resource], page: StaticPage) -> None:
        super().__init__()
        self._websocket = websocket
        self._children = children
        self._page = page

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._children.get(path, self._page)

    def render(self, request: Request) -> Any:
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            return self._websocket.render(request)
        if b"" in self._children:
            # The web client's page, whose links are relative, is at the path with its slash.
            return self._page.redirect(request, request.path.decode("utf-8") + "/")
        return self._page.render(request)


class CamouflageRoot(Resource):
    """The site's page for every path, except the secret first segments in `entrances`."""

    def __init__(self, entrances: dict[bytes, Resource], page: StaticPage) -> None:
        super().__init__()
        self._entrances = entrances
        self._page = page

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._entrances.get(path, self._page)


class CamouflagedRequest(LimitedRequest):
    """A request whose headers and failures look like nginx's."""

    server_name = SERVER_NAME

    def process(self) -> None:
        if self._too_large:
            self._answer(413)
            return
        super().process()

    def processingFailed(self, reason: Any) -> Any:
        self._log.failure("", failure=reason)
        self._answer(500)
        return reason

    def _answer(self, code: int) -> None:
        body = error_page(code)
        self.setResponseCode(code, REASONS[code])
        self.setHeader(b"server", SERVER_NAME)
        self.setHeader(b"content-type", b"text/html")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()


class CamouflagedSite(ConstructSite):
    requestFactory = CamouflagedRequest

    def refusal(self) -> bytes:
        """What nginx's connection limit (limit_conn) answers."""
        body = error_page(503)
        return (
            b"HTTP/1.1 503 " + REASONS[503] + b"\r\nServer: " + SERVER_NAME + b"\r\nContent-Type: text/html\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        ) + body


def build_camouflaged_site(
    static: StaticSite, ws_factory: Any, api: HttpApi, max_body_bytes: int, ws_path: str, web_client: bool = False,
    proxied: bool = False,
) -> CamouflagedSite:
    """`web_client`: serve the web client under the secret path too (`<ws-path>/`); `proxied` as
    for construct.http.site.build_site."""
    # The WebSocket handshake's answer names the server too.
    ws_factory.server = SERVER_NAME.decode()
    page = StaticPage(static)
    websocket = UpgradeResource(ws_factory)
    children: dict[bytes, Resource] = {b"v1": Utf8Only(api.app.resource())}
    if web_client:
        web = load_assets()
        children.update({b"": PageOrWebSocket(websocket, web), b"web": WebFiles(web), b"ws": websocket})
    entrance = ConstructEntrance(websocket, children, page)
    return CamouflagedSite(
        CamouflageRoot({ws_path[1:].encode(): entrance}, page), max_body_bytes, ws_factory.addresses, ws_factory.limits,
        ws_factory.clock, proxied,
    )
