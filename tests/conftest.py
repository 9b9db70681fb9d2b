"""Shared fixtures: databases on both engines, a core wired as in production, fake clients."""

from __future__ import annotations

import os
import uuid

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, task

from construct.metrics import Metrics
from construct.storage.database import Database, PostgresEngine, SqliteEngine, prepare_database
from construct.tap import Options, build_core

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
    from twisted.internet import reactor

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
    options.parseOptions(["--bcrypt-cost", "4"])
    for name, value in overrides.items():
        options[name.replace("_", "-")] = value
    return options


@pytest.fixture
def core_factory(database, clock):
    """Build a core on the test database with a fake clock; bcrypt runs inline (cost 4)."""

    def build(**overrides):
        return build_core(database, clock, make_options(**overrides), Metrics(), defer.maybeDeferred)

    return build


@pytest.fixture
def core(core_factory):
    return core_factory()


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts real server processes")


__all__ = ["pytest_twisted", "make_options"]
