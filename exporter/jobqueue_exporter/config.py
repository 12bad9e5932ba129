"""Configuration: YAML file -> validated pydantic models.

Every user mistake becomes a :class:`ConfigError` listing one line per problem, each naming the key path
(``targets[1].table.state.column``) and what to do about it. Nothing here touches a database.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
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
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# SQL identifiers from config are validated here and quoted again when SQL is built.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration problem a user must fix; ``problems`` holds one message per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_duration(value: Any) -> float:
    """Parse ``30s``, ``5m``, ``1h30m``, ``250ms`` or a bare number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use a number with a unit, e.g. 30s, 5m, 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
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
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise ValueError(
            f"{value!r} is not a plain SQL identifier: use letters, digits and underscores, "
            "starting with a letter or underscore (at most 63 characters)"
        )
    return value


Identifier = Annotated[str, BeforeValidator(_identifier)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateMapping(_Strict):
    """Which native values of the state column mean which canonical state."""

    column: Identifier
    pending: list[str] = []
    scheduled: list[str] = []
    running: list[str] = []
    retrying: list[str] = []
    succeeded: list[str] = []
    failed: list[str] = []
    dead: list[str] = []
    cancelled: list[str] = []

    @model_validator(mode="after")
    def _check_values(self) -> StateMapping:
        seen: dict[str, str] = {}
        for state in CANONICAL_STATES:
            for native in getattr(self, state):
                if native in seen:
                    raise ValueError(
                        f"value {native!r} is mapped to both {seen[native]!r} and {state!r}: "
                        "map each native value to exactly one canonical state"
                    )
                seen[native] = state
        if not self.running:
            raise ValueError("no value is mapped to 'running': add e.g. running: [running]")
        if not (self.pending or self.scheduled or self.retrying):
            raise ValueError("no waiting value is mapped: add e.g. pending: [pending]")
        return self

    def values_for(self, *states: str) -> list[str]:
        return [value for state in states for value in getattr(self, state)]


class Timestamps(_Strict):
    enqueued: Identifier | None = None
    eligible: Identifier | None = None
    started: Identifier | None = None
    finished: Identifier | None = None


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
                "set exactly one of lease_expires, started_before, heartbeat "
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
    timestamps: Timestamps = Timestamps()
    stale: StaleRule | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _needs(self) -> TableMapping:
        ts = self.timestamps
        if not (ts.eligible or ts.enqueued):
            raise ValueError(
                "timestamps.eligible or timestamps.enqueued is required to compute the oldest pending age"
            )
        if not ts.started and not (self.stale and self.stale.started_before):
            raise ValueError(
                "timestamps.started (or stale.started_before) is required to compute running ages"
            )
        return self


FinishedCounting = Literal["auto", "on", "off"]


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
    queues: list[str] | None = None
    max_kinds_per_queue: int = Field(50, ge=1, le=10000)
    labels: dict[str, str] = {}
    finished_counting: FinishedCounting = "auto"
    count_terminal_states: bool = False
    schema_: Identifier | None = Field(None, alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", value):
            raise ValueError(
                f"target name {value!r} must be 1-63 characters of letters, digits, '_', '.', '-'"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for label in value:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(
                    f"label name {label!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, "
                    "no leading '__')"
                )
            if label in RESERVED_LABELS:
                raise ValueError(
                    f"label name {label!r} is set by the exporter itself; choose another name"
                )
        return value

    @model_validator(mode="after")
    def _sources(self) -> Target:
        if (self.dsn is None) == (self.dsn_file is None):
            raise ValueError(
                "set exactly one of dsn (may use ${ENV_VAR}) or dsn_file (a file holding the DSN)"
            )
        if self.preset is None and self.table is None:
            raise ValueError(
                "set preset (one of: " + ", ".join(known_presets()) + ") or a table mapping"
            )
        if self.preset not in (None, "generic") and self.table is not None:
            raise ValueError(
                f"preset {self.preset!r} describes its own tables: remove 'table' or use preset: generic"
            )
        if self.preset is not None and self.preset not in known_presets():
            raise ValueError(
                f"unknown preset {self.preset!r}; known presets: {', '.join(known_presets())}"
            )
        if self.preset == "generic" and self.table is None:
            raise ValueError("preset 'generic' needs a 'table' mapping")
        if self.statement_timeout <= 0:
            raise ValueError("statement_timeout must be greater than 0, e.g. 5s")
        if self.success_window < 1:
            raise ValueError("success_window must be at least 1s, e.g. 10m")
        return self

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

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[Target]) -> list[Target]:
        if not value:
            raise ValueError("at least one target is required")
        names = [t.name for t in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"duplicate target name(s) {', '.join(dupes)}: every target needs a unique name"
            )
        return value

    def interval_for(self, target: Target) -> float:
        return target.poll_interval if target.poll_interval is not None else self.poll_interval


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:port`` for IPv6); raise ValueError with the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"listen address {value!r} must be host:port, e.g. 0.0.0.0:{DEFAULT_PORT} or [::]:{DEFAULT_PORT}"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def known_presets() -> list[str]:
    from .presets import PRESETS

    return sorted([*PRESETS, "generic"])


def _loc_to_path(loc: tuple[Any, ...], data: Any) -> str:
    path, node = "", data
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            name = (
                node[part].get("name")
                if isinstance(node, list) and isinstance(node[part], dict)
                else None
            )
            if name and path.endswith(f"targets[{part}]"):
                path += f"({name})"
        else:
            # pydantic adds union/function tags to locations; they are not keys the user wrote
            if part.startswith("function-") or part in {"str", "int", "float"}:
                continue
            path += f".{part}" if path else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return path or "(top level)"


def _explain(error: dict[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key: remove it or check its spelling against the configuration reference"
    if kind == "missing":
        return "required key is missing"
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if kind == "literal_error":
        return msg.replace("Input should be", "must be")
    return msg


def _interpolate(node: Any, path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string value from the environment."""
    if isinstance(node, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, str):

        def replace(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            problems.append(
                f"{path}: environment variable {var} is not set: export it or use ${{{var}:-default}}"
            )
            return ""

        return _ENV_REF.sub(replace, node)
    return node


def load_config_data(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping with a 'targets' list at the top level"])
    problems: list[str] = []
    data = _interpolate(data, "", problems)
    if problems:
        raise ConfigError(problems)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            [f"{_loc_to_path(e['loc'], data)}: {_explain(e)}" for e in exc.errors()]
        ) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            [f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]
        ) from None
    config = load_config_data(data, str(path))
    problems, targets = [], []
    for i, target in enumerate(config.targets):
        if target.dsn_file is not None:
            # relative to the config file, so `check` and `run` agree wherever they are started
            dsn_file = (path.parent / target.dsn_file).resolve()
            if not dsn_file.is_file():
                problems.append(
                    f"targets[{i}]({target.name}).dsn_file: {dsn_file} does not exist or is not a file"
                )
            target = target.model_copy(update={"dsn_file": dsn_file})
        targets.append(target)
    if problems:
        raise ConfigError(problems)
    return config.model_copy(update={"targets": targets})
