"""A scripted source for fast unit tests of everything after the source boundary (the poll loop, label
policy, success window, recovery's hold window and budgets), with no database. It implements the same
``Source`` / ``JobActions`` protocols the PostgreSQL source does; tests queue readings or failures."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from jobqueue_exporter.sources import (
    Capabilities,
    Finished,
    LiveRow,
    Reading,
    ResetResult,
    SourceFailure,
    StaleJob,
)


class FakeActions:
    """Records every reset it is asked for; resets what is asked, up to the limit, unless ``locked``."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int, bool]] = []
        self.locked = False
        self.fail: SourceFailure | None = None
        self.closed = self.aborted = 0

    async def reset_stale(
        self, candidates: Sequence[StaleJob], stale_after: float, limit: int, commit: bool
    ) -> ResetResult:
        self.calls.append(([job.id for job in candidates], limit, commit))
        if self.fail is not None:
            raise self.fail
        if self.locked:
            return ResetResult(locked=True)
        changed = [
            {"id": job.id, "queue": job.queue, "kind": job.kind, "state": "pending"}
            for job in list(candidates)[:limit]
        ]
        return ResetResult(changed=changed)

    async def close(self) -> None:
        self.closed += 1

    def abort(self) -> None:
        self.aborted += 1


class FakeSource:
    """Each read returns (or raises) the next scripted item; ``hang`` makes reads never answer."""

    def __init__(
        self,
        outcomes: tuple = ("succeeded", "failed", "dead", "cancelled"),
        default_stale_after: float = 60.0,
    ):
        self.capabilities = Capabilities(
            preset="fake",
            outcomes=outcomes,
            default_stale_after=default_stale_after,
            finished_counting=True,
            stale_jobs=True,
        )
        self.endpoint = "fake:0"
        self.connecting = False
        self.script: deque[Reading | BaseException] = deque()
        self.hang = False
        self.reads = 0
        self.want_stale: list[bool] = []
        self.aborted = self.closed = 0
        self._connected = False
        self.fake_actions = FakeActions()

    @property
    def connected(self) -> bool:
        return self._connected

    def then(self, *items: Reading | BaseException) -> FakeSource:
        self.script.extend(items)
        return self

    async def read(self, stale_after: float, want_stale: bool) -> Reading:
        self.reads += 1
        self.want_stale.append(want_stale)
        if self.hang:
            await asyncio.Event().wait()
        item = self.script.popleft() if self.script else Reading(live=[])
        if isinstance(item, BaseException):
            self._connected = False
            raise item
        self._connected = True
        return item

    def abort(self) -> None:
        self.aborted += 1
        self._connected = False

    async def close(self) -> None:
        self.closed += 1
        self._connected = False

    def explain(self, exc: BaseException, connecting: bool) -> SourceFailure:
        if isinstance(exc, SourceFailure):
            return exc
        if isinstance(exc, asyncio.TimeoutError):
            return SourceFailure("timeout", f"no answer from {self.endpoint}")
        return SourceFailure("query", str(exc))

    def actions(self) -> FakeActions:
        return self.fake_actions


def live(queue: str, kind: str, state: str = "pending", jobs: int = 1, **extra) -> LiveRow:
    return LiveRow(queue, kind, state, jobs, extra.get("age"), extra.get("stale", 0))  # type: ignore[arg-type]


def finished(queue: str, kind: str, outcome: str, jobs: int, at: float) -> Finished:
    return Finished(queue, kind, outcome, jobs, at)  # type: ignore[arg-type]
