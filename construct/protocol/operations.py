"""The one table from message type to core call, shared by WebSocket, TCP and HTTP.

Each operation takes the core, the client it runs for (a live connection or an HTTP request)
and the payload, and returns the reply (type and payload) or None when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from twisted.internet.defer import Deferred, ensureDeferred, fail

from construct.core.accounts import Identity, IssuedSession
from construct.core.admission import Admission
from construct.core.app import Core
from construct.core.keys import first_suite_keys
from construct.core.limits import Allowance
from construct.core.messaging import SendResult
from construct.core.validation import canonical_uuid, require
from construct.errors import ConstructError, auth_required, server_busy


class Client(Protocol):
    """Who an operation runs for; `bind` makes a live connection receive the user's messages."""

    identity: Identity | None
    # The client's network address, for limits per address.
    address: str
    # The count of sealed sends on this connection (None: not a connection, an HTTP request).
    sealed_allowance: Allowance | None

    def bind(self, identity: Identity) -> None: ...

    def unbind(self) -> None: ...


# Not frozen: one per message, and a frozen dataclass is several times slower to build.
@dataclass(slots=True)
class Reply:
    type: str
    payload: dict | None = None


Operation = Callable[[Core, Client, dict], Awaitable[Reply | None]]


def _authenticated(client: Client) -> Identity:
    if client.identity is None:
        raise auth_required()
    return client.identity


def _session_payload(session: IssuedSession) -> dict:
    return {
        "userId": session.identity.user_id,
        "username": session.identity.username,
        "sessionToken": session.token,
        "expires": session.expires,
    }


async def register(core: Core, client: Client, payload: dict) -> Reply:
    session = await core.accounts.register(
        payload.get("username"), payload.get("password"), payload.get("publicKey"), client.address, payload
    )
    client.bind(session.identity)
    return Reply("registerSuccess", _session_payload(session))


async def login(core: Core, client: Client, payload: dict) -> Reply:
    session = await core.accounts.login(payload.get("username"), payload.get("password"), client.address)
    try:
        client.bind(session.identity)
    except ConstructError:
        # Refused a connection slot: end the session, whose token the client never gets.
        await core.accounts.logout(session.identity)
        raise
    return Reply("loginSuccess", _session_payload(session))


async def connect(core: Core, client: Client, payload: dict) -> Reply:
    try:
        identity = await core.accounts.authenticate(require(payload, "sessionToken"))
    except ConstructError as e:
        if e.code != "SESSION_EXPIRED":
            raise
        client.unbind()
        return Reply("sessionExpired")
    client.bind(identity)
    return Reply("connectSuccess", {"userId": identity.user_id, "username": identity.username})


async def get_public_key(core: Core, client: Client, payload: dict) -> Reply:
    identity = _authenticated(client)
    user_id = canonical_uuid(payload.get("userId"), "userId", "INVALID_USER_ID")
    # "oneTimePrekey": false asks for the bundle only, e.g. to verify a sender, sparing their pool.
    wants_prekey = payload.get("oneTimePrekey", True)
    if not isinstance(wants_prekey, bool):
        raise ConstructError("INVALID_FORMAT", "'oneTimePrekey' must be true or false")
    published = await core.keys.get(user_id, identity.user_id, wants_prekey)
    bundle = published.bundle
    identity_key, signed_prekey = first_suite_keys(bundle)
    reply = {
        "userId": published.user_id,
        "username": published.username,
        "identityPublic": identity_key,
        "signedPrekeyPublic": signed_prekey,
        "signature": bundle.signature,
        "verifyingKey": bundle.master_identity_key,
        "masterIdentityKey": bundle.master_identity_key,
        "bundleData": bundle.bundle_data,
    }
    # Whoever reads the bundle may send its owner sealed messages (docs/security.md).
    if published.access.access_key is not None:
        reply["unidentifiedAccessKey"] = published.access.access_key
    if published.access.unrestricted:
        reply["unrestrictedUnidentifiedAccess"] = True
    if published.one_time_prekey is not None:
        prekey = published.one_time_prekey
        reply["oneTimePrekey"] = {"keyId": prekey.key_id, "publicKey": prekey.public_key}
    return Reply("publicKeyBundle", reply)


async def upload_prekeys(core: Core, client: Client, payload: dict) -> Reply:
    identity = _authenticated(client)
    count = await core.keys.upload_one_time_prekeys(identity.user_id, payload.get("prekeys"))
    return Reply("prekeysUploaded", {"count": count})


async def get_prekey_count(core: Core, client: Client, payload: dict) -> Reply:
    identity = _authenticated(client)
    return Reply("prekeyCount", {"count": await core.keys.count_one_time_prekeys(identity.user_id)})


async def lookup_user(core: Core, client: Client, payload: dict) -> Reply:
    identity = _authenticated(client)
    user = await core.accounts.lookup(payload.get("username"), identity, client.address)
    return Reply("userFound", {"userId": user.id, "username": user.username})


def send_message(core: Core, client: Client, payload: dict) -> Deferred:
    # No coroutine: the busiest operation by far, and the core's send is a Deferred already.
    identity = _authenticated(client)
    admission = core.admission
    if admission.busy:
        raise server_busy()
    admission.started()
    return core.messaging.send(identity.user_id, payload).addBoth(_sent, admission).addCallback(_ack, core)


def send_sealed(core: Core, client: Client, payload: dict) -> Deferred:
    # No session: the recipient's access key allows it, and nothing here names the sender.
    admission = core.admission
    if admission.busy:
        raise server_busy()
    admission.started()
    return core.messaging.send_sealed(payload, client.address, client.sealed_allowance).addBoth(
        _sent, admission
    ).addCallback(_sealed_ack, core)


def _sealed_ack(result: SendResult, core: Core) -> Reply:
    if not result.duplicate:
        core.metrics.accepted()
    # No status: whether the recipient is connected is none of an anonymous sender's business.
    return Reply("ack", {"messageId": result.message_id, "expiresAt": result.expires_at_ms // 1000})


async def get_sender_certificate(core: Core, client: Client, payload: dict) -> Reply:
    identity = _authenticated(client)
    return Reply("senderCertificate", await core.certificates.issue(identity.user_id))


async def get_server_keys(core: Core, client: Client, payload: dict) -> Reply:
    return Reply("serverKeys", {"keys": core.certificates.public_keys()})


def _sent(result: Any, admission: Admission) -> Any:
    admission.finished()
    return result


def _ack(result: SendResult, core: Core) -> Reply:
    if not result.duplicate:
        core.metrics.accepted()
    return Reply(
        "ack", {"messageId": result.message_id, "status": result.status, "expiresAt": result.expires_at_ms // 1000}
    )


def ack_message(core: Core, client: Client, payload: dict) -> Deferred:
    # No coroutine: one per message delivered.
    identity = _authenticated(client)
    return core.messaging.ack(identity.user_id, payload.get("messageIds")).addCallback(_acknowledged, core)


def _acknowledged(latencies: list[float], core: Core) -> None:
    core.metrics.acknowledged(latencies)


async def rotate_prekey(core: Core, client: Client, payload: dict) -> Reply:
    identity = _authenticated(client)
    target = payload.get("userId", identity.user_id)
    if canonical_uuid(target, "userId", "INVALID_USER_ID") != identity.user_id:
        raise ConstructError("FORBIDDEN", "Only your own key bundle can be rotated", 403)
    await core.keys.rotate(identity.user_id, payload.get("update"), payload)
    return Reply("keyRotationSuccess")


async def change_password(core: Core, client: Client, payload: dict) -> Reply:
    identity = await _session_identity(core, client, payload)
    await core.accounts.change_password(
        identity, payload.get("oldPassword"), payload.get("newPassword"), payload.get("newPasswordConfirm"),
        client.address,
    )
    return Reply("changePasswordSuccess")


async def logout(core: Core, client: Client, payload: dict) -> Reply:
    identity = await _session_identity(core, client, payload)
    # Unbind first, so only the session's other connections are told sessionExpired.
    if client.identity is not None and client.identity.token_hash == identity.token_hash:
        client.unbind()
    await core.accounts.logout(identity)
    return Reply("logoutSuccess")


async def delete_account(core: Core, client: Client, payload: dict) -> Reply:
    """Delete the account, with its current password: everything the server holds about it goes
    (construct.core.deletion); its other connections are told sessionExpired."""
    identity = await _session_identity(core, client, payload)
    await core.accounts.confirm_password(identity, payload.get("password"), client.address)
    # Unbind first: this connection gets the reply, the user's others get sessionExpired.
    if client.identity is not None and client.identity.user_id == identity.user_id:
        client.unbind()
    await core.deletion.delete(identity.user_id)
    return Reply("accountDeleted")


async def ping(core: Core, client: Client, payload: dict) -> Reply:
    return Reply("pong")


async def _session_identity(core: Core, client: Client, payload: dict) -> Identity:
    """The seed names the session by its token in the payload; without one, the client's own session."""
    if "sessionToken" in payload:
        return await core.accounts.authenticate(payload["sessionToken"])
    return _authenticated(client)


OPERATIONS: dict[str, Operation] = {
    "register": register,
    "login": login,
    "connect": connect,
    "getPublicKey": get_public_key,
    "sendMessage": send_message,
    "sendSealed": send_sealed,
    "getSenderCertificate": get_sender_certificate,
    "getServerKeys": get_server_keys,
    "ackMessage": ack_message,
    "rotatePrekey": rotate_prekey,
    "uploadPrekeys": upload_prekeys,
    "getPrekeyCount": get_prekey_count,
    "lookupUser": lookup_user,
    "changePassword": change_password,
    "logout": logout,
    "deleteAccount": delete_account,
    "ping": ping,
}


def _operation(message_type: str) -> Operation:
    operation = OPERATIONS.get(message_type)
    if operation is None:
        raise ConstructError("UNKNOWN_TYPE", f"Unknown message type {message_type[:64]!r}")
    return operation


async def run(core: Core, client: Client, message_type: str, payload: dict) -> Reply | None:
    return await _operation(message_type)(core, client, payload)


def start(core: Core, client: Client, message_type: str, payload: dict) -> Deferred:
    """`run` as a Deferred, without a coroutine around an operation that returns a Deferred."""
    try:
        return ensureDeferred(_operation(message_type)(core, client, payload))
    except Exception:
        return fail()
