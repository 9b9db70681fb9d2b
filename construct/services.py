"""Service-tree parts shared by `construct` and `construct-worker`."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.storage.database import Database


class ListenerService(Service):
    """Listens on an endpoint string, logs the bound address, and fails startup loudly."""

    log = Logger()

    def __init__(self, program: str, label: str, endpoint: Any, factory: Any) -> None:
        self.program = program
        self.label = label
        self._endpoint = endpoint
        self._factory = factory
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        self._endpoint.listen(self._factory).addCallbacks(self._listening, failures.append)
        # Stream endpoints listen synchronously, so a busy port or a bad certificate shows up here.
        if failures:
            raise SystemExit(f"{self.program}: cannot listen for {self.label}: {failures[0].value}")

    def _listening(self, port: Any) -> None:
        self.port = port
        address = port.getHost()
        self.log.info(
            "{label} listening on {host}:{port}",
            label=self.label,
            host=getattr(address, "host", address),
            port=getattr(address, "port", ""),
        )

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


class GuardedTimer(TimerService):
    """A TimerService that survives a failing run (a bare one stops looping for good)."""

    log = Logger()

    def __init__(self, interval: float, label: str, job: Any, clock: Any) -> None:
        super().__init__(interval, self._run)
        self.clock = clock
        self._label = label
        self._job = job

    def _run(self) -> Any:
        return ensureDeferred(self._job()).addErrback(lambda f: self.log.failure("{label} failed", f, label=self._label))


class DatabaseService(Service):
    def __init__(self, db: Database) -> None:
        self.db = db

    def stopService(self) -> None:
        super().stopService()
        self.db.close()


def parse_endpoint(reactor: Any, program: str, option: str, description: str) -> Any:
    """An endpoint from its string, or one line naming the bad option."""
    try:
        return serverFromString(reactor, description)
    except Exception as e:
        raise SystemExit(f"{program}: --{option} {description!r} is not a valid endpoint: {e}") from None
