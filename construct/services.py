"""Service-tree parts shared by `construct` and `construct-worker`."""

from __future__ import annotations

import gc
import os
import threading
from typing import Any, Callable

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from construct.storage.database import Database

SHUTDOWN_GRACE_SECONDS = 10.0

# Hashing threads yield the CPU to the reactor thread (nice 0).
LOW_PRIORITY_NICE = 10
# Allocations between young-generation collections (CPython's default is 700).
YOUNG_GENERATION_THRESHOLD = 50_000

class ListenerService(Service):
    """Listens on an endpoint string, logs the bound address, and fails startup loudly."""

    log = Logger()

    def __init__(self, program: str, label: str, endpoint: Any, factory: Any, tracker: Any = None) -> None:
        self.program = program
        self.label = label
        self._endpoint = endpoint
        self._factory = factory
        self._tracker = tracker
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
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        """Stop accepting, then let the tracked connections finish and close."""
        if self.port is not None:
            await self.port.stopListening()
        if self._tracker is not None:
            await self._tracker.shutdown(SHUTDOWN_GRACE_SECONDS)


class SequentialMultiService(MultiService):
    """Stops children one at a time, last added first, each after the previous finished.

    A plain MultiService stops them all at once, which would close the database while
    connections are still finishing the requests they already sent.
    """

    log = Logger()

    def stopService(self) -> Any:
        Service.stopService(self)
        return ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=service)


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


class CollectorTuning(Service):
    """Fewer garbage collections on the message path, and none that walk the startup objects.

    Every message allocates Deferreds, coroutines and dicts, so with the default thresholds
    (700, 10, 10) a young-generation collection runs every few messages and a full one often,
    each walking every object the process holds; profiles showed a sixth of the reactor's time
    there. Objects alive once started (modules, the service tree) are frozen out of collection.
    """

    def startService(self) -> None:
        super().startService()
        # No gc.collect() first: it would hold up startup for the little garbage it frees.
        gc.freeze()
        _, middle, old = gc.get_threshold()
        gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)


class HashingThreads(Service):
    """Threads for password hashing only, few and at low CPU priority.

    bcrypt releases the GIL and takes a quarter of a second at cost 12: on the shared thread
    pool a login storm would take every core from the reactor and stall everyone's messages.
    Here at most `size` hashes run at once, at nice +10, so the reactor thread comes first.
    """

    def __init__(self, size: int, reactor: Any) -> None:
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name="construct-hashing")
        self._reactor = reactor
        self._lowered = threading.local()

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Any:
        super().stopService()
        return deferToThread(self._pool.stop)

    def run(self, fn: Callable, *args: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._pool, self._at_low_priority, fn, *args)

    def _at_low_priority(self, fn: Callable, *args: Any) -> Any:
        if not getattr(self._lowered, "done", False):
            self._lowered.done = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY_NICE)
            except OSError:
                pass  # not permitted here: the size limit still protects the reactor
        return fn(*args)


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
