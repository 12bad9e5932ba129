"""Target state -> exposition bytes, rendered once per poll; a scrape only joins cached bytes.

A target's metrics change only when its poll (and recovery step) finishes, so that is when they are
rendered: one byte fragment per metric family, plus a raw-deflate copy of it. A scrape joins, for each
family, its header and every target's fragment (:class:`MetricsCache`), in the Prometheus text format or
OpenMetrics (only the headers differ), gzip-compressed without compressing anything again: each fragment
is deflated on its own and ends on a byte boundary (``Z_SYNC_FLUSH``), so the fragments concatenate into
one valid deflate stream.

A target that could not be read has no job series at all: the last values are never served as if they
were current, and counters do not sit frozen (they would look like a stalled queue).
"""

from __future__ import annotations

import asyncio
import enum
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .poll import TargetState, build_info
from .recovery import RUN_RESULTS
from .snapshot import LIVE_STATES, TERMINAL_STATES, SeriesKey

POLL_ERROR_REASONS = ("connection", "timeout", "query", "schema")
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
GZIP_LEVEL = 6


class MetricType(enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"
    INFO = "info"


@dataclass(frozen=True)
class Family:
    """One metric family: ``name`` is the OpenMetrics family name (no ``_total``/``_info``)."""

    name: str
    type: MetricType
    help: str

    @property
    def sample_name(self) -> str:
        suffix = {MetricType.COUNTER: "_total", MetricType.INFO: "_info"}.get(self.type, "")
        return self.name + suffix

    def header(self, openmetrics: bool) -> bytes:
        if openmetrics:
            help_text = _escape_help(self.help, openmetrics=True)
            return (
                f"# HELP {self.name} {help_text}\n# TYPE {self.name} {self.type.value}\n".encode()
            )
        # the text format names counters and info metrics by their sample; info is a gauge there
        kind = "gauge" if self.type is MetricType.INFO else self.type.value
        name = self.sample_name
        help_text = _escape_help(self.help, openmetrics=False)
        return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n".encode()


BUILD = Family(
    "jobqueue_exporter_build",
    MetricType.INFO,
    "Build information of the running jobqueue-exporter (value 1).",
)
UP = Family(
    "jobqueue_up",
    MetricType.GAUGE,
    "1 if the last poll of the target's database succeeded, else 0.",
)
LAST_SUCCESS = Family(
    "jobqueue_last_poll_success_timestamp_seconds",
    MetricType.GAUGE,
    "Unix time of the last successful poll of the target (absent before the first).",
)
POLL_DURATION = Family(
    "jobqueue_poll_duration_seconds",
    MetricType.GAUGE,
    "Wall time the last poll of the target took, successful or not.",
)
POLL_ERRORS = Family(
    "jobqueue_poll_errors",
    MetricType.COUNTER,
    "Polls of the target that failed, by reason (connection, timeout, query, schema).",
)
JOBS = Family(
    "jobqueue_jobs",
    MetricType.GAUGE,
    "Jobs currently in each canonical state (terminal states only with count_terminal_states).",
)
OLDEST_PENDING_AGE = Family(
    "jobqueue_oldest_pending_age_seconds",
    MetricType.GAUGE,
    "Age of the oldest job eligible to run now, since it became eligible; 0 when none.",
)
OLDEST_RUNNING_AGE = Family(
    "jobqueue_oldest_running_age_seconds",
    MetricType.GAUGE,
    "Age of the longest-running job, since it started; 0 when none.",
)
STALE_JOBS = Family(
    "jobqueue_stale_jobs",
    MetricType.GAUGE,
    "Running jobs that meet the target's stale rule (abandoned by their worker).",
)
QUEUE_PAUSED = Family(
    "jobqueue_queue_paused",
    MetricType.GAUGE,
    "1 while the queue is paused (its workers take no job from it), else 0; only for systems that "
    "can pause queues.",
)
SUCCESS_RATIO = Family(
    "jobqueue_success_ratio",
    MetricType.GAUGE,
    "succeeded / (succeeded + failed + dead) over the target's success_window; "
    "absent when nothing finished in the window.",
)
JOBS_FINISHED = Family(
    "jobqueue_jobs_finished",
    MetricType.COUNTER,
    "Jobs that finished since the exporter started, by outcome, counted once each.",
)
EVENTS_LOST = Family(
    "jobqueue_finished_events_lost",
    MetricType.COUNTER,
    "Finished-job events the store dropped before the exporter read them (a trimmed event "
    "stream); the jobs they stood for are missing from jobqueue_jobs_finished_total.",
)
RECOVERY_RUNS = Family(
    "jobqueue_recovery_runs",
    MetricType.COUNTER,
    "Stale-job recovery runs by result: recovered, dry_run (would have reset jobs), nothing "
    "(candidates were no longer stale), locked (another replica acted), capped (hourly "
    "budget used up), error.",
)
RECOVERED_JOBS = Family(
    "jobqueue_recovered_jobs",
    MetricType.COUNTER,
    "Stale jobs reset by automatic recovery (not counting dry runs).",
)

# exposition order; BUILD is the exporter's own, every other family is rendered per target
FAMILIES: tuple[Family, ...] = (
    BUILD,
    UP,
    LAST_SUCCESS,
    POLL_DURATION,
    POLL_ERRORS,
    JOBS,
    OLDEST_PENDING_AGE,
    OLDEST_RUNNING_AGE,
    STALE_JOBS,
    QUEUE_PAUSED,
    SUCCESS_RATIO,
    JOBS_FINISHED,
    EVENTS_LOST,
    RECOVERY_RUNS,
    RECOVERED_JOBS,
)
_INDEX = {family: i for i, family in enumerate(FAMILIES)}


def _escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)


def format_value(value: float) -> str:
    """A sample value as both formats accept it: integers without a fraction, Go's spelling of
    infinities and NaN."""
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def deflate(data: bytes) -> bytes:
    """Raw deflate of ``data`` ending on a byte boundary, so such pieces can be concatenated."""
    if not data:
        return b""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, unknown OS
_FINAL_EMPTY_BLOCK = b"\x03\x00"  # BFINAL=1, fixed Huffman, end-of-block


def gzip_join(raw: Sequence[bytes], deflated: Sequence[bytes]) -> bytes:
    """One gzip member from pieces deflated separately; ``raw`` gives the CRC and length."""
    crc, size = 0, 0
    for piece in raw:
        crc = zlib.crc32(piece, crc)
        size += len(piece)
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return b"".join((_GZIP_HEADER, *deflated, _FINAL_EMPTY_BLOCK, trailer))


@dataclass(frozen=True)
class TargetExposition:
    """One target's samples: for each entry of FAMILIES, the lines and their raw-deflate copy."""

    raw: tuple[bytes, ...]
    deflated: tuple[bytes, ...]
    series: int


class TargetRenderer:
    """Renders one target. Label strings are escaped once per (queue, kind) and kept while the key is
    exported, so a render costs little more than formatting the values."""

    def __init__(self, name: str, labels: dict[str, str]):
        self.target = _label_pairs([("target", name)])
        self.extra = "".join(f',{n}="{escape_label_value(v)}"' for n, v in sorted(labels.items()))
        self._keys: dict[SeriesKey, str] = {}

    def _key(self, key: SeriesKey, cache: dict[SeriesKey, str]) -> str:
        text = self._keys.get(key)
        if text is None:
            text = f'{self.target},queue="{escape_label_value(key[0])}",kind="{escape_label_value(key[1])}"'
        cache[key] = text
        return text

    def render(self, state: TargetState, now: float | None = None) -> TargetExposition:
        now = time.time() if now is None else now
        lines: list[list[str]] = [[] for _ in FAMILIES]
        base = f"{{{self.target}{self.extra}}} "
        extra = self.extra
        keys: dict[SeriesKey, str] = {}

        def add(family: Family, labels: str, value: float) -> None:
            lines[_INDEX[family]].append(
                f"{family.sample_name}{{{labels}{extra}}} {format_value(value)}\n"
            )

        if state.up is not None:
            lines[_INDEX[UP]].append(f"jobqueue_up{base}{1 if state.up else 0}\n")
        if state.last_success is not None:
            lines[_INDEX[LAST_SUCCESS]].append(
                f"{LAST_SUCCESS.name}{base}{format_value(state.last_success)}\n"
            )
        if state.last_poll_duration is not None:
            lines[_INDEX[POLL_DURATION]].append(
                f"{POLL_DURATION.name}{base}{format_value(state.last_poll_duration)}\n"
            )
        for reason in POLL_ERROR_REASONS:
            add(POLL_ERRORS, f'{self.target},reason="{reason}"', state.errors[reason])
        if state.recovery is not None:
            for result in RUN_RESULTS:
                add(RECOVERY_RUNS, f'{self.target},result="{result}"', state.recovery.runs[result])
            for key, count in sorted(state.recovery.recovered.items()):
                add(RECOVERED_JOBS, self._key(key, keys), count)
        snapshot = state.snapshot
        if snapshot is not None:
            for queue, paused in sorted((snapshot.paused or {}).items()):
                add(QUEUE_PAUSED, f'{self.target},queue="{escape_label_value(queue)}"', int(paused))
            job_states = LIVE_STATES + (TERMINAL_STATES if snapshot.terminal_counted else ())
            jobs = lines[_INDEX[JOBS]]
            pending = lines[_INDEX[OLDEST_PENDING_AGE]]
            running = lines[_INDEX[OLDEST_RUNNING_AGE]]
            stale = lines[_INDEX[STALE_JOBS]]
            for key, stats in sorted(snapshot.series.items()):
                labels = self._key(key, keys)
                counts = stats.jobs
                for job_state in job_states:
                    jobs.append(
                        f'jobqueue_jobs{{{labels},state="{job_state}"{extra}}} '
                        f"{counts.get(job_state, 0)}\n"
                    )
                pending.append(
                    f"{OLDEST_PENDING_AGE.name}{{{labels}{extra}}} "
                    f"{format_value(stats.oldest_pending_age_seconds)}\n"
                )
                running.append(
                    f"{OLDEST_RUNNING_AGE.name}{{{labels}{extra}}} "
                    f"{format_value(stats.oldest_running_age_seconds)}\n"
                )
                stale.append(f"{STALE_JOBS.name}{{{labels}{extra}}} {stats.stale_jobs}\n")
            if state.finished_counting:
                finished = lines[_INDEX[JOBS_FINISHED]]
                for (queue, kind, outcome), count in sorted(state.finished.items()):
                    labels = self._key((queue, kind), keys)
                    finished.append(
                        f'jobqueue_jobs_finished_total{{{labels},outcome="{outcome}"{extra}}} '
                        f"{count}\n"
                    )
                if state.window is not None:
                    for key, ratio in sorted(state.window.ratios(now).items()):
                        add(SUCCESS_RATIO, self._key(key, keys), ratio)
                for queue, lost in sorted(state.lost_events.items()):
                    add(EVENTS_LOST, f'{self.target},queue="{escape_label_value(queue)}"', lost)
        self._keys = keys  # keys no longer exported are forgotten
        raw = tuple("".join(family_lines).encode() for family_lines in lines)
        return TargetExposition(
            raw=raw,
            deflated=tuple(deflate(piece) for piece in raw),
            series=sum(len(family_lines) for family_lines in lines),
        )


def _build_info_fragment() -> bytes:
    labels = _label_pairs(sorted(build_info().items()))
    return f"{BUILD.sample_name}{{{labels}}} 1\n".encode()


class MetricsCache:
    """Every target's latest exposition, and the response bodies joined from them.

    ``update`` renders one target off the event loop (its poller calls it when a poll finishes);
    ``body`` returns the full response for a format and encoding, joined at most once per update and
    shared by concurrent scrapes.
    """

    def __init__(self, states: Sequence[TargetState]):
        self._renderers = {s.name: TargetRenderer(s.name, s.labels) for s in states}
        self._targets: dict[str, TargetExposition] = {
            s.name: self._renderers[s.name].render(s) for s in states
        }
        build = _build_info_fragment()
        self._build = (build, deflate(build))
        self._headers = {
            om: tuple((h, deflate(h)) for h in (f.header(om) for f in FAMILIES))
            for om in (False, True)
        }
        self._eof = (b"# EOF\n", deflate(b"# EOF\n"))
        self.generation = 0
        self._bodies: dict[tuple[bool, bool], tuple[int, bytes]] = {}
        self._joining: dict[tuple[bool, bool, int], asyncio.Future[bytes]] = {}

    @property
    def series(self) -> int:
        return 1 + sum(t.series for t in self._targets.values())

    def update_now(self, state: TargetState) -> None:
        """Render on the calling thread (the ``once`` command and tests)."""
        self._store(state.name, self._renderers[state.name].render(state))

    async def update(self, state: TargetState) -> None:
        rendered = await asyncio.to_thread(self._renderers[state.name].render, state)
        self._store(state.name, rendered)

    def _store(self, name: str, rendered: TargetExposition) -> None:
        self._targets[name] = rendered
        self.generation += 1

    def _pieces(self, openmetrics: bool) -> tuple[list[bytes], list[bytes]]:
        raw: list[bytes] = []
        deflated: list[bytes] = []
        targets = list(self._targets.values())
        for i, (header, header_deflated) in enumerate(self._headers[openmetrics]):
            raw.append(header)
            deflated.append(header_deflated)
            if i == 0:
                raw.append(self._build[0])
                deflated.append(self._build[1])
                continue
            for target in targets:
                if target.raw[i]:
                    raw.append(target.raw[i])
                    deflated.append(target.deflated[i])
        if openmetrics:
            raw.append(self._eof[0])
            deflated.append(self._eof[1])
        return raw, deflated

    def join(self, openmetrics: bool, gzip: bool) -> bytes:
        raw, deflated = self._pieces(openmetrics)
        return gzip_join(raw, deflated) if gzip else b"".join(raw)

    async def body(self, openmetrics: bool, gzip: bool) -> bytes:
        variant = (openmetrics, gzip)
        generation = self.generation
        cached = self._bodies.get(variant)
        if cached is not None and cached[0] == generation:
            return cached[1]
        key = (openmetrics, gzip, generation)
        joining = self._joining.get(key)
        if joining is None:
            joining = asyncio.ensure_future(self._join(key))
            self._joining[key] = joining
        # a scraper that goes away stops waiting; the join finishes for the next one
        return await asyncio.shield(joining)

    async def _join(self, key: tuple[bool, bool, int]) -> bytes:
        openmetrics, gzip, generation = key
        try:
            raw, deflated = self._pieces(openmetrics)  # on the loop: one consistent set of targets
            if gzip:
                body = await asyncio.to_thread(gzip_join, raw, deflated)
            else:
                body = await asyncio.to_thread(b"".join, raw)
            current = self._bodies.get((openmetrics, gzip))
            if current is None or current[0] <= generation:
                self._bodies[(openmetrics, gzip)] = (generation, body)
            return body
        finally:
            del self._joining[key]
