"""Publaryn-style ``background_jobs`` (Rust/sqlx): status pending|running|completed|failed|dead, a
``locked_until`` lease and no queue column (queue label ``default``).

Cost: pending and running rows are read through ``idx_background_jobs_claimable`` and
``idx_background_jobs_stale``; finished jobs are tailed by ``completed_at``, which needs an index on that
column to stay cheap (the exporter checks and says so; see ``finished_counting``).
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
)
