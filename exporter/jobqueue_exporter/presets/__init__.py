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
``finished_high_sql()``
    for id-keyed tails only: the highest key currently visible (a primary-key lookup).
``stale_jobs_sql($1 = stale_after seconds)``
    rows ``(id, queue, kind, token)`` of running jobs meeting the stale rule; ``token`` identifies the
    claim (owner and attempt), so a job re-claimed in between is never mistaken for the same episode.
``recover_sql($1 = stale_after, $2 = ids text[], $3 = tokens text[], $4 = limit)``
    one race-safe UPDATE that puts those jobs back the way the queue system itself does, only if they
    are still stale with the same token; rows ``(id, queue, kind, state)`` of the jobs it changed.
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
    schema: str | None = None
    stale_jobs: Statement | None = None
    recover: Statement | None = None
    # seconds after which the queue system rescues a stale job itself; None when it never does
    builtin_rescue_after: float | None = None
    # what the queue system does about stale jobs itself (shown in docs and logs)
    self_rescue: str = ""
    outcomes: tuple[str, ...] = ("succeeded", "failed", "dead", "cancelled")


def _registry() -> dict[str, Preset]:
    from . import procrastinate, publaryn

    return {p.name: p for p in (procrastinate.PRESET, publaryn.PRESET)}


PRESETS: dict[str, Preset] = _registry()
