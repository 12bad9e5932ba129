"""Queue-system presets: a declarative description of each queue system plus the few SQL statements
the poller needs. Adding a queue system means adding one module here, not branches elsewhere.

Statement contract (all run inside one REPEATABLE READ, READ ONLY transaction per poll):

``live_sql($1 = stale_after seconds)``
    rows ``(queue, kind, state, jobs, oldest_age_seconds, stale_jobs)`` for the live canonical states
    (pending, scheduled, retrying, running). ``oldest_age_seconds`` is the age since the oldest job became
    eligible (pending) or started (running); ``stale_jobs`` counts running jobs meeting the stale rule.
``terminal_sql()``
    rows ``(queue, kind, state, jobs)`` for failed/dead/cancelled; opt-in because it may scan history.
``finished_tail_sql($1 = watermark key, $2 = row limit)``
    rows ``(key, row_id, queue, kind, outcome)`` of jobs finished with ``key > $1``, ordered by key.
``finished_backfill_sql($1 = window seconds, $2 = row limit)``
    rows ``(key, row_id, finished_at, queue, kind, outcome)`` finished within the window (bounded).
``requeued_sql($1 = row limit)``
    generic tables without a retry event: rows ``(row_id, token, queue, kind)`` of waiting jobs that failed
    before (see ``watermark.RequeueTracker``), in id order; read through the same waiting-state predicate
    as ``live_sql``, so its cost follows the number of jobs waiting for a retry.
``finished_high_sql()``
    for id-keyed tails only: the highest key currently visible (a primary-key lookup).
``stale_jobs_sql($1 = stale_after seconds)``
    rows ``(id, queue, kind, token)`` of running jobs meeting the stale rule; ``token`` identifies the
    claim (owner and attempt), so a job re-claimed in between is never mistaken for the same episode.
``recover_sql($1 = stale_after, $2 = ids text[], $3 = tokens text[], $4 = limit)``
    one race-safe UPDATE that puts those jobs back the way the queue system itself does, only if they
    are still stale with the same token; rows ``(id, queue, kind, state)`` of the jobs it changed.

Operator statements (``jobqueue-exporter jobs|retry|purge``, run on a read-write connection; see
``operate.py``). Listing rows are ``(id, queue, kind, state, native_state, attempts, last_error, lock_owner,
is_stale, can_retry)``, ``state`` canonical and ``last_error``/``lock_owner`` NULL where not stored:

``list_live_sql($1 = stale_after, $2 = canonical states text[], $3 = queue or NULL, $4 = kind or NULL,
$5 = limit)``
    waiting and running jobs, read through the queue's partial indexes on those states.
``list_terminal_sql(same parameters)``
    finished jobs, newest id first: walks the primary key backwards until ``$5`` rows match, so its cost
    grows with how rare the requested states are among recent jobs (bounded by ``statement_timeout``).
``job_sql($1 = stale_after, $2 = id text)``
    the same columns for one job (a primary-key lookup).
``retry_sql($1 = ids text[] or NULL for every retryable job, $2 = queue or NULL, $3 = kind or NULL,
$4 = limit)``
    one race-safe UPDATE putting failed/dead jobs back to waiting the way the queue system's own retry does;
    rows ``(id, queue, kind, state)`` of the jobs it changed (``state`` native).
``purge_sql($1 = older_than seconds, $2 = include_failed, $3 = after id text or NULL, $4 = batch)``
    deletes at most ``$4`` finished jobs with ids above ``$3``, the way the queue system's own cleanup
    chooses them; rows ``(id, queue, kind, state)`` ordered by id, so the last id is where the next batch
    starts (keyset: the whole run reads the primary key once).
``purge_preview_sql(same parameters)``
    the rows ``purge_sql`` would delete, chosen by the same predicate, without deleting or locking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

WatermarkKind = Literal["id", "timestamp"]


@dataclass(frozen=True)
class Statement:
    """SQL text plus constant parameters appended after the runtime ones (never spliced into the text)."""

    sql: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True)
class PerQueueTail:
    """Finished-job statements for an index on (queue column, finish column), used when the table has
    that index and none leading with the finish column (same rows and parameters as the plain ones)."""

    queue_column: str
    tail: Statement
    backfill: Statement


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # tables (unqualified, resolved through search_path or `schema`) -> columns the statements use
    required_columns: dict[str, tuple[str, ...]]
    default_stale_after: float
    live: Statement
    finished_key: WatermarkKind
    finished_tail: Statement
    finished_backfill: Statement
    finished_high: Statement | None = None
    terminal: Statement | None = None
    # (table, column) whose index keeps finished counting cheap; None when the tail is PK-based
    finished_index: tuple[str, str] | None = None
    finished_per_queue: PerQueueTail | None = None
    schema: str | None = None
    stale_jobs: Statement | None = None
    recover: Statement | None = None
    requeued: Statement | None = None
    # seconds after which the queue system rescues a stale job itself; None when it never does
    builtin_rescue_after: float | None = None
    # what the queue system does about stale jobs itself (shown in docs and logs)
    self_rescue: str = ""
    outcomes: tuple[str, ...] = ("succeeded", "failed", "dead", "cancelled")
    # operator commands (None: the command is not available for this preset or mapping)
    list_live: Statement | None = None
    list_terminal: Statement | None = None
    job: Statement | None = None
    retry: Statement | None = None
    purge: Statement | None = None
    purge_preview: Statement | None = None
    # which jobs `retry` accepts, in words (for error messages)
    retry_rule: str = "only failed or dead jobs"


def _registry() -> dict[str, Preset]:
    from . import procrastinate, publaryn

    return {p.name: p for p in (procrastinate.PRESET, publaryn.PRESET)}


PRESETS: dict[str, Preset] = _registry()
