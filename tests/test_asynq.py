"""The ``asynq`` preset against the real asynq (v0.26.0, a Go program in tests/asynq_worker built by the
suite): tasks enqueued, scheduled, run by handlers that succeed, fail, retry and archive, a worker
SIGKILLed mid-task, a paused queue. Every figure is compared with the truth read independently from Redis
(plain commands as the admin user); the exporter reads as a user holding only the preset's read-only ACL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from asynq_app import enqueue, pause, start_worker, unpause
from helpers import make_config, scrape, series, value, wait_for
from jobqueue_exporter.poll import TargetPoller

pytestmark = pytest.mark.redis  # also run against Debian's redis-server in CI


@pytest.fixture
def asynq_redis(redis_db: tuple[str, int]) -> Iterator[tuple[str, int, redis.Redis]]:
    url, db = redis_db
    admin = redis.Redis.from_url(url)
    yield url, db, admin
    admin.close()


def exporter(reader_url: str, **target) -> TargetPoller:
    config = make_config({"name": "tasks", "dsn": reader_url, "preset": "asynq", **target})
    return TargetPoller(config, config.targets[0])


def k(queue: str, name: str) -> str:
    return f"asynq:{{{queue}}}:{name}"


def truth(admin: redis.Redis, queue: str) -> dict[str, float]:
    """What Redis holds for ``queue``, read with plain commands (not the exporter's code)."""
    now = time.time()
    due_scheduled = admin.zcount(k(queue, "scheduled"), "-inf", now)
    due_retry = admin.zcount(k(queue, "retry"), "-inf", now)
    return {
        "pending": admin.llen(k(queue, "pending")) + due_scheduled + due_retry,
        "scheduled": admin.zcard(k(queue, "scheduled")) - due_scheduled,
        "retrying": admin.zcard(k(queue, "retry")) - due_retry,
        "running": admin.llen(k(queue, "active")),
        "dead": admin.zcard(k(queue, "archived")),
        "processed": int(admin.get(k(queue, "processed")) or 0),
        "failed": int(admin.get(k(queue, "failed")) or 0),
    }


def jobs(samples: dict, queue: str, state: str) -> float:
    return value(samples, "jobqueue_jobs", queue=queue, kind="default", state=state)


def finished(samples: dict, queue: str, outcome: str) -> float:
    return value(
        samples, "jobqueue_jobs_finished_total", queue=queue, kind="default", outcome=outcome
    )


async def test_depth_finished_counts_stale_and_paused_match_redis(
    asynq_redis: tuple[str, int, redis.Redis],
    redis_reader_url: Callable[[str], str],
    tmp_path: Path,
) -> None:
    url, db, admin = asynq_redis
    reader = redis_reader_url("asynq")
    enqueue(url, db, "default", "ok", 3)
    enqueue(url, db, "default", "fail", 2, retry=1)
    enqueue(url, db, "default", "skip", 1)
    enqueue(url, db, "critical", "retry_later", 2)
    enqueue(url, db, "critical", "ok", 2, in_="1h")
    gate = tmp_path / "gate"
    (block,) = enqueue(url, db, "critical", "block", 1, payload=str(gate))

    p = exporter(reader, queues=["default", "critical", "empty"], poll_interval="1s")
    await p.poll_once()  # the baseline: nothing has run yet
    samples = scrape(p)
    assert jobs(samples, "default", "pending") == 6
    assert jobs(samples, "critical", "pending") == 3
    assert jobs(samples, "critical", "scheduled") == 2
    assert jobs(samples, "empty", "pending") == 0, "a declared queue exists at 0"
    age = value(samples, "jobqueue_oldest_pending_age_seconds", queue="default", kind="default")
    head = admin.lindex(k("default", "pending"), -1)
    since = int(admin.hget(k("default", f"t:{head.decode()}"), "pending_since")) / 1e9
    assert abs(age - (time.time() - since)) < 5, "asynq latency: pending_since of the next task"

    worker = start_worker(url, db, ["default", "critical"])
    try:

        def settled() -> bool:
            return (
                admin.zcard(k("default", "archived")) == 3
                and admin.zcard(k("critical", "retry")) == 2
                and admin.llen(k("default", "pending")) == 0
                and admin.lrange(k("critical", "active"), 0, -1) == [block.encode()]
            )

        await wait_for(settled, timeout=60, message="the workload reached its end states")
        # archive scores are whole seconds: the exporter counts a second once it is over
        await asyncio.sleep(1.1)
        await p.poll_once()
        samples = scrape(p)
        for queue in ("default", "critical"):
            expected = truth(admin, queue)
            for state in ("pending", "scheduled", "retrying", "running", "dead"):
                assert jobs(samples, queue, state) == expected[state], (queue, state)
        expected = truth(admin, "default")
        assert (expected["processed"], expected["failed"]) == (8, 5), "asynq counts attempts"
        assert finished(samples, "default", "succeeded") == 3  # processed - failed
        assert finished(samples, "default", "dead") == 3  # 2 fail after their retry, 1 skip
        assert finished(samples, "default", "retried") == 2  # failed attempts that were requeued
        assert finished(samples, "critical", "retried") == 2
        assert finished(samples, "critical", "succeeded") == 0
        assert value(samples, "jobqueue_success_ratio", queue="default", kind="default") == 0.5
        assert value(samples, "jobqueue_stale_jobs", queue="critical", kind="default") == 0
        assert value(samples, "jobqueue_queue_paused", queue="critical") == 0

        # the oldest running age from the live server's worker records (rewritten every 5 s)
        async def running_age() -> float:
            await p.poll_once()
            return value(
                scrape(p), "jobqueue_oldest_running_age_seconds", queue="critical", kind="default"
            )

        age = await wait_for(running_age, timeout=30, message="worker records read")
        started = float(admin.zscore(k("critical", "lease"), block)) - 30  # lease = start + 30 s
        assert abs(age - (time.time() - started)) < 10, "the block task's start, roughly"
        assert (
            value(scrape(p), "jobqueue_oldest_running_age_seconds", queue="default", kind="default")
            == 0
        ), "nothing runs there"

        worker.kill()  # SIGKILL mid-task: the block task stays active, its lease runs out later
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert admin.lrange(k("critical", "active"), 0, -1) == [block.encode()]
    # time passes: the lease ran out 31 s ago (asynq's own margin is 30 s)
    admin.zadd(k("critical", "lease"), {block: time.time() - 31}, xx=True)
    await p.poll_once()
    assert value(scrape(p), "jobqueue_stale_jobs", queue="critical", kind="default") == 1
    # the lease is gone altogether (evicted, restored from a backup): asynq's recoverer never sees it
    admin.zrem(k("critical", "lease"), block)
    await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_stale_jobs", queue="critical", kind="default") == 1
    assert jobs(samples, "critical", "running") == 1

    pause(url, db, "critical")
    await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_queue_paused", queue="critical") == 1
    assert value(samples, "jobqueue_queue_paused", queue="default") == 0
    unpause(url, db, "critical")
    await p.poll_once()
    assert value(scrape(p), "jobqueue_queue_paused", queue="critical") == 0
    await p.close()


async def test_queues_are_discovered_and_due_tasks_count_as_pending(
    asynq_redis: tuple[str, int, redis.Redis], redis_reader_url: Callable[[str], str]
) -> None:
    """No server runs, so nothing forwards due tasks: they are pending all the same."""
    url, db, admin = asynq_redis
    enqueue(url, db, "mail", "ok", 2, in_="1s")
    enqueue(url, db, "reports", "ok", 1)
    await wait_for(
        lambda: (
            time.time() > admin.zrange(k("mail", "scheduled"), 0, 0, withscores=True)[0][1] + 0.5
        ),
        timeout=10,
    )
    p = exporter(redis_reader_url("asynq"))
    await p.poll_once()
    samples = scrape(p)
    assert jobs(samples, "mail", "pending") == 2 and jobs(samples, "mail", "scheduled") == 0
    assert jobs(samples, "reports", "pending") == 1
    age = value(samples, "jobqueue_oldest_pending_age_seconds", queue="mail", kind="default")
    assert age >= 0.5, "from the due time of the oldest due task"
    assert {dict(labels)["queue"] for labels in series(samples, "jobqueue_jobs")} == {
        "mail",
        "reports",
    }
    await p.close()


async def test_redis_outage_is_down_and_recovers(
    asynq_redis: tuple[str, int, redis.Redis], redis_reader_url: Callable[[str], str]
) -> None:
    url, db, admin = asynq_redis
    enqueue(url, db, "default", "ok", 1)
    reader = redis_reader_url("asynq")
    p = exporter(reader)
    await p.poll_once()
    # the exporter's connection is killed by the server (as in a restart or failover)
    admin.execute_command("CLIENT", "KILL", "USER", "jobqueue-exporter-test")
    with pytest.raises(redis.exceptions.ConnectionError):
        await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_up", target="tasks") == 0
    assert series(samples, "jobqueue_jobs") == {}, "no stale values while down"
    await p.poll_once()
    assert value(scrape(p), "jobqueue_up", target="tasks") == 1
    assert jobs(scrape(p), "default", "pending") == 1
    await p.close()
