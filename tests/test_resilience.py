"""Behaviour under trouble: restarts, lock waits, timeouts, dead targets, connection caps."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest
from helpers import make_config, scrape, series, value, wait_for
from jobqueue_exporter.embedded import EmbeddedPostgres
from jobqueue_exporter.exporter import Exporter
from jobqueue_exporter.poll import TargetPoller
from procrastinate_app import apply_schema


def procrastinate_target(name: str, dsn: str, **extra) -> dict:
    return {"name": name, "dsn": dsn, "preset": "procrastinate", **extra}


async def exporter_connections(admin: asyncpg.Connection, target: str) -> int:
    return await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
        f"jobqueue-exporter/{target}",
    )


async def test_database_restart_mid_run(own_server: EmbeddedPostgres) -> None:
    dsn = own_server.dsn()
    app = await apply_schema(dsn)
    async with app.open_async():
        await app.tasks["ok"].defer_async()
    config = make_config(
        procrastinate_target("db", dsn), poll_interval="100ms", listen="127.0.0.1:0"
    )
    exporter = Exporter(config)
    poller = exporter.pollers[0]
    await exporter.start()
    try:
        await wait_for(lambda: poller.state.up, message="first successful poll")
        assert value(scrape(poller), "jobqueue_jobs", kind="ok", state="pending") == 1

        await asyncio.to_thread(own_server.stop, "fast")
        await wait_for(lambda: poller.state.up is False, message="target reported down")
        samples = scrape(poller)
        assert value(samples, "jobqueue_up", target="db") == 0
        assert series(samples, "jobqueue_jobs") == {}, "no job series served as if current"
        assert value(samples, "jobqueue_last_poll_success_timestamp_seconds", target="db") > 0
        await wait_for(lambda: poller.state.errors["connection"] >= 2, message="keeps retrying")
        assert all(not t.done() for t in exporter._tasks), "the poll loop survives the outage"

        await asyncio.to_thread(own_server.start)
        await wait_for(lambda: poller.state.up, timeout=30, message="polling resumed by itself")
        async with app.open_async():
            await app.run_worker_async(
                queues=["default"], wait=False, install_signal_handlers=False
            )

        async def counted() -> bool:
            return value(scrape(poller), "jobqueue_jobs_finished_total", outcome="succeeded") == 1

        await wait_for(counted, message="finished job counted after the restart")
    finally:
        await exporter.stop()


async def test_lock_timeout_is_an_error_and_leaves_no_connection(
    dsn: str, db: asyncpg.Connection
) -> None:
    await apply_schema(dsn)
    poller = TargetPoller(*_single(dsn, lock_timeout="300ms", statement_timeout="5s"))
    await poller.poll_once()
    locker = await asyncpg.connect(dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(asyncpg.LockNotAvailableError):
                await poller.poll_once()
            assert poller.state.errors["timeout"] == 1
            assert poller.state.up is False and poller.state.snapshot is None
            assert await exporter_connections(db, "app") == 0, (
                "the failed poll closed its connection"
            )
    finally:
        await locker.close()
    await poller.poll_once()
    assert poller.state.up is True
    await poller.close()


async def test_statement_timeout_cancels_on_the_server(dsn: str, db: asyncpg.Connection) -> None:
    await apply_schema(dsn)
    poller = TargetPoller(*_single(dsn, lock_timeout="30s", statement_timeout="400ms"))
    locker = await asyncpg.connect(dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(asyncpg.QueryCanceledError):
                await poller.poll_once()
            # nothing of ours is left waiting behind the lock
            waiting = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobqueue-exporter/app'"
            )
            assert waiting == 0
    finally:
        await locker.close()
    assert value(scrape(poller), "jobqueue_poll_errors_total", reason="timeout") == 1


async def test_connections_stay_within_the_cap(dsn: str, db: asyncpg.Connection) -> None:
    """Failing, retrying and recovering never opens a second connection for a target."""
    await apply_schema(dsn)
    config = make_config(
        procrastinate_target("app", dsn, lock_timeout="100ms"),
        poll_interval="50ms",
        listen="127.0.0.1:0",
    )
    exporter = Exporter(config)
    poller = exporter.pollers[0]
    await exporter.start()
    peak = 0
    try:
        locker = await asyncpg.connect(dsn)
        try:
            for _ in range(3):
                async with locker.transaction():
                    await locker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
                    errors = poller.state.errors["timeout"]
                    while poller.state.errors["timeout"] < errors + 2:
                        peak = max(peak, await exporter_connections(db, "app"))
                        await asyncio.sleep(0.01)
                successes = poller.state.last_success
                while poller.state.last_success == successes:
                    peak = max(peak, await exporter_connections(db, "app"))
                    await asyncio.sleep(0.01)
        finally:
            await locker.close()
    finally:
        await exporter.stop()
    assert peak == 1
    assert await exporter_connections(db, "app") == 0, "closed on shutdown"


async def test_session_settings_on_the_server(dsn: str, db: asyncpg.Connection) -> None:
    await apply_schema(dsn)
    poller = TargetPoller(*_single(dsn, statement_timeout="7s", lock_timeout="2s"))
    await poller.poll_once()
    conn = poller.source._conn
    assert conn is not None
    assert await conn.fetchval("SHOW statement_timeout") == "7s"
    assert await conn.fetchval("SHOW lock_timeout") == "2s"
    assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
    assert await conn.fetchval("SHOW application_name") == "jobqueue-exporter/app"
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await conn.execute("DELETE FROM procrastinate_jobs")
    await poller.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single(dsn: str, **extra):
    config = make_config(procrastinate_target("app", dsn, **extra))
    return config, config.targets[0]


async def test_dead_or_stuck_target_never_delays_the_others(
    dsn: str, db: asyncpg.Connection
) -> None:
    await apply_schema(dsn)
    await db.execute(
        "CREATE TABLE other_jobs (id serial PRIMARY KEY, status text, run_at timestamptz DEFAULT now(),"
        " started_at timestamptz)"
    )
    other_table = {
        "name": "other_jobs",
        "state": {"column": "status", "pending": ["new"], "running": ["busy"]},
        "timestamps": {"eligible": "run_at", "started": "started_at"},
    }
    dead = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing"
    config = make_config(
        {"name": "good", "dsn": dsn, "table": other_table},
        procrastinate_target("stuck", dsn, lock_timeout="60s", statement_timeout="60s"),
        procrastinate_target("dead", dead),
        poll_interval="100ms",
        listen="127.0.0.1:0",
    )
    exporter = Exporter(config)
    good, stuck, gone = exporter.pollers
    locker = await asyncpg.connect(dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
            await exporter.start()
            await wait_for(lambda: stuck._lock.locked(), message="stuck target inside its poll")
            polls: set[float] = set()

            def good_keeps_polling() -> bool:
                if good.state.last_success:
                    polls.add(good.state.last_success)
                return len(polls) >= 5

            await wait_for(good_keeps_polling, message="healthy target polled on schedule")
            await wait_for(
                lambda: gone.state.errors["connection"] >= 2, message="dead target retried"
            )
            assert stuck.state.up is None and stuck._lock.locked(), "still waiting on the lock"
            samples = scrape(*exporter.pollers)
            assert value(samples, "jobqueue_up", target="good") == 1
            assert value(samples, "jobqueue_up", target="dead") == 0
            assert series(samples, "jobqueue_up", target="stuck") == {}
    finally:
        await locker.close()
        await exporter.stop()


async def test_connect_failures_are_connection_errors(admin_dsn: str) -> None:
    """Unknown database, refused port: both are `connection`, whatever the server's error class."""
    from helpers import with_database

    config = make_config(
        procrastinate_target("nodb", with_database(admin_dsn, "no_such_database")),
        procrastinate_target("refused", f"postgresql://postgres@127.0.0.1:{_closed_port()}/x"),
    )
    for poller in (TargetPoller(config, target) for target in config.targets):
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await poller.poll_once()
        assert dict(poller.state.errors) == {"connection": 1}, poller.state.last_error
