"""The PostgreSQL source: one asyncpg connection per target, the preset's statements, exactly-once tails.

Safety rules for the database, all enforced here:

* one connection per target, opened lazily and closed after any error (never two at once);
* ``statement_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout`` are set on the server
  side at connect, plus ``application_name`` and ``default_transaction_read_only``;
* the catalog is checked once per connection before the first read (``catalog.py``);
* every read is one ``REPEATABLE READ READ ONLY`` transaction, so all statements see one snapshot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections import Counter
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from ...config import Target
from .. import (
    Capabilities,
    Finished,
    LiveRow,
    Reading,
    SchemaProblem,
    SourceFailure,
    StaleJob,
    TerminalRow,
)
from .actions import PostgresActions
from .catalog import check_schema, resolve_preset
from .presets import Preset, generic
from .watermark import FinishedRow, FinishedTail, RequeuedRow, RequeueTracker, SnapshotInfo

log = logging.getLogger(__name__)

TAIL_ROW_LIMIT = 100_000
BACKFILL_ROW_LIMIT = 200_000
# budget of the requeued-jobs read (generic tables): beyond it `retried` is not counted for that poll
REQUEUED_ROW_LIMIT = 10_000
CONNECT_TIMEOUT = 10.0

FinishedKey = tuple[str | None, str | None, str]  # (queue, kind, outcome)


def describe_endpoint(dsn: str) -> str:
    """``host:port`` (or the socket directory) of a DSN, for error texts; never the password."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = parts.hostname or (query.get("host") or ["localhost"])[0]
        port = parts.port or int((query.get("port") or ["5432"])[0])
    except ValueError:
        return "the database"
    if host.startswith("/"):
        return f"socket {host}/.s.PGSQL.{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def explain(exc: BaseException, connecting: bool, endpoint: str) -> SourceFailure:
    """Classify a failure and say what happened in words an operator can act on."""
    if isinstance(exc, SourceFailure):
        return exc
    if isinstance(exc, socket.gaierror):
        host = endpoint.rsplit(":", 1)[0]
        return SourceFailure("connection", f"could not resolve host {host} ({exc.strerror or exc})")
    if isinstance(exc, ConnectionRefusedError):
        return SourceFailure("connection", f"connection refused by {endpoint}")
    if isinstance(exc, asyncio.TimeoutError):
        return SourceFailure(
            "connection" if connecting else "timeout", f"no answer from {endpoint}"
        )
    text = str(exc).strip() or type(exc).__name__
    if connecting:
        # refused, unknown database, bad password, too many clients, starting up
        return SourceFailure("connection", f"cannot connect to {endpoint}: {text}")
    if isinstance(exc, (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError)):
        return SourceFailure("timeout", f"{text} (on {endpoint})")
    if isinstance(exc, (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
        return SourceFailure("connection", f"connection to {endpoint} lost during poll: {text}")
    return SourceFailure("query", text)


def capabilities_of(target: Target, preset: Preset, finished_counting: bool) -> Capabilities:
    return Capabilities(
        preset=target.preset_name,
        outcomes=preset.outcomes,  # type: ignore[arg-type]
        default_stale_after=preset.default_stale_after,
        self_rescue=preset.self_rescue,
        finished_counting=finished_counting,
        terminal_states=preset.terminal is not None,
        stale_jobs=preset.stale_jobs is not None,
    )


class PostgresSource:
    """Reads one PostgreSQL target (see the module docstring for the rules it keeps)."""

    def __init__(self, target: Target, connect_timeout: float = CONNECT_TIMEOUT):
        self.target = target
        self.connect_timeout = min(CONNECT_TIMEOUT, connect_timeout)
        self.preset = resolve_preset(target)
        self.endpoint = describe_endpoint(target.dsn or "")
        self.capabilities = capabilities_of(target, self.preset, finished_counting=False)
        self.tail: FinishedTail | None = None
        self.requeues = RequeueTracker()
        self._requeue_budget_warned = False
        # counted (the tail has marked them seen) but not yet handed over: a read that fails after
        # counting hands them over with the next successful one, so none is lost
        self._unreported: list[Finished] = []
        self._backfilled: list[Finished] = []
        self._conn: asyncpg.Connection | None = None
        self._closing: set[asyncpg.Connection] = set()  # closing gracefully, until they are closed
        self._prepared = False
        self.connecting = False  # inside connect: a failure now is a connection failure

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    # -- connection -------------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        timeout_ms = int(self.target.statement_timeout * 1000)
        settings = {
            "application_name": f"jobqueue-exporter/{self.target.name}"[:63],
            "statement_timeout": str(timeout_ms),
            "lock_timeout": str(int(self.target.lock_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(timeout_ms * 2 + 1000),
            "default_transaction_read_only": "on",
            # a poll runs each statement once per interval: planning is cheap, while a generic plan
            # of a prepared statement (chosen after five runs) can walk a whole table where the
            # custom plan reads a partial index (the requeued read did, measured in bench/)
            "plan_cache_mode": "force_custom_plan",
        }
        schema = self.target.schema_ or self.preset.schema
        if schema:
            settings["search_path"] = generic.quote_ident(schema)
        return settings

    async def _connect(self) -> asyncpg.Connection:
        dsn = self.target.resolve_dsn()
        self.endpoint = describe_endpoint(dsn)
        conn = await asyncpg.connect(
            dsn,
            timeout=self.connect_timeout,
            server_settings=self._server_settings(),
            # backstop if the network, not the server, hangs: the server cancels first
            command_timeout=self.target.statement_timeout + 5.0,
        )
        self._conn = conn
        return conn

    def abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
        # a graceful close waits on the server twice (the CancelRequest of a query in flight, then
        # the Terminate handshake), up to 2 s when it does not answer: cut those short too
        for closing in list(self._closing):
            closing.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        self._closing.add(conn)
        try:
            await asyncio.wait_for(conn.close(), timeout=2.0)
        except BaseException:
            conn.terminate()
        finally:
            self._closing.discard(conn)

    def explain(self, exc: BaseException, connecting: bool) -> SourceFailure:
        return explain(exc, connecting, self.endpoint)

    def actions(self) -> PostgresActions:
        """Job verbs on a session of their own, with this source's checked preset."""
        return PostgresActions(self.target, lambda: self.preset)

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        """Check tables/columns exist, build generic SQL with real column types, decide counting."""
        self.preset = await check_schema(conn, self.target, self.preset)
        counting = await self._decide_finished_counting(conn)
        self.capabilities = capabilities_of(self.target, self.preset, counting)

    async def _decide_finished_counting(self, conn: asyncpg.Connection) -> bool:
        preset, mode = self.preset, self.target.finished_counting
        if mode == "off" or not preset.finished_tail.sql:
            return False
        if preset.finished_index is None:
            return True
        schema = self.target.schema_ or preset.schema
        table, column = preset.finished_index
        # leading columns of every index on the table, e.g. [["finished_at"], ["queue", "finished_at"]]
        indexes = await conn.fetch(
            """
            SELECT array(SELECT a.attname::text FROM unnest(i.indkey[0:1]) WITH ORDINALITY AS k(attnum, n)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         ORDER BY k.n) AS columns
            FROM pg_index i
            WHERE i.indrelid = to_regclass(
                      CASE WHEN $1::text IS NULL THEN quote_ident($2) ELSE quote_ident($1) || '.' || quote_ident($2) END)
            """,
            schema,
            table,
        )
        leading = [list(r["columns"]) for r in indexes]
        if any(columns[:1] == [column] for columns in leading):
            return True
        per_queue = preset.finished_per_queue
        if per_queue is not None and [per_queue.queue_column, column] in (c[:2] for c in leading):
            # an index on (queue, finished): read each queue's tail through it
            self.preset = dataclasses.replace(
                preset, finished_tail=per_queue.tail, finished_backfill=per_queue.backfill
            )
            log.info(
                "target %s: counting finished jobs per queue through the index on %s (%s, %s)",
                self.target.name,
                table,
                per_queue.queue_column,
                column,
            )
            return True
        if mode == "on":
            return True
        log.warning(
            "target %s: no index leads with %s.%s (or with %s), so counting finished jobs would "
            "scan the table; finished-job counters and success ratio are off. Create one, e.g. "
            "CREATE INDEX CONCURRENTLY ON %s (%s), or set finished_counting: on to accept the scan",
            self.target.name,
            table,
            column,
            f"({per_queue.queue_column}, {column})" if per_queue else "nothing else usable",
            table,
            column,
        )
        return False

    # -- one read ---------------------------------------------------------------------------------

    async def read(self, stale_after: float, want_stale: bool) -> Reading:
        if self.connected:
            conn = self._conn
        else:
            # stays true if connecting fails (the poller classifies the failure after the fact)
            self.connecting = True
            conn = await self._connect()
            self.connecting = False
        assert conn is not None
        if not self._prepared:
            await self._prepare(conn)
            self._prepared = True
        preset = self.preset
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            xmin, xmax, db_now = await conn.fetchrow(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint,"
                " pg_snapshot_xmax(pg_current_snapshot())::text::bigint, now()"
            )
            snap = SnapshotInfo(xmin=xmin, xmax=xmax, now=db_now)
            live = await conn.fetch(preset.live.sql, stale_after, *preset.live.params)
            terminal = None
            if self.target.count_terminal_states and preset.terminal is not None:
                terminal = await conn.fetch(preset.terminal.sql, *preset.terminal.params)
            if self.capabilities.finished_counting:
                await self._count_finished(conn, snap)
                if preset.requeued is not None:
                    await self._count_requeued(conn)
            stale = None
            if want_stale and preset.stale_jobs is not None:
                statement = preset.stale_jobs
                rows = await conn.fetch(statement.sql, stale_after, *statement.params)
                stale = [StaleJob(r["id"], r["queue"], r["kind"], r["token"]) for r in rows]
        finished, self._unreported = self._unreported, []
        backfill, self._backfilled = self._backfilled, []
        return Reading(
            live=[LiveRow(*row) for row in live],
            terminal=[TerminalRow(*row) for row in terminal] if terminal is not None else None,
            finished=finished,
            backfill=backfill,
            stale=stale,
        )

    def _report(self, counts: Counter[FinishedKey], at: float) -> None:
        self._unreported += [
            Finished(queue, kind, outcome, jobs, at)  # type: ignore[arg-type]
            for (queue, kind, outcome), jobs in counts.items()
        ]

    async def _count_finished(self, conn: asyncpg.Connection, snap: SnapshotInfo) -> None:
        """Count jobs finished since the last read, each once (see ``watermark.py``)."""
        preset = self.preset
        high = None
        if preset.finished_high is not None:
            high = await conn.fetchval(preset.finished_high.sql, *preset.finished_high.params)
        if self.tail is None:
            await self._backfill(conn, snap, high)
            return
        rows = await conn.fetch(
            preset.finished_tail.sql, self.tail.floor, TAIL_ROW_LIMIT, *preset.finished_tail.params
        )
        finished = [
            FinishedRow(r["key"], r["row_id"], r["queue"], r["kind"], r["outcome"]) for r in rows
        ]
        counts: Counter[FinishedKey] = Counter()
        for row in self.tail.take(finished, snap, high, limit_hit=len(rows) >= TAIL_ROW_LIMIT):
            counts[(row.queue, row.kind, row.outcome)] += 1
        self._report(counts, time.time())

    async def _count_requeued(self, conn: asyncpg.Connection) -> None:
        """Count failed attempts requeued since the last read (tables without a retry event)."""
        statement = self.preset.requeued
        assert statement is not None
        rows = await conn.fetch(statement.sql, REQUEUED_ROW_LIMIT, *statement.params)
        complete = len(rows) < REQUEUED_ROW_LIMIT
        if not complete and not self._requeue_budget_warned:
            self._requeue_budget_warned = True
            log.warning(
                "target %s: %d or more jobs wait for a retry; requeued attempts (outcome=retried) "
                "are not counted while that many wait",
                self.target.name,
                REQUEUED_ROW_LIMIT,
            )
        requeued = [RequeuedRow(r["row_id"], r["token"], r["queue"], r["kind"]) for r in rows]
        counts: Counter[FinishedKey] = Counter()
        for row in self.requeues.take(requeued, complete):
            counts[(row.queue, row.kind, "retried")] += 1
        self._report(counts, time.time())

    async def _backfill(self, conn: asyncpg.Connection, snap: SnapshotInfo, high: Any) -> None:
        """Report what finished within the success window with one bounded query (for the ratio
        only: counters start at 0), and start the tail above it."""
        preset = self.preset
        window = self.target.success_window
        rows = await conn.fetch(
            preset.finished_backfill.sql,
            window,
            BACKFILL_ROW_LIMIT,
            *preset.finished_backfill.params,
        )
        baseline = [
            FinishedRow(r["key"], r["row_id"], r["queue"], r["kind"], r["outcome"]) for r in rows
        ]
        tail = FinishedTail(preset.finished_key)
        if preset.finished_key == "id":
            ids = [r.key for r in baseline if isinstance(r.key, int)]
            floor = min(ids, default=high + 1) - 1
        else:
            floor = snap.now - timedelta(seconds=window)
        tail.start(floor, baseline, snap, high)
        self.tail = tail
        # finish times come from the database clock; the window runs on this host's clock
        skew = snap.now.timestamp() - time.time()
        buckets: dict[int, Counter[FinishedKey]] = {}
        for r in rows:
            second = buckets.setdefault(int(r["finished_at"]), Counter())
            second[(r["queue"], r["kind"], r["outcome"])] += 1
        self._backfilled = [
            Finished(queue, kind, outcome, jobs, second - skew)  # type: ignore[arg-type]
            for second in sorted(buckets)
            for (queue, kind, outcome), jobs in buckets[second].items()
        ]


__all__ = ["PostgresSource", "SchemaProblem", "describe_endpoint", "explain"]
