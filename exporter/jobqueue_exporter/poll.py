"""Polling one target: connection, schema check, one consistent read per interval -> snapshot.

Safety rules for the database, all enforced here:

* one connection per target, opened lazily and closed after any error (never two at once);
* ``statement_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout`` are set on the server
  side at connect, plus ``application_name`` and ``default_transaction_read_only``;
* every poll is one ``REPEATABLE READ READ ONLY`` transaction, so all statements see one snapshot;
* polls of one target never overlap; failures back off exponentially with jitter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from . import __version__
from .config import CANONICAL_STATES, Config, StateMapping, TableMapping, Target
from .presets import PRESETS, Preset, generic
from .recovery import Recoverer, RecoveryState, StaleJob
from .snapshot import LabelPolicy, SuccessWindow, TargetSnapshot, build_snapshot, forget_keys
from .watermark import FinishedRow, FinishedTail, RequeuedRow, RequeueTracker, SnapshotInfo

log = logging.getLogger(__name__)

TAIL_ROW_LIMIT = 100_000
BACKFILL_ROW_LIMIT = 200_000
# budget of the requeued-jobs read (generic tables): beyond it `retried` is not counted for that poll
REQUEUED_ROW_LIMIT = 10_000
CONNECT_TIMEOUT = 10.0
MIN_POLL_DEADLINE = 2.0


class SchemaProblem(Exception):
    """The database lacks a table/column the target's preset or mapping needs."""


@dataclass
class TargetState:
    """Everything the metrics and HTTP layers read about one target."""

    name: str
    preset: str
    labels: dict[str, str]
    up: bool | None = None  # None until the first poll finished
    snapshot: TargetSnapshot | None = None
    last_success: float | None = None
    last_error: str | None = None
    down_since: float | None = None  # Unix time of the first failed poll of the current outage
    last_poll_duration: float | None = None
    errors: Counter[str] = field(default_factory=Counter)
    finished: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    finished_counting: bool = False
    window: SuccessWindow | None = None
    recovery: RecoveryState | None = None


def resolve_preset(target: Target, types: dict[str, generic.ColumnType] | None = None) -> Preset:
    if target.table is not None:
        return generic.build(target.table, types, target.recovery)
    return PRESETS[target.preset_name]


def stale_after_for(target: Target, preset: Preset) -> float:
    """Seconds after which a running job counts as stale: the target's setting, else the preset's."""
    return target.stale_after if target.stale_after is not None else preset.default_stale_after


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


def poll_deadline(interval: float, statement_timeout: float) -> float:
    """Client-side limit for one poll: a server that stops answering (no RST, no error) must mark the
    target down at the first poll that cannot finish. Long enough for the server-side
    statement_timeout to fire first on a slow statement, short enough to end before the next poll."""
    return max(MIN_POLL_DEADLINE, min(interval, 2 * statement_timeout))


class PollFailure(Exception):
    """A failed poll: ``reason`` is the metrics label, ``str()`` what an operator reads."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def explain(exc: BaseException, connecting: bool, endpoint: str) -> PollFailure:
    """Classify a poll failure and say what happened in words an operator can act on."""
    if isinstance(exc, PollFailure):
        return exc
    if isinstance(exc, SchemaProblem):
        return PollFailure("schema", str(exc))
    if isinstance(exc, socket.gaierror):
        host = endpoint.rsplit(":", 1)[0]
        return PollFailure("connection", f"could not resolve host {host} ({exc.strerror or exc})")
    if isinstance(exc, ConnectionRefusedError):
        return PollFailure("connection", f"connection refused by {endpoint}")
    if isinstance(exc, asyncio.TimeoutError):
        return PollFailure("connection" if connecting else "timeout", f"no answer from {endpoint}")
    text = str(exc).strip() or type(exc).__name__
    if connecting:
        # refused, unknown database, bad password, too many clients, starting up
        return PollFailure("connection", f"cannot connect to {endpoint}: {text}")
    if isinstance(exc, (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError)):
        return PollFailure("timeout", f"{text} (on {endpoint})")
    if isinstance(exc, (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
        return PollFailure("connection", f"connection to {endpoint} lost during poll: {text}")
    return PollFailure("query", text)


async def check_schema(conn: asyncpg.Connection, target: Target, preset: Preset) -> Preset:
    """Check the preset's tables and columns exist (SchemaProblem naming what is missing) and return the
    preset to use: for a table mapping, rebuilt with the columns' real types."""
    schema = target.schema_ or preset.schema
    # to_regclass resolves unqualified names through search_path, as the statements will
    rows = await conn.fetch(
        """
        SELECT t.name AS table_name, a.attname AS column_name,
               format_type(a.atttypid, NULL) AS data_type,
               n.nspname AS udt_schema, ty.typname AS udt_name
        FROM unnest($1::text[]) AS t(name)
        JOIN pg_class c ON c.oid = to_regclass(
            CASE WHEN $2::text IS NULL THEN quote_ident(t.name)
                 ELSE quote_ident($2::text) || '.' || quote_ident(t.name) END)
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        JOIN pg_type ty ON ty.oid = a.atttypid
        JOIN pg_namespace n ON n.oid = ty.typnamespace
        """,
        list(preset.required_columns),
        schema,
    )
    found: dict[str, dict[str, generic.ColumnType]] = {}
    for row in rows:
        found.setdefault(row["table_name"], {})[row["column_name"]] = generic.ColumnType(
            row["data_type"], row["udt_schema"], row["udt_name"]
        )
    problems = []
    where = f"schema {schema}" if schema else "the search_path"
    missing_tables = [table for table in preset.required_columns if table not in found]
    elsewhere = await _schemas_holding(conn, missing_tables) if missing_tables else {}
    for table, columns in preset.required_columns.items():
        if table not in found:
            problem = f"table {table!r} not found in {where}"
            others = [s for s in elsewhere.get(table, []) if s != schema]
            if others:
                problem += (
                    f"; a table of that name exists in schema {', '.join(others)}: set "
                    f"schema: {others[0]} on the target"
                )
            problems.append(problem)
            continue
        missing = [c for c in columns if c not in found[table]]
        for column in missing:
            problems.append(
                f"table {table!r} has no column {column!r} (columns: {', '.join(sorted(found[table]))})"
            )
    if problems:
        raise SchemaProblem(f"target {target.name}: " + "; ".join(problems))
    if target.table is None:
        return preset
    problems = generic.timestamp_problems(target.table, found[target.table.name])
    if problems:
        raise SchemaProblem(f"target {target.name}: " + "; ".join(problems))
    await _check_state_values(conn, target, found[target.table.name])
    return resolve_preset(target, found[target.table.name])


async def _schemas_holding(conn: asyncpg.Connection, tables: list[str]) -> dict[str, list[str]]:
    """Schemas (readable by this role) holding a table of each name, for a "not found" hint."""
    rows = await conn.fetch(
        "SELECT c.relname AS table_name, array_agg(n.nspname::text ORDER BY n.nspname) AS schemas"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        " AND has_schema_privilege(n.oid, 'USAGE') GROUP BY c.relname",
        tables,
    )
    return {r["table_name"]: list(r["schemas"]) for r in rows}


async def _check_state_values(
    conn: asyncpg.Connection, target: Target, columns: dict[str, generic.ColumnType]
) -> None:
    """Every value the state column holds must be mapped to a state or ignored, and every mapped value
    must be one it can hold: a typo would silently read 0 (or fail every poll). The column's values are
    known completely from an enum type or a CHECK constraint listing them, else sampled from the
    newest rows."""
    table = target.table
    assert table is not None
    mapping = table.state
    column = columns[mapping.column]
    where = f"{table.name}.{mapping.column}"
    mapped = mapping.values_for(*CANONICAL_STATES, "ignore")
    labels = await conn.fetchval(
        "SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_enum e"
        " JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace"
        " WHERE n.nspname = $1 AND t.typname = $2",
        column.udt_schema,
        column.udt_name,
    )
    if labels is not None:
        unknown = [v for v in mapped if v not in labels]
        if unknown:
            raise SchemaProblem(
                f"target {target.name}: state value(s) {', '.join(map(repr, unknown))} are not "
                f"labels of enum {column.udt_name} (labels: {', '.join(labels)})"
            )
        held, complete = list(labels), True
    else:
        allowed = await _check_constraint_values(conn, target, table)
        if allowed is not None:
            name, values = allowed
            unknown = [v for v in mapped if v not in values]
            if unknown:
                raise SchemaProblem(
                    f"target {target.name}: state value(s) {', '.join(map(repr, unknown))} are not "
                    f"allowed by CHECK constraint {name} of {where} (allowed: {', '.join(values)})"
                )
            held, complete = values, True
        else:
            rows = await conn.fetch(generic.state_values_sample(table), generic.STATE_SAMPLE_ROWS)
            held, complete = sorted(r["value"] for r in rows), False
    unmapped = [value for value in held if mapping.state_of(value) is None]
    if unmapped:
        source = (
            "the column's type allows it"
            if complete
            else f"found among the newest {generic.STATE_SAMPLE_ROWS} rows"
        )
        raise SchemaProblem(
            f"target {target.name}: "
            + "; ".join(_unmapped_value(value, where, mapping) for value in unmapped)
            + f" ({source}). Map every value under table.state.<state> or list it in "
            "table.state.ignore"
        )


def _unmapped_value(value: str, where: str, mapping: StateMapping) -> str:
    text = f"value {value!r} of {where} is mapped to no state"
    mapped = mapping.values_for(*CANONICAL_STATES)
    close = difflib.get_close_matches(value, mapped, n=1, cutoff=0.6)
    if close:
        return f"{text}; the mapping has {close[0]!r} for {mapping.state_of(close[0])}: a typo?"
    return text


# `status IN ('a', 'b')` and `status = ANY (ARRAY['a', 'b'])` both read back as = ANY (ARRAY[...])
_ANY_ARRAY = re.compile(r"=\s*ANY\s*\(+\s*ARRAY\s*\[(.*?)\]", re.S)
_LITERAL = re.compile(r"'((?:[^']|'')*)'")


async def _check_constraint_values(
    conn: asyncpg.Connection, target: Target, table: TableMapping
) -> tuple[str, list[str]] | None:
    """(constraint name, values) of a CHECK constraint on the state column alone that lists its
    values; None when there is none (or its expression is something else)."""
    schema = target.schema_ or table.schema_
    rows = await conn.fetch(
        """
        SELECT c.conname AS name, pg_get_constraintdef(c.oid) AS definition
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.contype = 'c' AND cardinality(c.conkey) = 1 AND a.attname = $3
          AND c.conrelid = to_regclass(
              CASE WHEN $1::text IS NULL THEN quote_ident($2)
                   ELSE quote_ident($1) || '.' || quote_ident($2) END)
        ORDER BY c.conname
        """,
        schema,
        table.name,
        table.state.column,
    )
    for row in rows:
        match = _ANY_ARRAY.search(row["definition"])
        if match and " OR " not in row["definition"] and " AND " not in row["definition"]:
            values = [v.replace("''", "'") for v in _LITERAL.findall(match.group(1))]
            if values:
                return row["name"], values
    return None


StateListener = Callable[["TargetState"], Awaitable[None]]


class TargetPoller:
    """Polls one target on its interval and publishes its state to ``on_update`` (the metrics cache)
    after every poll and recovery step."""

    def __init__(self, config: Config, target: Target, on_update: StateListener | None = None):
        self.target = target
        self.interval = config.interval_for(target)
        self.deadline = poll_deadline(self.interval, target.statement_timeout)
        self.endpoint = describe_endpoint(target.dsn or "")
        self.on_update = on_update
        self.preset = resolve_preset(target)
        self.stale_after = stale_after_for(target, self.preset)
        self.policy = LabelPolicy(
            target.queues, target.max_kinds_per_queue, target.max_queues, target.label_ttl
        )
        self.state = TargetState(
            name=target.name,
            preset=target.preset_name,
            labels=dict(target.labels),
            window=SuccessWindow(target.success_window),
        )
        self.tail: FinishedTail | None = None
        self.requeues = RequeueTracker()
        self._requeue_budget_warned = False
        self.recoverer: Recoverer | None = None
        self._stale_jobs: list[StaleJob] = []
        if target.recovery.enabled and self.preset.stale_jobs is not None:
            self.recoverer = Recoverer(target, self.preset, self.stale_after)
            self.recoverer.label = self.policy.label
            self.state.recovery = self.recoverer.state
        self._conn: asyncpg.Connection | None = None
        self._prepared = False
        self._lock = asyncio.Lock()
        self._failures = 0

    # -- connection -------------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        timeout_ms = int(self.target.statement_timeout * 1000)
        settings = {
            "application_name": f"jobqueue-exporter/{self.target.name}"[:63],
            "statement_timeout": str(timeout_ms),
            "lock_timeout": str(int(self.target.lock_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(timeout_ms * 2 + 1000),
            "default_transaction_read_only": "on",
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
            timeout=min(CONNECT_TIMEOUT, self.deadline),
            server_settings=self._server_settings(),
            # backstop if the network, not the server, hangs: the server cancels first
            command_timeout=self.target.statement_timeout + 5.0,
        )
        self._conn = conn
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if self.recoverer is not None:
            await self.recoverer.close()
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=2.0)
        except BaseException:
            conn.terminate()

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        """Check tables/columns exist, build generic SQL with real column types, decide counting."""
        self.preset = await check_schema(conn, self.target, self.preset)
        if self.recoverer is not None:
            self.recoverer.preset = self.preset
        schema = self.target.schema_ or self.preset.schema
        self.state.finished_counting = await self._decide_finished_counting(conn, schema)

    async def _decide_finished_counting(self, conn: asyncpg.Connection, schema: str | None) -> bool:
        preset, mode = self.preset, self.target.finished_counting
        if mode == "off" or not preset.finished_tail.sql:
            return False
        if preset.finished_index is None:
            return True
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
            if self.recoverer is not None:
                self.recoverer.preset = self.preset
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

    # -- one poll ---------------------------------------------------------------------------------

    async def poll_once(self) -> TargetSnapshot:
        """Read the target once and publish the snapshot; on failure publish 'down' (with the cause in
        ``state.last_error``) and re-raise. The whole poll, connecting included, must finish within
        ``deadline``."""
        async with self._lock:
            started = time.monotonic()
            phase = {"connecting": self._conn is None or self._conn.is_closed()}
            try:
                snapshot = await asyncio.wait_for(self._poll(phase), timeout=self.deadline)
            except asyncio.CancelledError:
                self.state.last_poll_duration = time.monotonic() - started
                await self.close()
                raise
            except BaseException as exc:
                self.state.last_poll_duration = time.monotonic() - started
                failure = explain(exc, phase["connecting"], self.endpoint)
                if isinstance(exc, asyncio.TimeoutError):
                    # the server stopped answering: a graceful close would wait on it too
                    self._abort_connection()
                    failure = PollFailure(failure.reason, f"{failure} within {self.deadline:g}s")
                self.state.errors[failure.reason] += 1
                self.state.up = False
                self.state.snapshot = None  # never serve the last values as current
                self.state.last_error = f"{failure.reason}: {failure}"
                self.state.down_since = self.state.down_since or time.time()
                await self.close()
                await self.publish()
                raise
            self.state.last_poll_duration = time.monotonic() - started
            self.state.up = True
            self.state.snapshot = snapshot
            self.state.last_success = snapshot.taken_at
            self.state.last_error = None
            self.state.down_since = None
            await self.publish()
            return snapshot

    async def _poll(self, phase: dict[str, bool]) -> TargetSnapshot:
        conn = await self._connect() if phase["connecting"] else self._conn
        assert conn is not None
        phase["connecting"] = False
        if not self._prepared:
            await self._prepare(conn)
            self._prepared = True
        return await self._read(conn)

    def _abort_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def publish(self) -> None:
        """Hand the current state to the metrics layer (rendered once, served until the next)."""
        if self.on_update is not None:
            await self.on_update(self.state)

    async def _read(self, conn: asyncpg.Connection) -> TargetSnapshot:
        preset = self.preset
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            xmin, xmax, db_now = await conn.fetchrow(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint,"
                " pg_snapshot_xmax(pg_current_snapshot())::text::bigint, now()"
            )
            snap = SnapshotInfo(xmin=xmin, xmax=xmax, now=db_now)
            live = await conn.fetch(preset.live.sql, self.stale_after, *preset.live.params)
            terminal = None
            if self.target.count_terminal_states and preset.terminal is not None:
                terminal = await conn.fetch(preset.terminal.sql, *preset.terminal.params)
            if self.state.finished_counting:
                await self._count_finished(conn, snap)
                if preset.requeued is not None:
                    await self._count_requeued(conn)
            if self.recoverer is not None:
                stale = preset.stale_jobs
                assert stale is not None
                rows = await conn.fetch(stale.sql, self.stale_after, *stale.params)
                self._stale_jobs = [
                    StaleJob(r["id"], r["queue"], r["kind"], r["token"]) for r in rows
                ]
        now = time.time()
        snapshot = build_snapshot(
            self.policy,
            [tuple(r) for r in live],
            [tuple(r) for r in terminal] if terminal is not None else None,
            taken_at=now,
        )
        # (queue, kind) unseen for label_ttl: no longer served, counters included; slots freed
        expired = self.policy.expire()
        recovered = self.state.recovery.recovered if self.state.recovery else None
        forget_keys(expired, snapshot.series, self.state.finished, recovered)
        if self.state.window is not None:
            self.state.window.forget(expired)
        for queue, kind in snapshot.series:
            for outcome in preset.outcomes:
                # present at 0 so the first failure is an increase, not a new series
                self.state.finished.setdefault((queue, kind, outcome), 0)
        return snapshot

    async def _count_finished(self, conn: asyncpg.Connection, snap: SnapshotInfo) -> None:
        """Count jobs finished since the last poll. Applied as soon as read: the tail has already
        marked them seen, so a later failure in this poll must not lose them."""
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
        counts: Counter[tuple[str, str, str]] = Counter()
        for row in self.tail.take(finished, snap, high, limit_hit=len(rows) >= TAIL_ROW_LIMIT):
            key = self.policy.label(row.queue, row.kind)
            if key is not None:
                counts[(*key, row.outcome)] += 1
        self.state.finished.update(counts)
        assert self.state.window is not None
        self.state.window.add(time.time(), counts)

    async def _count_requeued(self, conn: asyncpg.Connection) -> None:
        """Count failed attempts requeued since the last poll (tables without a retry event)."""
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
        counts: Counter[tuple[str, str, str]] = Counter()
        for row in self.requeues.take(requeued, complete):
            key = self.policy.label(row.queue, row.kind)
            if key is not None:
                counts[(*key, "retried")] += 1
        self.state.finished.update(counts)
        assert self.state.window is not None
        self.state.window.add(time.time(), counts)

    async def _backfill(self, conn: asyncpg.Connection, snap: SnapshotInfo, high: Any) -> None:
        """Fill the success window with one bounded query, and start the tail above it."""
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
        self.tail = FinishedTail(preset.finished_key)
        if preset.finished_key == "id":
            ids = [r.key for r in baseline if isinstance(r.key, int)]
            floor = min(ids, default=high + 1) - 1
        else:
            floor = snap.now - timedelta(seconds=window)
        self.tail.start(floor, baseline, snap, high)
        # finish times come from the database clock; the window runs on this host's clock
        skew = snap.now.timestamp() - time.time()
        buckets: dict[int, Counter[tuple[str, str, str]]] = {}
        for r in rows:
            key = self.policy.label(r["queue"], r["kind"])
            if key is not None:
                buckets.setdefault(int(r["finished_at"]), Counter())[(*key, r["outcome"])] += 1
        assert self.state.window is not None
        for second in sorted(buckets):
            self.state.window.add(second - skew, buckets[second])

    # -- loop -------------------------------------------------------------------------------------

    async def _recover(self, stale: list[StaleJob] | None) -> None:
        """Hand this poll's stale jobs (None after a failed poll) to recovery, when enabled."""
        if self.recoverer is not None:
            await self.recoverer.after_poll(stale)

    def next_delay(self) -> float:
        """Regular interval after success; exponential backoff with jitter after failures."""
        if self._failures == 0:
            return self.interval
        cap = max(4 * self.interval, 1.0)
        base = min(self.interval * 2 ** (self._failures - 1), cap)
        return base * random.uniform(0.5, 1.0)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.poll_once()
                if self.recoverer is not None:
                    await self._recover(self._stale_jobs)
                    await self.publish()
                if self._failures:
                    log.info(
                        "target %s: polling again after %d failure(s)",
                        self.target.name,
                        self._failures,
                    )
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an outage must never stop the loop
                if self.recoverer is not None:
                    await self._recover(None)
                    await self.publish()
                self._failures += 1
                log.warning(
                    "target %s: poll failed (%s)",
                    self.target.name,
                    self.state.last_error or exc,
                    extra={"target": self.target.name, "failures": self._failures},
                )
            delay = self.next_delay()
            if self._failures == 0:
                delay = max(0.0, delay - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
        await self.close()


def build_info() -> dict[str, str]:
    import platform

    return {"version": __version__, "python_version": platform.python_version()}
