"""The public site: WebSocket upgrade at / and /ws (--ws-path), the web client at / and /web/, the JSON API under /v1."""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from construct.http.api import HttpApi
from construct.http.request import NamelessRequest
from construct.web.resource import PageOrWebSocket, WebFiles, load_assets


# An HTTP connection that sends nothing for this long is closed (twisted.web's default is 12
# hours, long enough for a slow-loris client to hold sockets). Long-polls wait up to 60 s.
HTTP_IDLE_TIMEOUT_SECONDS = 75


class LimitedRequest(NamelessRequest):
    """Refuses bodies over the site's limit (twisted.web has none) with 413."""

    _received = 0
    _too_large = False

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.channel.site.max_body_bytes:
            self._too_large = True
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if self._too_large:
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"application/json")
            limit = self.channel.site.max_body_bytes
            self.write(
                json.dumps({"code": "MESSAGE_TOO_LARGE", "message": f"Bodies are limited to {limit} bytes"}).encode()
            )
            self.finish()
            return
        super().process()


class ConstructSite(Site):
    noisy = False
    requestFactory = LimitedRequest

    def __init__(self, resource: Resource, max_body_bytes: int) -> None:
        super().__init__(resource, timeout=HTTP_IDLE_TIMEOUT_SECONDS)
        self.max_body_bytes = max_body_bytes
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        """No access log: it would record client addresses and who talks when."""


class UpgradeResource(WebSocketResource):
    """Autobahn's WebSocket upgrade, letting go of the HTTP side once the socket is handed over.

    The request is never finished, and the HTTP channel stays the socket's registered producer,
    keeps its idle timer and forms a cycle with the request: kilobytes per connection, held for
    the connection's life. Releasing all three frees both at once.
    """

    def render(self, request: Request) -> Any:
        channel = request.channel
        if channel.transport is not None:  # the socket is about to be handed over
            # First: the handshake runs within super().render, and the WebSocket connection
            # registers its own producer with the transport as it opens.
            channel.setTimeout(None)
            channel.requests = []
            # The channel is the only producer registered yet (TCP, TLS or PROXY transport alike).
            channel.transport.unregisterProducer()
        return super().render(request)


class Utf8Only(Resource):
    """Answers 400 for a path or Host that is not UTF-8 before Klein sees it (Klein would log a
    traceback for each such request: a way for any client to flood the log)."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: Request) -> Any:
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return b'{"code":"INVALID_FORMAT","message":"The URL and Host must be UTF-8"}'
        return self._inner.render(request)


def build_site(ws_factory: Any, api: HttpApi, max_body_bytes: int, ws_path: str = "/ws") -> ConstructSite:
    """The open site; construct.http.camouflage builds the one of --camouflage."""
    root = Resource()
    websocket = UpgradeResource(ws_factory)
    web = load_assets()
    root.putChild(b"", PageOrWebSocket(websocket, web))
    root.putChild(b"web", WebFiles(web))
    root.putChild(ws_path[1:].encode(), websocket)
    root.putChild(b"v1", Utf8Only(api.app.resource()))
    return ConstructSite(root, max_body_bytes)
