"""Exactly-once counting of finished jobs from a key that only roughly follows commit order.

Finished jobs are read incrementally (``key > floor``) by an event id or a finish timestamp. Keys are
assigned before commit, so a transaction that commits late can make a *lower* key visible after a higher
one was read. We therefore keep every ``(key, row_id)`` read above the floor, count only unseen ones, and
raise the floor to a candidate only once no transaction that could still add rows below it is running:

* At poll *k* (inside the poll's REPEATABLE READ snapshot) the candidate is the highest key visible (id
  keys) or ``now() - settle`` (timestamp keys, because a timestamp is taken when a transaction starts,
  possibly before it has a transaction id), together with the snapshot's ``xmax``.
* At a later poll whose snapshot ``xmin`` is at least that ``xmax``, every transaction that was running at
  poll *k* has finished, so every row with a key at or below the candidate is visible and has been read.

Rows are remembered only while their key is above the floor, so memory is bounded by what finishes
between two polls (plus ``settle`` for timestamp keys).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

# one tail's keys are all ids or all timestamps (``key_kind``), so they compare with each other
Key = Any


@dataclass(frozen=True)
class SnapshotInfo:
    """What one poll's transaction snapshot says about concurrent transactions and the DB clock."""

    xmin: int
    xmax: int
    now: datetime


@dataclass(frozen=True)
class FinishedRow:
    key: Key
    row_id: str
    queue: str
    kind: str
    outcome: str


@dataclass(frozen=True)
class _Candidate:
    key: Key
    xmax: int


class FinishedTail:
    def __init__(self, key_kind: str, settle_seconds: float = 30.0):
        if key_kind not in ("id", "timestamp"):
            raise ValueError(f"unknown key kind {key_kind!r}")
        self.key_kind = key_kind
        self.settle = timedelta(seconds=settle_seconds)
        self.floor: Key | None = None
        self._seen: set[tuple[Key, str]] = set()
        self._candidates: list[_Candidate] = []

    @property
    def remembered(self) -> int:
        return len(self._seen)

    def start(
        self, floor: Key, baseline: Iterable[FinishedRow], snap: SnapshotInfo, high: Key | None
    ) -> None:
        """Begin tailing above ``floor``; ``baseline`` rows (already accounted for) are never counted."""
        self.floor = floor
        self._seen = {(row.key, row.row_id) for row in baseline if row.key > floor}
        self._candidates = [self._candidate(snap, high, None)]

    def take(
        self,
        rows: list[FinishedRow],
        snap: SnapshotInfo,
        high: Key | None,
        limit_hit: bool,
    ) -> list[FinishedRow]:
        """Return the rows not counted before, then move the floor as far as is provably safe."""
        assert self.floor is not None, "start() first"
        new = []
        for row in rows:
            ident = (row.key, row.row_id)
            if row.key > self.floor and ident not in self._seen:
                self._seen.add(ident)
                new.append(row)
        ready = [c for c in self._candidates if snap.xmin >= c.xmax]
        if ready:
            best = max(c.key for c in ready)
            if best > self.floor:
                self.floor = best
                self._seen = {s for s in self._seen if s[0] > best}
            self._candidates = [c for c in self._candidates if snap.xmin < c.xmax]
        last_read = rows[-1].key if (limit_hit and rows) else None
        self._candidates.append(self._candidate(snap, high, last_read))
        return new

    def _candidate(self, snap: SnapshotInfo, high: Key | None, last_read: Key | None) -> _Candidate:
        if self.key_kind == "timestamp":
            key: Key = snap.now - self.settle
        else:
            assert high is not None, "id-keyed tails need the highest visible key"
            key = high
        if last_read is not None:
            # Rows beyond the row limit were not read yet: never move the floor past them. Timestamps
            # may tie, so stop just below the last one read; the tied rows already read stay remembered.
            if isinstance(last_read, datetime):
                last_read = last_read - timedelta(microseconds=1)
            key = min(key, last_read)
        return _Candidate(key, snap.xmax)


@dataclass(frozen=True)
class RequeuedRow:
    """A waiting job that has failed before (attempts > 0, or an error recorded), in one poll."""

    row_id: str
    token: str  # changes with every requeue (the attempt number, else the due time)
    queue: str | None
    kind: str | None


class RequeueTracker:
    """Counts failed attempts that were requeued, for tables that keep no event of it: each (job, token)
    seen waiting-after-a-failure that the previous poll did not see is one requeue.

    Exact as long as a requeued job still waits at the next poll (its retry delay is at least the poll
    interval); a job that fails, waits and is picked up again between two polls is not seen. The first
    poll is the baseline (what happened before the exporter started is not counted), and so is a poll
    that read only part of the waiting jobs (``complete`` False): counting then would take jobs entering
    the read part for new requeues.
    """

    def __init__(self) -> None:
        self._previous: set[tuple[str, str]] | None = None

    def take(self, rows: Iterable[RequeuedRow], complete: bool = True) -> list[RequeuedRow]:
        current = {(row.row_id, row.token): row for row in rows}
        previous, self._previous = self._previous, set(current)
        if previous is None or not complete:
            return []
        return [row for ident, row in current.items() if ident not in previous]

    def reset(self) -> None:
        """Forget the baseline (after a failed poll: what happened meanwhile is unknown)."""
        self._previous = None
