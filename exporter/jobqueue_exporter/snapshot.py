"""What one poll of a target found, in label space: per (queue, kind) counts and ages.

The label policy decides which queues are exported (allow-list), caps distinct kinds per queue (overflow
goes to ``kind="__other__"``) and remembers every (queue, kind) seen, so their series stay at 0 when empty
instead of vanishing.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

LIVE_STATES = ("pending", "scheduled", "running", "retrying")
TERMINAL_STATES = ("failed", "dead", "cancelled")
OVERFLOW_KIND = "__other__"
DEFAULT_KIND = "default"

SeriesKey = tuple[str, str]  # (queue, kind)


class LabelPolicy:
    def __init__(self, queues: list[str] | None, max_kinds_per_queue: int):
        self.allowed_queues = set(queues) if queues is not None else None
        self.max_kinds = max_kinds_per_queue
        self._kinds: dict[str, set[str]] = {}
        self.known: set[SeriesKey] = set()
        for queue in queues or ():
            self._kinds.setdefault(queue, set())

    def label(self, queue: str, kind: str) -> SeriesKey | None:
        """Map a database (queue, kind) to exported labels; None when the queue is not exported."""
        if self.allowed_queues is not None and queue not in self.allowed_queues:
            return None
        kinds = self._kinds.setdefault(queue, set())
        if kind not in kinds:
            if len(kinds) >= self.max_kinds:
                kind = OVERFLOW_KIND
            else:
                kinds.add(kind)
        key = (queue, kind)
        self.known.add(key)
        return key

    def series_keys(self) -> list[SeriesKey]:
        """Every (queue, kind) to export: seen ones, plus declared queues not seen yet."""
        seen_queues = {q for q, _ in self.known}
        declared = [(q, DEFAULT_KIND) for q in self._kinds if q not in seen_queues]
        return sorted(self.known | set(declared))


@dataclass
class QueueStats:
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIVE_STATES, 0))
    oldest_pending_age_seconds: float = 0.0
    oldest_running_age_seconds: float = 0.0
    stale_jobs: int = 0


@dataclass
class TargetSnapshot:
    """A consistent reading of one target, taken at ``taken_at`` (Unix time)."""

    taken_at: float
    series: dict[SeriesKey, QueueStats]
    terminal_counted: bool = False


def build_snapshot(
    policy: LabelPolicy,
    live_rows: Iterable[tuple[str, str, str, int, float | None, int]],
    terminal_rows: Iterable[tuple[str, str, str, int]] | None,
    taken_at: float | None = None,
) -> TargetSnapshot:
    series: dict[SeriesKey, QueueStats] = {}

    def stats(key: SeriesKey) -> QueueStats:
        if key not in series:
            series[key] = QueueStats()
            if terminal_rows is not None:
                series[key].jobs.update(dict.fromkeys(TERMINAL_STATES, 0))
        return series[key]

    for queue, kind, state, jobs, oldest_age, stale in live_rows:
        key = policy.label(queue, kind)
        if key is None:
            continue
        entry = stats(key)
        entry.jobs[state] = entry.jobs.get(state, 0) + int(jobs)
        age = max(float(oldest_age or 0.0), 0.0)
        if state == "pending":
            entry.oldest_pending_age_seconds = max(entry.oldest_pending_age_seconds, age)
        elif state == "running":
            entry.oldest_running_age_seconds = max(entry.oldest_running_age_seconds, age)
            entry.stale_jobs += int(stale or 0)
    for queue, kind, state, jobs in terminal_rows or ():
        key = policy.label(queue, kind)
        if key is not None:
            entry = stats(key)
            entry.jobs[state] = entry.jobs.get(state, 0) + int(jobs)
    for key in policy.series_keys():
        stats(key)
    return TargetSnapshot(
        taken_at=taken_at if taken_at is not None else time.time(),
        series=series,
        terminal_counted=terminal_rows is not None,
    )


class SuccessWindow:
    """Finished-job outcomes over a sliding time window, kept as per-poll buckets."""

    def __init__(self, window_seconds: float):
        self.window = window_seconds
        self._buckets: deque[tuple[float, Counter[tuple[str, str, str]]]] = deque()

    def add(self, at: float, counts: Counter[tuple[str, str, str]]) -> None:
        if counts:
            self._buckets.append((at, counts))

    def ratios(self, now: float) -> dict[SeriesKey, float]:
        """succeeded / (succeeded + failed + dead) per (queue, kind); absent when nothing finished."""
        while self._buckets and self._buckets[0][0] < now - self.window:
            self._buckets.popleft()
        totals: Counter[tuple[str, str, str]] = Counter()
        for _, counts in self._buckets:
            totals.update(counts)
        ratios: dict[SeriesKey, float] = {}
        keys = {(q, k) for q, k, _ in totals}
        for queue, kind in keys:
            ok = totals[(queue, kind, "succeeded")]
            bad = totals[(queue, kind, "failed")] + totals[(queue, kind, "dead")]
            if ok + bad:
                ratios[(queue, kind)] = ok / (ok + bad)
        return ratios
