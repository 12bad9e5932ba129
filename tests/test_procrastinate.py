"""The procrastinate preset against the real Procrastinate: its own schema, jobs, worker and triggers.

Truth is computed independently, in Python, from the raw rows of the tables.
"""

from __future__ import annotations

import datetime as dt
import signal
from collections import Counter

import asyncpg
import pytest
from helpers import make_config, scrape, series, value, wait_for
from jobqueue_exporter.poll import TargetPoller
from procrastinate_app import apply_schema, start_worker_process


def poller_for(dsn: str, **target) -> TargetPoller:
    config = make_config({"name": "app", "dsn": dsn, "preset": "procrastinate", **target})
    return TargetPoller(config, config.targets[0])


async def truth_states(db: asyncpg.Connection, stale_after: float) -> Counter:
    """(queue, kind, state) -> count, computed from raw rows with Procrastinate's own semantics."""
    now = await db.fetchval("SELECT now()")
    rows = await db.fetch(
        "SELECT queue_name, task_name, status::text, scheduled_at, attempts, worker_id FROM procrastinate_jobs"
    )
    heartbeats = dict(await db.fetch("SELECT id, last_heartbeat FROM procrastinate_workers"))
    counts: Counter = Counter()
    for queue, kind, status, scheduled_at, attempts, worker_id in rows:
        if status == "todo":
            if scheduled_at is None or scheduled_at <= now:
                state = "pending"
            else:
                state = "retrying" if attempts > 0 else "scheduled"
        elif status == "doing":
            state = "running"
            beat = heartbeats.get(worker_id)
            if beat is None or beat < now - dt.timedelta(seconds=stale_after):
                counts[(queue, kind, "stale")] += 1
        else:
            continue
        counts[(queue, kind, state)] += 1
    return counts


async def run_worker_until_idle(app, queues: list[str]) -> None:
    await app.run_worker_async(queues=queues, wait=False, install_signal_handlers=False)


async def test_states_ages_and_ratio_match_the_database(dsn: str, db: asyncpg.Connection) -> None:
    app = await apply_schema(dsn)
    async with app.open_async():
        ok, fail = app.tasks["ok"], app.tasks["fail"]
        for n in range(6):
            await ok.defer_async(n=n)
        for n in range(2):
            await fail.defer_async(n=n)
        await app.tasks["retry_later"].defer_async()
        await run_worker_until_idle(app, ["default"])
        # left waiting: due now, due an hour ago, in the future (never tried)
        for n in range(3):
            await ok.defer_async(n=n)
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        await ok.configure(schedule_at=past).defer_async()
        await ok.configure(schedule_in={"hours": 2}).defer_async()
        await app.tasks["slow"].configure(queue="reports").defer_async()

    poller = poller_for(dsn)
    await poller.poll_once()
    samples = scrape(poller)
    truth = await truth_states(db, poller.stale_after)

    assert truth[("default", "ok", "pending")] == 4
    assert truth[("default", "retry_later", "retrying")] == 1
    assert truth[("default", "ok", "scheduled")] == 1
    for (queue, kind, state), expected in truth.items():
        name = "jobqueue_stale_jobs" if state == "stale" else "jobqueue_jobs"
        labels = {} if state == "stale" else {"state": state}
        got = value(samples, name, target="app", queue=queue, kind=kind, **labels)
        assert got == expected, (queue, kind, state)
    # every live state exists, at 0 when empty
    for kind in ("ok", "fail", "retry_later"):
        for state in ("pending", "scheduled", "running", "retrying"):
            got = value(samples, "jobqueue_jobs", queue="default", kind=kind, state=state)
            assert got == truth[("default", kind, state)]

    age = value(samples, "jobqueue_oldest_pending_age_seconds", queue="default", kind="ok")
    assert 3600 <= age < 3600 + 120, "eligible since the past scheduled_at"
    assert value(samples, "jobqueue_oldest_pending_age_seconds", queue="default", kind="fail") == 0
    reports_age = value(
        samples, "jobqueue_oldest_pending_age_seconds", queue="reports", kind="slow"
    )
    deferred_at = await db.fetchval(
        "SELECT e.at FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id "
        "WHERE j.queue_name = 'reports' AND e.type = 'deferred'"
    )
    db_age = (await db.fetchval("SELECT now()") - deferred_at).total_seconds()
    assert 0 <= reports_age <= db_age, (
        "measured from the deferred event, before our later clock read"
    )

    # the window was filled at the first poll: 6 ok succeeded, 2 failed (retry_later is not final)
    assert value(samples, "jobqueue_success_ratio", queue="default", kind="ok") == 1.0
    assert value(samples, "jobqueue_success_ratio", queue="default", kind="fail") == 0.0
    assert series(samples, "jobqueue_success_ratio", kind="retry_later") == {}
    assert value(samples, "jobqueue_up", target="app") == 1.0


async def test_finished_counters_count_each_job_once(dsn: str, db: asyncpg.Connection) -> None:
    app = await apply_schema(dsn)
    poller = poller_for(dsn)
    async with app.open_async():
        await app.tasks["ok"].defer_async()
        await run_worker_until_idle(app, ["default"])
        await (
            poller.poll_once()
        )  # baseline: what finished before the exporter started is not counted
        for n in range(7):
            await app.tasks["ok"].defer_async(n=n)
        for n in range(4):
            await app.tasks["fail"].defer_async(n=n)
        for n in range(2):
            await app.tasks["flaky"].defer_async(n=n)
        await run_worker_until_idle(app, ["default"])
    for _ in range(3):  # polling again must not count anything twice
        await poller.poll_once()
    samples = scrape(poller)

    def finished(kind: str, outcome: str) -> float:
        return value(samples, "jobqueue_jobs_finished_total", kind=kind, outcome=outcome)

    assert finished("ok", "succeeded") == 7
    assert finished("fail", "failed") == 4
    assert finished("flaky", "failed") == 2
    assert finished("flaky", "retried") == 2, "one retry per flaky job before its final failure"
    assert finished("fail", "succeeded") == 0, "zero series exist so the first increase is seen"
    # independent truth from the event log
    events = Counter(
        dict(
            await db.fetch(
                "SELECT type::text, count(*) FROM procrastinate_events e JOIN procrastinate_jobs j "
                "ON j.id = e.job_id WHERE j.id > (SELECT min(id) FROM procrastinate_jobs) GROUP BY 1"
            )
        )
    )
    assert events["succeeded"] == 7 and events["failed"] == 6 and events["deferred_for_retry"] == 2


async def test_out_of_order_commits_are_counted_exactly_once(
    dsn: str, db: asyncpg.Connection
) -> None:
    """A finish whose transaction commits after a later one is neither lost nor counted twice."""
    app = await apply_schema(dsn)
    async with app.open_async():
        for n in range(3):
            await app.tasks["ok"].defer_async(n=n)
    ids = [r["id"] for r in await db.fetch("SELECT id FROM procrastinate_jobs ORDER BY id")]
    await db.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = ANY($1)", ids)
    poller = poller_for(dsn)
    await poller.poll_once()

    slow_tx = await asyncpg.connect(dsn)
    try:
        tx = slow_tx.transaction()
        await tx.start()
        # takes the lower event id, commits last
        await slow_tx.execute(
            "UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = $1", ids[0]
        )
        await db.execute("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = $1", ids[1])
        await poller.poll_once()
        assert value(scrape(poller), "jobqueue_jobs_finished_total", outcome="succeeded") == 1
        await poller.poll_once()
        await tx.commit()
    finally:
        await slow_tx.close()
    low, high = await db.fetch(
        "SELECT id FROM procrastinate_events WHERE type = 'succeeded' ORDER BY id"
    )
    assert low["id"] < high["id"]
    for _ in range(3):
        await poller.poll_once()
    assert value(scrape(poller), "jobqueue_jobs_finished_total", outcome="succeeded") == 2
    await db.execute("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = $1", ids[2])
    await poller.poll_once()
    samples = scrape(poller)
    assert value(samples, "jobqueue_jobs_finished_total", outcome="succeeded") == 2
    assert value(samples, "jobqueue_jobs_finished_total", outcome="failed") == 1


async def test_counts_survive_deletion_of_finished_rows(dsn: str, db: asyncpg.Connection) -> None:
    app = await apply_schema(dsn)
    poller = poller_for(dsn)
    await poller.poll_once()
    async with app.open_async():
        for n in range(5):
            await app.tasks["ok"].defer_async(n=n)
        await run_worker_until_idle(app, ["default"])
    await poller.poll_once()
    assert value(scrape(poller), "jobqueue_jobs_finished_total", outcome="succeeded") == 5
    # Procrastinate's own retention task deletes old finished jobs (events cascade)
    async with app.open_async():
        await app.job_manager.delete_old_jobs(nb_hours=0, include_failed=True)
    assert await db.fetchval("SELECT count(*) FROM procrastinate_jobs") == 0
    await poller.poll_once()
    samples = scrape(poller)
    assert value(samples, "jobqueue_jobs_finished_total", outcome="succeeded") == 5
    assert value(samples, "jobqueue_jobs", state="pending", kind="ok") == 0


async def test_worker_killed_mid_job_makes_a_stale_job(dsn: str, db: asyncpg.Connection) -> None:
    app = await apply_schema(dsn)
    async with app.open_async():
        await app.tasks["slow"].defer_async()
        await app.tasks["slow"].configure(queue="live").defer_async()
    doomed, alive = start_worker_process(dsn, "slow"), start_worker_process(dsn, "live")
    try:
        await wait_for(
            lambda: db.fetchval(
                "SELECT count(*) = 2 FROM procrastinate_jobs WHERE status = 'doing'"
            ),
            message="both slow jobs picked up",
        )
        poller = poller_for(dsn, stale_after="2s")
        await poller.poll_once()
        assert value(scrape(poller), "jobqueue_stale_jobs", queue="slow", kind="slow") == 0
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)

        async def stale_now() -> bool:
            await poller.poll_once()
            return value(scrape(poller), "jobqueue_stale_jobs", queue="slow", kind="slow") == 1

        await wait_for(stale_now, timeout=30, interval=0.5, message="stale job reported")
        samples = scrape(poller)
        truth = await truth_states(db, poller.stale_after)
        assert truth[("slow", "slow", "stale")] == 1
        assert value(samples, "jobqueue_stale_jobs", queue="live", kind="slow") == 0, "live worker"
        assert value(samples, "jobqueue_jobs", queue="slow", kind="slow", state="running") == 1
        assert value(samples, "jobqueue_oldest_running_age_seconds", queue="slow", kind="slow") > 2
    finally:
        for proc in (doomed, alive):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize("cap", [2])
async def test_kind_cap_overflows_into_other(dsn: str, db: asyncpg.Connection, cap: int) -> None:
    app = await apply_schema(dsn)
    async with app.open_async():
        for kind in ("a", "b", "c", "d"):
            await app.configure_task(name=kind, queue="many").defer_async()
        await app.configure_task(name="x", queue="ignored").defer_async()
    poller = poller_for(
        dsn, max_kinds_per_queue=cap, queues=["many", "declared"], labels={"env": "prod"}
    )
    await poller.poll_once()
    samples = scrape(poller)
    kinds = {
        dict(lbls)["kind"]
        for lbls in series(samples, "jobqueue_jobs", queue="many", state="pending")
    }
    assert len(kinds) == cap + 1 and "__other__" in kinds
    assert value(samples, "jobqueue_jobs", queue="many", kind="__other__", state="pending") == 2
    assert series(samples, "jobqueue_jobs", queue="ignored") == {}, "not in the allow-list"
    assert value(samples, "jobqueue_jobs", queue="declared", kind="default", state="pending") == 0
    assert set(series(samples, "jobqueue_up")) == {frozenset({("target", "app"), ("env", "prod")})}
    assert all(("env", "prod") in labels for labels in series(samples, "jobqueue_stale_jobs"))


async def test_terminal_states_are_opt_in(dsn: str, db: asyncpg.Connection) -> None:
    app = await apply_schema(dsn)
    async with app.open_async():
        await app.tasks["fail"].defer_async()
        await run_worker_until_idle(app, ["default"])
    plain = poller_for(dsn)
    await plain.poll_once()
    assert series(scrape(plain), "jobqueue_jobs", state="failed") == {}
    counted = poller_for(dsn, count_terminal_states=True)
    await counted.poll_once()
    samples = scrape(counted)
    assert value(samples, "jobqueue_jobs", kind="fail", state="failed") == 1
    assert value(samples, "jobqueue_jobs", kind="fail", state="cancelled") == 0
