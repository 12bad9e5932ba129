"""Snapshots -> Prometheus metric families, built fresh on every scrape.

A custom collector (not module-level gauges) so that a target that could not be read simply has no job
series: the last values are never served as if they were current.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .poll import TargetState, build_info
from .recovery import RUN_RESULTS
from .snapshot import LIVE_STATES, TERMINAL_STATES

POLL_ERROR_REASONS = ("connection", "timeout", "query", "schema")


class JobQueueCollector(Collector):
    def __init__(self, states: Iterable[TargetState]):
        self.states = list(states)

    def describe(self) -> list:  # no eager collect() at registration time
        return []

    def collect(self) -> Iterator:
        extra = sorted({name for s in self.states for name in s.labels})

        def names(*specific: str) -> list[str]:
            return ["target", *specific, *extra]

        def values(state: TargetState, *vals: str) -> list[str]:
            return [state.name, *vals, *(state.labels.get(n, "") for n in extra)]

        base = names()
        info = InfoMetricFamily(
            "jobqueue_exporter_build",
            "Build information of the running jobqueue-exporter (value 1).",
        )
        info.add_metric([], build_info())
        yield info

        up = GaugeMetricFamily(
            "jobqueue_up",
            "1 if the last poll of the target's database succeeded, else 0.",
            labels=base,
        )
        last_success = GaugeMetricFamily(
            "jobqueue_last_poll_success_timestamp_seconds",
            "Unix time of the last successful poll of the target (absent before the first).",
            labels=base,
        )
        duration = GaugeMetricFamily(
            "jobqueue_poll_duration_seconds",
            "Wall time the last poll of the target took, successful or not.",
            labels=base,
        )
        errors = CounterMetricFamily(
            "jobqueue_poll_errors",
            "Polls of the target that failed, by reason (connection, timeout, query, schema).",
            labels=names("reason"),
        )
        jobs = GaugeMetricFamily(
            "jobqueue_jobs",
            "Jobs currently in each canonical state (terminal states only with count_terminal_states).",
            labels=names("queue", "kind", "state"),
        )
        pending_age = GaugeMetricFamily(
            "jobqueue_oldest_pending_age_seconds",
            "Age of the oldest job eligible to run now, since it became eligible; 0 when none.",
            labels=names("queue", "kind"),
        )
        running_age = GaugeMetricFamily(
            "jobqueue_oldest_running_age_seconds",
            "Age of the longest-running job, since it started; 0 when none.",
            labels=names("queue", "kind"),
        )
        stale = GaugeMetricFamily(
            "jobqueue_stale_jobs",
            "Running jobs that meet the target's stale rule (abandoned by their worker).",
            labels=names("queue", "kind"),
        )
        ratio = GaugeMetricFamily(
            "jobqueue_success_ratio",
            "succeeded / (succeeded + failed + dead) over the target's success_window; "
            "absent when nothing finished in the window.",
            labels=names("queue", "kind"),
        )
        finished = CounterMetricFamily(
            "jobqueue_jobs_finished",
            "Jobs that finished since the exporter started, by outcome, counted once each.",
            labels=names("queue", "kind", "outcome"),
        )
        recovery_runs = CounterMetricFamily(
            "jobqueue_recovery_runs",
            "Stale-job recovery runs by result: recovered, dry_run (would have reset jobs), nothing "
            "(candidates were no longer stale), locked (another replica acted), capped (hourly "
            "budget used up), error.",
            labels=names("result"),
        )
        recovered = CounterMetricFamily(
            "jobqueue_recovered_jobs",
            "Stale jobs reset by automatic recovery (not counting dry runs).",
            labels=names("queue", "kind"),
        )
        now = time.time()
        for state in self.states:
            if state.recovery is not None:
                for result in RUN_RESULTS:
                    recovery_runs.add_metric(values(state, result), state.recovery.runs[result])
                for (queue, kind), count in sorted(state.recovery.recovered.items()):
                    recovered.add_metric(values(state, queue, kind), count)
            if state.up is not None:
                up.add_metric(values(state), 1.0 if state.up else 0.0)
            if state.last_success is not None:
                last_success.add_metric(values(state), state.last_success)
            if state.last_poll_duration is not None:
                duration.add_metric(values(state), state.last_poll_duration)
            for reason in POLL_ERROR_REASONS:
                errors.add_metric(values(state, reason), state.errors[reason])
            snapshot = state.snapshot
            if snapshot is None:
                # down: serve nothing that would read as current, not even frozen counters (they
                # would look like a stalled queue); counting resumes exactly where it stopped
                continue
            if state.finished_counting:
                for (queue, kind, outcome), count in sorted(state.finished.items()):
                    finished.add_metric(values(state, queue, kind, outcome), count)
            states = LIVE_STATES + (TERMINAL_STATES if snapshot.terminal_counted else ())
            for (queue, kind), stats in sorted(snapshot.series.items()):
                for job_state in states:
                    jobs.add_metric(
                        values(state, queue, kind, job_state), stats.jobs.get(job_state, 0)
                    )
                pending_age.add_metric(values(state, queue, kind), stats.oldest_pending_age_seconds)
                running_age.add_metric(values(state, queue, kind), stats.oldest_running_age_seconds)
                stale.add_metric(values(state, queue, kind), stats.stale_jobs)
            if state.finished_counting and state.window is not None:
                for (queue, kind), value in sorted(state.window.ratios(now).items()):
                    ratio.add_metric(values(state, queue, kind), value)
        yield from (
            up,
            last_success,
            duration,
            errors,
            jobs,
            pending_age,
            running_age,
            stale,
            ratio,
        )
        yield finished
        yield recovery_runs
        yield recovered
