"""Regression tests for the generic mapping's state values and impossible mappings (issue 9): every value
the state column holds is mapped or ignored, checked at startup from an enum, a CHECK constraint or the
newest rows; mappings that could never produce their metrics are rejected by config validation."""

from __future__ import annotations

import asyncpg
import pytest
from helpers import make_config, scrape, series, value
from jobqueue_exporter.config import ConfigError
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.sources import SchemaProblem

STATES = {
    "column": "status",
    "pending": ["queued"],
    "retrying": ["retry"],
    "running": ["running"],
    "succeeded": ["done"],
    "failed": ["error"],
}


def table(**state) -> dict:
    return {
        "name": "work",
        "state": {**STATES, **state},
        "kind": "kind",
        "attempts": "attempts",
        "timestamps": {"eligible": "run_at", "started": "locked_at", "finished": "finished_at"},
    }


def poller(dsn: str, mapping: dict, **target) -> TargetPoller:
    config = make_config({"name": "home", "dsn": dsn, "table": mapping, **target})
    return TargetPoller(config, config.targets[0])


async def create(db: asyncpg.Connection, status_type: str = "text") -> None:
    await db.execute(
        f"""
        CREATE TABLE work (
            id bigserial PRIMARY KEY, kind text NOT NULL DEFAULT 'mail', status {status_type} NOT NULL,
            attempts int NOT NULL DEFAULT 0, run_at timestamptz NOT NULL DEFAULT now(),
            locked_at timestamptz, finished_at timestamptz);
        CREATE INDEX ON work (finished_at);
        """
    )


async def fill(db: asyncpg.Connection, **counts: int) -> None:
    for status, n in counts.items():
        await db.execute(
            "INSERT INTO work (status, locked_at, run_at, attempts)"
            " SELECT $1, CASE WHEN $1 = 'running' THEN now() END,"
            " CASE WHEN $1 = 'retry' THEN now() + interval '1 hour' ELSE now() END,"
            " CASE WHEN $1 = 'retry' THEN 1 ELSE 0 END"
            " FROM generate_series(1, $2)",
            status,
            n,
        )


async def test_a_typo_in_a_state_value_is_a_schema_problem_naming_the_closest_value(
    dsn: str, db: asyncpg.Connection
) -> None:
    """The issue's case: `running: [runing]` read running 0 (truth 290) and exited 0."""
    await create(db)
    await fill(db, queued=40, running=290, retry=150, done=30)
    p = poller(dsn, table(running=["runing"]))
    with pytest.raises(SchemaProblem) as raised:
        await p.poll_once()
    assert (
        "value 'running' of work.status is mapped to no state; the mapping has 'runing' for "
        "running: a typo?" in str(raised.value)
    )
    assert "found among the newest 10000 rows" in str(raised.value)
    samples = scrape(p)
    assert value(samples, "jobqueue_up", target="home") == 0
    assert value(samples, "jobqueue_poll_errors_total", target="home", reason="schema") == 1
    assert series(samples, "jobqueue_jobs") == {}, "no wrong zeros"

    fixed = poller(dsn, table())
    await fixed.poll_once()
    samples = scrape(fixed)
    assert value(samples, "jobqueue_jobs", kind="mail", state="running") == 290
    assert value(samples, "jobqueue_jobs", kind="mail", state="retrying") == 150


async def test_values_listed_in_ignore_are_accepted_and_exported_as_no_state(
    dsn: str, db: asyncpg.Connection
) -> None:
    await create(db)
    await fill(db, queued=2, archived=5)
    with pytest.raises(
        SchemaProblem, match=r"value 'archived' of work.status is mapped to no state \("
    ):
        await poller(dsn, table()).poll_once()
    p = poller(dsn, table(ignore=["archived"]))
    await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_jobs", kind="mail", state="pending") == 2
    assert sum(series(samples, "jobqueue_jobs").values()) == 2


async def test_a_check_constraint_gives_the_complete_list_of_values(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Known from the constraint even before any row holds the value."""
    await create(db)
    await db.execute(
        "ALTER TABLE work ADD CONSTRAINT work_status_check"
        " CHECK (status IN ('queued', 'retry', 'running', 'done', 'error', 'paused'))"
    )
    with pytest.raises(SchemaProblem) as raised:
        await poller(dsn, table()).poll_once()
    assert "value 'paused' of work.status is mapped to no state" in str(raised.value)
    assert "the column's type allows it" in str(raised.value)
    with pytest.raises(
        SchemaProblem,
        match=r"'runing' are not allowed by CHECK constraint work_status_check of work.status",
    ):
        await poller(dsn, table(running=["runing"], ignore=["paused", "running"])).poll_once()
    await poller(dsn, table(ignore=["paused"])).poll_once()


async def test_a_varchar_check_constraint_is_read_too(dsn: str, db: asyncpg.Connection) -> None:
    await create(db, "varchar(20)")
    await db.execute(
        "ALTER TABLE work ADD CHECK (status = ANY (ARRAY['queued', 'retry', 'running', 'done',"
        " 'error', 'it''s odd']))"
    )
    with pytest.raises(SchemaProblem, match=r"value \"it's odd\" of work.status"):
        await poller(dsn, table()).poll_once()


async def test_an_enum_label_that_is_mapped_to_no_state_is_a_schema_problem(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        "CREATE TYPE work_state AS ENUM ('queued', 'retry', 'running', 'done', 'error', 'archived')"
    )
    await create(db, "work_state")
    with pytest.raises(
        SchemaProblem, match="value 'archived' of work.status is mapped to no state"
    ):
        await poller(dsn, table()).poll_once()
    await poller(dsn, table(ignore=["archived"])).poll_once()


def target_with(mapping: dict, **target) -> None:
    make_config({"name": "home", "dsn": "postgresql://u@h/db", "table": mapping, **target})


def test_finished_timestamp_without_finished_states_is_rejected() -> None:
    mapping = table()
    mapping["state"] = {"column": "status", "pending": ["queued"], "running": ["running"]}
    with pytest.raises(ConfigError) as raised:
        target_with(mapping)
    assert (
        "targets[0](home).table.timestamps.finished: no value is mapped to succeeded, failed or "
        "dead" in str(raised.value)
    )
    del mapping["timestamps"]["finished"]
    target_with(mapping)
    with pytest.raises(
        ConfigError, match=r"finished_counting: 'on' needs table.timestamps.finished"
    ):
        target_with(mapping, finished_counting="on")


def test_terminal_counts_without_terminal_states_are_rejected() -> None:
    mapping = table()
    mapping["state"] = {**STATES, "failed": []}
    with pytest.raises(ConfigError, match=r"count_terminal_states: no value is mapped to failed"):
        target_with(mapping, count_terminal_states=True)


def test_a_stale_rule_without_a_running_state_is_rejected() -> None:
    mapping = {**table(running=[]), "stale": {"started_before": "locked_at"}}
    with pytest.raises(ConfigError) as raised:
        target_with(mapping)
    assert (
        "table.state.running: no value is mapped to 'running' (running ages and the stale rule "
        "need it): add e.g. running: [running]" in str(raised.value)
    )


def test_a_value_both_mapped_and_ignored_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'done' is mapped to both 'succeeded' and 'ignore'"):
        target_with(table(ignore=["done"]))


async def fail_and_requeue(db: asyncpg.Connection, ids: list[int]) -> None:
    """What a worker of such a table does when an attempt fails and a retry is left."""
    await db.execute(
        "UPDATE work SET status = 'retry', attempts = attempts + 1, locked_at = NULL,"
        " run_at = now() + interval '1 minute' WHERE id = ANY($1::bigint[])",
        ids,
    )


async def claim(db: asyncpg.Connection, ids: list[int]) -> None:
    await db.execute(
        "UPDATE work SET status = 'running', locked_at = now() WHERE id = ANY($1::bigint[])", ids
    )


def retried(p: TargetPoller) -> float:
    return value(scrape(p), "jobqueue_jobs_finished_total", kind="mail", outcome="retried")


async def test_requeued_failures_of_a_generic_table_count_as_retried(
    dsn: str, db: asyncpg.Connection
) -> None:
    await create(db)
    await fill(db, running=4, retry=3)  # the 3 retries happened before the exporter started
    ids = [
        r["id"] for r in await db.fetch("SELECT id FROM work WHERE status = 'running' ORDER BY id")
    ]
    p = poller(dsn, table())
    await p.poll_once()
    assert retried(p) == 0, "the baseline is not counted"
    await fail_and_requeue(db, ids[:2])
    await p.poll_once()
    assert retried(p) == 2
    await p.poll_once()
    assert retried(p) == 2, "a job still waiting for its retry is counted once"
    # one of them runs again and fails again, within one poll interval: a second requeue
    await claim(db, ids[:1])
    await fail_and_requeue(db, ids[:1])
    # the other is retried, runs and succeeds
    await claim(db, ids[1:2])
    await db.execute("UPDATE work SET status = 'done', finished_at = now() WHERE id = $1", ids[1])
    await p.poll_once()
    assert retried(p) == 3
    samples = scrape(p)
    assert value(samples, "jobqueue_jobs_finished_total", kind="mail", outcome="succeeded") == 1
    truth = await db.fetchval("SELECT sum(attempts) FROM work WHERE id = ANY($1::bigint[])", ids)
    assert retried(p) == truth, "every failed attempt of these jobs was requeued and counted once"


async def test_last_error_tells_a_requeued_failure_without_attempts(
    dsn: str, db: asyncpg.Connection
) -> None:
    await create(db)
    await db.execute("ALTER TABLE work ADD COLUMN error text")
    await fill(db, running=2)
    mapping = {**table(), "last_error": "error"}
    del mapping["attempts"]
    p = poller(dsn, mapping)
    await p.poll_once()
    await db.execute(
        "UPDATE work SET status = 'queued', error = 'timeout', run_at = now() + interval '30s'"
        " WHERE id = (SELECT min(id) FROM work)"
    )
    await p.poll_once()
    assert retried(p) == 1


async def test_without_attempts_or_last_error_retried_is_absent(
    dsn: str, db: asyncpg.Connection
) -> None:
    await create(db)
    await fill(db, running=1)
    mapping = table()
    del mapping["attempts"]
    p = poller(dsn, mapping)
    await p.poll_once()
    samples = scrape(p)
    assert series(samples, "jobqueue_jobs_finished_total", outcome="succeeded")
    assert not series(samples, "jobqueue_jobs_finished_total", outcome="retried"), (
        "absent, never a misleading 0"
    )
