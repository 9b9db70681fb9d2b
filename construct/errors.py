"""The one error type the core raises; every transport maps it to its own framing."""

import math


class ConstructError(Exception):
    """A failure a client may see: a stable `code`, a human `message` and an HTTP status."""

    http_status = 400

    def __init__(self, code: str, message: str, http_status: int | None = None, **details: object) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        # Extra fields of the error payload, e.g. retryAfter.
        self.details = details
        if http_status is not None:
            self.http_status = http_status

    def payload(self) -> dict:
        return {"code": self.code, "message": self.message, **self.details}


def invalid_format(message: str) -> ConstructError:
    return ConstructError("INVALID_FORMAT", message, 400)


def auth_required() -> ConstructError:
    return ConstructError("AUTH_REQUIRED", "Authentication is required", 401)


def service_unavailable(what: str) -> ConstructError:
    return ConstructError("SERVICE_UNAVAILABLE", f"{what} is unavailable, try again later", 503)


def duplicate_id_error() -> ConstructError:
    return ConstructError("DUPLICATE_MESSAGE", "Another sender already used that message id for this recipient", 409)


def inbox_full_error(quota: int) -> ConstructError:
    return ConstructError("INBOX_FULL", f"The recipient's inbox is full ({quota} messages pending)", 507)


def user_not_found_error() -> ConstructError:
    return ConstructError("USER_NOT_FOUND", "User not found", 404)


def rate_limited(retry_after: float, what: str = "Too many requests") -> ConstructError:
    """`retryAfter` is whole seconds, at least 1, as in HTTP's Retry-After."""
    seconds = max(1, math.ceil(retry_after))
    return ConstructError("RATE_LIMITED", f"{what}; retry after {seconds} s", 429, retryAfter=seconds)


def server_busy() -> ConstructError:
    """This process is behind (construct.core.admission): nothing was done; send again after `retryAfter`."""
    return ConstructError("SERVER_BUSY", "The server is busy; retry after 1 s", 503, retryAfter=1)
