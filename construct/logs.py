"""Log output and the privacy of what goes into it.

User ids are logged only as salted hashes (CONSTRUCT_LOG_SALT), so a log can correlate one
user's events without naming them. Keys, tokens, passwords and ciphertext are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from typing import Any, Callable

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

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
    """Make twistd log as asked: its --logger option, set from our --log-format."""
    parent = getattr(options, "parent", None)
    if log_format_value == "json" and parent is not None:
        # twistd imports the factory by its dotted name after parsing the subcommand.
        parent["logger"] = f"{__name__}.json_observer"


def user_id_hasher(salt: str | None) -> Callable[[str], str]:
    """HMAC-SHA256 of a user id under the salt, shortened to 16 hex digits (64 bits).

    Without a salt, a random one per process: nothing leaks, but hashes do not match
    across restarts or processes.
    """
    key = (salt or os.urandom(32).hex()).encode("utf-8")

    def hashed(user_id: str) -> str:
        return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    return hashed
