"""Unit tests of what comes after the source boundary, on a scripted source (no database): the poll loop
(down, deadline, backoff), the label policy, counters and the success window, recovery's hold window
and budgets. The PostgreSQL source itself is tested against real servers elsewhere."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_source import FakeSource, finished, live
from helpers import make_config, scrape, series, value, wait_for
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.sources import Reading, SourceFailure, StaleJob


def poller(source: FakeSource, **target) -> TargetPoller:
    config = make_config(
        {"name": "t", "dsn": "postgresql://u@db/app", "preset": "procrastinate", **target}
    )
    return TargetPoller(config, config.targets[0], source=source)


async def test_a_reading_becomes_gauges_and_counters() -> None:
    now = time.time()
    source = FakeSource().then(
        Reading(
            live=[
                live("mail", "send", "pending", 3, age=12.5),
                live("mail", "send", "running", 2, age=40.0, stale=1),
            ],
            finished=[
                finished("mail", "send", "succeeded", 8, now),
                finished("mail", "send", "failed", 2, now),
            ],
        )
    )
    p = poller(source)
    await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_jobs", queue="mail", kind="send", state="pending") == 3
    assert value(samples, "jobqueue_jobs", queue="mail", kind="send", state="scheduled") == 0
    assert value(samples, "jobqueue_oldest_pending_age_seconds", queue="mail", kind="send") == 12.5
    assert value(samples, "jobqueue_stale_jobs", queue="mail", kind="send") == 1
    assert value(samples, "jobqueue_jobs_finished_total", kind="send", outcome="succeeded") == 8
    assert value(samples, "jobqueue_jobs_finished_total", kind="send", outcome="dead") == 0
    assert value(samples, "jobqueue_success_ratio", queue="mail", kind="send") == 0.8


async def test_backfill_fills_the_ratio_but_is_never_counted() -> None:
    now = time.time()
    source = FakeSource().then(
        Reading(
            live=[],
            backfill=[
                finished("q", "k", "succeeded", 3, now - 60),
                finished("q", "k", "failed", 1, now - 30),
            ],
        ),
        Reading(live=[], finished=[finished("q", "k", "succeeded", 1, now)]),
    )
    p = poller(source)
    await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_success_ratio", queue="q", kind="k") == 0.75
    assert (
        value(samples, "jobqueue_jobs_finished_total", queue="q", kind="k", outcome="succeeded")
        == 0
    )
    await p.poll_once()
    samples = scrape(p)
    assert (
        value(samples, "jobqueue_jobs_finished_total", queue="q", kind="k", outcome="succeeded")
        == 1
    )
    assert value(samples, "jobqueue_success_ratio", queue="q", kind="k") == 0.8


async def test_a_failed_read_serves_no_job_series_and_counting_resumes() -> None:
    now = time.time()
    source = FakeSource().then(
        Reading(live=[live("q", "k")], finished=[finished("q", "k", "succeeded", 5, now)]),
        SourceFailure("connection", "connection refused by fake:0"),
        Reading(live=[live("q", "k")], finished=[finished("q", "k", "succeeded", 2, now)]),
    )
    p = poller(source)
    await p.poll_once()
    with pytest.raises(SourceFailure):
        await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_up", target="t") == 0
    assert (
        series(samples, "jobqueue_jobs") == {}
        and series(samples, "jobqueue_jobs_finished_total") == {}
    )
    assert value(samples, "jobqueue_poll_errors_total", reason="connection") == 1
    assert p.state.last_error == "connection: connection refused by fake:0"
    assert source.closed >= 1, "the connection is closed after any error"
    await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_up", target="t") == 1
    assert (
        value(samples, "jobqueue_jobs_finished_total", queue="q", kind="k", outcome="succeeded")
        == 7
    )


async def test_a_hung_read_is_down_within_the_deadline_and_dropped() -> None:
    source = FakeSource()
    source.hang = True
    p = poller(source, poll_interval="2s", statement_timeout="1s")
    assert p.deadline == 2.0
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await p.poll_once()
    assert time.monotonic() - started < 2.0 + 1.5
    assert p.state.up is False and p.state.errors["timeout"] == 1
    assert "no answer from fake:0 within 2s" in (p.state.last_error or "")
    assert source.aborted == 1, "a server that stopped answering is not closed gracefully"


async def test_backoff_grows_with_failures_and_resets() -> None:
    source = FakeSource()
    p = poller(source, poll_interval="10s")
    assert p.next_delay() == 10
    for failures, ceiling in ((1, 10), (2, 20), (3, 40), (4, 40), (8, 40)):
        p._failures = failures
        delays = [p.next_delay() for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (
            failures,
            min(delays),
            max(delays),
        )
    p._failures = 0
    assert p.next_delay() == 10


async def test_the_loop_survives_failures_and_stops_cleanly() -> None:
    source = FakeSource().then(
        SourceFailure("query", "boom"), Reading(live=[live("q", "k", jobs=4)])
    )
    p = poller(source, poll_interval="50ms")
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop))
    await wait_for(lambda: p.state.up is True, timeout=10, message="up after the failure")
    assert value(scrape(p), "jobqueue_jobs", queue="q", kind="k", state="pending") == 4
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert source.closed >= 1


async def test_label_policy_caps_queues_with_exact_totals() -> None:
    rows = [live(f"tenant{i:02d}", "job", "pending", i + 1) for i in range(30)]
    p = poller(FakeSource().then(Reading(live=rows)), max_queues=5)
    await p.poll_once()
    samples = scrape(p)
    queues = {dict(labels)["queue"] for labels in series(samples, "jobqueue_jobs", state="pending")}
    assert len(queues) == 6 and "__other__" in queues
    total = sum(series(samples, "jobqueue_jobs", state="pending").values())
    assert total == sum(range(1, 31)), "overflow is summed, nothing dropped"


async def test_declared_queues_exist_at_zero() -> None:
    p = poller(FakeSource(), queues=["emails", "reports"])
    await p.poll_once()
    samples = scrape(p)
    for queue in ("emails", "reports"):
        assert value(samples, "jobqueue_jobs", queue=queue, kind="default", state="pending") == 0


def stale(*ids: str) -> list[StaleJob]:
    return [StaleJob(i, "q", "k", f"token-{i}") for i in ids]


async def test_recovery_acts_only_after_the_hold_window_and_within_budgets() -> None:
    source = FakeSource()
    p = poller(
        source,
        stale_after="60s",
        recovery={
            "enabled": True,
            "dry_run": False,
            "override_builtin_rescue": True,
            "hold_for": "2m",
            "max_jobs_per_run": 2,
            "max_jobs_per_hour": 3,
        },
    )
    assert p.recoverer is not None
    actions = source.fake_actions
    t0 = 1_000_000.0
    assert await p.recoverer.after_poll(stale("a", "b", "c"), now=t0) is None
    assert await p.recoverer.after_poll(stale("a", "b", "c"), now=t0 + 60) is None
    assert actions.calls == [], "not stale for hold_for yet"
    assert await p.recoverer.after_poll(stale("a", "b", "c"), now=t0 + 120) == "recovered"
    assert actions.calls[-1] == (["a", "b", "c"], 2, True), "capped per run"
    # the third job is still stale; the hourly budget has room for one more
    assert await p.recoverer.after_poll(stale("c"), now=t0 + 150) == "recovered"
    assert actions.calls[-1][1] == 1
    assert await p.recoverer.after_poll(stale("d"), now=t0 + 150) is None
    assert await p.recoverer.after_poll(stale("d"), now=t0 + 300) == "capped"
    assert await p.recoverer.after_poll(stale("d"), now=t0 + 120 + 3600) == "recovered"
    assert p.state.recovery is not None
    assert p.state.recovery.recovered[("q", "k")] == 4


async def test_a_new_claim_or_a_failed_poll_restarts_the_hold_window() -> None:
    source = FakeSource()
    p = poller(
        source,
        recovery={"enabled": True, "override_builtin_rescue": True, "hold_for": "2m"},
        stale_after="60s",
    )
    assert p.recoverer is not None
    t0 = 1_000_000.0
    await p.recoverer.after_poll(stale("a"), now=t0)
    reclaimed = [StaleJob("a", "q", "k", "another-claim")]
    assert await p.recoverer.after_poll(reclaimed, now=t0 + 120) is None, "a new claim starts over"
    await p.recoverer.after_poll(None)  # a failed poll: continuity is unknown
    assert await p.recoverer.after_poll(reclaimed, now=t0 + 240) is None
    assert await p.recoverer.after_poll(reclaimed, now=t0 + 360) == "dry_run", "dry run by default"
    assert source.fake_actions.calls[-1][2] is False, "a dry run never commits"
