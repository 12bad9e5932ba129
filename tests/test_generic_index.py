"""Finished-job counting through an index on (queue, finish time) (issue 9): pg-boss ships exactly that,
and no index leading with the finish column. ``finished_counting: auto`` accepts it and reads each queue's
tail through it (a skip scan over the queues), with the same exactly-once counts as the plain tail."""

from __future__ import annotations

import json

import asyncpg
from helpers import make_config, scrape, series, value
from jobqueue_exporter.poll import TargetPoller

SCHEMA = """
CREATE TABLE job (
    id bigserial PRIMARY KEY, name text, state text NOT NULL, created_on timestamptz NOT NULL DEFAULT now(),
    started_on timestamptz, completed_on timestamptz);
CREATE INDEX job_name_completed ON job (name, completed_on);
"""

TABLE = {
    "name": "job",
    "queue": "name",
    "state": {
        "column": "state",
        "pending": ["created"],
        "running": ["active"],
        "succeeded": ["completed"],
        "failed": ["failed"],
    },
    "timestamps": {"enqueued": "created_on", "started": "started_on", "finished": "completed_on"},
}


def poller(dsn: str, **target) -> TargetPoller:
    config = make_config({"name": "boss", "dsn": dsn, "table": TABLE, **target})
    return TargetPoller(config, config.targets[0])


async def finish(db: asyncpg.Connection, queue: str | None, state: str, n: int) -> None:
    await db.execute(
        "INSERT INTO job (name, state, completed_on) SELECT $1, $2, now() FROM generate_series(1, $3)",
        queue,
        state,
        n,
    )


def finished(samples: dict, queue: str, outcome: str) -> float:
    return value(
        samples, "jobqueue_jobs_finished_total", queue=queue, kind="default", outcome=outcome
    )


async def test_an_index_on_queue_then_finish_time_is_used_per_queue(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(SCHEMA)
    # history: 20k old finished jobs in many queues, which a poll must not read
    await db.execute(
        "INSERT INTO job (name, state, completed_on) SELECT 'q' || (n % 50), 'completed',"
        " now() - interval '2 days' FROM generate_series(1, 20000) AS n"
    )
    await finish(db, "mail", "completed", 3)
    await db.execute("ANALYZE job")
    p = poller(dsn)
    await p.poll_once()
    assert p.state.finished_counting, "auto accepts the (queue, finished) index"
    assert "WITH RECURSIVE queues" in p.source.preset.finished_tail.sql
    samples = scrape(p)
    assert value(samples, "jobqueue_success_ratio", queue="mail", kind="default") == 1.0

    await finish(db, "mail", "completed", 5)
    await finish(db, "mail", "failed", 2)
    await finish(db, "reports", "completed", 4)
    await finish(db, None, "completed", 1)
    await p.poll_once()
    samples = scrape(p)
    assert finished(samples, "mail", "succeeded") == 5
    assert finished(samples, "mail", "failed") == 2
    assert finished(samples, "reports", "succeeded") == 4
    assert finished(samples, "__null__", "succeeded") == 1
    await p.poll_once()
    assert finished(scrape(p), "mail", "succeeded") == 5, "counted once"

    statement = p.source.preset.finished_tail
    floor = await db.fetchval("SELECT now() - interval '1 minute'")
    plan = await db.fetchval(
        "EXPLAIN (FORMAT JSON, ANALYZE, BUFFERS) " + statement.sql,
        floor,
        100_000,
        *statement.params,
    )
    plan = json.loads(plan)
    text = json.dumps(plan)
    assert "job_name_completed" in text and '"Seq Scan"' not in text, "index only, no scan"
    rows = plan[0]["Plan"]
    assert rows["Actual Rows"] == 15, "exactly the 15 jobs finished in the last minute"


async def test_without_a_usable_index_auto_stays_off(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(
        SCHEMA.replace("(name, completed_on)", "(completed_on, name)").replace(
            "job_name_completed", "job_completed"
        )
    )
    p = poller(dsn)
    await p.poll_once()
    assert p.state.finished_counting, "an index leading with the finish column is the plain case"
    assert "WITH RECURSIVE" not in p.source.preset.finished_tail.sql
    await db.execute("DROP INDEX job_completed; CREATE INDEX ON job (state, completed_on)")
    p = poller(dsn)
    await p.poll_once()
    assert not p.state.finished_counting
    assert not series(scrape(p), "jobqueue_jobs_finished_total")
