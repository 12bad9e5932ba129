"""A real Procrastinate app for the tests, and a worker entry point for subprocesses.

python tests/procrastinate_app.py DSN QUEUE [QUEUE ...]   # runs a worker until killed
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import procrastinate


def make_app(dsn: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="ok", queue="default")
    async def ok(n: int = 0) -> int:
        return n

    @app.task(name="fail", queue="default")
    async def fail(n: int = 0) -> None:
        raise ValueError(f"job {n} failed on purpose")

    @app.task(
        name="flaky", queue="default", retry=procrastinate.RetryStrategy(max_attempts=1, wait=0)
    )
    async def flaky(n: int = 0) -> None:
        raise ValueError("fails every attempt, retried once")

    @app.task(
        name="retry_later",
        queue="default",
        retry=procrastinate.RetryStrategy(max_attempts=3, wait=3600),
    )
    async def retry_later(n: int = 0) -> None:
        raise ValueError("fails; next attempt in an hour")

    @app.task(name="fail_until", queue="default")
    async def fail_until(path: str) -> str:
        # fails until the test creates the file: a job an operator retries once the cause is fixed
        if not os.path.exists(path):
            raise ValueError(f"{path} is missing")
        return path

    @app.task(name="gate", queue="gated")
    async def gate(path: str) -> str:
        # runs until the test opens the gate (creates the file)
        while not os.path.exists(path):
            await asyncio.sleep(0.05)
        return path

    @app.task(name="slow", queue="slow")
    async def slow(seconds: float = 3600) -> None:
        await asyncio.sleep(seconds)

    return app


def start_worker_process(dsn: str, *queues: str, concurrency: int = 1) -> subprocess.Popen:
    """A real worker in its own process, so a test can SIGKILL it mid-job."""
    return subprocess.Popen(
        [sys.executable, __file__, dsn, *queues, "--concurrency", str(concurrency)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def apply_schema(dsn: str) -> procrastinate.App:
    app = make_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    return app


async def run_worker(dsn: str, queues: list[str], concurrency: int = 1) -> None:
    app = make_app(dsn)
    async with app.open_async():
        await app.run_worker_async(
            queues=queues,
            wait=True,
            concurrency=concurrency,
            update_heartbeat_interval=0.5,
            fetch_job_polling_interval=0.2,
        )


if __name__ == "__main__":
    # python tests/procrastinate_app.py DSN QUEUE [QUEUE ...] [--concurrency N]
    args = sys.argv[2:]
    concurrency = 1
    if "--concurrency" in args:
        at = args.index("--concurrency")
        concurrency = int(args[at + 1])
        del args[at : at + 2]
    asyncio.run(run_worker(sys.argv[1], args, concurrency))
