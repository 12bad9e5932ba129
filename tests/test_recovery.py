"""Stale-job recovery against real Procrastinate workers killed with SIGKILL mid-job.

Polls are driven by hand with explicit clock values for the hold window, so no assertion depends on how
fast this machine is; the database's own clock decides what is stale.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from pathlib import Path

import asyncpg
import pytest
from helpers import make_config, scrape, value, wait_for, with_database
from jobqueue_exporter.config import ConfigError, load_config_data
from jobqueue_exporter.embedded import EmbeddedPostgres
from jobqueue_exporter.poll import TargetPoller
from procrastinate_app import apply_schema, start_worker_process

HOLD = 60.0


def recovering_poller(metrics_dsn: str, **recovery) -> TargetPoller:
    config = make_config(
        {
            "name": "app",
            "dsn": metrics_dsn,
            "preset": "procrastinate",
            "stale_after": "1s",
            "recovery": {"enabled": True, "dry_run": False, "hold_for": f"{HOLD:g}s", **recovery},
        }
    )
    return TargetPoller(config, config.targets[0])


async def step(poller: TargetPoller, at: float) -> str | None:
    """One poll, then recovery as the run loop does it, with the hold-window clock at ``at``."""
    await poller.poll_once()
    assert poller.recoverer is not None
    return await poller.recoverer.after_poll(poller._stale_jobs, now=at)


async def kill_mid_job(
    db: asyncpg.Connection, dsn: str, count: int, tmp_path: Path, queue: str = "gated"
):
    """Defer `count` gate jobs, let a real worker pick them all, SIGKILL it, wait until they are stale."""
    app = await apply_schema(dsn)
    async with app.open_async():
        for n in range(count):
            await (
                app.tasks["gate"]
                .configure(queue=queue)
                .defer_async(path=str(tmp_path / f"gate-{n}"))
            )
    worker = start_worker_process(dsn, queue, concurrency=count)
    try:
        await wait_for(
            lambda: db.fetchval(
                "SELECT count(*) = $1 FROM procrastinate_jobs WHERE status = 'doing' AND queue_name = $2",
                count,
                queue,
            ),
            message=f"{count} jobs picked up",
        )
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    await wait_for(
        lambda: db.fetchval(
            "SELECT bool_and(w.last_heartbeat < now() - interval '1 second') FROM procrastinate_workers w"
        ),
        message="killed worker's heartbeat is stale",
    )
    return app


async def job_rows(db: asyncpg.Connection) -> dict[int, tuple[str, int]]:
    return {
        r["id"]: (r["status"], r["attempts"])
        for r in await db.fetch("SELECT id, status::text, attempts FROM procrastinate_jobs")
    }


async def test_hold_window_then_reset_then_a_real_worker_finishes_it(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, caplog
) -> None:
    app = await kill_mid_job(db, dsn, 1, tmp_path)
    # a job on a live worker, blocked on its gate, must never be touched
    async with app.open_async():
        await app.tasks["gate"].configure(queue="live").defer_async(path=str(tmp_path / "live"))
    live_worker = start_worker_process(dsn, "live")
    try:
        await wait_for(
            lambda: db.fetchval(
                "SELECT count(*) = 2 FROM procrastinate_jobs WHERE status = 'doing'"
            ),
            message="live job running",
        )
        poller = recovering_poller(dsn)
        t0 = 1_000_000.0
        for offset in (0, 20, 40, HOLD - 1):
            assert await step(poller, t0 + offset) is None, "inside the hold window nothing happens"
            assert (
                await db.fetchval("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")
                == 2
            )
        with caplog.at_level(logging.INFO, logger="jobqueue_exporter.recovery"):
            assert await step(poller, t0 + HOLD) == "recovered"
        stale_id = await db.fetchval("SELECT id FROM procrastinate_jobs WHERE queue_name = 'gated'")
        assert (await job_rows(db))[stale_id] == ("todo", 1), "back to todo as retry_job does"
        assert (
            await db.fetchval(
                "SELECT count(*) FROM procrastinate_events WHERE job_id = $1 AND type = 'deferred_for_retry'",
                stale_id,
            )
            == 1
        )
        live = await db.fetchval(
            "SELECT status::text FROM procrastinate_jobs WHERE queue_name = 'live'"
        )
        assert live == "doing", "the job of a live worker is never touched"
        record = next(r for r in caplog.records if getattr(r, "event", None) == "recovery")
        assert record.target == "app" and record.dry_run is False
        assert record.jobs == [{"queue": "gated", "kind": "gate", "ids": [str(stale_id)]}]
        samples = scrape(poller)
        assert value(samples, "jobqueue_recovery_runs_total", result="recovered") == 1
        assert value(samples, "jobqueue_recovered_jobs_total", queue="gated", kind="gate") == 1

        # the recovered job goes through the normal worker path and completes
        (tmp_path / "gate-0").touch()
        async with app.open_async():
            await app.run_worker_async(queues=["gated"], wait=False, install_signal_handlers=False)
        assert (await job_rows(db))[stale_id] == ("succeeded", 2), (
            "attempts count at the end of each"
        )
        assert await step(poller, t0 + 2 * HOLD) is None
    finally:
        (tmp_path / "live").touch()
        live_worker.kill()
        live_worker.wait(10)


async def test_a_job_whose_worker_comes_back_is_not_touched(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await kill_mid_job(db, dsn, 1, tmp_path)
    poller = recovering_poller(dsn)
    t0 = 1_000_000.0
    await step(poller, t0)
    # the heartbeat comes back (a DB blip, a paused VM): the episode is over
    await db.execute("UPDATE procrastinate_workers SET last_heartbeat = now()")
    await step(poller, t0 + 30)
    await wait_for(
        lambda: db.fetchval(
            "SELECT bool_and(last_heartbeat < now() - interval '1 second') FROM procrastinate_workers"
        ),
        message="stale again",
    )
    # stale again, but not for a whole hold window since it came back
    assert await step(poller, t0 + HOLD + 1) is None
    assert await db.fetchval("SELECT status::text FROM procrastinate_jobs") == "doing"
    assert await step(poller, t0 + HOLD + 1 + HOLD) == "recovered", "held again since t0 + HOLD + 1"


async def test_dry_run_changes_nothing(dsn: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    await kill_mid_job(db, dsn, 2, tmp_path)
    before = await job_rows(db)
    events = await db.fetchval("SELECT count(*) FROM procrastinate_events")
    poller = recovering_poller(dsn, dry_run=True)
    t0 = 1_000_000.0
    await step(poller, t0)
    assert await step(poller, t0 + HOLD) == "dry_run"
    assert await step(poller, t0 + HOLD + 15) == "dry_run", "still a candidate: nothing was done"
    assert await job_rows(db) == before
    assert await db.fetchval("SELECT count(*) FROM procrastinate_events") == events
    samples = scrape(poller)
    assert value(samples, "jobqueue_recovery_runs_total", result="dry_run") == 2
    assert value(samples, "jobqueue_recovery_runs_total", result="recovered") == 0


async def test_batch_and_hourly_caps(dsn: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    await kill_mid_job(db, dsn, 8, tmp_path)
    poller = recovering_poller(dsn, max_jobs_per_run=3, max_jobs_per_hour=5)
    t0 = 1_000_000.0
    await step(poller, t0)
    todo = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'"
    assert await step(poller, t0 + HOLD) == "recovered"
    assert await db.fetchval(todo) == 3
    assert await step(poller, t0 + HOLD + 10) == "recovered"
    assert await db.fetchval(todo) == 5
    assert await step(poller, t0 + HOLD + 20) == "capped"
    assert await db.fetchval(todo) == 5, "hourly budget of 5 used up"
    assert await step(poller, t0 + HOLD + 3600) == "recovered", "a new hour, a new budget"
    assert await db.fetchval(todo) == 8
    samples = scrape(poller)
    assert value(samples, "jobqueue_recovery_runs_total", result="capped") == 1
    assert value(samples, "jobqueue_recovered_jobs_total", kind="gate") == 8


async def test_two_replicas_recover_each_job_exactly_once(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    jobs = 12
    await kill_mid_job(db, dsn, jobs, tmp_path)
    replicas = [recovering_poller(dsn, max_jobs_per_run=4) for _ in range(3)]
    t0 = 1_000_000.0
    for replica in replicas:
        await step(replica, t0)
    results = []
    for round_ in range(6):
        results += await asyncio.gather(*(step(r, t0 + HOLD + round_) for r in replicas))
    rows = await job_rows(db)
    assert all(row == ("todo", 1) for row in rows.values()), rows
    retries = await db.fetch(
        "SELECT job_id, count(*) FROM procrastinate_events WHERE type = 'deferred_for_retry' GROUP BY 1"
    )
    assert len(retries) == jobs and all(r["count"] == 1 for r in retries), "one reset per job"
    recovered = sum(r.recoverer.state.recovered[("gated", "gate")] for r in replicas)
    assert recovered == jobs
    assert "locked" in results or results.count("recovered") >= 3


async def test_read_only_metrics_role_and_separate_recovery_role(
    admin_dsn: str, dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await kill_mid_job(db, dsn, 1, tmp_path)
    suffix = uuid.uuid4().hex[:8]
    reader, fixer = f"jq_metrics_{suffix}", f"jq_recovery_{suffix}"
    database = await db.fetchval("SELECT current_database()")
    await db.execute(
        f"""
        CREATE ROLE {reader} LOGIN; CREATE ROLE {fixer} LOGIN;
        GRANT CONNECT ON DATABASE "{database}" TO {reader}, {fixer};
        GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader}, {fixer};
        GRANT UPDATE ON procrastinate_jobs TO {fixer};
        GRANT INSERT ON procrastinate_events TO {fixer};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {fixer};
        """
    )
    try:
        metrics_dsn = with_database(admin_dsn.replace("postgres@", f"{reader}@", 1), database)
        recovery_dsn = with_database(admin_dsn.replace("postgres@", f"{fixer}@", 1), database)
        reader_conn = await asyncpg.connect(metrics_dsn)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader_conn.execute("UPDATE procrastinate_jobs SET attempts = attempts")
        await reader_conn.close()
        poller = recovering_poller(metrics_dsn, dsn=recovery_dsn)
        t0 = 1_000_000.0
        await step(poller, t0)
        assert await step(poller, t0 + HOLD) == "recovered"
        assert await db.fetchval("SELECT status::text FROM procrastinate_jobs") == "todo"
        await poller.close()
    finally:
        await db.execute(f"DROP OWNED BY {reader}, {fixer}; DROP ROLE {reader}; DROP ROLE {fixer}")


async def test_restart_during_a_recovery_run_loses_nothing(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    dsn = own_server.dsn()
    db = await asyncpg.connect(dsn)
    try:
        await kill_mid_job(db, dsn, 3, tmp_path)
    finally:
        await db.close()
    config = make_config(
        {
            "name": "app",
            "dsn": dsn,
            "preset": "procrastinate",
            "stale_after": "1s",
            "lock_timeout": "60s",
            "statement_timeout": "60s",
            "recovery": {"enabled": True, "dry_run": False, "hold_for": f"{HOLD:g}s"},
        }
    )
    poller = TargetPoller(config, config.targets[0])
    t0 = 1_000_000.0
    await step(poller, t0)
    await poller.poll_once()
    blocker = await asyncpg.connect(dsn)
    await blocker.execute("BEGIN; LOCK TABLE procrastinate_jobs IN SHARE MODE")
    run = asyncio.create_task(poller.recoverer.after_poll(poller._stale_jobs, now=t0 + HOLD))
    # the reset is now waiting on the lock inside its transaction; restart the server under it
    checker = await asyncpg.connect(dsn)
    await wait_for(
        lambda: checker.fetchval(
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND application_name = 'jobqueue-exporter/app/recovery'"
        ),
        message="recovery waiting on the lock",
    )
    await checker.close()
    await asyncio.to_thread(own_server.restart)
    assert await run == "error"
    blocker.terminate()
    db = await asyncpg.connect(dsn)
    try:
        rows = await job_rows(db)
        assert all(row == ("doing", 0) for row in rows.values()), "nothing half-done"
        # polling resumes; the first poll may find its old connection gone (which restarts the hold
        # window), so exactly one of the next two hold steps resets the jobs, once
        results = []
        for at in (t0 + 200, t0 + 200 + HOLD):
            try:
                await poller.poll_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await poller.recoverer.after_poll(None)
                await poller.poll_once()
            results.append(await poller.recoverer.after_poll(poller._stale_jobs, now=at))
        assert results.count("recovered") == 1, results
        rows = await job_rows(db)
        assert all(row == ("todo", 1) for row in rows.values()), rows
    finally:
        await db.close()
        await poller.close()


def test_recovery_config_rules() -> None:
    base = {"name": "p", "dsn": "postgresql://x@127.0.0.1/x"}
    with pytest.raises(
        ConfigError, match=r"publaryn rescues stale jobs itself .*override_builtin_rescue"
    ):
        load_config_data(
            {"targets": [{**base, "preset": "publaryn", "recovery": {"enabled": True}}]}
        )
    with pytest.raises(ConfigError, match=r"stale_after: .*at least 60s"):
        load_config_data(
            {
                "targets": [
                    {
                        **base,
                        "preset": "publaryn",
                        "stale_after": "10s",
                        "recovery": {"enabled": True, "override_builtin_rescue": True},
                    }
                ]
            }
        )
    table = {
        "name": "jobs",
        "state": {"column": "status", "pending": ["pending"], "running": ["running"]},
        "timestamps": {"eligible": "run_at", "started": "locked_at"},
    }
    with pytest.raises(ConfigError, match=r"recovery.reset_state: required for a table mapping"):
        load_config_data({"targets": [{**base, "table": table, "recovery": {"enabled": True}}]})
    with pytest.raises(ConfigError, match=r"'running' is not a waiting state"):
        load_config_data(
            {
                "targets": [
                    {
                        **base,
                        "table": table,
                        "recovery": {"enabled": True, "reset_state": "running"},
                    }
                ]
            }
        )
    config = load_config_data(
        {"targets": [{**base, "preset": "procrastinate", "recovery": {"enabled": True}}]}
    )
    recovery = config.targets[0].recovery
    assert recovery.dry_run is True and recovery.hold_for == 120


async def test_publaryn_override_resets_like_its_own_sweep(
    dsn: str, db: asyncpg.Connection
) -> None:
    from test_publaryn import SCHEMA, claim, enqueue

    await db.execute(SCHEMA)
    await enqueue(db, "scan_artifact", 2)
    worker_clock = await db.fetchval("SELECT now() - interval '10 minutes'")
    await db.execute("UPDATE background_jobs SET scheduled_at = $1", worker_clock)
    await claim(db, "dead-worker", 2, now=worker_clock)  # lease ran out 5 minutes ago
    config = make_config(
        {
            "name": "pub",
            "dsn": dsn,
            "preset": "publaryn",
            "stale_after": "60s",
            "recovery": {
                "enabled": True,
                "dry_run": False,
                "override_builtin_rescue": True,
                "hold_for": "60s",
            },
        }
    )
    poller = TargetPoller(config, config.targets[0])
    await step(poller, 0.0)
    assert await step(poller, HOLD) == "recovered"
    rows = await db.fetch(
        "SELECT status::text, locked_by, locked_until, started_at, attempts FROM background_jobs"
    )
    assert [tuple(r) for r in rows] == [("pending", None, None, None, 1)] * 2, (
        "attempts kept, as its sweep"
    )


async def test_generic_mapping_resets_to_the_configured_state(
    dsn: str, db: asyncpg.Connection
) -> None:
    from test_generic import RUST, RUST_TABLE

    await db.execute(RUST)
    await db.execute(
        "INSERT INTO jobs (job_type, status, attempts, locked_at, locked_by) VALUES "
        "('transcode', 'running', 1, now() - interval '10 minutes', 'w1'),"
        "('transcode', 'running', 1, now(), 'w2')"
    )
    config = make_config(
        {
            "name": "rust",
            "dsn": dsn,
            "table": RUST_TABLE,
            "stale_after": "5m",
            "recovery": {
                "enabled": True,
                "dry_run": False,
                "hold_for": "60s",
                "reset_state": "pending",
                "clear_columns": ["locked_at", "locked_by"],
            },
        }
    )
    poller = TargetPoller(config, config.targets[0])
    await step(poller, 0.0)
    assert await step(poller, HOLD) == "recovered"
    rows = {
        r["locked_by"] or "reset": r["status"]
        for r in await db.fetch("SELECT status::text, locked_by FROM jobs")
    }
    assert rows == {"reset": "pending", "w2": "running"}
    assert await db.fetchval(
        "SELECT run_at > now() - interval '1 minute' FROM jobs WHERE locked_by IS NULL"
    )


async def test_running_jobs_sharing_a_queueing_lock_go_back_one_at_a_time(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Procrastinate allows one waiting job per queueing_lock: resetting both would break its index."""
    app = await apply_schema(dsn)
    worker = start_worker_process(dsn, "gated", concurrency=2)
    try:
        async with app.open_async():
            for n in range(2):
                await (
                    app.tasks["gate"]
                    .configure(queueing_lock="report-42")
                    .defer_async(path=str(tmp_path / f"gate-{n}"))
                )
                await wait_for(
                    lambda n=n: db.fetchval(
                        "SELECT count(*) = $1 FROM procrastinate_jobs WHERE status = 'doing'", n + 1
                    ),
                    message="job picked up before the next one is deferred",
                )
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    await wait_for(
        lambda: db.fetchval(
            "SELECT bool_and(last_heartbeat < now() - interval '1 second') FROM procrastinate_workers"
        ),
        message="stale",
    )
    poller = recovering_poller(dsn)
    t0 = 1_000_000.0
    await step(poller, t0)
    assert await step(poller, t0 + HOLD) == "recovered"
    first, second = await db.fetch("SELECT status::text FROM procrastinate_jobs ORDER BY id")
    assert (first["status"], second["status"]) == ("todo", "doing")
    assert await step(poller, t0 + HOLD + 10) == "nothing", "waits until the first one ran"
