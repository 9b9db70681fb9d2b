"""How long a client connection may hold this instance without doing its part."""

from __future__ import annotations

from dataclasses import dataclass

from construct.errors import ConstructError

# Why the sweep closes a connection (`overdue`).
STOPPED_READING = "stopped reading"
AUTH_TIMEOUT = "did not authenticate in time"
IDLE = "sent nothing for too long"
MESSAGE_TIMEOUT = "did not finish a message in time"


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold of this instance; 0 turns a limit off."""

    per_address: int = 100
    per_user: int = 20
    # Seconds to authenticate after connecting.
    auth_timeout: float = 60
    # Seconds without a frame before a TCP connection is closed (WebSocket has pings instead).
    idle_timeout: float = 300
    # Seconds the client may leave the server's output unread.
    slow_client_timeout: float = 30
    # Seconds from accepting an HTTP connection (or from the first byte of a later request on it)
    # to that request's complete headers: the WebSocket handshake is such a request.
    header_timeout: float = 10
    # Seconds a WebSocket client has to finish a message once its first frame began.
    message_timeout: float = 10


def overdue(
    limits: ConnectionLimits, now: float, opened_at: float, last_heard: float, authenticated: bool,
    stalled_since: float | None, pings: bool,
) -> str | None:
    """Why a connection must go now, if it must. `pings`: the transport finds dead peers itself
    (WebSocket), so silence alone is no reason."""
    if stalled_since is not None and limits.slow_client_timeout and now - stalled_since > limits.slow_client_timeout:
        return STOPPED_READING
    if not authenticated and limits.auth_timeout and now - opened_at > limits.auth_timeout:
        return AUTH_TIMEOUT
    if not pings and limits.idle_timeout and now - last_heard > limits.idle_timeout:
        return IDLE
    return None


def closing_error(reason: str) -> ConstructError:
    """Sent just before the server closes a connection that outstayed a limit."""
    return ConstructError("CONNECTION_TIMEOUT", f"Closing the connection: {reason}", 408)
