"""The public site: WebSocket upgrade at / and /ws (--ws-path), the web client at / and /web/, the JSON API under /v1."""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from construct.errors import rate_limited
from construct.http.api import HttpApi
from construct.http.request import NamelessRequest
from construct.protocol import codec
from construct.protocol.connection import CONNECTION_RETRY_SECONDS, AddressCounts, client_address
from construct.protocol.timeouts import ConnectionLimits
from construct.web.resource import PageOrWebSocket, WebFiles, load_assets


# An HTTP connection that sends nothing for this long is closed (twisted.web's default is 12
# hours, long enough for a slow-loris client to hold sockets). Long-polls wait up to 60 s.
HTTP_IDLE_TIMEOUT_SECONDS = 75
# A connection refused for its address is closed once its request is read (closing with the
# request unread would reset the connection before the client reads why), or after this long.
REFUSAL_LINGER_SECONDS = 1


class CountedChannel(HTTPChannel):
    """One socket of the HTTP/WebSocket port: counted against its client address from the
    start, with the WebSocket and TCP connections (a WebSocket takes the count over with the
    socket), and closed when a request's headers are not in within the header timeout.

    twisted.web's own timeout starts again at every byte, so a client sending one byte every
    few seconds would hold the socket for ever; this deadline runs from the accept (or, on a
    kept-alive connection, from the first byte of the next request) whatever arrives meanwhile.
    """

    _address: str | None = None
    _refused = False
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._due(self.site.limits.header_timeout)
        if not self.site.proxied:
            # Counted at once, so silent sockets count against their address too.
            self._admit()

    def _admit(self) -> bool:
        """Behind a PROXY-protocol endpoint (haproxy:…) this waits for the first bytes: only
        then does getPeer() give the client's address, not the proxy's."""
        address = client_address(self.transport.getPeer())
        if self.site.addresses.admit(address):
            self._address = address
            return True
        self._refused = True
        self.transport.write(self.site.refusal())
        self._cancel_deadline()
        self._due(REFUSAL_LINGER_SECONDS)
        return False

    def dataReceived(self, data: bytes) -> None:
        if self._refused or (self._address is None and not self._admit()):
            self.transport.loseConnection()
            return
        if self._deadline is None and self.line_mode and not self._handlingRequest:
            # The first byte of another request on this connection.
            self._due(self.site.limits.header_timeout)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        super().allHeadersReceived()

    def hand_over(self) -> None:
        """The socket becomes a WebSocket connection's, which releases the count as it closes."""
        self._address = None

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
        if self._address is not None:
            self.site.addresses.release(self._address)
            self._address = None
        super().connectionLost(reason)

    def _due(self, seconds: float) -> None:
        if seconds:
            self._deadline = self.callLater(seconds, self._overdue)

    def _overdue(self) -> None:
        self._deadline = None
        self.transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None


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
    protocol = CountedChannel
    requestFactory = LimitedRequest

    def __init__(
        self, resource: Resource, max_body_bytes: int, addresses: AddressCounts, limits: ConnectionLimits, clock: Any,
        proxied: bool = False,
    ) -> None:
        """`addresses` is shared with the other listeners; `proxied`: the endpoint speaks the
        PROXY protocol (haproxy:…)."""
        super().__init__(resource, timeout=HTTP_IDLE_TIMEOUT_SECONDS, reactor=clock)
        self.max_body_bytes = max_body_bytes
        self.addresses = addresses
        self.limits = limits
        self.proxied = proxied
        self.displayTracebacks = False

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: the channel above is HTTP/1.1's."""
        return [b"http/1.1"]

    def refusal(self) -> bytes:
        """The whole answer to a connection over its address's limit."""
        error = rate_limited(CONNECTION_RETRY_SECONDS, f"At most {self.limits.per_address} connections per address")
        body = codec.json_bytes(error.payload())
        return (
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: %d\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (CONNECTION_RETRY_SECONDS, len(body))
        ) + body

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
            channel.hand_over()
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


def build_site(
    ws_factory: Any, api: HttpApi, max_body_bytes: int, ws_path: str = "/ws", proxied: bool = False
) -> ConstructSite:
    """The open site; construct.http.camouflage builds the one of --camouflage. Its connections
    are counted and timed with the WebSocket factory's limits."""
    root = Resource()
    websocket = UpgradeResource(ws_factory)
    web = load_assets()
    root.putChild(b"", PageOrWebSocket(websocket, web))
    root.putChild(b"web", WebFiles(web))
    root.putChild(ws_path[1:].encode(), websocket)
    root.putChild(b"v1", Utf8Only(api.app.resource()))
    return ConstructSite(root, max_body_bytes, ws_factory.addresses, ws_factory.limits, ws_factory.clock, proxied)
