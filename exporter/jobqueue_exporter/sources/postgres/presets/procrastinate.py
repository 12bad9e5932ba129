"""Procrastinate 3.x (``procrastinate_jobs`` + ``procrastinate_events`` + ``procrastinate_workers``).

Cost: live states read only ``todo``/``doing`` rows, through the schema's partial indexes on those
statuses; finished jobs are counted by
tailing ``procrastinate_events`` by primary key, so no statement touches finished history.

Operator commands: ``jobs`` reads waiting/running rows through ``procrastinate_jobs_id_lock_idx_v1`` in id
order; finished rows (no index covers them) by walking the primary key from the newest job; ``retry`` is
``procrastinate_retry_job_v2`` for a ``failed`` row and ``purge`` is ``delete_old_jobs``, in batches.
"""

from __future__ import annotations

from . import Preset, Statement

_OUTCOME = """CASE e.type WHEN 'succeeded' THEN 'succeeded' WHEN 'failed' THEN 'failed'
                     WHEN 'deferred_for_retry' THEN 'retried' ELSE 'cancelled' END"""
_FINISH_EVENTS = "('succeeded', 'failed', 'cancelled', 'aborted', 'deferred_for_retry')"

LIVE = """
WITH todo AS (
    SELECT queue_name AS queue, task_name AS kind, id, scheduled_at,
           CASE WHEN scheduled_at IS NULL OR scheduled_at <= now() THEN 'pending'
                WHEN attempts = 0 THEN 'scheduled'
                ELSE 'retrying' END AS state
    FROM procrastinate_jobs
    WHERE status = 'todo'
), todo_groups AS (
    SELECT queue, kind, state, count(*) AS jobs,
           min(scheduled_at) FILTER (WHERE state = 'pending') AS oldest_due_scheduled_at,
           -- ids are handed out at enqueue, so the lowest unscheduled id is the longest waiting
           min(id) FILTER (WHERE state = 'pending' AND scheduled_at IS NULL) AS oldest_unscheduled_id
    FROM todo
    GROUP BY queue, kind, state
), running AS (
    SELECT j.queue_name AS queue, j.task_name AS kind,
           (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => $1)) AS stale,
           (SELECT max(e.at) FROM procrastinate_events e
             WHERE e.job_id = j.id AND e.type = 'started') AS started_at
    FROM procrastinate_jobs j
    LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
    WHERE j.status = 'doing'
)
SELECT queue, kind, state, jobs,
       CASE WHEN state = 'pending' THEN
           extract(epoch FROM now() - least(
               oldest_due_scheduled_at,
               (SELECT min(e.at) FROM procrastinate_events e
                 WHERE e.job_id = oldest_unscheduled_id AND e.type = 'deferred')))::float8
       END AS oldest_age_seconds,
       0::bigint AS stale_jobs
FROM todo_groups
UNION ALL
SELECT queue, kind, 'running', count(*),
       extract(epoch FROM now() - min(started_at))::float8,
       count(*) FILTER (WHERE stale)
FROM running
GROUP BY queue, kind
"""

TERMINAL = """
SELECT queue_name AS queue, task_name AS kind,
       CASE status WHEN 'failed' THEN 'failed' ELSE 'cancelled' END AS state, count(*) AS jobs
FROM procrastinate_jobs
WHERE status IN ('failed', 'cancelled', 'aborted')
GROUP BY 1, 2, 3
"""

FINISHED_TAIL = f"""
SELECT e.id AS key, e.id::text AS row_id, j.queue_name AS queue, j.task_name AS kind,
       {_OUTCOME} AS outcome
FROM procrastinate_events e
JOIN procrastinate_jobs j ON j.id = e.job_id
WHERE e.id > $1 AND e.type IN {_FINISH_EVENTS}
ORDER BY e.id
LIMIT $2
"""

# Walks the event log backwards by primary key: bounded by $2 events whatever the history size.
FINISHED_BACKFILL = f"""
SELECT e.id AS key, e.id::text AS row_id, extract(epoch FROM e.at)::float8 AS finished_at,
       j.queue_name AS queue, j.task_name AS kind, {_OUTCOME} AS outcome
FROM (SELECT id, job_id, type, at FROM procrastinate_events ORDER BY id DESC LIMIT $2) e
JOIN procrastinate_jobs j ON j.id = e.job_id
WHERE e.type IN {_FINISH_EVENTS} AND e.at >= now() - make_interval(secs => $1)
"""

FINISHED_HIGH = "SELECT coalesce(max(id), 0) FROM procrastinate_events"

_STALE = """(w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => $1))"""
_TOKEN = "coalesce(j.worker_id::text, '') || ':' || j.attempts"

STALE_JOBS = f"""
SELECT j.id::text AS id, j.queue_name AS queue, j.task_name AS kind, {_TOKEN} AS token
FROM procrastinate_jobs j
LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
WHERE j.status = 'doing' AND {_STALE}
"""

# What procrastinate_retry_job_v2 does to a `doing` job (back to `todo`, attempts + 1, due now; `failed`
# when an abort was requested), as one statement: candidates locked with SKIP LOCKED (never waiting on a
# worker), the stale rule and the claim token re-checked on the live row, and jobs whose queueing_lock
# already has a `todo` job left alone (the unique index would reject them); of several running jobs
# sharing a queueing_lock only the oldest goes back per run, for the same reason.
RECOVER = f"""
WITH cand AS (
    SELECT j.id
    FROM procrastinate_jobs j
    JOIN unnest($2::text[], $3::text[]) AS c(id, token) ON j.id = c.id::bigint
    LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
    WHERE j.status = 'doing' AND {_TOKEN} = c.token AND {_STALE}
      AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs t
                      WHERE j.queueing_lock IS NOT NULL AND t.queueing_lock = j.queueing_lock
                        AND (t.status = 'todo' OR (t.status = 'doing' AND t.id < j.id)))
    ORDER BY j.id
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE procrastinate_jobs j
SET status = CASE WHEN j.abort_requested THEN 'failed'::procrastinate_job_status
                  ELSE 'todo'::procrastinate_job_status END,
    attempts = CASE WHEN j.abort_requested THEN j.attempts ELSE j.attempts + 1 END,
    scheduled_at = CASE WHEN j.abort_requested THEN j.scheduled_at ELSE now() END
FROM cand
WHERE j.id = cand.id AND j.status = 'doing'
  AND NOT EXISTS (SELECT 1 FROM procrastinate_workers w
                  WHERE w.id = j.worker_id AND w.last_heartbeat >= now() - make_interval(secs => $1))
RETURNING j.id::text AS id, j.queue_name AS queue, j.task_name AS kind, j.status::text AS state
"""

# -- operator commands ---------------------------------------------------------------------------

_STATE = """CASE j.status
        WHEN 'todo' THEN CASE WHEN j.scheduled_at IS NULL OR j.scheduled_at <= now() THEN 'pending'
                              WHEN j.attempts = 0 THEN 'scheduled' ELSE 'retrying' END
        WHEN 'doing' THEN 'running'
        WHEN 'aborting' THEN 'running'
        WHEN 'succeeded' THEN 'succeeded'
        WHEN 'failed' THEN 'failed'
        ELSE 'cancelled' END"""

# What procrastinate_retry_job_v2 accepts for a `failed` row without failing: an abort-requested row would
# violate check_not_todo_abort_requested, and a `todo` job holding the same queueing_lock its unique index.
_RETRYABLE = """j.status = 'failed' AND NOT j.abort_requested
      AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs t
                      WHERE j.queueing_lock IS NOT NULL AND t.queueing_lock = j.queueing_lock
                        AND t.status = 'todo')"""

_JOB_COLUMNS = f"""
SELECT j.id::text AS id, j.queue_name::text AS queue, j.task_name::text AS kind, {_STATE} AS state,
       j.status::text AS native_state, j.attempts::bigint AS attempts,
       NULL::text AS last_error,  -- Procrastinate keeps errors in its logs only
       CASE WHEN j.status = 'doing' AND j.worker_id IS NOT NULL THEN 'worker ' || j.worker_id END
           AS lock_owner,
       coalesce(j.status = 'doing' AND {_STALE}, false) AS is_stale,
       ({_RETRYABLE}) AS can_retry
FROM procrastinate_jobs j
LEFT JOIN procrastinate_workers w ON w.id = j.worker_id"""

_LIST_FILTERS = f"""{_STATE} = ANY($2::text[])
  AND ($3::text IS NULL OR j.queue_name = $3) AND ($4::text IS NULL OR j.task_name = $4)"""

# `status IN ('todo', 'doing')` is the predicate of procrastinate_jobs_id_lock_idx_v1 (id, lock): the rows
# come from that partial index in id order, and the scan stops at the limit.
LIST_LIVE = f"""{_JOB_COLUMNS}
WHERE j.status IN ('todo', 'doing') AND {_LIST_FILTERS}
ORDER BY j.id
LIMIT $5
"""

# No index covers finished rows: walks the primary key from the newest job until $5 rows match.
LIST_TERMINAL = f"""{_JOB_COLUMNS}
WHERE j.status IN ('succeeded', 'failed', 'cancelled', 'aborted') AND {_LIST_FILTERS}
ORDER BY j.id DESC
LIMIT $5
"""

JOB = f"""{_JOB_COLUMNS}
WHERE j.id = $2::text::bigint
"""

# What procrastinate_retry_job_v2 does to a `failed` job (JobManager.retry_job, retry_at = now): back to
# `todo`, attempts + 1, due now; its trigger records a `retried` event. Candidates are locked with SKIP
# LOCKED and re-checked on the live row; of several failed jobs sharing a queueing_lock only the lowest id
# is retried (the unique index allows one `todo` job per lock).
RETRY = f"""
WITH locked AS (
    SELECT j.id, j.queueing_lock
    FROM procrastinate_jobs j
    WHERE {_RETRYABLE}
      AND ($1::text[] IS NULL OR j.id = ANY($1::text[]::bigint[]))
      AND ($2::text IS NULL OR j.queue_name = $2) AND ($3::text IS NULL OR j.task_name = $3)
    ORDER BY j.id
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
), cand AS (
    SELECT l.id FROM locked l
    WHERE l.queueing_lock IS NULL
       OR l.id = (SELECT min(o.id) FROM locked o WHERE o.queueing_lock = l.queueing_lock)
)
UPDATE procrastinate_jobs j
SET status = 'todo'::procrastinate_job_status, attempts = j.attempts + 1, scheduled_at = now()
FROM cand
WHERE j.id = cand.id AND j.status = 'failed' AND NOT j.abort_requested
RETURNING j.id::text AS id, j.queue_name::text AS queue, j.task_name::text AS kind,
          j.status::text AS state
"""

# delete_old_jobs (the remove_old_jobs task): succeeded jobs, plus failed/cancelled/aborted when asked,
# whose latest event is older than the cutoff. "Latest event older" is spelled as "has an event, and none
# at or after the cutoff (nor without a time)", which is what its DISTINCT ON ... ORDER BY at DESC picks.
_PURGE_STATUSES = """(CASE WHEN $2::boolean THEN ARRAY['succeeded', 'failed', 'cancelled', 'aborted']
                         ELSE ARRAY['succeeded'] END)::procrastinate_job_status[]"""
_PURGEABLE = f"""j.status = ANY({_PURGE_STATUSES})
      AND ($3::text IS NULL OR j.id > $3::text::bigint)
      AND EXISTS (SELECT 1 FROM procrastinate_events e WHERE e.job_id = j.id)
      AND NOT EXISTS (SELECT 1 FROM procrastinate_events e
                      WHERE e.job_id = j.id
                        AND (e.at IS NULL OR e.at >= now() - make_interval(secs => $1)))"""

# One batch: candidates in id order above the previous batch (SKIP LOCKED), status re-checked on the row;
# their events go with them (ON DELETE CASCADE), as with delete_old_jobs.
PURGE = f"""
WITH cand AS (
    SELECT j.id
    FROM procrastinate_jobs j
    WHERE {_PURGEABLE}
    ORDER BY j.id
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
), deleted AS (
    DELETE FROM procrastinate_jobs j
    USING cand
    WHERE j.id = cand.id AND j.status = ANY({_PURGE_STATUSES})
    RETURNING j.id, j.queue_name, j.task_name, j.status
)
SELECT id::text AS id, queue_name::text AS queue, task_name::text AS kind, status::text AS state
FROM deleted
ORDER BY deleted.id
"""

PURGE_PREVIEW = f"""
SELECT j.id::text AS id, j.queue_name::text AS queue, j.task_name::text AS kind,
       j.status::text AS state
FROM procrastinate_jobs j
WHERE {_PURGEABLE}
ORDER BY j.id
LIMIT $4
"""

PRESET = Preset(
    name="procrastinate",
    description="Procrastinate 3.x (Python): procrastinate_jobs, procrastinate_events, procrastinate_workers",
    required_columns={
        "procrastinate_jobs": (
            "id",
            "queue_name",
            "task_name",
            "status",
            "scheduled_at",
            "attempts",
            "worker_id",
        ),
        "procrastinate_events": ("id", "job_id", "type", "at"),
        "procrastinate_workers": ("id", "last_heartbeat"),
    },
    # Procrastinate's own stalled_worker_timeout
    default_stale_after=30.0,
    live=Statement(LIVE),
    terminal=Statement(TERMINAL),
    finished_key="id",
    finished_tail=Statement(FINISHED_TAIL),
    finished_backfill=Statement(FINISHED_BACKFILL),
    finished_high=Statement(FINISHED_HIGH),
    stale_jobs=Statement(STALE_JOBS),
    recover=Statement(RECOVER),
    self_rescue="none: stalled jobs stay 'doing' unless the application retries them",
    outcomes=("succeeded", "failed", "cancelled", "retried"),
    list_live=Statement(LIST_LIVE),
    list_terminal=Statement(LIST_TERMINAL),
    job=Statement(JOB),
    retry=Statement(RETRY),
    purge=Statement(PURGE),
    purge_preview=Statement(PURGE_PREVIEW),
    retry_rule=(
        "only failed jobs, as procrastinate_retry_job_v2 does; not one with an abort requested, nor "
        "while another todo job holds its queueing_lock"
    ),
)
