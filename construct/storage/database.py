"""The SQL database: one adbapi pool, one engine object for dialect differences, migrations.

Every query in the project goes through `Database.run(desc, fn_txn, ...)`; the `_txn`
functions run on a pool thread, write `?` placeholders, and never touch the reactor.
"""

from __future__ import annotations

import os
import sqlite3
from importlib import resources
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from construct.errors import ConstructError, service_unavailable

SCHEMA_VERSION = 5
# The server_secrets row that keys the digests of metadata (limit keys, duplicate-send records).
METADATA_SALT = "metadata-salt"


class Engine:
    """What differs between SQLite and PostgreSQL, and nothing else."""

    name = ""
    module = ""
    serial_primary_key = ""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def convert(self, sql: str) -> str:
        return sql

    def connect_args(self) -> tuple[tuple, dict]:
        raise NotImplementedError

    def on_connect(self, conn: Any) -> None:
        """Run on every new pool connection."""

    def is_unavailable(self, failure_value: BaseException) -> bool:
        """True when the error means the database cannot be reached, not that the query is wrong."""
        return isinstance(failure_value, (self.driver.OperationalError, self.driver.InterfaceError))

    def is_conflict(self, failure_value: BaseException) -> bool:
        return isinstance(failure_value, self.driver.IntegrityError)

    def begin_migration(self, conn: Any) -> None:
        """Open the one transaction every migration runs in, so a failing one leaves nothing,
        and keep two processes starting at once from migrating together."""

    def discard_deleted(self, txn: "Txn") -> None:
        """Make deleted rows leave the database's files (see SqliteEngine)."""

    def describe(self) -> str:
        raise NotImplementedError


class SqliteEngine(Engine):
    name = "sqlite"
    module = "sqlite3"
    serial_primary_key = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: str) -> None:
        super().__init__(sqlite3)
        self.path = path

    def connect_args(self) -> tuple[tuple, dict]:
        # One connection: SQLite serialises writers anyway, and a single connection keeps the
        # per-recipient insert order equal to the commit order (FIFO).
        return (self.path,), {
            "check_same_thread": False,
            "timeout": 10.0,
            "cp_min": 1,
            "cp_max": 1,
        }

    def on_connect(self, conn: Any) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged message survives power loss, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        # Deleted rows are overwritten with zeros, whatever this SQLite build's default.
        conn.execute("PRAGMA secure_delete=ON")
        conn.commit()

    def begin_migration(self, conn: Any) -> None:
        # Python's sqlite3 runs DDL outside any transaction unless one is opened explicitly;
        # IMMEDIATE takes the write lock at once, which also serialises two starting processes.
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")

    def discard_deleted(self, txn: "Txn") -> None:
        # secure_delete zeroes the database pages, but the write-ahead log keeps the old page
        # images until a checkpoint; TRUNCATE copies them back and empties the log file.
        txn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def create_files(self) -> None:
        """The data directory 0700 and the database files 0600: they hold password and token
        hashes and messages. Files made before are narrowed too (SQLite gives its -wal and -shm
        files the database file's mode)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        for path in (self.path, self.path + "-wal", self.path + "-shm"):
            if os.path.exists(path):
                os.chmod(path, 0o600)

    def describe(self) -> str:
        return f"SQLite database {self.path}"


class PostgresEngine(Engine):
    name = "postgres"
    module = "psycopg2"
    serial_primary_key = "BIGSERIAL PRIMARY KEY"

    def __init__(self, url: str, pool_size: int = 10) -> None:
        import psycopg2

        super().__init__(psycopg2)
        self.url = url
        self.pool_size = pool_size

    def convert(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def connect_args(self) -> tuple[tuple, dict]:
        return (self.url,), {
            "connect_timeout": 5,
            # A half-dead link must not pin a pool thread for minutes.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "options": "-c statement_timeout=10000",
            "cp_min": 1,
            "cp_max": self.pool_size,
        }

    def begin_migration(self, conn: Any) -> None:
        # psycopg2 opens a transaction before the first statement, DDL included.
        conn.cursor().execute("SELECT pg_advisory_xact_lock(%s)", (0x636F6E73,))

    def describe(self) -> str:
        parts = urlsplit(self.url)
        return f"PostgreSQL database {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def engine_from_options(database_url: str | None, data_dir: str, pool_size: int = 10) -> Engine:
    """`--database postgresql://…` selects PostgreSQL; otherwise SQLite in the data directory."""
    if database_url:
        scheme = urlsplit(database_url).scheme
        if scheme not in ("postgres", "postgresql"):
            raise ValueError(f"--database must be a postgresql:// URL, not {scheme or database_url!r}")
        return PostgresEngine(database_url, pool_size)
    return SqliteEngine(os.path.join(data_dir, "construct.sqlite3"))


class Txn:
    """A cursor that takes `?` placeholders on every engine."""

    def __init__(self, cursor: Any, engine: Engine) -> None:
        self._cursor = cursor
        self._engine = engine

    def execute(self, sql: str, params: tuple | list = ()) -> "Txn":
        self._cursor.execute(self._engine.convert(sql), tuple(params))
        return self

    def fetchone(self) -> tuple | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount


class Database:
    """The one shared pool. `run` retries once on a dropped connection, then reports 503."""

    log = Logger()

    def __init__(self, engine: Engine, reactor: Any) -> None:
        self.engine = engine
        self.reactor = reactor
        args, kwargs = engine.connect_args()
        self.pool = adbapi.ConnectionPool(
            engine.module,
            *args,
            cp_reconnect=True,
            cp_noisy=False,
            cp_openfun=engine.on_connect,
            cp_reactor=reactor,
            **kwargs,
        )

    async def run(self, desc: str, fn: Callable[..., Any], *args: Any) -> Any:
        for attempt in (1, 2):
            try:
                return await self.pool.runInteraction(self._interaction, fn, *args)
            except Exception as e:
                if not self.engine.is_unavailable(e):
                    raise
                if attempt == 2:
                    self.log.warn("database unavailable during {desc}: {error}", desc=desc, error=e)
                    raise service_unavailable("The database") from e

    def _interaction(self, cursor: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(Txn(cursor, self.engine), *args)

    async def check(self) -> None:
        """Raise unless a trivial query succeeds (for /health)."""
        await self.run("health_check", lambda txn: txn.execute("SELECT 1").fetchone())

    def close(self) -> None:
        self.pool.close()


class GroupCommit:
    """Writes that share transactions: one commit (one fsync in SQLite) for every write issued
    in one reactor turn, or while the previous commit was running.

    Each write is a `_txn` function; they run in the order added, within one transaction, and
    at most one such transaction runs at a time, so they take effect in that order. A
    ConstructError raised by one answers that write alone, and must be raised before it has
    written anything (what it raises for is then decided and nothing of it is kept); any other
    error rolls the transaction back and fails every write in it. A write's Deferred fires only
    after its transaction has committed.
    """

    log = Logger()

    def __init__(self, db: Database, desc: str) -> None:
        self._db = db
        self._desc = desc
        self._waiting: list[tuple[Callable[..., Any], tuple, Deferred]] = []
        self._committing = False
        self._call: Any = None

    def add(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        done: Deferred = Deferred()
        self._waiting.append((fn, args, done))
        if not self._committing and self._call is None:
            self._call = self._db.reactor.callLater(0, self._commit)
        return done

    def _commit(self) -> None:
        self._call = None
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        self._committing = True
        ensureDeferred(self._db.run(self._desc, self._batch_txn, batch)).addBoth(self._committed, batch)

    @staticmethod
    def _batch_txn(txn: "Txn", batch: list[tuple[Callable[..., Any], tuple, Deferred]]) -> list[Any]:
        outcomes: list[Any] = []
        for fn, args, _ in batch:
            try:
                outcomes.append(fn(txn, *args))
            except ConstructError as e:
                outcomes.append(e)
        return outcomes

    def _committed(self, outcomes: list[Any] | Failure, batch: list[tuple[Callable[..., Any], tuple, Deferred]]) -> None:
        try:
            for index, (_, _, done) in enumerate(batch):
                outcome = outcomes if isinstance(outcomes, Failure) else outcomes[index]
                if isinstance(outcome, (Failure, ConstructError)):
                    done.errback(outcome)
                else:
                    done.callback(outcome)
        except Exception:
            self.log.failure("answering the writes of a commit failed")
        finally:
            self._committing = False
            # What arrived during this commit goes now, in the next one.
            if self._waiting and self._call is None:
                self._commit()


def _schema_scripts(engine: Engine) -> list[tuple[int, str]]:
    folder = resources.files("construct.storage") / "schema"
    scripts = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            lines = entry.read_text(encoding="utf-8").splitlines()
            sql = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
            sql = sql.replace("{serial_primary_key}", engine.serial_primary_key)
            scripts.append((version, sql))
    return sorted(scripts)


def _connect(engine: Engine) -> Any:
    args, kwargs = engine.connect_args()
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("cp_")}
    if isinstance(engine, SqliteEngine):
        engine.create_files()
    conn = engine.driver.connect(*args, **kwargs)
    engine.on_connect(conn)
    return conn


def server_secret(engine: Engine, name: str) -> bytes:
    """The secret of this name the server made on its first start (32 random bytes), made now if
    there is none; synchronously, at startup, like `prepare_database`. Every instance on one
    database reads the same."""
    conn = _connect(engine)
    try:
        txn = Txn(conn.cursor(), engine)
        txn.execute(
            "INSERT INTO server_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, os.urandom(32).hex()),
        )
        value = txn.execute("SELECT value FROM server_secrets WHERE name = ?", (name,)).fetchone()[0]
        conn.commit()
        return bytes.fromhex(value)
    finally:
        conn.close()


def schema_version(engine: Engine) -> int:
    """The schema version of the database as it is (0 when it has none yet)."""
    conn = _connect(engine)
    try:
        txn = Txn(conn.cursor(), engine)
        try:
            return txn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        except engine.driver.DatabaseError:
            return 0
    finally:
        conn.close()


def prepare_database(engine: Engine) -> int:
    """Create or upgrade the schema, synchronously, before the reactor runs.

    Returns the schema version. Raises `engine.driver.Error` subclasses when the database
    cannot be reached, which the caller turns into one clear line.
    """
    conn = _connect(engine)
    try:
        engine.begin_migration(conn)
        txn = Txn(conn.cursor(), engine)
        txn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = txn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database schema is version {current}, newer than this release ({SCHEMA_VERSION})"
            )
        for version, sql in _schema_scripts(engine):
            if version <= current:
                continue
            for statement in sql.split(";"):
                if statement.strip():
                    txn.execute(statement)
            txn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            current = version
        conn.commit()
        return current
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()
