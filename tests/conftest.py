"""Shared fixtures: databases on both engines, a core wired as in production, fake clients."""

from __future__ import annotations

import os
import subprocess
import uuid

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from construct.metrics import Metrics
from construct.storage.database import Database, PostgresEngine, SqliteEngine, prepare_database
from construct.redis.client import RedisAddress, connection_name
from construct.tap import Options, build_embedded, build_production

# PostgreSQL is required: CI must fail, not skip, when it is missing.
POSTGRES_ADMIN_URL = os.environ.get("CONSTRUCT_TEST_POSTGRES", "postgresql://127.0.0.1:5432/postgres")
NOW = 1_800_000_000.0


def _admin_connection():
    try:
        conn = psycopg2.connect(POSTGRES_ADMIN_URL, connect_timeout=5)
    except psycopg2.OperationalError as e:
        pytest.fail(
            f"PostgreSQL is required at {POSTGRES_ADMIN_URL} (set CONSTRUCT_TEST_POSTGRES): {e}", pytrace=False
        )
    conn.autocommit = True
    return conn


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"construct_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_connection()
    admin.cursor().execute(f"CREATE DATABASE {name}")
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        return SqliteEngine(str(tmp_path / "construct.sqlite3"))
    return PostgresEngine(request.getfixturevalue("postgres_url"), pool_size=4)


@pytest.fixture
def database(engine):
    prepare_database(engine)
    db = Database(engine, reactor)
    yield db
    db.close()


@pytest.fixture
def clock():
    clock = task.Clock()
    clock.advance(NOW)
    return clock


def make_options(**overrides) -> Options:
    options = Options(environ={})
    # Every test client comes from one address: registrations per address are tested on their own.
    options.parseOptions(["--bcrypt-cost", "4", "--limit-registrations", "0"])
    for name, value in overrides.items():
        options[name.replace("_", "-")] = value
    return options


REDIS_URL = os.environ.get("CONSTRUCT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def kill_redis_connections(prefix: str, role: str = "") -> int:
    """CLIENT KILL only the connections of this test's servers: those named after its key prefix
    (and `role`: server, subscriber, worker…), never other programs' on the shared Redis.
    Returns how many were killed."""
    listed = subprocess.run(
        ["redis-cli", "-u", REDIS_URL, "CLIENT", "LIST"], check=True, capture_output=True, text=True
    ).stdout
    wanted = connection_name(prefix + role)
    killed = 0
    for line in listed.splitlines():
        fields = dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
        if fields.get("name", "").startswith(wanted):
            subprocess.run(["redis-cli", "-u", REDIS_URL, "CLIENT", "KILL", "ID", fields["id"]], check=True, capture_output=True)
            killed += 1
    return killed


async def _started(redis, subscriber) -> None:
    """Wait until both Redis connections are up and the instance channel is subscribed."""
    subscribed = defer.Deferred()
    original = subscriber.on_subscribed

    def on_subscribed():
        original()
        if not subscribed.called:
            subscribed.callback(None)

    subscriber.on_subscribed = on_subscribed
    redis.start()
    subscriber.start()
    await subscribed.addTimeout(10, reactor)
    await until_redis_connected(redis)


async def until_redis_connected(redis) -> None:
    """Wait for a started RedisClient to connect; a Redis that never answers fails the test."""
    for _ in range(300):
        if redis.connected:
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    pytest.fail(f"Redis is required at {REDIS_URL} (set CONSTRUCT_TEST_REDIS)", pytrace=False)


@pytest.fixture
def redis_prefix():
    return f"test:{uuid.uuid4().hex[:12]}:"


async def _delete_keys(redis, prefix: str) -> None:
    cursor = "0"
    while True:
        cursor, keys = await redis.execute("SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", 1000)
        if keys:
            await redis.execute("DEL", *keys)
        if cursor == "0":
            return


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def backend(request):
    """Embedded mode on SQLite or PostgreSQL, or production mode on PostgreSQL and Redis."""
    return request.param


@pytest_twisted.async_yield_fixture
async def core_factory(backend, request, tmp_path, clock, redis_prefix):
    """Build cores (one per instance) on the backend with a fake clock; bcrypt runs inline (cost 4)."""
    engine = (
        SqliteEngine(str(tmp_path / "construct.sqlite3"))
        if backend == "sqlite"
        else PostgresEngine(request.getfixturevalue("postgres_url"), pool_size=4)
    )
    prepare_database(engine)
    db = Database(engine, reactor)
    connections = []

    async def build(instance_id: str = "instance-1", **overrides):
        options = make_options(**overrides)
        if backend != "redis":
            core, _ = build_embedded(db, clock, options, Metrics(), defer.maybeDeferred)
            return core
        options["redis"] = RedisAddress.parse(REDIS_URL)
        options["redis-prefix"] = redis_prefix
        options["instance-id"] = instance_id
        core, presence, redis, subscriber = build_production(
            db, reactor, clock, options, Metrics(), defer.maybeDeferred
        )
        connections.extend([redis, subscriber])
        await _started(redis, subscriber)
        return core

    yield build
    if connections:
        await _delete_keys(connections[0], redis_prefix)
    for connection in connections:
        await connection.stop()
    db.close()


@pytest_twisted.async_fixture
async def core(core_factory):
    return await core_factory()


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts real server processes")


@pytest_twisted.async_yield_fixture
async def http(core):
    """The /v1 API of `core` on a loopback port, and a client for it."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from construct.http.api import HttpApi
    from tests.clients import HttpClient

    root = Resource()
    root.putChild(b"v1", HttpApi(core).app.resource())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    yield HttpClient(port.getHost().port)
    await port.stopListening()
