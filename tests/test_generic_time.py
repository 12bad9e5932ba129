"""Time columns of a generic mapping (issue 9): timestamptz, timestamp as UTC, and epoch seconds or
milliseconds in number columns (BullMQ's PostgreSQL backend stores bigint milliseconds), read right,
compared on the raw column so its index is used, and written back in the column's own unit."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
import yaml
from helpers import make_config, scrape, value
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.sources import SchemaProblem
from test_operate import cli_json

MS_TABLE = """
CREATE TABLE bull_jobs (
    id bigserial PRIMARY KEY, queue text NOT NULL, name text NOT NULL, state text NOT NULL,
    attempts_made int NOT NULL DEFAULT 0,
    created_on bigint NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::bigint,
    process_on bigint, processed_on bigint, finished_on bigint);
CREATE INDEX bull_jobs_finished ON bull_jobs (finished_on);
"""


def mapping(unit: str | None = "milliseconds", factor: int = 1000) -> dict:
    timestamps = {
        "enqueued": "created_on",
        "eligible": "process_on",
        "started": "processed_on",
        "finished": "finished_on",
    }
    if unit:
        timestamps["epoch_unit"] = unit
    return {
        "name": "bull_jobs",
        "queue": "queue",
        "kind": "name",
        "attempts": "attempts_made",
        "state": {
            "column": "state",
            "pending": ["waiting"],
            "scheduled": ["delayed"],
            "running": ["active"],
            "succeeded": ["completed"],
            "failed": ["failed"],
        },
        "timestamps": timestamps,
        "stale": {"started_before": "processed_on"},
    }


def target(dsn: str, table: dict) -> dict:
    return {
        "name": "bull",
        "dsn": dsn,
        "table": table,
        "stale_after": "10m",
        "recovery": {"reset_state": "waiting"},
    }


def poller(dsn: str, table: dict) -> TargetPoller:
    config = make_config(target(dsn, table))
    return TargetPoller(config, config.targets[0])


def ms_ago(seconds: float) -> str:
    return f"((extract(epoch FROM now()) - {seconds}) * 1000)::bigint"


async def test_epoch_millisecond_columns(dsn: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    await db.execute(MS_TABLE)
    await db.execute(
        f"""
        INSERT INTO bull_jobs (queue, name, state, process_on, processed_on, created_on) VALUES
          ('mail', 'send', 'waiting', {ms_ago(125)}, NULL, {ms_ago(3600)}),
          ('mail', 'send', 'delayed', {ms_ago(-600)}, NULL, {ms_ago(10)}),
          ('mail', 'send', 'active', {ms_ago(0)}, {ms_ago(1800)}, {ms_ago(1900)}),
          ('mail', 'send', 'active', {ms_ago(0)}, {ms_ago(5)}, {ms_ago(6)})
        """
    )
    await db.execute(
        f"INSERT INTO bull_jobs (queue, name, state, finished_on)"
        f" SELECT 'mail', 'send', 'completed', {ms_ago(40 * 86400)} FROM generate_series(1, 5)"
    )
    p = poller(dsn, mapping())
    await p.poll_once()
    assert p.state.finished_counting, "the bigint index on finished_on is found and used"
    samples = scrape(p)
    age = value(samples, "jobqueue_oldest_pending_age_seconds", queue="mail", kind="send")
    assert 125 <= age < 125 + 60, "from the due time in milliseconds"
    running_age = value(samples, "jobqueue_oldest_running_age_seconds", queue="mail", kind="send")
    assert 1800 <= running_age < 1800 + 60
    assert value(samples, "jobqueue_stale_jobs", queue="mail", kind="send") == 1
    assert value(samples, "jobqueue_jobs", queue="mail", kind="send", state="scheduled") == 1

    await db.execute(
        f"UPDATE bull_jobs SET state = 'completed', finished_on = {ms_ago(0)}"
        " WHERE state = 'active' AND processed_on > " + ms_ago(60)
    )
    await p.poll_once()
    samples = scrape(p)
    finished = value(
        samples, "jobqueue_jobs_finished_total", queue="mail", kind="send", outcome="succeeded"
    )
    assert finished == 1, "the job finished now, not the 40-day-old ones"

    plan = await db.fetchval(
        "EXPLAIN (FORMAT JSON) " + p.source.preset.finished_tail.sql,
        await db.fetchval("SELECT now() - interval '1 minute'"),
        100,
        *p.source.preset.finished_tail.params,
    )
    assert "bull_jobs_finished" in json.dumps(plan), "the tail compares the raw bigint column"

    # the operator commands write milliseconds back, and purge compares them
    config = tmp_path / "jobqueue.yaml"
    config.write_text(yaml.safe_dump({"targets": [target(dsn, mapping())]}))
    base = ("--config", str(config), "--target", "bull")
    out, _ = await cli_json("recover-stale", *base, "--yes")
    assert len(out["jobs"]) == 1, out
    due = await db.fetchval(
        "SELECT abs(process_on - extract(epoch FROM now()) * 1000) FROM bull_jobs"
        " WHERE id = $1::text::bigint",
        out["jobs"][0]["id"],
    )
    assert due < 60_000, "eligible set to now, in milliseconds"
    out, _ = await cli_json("purge", *base, "--older-than", "30d")
    assert out["jobs_total"] == 5, "the 40-day-old jobs, not the one finished now"


async def test_epoch_seconds_as_numeric(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(
        "CREATE TABLE s (id serial PRIMARY KEY, status text NOT NULL, due numeric, began double precision);"
        "INSERT INTO s (status, due) VALUES ('ready', extract(epoch FROM now()) - 300.5)"
    )
    table = {
        "name": "s",
        "state": {"column": "status", "pending": ["ready"], "running": ["busy"]},
        "timestamps": {"eligible": "due", "started": "began", "epoch_unit": "seconds"},
    }
    p = poller(dsn, table)
    await p.poll_once()
    age = value(scrape(p), "jobqueue_oldest_pending_age_seconds", kind="default")
    assert 300 <= age < 300 + 60


async def test_a_number_column_without_epoch_unit_names_the_fix(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(MS_TABLE)
    with pytest.raises(SchemaProblem) as raised:
        await poller(dsn, mapping(unit=None)).poll_once()
    assert (
        "column bull_jobs.created_on is bigint: if it holds epoch time, declare "
        "timestamps.epoch_unit: milliseconds (or seconds)" in str(raised.value)
    )


async def test_a_column_that_is_no_time_is_rejected(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(MS_TABLE)
    broken = mapping()
    broken["timestamps"]["finished"] = "queue"
    with pytest.raises(SchemaProblem, match="column bull_jobs.queue is text, not a time"):
        await poller(dsn, broken).poll_once()
