"""Checks on client input shared by every operation; each failure is a clear ConstructError."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from typing import Any

from construct.errors import ConstructError, invalid_format

USERNAME_PATTERN = re.compile(r"[a-z0-9_.\-]{3,32}")
CANONICAL_UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def require(payload: dict, name: str, kind: type | tuple[type, ...] = str) -> Any:
    """The field `name` of `payload`, which must be present and of `kind`."""
    value = payload.get(name)
    # bool is an int subclass; a JSON true is never a valid number here.
    if value is None or not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise invalid_format(f"'{name}' is required and must be a {names}")
    return value


def canonical_uuid(value: Any, field: str, code: str = "INVALID_FORMAT") -> str:
    """Lower-case hyphenated form; the server keys everything by this form."""
    if isinstance(value, str) and CANONICAL_UUID_PATTERN.fullmatch(value):
        return value
    if not isinstance(value, str) or len(value) > 64:
        raise ConstructError(code, f"'{field}' must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ConstructError(code, f"'{field}' must be a UUID string") from None


def normalize_username(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid_format("'username' is required and must be a str")
    username = value.lower()
    if not USERNAME_PATTERN.fullmatch(username):
        raise ConstructError(
            "INVALID_USERNAME", "Usernames are 3 to 32 characters of a-z, 0-9, '_', '.' and '-'"
        )
    return username


def check_password_strength(password: str) -> None:
    """The seed's rules, with bcrypt's 72-byte limit made explicit."""
    size = len(password.encode("utf-8"))
    problem = None
    if size < 10:
        problem = "Password must be at least 10 bytes long"
    elif size > 72:
        problem = "Password must be at most 72 bytes long"
    elif not any(c.isupper() for c in password):
        problem = "Password must contain an upper case letter"
    elif not any(c.islower() for c in password):
        problem = "Password must contain a lower case letter"
    elif not any(c.isdigit() and c.isascii() for c in password):
        problem = "Password must contain a digit"
    if problem:
        raise ConstructError("WEAK_PASSWORD", problem)


def decode_base64(value: Any, field: str, code: str, size: int | None = None) -> bytes:
    """Standard base64 (with padding) of exactly `size` bytes when given."""
    if not isinstance(value, str):
        raise ConstructError(code, f"'{field}' must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConstructError(code, f"'{field}' is not valid base64") from None
    if size is not None and len(raw) != size:
        raise ConstructError(code, f"'{field}' must decode to {size} bytes, not {len(raw)}")
    return raw
