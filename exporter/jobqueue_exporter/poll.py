"""Polling one target: the loop, its deadline and backoff, and what one reading means in label space.

The store is read through the target's :class:`~jobqueue_exporter.sources.Source` (SQL, connections and
exactly-once tails live there); this module only schedules reads and turns each :class:`Reading` into the
target's state: a snapshot under the label policy, finished counters, the success window, stale jobs for
recovery.

* polls of one target never overlap; failures back off exponentially with jitter;
* a whole poll, connecting included, must finish within ``deadline``, else the target is down and its
  connection dropped: a hung store is ``jobqueue_up 0`` at the first poll that cannot finish;
* a failed poll serves no job series (never the last values as current).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from . import __version__
from .config import Config, Target
from .recovery import Recoverer, RecoveryState
from .snapshot import (
    DEFAULT_KIND,
    LabelPolicy,
    QueueStats,
    SuccessWindow,
    TargetSnapshot,
    build_snapshot,
    forget_keys,
)
from .sources import Capabilities, Finished, Reading, Source, SourceFailure, StaleJob, open_source

log = logging.getLogger(__name__)

MIN_POLL_DEADLINE = 2.0


@dataclass
class TargetState:
    """Everything the metrics and HTTP layers read about one target."""

    name: str
    preset: str
    labels: dict[str, str]
    up: bool | None = None  # None until the first poll finished
    snapshot: TargetSnapshot | None = None
    last_success: float | None = None
    last_error: str | None = None
    down_since: float | None = None  # Unix time of the first failed poll of the current outage
    last_poll_duration: float | None = None
    errors: Counter[str] = field(default_factory=Counter)
    finished: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    finished_counting: bool = False
    # finished-job events the store dropped unread, by exported queue (systems with an event stream)
    lost_events: Counter[str] = field(default_factory=Counter)
    window: SuccessWindow | None = None
    recovery: RecoveryState | None = None


def stale_after_for(target: Target, capabilities: Capabilities) -> float:
    """Seconds after which a running job counts as stale: the target's setting, else the preset's."""
    if target.stale_after is not None:
        return target.stale_after
    return capabilities.default_stale_after


def poll_deadline(interval: float, statement_timeout: float) -> float:
    """Client-side limit for one poll: a server that stops answering (no RST, no error) must mark the
    target down at the first poll that cannot finish. Long enough for the server-side
    statement_timeout to fire first on a slow statement, short enough to end before the next poll."""
    return max(MIN_POLL_DEADLINE, min(interval, 2 * statement_timeout))


StateListener = Callable[["TargetState"], Awaitable[None]]


class TargetPoller:
    """Polls one target on its interval and publishes its state to ``on_update`` (the metrics cache)
    after every poll and recovery step."""

    def __init__(
        self,
        config: Config,
        target: Target,
        on_update: StateListener | None = None,
        source: Source | None = None,
    ):
        self.target = target
        self.interval = config.interval_for(target)
        self.deadline = poll_deadline(self.interval, target.statement_timeout)
        self.on_update = on_update
        self.source = source if source is not None else open_source(target, self.deadline)
        self.stale_after = stale_after_for(target, self.source.capabilities)
        self.policy = LabelPolicy(
            target.queues, target.max_kinds_per_queue, target.max_queues, target.label_ttl
        )
        self.state = TargetState(
            name=target.name,
            preset=target.preset_name,
            labels=dict(target.labels),
            window=SuccessWindow(target.success_window),
        )
        self.recoverer: Recoverer | None = None
        self._stale_jobs: list[StaleJob] = []
        if target.recovery.enabled and self.source.capabilities.stale_jobs:
            self.recoverer = Recoverer(target, self.source.actions(), self.stale_after)
            self.recoverer.label = self.policy.label
            self.state.recovery = self.recoverer.state
        self._lock = asyncio.Lock()
        self._failures = 0

    @property
    def endpoint(self) -> str:
        return self.source.endpoint

    async def close(self) -> None:
        if self.recoverer is not None:
            await self.recoverer.close()
        await self.source.close()

    def abort(self) -> None:
        """Drop every connection at once, also those closing gracefully (shutdown)."""
        if self.recoverer is not None:
            self.recoverer.abort()
        self.source.abort()

    # -- one poll ---------------------------------------------------------------------------------

    async def poll_once(self) -> TargetSnapshot:
        """Read the target once and publish the snapshot; on failure publish 'down' (with the cause in
        ``state.last_error``) and re-raise. The whole poll, connecting included, must finish within
        ``deadline``."""
        async with self._lock:
            started = time.monotonic()
            try:
                reading = await asyncio.wait_for(
                    self.source.read(self.stale_after, want_stale=self.recoverer is not None),
                    timeout=self.deadline,
                )
            except asyncio.CancelledError:
                self.state.last_poll_duration = time.monotonic() - started
                await self.close()
                raise
            except BaseException as exc:
                self.state.last_poll_duration = time.monotonic() - started
                failure = self.source.explain(exc, self.source.connecting)
                if isinstance(exc, asyncio.TimeoutError):
                    # the server stopped answering: a graceful close would wait on it too
                    self.source.abort()
                    failure = SourceFailure(failure.reason, f"{failure} within {self.deadline:g}s")
                self.state.errors[failure.reason] += 1
                self.state.up = False
                self.state.snapshot = None  # never serve the last values as current
                self.state.last_error = f"{failure.reason}: {failure}"
                self.state.down_since = self.state.down_since or time.time()
                await self.close()
                await self.publish()
                raise
            snapshot = self._apply(reading)
            self.state.last_poll_duration = time.monotonic() - started
            self.state.up = True
            self.state.snapshot = snapshot
            self.state.last_success = snapshot.taken_at
            self.state.last_error = None
            self.state.down_since = None
            await self.publish()
            return snapshot

    async def publish(self) -> None:
        """Hand the current state to the metrics layer (rendered once, served until the next)."""
        if self.on_update is not None:
            await self.on_update(self.state)

    def _apply(self, reading: Reading) -> TargetSnapshot:
        """One reading -> the snapshot (label space), counters, success window and stale jobs."""
        capabilities = self.source.capabilities
        self.state.finished_counting = capabilities.finished_counting
        assert self.state.window is not None
        # finished jobs first: a kind that only finished since the last poll is exported too
        for at, counts in self._label_counts(reading.backfill):
            self.state.window.add(at, counts)
        for at, counts in self._label_counts(reading.finished):
            self.state.finished.update(counts)
            self.state.window.add(at, counts)
        snapshot = build_snapshot(
            self.policy,
            [
                (r.queue, r.kind, r.state, r.jobs, r.oldest_age_seconds, r.stale_jobs)
                for r in reading.live
            ],
            [(r.queue, r.kind, r.state, r.jobs) for r in reading.terminal]
            if reading.terminal is not None
            else None,
            taken_at=time.time(),
        )
        if reading.stale is not None:
            self._stale_jobs = list(reading.stale)
        if reading.paused is not None:
            snapshot.paused = self._label_paused(reading.paused, snapshot)
        for queue, lost in (reading.lost_events or {}).items():
            key = self.policy.label(queue, DEFAULT_KIND)
            if key is not None:
                self.state.lost_events[key[0]] += lost
        # (queue, kind) unseen for label_ttl: no longer served, counters included; slots freed
        expired = self.policy.expire()
        recovered = self.state.recovery.recovered if self.state.recovery else None
        forget_keys(expired, snapshot.series, self.state.finished, recovered)
        self.state.window.forget(expired)
        for queue, kind in snapshot.series:
            for outcome in capabilities.outcomes:
                # present at 0 so the first failure is an increase, not a new series
                self.state.finished.setdefault((queue, kind, outcome), 0)
        return snapshot

    def _label_paused(
        self, paused: Mapping[str, bool], snapshot: TargetSnapshot
    ) -> dict[str, bool]:
        """Paused flags by exported queue; a queue with no series yet gets its (queue, default) key,
        so an empty but known queue is exported (at 0) like any other."""
        queues = {queue for queue, _ in snapshot.series}
        labelled: dict[str, bool] = {}
        for queue, flag in paused.items():
            key = self.policy.label(queue, DEFAULT_KIND)
            if key is None:
                continue
            if key[0] not in queues:
                snapshot.series[key] = QueueStats()
                queues.add(key[0])
            labelled[key[0]] = labelled.get(key[0], False) or flag
        return labelled

    def _label_counts(
        self, finished: Sequence[Finished]
    ) -> list[tuple[float, Counter[tuple[str, str, str]]]]:
        """Finished jobs -> (time, counts by exported (queue, kind, outcome)), oldest first."""
        by_time: dict[float, Counter[tuple[str, str, str]]] = {}
        for event in finished:
            key = self.policy.label(event.queue, event.kind)
            if key is not None:
                by_time.setdefault(event.at, Counter())[(*key, event.outcome)] += event.jobs
        return sorted(by_time.items())

    # -- loop -------------------------------------------------------------------------------------

    async def _recover(self, stale: list[StaleJob] | None) -> None:
        """Hand this poll's stale jobs (None after a failed poll) to recovery, when enabled."""
        if self.recoverer is not None:
            await self.recoverer.after_poll(stale)

    def next_delay(self) -> float:
        """Regular interval after success; exponential backoff with jitter after failures."""
        if self._failures == 0:
            return self.interval
        cap = max(4 * self.interval, 1.0)
        base = min(self.interval * 2 ** (self._failures - 1), cap)
        return base * random.uniform(0.5, 1.0)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.poll_once()
                if self.recoverer is not None:
                    await self._recover(self._stale_jobs)
                    await self.publish()
                if self._failures:
                    log.info(
                        "target %s: polling again after %d failure(s)",
                        self.target.name,
                        self._failures,
                    )
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an outage must never stop the loop
                if self.recoverer is not None:
                    await self._recover(None)
                    await self.publish()
                self._failures += 1
                log.warning(
                    "target %s: poll failed (%s)",
                    self.target.name,
                    self.state.last_error or exc,
                    extra={"target": self.target.name, "failures": self._failures},
                )
            delay = self.next_delay()
            if self._failures == 0:
                delay = max(0.0, delay - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
        await self.close()


def build_info() -> dict[str, str]:
    import platform

    return {"version": __version__, "python_version": platform.python_version()}
