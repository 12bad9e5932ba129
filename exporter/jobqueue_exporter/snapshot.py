"""What one poll of a target found, in label space: per (queue, kind) counts and ages.

The label policy bounds what a target exports:

* the allow-list (``queues``) decides which queues are exported at all; listed queues always keep their own
  label and never expire;
* at most ``max_queues`` other queues get their own label, further queues are summed into
  ``queue="__other__"``; at most ``max_kinds_per_queue`` kinds per queue, further kinds into
  ``kind="__other__"``. A slot is first come, first served and kept until its queue (or kind) expires;
* a (queue, kind) not seen in any poll for ``label_ttl`` expires: it is no longer exported and its slots
  free up (:meth:`LabelPolicy.expire`);
* database values are mapped injectively onto label values (:func:`label_value`), so a real queue named
  ``__other__`` never merges into the overflow series and an empty name never becomes an absent label.

Seen (queue, kind) keys stay exported at 0 when empty until they expire, instead of vanishing.
"""

from __future__ import annotations

import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

LIVE_STATES = ("pending", "scheduled", "running", "retrying")
TERMINAL_STATES = ("failed", "dead", "cancelled")
OVERFLOW_KIND = "__other__"
OVERFLOW_QUEUE = "__other__"
EMPTY_VALUE = "__empty__"  # label of a queue or kind named "" (Prometheus drops empty labels)
NULL_VALUE = "__null__"  # label of a SQL NULL queue or kind
DEFAULT_KIND = "default"
# real values that look like a reserved marker, with any number of extra leading underscores
_MARKER_LIKE = re.compile(r"_*__(?:other|empty|null)__")

SeriesKey = tuple[str, str]  # (queue, kind), as exported


def label_value(value: str | None) -> str:
    """Database value -> label value, injective and never a reserved marker.

    ``None`` -> ``__null__``, ``""`` -> ``__empty__``; a value of the form ``_*__other__`` /
    ``_*__empty__`` / ``_*__null__`` gets one more leading underscore (``__other__`` -> ``___other__``);
    everything else is unchanged. So ``__other__``, ``__empty__`` and ``__null__`` are produced only by the
    exporter itself, and two different database values never share a label value.
    """
    if value is None:
        return NULL_VALUE
    if value == "":
        return EMPTY_VALUE
    if _MARKER_LIKE.fullmatch(value):
        return "_" + value
    return value


class LabelPolicy:
    def __init__(
        self,
        queues: list[str] | None,
        max_kinds_per_queue: int,
        max_queues: int | None = None,
        label_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """``max_queues``/``label_ttl`` None: no queue cap / nothing expires. ``clock`` stamps when
        each key was last seen (Unix time; injectable for tests)."""
        self.declared = {label_value(q) for q in queues} if queues is not None else set()
        self.allow_list = queues is not None
        self.max_kinds = max_kinds_per_queue
        self.max_queues = max_queues
        self.label_ttl = label_ttl
        self.clock = clock
        self._kinds: dict[str, set[str]] = {q: set() for q in sorted(self.declared)}
        self._queue_slots: set[str] = set()  # undeclared queues holding their own label
        self.last_seen: dict[SeriesKey, float] = {}

    @property
    def known(self) -> set[SeriesKey]:
        return set(self.last_seen)

    def label(self, queue: str | None, kind: str | None) -> SeriesKey | None:
        """Map a database (queue, kind) to exported labels, and mark them seen now; None when the
        queue is not exported."""
        queue, kind = label_value(queue), label_value(kind)
        if self.allow_list and queue not in self.declared:
            return None
        if queue not in self._kinds:
            if self.max_queues is None or len(self._queue_slots) < self.max_queues:
                self._queue_slots.add(queue)
                self._kinds[queue] = set()
            else:
                queue = OVERFLOW_QUEUE
                self._kinds.setdefault(queue, set())
        kinds = self._kinds[queue]
        if kind not in kinds:
            if len(kinds) >= self.max_kinds:
                kind = OVERFLOW_KIND
            else:
                kinds.add(kind)
        key = (queue, kind)
        self.last_seen[key] = self.clock()
        return key

    def expire(self, now: float | None = None) -> set[SeriesKey]:
        """Forget keys not seen for longer than label_ttl (never those of declared queues); free
        their kind slot, and the queue's slot once none of its keys is left. Returns the keys
        forgotten, which must no longer be served (their counters included)."""
        if self.label_ttl is None:
            return set()
        cutoff = (self.clock() if now is None else now) - self.label_ttl
        expired = {
            key
            for key, seen in self.last_seen.items()
            if seen < cutoff and key[0] not in self.declared
        }
        if not expired:
            return expired
        for key in expired:
            del self.last_seen[key]
            queue, kind = key
            self._kinds[queue].discard(kind)
        remaining = {queue for queue, _ in self.last_seen}
        for queue in {queue for queue, _ in expired} - remaining:
            del self._kinds[queue]
            self._queue_slots.discard(queue)
        return expired

    def series_keys(self) -> list[SeriesKey]:
        """Every (queue, kind) to export: seen ones, plus declared queues not seen yet."""
        seen_queues = {q for q, _ in self.last_seen}
        declared = {(q, DEFAULT_KIND) for q in self.declared if q not in seen_queues}
        return sorted(self.last_seen.keys() | declared)


def forget_keys(keys: set[SeriesKey], *tables: dict | None) -> None:
    """Delete the entries of each table (keyed (queue, kind) or (queue, kind, ...)) of ``keys``."""
    for table in tables:
        if table and keys:
            for entry in [entry for entry in table if tuple(entry[:2]) in keys]:
                del table[entry]


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
    # exported queue -> paused (None: the system cannot pause queues)
    paused: dict[str, bool] | None = None


def _row_order(row: tuple) -> tuple[str, str]:
    return label_value(row[0]), label_value(row[1])


def build_snapshot(
    policy: LabelPolicy,
    live_rows: Iterable[tuple[str | None, str | None, str, int, float | None, int]],
    terminal_rows: Iterable[tuple[str | None, str | None, str, int]] | None,
    taken_at: float | None = None,
) -> TargetSnapshot:
    series: dict[SeriesKey, QueueStats] = {}

    def stats(key: SeriesKey) -> QueueStats:
        if key not in series:
            series[key] = QueueStats()
            if terminal_rows is not None:
                series[key].jobs.update(dict.fromkeys(TERMINAL_STATES, 0))
        return series[key]

    # sorted, so which queues and kinds come first (and keep a slot) does not depend on row order
    for queue, kind, state, jobs, oldest_age, stale in sorted(live_rows, key=_row_order):
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
    for queue, kind, state, jobs in sorted(terminal_rows or (), key=_row_order):
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

    def forget(self, keys: set[SeriesKey]) -> None:
        """Drop the outcomes of expired (queue, kind) keys."""
        for _, counts in self._buckets:
            forget_keys(keys, counts)

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
