"""The HTTP API under /v1: the protocol's operations as JSON requests, same core, same errors.

Request and response bodies are the payloads of the matching protocol messages without the
{type, payload} wrapper; errors are an HTTP status with {"code", "message"}.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Sequence
from urllib.parse import urlsplit

import orjson
from autobahn.util import wildcards2patterns
from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound

from construct.core.accounts import Identity, session_expired
from construct.core.app import Core
from construct.core.messaging import decode_envelope
from construct.errors import ConstructError, invalid_format
from construct.protocol import codec, operations
from construct.protocol.connection import client_address

MAX_WAIT_SECONDS = 60
MAX_PENDING_BATCH = 100
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_allowed(origin: str, patterns: Sequence[Any]) -> bool:
    """As the WebSocket handshake decides (Autobahn with allowNullOrigin): `null` passes, as do
    origins whose scheme://host:port matches one of the patterns (construct.tap.origins)."""
    origin = origin.strip()
    if origin.lower() == "null":
        # Sandboxed frames and local files. No risk here: a browser sends nothing but a simple
        # GET without a CORS preflight, and every route needs a JSON body or a bearer token.
        return True
    try:
        parts = urlsplit(origin)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return False
    if not host:
        return False
    port = port or DEFAULT_PORTS.get(scheme)
    normalized = f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"
    return any(pattern.match(normalized) for pattern in patterns)


def origin_not_allowed() -> ConstructError:
    return ConstructError("ORIGIN_NOT_ALLOWED", "Requests from this Origin are not allowed (--allowed-origins)", 403)


def unsupported_media_type() -> ConstructError:
    return ConstructError("UNSUPPORTED_MEDIA_TYPE", "Send the request body with 'Content-Type: application/json'", 415)


class HttpClient:
    """An HTTP request as an operation's client: authenticated by its bearer token, never live."""

    # Sealed sends over HTTP are counted per address only: a request is no connection.
    sealed_allowance = None

    def __init__(self, identity: Identity | None, address: str) -> None:
        self.identity = identity
        self.address = address

    def bind(self, identity: Identity) -> None:
        self.identity = identity

    def unbind(self) -> None:
        self.identity = None


def _shielded(coroutine: Any) -> Deferred:
    """Run to completion even if the client disconnects (Klein cancels the route's Deferred),
    so a committed send still wakes its recipient."""
    inner = ensureDeferred(coroutine)
    outer: Deferred = Deferred(lambda _: None)

    def forward(result: Any) -> None:
        if not outer.called:
            outer.callback(result)

    inner.addBoth(forward)
    return outer


class HttpApi:
    app = Klein()
    log = Logger()

    def __init__(self, core: Core, allowed_origins: Sequence[str] = ("*",)) -> None:
        """`allowed_origins`: the patterns of --allowed-origins, which browsers' requests must match."""
        self._core = core
        self._origins = wildcards2patterns(allowed_origins)
        self._openapi = (resources.files("construct.http") / "openapi.json").read_bytes()

    # Plumbing

    def _check_origin(self, request: Any) -> None:
        """Browsers say which page makes the request; others send no Origin and pass."""
        origins = request.requestHeaders.getRawHeaders(b"origin")
        if origins is None:
            return
        if len(origins) != 1 or not origin_allowed(origins[0].decode("latin-1"), self._origins):
            raise origin_not_allowed()

    async def _identity(self, request: Any) -> Identity:
        header = (request.getHeader("authorization") or "").strip()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ConstructError("AUTH_REQUIRED", "Send 'Authorization: Bearer <sessionToken>'", 401)
        return await self._core.accounts.authenticate(token.strip())

    @staticmethod
    def _body(request: Any) -> dict:
        # A page of another site can make a browser send text/plain (or a form) with no CORS
        # preflight; application/json needs one, which this server never grants.
        media_type = (request.getHeader("content-type") or "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise unsupported_media_type()
        try:
            body = orjson.loads(request.content.read())
        except Exception:
            raise invalid_format("The request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise invalid_format("The request body must be a JSON object")
        return body

    @staticmethod
    def _json(request: Any, status: int, payload: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        return codec.json_bytes(payload)

    async def _run(self, request: Any, message_type: str, payload_of: Any, authenticated: bool, status: int) -> bytes:
        self._check_origin(request)
        identity = await self._identity(request) if authenticated else None
        # The transport's peer: behind a PROXY-protocol endpoint (haproxy:…), the client's own.
        client = HttpClient(identity, client_address(request.getClientAddress()))
        reply = await operations.run(self._core, client, message_type, payload_of())
        if reply is None or reply.payload is None:
            request.setResponseCode(204)
            return b""
        return self._json(request, status, reply.payload)

    def _call(self, request: Any, message_type: str, payload_of: Any, authenticated: bool, status: int = 200) -> Deferred:
        return _shielded(self._run(request, message_type, payload_of, authenticated, status))

    # Routes

    @app.route("/accounts", methods=["POST"])
    def register(self, request: Any) -> Deferred:
        return self._call(request, "register", lambda: self._body(request), False, 201)

    @app.route("/sessions", methods=["POST"])
    def login(self, request: Any) -> Deferred:
        return self._call(request, "login", lambda: self._body(request), False)

    @app.route("/sessions/current", methods=["DELETE"])
    def logout(self, request: Any) -> Deferred:
        return self._call(request, "logout", dict, True)

    @app.route("/accounts/current", methods=["DELETE"])
    def delete_account(self, request: Any) -> Deferred:
        return self._call(request, "deleteAccount", lambda: self._body(request), True)

    @app.route("/accounts/current/password", methods=["PUT"])
    def change_password(self, request: Any) -> Deferred:
        return self._call(request, "changePassword", lambda: self._body(request), True)

    @app.route("/keys", methods=["PUT"])
    def rotate_keys(self, request: Any) -> Deferred:
        return self._call(request, "rotatePrekey", lambda: self._body(request), True)

    @app.route("/keys/<string:user_id>", methods=["GET"])
    def get_keys(self, request: Any, user_id: str) -> Deferred:
        def payload() -> dict:
            flag = request.args.get(b"oneTimePrekey", [b"true"])[0]
            if flag not in (b"true", b"false"):
                raise invalid_format("'oneTimePrekey' must be true or false")
            return {"userId": user_id, "oneTimePrekey": flag == b"true"}

        return self._call(request, "getPublicKey", payload, True)

    @app.route("/keys/prekeys", methods=["POST"])
    def upload_prekeys(self, request: Any) -> Deferred:
        return self._call(request, "uploadPrekeys", lambda: self._body(request), True)

    @app.route("/keys/prekeys/count", methods=["GET"])
    def prekey_count(self, request: Any) -> Deferred:
        return self._call(request, "getPrekeyCount", dict, True)

    @app.route("/users/<string:username>", methods=["GET"])
    def lookup_user(self, request: Any, username: str) -> Deferred:
        return self._call(request, "lookupUser", lambda: {"username": username}, True)

    @app.route("/messages", methods=["POST"])
    def send_message(self, request: Any) -> Deferred:
        return self._call(request, "sendMessage", lambda: self._body(request), True)

    @app.route("/messages/sealed", methods=["POST"])
    def send_sealed(self, request: Any) -> Deferred:
        # No bearer token is read: a sealed send is allowed by the recipient's access key alone.
        return self._call(request, "sendSealed", lambda: self._body(request), False)

    @app.route("/certificate", methods=["GET"])
    def sender_certificate(self, request: Any) -> Deferred:
        return self._call(request, "getSenderCertificate", dict, True)

    @app.route("/server-keys", methods=["GET"])
    def server_keys(self, request: Any) -> Deferred:
        return self._call(request, "getServerKeys", dict, False)

    @app.route("/messages/ack", methods=["POST"])
    def ack_messages(self, request: Any) -> Deferred:
        return self._call(request, "ackMessage", lambda: self._body(request), True)

    @app.route("/messages", methods=["GET"])
    def pending_messages(self, request: Any) -> Deferred:
        return _shielded(self._pending(request))

    async def _pending(self, request: Any) -> bytes:
        self._check_origin(request)
        identity = await self._identity(request)
        wait = self._wait_seconds(request)
        messaging = self._core.messaging
        if wait == 0:
            return self._messages(request, await messaging.pending(identity.user_id, MAX_PENDING_BATCH))
        if request.channel is None:
            return b""  # the client left while its token was checked: there is no one to wait for
        hub = self._core.hub
        # Waiting from before the first read, so a message stored in between still wakes us.
        poll = hub.long_poll(identity.user_id, identity.token_hash, wait)
        # A client that left is not waited for: its long-poll lets go of the user at once.
        request.notifyFinish().addErrback(self._client_left, hub, poll)
        try:
            entries = await messaging.pending(identity.user_id, MAX_PENDING_BATCH)
            if not entries and not poll.gone and not poll.revoked:
                await poll.woken
                if not poll.gone and not poll.revoked:
                    entries = await messaging.pending(identity.user_id, MAX_PENDING_BATCH)
                    if entries:
                        # Checked again before messages go out: the session may have been revoked
                        # on another instance, not heard of here yet, or just before this began.
                        await self._identity(request)
        finally:
            hub.end_long_poll(poll)
        if poll.revoked:
            # Revoked while it waited or read: nothing read for it goes out.
            raise session_expired()
        return self._messages(request, entries)

    @staticmethod
    def _client_left(_: Failure, hub: Any, poll: Any) -> None:
        poll.gone = True
        hub.end_long_poll(poll)

    def _messages(self, request: Any, entries: list) -> bytes:
        return self._json(request, 200, {"messages": [decode_envelope(entry.envelope) for entry in entries]})

    @staticmethod
    def _wait_seconds(request: Any) -> float:
        raw = request.args.get(b"wait", [b"0"])[0]
        try:
            wait = float(raw)
        except ValueError:
            raise invalid_format("'wait' must be a number of seconds") from None
        if not 0 <= wait <= MAX_WAIT_SECONDS:
            raise invalid_format(f"'wait' must be between 0 and {MAX_WAIT_SECONDS} seconds")
        return wait

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Any) -> bytes:
        request.setHeader("content-type", "application/json")
        return self._openapi

    # Errors

    @app.handle_errors(ConstructError)
    def construct_error(self, request: Any, failure: Failure) -> bytes:
        error = failure.value
        self._core.metrics.error(error.code)
        if "retryAfter" in error.details:
            request.setHeader("retry-after", str(error.details["retryAfter"]))
        return self._json(request, error.http_status, error.payload())

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        return self._json(request, 404, {"code": "NOT_FOUND", "message": "No such endpoint"})

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: Any, failure: Failure) -> bytes:
        return self._json(request, 405, {"code": "METHOD_NOT_ALLOWED", "message": "Method not allowed here"})

    @app.handle_errors(Exception)
    def unexpected_error(self, request: Any, failure: Failure) -> bytes:
        self.log.failure("HTTP request failed", failure=failure)
        self._core.metrics.error("SERVER_ERROR")
        return self._json(request, 500, {"code": "SERVER_ERROR", "message": "Internal server error"})
