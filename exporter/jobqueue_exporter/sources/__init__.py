"""Sources: where a target's jobs live, behind one small interface.

A :class:`Source` reads one consistent picture of a target per poll and hands it over as plain rows
(:class:`Reading`). Everything downstream (the poll loop, label policy, snapshot, metrics, HTTP, recovery
guards, operator output) works on those rows and never sees SQL or a store's commands. A source also owns
what is specific to its store: connections and their safety settings, schema checks, exactly-once
finished-job counting, and the job verbs (:class:`JobActions`) of recovery and the operator commands.

Which source a target uses is decided by its DSN's scheme (:func:`source_kind`); the presets of each
source are data in its package (``sources/postgres/presets/``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from ..config import Target

SourceKind = Literal["postgres", "redis"]
LiveState = Literal["pending", "scheduled", "running", "retrying"]
TerminalState = Literal["failed", "dead", "cancelled"]
Outcome = Literal["succeeded", "failed", "dead", "cancelled", "retried"]
FailureReason = Literal["connection", "timeout", "query", "schema"]

# DSN scheme -> source
SCHEMES: dict[str, SourceKind] = {
    "postgres": "postgres",
    "postgresql": "postgres",
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
}
SOURCE_NAMES: dict[SourceKind, str] = {"postgres": "PostgreSQL", "redis": "Redis"}
EXAMPLE_DSN: dict[SourceKind, str] = {
    "postgres": "postgresql://user:password@host:5432/dbname",
    "redis": "redis://user:password@host:6379/0",
}


@dataclass(frozen=True)
class PresetInfo:
    """What configuration validation needs to know about a preset, whatever its source."""

    name: str
    source: SourceKind
    # seconds after which the queue system rescues a stale job itself; None when it never does
    builtin_rescue_after: float | None
    self_rescue: str


def preset_catalog() -> dict[str, PresetInfo]:
    """Every preset of every source, by config name (``generic`` is the PostgreSQL table mapping)."""
    from .postgres.presets import PRESETS as POSTGRES
    from .redis.presets import PRESETS as REDIS

    catalog = {
        name: PresetInfo(name, "postgres", p.builtin_rescue_after, p.self_rescue)
        for name, p in POSTGRES.items()
    }
    catalog["generic"] = PresetInfo("generic", "postgres", None, "unknown (generic table)")
    for name, r in REDIS.items():
        catalog[name] = PresetInfo(name, "redis", r.builtin_rescue_after, r.self_rescue)
    return catalog


def source_kind(dsn: str) -> SourceKind | None:
    """The source a DSN's scheme selects (None: a scheme no source reads)."""
    scheme, sep, _ = dsn.partition("://")
    return SCHEMES.get(scheme.lower()) if sep else None


# -- what a poll reads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveRow:
    """Jobs of one (queue, kind) in one live state. ``oldest_age_seconds``: since the oldest became
    eligible (pending) or started (running); ``stale_jobs``: running jobs meeting the stale rule."""

    queue: str | None
    kind: str | None
    state: LiveState
    jobs: int
    oldest_age_seconds: float | None
    stale_jobs: int


@dataclass(frozen=True)
class TerminalRow:
    queue: str | None
    kind: str | None
    state: TerminalState
    jobs: int


@dataclass(frozen=True)
class Finished:
    """Jobs of one (queue, kind) that reached ``outcome``, each counted once across all readings;
    ``at``: Unix time (this host's clock) they finished, for the success window."""

    queue: str | None
    kind: str | None
    outcome: Outcome
    jobs: int
    at: float


@dataclass(frozen=True)
class StaleJob:
    """A running job meeting the stale rule; ``token`` identifies the claim (owner and attempt), so a
    job re-claimed in between is never mistaken for the same episode."""

    id: str
    queue: str
    kind: str
    token: str


@dataclass(frozen=True)
class Reading:
    """One consistent reading of a target. ``terminal`` is None unless terminal states are counted;
    ``finished`` holds only what finished since the previous reading, each job once; ``backfill`` (first
    reading only) what finished within the success window before, for the ratio only, so a restart does
    not blind it (never counted); ``stale`` is None unless asked."""

    live: Sequence[LiveRow]
    terminal: Sequence[TerminalRow] | None = None
    finished: Sequence[Finished] = ()
    backfill: Sequence[Finished] = ()
    stale: Sequence[StaleJob] | None = None
    # queue -> paused, for systems that can pause queues (None: the system cannot)
    paused: Mapping[str, bool] | None = None
    # queue -> finished-job events the store dropped before they could be read (a trimmed stream)
    lost_events: Mapping[str, int] | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a source, with its preset or mapping, can report (fixed once the schema is checked)."""

    preset: str
    outcomes: tuple[Outcome, ...]
    default_stale_after: float
    # what the queue system does about stale jobs itself (shown in docs and logs)
    self_rescue: str = ""
    # finished-job counters and success ratio are read (decided when the schema is checked)
    finished_counting: bool = False
    terminal_states: bool = False
    # running jobs meeting the stale rule can be listed (for recovery and `recover-stale`)
    stale_jobs: bool = False


class SourceFailure(Exception):
    """A failed read: ``reason`` is the metrics label, ``str()`` what an operator reads (never a password).
    Raised where the store is touched; the original exception is its ``__cause__``."""

    def __init__(self, reason: FailureReason, message: str):
        super().__init__(message)
        self.reason = reason


class SchemaProblem(SourceFailure):
    """The store lacks a table, column or key layout the preset or mapping needs, or holds values the
    mapping does not account for."""

    def __init__(self, message: str):
        super().__init__("schema", message)


class Source(Protocol):
    """One target's store, read once per poll. Implementations keep at most one connection open, set
    server-side timeouts, and never write on the reading connection."""

    capabilities: Capabilities
    endpoint: str  # host:port (or socket), for messages
    connecting: bool  # true while a read is connecting (a failure then is a connection failure)

    @property
    def connected(self) -> bool:
        """Whether a connection is open (a read then does not connect first)."""
        ...

    async def read(self, stale_after: float, want_stale: bool) -> Reading:
        """Connect (and check the schema) if needed, then read once. Raises :class:`SourceFailure`."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without waiting on a server that stopped answering."""
        ...

    async def close(self) -> None: ...

    def explain(self, exc: BaseException, connecting: bool) -> SourceFailure:
        """Classify a failure that escaped a read (a timeout of the poll's own deadline, a lost socket)."""
        ...

    def actions(self) -> JobActions:
        """The job verbs (recovery), on a session of their own."""
        ...


@dataclass(frozen=True)
class JobRow:
    """One job as the operator commands show it: ``state`` canonical, ``native_state`` as stored;
    ``last_error``/``lock_owner`` None where the store keeps none."""

    id: str
    queue: str | None
    kind: str | None
    state: str
    native_state: str
    attempts: int | None
    last_error: str | None
    lock_owner: str | None
    is_stale: bool
    can_retry: bool


@dataclass(frozen=True)
class Verbs:
    """Which job verbs a source offers for a target, and in words what ``retry`` accepts."""

    list_jobs: bool
    job: bool
    stale_jobs: bool
    reset_stale: bool
    retry: bool
    purge: bool
    retry_rule: str = "only failed or dead jobs"
    # `retry` needs the waiting state to put jobs back to (a table mapping without reset_state)
    retry_needs_state: bool = False


@dataclass
class ResetResult:
    """What a reset of stale jobs did: ``locked`` when another replica or operator held the target's
    lock (nothing was tried); ``changed`` rows ``{id, queue, kind, state}`` (state as now stored)."""

    locked: bool = False
    changed: list[dict[str, str]] = field(default_factory=list)


class JobActions(Protocol):
    """The verbs that change jobs, on a session of their own (recovery and the operator commands).
    Each verb is one atomic step on the store that re-checks its condition on the live job."""

    async def reset_stale(
        self, candidates: Sequence[StaleJob], stale_after: float, limit: int, commit: bool
    ) -> ResetResult:
        """Put those jobs back the way the queue system does, only if still stale under the same
        claim; roll back instead of committing unless ``commit`` (a dry run shows the same rows)."""
        ...

    async def close(self) -> None: ...

    def abort(self) -> None:
        """Drop the session at once (shutdown with a store that stopped answering)."""
        ...


class OperatorActions(JobActions, Protocol):
    """The operator commands' verbs (see ``operate.py``); which a target offers is in ``verbs``."""

    @property
    def verbs(self) -> Verbs: ...

    @property
    def preset_name(self) -> str: ...

    def consistent_read(self) -> AbstractAsyncContextManager[None]:
        """One read-only snapshot for the reads inside (a page and its counts agree)."""
        ...

    async def stale_jobs(self, stale_after: float) -> list[StaleJob]: ...

    async def list_jobs(
        self,
        stale_after: float,
        states: Sequence[str],
        queue: str | None,
        kind: str | None,
        limit: int,
    ) -> list[JobRow]: ...

    async def count_jobs(
        self, stale_after: float, states: Sequence[str], queue: str | None, kind: str | None
    ) -> tuple[int, int] | None:
        """(jobs, retryable) of the whole selection; None when counting exceeded the time limit."""
        ...

    async def job(self, stale_after: float, job_id: str) -> JobRow | None: ...

    async def retry(
        self, ids: list[str] | None, queue: str | None, kind: str | None, limit: int, commit: bool
    ) -> list[dict]: ...

    async def purge_batch(
        self, older_than: float, include_failed: bool, after: str | None, batch: int, commit: bool
    ) -> list[dict]: ...


class NoOperatorVerbs(Exception):
    """The target's source offers no operator commands (yet)."""


def open_operator_session(
    target: Target,
) -> AbstractAsyncContextManager[tuple[OperatorActions, float]]:
    """A checked read-write session for the operator commands: (actions, stale_after)."""
    if target.source_kind == "redis":
        raise NoOperatorVerbs(
            f"target {target.name!r} ({target.preset_name}, Redis): the operator commands are not "
            "available for Redis targets yet; the exporter reports them read-only"
        )
    from .postgres.actions import operator_session

    return operator_session(target)


def open_source(target: Target, connect_timeout: float) -> Source:
    """The source the target's DSN selects (config validation has checked there is one)."""
    if target.source_kind == "redis":
        from .redis import RedisSource

        return RedisSource(target, connect_timeout)
    from .postgres import PostgresSource

    return PostgresSource(target, connect_timeout)
