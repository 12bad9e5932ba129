"""The operator commands (jobs, recover-stale, retry, purge) against real schemas and real workers.

Procrastinate runs for real (its schema, `defer`, its worker, a worker SIGKILLed mid-job); Publaryn and the
generic table are driven with their own SQL. Listings are checked against what the tables say, mutations
against the rows, and the CLI runs as a real subprocess for its output, exit codes and errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import yaml
from helpers import make_config, wait_for
from jobqueue_exporter import operate
from jobqueue_exporter.config import CANONICAL_STATES
from procrastinate_app import apply_schema, start_worker_process
from test_generic import RUST, RUST_TABLE
from test_publaryn import COMPLETE, FAIL, SCHEMA, claim, enqueue
from test_recovery import job_rows, kill_mid_job

STALE_AFTER = "2s"


def procrastinate_target(dsn: str, **extra) -> dict:
    return {
        "name": "app",
        "dsn": dsn,
        "preset": "procrastinate",
        "stale_after": STALE_AFTER,
        **extra,
    }


def write_config(tmp_path: Path, *targets: dict) -> str:
    path = tmp_path / "jobqueue.yaml"
    path.write_text(yaml.safe_dump({"log_format": "json", "targets": list(targets)}))
    return str(path)


async def cli(*args: str) -> tuple[int, str, str]:
    """The real command line in a subprocess: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobqueue_exporter.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli_json(*args: str) -> tuple[dict, list[dict]]:
    """Run a command with --json that must succeed: its output and its structured log lines."""
    code, out, err = await cli(*args, "--json")
    assert code == 0, err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return json.loads(out), logs


async def user_error(*args: str) -> str:
    """Run a command that must fail as a user error: exit 2, one `error:` line, no traceback."""
    code, out, err = await cli(*args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@asynccontextmanager
async def session(target: dict) -> AsyncIterator[operate.Session]:
    config = make_config(target)
    async with operate.open_session(config, target["name"]) as s:
        yield s


async def heartbeats_older_than(db: asyncpg.Connection, seconds: float) -> None:
    await wait_for(
        lambda: db.fetchval(
            "SELECT bool_and(last_heartbeat < now() - make_interval(secs => $1)) "
            "FROM procrastinate_workers WHERE id IN (SELECT worker_id FROM procrastinate_jobs "
            "WHERE queue_name = 'gated')",
            seconds,
        ),
        message="killed worker's heartbeat older than stale_after",
    )


async def start_live_worker(dsn: str, db: asyncpg.Connection, app, tmp_path: Path):
    """A healthy worker running one job (blocked on its gate) in queue `live`."""
    async with app.open_async():
        await app.tasks["gate"].configure(queue="live").defer_async(path=str(tmp_path / "live"))
    worker = start_worker_process(dsn, "live")
    await wait_for(
        lambda: db.fetchval(
            "SELECT count(*) = 1 FROM procrastinate_jobs WHERE queue_name = 'live' AND status = 'doing'"
        ),
        message="live job running",
    )
    return worker


def stop_worker(worker, tmp_path: Path) -> None:
    (tmp_path / "live").touch()
    worker.kill()
    worker.wait(10)


def procrastinate_truth(row: asyncpg.Record, now, stale_workers: set[int]) -> tuple:
    """(canonical state, is_stale, can_retry) of one procrastinate_jobs row, from its columns."""
    status = row["status"]
    if status == "todo":
        due = row["scheduled_at"] is None or row["scheduled_at"] <= now
        state = "pending" if due else ("scheduled" if row["attempts"] == 0 else "retrying")
    else:
        state = {"doing": "running", "succeeded": "succeeded", "failed": "failed"}.get(
            status, "cancelled"
        )
    stale = status == "doing" and (row["worker_id"] is None or row["worker_id"] in stale_workers)
    retry = status == "failed" and not row["abort_requested"]
    return state, stale, retry


# -- Procrastinate --------------------------------------------------------------------------------


async def test_jobs_lists_real_procrastinate_jobs_truthfully(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    app = await kill_mid_job(db, dsn, 2, tmp_path)
    async with app.open_async():
        for n in range(2):
            await app.tasks["fail"].defer_async(n=n)
        await app.tasks["ok"].defer_async(n=0)
        await app.tasks["retry_later"].defer_async(n=0)
        await app.run_worker_async(queues=["default"], wait=False, install_signal_handlers=False)
        await app.tasks["ok"].defer_async(n=1)  # pending
        await app.tasks["ok"].configure(schedule_in={"hours": 1}).defer_async(n=2)  # scheduled
    # a failed job whose abort was requested (as procrastinate_retry_job_v2 leaves a stalled one)
    aborted = await db.fetchval(
        "UPDATE procrastinate_jobs SET abort_requested = true WHERE id = "
        "(SELECT min(id) FROM procrastinate_jobs WHERE status = 'failed') RETURNING id"
    )
    await heartbeats_older_than(db, 2)
    worker = await start_live_worker(dsn, db, app, tmp_path)
    try:
        async with session(procrastinate_target(dsn)) as s:
            listed = {
                job.id: job for job in await operate.list_jobs(s, CANONICAL_STATES, None, None, 100)
            }
            gated = await operate.list_jobs(s, ["running"], "gated", None, 100)
            failed = await operate.list_jobs(s, ["failed"], None, "fail", 1)
            waiting = await operate.list_jobs(s, ["scheduled", "retrying"], None, None, 100)
        rows = await db.fetch("SELECT * FROM procrastinate_jobs ORDER BY id")
        now = await db.fetchval("SELECT now()")
        stale_workers = {
            r["id"]
            for r in await db.fetch(
                "SELECT id FROM procrastinate_workers WHERE last_heartbeat < now() - interval '2 s'"
            )
        }
        assert set(listed) == {str(r["id"]) for r in rows}
        for row in rows:
            job = listed[str(row["id"])]
            assert (job.state, job.is_stale, job.can_retry) == procrastinate_truth(
                row, now, stale_workers
            ), row
            assert job.attempts == row["attempts"] and job.last_error is None
        states = sorted(job.state for job in listed.values())
        assert states == sorted(
            ["running"] * 3 + ["failed"] * 2 + ["succeeded", "retrying", "pending", "scheduled"]
        )
        assert sorted(j.is_stale for j in listed.values()).count(True) == 2, "the live job is not"
        assert not listed[str(aborted)].can_retry
        assert "cannot be retried now" in listed[str(aborted)].hint
        assert {j.queue for j in gated} == {"gated"} and all(j.is_stale for j in gated)
        assert all(j.lock_owner and j.lock_owner.startswith("worker ") for j in gated)
        assert [j.id for j in failed] == [
            str(max(r["id"] for r in rows if r["status"] == "failed"))
        ]
        assert sorted(j.state for j in waiting) == ["retrying", "scheduled"]

        config = write_config(tmp_path, procrastinate_target(dsn))
        out, _ = await cli_json("jobs", "--config", config, "--target", "app", "--state", "running")
        assert out["command"] == "jobs" and len(out["jobs"]) == 3
        assert sorted(j["is_stale"] for j in out["jobs"]) == [False, True, True]
        assert [j["is_stale"] for j in out["jobs"]] == [True, True, False], "stale jobs first"
        assert {j["hint"] for j in out["jobs"] if j["is_stale"]} == {
            f"stale: preview the reset with `jobqueue-exporter recover-stale --config {config}"
            " --target app`"
        }
        assert out["selection"] == {"jobs": 3, "stale": 2, "retryable": 0}
        code, text, _ = await cli("jobs", "--config", config, "--target", "app")
        assert code == 0
        header = text.splitlines()[2]
        assert header.split() == [c.upper() for c in operate.JOB_COLUMNS]
        assert "failed: retry with `jobqueue-exporter retry" in text
    finally:
        stop_worker(worker, tmp_path)


async def test_live_listing_reads_the_partial_indexes(dsn: str, db: asyncpg.Connection) -> None:
    await apply_schema(dsn)
    await db.execute(SCHEMA)
    await db.execute("SET enable_seqscan = off")
    plans = {}
    for name in ("procrastinate", "publaryn"):
        target = {"name": name, "dsn": dsn, "preset": name}
        async with session(target) as s:
            statement = s.actions.preset.list_live
            assert statement is not None
            rows = await db.fetch(
                "EXPLAIN " + statement.sql, 30.0, list(operate.LIVE_STATES), None, None, 50
            )
            plans[name] = "\n".join(r[0] for r in rows)
    assert "procrastinate_jobs_id_lock_idx_v1" in plans["procrastinate"]
    assert "idx_background_jobs_stale" in plans["publaryn"]
    assert "idx_background_jobs_claimable" in plans["publaryn"]


async def test_recover_stale_dry_run_then_each_stale_job_reset_once(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    app = await kill_mid_job(db, dsn, 3, tmp_path)
    await heartbeats_older_than(db, 2)
    worker = await start_live_worker(dsn, db, app, tmp_path)
    config = write_config(tmp_path, procrastinate_target(dsn))
    args = ("recover-stale", "--config", config, "--target", "app")
    try:
        before = await job_rows(db)
        events = await db.fetchval("SELECT count(*) FROM procrastinate_events")
        out, logs = await cli_json(*args)
        assert out["result"] == "dry_run" and out["dry_run"] is True
        stale_ids = {j["id"] for j in out["jobs"]}
        assert len(stale_ids) == 3 and {j["new_state"] for j in out["jobs"]} == {"todo"}
        assert await job_rows(db) == before, "a dry run changes nothing"
        assert await db.fetchval("SELECT count(*) FROM procrastinate_events") == events
        (record,) = [entry for entry in logs if entry.get("event") == "manual_recover_stale"]
        assert record["dry_run"] is True and record["target"] == "app"
        assert {i for group in record["jobs"] for i in group["ids"]} == stale_ids

        # another recovery run holds the target's lock: nothing happens, exit 1
        lock = "SELECT pg_advisory_lock(hashtextextended('jobqueue-exporter/recovery/app', 0))"
        await db.execute(lock)
        code, _, err = await cli(*args, "--yes")
        await db.execute("SELECT pg_advisory_unlock_all()")
        assert code == 1 and "holds the lock" in err and "Traceback" not in err
        assert await job_rows(db) == before

        out, logs = await cli_json(*args, "--yes", "--limit", "2")
        assert out["result"] == "recovered" and len(out["jobs"]) == 2
        out, _ = await cli_json(*args, "--yes")
        assert out["result"] == "recovered" and len(out["jobs"]) == 1
        out, _ = await cli_json(*args, "--yes")
        assert out["result"] == "nothing" and out["jobs"] == [], "nothing is reset twice"
        rows = await job_rows(db)
        assert {rows[int(i)] for i in stale_ids} == {("todo", 1)}, "back to todo as retry_job does"
        retried = await db.fetch(
            "SELECT job_id, count(*) FROM procrastinate_events "
            "WHERE type = 'deferred_for_retry' GROUP BY 1"
        )
        assert {str(r["job_id"]) for r in retried} == stale_ids
        assert all(r["count"] == 1 for r in retried)
        live = await db.fetchval(
            "SELECT status::text FROM procrastinate_jobs WHERE queue_name = 'live'"
        )
        assert live == "doing", "the job of a live worker is never touched"
    finally:
        stop_worker(worker, tmp_path)


async def test_retry_one_and_all_failed_then_a_real_worker_completes_them(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, caplog
) -> None:
    app = await apply_schema(dsn)
    async with app.open_async():
        for n in range(4):
            await app.tasks["fail_until"].defer_async(path=str(tmp_path / f"fixed-{n}"))
        await (
            app.tasks["fail_until"]
            .configure(queueing_lock="only-one")
            .defer_async(path=str(tmp_path / "fixed-lock"))
        )
        await app.run_worker_async(queues=["default"], wait=False, install_signal_handlers=False)
        # a todo job now holds the failed job's queueing_lock: retrying that one would break the index
        await app.tasks["ok"].configure(queueing_lock="only-one").defer_async(n=1)
    failed = [
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM procrastinate_jobs WHERE status = 'failed' ORDER BY id"
        )
    ]
    assert len(failed) == 5
    locked_one = failed[-1]
    config = write_config(tmp_path, procrastinate_target(dsn))
    base = ("retry", "--config", config, "--target", "app")

    before = await job_rows(db)
    out, logs = await cli_json(*base, str(failed[0]))
    assert out["dry_run"] is True and [j["id"] for j in out["jobs"]] == [str(failed[0])]
    assert await job_rows(db) == before
    assert [e["event"] for e in logs] == ["manual_retry"] and logs[0]["dry_run"] is True

    out, logs = await cli_json(*base, str(failed[0]), "--yes")
    assert out["result"] == "retried" and logs[0]["jobs"][0]["ids"] == [str(failed[0])]
    row = await db.fetchrow(
        "SELECT status::text, attempts, scheduled_at <= now() AS due FROM procrastinate_jobs "
        "WHERE id = $1",
        failed[0],
    )
    assert tuple(row) == ("todo", 2, True), "as procrastinate_retry_job_v2: attempts + 1, due now"
    assert await db.fetchval(
        "SELECT count(*) FROM procrastinate_events WHERE job_id = $1 AND type = 'retried'",
        failed[0],
    )

    message = await user_error(*base, str(failed[0]))
    assert f"job {failed[0]} on target 'app' is pending (todo), so it cannot be retried" in message
    message = await user_error(*base, str(locked_one))
    assert "queueing_lock" in message

    # --all-failed with --limit, in-process this time
    caplog.set_level(logging.INFO, logger="jobqueue_exporter.recovery")
    async with session(procrastinate_target(dsn)) as s:
        report = await operate.retry_jobs(s, None, None, "fail_until", 2, yes=True)
    assert [j["id"] for j in report.rows] == [str(i) for i in failed[1:3]]
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "manual_retry"]
    assert record.dry_run is False and record.result == "retried"
    rows = await job_rows(db)
    assert [rows[i][0] for i in failed] == ["todo", "todo", "todo", "failed", "failed"]

    for n in range(3):
        (tmp_path / f"fixed-{n}").touch()
    async with app.open_async():
        await app.run_worker_async(queues=["default"], wait=False, install_signal_handlers=False)
    rows = await job_rows(db)
    assert [rows[i] for i in failed[:3]] == [("succeeded", 3)] * 3, (
        "retried, then run to completion"
    )
    assert rows[failed[3]] == ("failed", 1) and rows[locked_one] == ("failed", 1)


async def test_purge_deletes_old_finished_jobs_in_batches_only(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    app = await kill_mid_job(db, dsn, 1, tmp_path)  # a running job
    async with app.open_async():
        for n in range(5):
            await app.tasks["ok"].defer_async(n=n)
        for n in range(2):
            await app.tasks["fail"].defer_async(n=n)
        await app.run_worker_async(queues=["default"], wait=False, install_signal_handlers=False)
        await app.tasks["ok"].configure(queue="idle").defer_async(n=9)  # pending, never run
        # everything so far happened 40 days ago, the pending and running jobs' events included
        await db.execute("UPDATE procrastinate_events SET at = at - interval '40 days'")
        await app.tasks["ok"].defer_async(n=10)
        await app.run_worker_async(queues=["default"], wait=False, install_signal_handlers=False)
    statuses = dict(await db.fetch("SELECT id, status::text FROM procrastinate_jobs"))
    old_ok = sorted(i for i, st in statuses.items() if st == "succeeded")[:5]
    recent_ok = max(i for i, st in statuses.items() if st == "succeeded")
    old_failed = sorted(i for i, st in statuses.items() if st == "failed")
    config = write_config(tmp_path, procrastinate_target(dsn))
    base = ("purge", "--config", config, "--target", "app", "--older-than", "30d", "--batch", "2")

    out, _ = await cli_json(*base)
    assert out["dry_run"] is True and out["jobs_total"] == 5 and out["count_capped"] is False
    assert out["jobs"] == [{"queue": "default", "kind": "ok", "state": "succeeded", "jobs": 5}]
    assert len(await db.fetch("SELECT id FROM procrastinate_jobs")) == len(statuses)

    # a row locked by someone else is skipped, never waited for
    holder = await asyncpg.connect(dsn)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1 FROM procrastinate_jobs WHERE id = $1 FOR UPDATE", old_ok[0])
    try:
        out, logs = await asyncio.wait_for(cli_json(*base, "--yes"), timeout=60)
    finally:
        await tx.rollback()
        await holder.close()
    assert out["result"] == "deleted" and out["jobs_total"] == 4
    assert out["batches"] == 3, "2 + 2 + a short batch that ends the walk"
    (record,) = [e for e in logs if e.get("event") == "manual_purge"]
    assert sorted(int(i) for g in record["jobs"] for i in g["ids"]) == old_ok[1:]
    out, _ = await cli_json(*base, "--yes")
    assert out["jobs_total"] == 1, "the job that was locked goes next time"
    remaining = dict(await db.fetch("SELECT id, status::text FROM procrastinate_jobs"))
    assert not set(old_ok) & set(remaining)
    assert not await db.fetchval(
        "SELECT count(*) FROM procrastinate_events WHERE job_id = ANY($1::bigint[])", old_ok
    ), "events go with their job"
    assert recent_ok in remaining and set(old_failed) <= set(remaining)
    assert sorted(remaining.values()).count("doing") == 1 and "todo" in remaining.values()

    out, _ = await cli_json(*base, "--yes", "--include-failed")
    assert out["jobs_total"] == 2
    out, _ = await cli_json(*base, "--yes", "--include-failed")
    assert out["result"] == "nothing" and out["jobs_total"] == 0
    left = await db.fetch("SELECT status::text FROM procrastinate_jobs")
    assert sorted(r[0] for r in left) == ["doing", "succeeded", "todo"]


async def test_user_errors_exit_2_without_a_traceback(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await kill_mid_job(db, dsn, 1, tmp_path)
    running = await db.fetchval("SELECT id FROM procrastinate_jobs WHERE status = 'doing'")
    config = write_config(
        tmp_path,
        procrastinate_target(dsn),
        {"name": "pub", "dsn": dsn, "preset": "publaryn"},
    )
    c = ("--config", config)
    assert "unknown target 'nope'" in await user_error("jobs", *c, "--target", "nope")
    assert "unknown target 'nope'" in await user_error("recover-stale", *c, "--target", "nope")
    assert "unknown job id '999999'" in await user_error("retry", *c, "--target", "app", "999999")
    assert "unknown job id 'abc'" in await user_error("retry", *c, "--target", "app", "abc")
    message = await user_error("retry", *c, "--target", "app", str(running), "--yes")
    assert f"job {running} on target 'app' is running (doing), so it cannot be retried" in message
    assert await db.fetchval("SELECT status::text FROM procrastinate_jobs") == "doing"
    message = await user_error("purge", *c, "--target", "app", "--older-than", "30x")
    assert "--older-than: invalid duration '30x'" in message
    assert "give either one JOB_ID or --all-failed" in await user_error(
        "retry", *c, "--target", "app"
    )
    assert "--to is only for table mappings" in await user_error(
        "retry", *c, "--target", "app", "--all-failed", "--to", "todo"
    )
    # refused before connecting: the queue's own sweep handles it
    message = await user_error("recover-stale", *c, "--target", "pub")
    assert "publaryn rescues stale jobs itself" in message
    assert "override_builtin_rescue" in message
    code, out, err = await cli("jobs", "--config", str(tmp_path / "missing.yaml"), "--target", "x")
    assert code == 2 and "cannot read config file" in err and "Traceback" not in err


# -- Publaryn -------------------------------------------------------------------------------------


async def test_publaryn_listing_retry_recovery_and_purge(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await db.execute(SCHEMA)
    await enqueue(db, "scan_artifact", 2)
    old_clock = await db.fetchval("SELECT now() - interval '10 minutes'")
    await db.execute("UPDATE background_jobs SET scheduled_at = $1", old_clock)
    stale = await claim(db, "dead-worker", 2, now=old_clock)  # leases ran out 5 minutes ago
    await enqueue(db, "deliver_webhook", 1, max_attempts=1)
    (webhook,) = await claim(db, "worker-a", 5)
    await db.execute(FAIL, webhook["id"], "410 Gone")  # attempts 1 >= max 1 -> dead
    await enqueue(db, "index_package", 3)
    done = await claim(db, "worker-a", 5)
    for job in done:
        await db.execute(COMPLETE, job["id"])
    old_done = sorted(str(j["id"]) for j in done[:2])
    await db.execute(
        "UPDATE background_jobs SET completed_at = now() - interval '10 days' "
        "WHERE id = ANY($1::uuid[])",
        old_done,
    )
    await enqueue(db, "reindex_search", 1)  # pending
    running_fresh = await claim(db, "worker-b", 1)
    await enqueue(db, "cleanup_oci_blobs", 1)  # pending

    target = {"name": "pub", "dsn": dsn, "preset": "publaryn"}
    override = {
        "name": "pub-fallback",
        "dsn": dsn,
        "preset": "publaryn",
        "stale_after": "60s",
        "recovery": {"override_builtin_rescue": True},
    }
    async with session(target) as s:
        jobs = {j.id: j for j in await operate.list_jobs(s, CANONICAL_STATES, None, None, 100)}
        dead = await operate.list_jobs(s, ["dead"], "default", "deliver_webhook", 10)
    assert len(jobs) == 8
    for job in stale:
        listed = jobs[str(job["id"])]
        assert (listed.state, listed.is_stale, listed.lock_owner) == (
            "running",
            True,
            "dead-worker",
        )
        assert listed.hint == "stale: publaryn's own sweep resets it"
    fresh = jobs[str(running_fresh[0]["id"])]
    assert (fresh.state, fresh.is_stale, fresh.lock_owner) == ("running", False, "worker-b")
    assert [(j.id, j.last_error, j.can_retry) for j in dead] == [
        (str(webhook["id"]), "410 Gone", True)
    ]
    assert sorted(j.state for j in jobs.values()) == sorted(
        ["running"] * 3 + ["dead"] + ["succeeded"] * 3 + ["pending"]
    )
    assert [j for j in jobs.values() if j.can_retry] == [jobs[str(webhook["id"])]]

    config = write_config(tmp_path, target, override)
    assert "publaryn rescues stale jobs itself" in await user_error(
        "recover-stale", "--config", config, "--target", "pub", "--yes"
    )
    fallback = ("recover-stale", "--config", config, "--target", "pub-fallback")
    out, _ = await cli_json(*fallback)
    assert sorted(j["id"] for j in out["jobs"]) == sorted(str(j["id"]) for j in stale)
    out, _ = await cli_json(*fallback, "--yes")
    assert out["result"] == "recovered" and len(out["jobs"]) == 2
    rows = await db.fetch(
        "SELECT status::text, locked_by, locked_until, started_at, attempts FROM background_jobs "
        "WHERE id = ANY($1::uuid[])",
        [j["id"] for j in stale],
    )
    assert [tuple(r) for r in rows] == [("pending", None, None, None, 1)] * 2, "as its own sweep"

    retry = ("retry", "--config", config, "--target", "pub")
    assert "unknown job id" in await user_error(*retry, "00000000-0000-0000-0000-000000000000")
    assert "unknown job id 'not-a-uuid'" in await user_error(*retry, "not-a-uuid")
    assert "is running (running), so it cannot be retried" in await user_error(
        *retry, str(running_fresh[0]["id"])
    )
    out, _ = await cli_json(*retry, str(webhook["id"]), "--yes")
    assert out["jobs"] == [
        {
            "id": str(webhook["id"]),
            "queue": "default",
            "kind": "deliver_webhook",
            "new_state": "pending",
        }
    ]
    row = await db.fetchrow(
        "SELECT status::text, attempts, last_error, completed_at, locked_by, started_at, "
        "scheduled_at > now() - interval '1 minute' AS due_now FROM background_jobs WHERE id = $1",
        webhook["id"],
    )
    assert tuple(row) == ("pending", 0, "410 Gone", None, None, None, True), (
        "its admin retry: attempts reset, last error kept"
    )

    purge = ("purge", "--config", config, "--target", "pub", "--older-than", "7d")
    out, _ = await cli_json(*purge)
    assert out["jobs_total"] == 2 and out["dry_run"] is True
    out, _ = await cli_json(*purge, "--yes", "--batch", "1")
    assert out["jobs_total"] == 2 and out["batches"] == 3
    statuses = await db.fetch("SELECT id::text, status::text FROM background_jobs")
    assert not {r["id"] for r in statuses} & set(old_done)
    assert sorted(r["status"] for r in statuses) == sorted(
        ["pending"] * 4 + ["running", "completed"]
    )


# -- generic table --------------------------------------------------------------------------------


def generic_target(dsn: str, name: str = "rust", **recovery) -> dict:
    return {
        "name": name,
        "dsn": dsn,
        "table": RUST_TABLE,
        "stale_after": "5m",
        "recovery": recovery,
    }


async def test_generic_table_listing_retry_recovery_and_purge(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await db.execute(RUST)
    await db.execute(
        """
        INSERT INTO jobs (queue, job_type, status, attempts, run_at, locked_at, locked_by, finished_at)
        VALUES
          ('media', 'transcode', 'pending', 0, now(), NULL, NULL, NULL),
          ('media', 'transcode', 'retrying', 1, now() + interval '1 hour', NULL, NULL, NULL),
          ('media', 'transcode', 'running', 1, now(), now() - interval '10 minutes', 'w1', NULL),
          ('media', 'transcode', 'running', 1, now(), now(), 'w2', NULL),
          ('media', 'transcode', 'failed', 3, now(), now(), 'w3', now()),
          ('media', 'transcode', 'failed', 3, now(), now(), 'w3', now()),
          ('mail', 'welcome', 'failed', 3, now(), now(), 'w4', now()),
          ('mail', 'welcome', 'completed', 1, now(), NULL, NULL, now() - interval '40 days'),
          ('mail', 'welcome', 'completed', 1, now(), NULL, NULL, now() - interval '40 days'),
          ('mail', 'welcome', 'completed', 1, now(), NULL, NULL, now())
        """
    )
    target = generic_target(dsn, reset_state="pending", clear_columns=["locked_at", "locked_by"])
    async with session(target) as s:
        jobs = await operate.list_jobs(s, CANONICAL_STATES, None, None, 100)
        media_dead = await operate.list_jobs(s, ["dead"], "media", None, 100)
    truth = {
        r["id"]: r for r in await db.fetch("SELECT id::text, status::text, locked_by FROM jobs")
    }
    native_to_canonical = {
        "pending": "pending",
        "retrying": "retrying",
        "running": "running",
        "failed": "dead",
        "completed": "succeeded",
    }
    assert len(jobs) == 10
    for job in jobs:
        row = truth[job.id]
        assert job.state == native_to_canonical[row["status"]] and job.native_state == row["status"]
        assert job.is_stale == (row["locked_by"] == "w1")
        assert job.can_retry == (row["status"] == "failed")
    assert len(media_dead) == 2 and {j.queue for j in media_dead} == {"media"}

    no_reset = generic_target(dsn, name="bare")
    config = write_config(tmp_path, target, no_reset)
    out, _ = await cli_json("recover-stale", "--config", config, "--target", "rust", "--yes")
    assert out["result"] == "recovered" and len(out["jobs"]) == 1
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE locked_by = 'w1'") == 0

    retry = ("retry", "--config", config, "--target", "rust")
    out, _ = await cli_json(*retry, "--all-failed", "--queue", "media", "--limit", "1", "--yes")
    (first,) = out["jobs"]
    row = await db.fetchrow(
        "SELECT status::text, attempts, locked_by, run_at > now() - interval '1 minute' AS due "
        "FROM jobs WHERE id = $1::uuid",
        first["id"],
    )
    assert tuple(row) == ("pending", 0, None, True), (
        "reset_state, attempts 0, lock cleared, due now"
    )
    assert "is not a waiting state" in await user_error(*retry, "--all-failed", "--to", "completed")
    assert "pass --to" in await user_error(
        "retry", "--config", config, "--target", "bare", "--all-failed"
    )
    out, _ = await cli_json(
        "retry", "--config", config, "--target", "bare", "--all-failed", "--to", "retrying", "--yes"
    )
    assert sorted(j["new_state"] for j in out["jobs"]) == ["retrying", "retrying"]
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'failed'") == 0

    purge = ("purge", "--config", config, "--target", "rust", "--older-than", "30d")
    out, _ = await cli_json(*purge, "--batch", "1", "--yes")
    assert out["jobs_total"] == 2 and out["batches"] == 3
    left = sorted(r[0] for r in await db.fetch("SELECT status::text FROM jobs"))
    assert left == sorted(["pending"] * 3 + ["retrying"] * 3 + ["running", "completed"])


@pytest.mark.parametrize("text", ["5", "0s"])
def test_purge_age_must_be_a_positive_duration(text: str, tmp_path: Path, capsys) -> None:
    from jobqueue_exporter.cli import main

    config = write_config(
        tmp_path, {"name": "x", "dsn": "postgresql://x@127.0.0.1:1/x", "preset": "publaryn"}
    )
    code = main(["purge", "--config", config, "--target", "x", "--older-than", text])
    err = capsys.readouterr().err
    if text == "0s":
        assert code == 2 and "must be more than 0" in err
    else:
        # 5 seconds is a valid age: it gets as far as connecting (to nothing), a database failure
        assert code == 1 and err.startswith("error: target x:")
