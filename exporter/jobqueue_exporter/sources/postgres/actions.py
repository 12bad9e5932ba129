"""Job verbs on PostgreSQL: one read-write session per target (``recovery.dsn`` if set, else the target's
DSN), and every verb one statement of the preset in its own transaction, committed or rolled back (a dry
run executes the very statement, so it shows exactly what would change). Reads (listings, counts, stale
jobs) run inside :meth:`PostgresActions.consistent_read`, one REPEATABLE READ READ ONLY snapshot.

A failure of the store raises :class:`~jobqueue_exporter.sources.SourceFailure` (its cause chained)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ...config import Target
from .. import JobRow, ResetResult, SchemaProblem, SourceFailure, StaleJob, Verbs
from .catalog import check_schema, resolve_preset
from .presets import Preset, Statement

LIVE_STATES = ("pending", "scheduled", "retrying", "running")

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


def _failure(exc: BaseException) -> SourceFailure:
    if isinstance(exc, SourceFailure):
        return exc
    if isinstance(exc, asyncpg.QueryCanceledError):
        return SourceFailure("timeout", str(exc))
    return SourceFailure("query", str(exc) or type(exc).__name__)


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

    # -- what the target offers ---------------------------------------------------------------------

    @property
    def verbs(self) -> Verbs:
        preset = self.preset
        return Verbs(
            list_jobs=preset.list_live is not None,
            job=preset.job is not None,
            stale_jobs=preset.stale_jobs is not None,
            reset_stale=preset.recover is not None and bool(preset.recover.sql),
            retry=preset.retry is not None and bool(preset.retry.sql),
            purge=preset.purge is not None and bool(preset.purge.sql),
            retry_rule=preset.retry_rule,
            retry_needs_state=preset.retry is None and self.target.table is not None,
        )

    @property
    def preset_name(self) -> str:
        return self.preset.name

    # -- reads ----------------------------------------------------------------------------------------

    @asynccontextmanager
    async def consistent_read(self) -> AsyncIterator[None]:
        """One REPEATABLE READ READ ONLY snapshot for the reads inside (a page and its counts agree)."""
        conn = await self.connection()
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                yield
        except DB_ERRORS as exc:
            raise _failure(exc) from exc

    async def _fetch(self, statement: Statement, *args: Any) -> list[asyncpg.Record]:
        conn = await self.connection()
        try:
            return await conn.fetch(statement.sql, *args, *statement.params)
        except DB_ERRORS as exc:
            raise _failure(exc) from exc

    async def stale_jobs(self, stale_after: float) -> list[StaleJob]:
        """Running jobs meeting the stale rule: the statement ``jobqueue_stale_jobs`` counts with."""
        statement = self.preset.stale_jobs
        assert statement is not None
        rows = await self._fetch(statement, stale_after)
        return [StaleJob(r["id"], r["queue"], r["kind"], r["token"]) for r in rows]

    def _listings(self, states: Sequence[str]) -> list[tuple[Statement, list[str]]]:
        live = [state for state in states if state in LIVE_STATES]
        terminal = [state for state in states if state not in LIVE_STATES]
        preset = self.preset
        return [
            (statement, wanted)
            for statement, wanted in ((preset.list_live, live), (preset.list_terminal, terminal))
            if wanted and statement is not None
        ]

    async def list_jobs(
        self,
        stale_after: float,
        states: Sequence[str],
        queue: str | None,
        kind: str | None,
        limit: int,
    ) -> list[JobRow]:
        """Waiting and running jobs in id order through the queue's partial indexes, then finished
        ones newest id first, at most ``limit``."""
        rows: list[asyncpg.Record] = []
        for statement, wanted in self._listings(states):
            if len(rows) >= limit:
                break
            rows += await self._fetch(
                statement, stale_after, wanted, queue, kind, limit - len(rows)
            )
        return [JobRow(**dict(row)) for row in rows]

    async def count_jobs(
        self, stale_after: float, states: Sequence[str], queue: str | None, kind: str | None
    ) -> tuple[int, int] | None:
        """(jobs, retryable) of the whole selection, counted by the listing statements themselves
        (``LIMIT NULL`` is no limit, so the predicate is exactly the listing's); None when counting
        took longer than statement_timeout (a long history of a finished state)."""
        conn = await self.connection()
        jobs = retryable = 0
        for statement, wanted in self._listings(states):
            try:
                async with (
                    conn.transaction()
                ):  # a savepoint: a cancelled count leaves the rest usable
                    row = await conn.fetchrow(
                        "SELECT count(*) AS jobs, count(*) FILTER (WHERE can_retry) AS retryable"
                        f" FROM ({statement.sql}) AS selection",
                        stale_after,
                        wanted,
                        queue,
                        kind,
                        None,
                        *statement.params,
                    )
            except asyncpg.QueryCanceledError:
                return None
            except DB_ERRORS as exc:
                raise _failure(exc) from exc
            jobs += row["jobs"]
            retryable += row["retryable"]
        return jobs, retryable

    async def job(self, stale_after: float, job_id: str) -> JobRow | None:
        """One job by id (a primary-key lookup); None when there is none (or it is no id here)."""
        statement = self.preset.job
        assert statement is not None
        conn = await self.connection()
        try:
            row = await conn.fetchrow(statement.sql, stale_after, job_id, *statement.params)
        except asyncpg.DataError:  # not even the shape of an id here (bigint, uuid, ...)
            return None
        except DB_ERRORS as exc:
            raise _failure(exc) from exc
        return JobRow(**dict(row)) if row is not None else None

    # -- changes --------------------------------------------------------------------------------------

    async def _execute(self, statement: Statement, args: Sequence[Any], commit: bool) -> list[dict]:
        """Run one statement in its own transaction; commit it, or roll it back (a dry run)."""
        conn = await self.connection()
        try:
            transaction = conn.transaction()
            await transaction.start()
            try:
                rows = await conn.fetch(statement.sql, *args, *statement.params)
            except BaseException:
                await transaction.rollback()
                raise
            if commit:
                await transaction.commit()
            else:
                await transaction.rollback()
        except DB_ERRORS as exc:
            raise _failure(exc) from exc
        return [dict(row) for row in rows]

    async def retry(
        self,
        ids: list[str] | None,
        queue: str | None,
        kind: str | None,
        limit: int,
        commit: bool,
    ) -> list[dict]:
        """Failed/dead jobs back to waiting the way the queue system's own retry does (``ids`` None:
        every retryable job of the filters); rows ``{id, queue, kind, state}`` it changed."""
        statement = self.preset.retry
        assert statement is not None
        return await self._execute(statement, [ids, queue, kind, limit], commit)

    async def purge_batch(
        self,
        older_than: float,
        include_failed: bool,
        after: str | None,
        batch: int,
        commit: bool,
    ) -> list[dict]:
        """At most ``batch`` finished jobs above id ``after``, chosen the way the queue's own cleanup
        does: deleted with ``commit``, else only selected by the same predicate (no locks). Rows ordered
        by id, so the last one is where the next batch starts."""
        statement = self.preset.purge if commit else self.preset.purge_preview
        assert statement is not None
        return await self._execute(statement, [older_than, include_failed, after, batch], commit)


@asynccontextmanager
async def operator_session(target: Target) -> AsyncIterator[tuple[PostgresActions, float]]:
    """A read-write session for the operator commands, its catalog checked: the actions and the
    target's stale_after. Raises SchemaProblem, or SourceFailure when the database cannot be reached."""
    from . import describe_endpoint, explain

    preset = resolve_preset(target)
    try:
        conn = await connect_rw(target, "operator", preset.schema)
    except DB_ERRORS as exc:
        dsn = target.recovery.dsn or target.resolve_dsn()
        raise explain(exc, True, describe_endpoint(dsn)) from exc
    checked = preset
    actions = PostgresActions(target, lambda: checked, role="operator", conn=conn)
    try:
        try:
            checked = await check_schema(conn, target, preset)
        except SchemaProblem:
            raise
        except DB_ERRORS as exc:
            raise _failure(exc) from exc
        stale_after = target.stale_after
        if stale_after is None:
            stale_after = checked.default_stale_after
        yield actions, stale_after
    finally:
        await actions.close()
