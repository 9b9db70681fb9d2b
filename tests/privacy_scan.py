"""What the server stores about someone: every SQL row and every Redis key and value that names them."""

from __future__ import annotations

import sqlite3

import psycopg2
import pytest
from twisted.internet import reactor, task

from construct.redis.client import RedisAddress, RedisClient
from tests.conftest import REDIS_URL


def _mentions(value: object, needles: tuple[str, ...]) -> bool:
    text = str(value).lower()
    return any(needle.lower() in text for needle in needles)


def sql_rows_mentioning(database: str, *needles: str) -> list[tuple[str, tuple]]:
    """(table, row) for every row of every table whose text names one of the needles.

    `database` is a SQLite file path or a postgresql:// URL."""
    postgres = database.startswith("postgres")
    conn = psycopg2.connect(database) if postgres else sqlite3.connect(database)
    try:
        cursor = conn.cursor()
        if postgres:
            cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        else:
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = [row[0] for row in cursor.fetchall()]
        found = []
        for table in tables:
            cursor.execute(f'SELECT * FROM "{table}"')
            found += [(table, row) for row in cursor.fetchall() if _mentions(row, needles)]
        return found
    finally:
        conn.close()


async def redis_client() -> RedisClient:
    redis = RedisClient(RedisAddress.parse(REDIS_URL), reactor)
    redis.start()
    for _ in range(500):
        if redis.connected:
            return redis
        await task.deferLater(reactor, 0.01, lambda: None)
    pytest.fail(f"Redis is required at {REDIS_URL}", pytrace=False)


async def redis_dump(redis: RedisClient, prefix: str) -> dict[str, object]:
    """Every key under the prefix with its whole content."""
    keys: list[str] = []
    cursor = "0"
    while True:
        cursor, page = await redis.execute("SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", 1000)
        keys += page
        if cursor == "0":
            break
    readers = {
        "string": ("GET",), "hash": ("HGETALL",), "zset": ("ZRANGE", 0, -1, "WITHSCORES"),
        "list": ("LRANGE", 0, -1), "set": ("SMEMBERS",),
    }
    dump: dict[str, object] = {}
    for key in keys:
        kind = await redis.execute("TYPE", key)
        if kind in readers:
            command, *args = readers[kind]
            dump[key] = await redis.execute(command, key, *args)
    return dump


def redis_entries_mentioning(dump: dict[str, object], *needles: str) -> dict[str, object]:
    return {key: value for key, value in dump.items() if _mentions(key, needles) or _mentions(value, needles)}
