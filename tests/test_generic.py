"""The generic table mapping: home-grown queue tables described in YAML, checked against real tables."""

from __future__ import annotations

import asyncpg
import pytest
from helpers import make_config, scrape, series, value
from jobqueue_exporter.config import load_config_data
from jobqueue_exporter.poll import TargetPoller

# StarForge-style table: one status column, `type` as the job kind, `run_after` for retries/schedules
STARFORGE = """
CREATE TABLE queue_jobs (
    id bigserial PRIMARY KEY,
    status text NOT NULL DEFAULT 'pending',
    type text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    run_after timestamptz NOT NULL DEFAULT now(),
    attempts int NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON queue_jobs (status, run_after);
CREATE INDEX ON queue_jobs (updated_at);
"""

STARFORGE_TABLE = {
    "name": "queue_jobs",
    "state": {
        "column": "status",
        "pending": ["pending"],
        "running": ["running"],
        "succeeded": ["completed"],
        "failed": ["failed"],
    },
    "kind": "type",
    "attempts": "attempts",
    "timestamps": {"enqueued": "created_at", "eligible": "run_after", "finished": "updated_at"},
    "stale": {"started_before": "updated_at"},
}

# A SKIP-LOCKED Rust-style queue: explicit `retrying` state, `locked_at` set at claim, queue column
RUST = """
CREATE TYPE job_state AS ENUM ('pending', 'running', 'retrying', 'completed', 'failed');
CREATE TABLE jobs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    queue text NOT NULL DEFAULT 'default',
    job_type text NOT NULL,
    status job_state NOT NULL DEFAULT 'pending',
    attempts int NOT NULL DEFAULT 0,
    max_attempts int NOT NULL DEFAULT 3,
    run_at timestamptz NOT NULL DEFAULT now(),
    locked_at timestamptz,
    locked_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX ON jobs (finished_at);
"""

RUST_TABLE = {
    "name": "jobs",
    "id": "id",
    "state": {
        "column": "status",
        "pending": ["pending"],
        "retrying": ["retrying"],
        "running": ["running"],
        "succeeded": ["completed"],
        "dead": ["failed"],
    },
    "queue": "queue",
    "kind": "job_type",
    "attempts": "attempts",
    "timestamps": {
        "enqueued": "created_at",
        "eligible": "run_at",
        "started": "locked_at",
        "finished": "finished_at",
    },
    "stale": {"started_before": "locked_at"},
}


def poller_for(dsn: str, table: dict, **target) -> TargetPoller:
    config = make_config({"name": "home", "dsn": dsn, "table": table, **target})
    return TargetPoller(config, config.targets[0])


async def test_starforge_queue_jobs(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(STARFORGE)
    await db.execute(
        """
        INSERT INTO queue_jobs (type, status, run_after, attempts, updated_at, created_at) VALUES
          ('send_mail', 'pending', now() - interval '90 seconds', 0, now(), now() - interval '1 hour'),
          ('send_mail', 'pending', now() + interval '1 hour', 0, now(), now()),
          ('send_mail', 'pending', now() + interval '5 minutes', 2, now(), now()),
          ('render', 'running', now(), 1, now() - interval '2 hours', now()),
          ('render', 'running', now(), 1, now(), now()),
          ('render', 'completed', now(), 1, now(), now()),
          ('render', 'failed', now(), 3, now(), now())
        """
    )
    poller = poller_for(dsn, STARFORGE_TABLE, stale_after="30m")
    await poller.poll_once()
    samples = scrape(poller)

    def jobs(kind: str, state: str) -> float:
        return value(samples, "jobqueue_jobs", queue="default", kind=kind, state=state)

    assert (
        jobs("send_mail", "pending"),
        jobs("send_mail", "scheduled"),
        jobs("send_mail", "retrying"),
    ) == (
        1,
        1,
        1,
    )
    assert jobs("render", "running") == 2
    assert value(samples, "jobqueue_stale_jobs", kind="render") == 1
    age = value(samples, "jobqueue_oldest_pending_age_seconds", kind="send_mail")
    assert 90 <= age < 90 + 120, "measured from run_after, not created_at"
    assert value(samples, "jobqueue_oldest_running_age_seconds", kind="render") >= 7200
    assert value(samples, "jobqueue_success_ratio", kind="render") == 0.5

    await db.execute(
        "UPDATE queue_jobs SET status = 'completed', updated_at = now() WHERE status = 'running'"
    )
    await poller.poll_once()
    samples = scrape(poller)
    assert value(samples, "jobqueue_jobs_finished_total", kind="render", outcome="succeeded") == 2
    assert value(samples, "jobqueue_jobs", kind="render", state="running") == 0


async def test_rust_skip_locked_queue(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(RUST)
    await db.execute(
        """
        INSERT INTO jobs (queue, job_type, status, attempts, run_at, locked_at) VALUES
          ('media', 'transcode', 'pending', 0, now(), NULL),
          ('media', 'transcode', 'retrying', 1, now() + interval '1 minute', NULL),
          ('media', 'transcode', 'retrying', 1, now() - interval '1 minute', NULL),
          ('media', 'transcode', 'running', 1, now(), now() - interval '6 minutes'),
          ('mail', 'welcome', 'running', 1, now(), now())
        """
    )
    poller = poller_for(dsn, RUST_TABLE, stale_after="5m")
    await poller.poll_once()
    samples = scrape(poller)
    assert value(samples, "jobqueue_jobs", queue="media", kind="transcode", state="pending") == 2, (
        "a retry whose delay has elapsed is eligible now"
    )
    assert value(samples, "jobqueue_jobs", queue="media", kind="transcode", state="retrying") == 1
    assert value(samples, "jobqueue_stale_jobs", queue="media", kind="transcode") == 1
    assert value(samples, "jobqueue_stale_jobs", queue="mail", kind="welcome") == 0
    await db.execute("UPDATE jobs SET status = 'failed', finished_at = now() WHERE queue = 'mail'")
    await poller.poll_once()
    samples = scrape(poller)
    assert (
        value(samples, "jobqueue_jobs_finished_total", queue="mail", kind="welcome", outcome="dead")
        == 1
    )
    assert value(samples, "jobqueue_success_ratio", queue="mail", kind="welcome") == 0.0


async def test_timestamp_without_time_zone_is_read_as_utc(dsn: str, db: asyncpg.Connection) -> None:
    """Like Oban/GoodJob: naive UTC timestamps, while the session time zone is elsewhere."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE \"{name}\" SET timezone TO 'America/New_York'")
    await db.execute(
        """
        CREATE TABLE naive_jobs (id serial PRIMARY KEY, state text, inserted_at timestamp,
                                 attempted_at timestamp);
        INSERT INTO naive_jobs (state, inserted_at)
          VALUES ('available', timezone('UTC', now()) - interval '10 minutes');
        """
    )
    table = {
        "name": "naive_jobs",
        "state": {"column": "state", "pending": ["available"], "running": ["executing"]},
        "timestamps": {"eligible": "inserted_at", "started": "attempted_at"},
    }
    poller = poller_for(dsn, table)
    await poller.poll_once()
    age = value(scrape(poller), "jobqueue_oldest_pending_age_seconds", kind="default")
    assert 600 <= age < 600 + 120


async def test_missing_column_is_reported_by_name(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(STARFORGE)
    typo = {**STARFORGE_TABLE, "kind": "typ"}
    poller = poller_for(dsn, typo)
    with pytest.raises(Exception, match="has no column 'typ'"):
        await poller.poll_once()
    samples = scrape(poller)
    assert value(samples, "jobqueue_up", target="home") == 0
    assert value(samples, "jobqueue_poll_errors_total", target="home", reason="schema") == 1
    assert series(samples, "jobqueue_jobs") == {}


async def test_missing_table_is_reported(dsn: str) -> None:
    config = load_config_data({"targets": [{"name": "p", "dsn": dsn, "preset": "procrastinate"}]})
    poller = TargetPoller(config, config.targets[0])
    with pytest.raises(Exception, match="table 'procrastinate_jobs' not found"):
        await poller.poll_once()


async def test_state_value_missing_from_enum_is_a_schema_error(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(RUST)
    typo = {**RUST_TABLE, "state": {**RUST_TABLE["state"], "retrying": ["retryng"]}}
    poller = poller_for(dsn, typo)
    with pytest.raises(
        Exception, match=r"'retryng' are not labels of enum job_state \(labels: pending"
    ):
        await poller.poll_once()
    assert poller.state.errors["schema"] == 1
