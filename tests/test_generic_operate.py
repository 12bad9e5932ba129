"""Regression tests for the generic mapping's operator paths (issue 9): integer ids ordered as numbers,
stale jobs first with counts over the whole selection, copyable hints, mapped last_error/lock_owner
columns, job ids in text logs, NULL queue and kind values. Each runs the real CLI against a real table."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import yaml
from helpers import make_config, scrape, value
from jobqueue_exporter.poll import TargetPoller
from test_operate import cli, cli_json

# a home-grown table with an integer id, a text status, a lock owner and an error column
JOBS = """
CREATE TABLE work (
    id bigserial PRIMARY KEY,
    queue text,
    kind text,
    status text NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    last_error text,
    locked_by text,
    run_at timestamptz NOT NULL DEFAULT now(),
    locked_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX ON work (finished_at);
"""

TABLE = {
    "name": "work",
    "queue": "queue",
    "kind": "kind",
    "attempts": "attempts",
    "last_error": "last_error",
    "lock_owner": "locked_by",
    "state": {
        "column": "status",
        "pending": ["queued"],
        "running": ["running"],
        "succeeded": ["done"],
        "failed": ["error"],
    },
    "timestamps": {"eligible": "run_at", "started": "locked_at", "finished": "finished_at"},
    "stale": {"started_before": "locked_at"},
}


def target(dsn: str, **extra) -> dict:
    return {
        "name": "home",
        "dsn": dsn,
        "table": TABLE,
        "stale_after": "5m",
        "recovery": {"reset_state": "queued", "clear_columns": ["locked_by", "locked_at"]},
        **extra,
    }


def write_config(tmp_path: Path, *targets: dict, log_format: str = "json") -> str:
    path = tmp_path / "jobqueue.yaml"
    path.write_text(yaml.safe_dump({"log_format": log_format, "targets": list(targets)}))
    return str(path)


async def test_purge_dry_run_announces_exactly_what_yes_deletes(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Ids 1..2200 cross digit boundaries: ordered as text, keyset batches would skip ids."""
    await db.execute(JOBS)
    await db.execute(
        "INSERT INTO work (kind, status, finished_at)"
        " SELECT 'mail', 'done', now() - interval '40 days' FROM generate_series(1, 2200)"
    )
    config = write_config(tmp_path, target(dsn))
    base = ("purge", "--config", config, "--target", "home", "--older-than", "30d")
    preview, _ = await cli_json(*base, "--batch", "97")
    assert preview["dry_run"] is True and preview["jobs_total"] == 2200
    assert await db.fetchval("SELECT count(*) FROM work") == 2200, "a dry run deletes nothing"
    done, logs = await cli_json(*base, "--batch", "97", "--yes")
    assert done["jobs_total"] == 2200
    assert await db.fetchval("SELECT count(*) FROM work") == 0


async def test_jobs_newest_first_by_numeric_id(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await db.execute(JOBS)
    await db.execute(
        "INSERT INTO work (kind, status, finished_at, last_error)"
        " SELECT 'mail', 'error', now(), 'boom ' || n FROM generate_series(1, 3708) AS n"
    )
    config = write_config(tmp_path, target(dsn))
    out, _ = await cli_json(
        "jobs", "--config", config, "--target", "home", "--state", "failed", "--limit", "3"
    )
    assert [j["id"] for j in out["jobs"]] == ["3708", "3707", "3706"]
    assert [j["last_error"] for j in out["jobs"]] == ["boom 3708", "boom 3707", "boom 3706"]
    assert out["selection"] == {"jobs": 3708, "stale": 0, "retryable": 3708}
    assert out["summary"].startswith("3708 job(s) in failed, 3 shown (--limit 3)")


async def test_jobs_shows_stale_jobs_first_and_counts_the_whole_selection(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """300 running jobs, the 3 newest stale: the first page shows those 3, the summary says 3."""
    await db.execute(JOBS)
    await db.execute(
        "INSERT INTO work (kind, status, locked_at, locked_by)"
        " SELECT 'render', 'running', now(), 'worker-' || n FROM generate_series(1, 297) AS n"
    )
    await db.execute(
        "INSERT INTO work (kind, status, locked_at, locked_by)"
        " SELECT 'render', 'running', now() - interval '1 hour', 'gone-' || n"
        " FROM generate_series(1, 3) AS n"
    )
    stale_ids = {str(i) for i in range(298, 301)}
    poller = TargetPoller(make_config(target(dsn)), make_config(target(dsn)).targets[0])
    await poller.poll_once()
    assert value(scrape(poller), "jobqueue_stale_jobs", kind="render") == 3

    config = write_config(tmp_path, target(dsn))
    args = ("jobs", "--config", config, "--target", "home", "--state", "running", "--limit", "20")
    out, _ = await cli_json(*args)
    assert len(out["jobs"]) == 20
    assert {j["id"] for j in out["jobs"][:3]} == stale_ids and all(
        j["is_stale"] for j in out["jobs"][:3]
    )
    assert not any(j["is_stale"] for j in out["jobs"][3:])
    assert len({j["id"] for j in out["jobs"]}) == 20, "a stale job is not listed twice"
    assert out["selection"] == {"jobs": 300, "stale": 3, "retryable": 0}
    assert {j["lock_owner"] for j in out["jobs"][:3]} == {"gone-1", "gone-2", "gone-3"}

    only, _ = await cli_json(*args[:5], "--stale")
    assert {j["id"] for j in only["jobs"]} == stale_ids
    assert only["summary"] == "3 stale job(s)"

    code, text, err = await cli(*args)
    assert code == 0, err
    hint = f"`jobqueue-exporter recover-stale --config {config} --target home`"
    assert text.count(hint) == 3, "the hint's command is printed whole, ready to copy"
    assert "300 job(s) in running, 20 shown (--limit 20): 3 stale, 0 retryable" in text


async def test_text_logs_carry_the_job_ids(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await db.execute(JOBS)
    ids = await db.fetch(
        "INSERT INTO work (queue, kind, status, finished_at) VALUES"
        " ('q', 'mail', 'error', now()), ('q', 'mail', 'error', now()) RETURNING id"
    )
    config = write_config(tmp_path, target(dsn), log_format="text")
    code, out, err = await cli(
        "retry", "--config", config, "--target", "home", "--all-failed", "--yes"
    )
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if "manual_retry" in line]
    assert f"q/mail: {ids[0]['id']}, {ids[1]['id']}" in line


async def test_null_queue_and_kind_read_as_the_null_label(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A NULL in the mapped queue or kind column is a label value like any other (``__null__``),
    in the live gauges, the finished counters and the operator listing; the target stays up."""
    await db.execute(JOBS)
    await db.execute(
        "INSERT INTO work (queue, kind, status) VALUES"
        " (NULL, 'mail', 'queued'), ('bulk', NULL, 'queued'), ('bulk', 'mail', 'queued')"
    )
    config = make_config(target(dsn))
    poller = TargetPoller(config, config.targets[0])
    await poller.poll_once()
    await db.execute(
        "INSERT INTO work (queue, kind, status, finished_at) VALUES (NULL, NULL, 'done', now())"
    )
    await poller.poll_once()
    samples = scrape(poller)
    assert value(samples, "jobqueue_up", target="home") == 1
    for queue, kind in (("__null__", "mail"), ("bulk", "__null__"), ("bulk", "mail")):
        assert value(samples, "jobqueue_jobs", queue=queue, kind=kind, state="pending") == 1
    assert (
        value(
            samples,
            "jobqueue_jobs_finished_total",
            queue="__null__",
            kind="__null__",
            outcome="succeeded",
        )
        == 1
    )
    out, _ = await cli_json(
        "jobs", "--config", write_config(tmp_path, target(dsn)), "--target", "home"
    )
    assert sorted((j["queue"] or "-", j["kind"] or "-") for j in out["jobs"]) == [
        ("-", "mail"),
        ("bulk", "-"),
        ("bulk", "mail"),
    ]
