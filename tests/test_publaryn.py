"""The publaryn preset against Publaryn's `background_jobs` schema, driven by its workers' own statements.

Publaryn is a Rust application (not installable here), so the schema is its migration
(migrations/010_background_jobs.sql + 023) and the workload runs the SQL of crates/workers/src/queue.rs.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter

import asyncpg
from helpers import make_config, scrape, series, value
from jobqueue_exporter.poll import TargetPoller

SCHEMA = """
CREATE TYPE job_status AS ENUM ('pending', 'running', 'completed', 'failed', 'dead');
CREATE TYPE job_kind AS ENUM ('scan_artifact', 'index_package', 'deliver_webhook',
                              'cleanup_expired_tokens', 'reindex_search');
ALTER TYPE job_kind ADD VALUE IF NOT EXISTS 'cleanup_oci_blobs';
CREATE TABLE background_jobs (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    kind            job_kind    NOT NULL,
    payload         JSONB       NOT NULL DEFAULT '{}',
    status          job_status  NOT NULL DEFAULT 'pending',
    attempts        INT         NOT NULL DEFAULT 0,
    max_attempts    INT         NOT NULL DEFAULT 5,
    last_error      TEXT,
    scheduled_at    TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    locked_until    TIMESTAMPTZ,
    locked_by       TEXT,
    started_at      TIMESTAMPTZ,
    completed_at    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_background_jobs_claimable ON background_jobs (scheduled_at) WHERE status = 'pending';
CREATE INDEX idx_background_jobs_kind ON background_jobs (kind);
CREATE INDEX idx_background_jobs_stale ON background_jobs (locked_until) WHERE status = 'running';
"""

# crates/workers/src/queue.rs, with the worker's clock passed as $1
CLAIM = """
UPDATE background_jobs SET status = 'running', attempts = attempts + 1,
       locked_until = $1::timestamptz + interval '300 seconds', locked_by = $2, started_at = $1
WHERE id IN (SELECT id FROM background_jobs WHERE status = 'pending' AND scheduled_at <= $1
             ORDER BY scheduled_at FOR UPDATE SKIP LOCKED LIMIT $3)
RETURNING id, attempts, max_attempts
"""
COMPLETE = """UPDATE background_jobs SET status = 'completed', completed_at = NOW(),
              locked_until = NULL, locked_by = NULL WHERE id = $1"""
FAIL = """
UPDATE background_jobs
SET status = CASE WHEN attempts >= max_attempts THEN 'dead'::job_status ELSE 'pending'::job_status END,
    last_error = $2,
    completed_at = CASE WHEN attempts >= max_attempts THEN NOW() END,
    scheduled_at = CASE WHEN attempts >= max_attempts THEN scheduled_at
                        ELSE NOW() + power(2, attempts) * interval '10 seconds' END,
    locked_until = NULL, locked_by = NULL
WHERE id = $1
"""


async def enqueue(db: asyncpg.Connection, kind: str, n: int = 1, **columns) -> None:
    names = ", ".join(["kind", *columns])
    params = ", ".join(f"${i + 2}" for i in range(len(columns)))
    for _ in range(n):
        await db.execute(
            f"INSERT INTO background_jobs ({names}) VALUES ($1{', ' if columns else ''}{params})",
            kind,
            *columns.values(),
        )


async def claim(db: asyncpg.Connection, worker: str, batch: int, now: dt.datetime | None = None):
    now = now or await db.fetchval("SELECT now()")
    return await db.fetch(CLAIM, now, worker, batch)


async def truth(db: asyncpg.Connection) -> Counter:
    now = await db.fetchval("SELECT now()")
    counts: Counter = Counter()
    for row in await db.fetch("SELECT * FROM background_jobs"):
        kind, status = row["kind"], row["status"]
        if status == "pending":
            if row["scheduled_at"] <= now:
                state = "pending"
            elif row["attempts"] > 0 or row["last_error"] is not None:
                state = "retrying"
            else:
                state = "scheduled"
        elif status == "running":
            state = "running"
            if row["locked_until"] < now:
                counts[(kind, "stale")] += 1
        else:
            state = status
        counts[(kind, state)] += 1
    return counts


def poller_for(dsn: str, **target) -> TargetPoller:
    config = make_config({"name": "publaryn", "dsn": dsn, "preset": "publaryn", **target})
    return TargetPoller(config, config.targets[0])


async def test_states_stale_leases_and_ages(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(SCHEMA)
    await enqueue(db, "scan_artifact", 6)
    await enqueue(db, "deliver_webhook", 2)
    await enqueue(
        db,
        "reindex_search",
        1,
        scheduled_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
    )
    jobs = await claim(db, "worker-a", 5)
    await db.execute(COMPLETE, jobs[0]["id"])
    await db.execute(FAIL, jobs[1]["id"], "boom")  # back to pending, retry in 20 s -> retrying
    # a worker whose clock ran 10 minutes behind took a job: its lease is already over -> stale
    twenty_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=20)
    await enqueue(db, "cleanup_oci_blobs", 1, scheduled_at=twenty_ago)
    old = await db.fetchval("SELECT now() - interval '10 minutes'")
    await claim(db, "worker-b", 1, now=old)
    # a job due an hour ago is still waiting
    await enqueue(
        db,
        "index_package",
        1,
        scheduled_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1),
    )

    poller = poller_for(dsn)
    await poller.poll_once()
    samples = scrape(poller)
    expected = await truth(db)
    assert sum(v for (_, state), v in expected.items() if state == "running") == 4
    assert expected[("cleanup_oci_blobs", "stale")] == 1
    for (kind, state), count in expected.items():
        if state == "stale":
            assert value(samples, "jobqueue_stale_jobs", queue="default", kind=kind) == count
        elif state in ("pending", "scheduled", "running", "retrying"):
            assert value(samples, "jobqueue_jobs", queue="default", kind=kind, state=state) == count
    assert value(samples, "jobqueue_jobs", kind="reindex_search", state="scheduled") == 1
    age = value(samples, "jobqueue_oldest_pending_age_seconds", kind="index_package")
    assert 3600 <= age < 3600 + 120
    assert value(samples, "jobqueue_oldest_running_age_seconds", kind="scan_artifact") >= 0
    assert series(samples, "jobqueue_jobs", state="succeeded") == {}, (
        "history is never counted as a gauge"
    )

    # the workers' own sweep (recover_stale_jobs) resets it; the stale count follows
    await db.execute(
        "UPDATE background_jobs SET status='pending', locked_until=NULL, locked_by=NULL, started_at=NULL, "
        "scheduled_at=NOW() WHERE status='running' AND locked_until < NOW()"
    )
    await poller.poll_once()
    samples = scrape(poller)
    assert sum(series(samples, "jobqueue_stale_jobs").values()) == 0


async def test_finished_counting_needs_an_index(dsn: str, db: asyncpg.Connection, caplog) -> None:
    await db.execute(SCHEMA)
    poller = poller_for(dsn)
    with caplog.at_level(logging.WARNING):
        await poller.poll_once()
    assert "CREATE INDEX CONCURRENTLY ON background_jobs (completed_at)" in caplog.text
    assert series(scrape(poller), "jobqueue_jobs_finished_total") == {}


async def test_finished_counters_and_ratio_with_index(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(SCHEMA)
    await db.execute("CREATE INDEX ON background_jobs (completed_at)")
    await enqueue(db, "scan_artifact", 4)
    for job in await claim(db, "w", 4):
        await db.execute(COMPLETE, job["id"])
    poller = poller_for(dsn)
    await poller.poll_once()
    samples = scrape(poller)
    assert value(samples, "jobqueue_success_ratio", kind="scan_artifact") == 1.0, (
        "window filled at start"
    )
    assert (
        value(samples, "jobqueue_jobs_finished_total", kind="scan_artifact", outcome="succeeded")
        == 0
    )

    await enqueue(db, "scan_artifact", 3)
    await enqueue(db, "deliver_webhook", 1, max_attempts=1)
    jobs = await claim(db, "w", 10)
    webhook = [j for j in jobs if j["max_attempts"] == 1][0]
    others = [j for j in jobs if j["max_attempts"] != 1]
    # finishes commit out of order: the first completion's transaction commits last
    late = await asyncpg.connect(dsn)
    try:
        tx = late.transaction()
        await tx.start()
        await late.execute(COMPLETE, others[0]["id"])
        for job in others[1:]:
            await db.execute(COMPLETE, job["id"])
        await db.execute(FAIL, webhook["id"], "410 Gone")  # attempts 1 >= max 1 -> dead
        await poller.poll_once()
        await tx.commit()
    finally:
        await late.close()
    for _ in range(2):
        await poller.poll_once()
    samples = scrape(poller)
    assert (
        value(samples, "jobqueue_jobs_finished_total", kind="scan_artifact", outcome="succeeded")
        == 3
    )
    assert (
        value(samples, "jobqueue_jobs_finished_total", kind="deliver_webhook", outcome="dead") == 1
    )
    assert value(samples, "jobqueue_success_ratio", kind="deliver_webhook") == 0.0
    assert value(samples, "jobqueue_success_ratio", kind="scan_artifact") == 1.0
    # Publaryn's cleanup deletes old completed/dead rows; the counters keep their values
    await db.execute("DELETE FROM background_jobs WHERE status IN ('completed', 'dead')")
    await poller.poll_once()
    samples = scrape(poller)
    assert (
        value(samples, "jobqueue_jobs_finished_total", kind="scan_artifact", outcome="succeeded")
        == 3
    )
