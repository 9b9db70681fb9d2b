"""Log output and the privacy of what goes into it.

User ids are logged only as salted hashes (CONSTRUCT_LOG_SALT), so a log can correlate one
user's events without naming them. Keys, tokens, passwords, ciphertext and usernames are never
logged. Client addresses are logged only with --log-client-addresses.

What other code logs passes through `LogPrivacyFilter` first (docs/security.md):
- exception messages, which may quote data (a database error quoting a row, a KeyError naming
  a user id), are withheld unless the exception type only ever describes the program;
- tracebacks keep their frames (file, line, function) and never carry local variables;
- client addresses that Twisted and Autobahn log by themselves are withheld unless asked for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
import sys
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.logger import FileLogObserver, ILogObserver, LogPublisher, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from construct.errors import ConstructError
from construct.redis.client import ResponseError

LOG_FORMATS = ("text", "json")


def log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}, not {text!r}")
    return text


def _json_line(event: dict) -> str:
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": event["log_level"].name if event.get("log_level") else None,
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str) + "\n"


def json_observer() -> ILogObserver:
    """One JSON object per line on stdout: time, level, namespace, message (and traceback)."""
    return FileLogObserver(sys.stdout, _json_line)


def use_log_format(options: Any, log_format_value: str) -> None:
    """Make twistd log as asked: its --logger option, set from our --log-format, and the
    privacy filter (with --log-client-addresses, where the program has it) ahead of its observer."""
    parent = getattr(options, "parent", None)
    if parent is None:
        # Not run by twistd (tests, construct.tac): the caller sets up logging.
        return
    if log_format_value == "json":
        # twistd imports the factory by its dotted name after parsing the subcommand.
        parent["logger"] = f"{__name__}.json_observer"
    # Options are parsed before twistd starts its log observer, which is thus added after this.
    install_privacy_filter(bool(options.get("log-client-addresses", False)))


def user_id_hasher(salt: str | None) -> Callable[[str], str]:
    """HMAC-SHA256 of a user id under the salt, shortened to 16 hex digits (64 bits).

    Without a salt, a random one per process: nothing leaks, but hashes do not match
    across restarts or processes.
    """
    key = (salt or os.urandom(32).hex()).encode("utf-8")

    def hashed(user_id: str) -> str:
        return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    return hashed


# Event fields holding a client's network address: Twisted's and Autobahn's own ("peer", e.g.
# "Timing out client: {peer}", "dropping connection to peer {peer}") and ours ("client").
ADDRESS_FIELDS = ("peer", "client")
ADDRESS_WITHHELD = "(address not logged)"
# Legacy log events carry the connection's "system": "<protocol>,<session number>,<client IP>".
_SYSTEM_ADDRESS = re.compile(r"(?<=,)[0-9A-Fa-f.:]*[.:][0-9A-Fa-f.:]*$")

# Exception types whose messages describe the program (a missing attribute, a refused
# connection, a client-facing error text), never the data it was handling.
_SAFE_MESSAGES: tuple[type, ...] = (
    ConstructError, OSError, AttributeError, TypeError, NameError, ImportError, NotImplementedError,
    RecursionError, MemoryError, defer.CancelledError, defer.TimeoutError,
)

# PostgreSQL error classes about the connection or the server, never about a row: 08 connection
# exception, 53 insufficient resources, 57 operator intervention, 58 system error.
_OPERATIONAL_SQLSTATE_CLASSES = ("08", "53", "57", "58")


class WithheldMessage(Exception):
    """Stands in, in a logged failure, for an exception whose message may hold data."""


def safe_exception_text(value: BaseException) -> str:
    """What of an exception's message may be logged: all of it for the program's own kinds of
    errors; otherwise only a code (SQLSTATE, SQLite's or Redis' error name), never the text,
    which may quote a row, a key or a user id."""
    if isinstance(value, WithheldMessage) or isinstance(value, _SAFE_MESSAGES):
        return str(value)
    if type(value).__module__ == internet_error.__name__:
        return str(value)
    if hasattr(value, "pgcode") and hasattr(value, "diag"):
        # psycopg2: an error without a SQLSTATE is libpq's own (cannot connect, connection
        # closed); one of the connection, resource, shutdown or system classes names no data.
        if value.pgcode is None:
            return str(value)
        if value.pgcode[:2] in _OPERATIONAL_SQLSTATE_CLASSES:
            return f"SQLSTATE {value.pgcode}: {value.diag.message_primary}"
    if isinstance(value, sqlite3.OperationalError):
        # Locked, read-only, disk I/O, cannot open: about the database file, not the data.
        return str(value)
    code = getattr(value, "pgcode", None) and f"SQLSTATE {value.pgcode}"
    if isinstance(value, sqlite3.Error):
        code = getattr(value, "sqlite_errorname", None)
    if isinstance(value, ResponseError):
        # A Redis error reply starts with its code (ERR, WRONGTYPE, NOSCRIPT, ...).
        code = str(value).split(" ", 1)[0][:32]
    return f"(message withheld from the log{'; ' + code if code else ''})"


def redact_failure(failure: Failure) -> Failure:
    """A copy of the failure that prints the same frames, no local variables, and only the
    safe part of the exception's message; the exception's type is kept for `check`/`trap`."""
    if getattr(failure, "_construct_redacted", False):
        return failure
    safe = Failure.__new__(Failure)
    safe.__dict__.update(failure.__dict__)
    safe.frames = [(name, filename, line, (), ()) for name, filename, line, *_ in failure.frames]
    safe.tb = None
    safe.captureVars = False
    value = failure.value
    if isinstance(value, Failure):
        safe.value = redact_failure(value)
    elif isinstance(value, BaseException):
        safe.value = WithheldMessage(safe_exception_text(value))
    safe._construct_redacted = True
    return safe


def _redact_value(value: Any) -> Any:
    if isinstance(value, Failure):
        return redact_failure(value)
    if isinstance(value, BaseException) and not isinstance(value, WithheldMessage):
        return WithheldMessage(f"{type(value).__name__}: {safe_exception_text(value)}")
    return value


def redact_event(event: dict, log_client_addresses: bool) -> None:
    """Make a log event fit for the log, in place (see the module docstring)."""
    for key, value in list(event.items()):
        if key.startswith("log_") and key != "log_failure":
            continue
        if key in ADDRESS_FIELDS and not log_client_addresses and value is not None:
            event[key] = ADDRESS_WITHHELD
        else:
            redacted = _redact_value(value)
            if redacted is not value:
                event[key] = redacted
    if not log_client_addresses:
        for key in ("log_system", "system"):
            system = event.get(key)
            if isinstance(system, str) and "," in system:
                event[key] = _SYSTEM_ADDRESS.sub("-", system)


@implementer(ILogObserver)
class LogPrivacyFilter:
    """An observer that redacts each event in place; it must come before every observer that
    writes, so it is added to the publisher before logging begins."""

    def __init__(self, log_client_addresses: bool) -> None:
        self.log_client_addresses = log_client_addresses

    def __call__(self, event: dict) -> None:
        redact_event(event, self.log_client_addresses)


_installed: dict[int, LogPrivacyFilter] = {}


def install_privacy_filter(log_client_addresses: bool, publisher: LogPublisher = globalLogPublisher) -> LogPrivacyFilter:
    """Put the privacy filter on the publisher (once; a second call updates its setting)."""
    installed = _installed.get(id(publisher))
    if installed is None:
        installed = _installed[id(publisher)] = LogPrivacyFilter(log_client_addresses)
        publisher.addObserver(installed)
    installed.log_client_addresses = log_client_addresses
    return installed
