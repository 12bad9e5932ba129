"""Configuration: YAML file -> validated pydantic models.

Every user mistake becomes a :class:`ConfigError` listing one line per problem, each naming the key path
(``targets[1].table.state.column``) and what to do about it. Nothing here touches a database.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_PORT = 17410
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"

CANONICAL_STATES = (
    "pending",
    "scheduled",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "dead",
    "cancelled",
)
RESERVED_LABELS = {"target", "queue", "kind", "state", "outcome", "job", "instance"}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# SQL identifiers from config are validated here and quoted again when SQL is built.
# All patterns are used with fullmatch: a bare `$` would also accept a trailing newline.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# Label cardinality per target (README: Label cardinality): at most (max_queues + 1) x (max_kinds_per_queue + 1)
# (queue, kind) keys, each kept until unseen for label_ttl
DEFAULT_MAX_QUEUES = 15
DEFAULT_MAX_KINDS_PER_QUEUE = 20
DEFAULT_LABEL_TTL = 3600.0
MAX_QUEUES_LIMIT = 10000
# PostgreSQL stores timeouts as int milliseconds; the idle-in-transaction timeout is 2x + 1s of it
MAX_TIMEOUT = 86400.0
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration problem a user must fix; ``problems`` holds one message per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Problems(ValueError):
    """Several problems found by one validator, each with a location relative to the validated node.

    ``load_config_data`` turns each into its own line, so one validator can report every mistake it
    sees (and point at the exact key) instead of stopping at the first.
    """

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]):
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


def _raise_problems(problems: list[tuple[tuple[str | int, ...], str]]) -> None:
    if problems:
        raise _Problems(problems)


def parse_duration(value: Any) -> float:
    """Parse ``30s``, ``5m``, ``1h30m``, ``250ms`` or a bare number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use a number with a unit, e.g. 30s, 5m, 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-") and text[1:2].isdigit():
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        if _BARE_NUMBER.fullmatch(text):  # "30" from an env var or a quoted YAML value
            return parse_duration(float(text))
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            raise ValueError(
                f"invalid duration {value!r}: use a number with a unit, e.g. 30s, 5m, 1h (units: ms, s, m, h, d)"
            )
    else:
        raise ValueError(f"invalid duration {value!r}: use a string such as 30s, 5m, 1h")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be a finite number, e.g. 30s, 5m, 1h")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _identifier(value: Any) -> str:
    if isinstance(value, str) and value.count(".") == 1:
        schema, _, name = value.partition(".")
        if IDENTIFIER.fullmatch(schema) and IDENTIFIER.fullmatch(name):
            raise ValueError(
                f"{value!r} is not a plain SQL identifier: write the schema separately, "
                f"i.e. schema: {schema} and name: {name}"
            )
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain SQL identifier: use letters, digits and underscores, "
            "starting with a letter or underscore (at most 63 characters)"
        )
    return value


Identifier = Annotated[str, BeforeValidator(_identifier)]


def _native_value(value: Any) -> Any:
    """Native state values are compared as text cast to the column's type: accept YAML numbers and
    booleans (an integer or boolean state column) as their PostgreSQL text form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return value


NativeValue = Annotated[str, BeforeValidator(_native_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateMapping(_Strict):
    """Which native values of the state column mean which canonical state."""

    column: Identifier
    pending: list[NativeValue] = []
    scheduled: list[NativeValue] = []
    running: list[NativeValue] = []
    retrying: list[NativeValue] = []
    succeeded: list[NativeValue] = []
    failed: list[NativeValue] = []
    dead: list[NativeValue] = []
    cancelled: list[NativeValue] = []
    # values the column holds that are deliberately exported as no state (e.g. archived rows)
    ignore: list[NativeValue] = []

    @model_validator(mode="after")
    def _check_values(self) -> StateMapping:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[str, str] = {}
        for state in (*CANONICAL_STATES, "ignore"):
            for i, native in enumerate(getattr(self, state)):
                if native in seen:
                    problems.append(
                        (
                            (state, i),
                            f"value {native!r} is mapped to both {seen[native]!r} and {state!r}: "
                            "map each native value to exactly one canonical state (or ignore it)"
                            if seen[native] != state
                            else f"value {native!r} is listed twice under {state!r}",
                        )
                    )
                seen.setdefault(native, state)
        if not self.running:
            problems.append(
                (
                    ("running",),
                    "no value is mapped to 'running' (running ages and the stale rule need it): "
                    "add e.g. running: [running]",
                )
            )
        if not (self.pending or self.scheduled or self.retrying):
            problems.append(
                (
                    (),
                    "no waiting value is mapped to pending, scheduled or retrying: "
                    "add e.g. pending: [pending]",
                )
            )
        _raise_problems(problems)
        return self

    def values_for(self, *states: str) -> list[str]:
        return [value for state in states for value in getattr(self, state)]

    def state_of(self, native: str) -> str | None:
        """The canonical state a native value is mapped to (``ignore`` for ignored ones), else None."""
        for state in (*CANONICAL_STATES, "ignore"):
            if native in getattr(self, state):
                return state
        return None


EpochUnit = Literal["seconds", "milliseconds"]


class Timestamps(_Strict):
    enqueued: Identifier | None = None
    eligible: Identifier | None = None
    started: Identifier | None = None
    finished: Identifier | None = None
    # number columns among the mapping's time columns hold this much since 1970-01-01 UTC
    epoch_unit: EpochUnit | None = None


class StaleRule(_Strict):
    """How to tell a running job was abandoned; exactly one rule."""

    lease_expires: Identifier | None = Field(
        None, description="column holding the lease expiry; stale once it passed (+ stale_after)"
    )
    started_before: Identifier | None = Field(
        None, description="lock/start timestamp column; stale when older than stale_after"
    )
    heartbeat: Identifier | None = Field(
        None, description="per-job heartbeat column; stale when older than stale_after"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StaleRule:
        chosen = [k for k in ("lease_expires", "started_before", "heartbeat") if getattr(self, k)]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one stale rule of lease_expires, started_before, heartbeat "
                f"(got {', '.join(chosen) or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("lease_expires", "started_before", "heartbeat") if getattr(self, k))

    @property
    def column(self) -> str:
        return getattr(self, self.kind)


class TableMapping(_Strict):
    """A home-grown job table described column by column (the ``generic`` preset)."""

    name: Identifier
    schema_: Identifier | None = Field(None, alias="schema")
    id: Identifier = "id"
    state: StateMapping
    queue: Identifier | None = None
    kind: Identifier | None = None
    attempts: Identifier | None = None
    # shown by the `jobs` command (and, for last_error, used to tell a requeued failure)
    last_error: Identifier | None = None
    lock_owner: Identifier | None = None
    timestamps: Timestamps = Timestamps()
    stale: StaleRule | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _needs(self) -> TableMapping:
        ts = self.timestamps
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if not (ts.eligible or ts.enqueued):
            problems.append(
                (
                    ("timestamps",),
                    "timestamps.eligible or timestamps.enqueued is required to compute the oldest "
                    "pending age",
                )
            )
        if not ts.started and not (self.stale and self.stale.started_before):
            problems.append(
                (
                    ("timestamps",),
                    "timestamps.started (or stale.started_before) is required to compute running ages",
                )
            )
        # mappings that validate but could never produce what they promise
        if ts.finished and not self.state.values_for("succeeded", "failed", "dead"):
            problems.append(
                (
                    ("timestamps", "finished"),
                    "no value is mapped to succeeded, failed or dead, so the finished-job counters "
                    "and the success ratio would stay 0 while jobs finish: map the finished values "
                    "(e.g. state.succeeded: [completed], state.failed: [failed]) or remove "
                    "timestamps.finished",
                )
            )
        _raise_problems(problems)
        return self


FinishedCounting = Literal["auto", "on", "off"]


class Recovery(_Strict):
    """Automatic reset of stale jobs (off by default; dry-run by default once enabled)."""

    enabled: bool = False
    dry_run: bool = True
    hold_for: Duration = 120.0
    max_jobs_per_run: int = Field(50, ge=1, le=10000)
    max_jobs_per_hour: int = Field(500, ge=1, le=1_000_000)
    queues: list[str] | None = None
    kinds: list[str] | None = None
    dsn: str | None = None
    # for queue systems that rescue stale jobs themselves: act anyway (their sweep is known not to run)
    override_builtin_rescue: bool = False
    # generic tables: the native state a recovered job goes back to, and the lock columns to clear
    reset_state: NativeValue | None = None
    clear_columns: list[Identifier] = []

    @field_validator("hold_for")
    @classmethod
    def _hold(cls, value: float) -> float:
        if value < 1:
            raise ValueError("hold_for must be at least 1s, e.g. 2m: the stale condition must hold")
        return value


class Target(_Strict):
    name: str
    dsn: str | None = None
    dsn_file: Path | None = None
    preset: str | None = None
    table: TableMapping | None = None
    poll_interval: Duration | None = None
    stale_after: Duration | None = None
    success_window: Duration = 600.0
    statement_timeout: Duration = 5.0
    lock_timeout: Duration = 1.0
    # Redis targets: client-side timeout of every command (Redis has no server-side statement timeout)
    socket_timeout: Duration = 5.0
    # BullMQ targets: the queues' key prefix (BullMQ's `prefix` option)
    key_prefix: str | None = None
    # BullMQ targets: find queues with a bounded, resumable SCAN for <prefix>:*:meta (BullMQ keeps no
    # registry of queue names)
    discover_queues: bool = False
    queues: list[str] | None = None
    max_kinds_per_queue: int = Field(DEFAULT_MAX_KINDS_PER_QUEUE, ge=1, le=10000)
    max_queues: int = DEFAULT_MAX_QUEUES
    label_ttl: Duration = DEFAULT_LABEL_TTL
    labels: dict[str, str] = {}
    finished_counting: FinishedCounting = "auto"
    count_terminal_states: bool = False
    schema_: Identifier | None = Field(None, alias="schema")
    recovery: Recovery = Recovery()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _TARGET_NAME.fullmatch(value):
            raise ValueError(
                f"target name {value!r} must be 1-63 characters of letters, digits, '_', '.', '-' "
                "(starting with a letter or digit)"
            )
        return value

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            # libpq would fall back to PGHOST/PGUSER/... or a local socket: never what was meant
            raise ValueError(
                "dsn is empty: set a connection URI, e.g. postgresql://user@host:5432/db or ${DSN}"
            )
        if value is not None:
            _raise_problems([((), problem) for problem in dsn_problems_of(value)])
        return value

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None) -> str | None:
        if value is not None and value not in known_presets():
            raise ValueError(
                f"unknown preset {value!r}; known presets: {', '.join(known_presets())}"
            )
        return value

    @field_validator("poll_interval")
    @classmethod
    def _interval(cls, value: float | None) -> float | None:
        if value is not None and value < 0.05:
            raise ValueError("poll_interval must be at least 50ms, e.g. 15s")
        return value

    @field_validator("statement_timeout", "lock_timeout")
    @classmethod
    def _timeout(cls, value: float, info: ValidationInfo) -> float:
        # PostgreSQL takes whole milliseconds and treats 0 as "no timeout at all"
        if value < 0.001:
            raise ValueError(
                f"{info.field_name} must be at least 1ms (0 would disable it in PostgreSQL), e.g. 5s"
            )
        if value > MAX_TIMEOUT:
            raise ValueError(f"{info.field_name} must be at most 1d, e.g. 5s")
        return value

    @field_validator("socket_timeout")
    @classmethod
    def _socket_timeout(cls, value: float) -> float:
        if not 0.001 <= value <= MAX_TIMEOUT:
            raise ValueError("socket_timeout must be between 1ms and 1d, e.g. 5s")
        return value

    @field_validator("success_window")
    @classmethod
    def _window(cls, value: float) -> float:
        if value < 1:
            raise ValueError("success_window must be at least 1s, e.g. 10m")
        return value

    @field_validator("max_queues", mode="before")
    @classmethod
    def _max_queues_type(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML `yes`/`true` would otherwise become 1
            raise ValueError(
                f"max_queues must be a whole number, not {str(value).lower()}: e.g. "
                f"max_queues: {DEFAULT_MAX_QUEUES}"
            )
        return value

    @field_validator("max_queues")
    @classmethod
    def _max_queues(cls, value: int) -> int:
        if not 1 <= value <= MAX_QUEUES_LIMIT:
            raise ValueError(
                f"max_queues must be between 1 and {MAX_QUEUES_LIMIT} (got {value}): queues beyond it "
                f'are summed into queue="__other__"; e.g. max_queues: {DEFAULT_MAX_QUEUES}, and list '
                "queues that must keep their own label under queues:"
            )
        return value

    @field_validator("label_ttl")
    @classmethod
    def _label_ttl(cls, value: float) -> float:
        if value < 1:
            raise ValueError(
                "label_ttl must be at least 1s: a (queue, kind) not seen for that long stops being "
                "exported; e.g. label_ttl: 1h"
            )
        return value

    @field_validator("queues")
    @classmethod
    def _queues(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError(
                "queues is empty, so nothing would be exported: list queue names or remove the key "
                "to export all queues"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for label in value:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                problems.append(
                    (
                        (label,),
                        f"label name {label!r} is not a valid Prometheus label name "
                        "([a-zA-Z_][a-zA-Z0-9_]*, no leading '__')",
                    )
                )
            elif label in RESERVED_LABELS:
                problems.append(
                    (
                        (label,),
                        f"label name {label!r} is reserved (set by the exporter itself: "
                        f"{', '.join(sorted(RESERVED_LABELS))}); choose another name",
                    )
                )
        _raise_problems(problems)
        return value

    @model_validator(mode="after")
    def _sources(self) -> Target:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.dsn is not None and self.dsn_file is not None:
            problems.append(
                (
                    (),
                    "set only one of dsn or dsn_file, not both (dsn_file is a file holding the DSN)",
                )
            )
        elif self.dsn is None and self.dsn_file is None:
            problems.append(
                (
                    (),
                    "set exactly one of dsn (may use ${ENV_VAR}) or dsn_file (a file holding the DSN)",
                )
            )
        if self.preset is None and self.table is None:
            problems.append(
                ((), "set preset (one of: " + ", ".join(known_presets()) + ") or a table mapping")
            )
        if self.preset not in (None, "generic") and self.table is not None:
            problems.append(
                (
                    ("table",),
                    f"preset {self.preset!r} describes its own tables: remove 'table' or use "
                    "preset: generic",
                )
            )
        if self.preset == "generic" and self.table is None:
            problems.append(((), "preset 'generic' needs a 'table' mapping"))
        problems += self._source_problems()
        if self.table is not None:
            problems += self._table_problems(self.table)
        if (
            self.table is not None
            and self.table.schema_ is not None
            and self.schema_ is not None
            and self.table.schema_ != self.schema_
        ):
            problems.append(
                (
                    ("table", "schema"),
                    f"table.schema {self.table.schema_!r} differs from the target's schema "
                    f"{self.schema_!r}: set the schema in one place",
                )
            )
        problems += self._recovery_problems()
        _raise_problems(problems)
        return self

    def _source_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """The DSN's scheme selects the source; the preset must be one of that source's."""
        from .sources import EXAMPLE_DSN, SOURCE_NAMES, preset_catalog, source_kind

        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.preset_name == "bullmq" and not self.queues and not self.discover_queues:
            problems.append(
                (
                    ("queues",),
                    "BullMQ keeps no registry of queue names: list the queues to read, e.g. "
                    "queues: [emails, reports], or set discover_queues: true (a bounded SCAN)",
                )
            )
        if self.discover_queues and self.preset_name != "bullmq":
            problems.append(
                (("discover_queues",), "only BullMQ targets discover queues: remove it")
            )
        if self.key_prefix is not None and self.preset_name != "bullmq":
            problems.append((("key_prefix",), "only BullMQ targets have a key prefix: remove it"))
        if self.dsn is None or (self.preset is None and self.table is None):
            return problems  # a dsn_file is checked once read (load_config)
        kind = source_kind(self.dsn)
        info = preset_catalog().get(self.preset_name)
        if kind is None or info is None or info.source == kind:
            return problems
        same = sorted(n for n, i in preset_catalog().items() if i.source == kind)
        return problems + [
            (
                ("preset",),
                f"preset {self.preset_name!r} reads {SOURCE_NAMES[info.source]}, but dsn is a "
                f"{SOURCE_NAMES[kind]} URL: use a {SOURCE_NAMES[info.source]} DSN (e.g. "
                f"{EXAMPLE_DSN[info.source]}) or a {SOURCE_NAMES[kind]} preset ({', '.join(same)})",
            )
        ]

    @property
    def source_kind(self) -> str:
        """``postgres`` or ``redis``: from the DSN's scheme, else from the preset."""
        from .sources import preset_catalog, source_kind

        dsn = self.dsn
        if dsn is None and self.dsn_file is not None and self.dsn_file.is_file():
            dsn = self.dsn_file.read_text().strip()
        kind = source_kind(dsn or "")
        if kind is not None:
            return kind
        info = preset_catalog().get(self.preset_name)
        return info.source if info is not None else "postgres"

    def _table_problems(self, table: TableMapping) -> list[tuple[tuple[str | int, ...], str]]:
        """Target settings a table mapping cannot honour."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.finished_counting == "on" and not table.timestamps.finished:
            problems.append(
                (
                    ("finished_counting",),
                    "'on' needs table.timestamps.finished (the column telling when a job finished): "
                    "map it, or remove finished_counting",
                )
            )
        if self.count_terminal_states and not table.state.values_for("failed", "dead", "cancelled"):
            problems.append(
                (
                    ("count_terminal_states",),
                    "no value is mapped to failed, dead or cancelled, so there is nothing to count: "
                    "map them under table.state, or remove count_terminal_states",
                )
            )
        return problems

    def _recovery_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        recovery = self.recovery
        if not recovery.enabled or (self.preset is None and self.table is None):
            return []
        if self.source_kind == "redis":
            return [
                (
                    ("recovery", "enabled"),
                    f"{self.preset_name} targets are report-only: the queue system rescues "
                    "expired jobs itself and the exporter never writes to Redis; remove recovery",
                )
            ]
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.table is not None:
            if recovery.reset_state is None:
                problems.append(
                    (
                        ("recovery", "reset_state"),
                        "required for a table mapping: the native state a stale job goes back to, "
                        "e.g. reset_state: pending",
                    )
                )
            elif recovery.reset_state not in self.table.state.values_for(
                "pending", "scheduled", "retrying"
            ):
                problems.append(
                    (
                        ("recovery", "reset_state"),
                        f"{recovery.reset_state!r} is not a waiting state of table.state "
                        "(pending, scheduled or retrying values)",
                    )
                )
            return problems
        return self.builtin_rescue_problems()

    def builtin_rescue_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Why resetting stale jobs would race the queue system's own rescue (empty: it would not).
        The rule for automatic recovery and for the ``recover-stale`` command alike."""
        from .sources import preset_catalog

        preset = preset_catalog().get(self.preset or "")
        if preset is None or preset.builtin_rescue_after is None:
            return []
        if not self.recovery.override_builtin_rescue:
            return [
                (
                    ("recovery", "enabled"),
                    f"{preset.name} rescues stale jobs itself ({preset.self_rescue}); the exporter "
                    "only reports them. Set recovery.override_builtin_rescue: true only if that "
                    "rescue does not run",
                )
            ]
        if (self.stale_after or 0) < preset.builtin_rescue_after:
            return [
                (
                    ("stale_after",),
                    f"with recovery overriding {preset.name}'s own rescue, stale_after must be at "
                    f"least {preset.builtin_rescue_after:g}s so the queue's own sweep always wins",
                )
            ]
        return []

    @property
    def preset_name(self) -> str:
        return self.preset or "generic"

    def resolve_dsn(self) -> str:
        if self.dsn is not None:
            return self.dsn
        assert self.dsn_file is not None
        return self.dsn_file.read_text().strip()


LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


class Config(_Strict):
    listen: str = DEFAULT_LISTEN
    poll_interval: Duration = 15.0
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    targets: list[Target]

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("poll_interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if value < 0.05:
            raise ValueError("poll_interval must be at least 50ms, e.g. 15s")
        return value

    @field_validator("targets", mode="before")
    @classmethod
    def _no_targets(cls, value: Any) -> Any:
        # `targets:` with nothing under it is YAML null: say what is missing, not "not a list"
        return [] if value is None else value

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[Target]) -> list[Target]:
        if not value:
            raise ValueError("at least one target is required: add a list of targets")
        problems: list[tuple[tuple[str | int, ...], str]] = []
        first: dict[str, int] = {}
        for i, target in enumerate(value):
            if target.name in first:
                problems.append(
                    (
                        (i, "name"),
                        f"duplicate target name {target.name!r} (also targets[{first[target.name]}]): "
                        "every target needs a unique name",
                    )
                )
            first.setdefault(target.name, i)
        _raise_problems(problems)
        return value

    @model_validator(mode="after")
    def _label_ttls(self) -> Config:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, target in enumerate(self.targets):
            interval = self.interval_for(target)
            if target.label_ttl < 2 * interval:
                problems.append(
                    (
                        ("targets", i, "label_ttl"),
                        f"label_ttl {target.label_ttl:g}s is shorter than two poll intervals "
                        f"(2 x {interval:g}s): a queue would expire after one empty poll; set "
                        f"label_ttl to at least {2 * interval:g}s, e.g. label_ttl: "
                        f"{math.ceil(max(DEFAULT_LABEL_TTL, 4 * interval) / 3600)}h",
                    )
                )
        _raise_problems(problems)
        return self

    def interval_for(self, target: Target) -> float:
        return target.poll_interval if target.poll_interval is not None else self.poll_interval


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:port`` for IPv6); raise ValueError with the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"listen address {value!r} must be host:port, e.g. 0.0.0.0:{DEFAULT_PORT} or [::]:{DEFAULT_PORT}"
        )
    if not 0 <= int(port) < 65536:
        raise ValueError(
            f"listen address {value!r}: port {int(port)} is out of range (0-65535), e.g. "
            f"{host or '0.0.0.0'}:{DEFAULT_PORT}"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def known_presets() -> list[str]:
    from .sources import preset_catalog

    return sorted(preset_catalog())


def dsn_problems_of(dsn: str) -> list[str]:
    """What the driver of the DSN's source would misread (a password turned into a host name, ...)."""
    from .dsn import dsn_problems, redis_dsn_problems
    from .sources import source_kind

    return redis_dsn_problems(dsn) if source_kind(dsn) == "redis" else dsn_problems(dsn)


def _loc_to_path(loc: tuple[Any, ...], data: Any, user_parts: int = 0) -> str:
    """Render a pydantic location as the key path the user wrote; the last ``user_parts`` parts are
    keys from the file itself (never pydantic's union/function tags)."""
    path, node = "", data
    for n, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list):
            path += f"[{part}]"
            item = node[part] if 0 <= part < len(node) else None
            name = item.get("name") if isinstance(item, dict) else None
            if name is not None and path.endswith(f"targets[{part}]"):
                path += f"({name})"
        else:
            # pydantic adds union/function tags to locations; they are not keys the user wrote
            tag = isinstance(part, str) and (
                part.startswith("function-") or part in {"str", "int", "float"}
            )
            if tag and n < len(loc) - user_parts:
                continue
            path += f".{part}" if path else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return path or "(top level)"


def _explain(error: Mapping[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        key = error["loc"][-1] if error["loc"] else None
        close = difflib.get_close_matches(str(key), _keys_at(error["loc"][:-1]), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key: {hint}remove it or check its spelling against the configuration reference"
    if kind == "missing":
        return "required key is missing"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return "must be a mapping of keys to values"
    if kind == "list_type":
        return "must be a list, e.g. [a, b] or one '- item' per line"
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    msg = msg.replace("Input should be", "must be")
    return msg.replace("greater than or equal to", "at least").replace(
        "less than or equal to", "at most"
    )


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        model = _model_in(arg)
        if model is not None:
            return model
    return None


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at a location (for "did you mean" hints); empty when unknown."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):
            continue
        assert model is not None
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        if part not in fields:
            return []
        model = _model_in(fields[part].annotation)
        if model is None:
            return []
    assert model is not None
    return [f.alias or name for name, f in model.model_fields.items()]


def _problem_lines(exc: ValidationError, data: Any) -> list[str]:
    lines: list[str] = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            for sub, message in cause.problems:
                path = _loc_to_path((*error["loc"], *sub), data, user_parts=len(sub))
                lines.append(f"{path}: {message}")
        else:
            lines.append(f"{_loc_to_path(error['loc'], data)}: {_explain(error)}")
    return lines


def _interpolate(
    node: Any, loc: tuple[Any, ...], missing: list[tuple[tuple[Any, ...], str]]
) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string value from the environment."""
    if isinstance(node, dict):
        return {k: _interpolate(v, (*loc, k), missing) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*loc, i), missing) for i, v in enumerate(node)]
    if isinstance(node, str):

        def replace(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            value = os.environ.get(var)
            if default is not None:
                # as in the shell: ${VAR:-default} also uses the default when VAR is set but empty
                return value or default
            if value is not None:
                return value
            missing.append((loc, var))
            return ""

        return _ENV_REF.sub(replace, node)
    return node


def load_config_data(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            [f"{source}: expected a mapping with a 'targets' list at the top level, found {found}"]
        )
    missing: list[tuple[tuple[Any, ...], str]] = []
    interpolated = _interpolate(data, (), missing)
    if missing:
        raise ConfigError(
            [
                f"{_loc_to_path(loc, data, user_parts=len(loc))}: environment variable {var} is not "
                f"set: export it or use ${{{var}:-default}}"
                for loc, var in missing
            ]
        )
    try:
        return Config.model_validate(interpolated)
    except ValidationError as exc:
        raise ConfigError(_problem_lines(exc, interpolated)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last silently,
    so a second ``targets:`` would drop every target above it). Merge keys (``<<``) may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeLoader reports it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key!r} (first set at line {first.line + 1}): "
                        "keep only one",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{path}: cannot read config file: not UTF-8 text (byte {exc.start})"]
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            [f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"]
        ) from None
    config = load_config_data(data, str(path))
    problems, targets = [], []
    for i, target in enumerate(config.targets):
        if target.dsn_file is not None:
            # relative to the config file, so `check` and `run` agree wherever they are started
            dsn_file = (path.parent / target.dsn_file).resolve()
            where = f"targets[{i}]({target.name}).dsn_file"
            if not dsn_file.is_file():
                problems.append(f"{where}: {dsn_file} does not exist or is not a file")
            else:
                try:
                    text = dsn_file.read_text().strip()
                    if not text:
                        problems.append(f"{where}: {dsn_file} is empty: put the DSN in it")
                    else:
                        problems += [f"{where}: {dsn_file}: {p}" for p in dsn_problems_of(text)]
                except (OSError, UnicodeDecodeError) as exc:
                    problems.append(
                        f"{where}: cannot read {dsn_file}: {getattr(exc, 'strerror', None) or exc}"
                    )
            target = target.model_copy(update={"dsn_file": dsn_file})
        targets.append(target)
    if problems:
        raise ConfigError(problems)
    return config.model_copy(update={"targets": targets})
