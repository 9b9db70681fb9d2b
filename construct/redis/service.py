"""Starts and stops the Redis connections with the rest of the service tree."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer


class RedisService(Service):
    def __init__(self, *connections: Any) -> None:
        self._connections = connections

    def startService(self) -> None:
        super().startService()
        for connection in self._connections:
            connection.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.gatherResults([defer.maybeDeferred(c.stop) for c in self._connections], consumeErrors=True)
