"""The watermark logic on its own: row limits, timestamp ties and when the floor may move."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from jobqueue_exporter.sources.postgres.watermark import FinishedRow, FinishedTail, SnapshotInfo

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(key, ident: str) -> FinishedRow:
    return FinishedRow(key, ident, "q", "k", "succeeded")


def snap(xmin: int, xmax: int, seconds: float = 0) -> SnapshotInfo:
    return SnapshotInfo(xmin=xmin, xmax=xmax, now=T0 + timedelta(seconds=seconds))


def test_floor_waits_for_transactions_running_at_the_candidate_snapshot() -> None:
    tail = FinishedTail("id")
    tail.start(10, [], snap(100, 105), high=10)
    assert tail.take([row(12, "12")], snap(103, 110), high=12, limit_hit=False) == [row(12, "12")]
    assert tail.floor == 10, (
        "xmin 103 < xmax 105 of the start snapshot: a lower id may still appear"
    )
    assert tail.take([row(11, "11"), row(12, "12")], snap(105, 110), high=12, limit_hit=False) == [
        row(11, "11")
    ]
    assert tail.floor == 10, "only the start candidate (10) is settled yet"
    tail.take([row(11, "11"), row(12, "12")], snap(110, 111), high=12, limit_hit=False)
    assert tail.floor == 12
    assert tail.remembered == 0


def test_row_limit_never_skips_tied_timestamps() -> None:
    tail = FinishedTail("timestamp", settle_seconds=0)
    tail.start(T0, [], snap(1, 2), high=None)
    tied = T0 + timedelta(seconds=5)
    page = [row(T0 + timedelta(seconds=1), "a"), row(tied, "b")]
    assert tail.take(page, snap(2, 3, seconds=60), high=None, limit_hit=True) == page
    # the candidate stops just below the last key read, so "c" (same timestamp) is read next time
    tail.take(page, snap(3, 4, seconds=61), high=None, limit_hit=True)
    assert tail.floor < tied
    rest = [row(tied, "b"), row(tied, "c")]
    assert tail.take(rest, snap(4, 5, seconds=62), high=None, limit_hit=False) == [row(tied, "c")]
