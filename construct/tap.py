"""`twistd construct`: options and the composition root. Wiring only, no protocol or domain code."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.config import Setting, SettingsOptions, int_between, non_empty
from construct.core.accounts import AccountService, PasswordHasher
from construct.core.app import Core
from construct.core.delivery import DeliveryHub
from construct.core.keys import KeyService
from construct.core.messaging import MessageService
from construct.http.api import HttpApi
from construct.http.health import build_health_site
from construct.http.site import build_site
from construct.metrics import Metrics
from construct.protocol.tcp import JsonLinesFactory
from construct.protocol.ws import ConstructWebSocketFactory
from construct.storage.accounts import AccountStore
from construct.storage.database import Database, engine_from_options, prepare_database
from construct.storage.inbox import SqlInbox
from construct.storage.keys import KeyStore

MAINTENANCE_INTERVAL_SECONDS = 60
# Room for the envelope around the largest allowed content (base64 key, ids, JSON quoting).
FRAME_OVERHEAD_BYTES = 16 * 1024


class Options(SettingsOptions):
    settings = (
        Setting("listen", "tcp:8080:interface=127.0.0.1", "HTTP API and WebSocket endpoint", non_empty),
        Setting("tcp", "tcp:8081:interface=127.0.0.1", "raw TCP JSON-lines endpoint", non_empty),
        Setting("health", "tcp:3000:interface=127.0.0.1", "health and metrics endpoint", non_empty),
        Setting("data-dir", "construct-data", "directory of the embedded SQLite database", non_empty),
        Setting("database", None, "postgresql://user@host/db URL: PostgreSQL instead of SQLite", non_empty),
        Setting("bcrypt-cost", 12, "bcrypt work factor", int_between(4, 31)),
        Setting("message-ttl", 7 * 24 * 3600, "seconds a message waits for its acknowledgement", int_between(60, 10**8)),
        Setting("inbox-quota", 10_000, "most pending messages per recipient", int_between(1, 10**7)),
        Setting("max-message-bytes", 64 * 1024, "largest message 'content' in bytes", int_between(1024, 2**24)),
    )


class ListenerService(Service):
    """Listens on an endpoint string, logs the bound address, and fails startup loudly."""

    log = Logger()

    def __init__(self, label: str, endpoint: Any, factory: Any) -> None:
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
            raise SystemExit(f"construct: cannot listen for {self.label}: {failures[0].value}")

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


def _endpoint(reactor: Any, option: str, description: str) -> Any:
    try:
        return serverFromString(reactor, description)
    except Exception as e:
        raise SystemExit(f"construct: --{option} {description!r} is not a valid endpoint: {e}") from None


def build_core(db: Database, clock: Any, options: Options, metrics: Metrics, run_blocking: Any) -> Core:
    """The core on the SQL backend; `run_blocking(fn, *args)` runs CPU-heavy work off the reactor."""
    inbox = SqlInbox(db)
    hub = DeliveryHub(inbox, clock, metrics)
    return Core(
        accounts=AccountService(
            AccountStore(db), PasswordHasher(options["bcrypt-cost"], run_blocking), clock, hub.on_sessions_revoked
        ),
        keys=KeyService(KeyStore(db), clock),
        messaging=MessageService(
            inbox,
            hub.is_online,
            hub.on_pending,
            clock,
            ttl_seconds=options["message-ttl"],
            quota=options["inbox-quota"],
            max_content_bytes=options["max-message-bytes"],
        ),
        hub=hub,
        metrics=metrics,
    )


def open_database(options: Options, reactor: Any) -> Database:
    """Create or upgrade the schema now, so an unreachable database stops startup with one line."""
    try:
        engine = engine_from_options(options["database"], options["data-dir"])
    except ValueError as e:
        raise SystemExit(f"construct: {e}") from None
    try:
        prepare_database(engine)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"construct: cannot use the {engine.describe()}: {reason}") from None
    return Database(engine, reactor)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    endpoints = {name: _endpoint(reactor, name, options[name]) for name in ("listen", "tcp", "health")}
    db = open_database(options, reactor)
    metrics = Metrics()
    threads = reactor.getThreadPool()
    core = build_core(db, reactor, options, metrics, lambda fn, *args: deferToThreadPool(reactor, threads, fn, *args))
    max_frame = options["max-message-bytes"] * 2 + FRAME_OVERHEAD_BYTES

    async def maintenance() -> None:
        expired = await core.messaging.expire()
        if expired:
            metrics.messages_expired.inc(expired)
            GuardedTimer.log.info("expired {count} unacknowledged messages", count=expired)
        await core.accounts.delete_expired_sessions()

    root = MultiService()
    DatabaseService(db).setServiceParent(root)
    GuardedTimer(MAINTENANCE_INTERVAL_SECONDS, "maintenance", maintenance, reactor).setServiceParent(root)
    site = build_site(ConstructWebSocketFactory(core, max_frame), HttpApi(core), max_frame)
    ListenerService("http", endpoints["listen"], site).setServiceParent(root)
    ListenerService("tcp", endpoints["tcp"], JsonLinesFactory(core, max_frame)).setServiceParent(root)
    health = build_health_site({"database": db.check}, metrics, reactor)
    ListenerService("health", endpoints["health"], health).setServiceParent(root)
    return root
