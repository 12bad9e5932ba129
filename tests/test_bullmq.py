"""The ``bullmq`` preset against the real BullMQ (6.7.0 from npm, a Node script in tests/bullmq_app):
waiting, prioritized, delayed, retried, completed and failed jobs, a worker SIGKILLed mid-job, a paused
queue, a trimmed event stream. Figures are compared with the truth read independently from Redis as the
admin user; the exporter reads as a user holding only the preset's read-only ACL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from bullmq_driver import add, pause, resume, start_worker
from helpers import make_config, scrape, series, value, wait_for
from jobqueue_exporter.poll import TargetPoller

pytestmark = pytest.mark.redis  # also run against Debian's redis-server in CI


@pytest.fixture
def bull_redis(redis_db: tuple[str, int]) -> Iterator[tuple[str, redis.Redis]]:
    url, _ = redis_db
    admin = redis.Redis.from_url(url)
    yield url, admin
    admin.close()


def exporter(url: str, **target) -> TargetPoller:
    config = make_config({"name": "bull", "dsn": url, "preset": "bullmq", **target})
    return TargetPoller(config, config.targets[0])


def k(queue: str, suffix: str) -> str:
    return f"bull:{queue}:{suffix}"


def jobs(samples: dict, queue: str, state: str) -> float:
    return value(samples, "jobqueue_jobs", queue=queue, kind="default", state=state)


def finished(samples: dict, queue: str, outcome: str) -> float:
    return value(
        samples, "jobqueue_jobs_finished_total", queue=queue, kind="default", outcome=outcome
    )


def truth(admin: redis.Redis, queue: str) -> dict[str, int]:
    """Depth by state from Redis with plain commands (the job hashes read one by one)."""
    due = (int(time.time() * 1000) + 1) * 4096 - 1
    delayed = admin.zrangebyscore(k(queue, "delayed"), due + 1, "+inf")
    retrying = sum(int(admin.hget(k(queue, i.decode()), "atm") or 0) > 0 for i in delayed)
    return {
        "pending": admin.llen(k(queue, "wait"))
        + admin.zcard(k(queue, "prioritized"))
        + admin.zcount(k(queue, "delayed"), 0, due),
        "scheduled": len(delayed) - retrying,
        "retrying": retrying,
        "running": admin.llen(k(queue, "active")),
        "dead": admin.zcard(k(queue, "failed")),
    }


async def test_depth_finished_counts_stale_and_paused_match_redis(
    bull_redis: tuple[str, redis.Redis], redis_reader_url: Callable[[str], str], tmp_path: Path
) -> None:
    url, admin = bull_redis
    add(url, "mail", "ok", 3)
    add(url, "mail", "fail", 2, attempts=2, backoff=3_600_000)  # first failure: retry in an hour
    add(url, "mail", "fail", 1, attempts=1)  # a final failure
    add(url, "mail", "ok", 2, delay=3_600_000)
    add(url, "mail", "ok", 2, priority=5)
    gate = tmp_path / "gate"
    (block,) = add(url, "mail", "block", 1, data={"gate": str(gate)})

    p = exporter(redis_reader_url("bullmq"), queues=["mail", "empty"], count_terminal_states=True)
    await p.poll_once()  # the baseline: nothing ran yet
    samples = scrape(p)
    assert jobs(samples, "mail", "pending") == 9  # wait 7 + prioritized 2
    assert jobs(samples, "mail", "scheduled") == 2
    assert jobs(samples, "empty", "pending") == 0, "a declared queue exists at 0"
    head = admin.lindex(k("mail", "wait"), -1).decode()
    created = int(admin.hget(k("mail", head), "timestamp")) / 1000
    age = value(samples, "jobqueue_oldest_pending_age_seconds", queue="mail", kind="default")
    assert abs(age - (time.time() - created)) < 5, "from the next job's timestamp"

    worker = start_worker(url, "mail", concurrency=4, lock_ms=2000, stalled_ms=600_000)
    try:

        def settled() -> bool:
            return (
                admin.zcard(k("mail", "completed")) == 5
                and admin.zcard(k("mail", "failed")) == 1
                and admin.zcard(k("mail", "delayed")) == 4
                and admin.lrange(k("mail", "active"), 0, -1) == [block.encode()]
            )

        await wait_for(settled, timeout=60, message="the workload reached its end states")
        await p.poll_once()
        samples = scrape(p)
        expected = truth(admin, "mail")
        assert expected["retrying"] == 2 and expected["scheduled"] == 2
        for state, count in expected.items():
            assert jobs(samples, "mail", state) == count, state
        assert finished(samples, "mail", "succeeded") == 5
        assert finished(samples, "mail", "dead") == 1
        assert finished(samples, "mail", "retried") == 2
        assert value(samples, "jobqueue_stale_jobs", queue="mail", kind="default") == 0
        running_age = value(
            samples, "jobqueue_oldest_running_age_seconds", queue="mail", kind="default"
        )
        started = int(admin.hget(k("mail", block), "processedOn")) / 1000
        assert abs(running_age - (time.time() - started)) < 5
        assert value(samples, "jobqueue_queue_paused", queue="mail") == 0
        worker.kill()  # SIGKILL mid-job: the job stays active, its lock runs out
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    await wait_for(
        lambda: not admin.exists(k("mail", f"{block}:lock")), timeout=30, message="lock expired"
    )
    await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_stale_jobs", queue="mail", kind="default") == 1
    assert jobs(samples, "mail", "running") == 1

    pause(url, "mail")
    await p.poll_once()
    assert value(scrape(p), "jobqueue_queue_paused", queue="mail") == 1
    resume(url, "mail")
    await p.poll_once()
    assert value(scrape(p), "jobqueue_queue_paused", queue="mail") == 0
    await p.close()


async def test_a_trimmed_event_stream_is_reported_as_lost_events(
    bull_redis: tuple[str, redis.Redis],
    redis_reader_url: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, admin = bull_redis
    add(url, "burst", "ok", 1)
    p = exporter(redis_reader_url("bullmq"), queues=["burst"])
    await p.poll_once()
    baseline = admin.xinfo_stream(k("burst", "events"))["entries-added"]
    add(url, "burst", "ok", 300)
    worker = start_worker(url, "burst", concurrency=20)
    try:
        await wait_for(
            lambda: admin.zcard(k("burst", "completed")) == 301, timeout=60, message="all done"
        )
    finally:
        worker.kill()
        worker.wait(10)
    # BullMQ trims its stream to opts.maxLenEvents (10,000): an exporter that was down for that many
    # events finds the oldest ones gone, as here
    admin.xtrim(k("burst", "events"), maxlen=50, approximate=False)
    added = admin.xinfo_stream(k("burst", "events"))["entries-added"]
    assert admin.xlen(k("burst", "events")) == 50 < added - 100
    with caplog.at_level(logging.WARNING):
        await p.poll_once()
    samples = scrape(p)
    lost = value(samples, "jobqueue_finished_events_lost_total", queue="burst")
    succeeded = finished(samples, "burst", "succeeded")
    assert lost == added - baseline - 50, "exactly the events added and never read"
    assert 0 < succeeded < 300, "never guessed: only what was read is counted"
    assert "events were trimmed" in caplog.text
    await p.close()


def test_bullmq_targets_must_list_their_queues() -> None:
    from jobqueue_exporter.config import ConfigError

    with pytest.raises(ConfigError, match="BullMQ keeps no registry of queue names"):
        make_config({"name": "b", "dsn": "redis://h/0", "preset": "bullmq"})
    with pytest.raises(ConfigError, match="only BullMQ targets have a key prefix"):
        make_config({"name": "a", "dsn": "redis://h/0", "preset": "asynq", "key_prefix": "x"})


async def test_a_key_prefix_with_a_cluster_hash_tag(
    bull_redis: tuple[str, redis.Redis], redis_admin_url: str, redis_db: tuple[str, int]
) -> None:
    url, admin = bull_redis
    add(url, "mail", "ok", 2, prefix="{jobs}")
    p = exporter(url, queues=["mail"], key_prefix="{jobs}")
    await p.poll_once()
    samples = scrape(p)
    assert jobs(samples, "mail", "pending") == 2
    assert series(samples, "jobqueue_jobs", queue="mail")
    await asyncio.sleep(0)
    await p.close()


async def test_queues_can_be_discovered_with_a_bounded_scan(
    bull_redis: tuple[str, redis.Redis], redis_reader_url: Callable[[str], str]
) -> None:
    url, admin = bull_redis
    for queue, n in (("mail", 2), ("reports", 1), ("imports", 3)):
        add(url, queue, "ok", n)
    admin.set("bull:not-a-queue", "x")  # other keys under the prefix are left alone
    p = exporter(redis_reader_url("bullmq"), discover_queues=True)
    await p.poll_once()
    samples = scrape(p)
    for queue, n in (("mail", 2), ("reports", 1), ("imports", 3)):
        assert jobs(samples, queue, "pending") == n
    assert {dict(labels)["queue"] for labels in series(samples, "jobqueue_jobs")} == {
        "mail",
        "reports",
        "imports",
    }
    await p.close()


async def test_the_retry_split_is_bounded_by_its_budget(
    bull_redis: tuple[str, redis.Redis],
    redis_reader_url: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jobqueue_exporter.sources.redis.presets import bullmq as preset

    url, admin = bull_redis
    add(url, "mail", "ok", 2, delay=3_600_000)
    add(url, "mail", "fail", 2, attempts=2, backoff=3_600_000)
    worker = start_worker(url, "mail")
    try:
        await wait_for(lambda: admin.zcard(k("mail", "delayed")) == 4, timeout=60)
    finally:
        worker.kill()
        worker.wait(10)
    reader = redis_reader_url("bullmq")
    for budget, scheduled, retrying in ((4, 2, 2), (3, 4, 0)):
        monkeypatch.setattr(preset, "DELAYED_SPLIT_BUDGET", budget)
        p = exporter(reader, queues=["mail"])
        await p.poll_once()
        samples = scrape(p)
        assert (jobs(samples, "mail", "scheduled"), jobs(samples, "mail", "retrying")) == (
            scheduled,
            retrying,
        ), f"budget {budget}"
        await p.close()
