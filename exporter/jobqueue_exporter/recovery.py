"""Stale-job recovery: reset jobs abandoned by their workers, the way the queue system itself would.

Safety, in the order things happen:

* only jobs seen stale at *every* poll for ``hold_for``, with the same claim token (owner + attempt), are
  candidates; a failed poll forgets everything, because continuity can no longer be shown;
* one replica acts at a time per target (a transaction-level advisory lock; the others skip);
* the preset's single UPDATE re-checks the stale rule and the token on the live row, locks candidates
  with SKIP LOCKED, and is capped per run and per hour;
* a dry run executes the very same statement and rolls it back, so it reports exactly what would change.

Every run logs one structured line and updates ``jobqueue_recovery_runs_total`` /
``jobqueue_recovered_jobs_total``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Recovery, Target
from .sources import JobActions, SourceFailure, StaleJob

log = logging.getLogger(__name__)

RUN_RESULTS = ("recovered", "dry_run", "nothing", "locked", "capped", "error")
HOUR = 3600.0
# job ids listed in one log line; the rest are counted in `ids_omitted`
MAX_LOGGED_IDS = 1000


def record_run(
    event: str,
    target: str,
    result: str,
    *,
    dry_run: bool,
    changed: list[dict],
    candidates: list[str] | None = None,
    verb: str = "reset",
    total: int | None = None,
    error: str | None = None,
    **fields: object,
) -> None:
    """One structured log line per run that changes (or would change) jobs: automatic recovery and the
    manual operator commands alike. ``changed`` rows carry ``id``, ``queue``, ``kind`` and ``state``;
    ``total`` counts them when only some are passed (ids beyond MAX_LOGGED_IDS are counted, not listed)."""
    total = len(changed) if total is None else total
    by_group: dict[tuple[str, str], list[str]] = {}
    for row in changed[:MAX_LOGGED_IDS]:
        by_group.setdefault((row["queue"], row["kind"]), []).append(row["id"])
    omitted = total - min(len(changed), MAX_LOGGED_IDS)
    level = logging.WARNING if result in ("error", "capped") else logging.INFO
    considered = "" if candidates is None else f"{len(candidates)} candidate(s), "
    # the text line carries the ids too: an operator grepping a log for a job id finds the run
    id_text = "; ".join(
        f"{q}/{k}: {', '.join(group)}" for (q, k), group in sorted(by_group.items())
    )
    if omitted > 0:
        id_text += f"; {omitted} more id(s) not listed"
    log.log(
        level,
        "%s on target %s: %s (%s%d job(s) %s)%s",
        event,
        target,
        result,
        considered,
        total,
        f"would be {verb}" if dry_run else verb,
        f": {id_text}" if id_text else "",
        extra={
            "event": event,
            "target": target,
            "result": result,
            "dry_run": dry_run,
            "candidates": list(candidates or ()),
            "jobs": [
                {"queue": queue, "kind": kind, "ids": ids}
                for (queue, kind), ids in sorted(by_group.items())
            ],
            "new_states": sorted({row["state"] for row in changed}),
            **({"ids_omitted": omitted} if omitted > 0 else {}),
            **({"error": error} if error else {}),
            **fields,
        },
    )


@dataclass
class RecoveryState:
    """What the metrics layer reads."""

    runs: Counter[str] = field(default_factory=Counter)
    recovered: Counter[tuple[str, str]] = field(default_factory=Counter)


class HoldTracker:
    """Remembers since when each job has been stale under the same claim token."""

    def __init__(self, hold_for: float):
        self.hold_for = hold_for
        self._since: dict[str, tuple[str, float]] = {}

    def observe(self, jobs: list[StaleJob], now: float) -> list[StaleJob]:
        """Record this poll's stale jobs; return those stale for at least hold_for."""
        since = {}
        for job in jobs:
            token, first = self._since.get(job.id, (job.token, now))
            since[job.id] = (job.token, first if token == job.token else now)
        self._since = since
        return [job for job in jobs if now - self._since[job.id][1] >= self.hold_for]

    def forget(self, ids: list[str] | None = None) -> None:
        if ids is None:
            self._since.clear()
        for job_id in ids or ():
            self._since.pop(job_id, None)


class Recoverer:
    """Resets stale jobs through the source's :class:`~jobqueue_exporter.sources.JobActions` (one
    atomic, re-checking step per run, under a per-target lock), behind the guards of this module.

    The exporter's poll loop feeds it through :meth:`after_poll` (hold window, caps, ``recovery.dry_run``);
    the ``recover-stale`` command calls :meth:`run` directly with ``event="manual_recover_stale"``, its
    own ``dry_run``, connection and limit.
    """

    def __init__(
        self,
        target: Target,
        actions: JobActions,
        stale_after: float,
        *,
        event: str = "recovery",
        dry_run: bool | None = None,
    ):
        self.target = target
        self.config: Recovery = target.recovery
        self.actions = actions
        self.stale_after = stale_after
        self.event = event
        self.dry_run = self.config.dry_run if dry_run is None else dry_run
        self.tracker = HoldTracker(self.config.hold_for)
        self.state = RecoveryState()
        # database (queue, kind) -> exported labels; the poller plugs in its label policy so the
        # recovered-jobs counter obeys the same caps and reserved-value mapping as every other series
        self.label: Callable[[str, str], tuple[str, str] | None] = lambda queue, kind: (queue, kind)
        self.last_changed: list[dict] = []  # rows the last run reset (or would have, in a dry run)
        self.last_error: str | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (when, jobs) of the last hour

    def eligible(self, job: StaleJob) -> bool:
        allowed_queues, allowed_kinds = self.config.queues, self.config.kinds
        return (allowed_queues is None or job.queue in allowed_queues) and (
            allowed_kinds is None or job.kind in allowed_kinds
        )

    def budget(self, now: float) -> int:
        while self._recent and self._recent[0][0] <= now - HOUR:
            self._recent.popleft()
        used = sum(jobs for _, jobs in self._recent)
        return max(0, min(self.config.max_jobs_per_run, self.config.max_jobs_per_hour - used))

    async def close(self) -> None:
        await self.actions.close()

    def abort(self) -> None:
        self.actions.abort()

    async def after_poll(
        self, stale: list[StaleJob] | None, now: float | None = None
    ) -> str | None:
        """Feed one poll's stale jobs (None: the poll failed); run recovery when candidates are due."""
        now = time.time() if now is None else now
        if stale is None:
            self.tracker.forget()
            return None
        candidates = [job for job in self.tracker.observe(stale, now) if self.eligible(job)]
        if not candidates:
            return None
        return await self.run(candidates, now)

    async def run(self, candidates: list[StaleJob], now: float, limit: int | None = None) -> str:
        """Reset those candidates still stale under the same claim; ``limit`` replaces the caps."""
        self.last_changed, self.last_error = [], None
        limit = self.budget(now) if limit is None else limit
        if limit == 0:
            return self._record("capped", candidates, [])
        try:
            result = await self.actions.reset_stale(
                candidates, self.stale_after, limit, commit=not self.dry_run
            )
        except SourceFailure as exc:
            self.last_error = str(exc)
            return self._record("error", candidates, [], error=self.last_error)
        if result.locked:
            return self._record("locked", candidates, [])
        changed = self.last_changed = list(result.changed)
        if not changed:
            return self._record("nothing", candidates, [])
        if self.dry_run:
            return self._record("dry_run", candidates, changed)
        self._recent.append((now, len(changed)))
        self.tracker.forget([row["id"] for row in changed])
        for row in changed:
            key = self.label(row["queue"], row["kind"])
            if key is not None:
                self.state.recovered[key] += 1
        return self._record("recovered", candidates, changed)

    def _record(
        self, result: str, candidates: list[StaleJob], changed: list[dict], error: str | None = None
    ) -> str:
        self.state.runs[result] += 1
        record_run(
            self.event,
            self.target.name,
            result,
            dry_run=self.dry_run,
            changed=changed,
            candidates=[job.id for job in candidates],
            error=error,
        )
        return result
