"""Job verbs on PostgreSQL: one read-write session per target (``recovery.dsn`` if set, else the target's
DSN), and every verb one statement of the preset in its own transaction, committed or rolled back (a dry
run executes the very statement, so it shows exactly what would change)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import asyncpg

from ...config import Target
from .. import ResetResult, SourceFailure, StaleJob
from .presets import Preset

DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)


async def connect_rw(target: Target, role: str, schema: str | None = None) -> asyncpg.Connection:
    """A read-write session for acting on jobs: ``recovery.dsn`` if set, else the target's DSN, with the
    target's timeouts and ``application_name`` ``jobqueue-exporter/<target>/<role>``."""
    timeout_ms = int(target.statement_timeout * 1000)
    settings = {
        "application_name": f"jobqueue-exporter/{target.name}/{role}"[:63],
        "statement_timeout": str(timeout_ms),
        "lock_timeout": str(int(target.lock_timeout * 1000)),
        "idle_in_transaction_session_timeout": str(timeout_ms * 2 + 1000),
    }
    schema = target.schema_ or schema
    if schema:
        settings["search_path"] = '"' + schema.replace('"', '""') + '"'
    return await asyncpg.connect(
        target.recovery.dsn or target.resolve_dsn(),
        timeout=10.0,
        command_timeout=target.statement_timeout + 5.0,
        server_settings=settings,
    )


class PostgresActions:
    """The preset's mutating statements on a read-write session of their own.

    ``preset`` gives the checked preset (a table mapping built with the columns' real types, known once
    the reading session checked the catalog); ``conn`` an already open session to use (the operator
    commands'), else one is opened on first use.
    """

    def __init__(
        self,
        target: Target,
        preset: Callable[[], Preset],
        role: str = "recovery",
        conn: asyncpg.Connection | None = None,
    ):
        self.target = target
        self._preset = preset
        self.role = role
        self._conn = conn
        self._closing: asyncpg.Connection | None = None
        # one lock id per target, the same in every replica and for the manual command
        self.lock_key = f"jobqueue-exporter/recovery/{target.name}"

    @property
    def preset(self) -> Preset:
        return self._preset()

    async def connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect_rw(self.target, self.role, self.preset.schema)
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            self._closing = conn
            try:
                await asyncio.wait_for(conn.close(), timeout=2.0)
            except BaseException:
                conn.terminate()
            finally:
                self._closing = None

    def abort(self) -> None:
        for conn in (self._conn, self._closing):
            if conn is not None:
                conn.terminate()
        self._conn = None

    async def reset_stale(
        self, candidates: Sequence[StaleJob], stale_after: float, limit: int, commit: bool
    ) -> ResetResult:
        """The preset's ``recover`` UPDATE under the target's transaction-level advisory lock."""
        statement = self.preset.recover
        assert statement is not None and statement.sql
        try:
            conn = await self.connection()
            transaction = conn.transaction()
            await transaction.start()
            try:
                got_lock = await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", self.lock_key
                )
                rows = []
                if got_lock:
                    rows = await conn.fetch(
                        statement.sql,
                        stale_after,
                        [job.id for job in candidates],
                        [job.token for job in candidates],
                        limit,
                        *statement.params,
                    )
            except BaseException:
                await transaction.rollback()
                raise
            if commit and got_lock:
                await transaction.commit()
            else:
                await transaction.rollback()
        except DB_ERRORS as exc:
            # a failed transaction changed nothing, or (connection lost during COMMIT) either changed
            # every row or none: a job is never half-reset, and the next polls show which
            await self.close()
            raise SourceFailure("query", str(exc) or type(exc).__name__) from exc
        if not got_lock:
            return ResetResult(locked=True)
        return ResetResult(changed=[dict(row) for row in rows])
