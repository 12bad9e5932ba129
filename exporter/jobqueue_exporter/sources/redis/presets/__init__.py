"""Redis queue-system presets: each module describes one system's key layout and reads it with plain
read commands in pipelines (no Lua, no KEYS, never a library's own helpers, some of which write).

A preset's :meth:`RedisPreset.read` gets the client, the queues to read and a small memory it keeps
between polls (counter baselines), and returns a :class:`~jobqueue_exporter.sources.Reading`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ....config import Target
    from ... import Outcome, Reading

# the one kind label of systems whose job kind is only inside each job's payload: reading it would
# cost one read per job, so no per-kind breakdown is made up
KIND = "default"


@dataclass
class Memory:
    """What a preset keeps between polls of one target (never across a restart)."""

    values: dict[Any, Any] = field(default_factory=dict)


class RedisPreset(Protocol):
    # the commands and key patterns of a read-only ACL user that can read this preset
    acl_commands: tuple[str, ...]
    acl_keys: tuple[str, ...]
    name: str
    description: str
    outcomes: tuple[Outcome, ...]
    default_stale_after: float
    builtin_rescue_after: float | None
    self_rescue: str

    async def read(
        self,
        client: Redis,
        target: Target,
        stale_after: float,
        want_stale: bool,
        memory: Memory,
    ) -> Reading: ...

    def acl_keys_for(self, target: Target) -> tuple[str, ...]:
        """Key patterns the target's reads touch (a key prefix may be configured)."""
        ...


def _registry() -> dict[str, RedisPreset]:
    from . import asynq, bullmq

    return {p.name: p for p in (asynq.PRESET, bullmq.PRESET)}


PRESETS: dict[str, RedisPreset] = _registry()


def acl_rule(preset: RedisPreset, password: str = "<password>", keys: tuple[str, ...] = ()) -> str:
    """``ACL SETUSER`` arguments of a read-only exporter user for ``preset`` (``keys``: the patterns,
    by default the preset's)."""
    commands = " ".join(f"+{command}" for command in preset.acl_commands)
    patterns = " ".join(f"~{pattern}" for pattern in (keys or preset.acl_keys))
    return f"on >{password} resetkeys {patterns} resetchannels -@all {commands}"
