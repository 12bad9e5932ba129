"""Publaryn-style ``background_jobs`` (Rust/sqlx): status pending|running|completed|failed|dead, a
``locked_until`` lease and no queue column (queue label ``default``).

Cost: pending and running rows are read through ``idx_background_jobs_claimable`` and
``idx_background_jobs_stale``; finished jobs are tailed by ``completed_at``, which needs an index on that
column to stay cheap (the exporter checks and says so; see ``finished_counting``).

Operator commands: ``jobs`` reads pending/running rows through the same two partial indexes; ``retry`` is
its admin retry endpoint and ``purge`` its cleanup, in batches. Failed/dead rows have no index, so
``retry --all-failed`` and ``purge`` scan the table (Publaryn's own cleanup keeps it small).
"""

from __future__ import annotations

from . import Preset, Statement

_OUTCOME = "CASE status WHEN 'completed' THEN 'succeeded' WHEN 'dead' THEN 'dead' ELSE 'failed' END"

# Two branches so each matches one partial index (an IN list would not imply either predicate).
LIVE = """
SELECT 'default' AS queue, kind::text AS kind,
       CASE WHEN scheduled_at <= now() THEN 'pending'
            WHEN attempts > 0 OR last_error IS NOT NULL THEN 'retrying'
            ELSE 'scheduled' END AS state,
       count(*) AS jobs,
       extract(epoch FROM now() - min(scheduled_at) FILTER (WHERE scheduled_at <= now()))::float8
           AS oldest_age_seconds,
       0::bigint AS stale_jobs
FROM background_jobs
WHERE status = 'pending'
GROUP BY 1, 2, 3
UNION ALL
SELECT 'default', kind::text, 'running', count(*),
       extract(epoch FROM now() - min(started_at))::float8,
       count(*) FILTER (WHERE locked_until < now() - make_interval(secs => $1))
FROM background_jobs
WHERE status = 'running'
GROUP BY 1, 2
"""

TERMINAL = """
SELECT 'default' AS queue, kind::text AS kind, status::text AS state, count(*) AS jobs
FROM background_jobs
WHERE status IN ('failed', 'dead')
GROUP BY 1, 2, 3
"""

FINISHED_TAIL = f"""
SELECT completed_at AS key, id::text AS row_id, 'default' AS queue, kind::text AS kind,
       {_OUTCOME} AS outcome
FROM background_jobs
WHERE completed_at > $1 AND status IN ('completed', 'failed', 'dead')
ORDER BY completed_at
LIMIT $2
"""

FINISHED_BACKFILL = f"""
SELECT completed_at AS key, id::text AS row_id, extract(epoch FROM completed_at)::float8 AS finished_at,
       'default' AS queue, kind::text AS kind, {_OUTCOME} AS outcome
FROM background_jobs
WHERE completed_at > now() - make_interval(secs => $1) AND status IN ('completed', 'failed', 'dead')
ORDER BY completed_at DESC
LIMIT $2
"""

_STALE = "j.status = 'running' AND j.locked_until < now() - make_interval(secs => $1)"
_TOKEN = "coalesce(j.locked_by, '') || ':' || j.attempts"

STALE_JOBS = f"""
SELECT j.id::text AS id, 'default' AS queue, j.kind::text AS kind, {_TOKEN} AS token
FROM background_jobs j
WHERE {_STALE}
"""

# The workers' own recover_stale_jobs sweep, batched and re-checked on the live row.
RECOVER = f"""
UPDATE background_jobs j
SET status = 'pending', locked_until = NULL, locked_by = NULL, started_at = NULL, scheduled_at = now()
FROM (
    SELECT j.id
    FROM background_jobs j
    JOIN unnest($2::text[], $3::text[]) AS c(id, token) ON j.id = c.id::uuid
    WHERE {_STALE} AND {_TOKEN} = c.token
    ORDER BY j.locked_until
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
) AS cand
WHERE j.id = cand.id AND {_STALE}
RETURNING j.id::text AS id, 'default' AS queue, j.kind::text AS kind, j.status::text AS state
"""

# -- operator commands ---------------------------------------------------------------------------

_STATE = """CASE j.status
        WHEN 'pending' THEN CASE WHEN j.scheduled_at <= now() THEN 'pending'
                                 WHEN j.attempts > 0 OR j.last_error IS NOT NULL THEN 'retrying'
                                 ELSE 'scheduled' END
        WHEN 'running' THEN 'running'
        WHEN 'completed' THEN 'succeeded'
        ELSE j.status::text END"""

_JOB_SELECT = f"""
SELECT j.id::text AS id, 'default'::text AS queue, j.kind::text AS kind, {_STATE} AS state,
       j.status::text AS native_state, j.attempts::bigint AS attempts, j.last_error,
       j.locked_by AS lock_owner, coalesce({_STALE}, false) AS is_stale,
       j.status IN ('failed', 'dead') AS can_retry"""
_JOB_COLUMNS = f"{_JOB_SELECT}\nFROM background_jobs j"

_LIST_FILTERS = f"""{_STATE} = ANY($2::text[])
      AND ($3::text IS NULL OR $3::text = 'default') AND ($4::text IS NULL OR j.kind::text = $4)"""

# One branch per partial index (idx_background_jobs_stale, idx_background_jobs_claimable), each read in
# index order up to the limit: running jobs by lease expiry (stale first), then waiting jobs by due time.
LIST_LIVE = f"""
SELECT id, queue, kind, state, native_state, attempts, last_error, lock_owner, is_stale, can_retry
FROM (
    ({_JOB_SELECT}, 1 AS branch, j.locked_until AS ord
     FROM background_jobs j
     WHERE j.status = 'running' AND {_LIST_FILTERS}
     ORDER BY j.locked_until
     LIMIT $5)
    UNION ALL
    ({_JOB_SELECT}, 2 AS branch, j.scheduled_at AS ord
     FROM background_jobs j
     WHERE j.status = 'pending' AND {_LIST_FILTERS}
     ORDER BY j.scheduled_at
     LIMIT $5)
) AS live
ORDER BY branch, ord
LIMIT $5
"""

# No index covers finished rows: walks the primary key backwards until $5 rows match. Publaryn's ids are
# random UUIDs, so this is a bounded sample of finished jobs, not the most recent ones.
LIST_TERMINAL = f"""{_JOB_COLUMNS}
WHERE j.status IN ('completed', 'failed', 'dead') AND {_LIST_FILTERS}
ORDER BY j.id DESC
LIMIT $5
"""

JOB = f"""{_JOB_COLUMNS}
WHERE j.id = $2::text::uuid
"""

# Its admin retry endpoint (POST /v1/admin/jobs/{id}/retry): only from failed|dead; back to pending, due
# now, attempts reset to 0, lock/start/completion cleared, last_error kept for diagnosis.
RETRY = """
UPDATE background_jobs j
SET status = 'pending', attempts = 0, scheduled_at = now(), locked_until = NULL, locked_by = NULL,
    started_at = NULL, completed_at = NULL
FROM (
    SELECT j.id
    FROM background_jobs j
    WHERE j.status IN ('failed', 'dead')
      AND ($1::text[] IS NULL OR j.id = ANY($1::text[]::uuid[]))
      AND ($2::text IS NULL OR $2::text = 'default') AND ($3::text IS NULL OR j.kind::text = $3)
    ORDER BY j.completed_at, j.id
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
) AS cand
WHERE j.id = cand.id AND j.status IN ('failed', 'dead')
RETURNING j.id::text AS id, 'default' AS queue, j.kind::text AS kind, j.status::text AS state
"""

# Its cleanup (cleanup_finished_jobs): completed jobs (plus dead/failed when asked) completed before the cutoff.
_PURGE_STATUSES = """(CASE WHEN $2::boolean THEN ARRAY['completed', 'dead', 'failed']
                         ELSE ARRAY['completed'] END)::job_status[]"""
_PURGEABLE = f"""j.status = ANY({_PURGE_STATUSES})
      AND j.completed_at < now() - make_interval(secs => $1)"""

PURGE = f"""
WITH cand AS (
    SELECT j.id
    FROM background_jobs j
    WHERE {_PURGEABLE} AND ($3::text IS NULL OR j.id > $3::text::uuid)
    ORDER BY j.id
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
), deleted AS (
    DELETE FROM background_jobs j
    USING cand
    WHERE j.id = cand.id AND {_PURGEABLE}
    RETURNING j.id, j.kind, j.status
)
SELECT id::text AS id, 'default' AS queue, kind::text AS kind, status::text AS state
FROM deleted
ORDER BY deleted.id
"""

PURGE_PREVIEW = f"""
SELECT j.id::text AS id, 'default' AS queue, j.kind::text AS kind, j.status::text AS state
FROM background_jobs j
WHERE {_PURGEABLE} AND ($3::text IS NULL OR j.id > $3::text::uuid)
ORDER BY j.id
LIMIT $4
"""

PRESET = Preset(
    name="publaryn",
    description="Publaryn-style background_jobs table (status enum, locked_until lease, no queue column)",
    required_columns={
        "background_jobs": (
            "id",
            "kind",
            "status",
            "attempts",
            "last_error",
            "scheduled_at",
            "locked_until",
            "started_at",
            "completed_at",
        ),
    },
    # Lease-based: a job is stale as soon as its lease expired; stale_after adds a grace period.
    default_stale_after=0.0,
    live=Statement(LIVE),
    terminal=Statement(TERMINAL),
    finished_key="timestamp",
    finished_tail=Statement(FINISHED_TAIL),
    finished_backfill=Statement(FINISHED_BACKFILL),
    finished_index=("background_jobs", "completed_at"),
    stale_jobs=Statement(STALE_JOBS),
    recover=Statement(RECOVER),
    # every worker resets expired leases every 60 s
    builtin_rescue_after=60.0,
    self_rescue="every worker resets running jobs whose lease expired, every 60 s",
    outcomes=("succeeded", "failed", "dead"),
    list_live=Statement(LIST_LIVE),
    list_terminal=Statement(LIST_TERMINAL),
    job=Statement(JOB),
    retry=Statement(RETRY),
    purge=Statement(PURGE),
    purge_preview=Statement(PURGE_PREVIEW),
    retry_rule="only failed or dead jobs, as its admin retry endpoint",
)
