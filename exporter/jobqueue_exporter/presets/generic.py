"""The ``generic`` preset: SQL built from a :class:`~jobqueue_exporter.config.TableMapping`.

Identifiers from the config were validated as plain identifiers and are quoted again here; native state
values are passed as query parameters cast to the column's own type, so nothing from the config is ever
spliced into SQL as text. Column types (from ``information_schema``) decide how timestamps are compared:
``timestamp without time zone`` columns are read as UTC.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Recovery, TableMapping
from . import Preset, Statement


@dataclass(frozen=True)
class ColumnType:
    data_type: str
    udt_schema: str
    udt_name: str


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def required_columns(table: TableMapping) -> dict[str, tuple[str, ...]]:
    ts = table.timestamps
    columns = [table.id, table.state.column, table.queue, table.kind, table.attempts]
    columns += [ts.enqueued, ts.eligible, ts.started, ts.finished]
    columns += [table.stale.column if table.stale else None]
    return {table.name: tuple(dict.fromkeys(c for c in columns if c))}


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

    def naive(name: str) -> bool:
        return types.get(name, ColumnType("timestamp with time zone", "", "")).data_type == (
            "timestamp without time zone"
        )

    def ts(name: str) -> str:
        """The column as timestamptz (naive columns hold UTC)."""
        return f"({col(name)} AT TIME ZONE 'UTC')" if naive(name) else col(name)

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
    if fin:
        # compare the raw column with the parameter converted, so an index on the column is usable
        after = "($1 AT TIME ZONE 'UTC')" if naive(fin) else "$1"
        tail = f"""
SELECT {ts(fin)} AS key, {col(table.id)}::text AS row_id, {queue} AS queue, {kind} AS kind,
       {outcome} AS outcome
FROM {rel}
WHERE {col(fin)} > {after} AND {state} = ANY({values(6)})
ORDER BY {col(fin)}
LIMIT $2
"""
        window_start = "(now() AT TIME ZONE 'UTC')" if naive(fin) else "now()"
        backfill = f"""
SELECT {ts(fin)} AS key, {col(table.id)}::text AS row_id,
       extract(epoch FROM {ts(fin)})::float8 AS finished_at, {queue} AS queue, {kind} AS kind,
       {outcome} AS outcome
FROM {rel}
WHERE {col(fin)} > {window_start} - make_interval(secs => $1) AND {state} = ANY({values(6)})
ORDER BY {col(fin)} DESC
LIMIT $2
"""
    else:
        tail = backfill = ""

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
    recover = ""
    if recovery is not None and recovery.reset_state is not None:
        assignments = [f"{state} = $6::text::{cast(table.state.column, 'text')}"]
        assignments += [f"{col(c)} = NULL" for c in recovery.clear_columns]
        if t.eligible:
            due_now = "(now() AT TIME ZONE 'UTC')" if naive(t.eligible) else "now()"
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
        schema=table.schema_,
        self_rescue="unknown (generic table)",
        outcomes=("succeeded", "failed", "dead", "cancelled"),
        stale_jobs=Statement(stale_jobs, (mapping.running,)),
        recover=Statement(recover, (mapping.running, recovery.reset_state if recovery else None)),
    )
