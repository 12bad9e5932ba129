"""One contract for every preset of every source: what a reading holds (row shapes and the states and
outcomes it may report), what the source declares it can do, and that a declared verb works while an
undeclared one is refused. Each preset runs on its queue system's real schema with real jobs in every
state it knows (Procrastinate through its own library and worker)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import get_args

import asyncpg
import pytest
import redis
from helpers import make_config, wait_for
from jobqueue_exporter.sources import (
    Finished,
    LiveRow,
    LiveState,
    NoOperatorVerbs,
    Outcome,
    Reading,
    TerminalRow,
    TerminalState,
    open_operator_session,
    open_source,
)
from procrastinate_app import apply_schema
from test_generic import RUST, RUST_TABLE
from test_publaryn import COMPLETE, FAIL, SCHEMA, claim, enqueue

Setup = Callable[[str, asyncpg.Connection], Awaitable[dict]]


async def procrastinate_jobs(dsn: str, db: asyncpg.Connection) -> dict:
    app = await apply_schema(dsn)
    async with app.open_async():
        for n in range(3):
            await app.tasks["ok"].defer_async(n=n)
        await app.tasks["fail"].defer_async(n=1)
        await app.tasks["retry_later"].defer_async()
        await app.run_worker_async(queues=["default"], wait=False, install_signal_handlers=False)
        await app.tasks["ok"].defer_async(n=9)
        await app.tasks["ok"].configure(schedule_in={"hours": 1}).defer_async()
    return {"preset": "procrastinate"}


async def publaryn_jobs(dsn: str, db: asyncpg.Connection) -> dict:
    await db.execute(SCHEMA)
    # the index the README asks Publaryn users to add, so finished jobs are counted cheaply
    await db.execute("CREATE INDEX ON background_jobs (completed_at)")
    await enqueue(db, "scan_artifact", 4)
    jobs = await claim(db, "worker-a", 3)
    await db.execute(COMPLETE, jobs[0]["id"])
    await db.execute(FAIL, jobs[1]["id"], "boom")  # retried later
    await db.execute("UPDATE background_jobs SET max_attempts = 1 WHERE id = $1", jobs[2]["id"])
    await db.execute(FAIL, jobs[2]["id"], "boom")  # out of attempts: dead
    return {"preset": "publaryn"}


async def generic_jobs(dsn: str, db: asyncpg.Connection) -> dict:
    await db.execute(RUST)
    await db.execute(
        """
        INSERT INTO jobs (queue, job_type, status, attempts, run_at, locked_at, finished_at) VALUES
          ('media', 'transcode', 'pending', 0, now(), NULL, NULL),
          ('media', 'transcode', 'retrying', 1, now() + interval '1 minute', NULL, NULL),
          ('media', 'transcode', 'running', 1, now(), now() - interval '6 minutes', NULL),
          ('mail', 'welcome', 'completed', 1, now(), now(), now()),
          ('mail', 'welcome', 'failed', 3, now(), now(), now())
        """
    )
    return {"table": RUST_TABLE, "recovery": {"reset_state": "pending"}}


PRESETS: dict[str, Setup] = {
    "procrastinate": procrastinate_jobs,
    "publaryn": publaryn_jobs,
    "generic": generic_jobs,
}


def check_reading(reading: Reading, outcomes: tuple[str, ...]) -> None:
    live_states, terminal_states = set(get_args(LiveState)), set(get_args(TerminalState))
    for row in reading.live:
        assert isinstance(row, LiveRow)
        assert row.state in live_states, row
        assert isinstance(row.jobs, int) and row.jobs > 0, row
        assert 0 <= row.stale_jobs <= row.jobs, row
        assert row.stale_jobs == 0 or row.state == "running", "only running jobs are stale"
        if row.oldest_age_seconds is not None:
            assert row.state in ("pending", "running") and row.oldest_age_seconds >= 0, row
        assert row.queue is None or isinstance(row.queue, str)
        assert row.kind is None or isinstance(row.kind, str)
    for row in reading.terminal or ():
        assert isinstance(row, TerminalRow) and row.state in terminal_states and row.jobs > 0
    for event in (*reading.finished, *reading.backfill):
        assert isinstance(event, Finished) and event.outcome in outcomes and event.jobs > 0
        assert abs(event.at - time.time()) < 3600, "finish times on this host's clock"


@pytest.mark.parametrize("name", list(PRESETS))
async def test_every_preset_keeps_the_source_contract(
    name: str, dsn: str, db: asyncpg.Connection
) -> None:
    target = {
        "name": name,
        "dsn": dsn,
        "count_terminal_states": True,
        **await PRESETS[name](dsn, db),
    }
    config = make_config(target)
    source = open_source(config.targets[0], connect_timeout=10)
    try:
        assert not source.connected
        first = await source.read(stale_after=60.0, want_stale=True)
        capabilities = source.capabilities
        assert set(capabilities.outcomes) <= set(get_args(Outcome))
        assert capabilities.preset == name
        assert capabilities.default_stale_after >= 0
        assert capabilities.finished_counting, "every shipped preset counts finished jobs cheaply"
        check_reading(first, capabilities.outcomes)
        assert first.live, "the jobs left waiting or running are read"
        assert first.terminal is not None and first.terminal, "terminal states when asked"
        assert first.finished == [], "the first reading only backfills the window"
        assert first.stale is not None
        assert {(job.queue, job.kind) for job in first.stale} <= {
            (row.queue, row.kind) for row in first.live if row.state == "running"
        }
        assert sum(r.stale_jobs for r in first.live) == len(first.stale), (
            "the gauge and the recovery candidates come from the same rule"
        )
        second = await source.read(stale_after=60.0, want_stale=False)
        check_reading(second, capabilities.outcomes)
        assert second.stale is None, "stale jobs only when asked"
        assert source.connected, "one connection, kept between reads"
    finally:
        await source.close()
    assert not source.connected

    async with open_operator_session(config.targets[0]) as (actions, stale_after):
        verbs = actions.verbs
        assert verbs.list_jobs and verbs.job and verbs.stale_jobs
        async with actions.consistent_read():
            rows = await actions.list_jobs(
                stale_after, ["pending", "running", "failed", "dead"], None, None, 50
            )
            counted = await actions.count_jobs(
                stale_after, ["pending", "running", "failed", "dead"], None, None
            )
        assert counted is not None and counted[0] == len(rows), (
            "counts cover what the listing lists"
        )
        names = {f.name for f in fields(rows[0])}
        assert names == {
            "id",
            "queue",
            "kind",
            "state",
            "native_state",
            "attempts",
            "last_error",
            "lock_owner",
            "is_stale",
            "can_retry",
        }
        for row in rows:
            assert (await actions.job(stale_after, row.id)) == row
        assert await actions.job(stale_after, "no-such-id") is None
        if verbs.retry:
            retryable = [row.id for row in rows if row.can_retry]
            changed = await actions.retry(None, None, None, 100, commit=False)
            assert sorted(r["id"] for r in changed) == sorted(retryable), (
                "a dry run shows exactly these"
            )


# -- Redis presets: the same reading contract, on their real libraries; no operator verbs yet ------


async def asynq_jobs(url: str, db: int, tmp_path) -> dict:
    from asynq_app import enqueue, start_worker

    enqueue(url, db, "default", "ok", 2)
    enqueue(url, db, "default", "fail", 1, retry=0)
    enqueue(url, db, "default", "ok", 1, in_="1h")
    gate = tmp_path / "gate"
    enqueue(url, db, "default", "block", 1, payload=str(gate))
    worker = start_worker(url, db, ["default"])
    admin = redis.Redis.from_url(url)
    try:
        await wait_for(
            lambda: (
                admin.zcard("asynq:{default}:archived") == 1
                and admin.llen("asynq:{default}:active") == 1
            ),
            timeout=60,
        )
    finally:
        worker.kill()
        worker.wait(10)
        admin.close()
    enqueue(url, db, "default", "ok", 1)
    return {"preset": "asynq"}


async def bullmq_jobs(url: str, db: int, tmp_path) -> dict:
    from bullmq_driver import add, start_worker

    add(url, "mail", "ok", 2)
    add(url, "mail", "fail", 1, attempts=1)
    add(url, "mail", "ok", 1, delay=3_600_000)
    add(url, "mail", "block", 1, data={"gate": str(tmp_path / "gate")})
    worker = start_worker(url, "mail", lock_ms=2000)
    admin = redis.Redis.from_url(url)
    try:
        await wait_for(
            lambda: admin.zcard("bull:mail:failed") == 1 and admin.llen("bull:mail:active") == 1,
            timeout=60,
        )
    finally:
        worker.kill()
        worker.wait(10)
        admin.close()
    add(url, "mail", "ok", 1)
    return {"preset": "bullmq", "queues": ["mail"]}


REDIS_PRESETS = {"asynq": asynq_jobs, "bullmq": bullmq_jobs}


@pytest.mark.redis
@pytest.mark.parametrize("name", list(REDIS_PRESETS))
async def test_every_redis_preset_keeps_the_source_contract(
    name: str, redis_db: tuple[str, int], redis_reader_url, tmp_path
) -> None:
    url, db = redis_db
    target = {
        "name": name,
        "dsn": redis_reader_url(name),
        "count_terminal_states": True,
        **await REDIS_PRESETS[name](url, db, tmp_path),
    }
    config = make_config(target)
    source = open_source(config.targets[0], connect_timeout=10)
    try:
        first = await source.read(stale_after=0.0, want_stale=True)
        capabilities = source.capabilities
        assert set(capabilities.outcomes) <= set(get_args(Outcome))
        assert capabilities.preset == name
        check_reading(first, capabilities.outcomes)
        assert {row.state for row in first.live} >= {"pending", "scheduled", "running"}
        assert first.terminal, "terminal states when asked"
        assert first.finished == [], "the first reading is the baseline"
        assert first.stale is not None
        assert sum(r.stale_jobs for r in first.live) == len(first.stale)
        assert first.paused is not None and set(first.paused) >= set(config.targets[0].queues or [])
        second = await source.read(stale_after=0.0, want_stale=False)
        check_reading(second, capabilities.outcomes)
        assert second.stale is None
        assert source.connected
    finally:
        await source.close()
    with pytest.raises(NoOperatorVerbs, match="not available for Redis targets yet"):
        open_operator_session(config.targets[0])
