"""The ``generic`` preset: SQL built from a :class:`~jobqueue_exporter.config.TableMapping`.

Identifiers from the config were validated as plain identifiers and are quoted again here; native state
values are passed as query parameters cast to the column's own type, so nothing from the config is ever
spliced into SQL as text. Column types (from ``information_schema``) decide how timestamps are compared:
``timestamp without time zone`` columns are read as UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from ....config import Recovery, TableMapping
from . import PerQueueTail, Preset, Statement


@dataclass(frozen=True)
class ColumnType:
    data_type: str
    udt_schema: str
    udt_name: str


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Constants:
    """Constant parameters appended after a statement's runtime ones, numbered from ``first``."""

    def __init__(self, first: int, array_cast: str):
        self.first = first
        self.array_cast = array_cast
        self.values: list[Any] = []

    def values_of(self, values: list[str]) -> str:
        """A list of native state values, as an array of the state column's type."""
        self.values.append(list(values))
        return f"${self.first + len(self.values) - 1}{self.array_cast}"

    def value(self, value: Any, cast: str) -> str:
        self.values.append(value)
        return f"${self.first + len(self.values) - 1}::{cast}"

    def statement(self, sql: str) -> Statement:
        return Statement(sql, tuple(self.values))


def required_columns(table: TableMapping) -> dict[str, tuple[str, ...]]:
    ts = table.timestamps
    columns = [table.id, table.state.column, table.queue, table.kind, table.attempts]
    columns += [table.last_error, table.lock_owner]
    columns += [ts.enqueued, ts.eligible, ts.started, ts.finished]
    columns += [table.stale.column if table.stale else None]
    return {table.name: tuple(dict.fromkeys(c for c in columns if c))}


# how many of the newest rows (primary key order) are read at startup to find the state values a free-text
# column holds: one backward walk of the primary key index, once per connection
STATE_SAMPLE_ROWS = 10_000


def state_values_sample(table: TableMapping) -> str:
    """The distinct state values among the newest ``$1`` rows, as text (NULLs left out)."""
    rel = quote_ident(table.name)
    if table.schema_:
        rel = f"{quote_ident(table.schema_)}.{rel}"
    state, job_id = quote_ident(table.state.column), quote_ident(table.id)
    return f"""
SELECT DISTINCT value FROM (
    SELECT {state}::text AS value FROM {rel} ORDER BY {job_id} DESC LIMIT $1
) AS newest
WHERE value IS NOT NULL
"""


INTEGER_TYPES = {"smallint", "integer", "bigint"}
EPOCH_TYPES = INTEGER_TYPES | {"numeric", "double precision", "real"}
TIMESTAMP_TYPES = {"timestamp with time zone", "timestamp without time zone"}
EPOCH_FACTOR = {"seconds": 1, "milliseconds": 1000}


class TimeColumns:
    """How the mapping's time columns are stored: ``timestamptz``, ``timestamp`` holding UTC, or a number
    of seconds/milliseconds since the epoch (``timestamps.epoch_unit``). Statements read every time column
    as timestamptz, but compare and assign the raw column, so an index on it stays usable."""

    def __init__(self, types: dict[str, ColumnType], epoch_unit: str | None):
        self.types = types
        self.factor = EPOCH_FACTOR[epoch_unit] if epoch_unit else None

    def _type(self, name: str) -> str:
        return self.types.get(name, ColumnType("timestamp with time zone", "", "")).data_type

    def naive(self, name: str) -> bool:
        return self._type(name) == "timestamp without time zone"

    def epoch(self, name: str) -> bool:
        return self.factor is not None and self._type(name) in EPOCH_TYPES

    def read(self, name: str) -> str:
        """The column as timestamptz."""
        column = quote_ident(name)
        if self.epoch(name):
            return f"to_timestamp({column}::float8 / {self.factor})"
        return f"({column} AT TIME ZONE 'UTC')" if self.naive(name) else column

    def stored(self, name: str, value: str) -> str:
        """A timestamptz expression as the column stores it (for SET)."""
        if self.epoch(name):
            return f"round(extract(epoch FROM {value}) * {self.factor})::{self._type(name)}"
        return f"(({value}) AT TIME ZONE 'UTC')" if self.naive(name) else value

    def bound(self, name: str, value: str, op: str) -> str:
        """The right-hand side of ``column <op> value`` in the column's own type (so ``>``/``<`` on the
        raw column means the same as on the timestamp, and an index on it applies)."""
        if self.epoch(name):
            scaled = f"extract(epoch FROM {value}) * {self.factor}"
            if self._type(name) in INTEGER_TYPES:
                # for whole numbers: x > v  <=>  x > floor(v),  x < v  <=>  x < ceil(v)
                rounding = "floor" if op == ">" else "ceil"
                return f"{rounding}({scaled})::{self._type(name)}"
            return f"({scaled})::{self._type(name)}"
        return self.stored(name, value)


def time_columns(table: TableMapping) -> list[str]:
    t = table.timestamps
    columns = [t.enqueued, t.eligible, t.started, t.finished]
    columns += [table.stale.column if table.stale else None]
    return list(dict.fromkeys(c for c in columns if c))


def timestamp_problems(table: TableMapping, types: dict[str, ColumnType]) -> list[str]:
    """Time columns whose type the mapping cannot read (or must declare), with the fix."""
    problems = []
    unit = table.timestamps.epoch_unit
    for name in time_columns(table):
        data_type = types[name].data_type if name in types else "timestamp with time zone"
        if data_type in TIMESTAMP_TYPES or (unit and data_type in EPOCH_TYPES):
            continue
        if data_type in EPOCH_TYPES:
            problems.append(
                f"column {table.name}.{name} is {data_type}: if it holds epoch time, declare "
                "timestamps.epoch_unit: milliseconds (or seconds)"
            )
        else:
            problems.append(
                f"column {table.name}.{name} is {data_type}, not a time: map a timestamptz, "
                "timestamp or epoch seconds/milliseconds column"
            )
    return problems


def build(
    table: TableMapping,
    types: dict[str, ColumnType] | None = None,
    recovery: Recovery | None = None,
) -> Preset:
    """Build the statements; ``types`` maps column -> type (assumed timestamptz/text when unknown)."""
    types = types or {}
    rel = quote_ident(table.name)
    if table.schema_:
        rel = f"{quote_ident(table.schema_)}.{rel}"

    def col(name: str) -> str:
        return quote_ident(name)

    clock = TimeColumns(types, table.timestamps.epoch_unit)
    ts = clock.read

    state = col(table.state.column)
    state_type = types.get(table.state.column)
    if state_type and state_type.udt_name:
        array_cast = (
            f"::text[]::{quote_ident(state_type.udt_schema)}.{quote_ident(state_type.udt_name)}[]"
        )
    else:
        array_cast = "::text[]"

    def values(n: int) -> str:
        return f"${n}{array_cast}"

    mapping = table.state
    queue = f"{col(table.queue)}::text" if table.queue else "'default'"
    kind = f"{col(table.kind)}::text" if table.kind else "'default'"
    t = table.timestamps
    eligible_src = t.eligible or t.enqueued
    assert eligible_src is not None
    eligible = ts(eligible_src)
    started_src = t.started or (
        table.stale.column if table.stale and table.stale.kind == "started_before" else None
    )
    assert started_src is not None
    started = ts(started_src)
    since_eligible = (
        f"coalesce({eligible}, {ts(t.enqueued)})" if t.eligible and t.enqueued else eligible
    )
    retried = f"coalesce({col(table.attempts)}, 0) > 0" if table.attempts else "false"

    # lease: expiry passed (+ grace); started_before/heartbeat: older than stale_after
    rule = table.stale
    stale = f"{ts(rule.column) if rule else started} < now() - make_interval(secs => $1)"

    # $2 running values, $3 scheduled, $4 retrying, $5 all live values
    live = f"""
SELECT queue, kind, state, count(*) AS jobs,
       CASE WHEN state IN ('pending', 'running') THEN extract(epoch FROM now() - min(since))::float8 END
           AS oldest_age_seconds,
       count(*) FILTER (WHERE stale) AS stale_jobs
FROM (
    SELECT {queue} AS queue, {kind} AS kind,
           CASE WHEN {state} = ANY({values(2)}) THEN 'running'
                WHEN {eligible} IS NULL OR {eligible} <= now() THEN 'pending'
                WHEN {state} = ANY({values(3)}) THEN 'scheduled'
                WHEN {state} = ANY({values(4)}) THEN 'retrying'
                WHEN {retried} THEN 'retrying'
                ELSE 'scheduled' END AS state,
           CASE WHEN {state} = ANY({values(2)}) THEN {started} ELSE {since_eligible} END AS since,
           ({state} = ANY({values(2)}) AND coalesce({stale}, false)) AS stale
    FROM {rel}
    WHERE {state} = ANY({values(5)})
) AS live_rows
GROUP BY queue, kind, state
"""
    live_params = (
        mapping.running,
        mapping.scheduled,
        mapping.retrying,
        mapping.values_for("pending", "scheduled", "retrying", "running"),
    )

    terminal = f"""
SELECT {queue} AS queue, {kind} AS kind,
       CASE WHEN {state} = ANY({values(1)}) THEN 'failed'
            WHEN {state} = ANY({values(2)}) THEN 'dead' ELSE 'cancelled' END AS state,
       count(*) AS jobs
FROM {rel}
WHERE {state} = ANY({values(3)})
GROUP BY 1, 2, 3
"""
    terminal_params = (
        mapping.failed,
        mapping.dead,
        mapping.values_for("failed", "dead", "cancelled"),
    )

    finished_values = mapping.values_for("succeeded", "failed", "dead", "cancelled")
    outcome = f"""CASE WHEN {state} = ANY({values(3)}) THEN 'succeeded'
            WHEN {state} = ANY({values(4)}) THEN 'failed'
            WHEN {state} = ANY({values(5)}) THEN 'dead' ELSE 'cancelled' END"""
    outcome_params = (mapping.succeeded, mapping.failed, mapping.dead, finished_values)
    fin = t.finished
    tail = backfill = tail_per_queue = backfill_per_queue = ""
    if fin:
        # compare the raw column with the parameter converted, so an index on the column is usable
        after = f"{col(fin)} > {clock.bound(fin, '$1::timestamptz', '>')}"
        window = f"{col(fin)} > {clock.bound(fin, 'now() - make_interval(secs => $1)', '>')}"
        tail_columns = f"{ts(fin)} AS key, {col(table.id)}::text AS row_id"
        backfill_columns = f"{tail_columns}, extract(epoch FROM {ts(fin)})::float8 AS finished_at"

        def finished(columns: str, since: str, order: str, where: str = "true") -> str:
            return f"""
SELECT {columns}, {queue} AS queue, {kind} AS kind, {outcome} AS outcome
FROM {rel} AS j
WHERE {where} AND {since} AND {state} = ANY({values(6)})
ORDER BY {col(fin)} {order}
LIMIT $2"""

        tail = finished(tail_columns, after, "ASC")
        backfill = finished(backfill_columns, window, "DESC")
        if table.queue:
            tail_per_queue = _per_queue(rel, col(table.queue), finished, tail_columns, after, "ASC")
            backfill_per_queue = _per_queue(
                rel, col(table.queue), finished, backfill_columns, window, "DESC"
            )

    def cast(name: str, default: str) -> str:
        known = types.get(name)
        if known and known.udt_name:
            return f"{quote_ident(known.udt_schema)}.{quote_ident(known.udt_name)}"
        return default

    # the claim: when it was taken, and which attempt (both change when the job is claimed again)
    attempt = f"coalesce({col(table.attempts)}::text, '')" if table.attempts else "''"
    token = f"coalesce({col(started_src)}::text, '') || ':' || {attempt}"
    is_stale = f"{state} = ANY({values(5)}) AND {stale}"
    stale_jobs = f"""
SELECT {col(table.id)}::text AS id, {queue} AS queue, {kind} AS kind, {token} AS token
FROM {rel}
WHERE {state} = ANY({values(2)}) AND {stale}
"""
    # a waiting job that failed before: its attempt count (else its due time) changes with each requeue
    requeued = None
    if table.attempts or table.last_error:
        evidence = retried if table.attempts else f"{col(table.last_error or '')} IS NOT NULL"
        requeue_token = (
            f"{col(table.attempts)}::text" if table.attempts else f"coalesce({eligible}::text, '')"
        )
        requeued = Statement(
            f"""
SELECT {col(table.id)}::text AS row_id, {requeue_token} AS token, {queue} AS queue, {kind} AS kind
FROM {rel} AS j
WHERE {state} = ANY({values(2)}) AND {evidence}
ORDER BY j.{col(table.id)}
LIMIT $1
""",
            (mapping.values_for("pending", "scheduled", "retrying"),),
        )

    recover = ""
    if recovery is not None and recovery.reset_state is not None:
        assignments = [f"{state} = $6::text::{cast(table.state.column, 'text')}"]
        assignments += [f"{col(c)} = NULL" for c in recovery.clear_columns]
        if t.eligible:
            due_now = clock.stored(t.eligible, "now()")
            assignments.append(f"{col(t.eligible)} = {due_now}")
        recover = f"""
UPDATE {rel} AS j
SET {", ".join(assignments)}
FROM (
    SELECT j.{col(table.id)} AS id
    FROM {rel} AS j
    JOIN unnest($2::text[], $3::text[]) AS c(id, token)
      ON j.{col(table.id)} = c.id::{cast(table.id, "text")}
    WHERE {is_stale} AND {token} = c.token
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
) AS cand
WHERE j.{col(table.id)} = cand.id AND {is_stale}
RETURNING j.{col(table.id)}::text AS id, {queue} AS queue, {kind} AS kind, {state}::text AS state
"""

    ops = _operator_statements(
        table,
        rel=rel,
        col=col,
        ts=ts,
        clock=clock,
        cast=cast,
        array_cast=array_cast,
        queue=queue,
        kind=kind,
        eligible=eligible,
        retried=retried,
        stale=stale,
        reset_state=recovery.reset_state if recovery else None,
        clear_columns=recovery.clear_columns if recovery else [],
    )

    return Preset(
        name="generic",
        description=f"generic table mapping for {table.name}",
        required_columns=required_columns(table),
        default_stale_after=0.0 if rule and rule.kind == "lease_expires" else 300.0,
        live=Statement(live, live_params),
        terminal=Statement(terminal, terminal_params),
        finished_key="timestamp",
        finished_tail=Statement(tail, outcome_params),
        finished_backfill=Statement(backfill, outcome_params),
        finished_index=(table.name, fin) if fin else None,
        finished_per_queue=(
            PerQueueTail(
                table.queue,  # type: ignore[arg-type]
                Statement(tail_per_queue, outcome_params),
                Statement(backfill_per_queue, outcome_params),
            )
            if tail_per_queue
            else None
        ),
        schema=table.schema_,
        self_rescue="unknown (generic table)",
        outcomes=("succeeded", "failed", "dead", "cancelled")
        + (("retried",) if requeued is not None else ()),
        requeued=requeued,
        stale_jobs=Statement(stale_jobs, (mapping.running,)),
        recover=Statement(recover, (mapping.running, recovery.reset_state if recovery else None)),
        retry_rule="only jobs in a state mapped to failed or dead",
        **ops,
    )


def _per_queue(
    rel: str,
    queue: str,
    finished: Callable[..., str],
    columns: str,
    since: str,
    order: str,
) -> str:
    """The finished-job read for an index on (queue, finish time): the queues are found by a skip scan
    of the index (one descent per queue), then each queue's own rows are read in finish order, so the
    first $2 rows of all queues together are exactly the first $2 rows of the table. NULL queues are
    a branch of their own (``IS NULL`` is an index condition too)."""
    per_queue = finished(columns, since, order, where=f"{queue} = queues.q")
    null_queue = finished(columns, since, order, where=f"{queue} IS NULL")
    return f"""
WITH RECURSIVE queues(q) AS (
    (SELECT {queue} FROM {rel} WHERE {queue} IS NOT NULL ORDER BY {queue} LIMIT 1)
    UNION ALL
    SELECT (SELECT {queue} FROM {rel} WHERE {queue} > queues.q ORDER BY {queue} LIMIT 1)
    FROM queues WHERE queues.q IS NOT NULL
)
SELECT rows_of_queue.* FROM queues CROSS JOIN LATERAL ({per_queue}
) AS rows_of_queue
WHERE queues.q IS NOT NULL
UNION ALL
({null_queue}
)
ORDER BY key {order}
LIMIT $2
"""


class OperatorStatements(TypedDict):
    list_live: Statement
    list_terminal: Statement
    job: Statement
    retry: Statement | None
    purge: Statement | None
    purge_preview: Statement | None


def _operator_statements(
    table: TableMapping,
    *,
    rel: str,
    col: Callable[[str], str],
    ts: Callable[[str], str],
    clock: TimeColumns,
    cast: Callable[[str, str], str],
    array_cast: str,
    queue: str,
    kind: str,
    eligible: str,
    retried: str,
    stale: str,
    reset_state: str | None,
    clear_columns: list[str],
) -> OperatorStatements:
    """Statements of the operator commands (see the contract in ``presets/__init__.py``)."""
    mapping, t = table.state, table.timestamps
    state, job_id = col(mapping.column), col(table.id)
    id_type = cast(table.id, "text")
    live_values = mapping.values_for("pending", "scheduled", "retrying", "running")
    finished_values = mapping.values_for("succeeded", "failed", "dead", "cancelled")
    retryable_values = mapping.values_for("failed", "dead")
    attempts = f"{col(table.attempts)}::bigint" if table.attempts else "NULL::bigint"
    filters = f"($3::text IS NULL OR {queue} = $3) AND ($4::text IS NULL OR {kind} = $4)"
    last_error = f"{col(table.last_error)}::text" if table.last_error else "NULL::text"
    lock_owner = f"{col(table.lock_owner)}::text" if table.lock_owner else "NULL::text"

    def job_columns(c: _Constants) -> tuple[str, str]:
        """The listing's select list (``$1`` = stale_after) and its canonical state expression."""
        canonical = f"""CASE WHEN {state} = ANY({c.values_of(mapping.running)}) THEN 'running'
            WHEN {state} = ANY({c.values_of(mapping.values_for("pending", "scheduled", "retrying"))}) THEN
                CASE WHEN {eligible} IS NULL OR {eligible} <= now() THEN 'pending'
                     WHEN {state} = ANY({c.values_of(mapping.scheduled)}) THEN 'scheduled'
                     WHEN {state} = ANY({c.values_of(mapping.retrying)}) THEN 'retrying'
                     WHEN {retried} THEN 'retrying'
                     ELSE 'scheduled' END
            WHEN {state} = ANY({c.values_of(mapping.succeeded)}) THEN 'succeeded'
            WHEN {state} = ANY({c.values_of(mapping.failed)}) THEN 'failed'
            WHEN {state} = ANY({c.values_of(mapping.dead)}) THEN 'dead'
            WHEN {state} = ANY({c.values_of(mapping.cancelled)}) THEN 'cancelled' END"""
        select = f"""
SELECT {job_id}::text AS id, {queue} AS queue, {kind} AS kind, ({canonical}) AS state,
       {state}::text AS native_state, {attempts} AS attempts, {last_error} AS last_error,
       {lock_owner} AS lock_owner,
       ({state} = ANY({c.values_of(mapping.running)}) AND coalesce({stale}, false)) AS is_stale,
       ({state} = ANY({c.values_of(retryable_values)})) AS can_retry
FROM {rel} AS j"""
        return select, canonical

    def listing(where_values: list[str], order: str) -> Statement:
        # $1 stale_after, $2 canonical states, $3 queue, $4 kind, $5 limit
        c = _Constants(6, array_cast)
        select, canonical = job_columns(c)
        return c.statement(f"""{select}
WHERE {state} = ANY({c.values_of(where_values)}) AND ({canonical}) = ANY($2::text[]) AND {filters}
ORDER BY j.{job_id} {order}
LIMIT $5
""")

    list_live = listing(live_values, "ASC")
    list_terminal = listing(finished_values, "DESC")
    c = _Constants(3, array_cast)  # $1 stale_after, $2 id
    select, _ = job_columns(c)
    job = c.statement(f"{select}\nWHERE {job_id} = $2::text::{id_type}\n")

    retry = None
    if reset_state is not None:
        c = _Constants(5, array_cast)
        assignments = {
            mapping.column: c.value(reset_state, f"text::{cast(mapping.column, 'text')}")
        }
        if table.attempts:
            assignments[table.attempts] = "0"
        if t.eligible:
            assignments[t.eligible] = clock.stored(t.eligible, "now()")
        for column in clear_columns:
            assignments.setdefault(column, "NULL")
        retryable = c.values_of(retryable_values)
        retry = c.statement(f"""
UPDATE {rel} AS j
SET {", ".join(f"{col(name)} = {value}" for name, value in assignments.items())}
FROM (
    SELECT j.{job_id} AS cand_id
    FROM {rel} AS j
    WHERE {state} = ANY({retryable})
      AND ($1::text[] IS NULL OR j.{job_id} = ANY($1::text[]::{id_type}[]))
      AND ($2::text IS NULL OR {queue} = $2) AND ($3::text IS NULL OR {kind} = $3)
    ORDER BY j.{job_id}
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
) AS cand
WHERE j.{job_id} = cand.cand_id AND {state} = ANY({retryable})
RETURNING j.{job_id}::text AS id, {queue} AS queue, {kind} AS kind, {state}::text AS state
""")

    purge = purge_preview = None
    if t.finished:
        cutoff = clock.bound(t.finished, "now() - make_interval(secs => $1)", "<")
        # $1 older_than, $2 include_failed, $3 after id, $4 batch
        c = _Constants(5, array_cast)
        purgeable = (
            f"{state} = ANY(CASE WHEN $2::boolean THEN {c.values_of(finished_values)} "
            f"ELSE {c.values_of(mapping.succeeded)} END) "
            f"AND {col(t.finished)} < {cutoff}"
        )
        after = f"($3::text IS NULL OR {job_id} > $3::text::{id_type})"
        purge = c.statement(f"""
WITH cand AS (
    SELECT j.{job_id} AS cand_id
    FROM {rel} AS j
    WHERE {purgeable} AND {after}
    ORDER BY j.{job_id}
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
), deleted AS (
    DELETE FROM {rel} AS j
    USING cand
    WHERE j.{job_id} = cand.cand_id AND {purgeable}
    RETURNING j.{job_id} AS key, {queue} AS queue, {kind} AS kind, {state}::text AS state
)
SELECT key::text AS id, queue, kind, state FROM deleted ORDER BY key
""")
        # ORDER BY the table's column, not the text alias `id` (which would sort 10 before 9)
        purge_preview = c.statement(f"""
SELECT {job_id}::text AS id, {queue} AS queue, {kind} AS kind, {state}::text AS state
FROM {rel} AS j
WHERE {purgeable} AND {after}
ORDER BY j.{job_id}
LIMIT $4
""")
    return {
        "list_live": list_live,
        "list_terminal": list_terminal,
        "job": job,
        "retry": retry,
        "purge": purge,
        "purge_preview": purge_preview,
    }
