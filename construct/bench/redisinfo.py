"""The benchmark's own few words with Redis, over a short blocking connection: deleting a run's
keys, and reading Redis's CPU counters around a measured window. Blocking is fine here: it
happens only before and after the measurements and at the window's two ends, in milliseconds."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from construct.bench.clients import BenchError


class RedisInfo:
    def __init__(self, url: str) -> None:
        self._url = urlsplit(url)

    def _session(self) -> tuple[socket.socket, Any]:
        sock = socket.create_connection((self._url.hostname or "127.0.0.1", self._url.port or 6379), 10)
        replies = sock.makefile("rb")
        if self._url.password:
            _command(sock, replies, "AUTH", *filter(None, [self._url.username, self._url.password]))
        _command(sock, replies, "SELECT", self._url.path.strip("/") or "0")
        return sock, replies

    def cpu_seconds(self) -> float:
        """User plus system CPU of the Redis server so far (INFO cpu)."""
        sock, replies = self._session()
        with sock:
            info = _command(sock, replies, "INFO", "cpu").decode()
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])

    def delete_keys(self, prefix: str) -> None:
        sock, replies = self._session()
        with sock:
            cursor = b"0"
            while True:
                cursor, keys = _command(sock, replies, "SCAN", cursor.decode(), "MATCH", f"{prefix}*", "COUNT", "1000")
                if keys:
                    _command(sock, replies, "DEL", *(key.decode() for key in keys))
                if cursor == b"0":
                    return


def _command(sock: socket.socket, replies: Any, *words: str) -> Any:
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    sock.sendall(b"".join(parts))
    return _reply(replies)


def _reply(replies: Any) -> Any:
    """One Redis reply from a blocking socket file: enough RESP for these few commands."""
    line = replies.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"-":
        raise BenchError(f"Redis refused a command: {rest.decode(errors='replace')}")
    if kind in (b"+", b":"):
        return rest
    if kind == b"$":
        return None if int(rest) < 0 else replies.read(int(rest) + 2)[:-2]
    return [_reply(replies) for _ in range(int(rest))]
