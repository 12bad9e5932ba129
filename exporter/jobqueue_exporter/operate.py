"""Manual operator commands: ``jobs``, ``recover-stale``, ``retry`` and ``purge``.

They follow the safety rules of automatic recovery (``recovery.py``):

* every statement is the target preset's (presets are data), one statement per step: candidates locked
  with ``FOR UPDATE SKIP LOCKED`` (never waiting on a worker), the state re-checked on the live row, a LIMIT;
* ``recover-stale`` *is* automatic recovery minus the hold window: the same :class:`Recoverer`, statement,
  advisory lock, stale predicate and claim-token re-check. It is refused where the queue system rescues
  stale jobs itself, unless the target opts in exactly as config validation demands;
* nothing changes without ``--yes``. A dry run of ``recover-stale`` or ``retry`` executes the very
  statement and rolls it back, so it shows exactly what would change; a dry run of ``purge`` walks the
  same selection read-only, batch by batch, and counts up to ``PREVIEW_CAP`` rows;
* ``purge`` deletes in batches, each its own short transaction, so no lock is held for long;
* every run of a mutating command, dry or not, logs one structured line through
  :func:`recovery.record_run` with ``event="manual_<command>"``;
* one read-write session (``recovery.dsn`` if set, else the target's DSN) named
  ``jobqueue-exporter/<target>/operator``, with the target's statement and lock timeouts.

A user mistake (unknown target or job, a job that cannot be retried, a bad duration) is an
:class:`OperatorError`: one ``error:`` line and exit 2. A database failure is exit 1. Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import Config, Target, load_config, parse_duration
from .logs import setup_logging
from .recovery import MAX_LOGGED_IDS, Recoverer, record_run
from .sources import (
    JobRow,
    NoOperatorVerbs,
    OperatorActions,
    SchemaProblem,
    SourceFailure,
    StaleJob,
    open_operator_session,
)

LIVE_STATES = ("pending", "scheduled", "retrying", "running")
DEFAULT_STATES = (*LIVE_STATES, "failed", "dead")
DEFAULT_RETRY_LIMIT = 100
# a purge dry run stops counting here and reports "at least"
PREVIEW_CAP = 1_000_000
DRY_RUN_NOTE = "dry run: pass --yes to act"


class OperatorError(Exception):
    """A mistake the operator can fix: printed as one ``error:`` line, exit 2."""


class DatabaseFailure(Exception):
    """The database refused or failed mid-way: printed as one ``error:`` line, exit 1."""


@dataclass(frozen=True)
class Job:
    id: str
    queue: str
    kind: str
    state: str
    native_state: str
    attempts: int | None
    last_error: str | None
    lock_owner: str | None
    is_stale: bool
    can_retry: bool
    hint: str


@dataclass
class Report:
    """What a command found or did, for the table and for ``--json``."""

    command: str
    target: str
    result: str
    summary: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    dry_run: bool | None = None  # None: the command changes nothing (jobs)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Session:
    """One operator command's view of a target: its job verbs (on a read-write session of their own)."""

    target: Target
    actions: OperatorActions
    stale_after: float
    # how hints spell a follow-up command (``{verb}`` replaced), so it can be copied as is
    command: str = "jobqueue-exporter {verb}"

    def cli(self, verb: str, *args: str) -> str:
        return " ".join([self.command.replace("{verb}", verb), *args])


# -- session --------------------------------------------------------------------------------------


def find_target(config: Config, name: str) -> Target:
    for target in config.targets:
        if target.name == name:
            return target
    known = ", ".join(t.name for t in config.targets)
    raise OperatorError(f"unknown target {name!r}: the config defines {known}")


def with_retry_state(target: Target, native: str | None) -> Target:
    """The target with ``--to`` as the state ``retry`` puts jobs back to (table mappings only)."""
    if native is None:
        return target
    if target.table is None:
        raise OperatorError(
            f"--to is only for table mappings: target {target.name!r} ({target.preset_name}) "
            "retries jobs the way its queue system does"
        )
    waiting = target.table.state.values_for("pending", "scheduled", "retrying")
    if native not in waiting:
        raise OperatorError(
            f"--to {native!r} is not a waiting state of target {target.name!r} "
            f"(pending, scheduled or retrying values: {', '.join(waiting)})"
        )
    recovery = target.recovery.model_copy(update={"reset_state": native})
    return target.model_copy(update={"recovery": recovery})


@asynccontextmanager
async def open_session(
    config: Config, name: str, retry_state: str | None = None
) -> AsyncIterator[Session]:
    target = with_retry_state(find_target(config, name), retry_state)
    async with open_operator_session(target) as (actions, stale_after):
        yield Session(target, actions, stale_after)


def _changed(rows: list[dict]) -> list[dict[str, Any]]:
    """Rows a statement changed, for output: ``state`` is the native state they are in now."""
    return [
        {"id": r["id"], "queue": r["queue"], "kind": r["kind"], "new_state": r["state"]}
        for r in rows
    ]


def _require(s: Session, available: bool, command: str, why: str) -> None:
    if not available:
        raise OperatorError(f"{command} is not available for target {s.target.name!r}: {why}")


# -- jobs -----------------------------------------------------------------------------------------


def _hint(s: Session, row: dict[str, Any]) -> str:
    if row["is_stale"]:
        if s.target.builtin_rescue_problems():
            return f"stale: {s.actions.preset_name}'s own sweep resets it"
        return f"stale: preview the reset with `{s.cli('recover-stale')}`"
    if row["can_retry"]:
        to = ["--to", "STATE"] if s.actions.verbs.retry_needs_state else []
        return f"{row['state']}: retry with `{s.cli('retry', shlex.quote(row['id']), *to)}`"
    if row["state"] in ("failed", "dead"):
        return f"{row['state']}: cannot be retried now ({s.actions.verbs.retry_rule})"
    return ""


def _job(s: Session, row: JobRow) -> Job:
    values = asdict(row)
    return Job(**values, hint=_hint(s, values))


@dataclass(frozen=True)
class Selection:
    """The whole set of jobs a ``jobs`` invocation selects, counted in full (not just the page shown)."""

    jobs: int | None  # None: counting took longer than statement_timeout
    stale: int
    retryable: int | None


async def _stale_page(
    s: Session, queue: str | None, kind: str | None, limit: int
) -> tuple[int, list[Job]]:
    """Every stale job of the selection (by the very statement the exporter counts them with), and
    the first ``limit`` of them looked up by id."""
    candidates = await stale_candidates(s, queue, kind, in_transaction=False)
    page = []
    for candidate in candidates[:limit]:
        try:
            page.append(await get_job(s, candidate.id))
        except OperatorError:  # finished since the stale read (same snapshot: cannot happen)
            continue
    return len(candidates), page


async def list_jobs(
    s: Session,
    states: Sequence[str],
    queue: str | None,
    kind: str | None,
    limit: int,
    stale_only: bool = False,
) -> list[Job]:
    """Stale jobs first, then live states through the partial indexes, then terminal ones newest id
    first, up to ``limit``."""
    jobs, _ = await select_jobs(s, states, queue, kind, limit, stale_only, count=False)
    return jobs


async def select_jobs(
    s: Session,
    states: Sequence[str],
    queue: str | None,
    kind: str | None,
    limit: int,
    stale_only: bool = False,
    count: bool = True,
) -> tuple[list[Job], Selection | None]:
    """One page of the selection (stale jobs first) and, with ``count``, the counts of all of it. One
    REPEATABLE READ snapshot, so the page and the counts agree."""
    async with s.actions.consistent_read():
        stale_total, page = 0, list[Job]()
        if "running" in states and s.actions.verbs.stale_jobs:
            stale_total, page = await _stale_page(s, queue, kind, limit)
        if stale_only:
            return page, Selection(stale_total, stale_total, 0) if count else None
        shown = {job.id for job in page}
        if len(page) < limit:
            # over-fetch by the stale jobs already shown, which the listing returns again
            rows = await s.actions.list_jobs(
                s.stale_after, states, queue, kind, limit - len(page) + len(shown)
            )
            page += [_job(s, row) for row in rows if row.id not in shown][: limit - len(page)]
        selection = None
        if count:
            counted = await s.actions.count_jobs(s.stale_after, states, queue, kind)
            selection = (
                Selection(counted[0], stale_total, counted[1])
                if counted is not None
                else Selection(None, stale_total, None)
            )
    return page, selection


async def get_job(s: Session, job_id: str) -> Job:
    _require(s, s.actions.verbs.job, "looking up a job", "no statement")
    row = await s.actions.job(s.stale_after, job_id)
    if row is None:
        raise OperatorError(f"unknown job id {job_id!r} on target {s.target.name!r}")
    return _job(s, row)


async def jobs_report(s: Session, args: argparse.Namespace) -> Report:
    stale_only = bool(getattr(args, "stale", False))
    states = ["running"] if stale_only else (args.state or list(DEFAULT_STATES))
    jobs, selection = await select_jobs(s, states, args.queue, args.kind, args.limit, stale_only)
    assert selection is not None
    what = "stale job(s)" if stale_only else f"job(s) in {', '.join(states)}"
    if selection.jobs is None:
        total = f"{len(jobs)} shown, more not counted (counting exceeded statement_timeout)"
        counts = f"{selection.stale} stale"
    else:
        total = f"{selection.jobs} {what}" + (
            f", {len(jobs)} shown (--limit {args.limit})" if len(jobs) < selection.jobs else ""
        )
        counts = f"{selection.stale} stale, {selection.retryable} retryable"
    return Report(
        command="jobs",
        target=s.target.name,
        result="listed",
        summary=total if stale_only else f"{total}: {counts}",
        columns=JOB_COLUMNS,
        rows=[asdict(job) for job in jobs],
        details={"selection": asdict(selection), "stale_first": True},
    )


# -- recover-stale --------------------------------------------------------------------------------


def refuse_builtin_rescue(target: Target) -> None:
    problems = target.builtin_rescue_problems()
    if problems:
        raise OperatorError(
            f"recover-stale refused for target {target.name!r}: "
            + "; ".join(message for _, message in problems)
        )


async def stale_candidates(
    s: Session, queue: str | None, kind: str | None, in_transaction: bool = True
) -> list[StaleJob]:
    _require(s, s.actions.verbs.stale_jobs, "recover-stale", "no stale-job statement")
    if in_transaction:
        async with s.actions.consistent_read():
            jobs = await s.actions.stale_jobs(s.stale_after)
    else:
        jobs = await s.actions.stale_jobs(s.stale_after)
    return [
        job
        for job in jobs
        if (queue is None or job.queue == queue) and (kind is None or job.kind == kind)
    ]


async def recover_stale(
    s: Session, queue: str | None, kind: str | None, limit: int, yes: bool
) -> Report:
    """Automatic recovery's run, now: no hold window, the same statement, lock and re-checks."""
    refuse_builtin_rescue(s.target)  # (cmd_recover_stale also checks before connecting)
    _require(
        s,
        s.actions.verbs.reset_stale,
        "recover-stale",
        "set recovery.reset_state (the native state a stale job goes back to)",
    )
    candidates = await stale_candidates(s, queue, kind)
    recoverer = Recoverer(
        s.target, s.actions, s.stale_after, event="manual_recover_stale", dry_run=not yes
    )
    result = await recoverer.run(candidates, time.time(), limit=limit)
    if result == "error":
        raise DatabaseFailure(f"recover-stale on target {s.target.name!r}: {recoverer.last_error}")
    if result == "locked":
        raise DatabaseFailure(
            f"another recovery run (an exporter replica or an operator) holds the lock of target "
            f"{s.target.name!r}; nothing was changed: try again"
        )
    changed = recoverer.last_changed
    verb = "would reset" if not yes else "reset"
    left = len(candidates) - len(changed)
    summary = f"{len(candidates)} stale job(s) found, {verb} {len(changed)}"
    if left:
        summary += (
            f"; {left} left alone (no longer stale, locked by a worker, or over --limit {limit})"
        )
    return Report(
        command="recover-stale",
        target=s.target.name,
        result=result,
        summary=summary,
        columns=CHANGED_COLUMNS,
        rows=_changed(changed),
        dry_run=not yes,
        details={"candidates": [asdict(job) for job in candidates], "stale_after": s.stale_after},
    )


# -- retry ----------------------------------------------------------------------------------------


async def retry_jobs(
    s: Session,
    job_id: str | None,
    queue: str | None,
    kind: str | None,
    limit: int,
    yes: bool,
) -> Report:
    """Failed/dead jobs back to waiting, as the queue system's own retry does."""
    _require(
        s,
        s.actions.verbs.retry,
        "retry",
        "set recovery.reset_state or pass --to with a waiting state, e.g. --to pending",
    )
    if job_id is not None:
        job = await get_job(s, job_id)
        if not job.can_retry:
            raise OperatorError(
                f"job {job_id} on target {s.target.name!r} is {job.state} "
                f"({job.native_state}), so it cannot be retried: {s.actions.verbs.retry_rule}"
            )
        limit = 1
    record: dict[str, Any] = {
        "dry_run": not yes,
        "candidates": [job_id] if job_id else None,
        "verb": "retried",
    }
    try:
        ids = [job_id] if job_id is not None else None
        changed = await s.actions.retry(ids, queue, kind, limit, commit=yes)
    except SourceFailure as exc:
        record_run("manual_retry", s.target.name, "error", changed=[], error=str(exc), **record)
        raise DatabaseFailure(f"retry on target {s.target.name!r}: {exc}") from None
    result = ("dry_run" if not yes else "retried") if changed else "nothing"
    record_run("manual_retry", s.target.name, result, changed=changed, **record)
    if job_id is not None and not changed:
        raise DatabaseFailure(
            f"job {job_id} was not retried: another transaction holds it or its state changed "
            "meanwhile; nothing was changed"
        )
    verb = "would retry" if not yes else "retried"
    return Report(
        command="retry",
        target=s.target.name,
        result=result,
        summary=f"{verb} {len(changed)} job(s)" + ("" if changed else ": no retryable job matches"),
        columns=CHANGED_COLUMNS,
        rows=_changed(changed),
        dry_run=not yes,
    )


# -- purge ----------------------------------------------------------------------------------------


@dataclass
class PurgeTally:
    total: int = 0
    batches: int = 0
    sample: list[dict] = field(default_factory=list)  # the first MAX_LOGGED_IDS rows, for the log
    groups: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def add(self, rows: list[dict]) -> None:
        self.total += len(rows)
        self.batches += 1
        self.sample += rows[: MAX_LOGGED_IDS - len(self.sample)]
        self.groups.update((r["queue"], r["kind"], r["state"]) for r in rows)


async def _purge_walk(
    s: Session,
    older_than: float,
    include_failed: bool,
    batch: int,
    commit: bool,
) -> PurgeTally:
    """Batches of up to ``batch`` rows in id order, each in its own transaction, until one comes back
    short (or, for a dry run, PREVIEW_CAP rows were counted)."""
    tally, after = PurgeTally(), None
    while commit or tally.total < PREVIEW_CAP:
        try:
            rows = await s.actions.purge_batch(older_than, include_failed, after, batch, commit)
        except SourceFailure as exc:
            raise PurgeInterrupted(tally, exc) from None
        tally.add(rows)
        if len(rows) < batch:
            break
        after = rows[-1]["id"]  # rows come ordered by id: the next batch starts above it
    return tally


class PurgeInterrupted(Exception):
    def __init__(self, tally: PurgeTally, cause: BaseException):
        super().__init__(str(cause))
        self.tally, self.cause = tally, cause


async def purge(
    s: Session, older_than: float, include_failed: bool, batch: int, yes: bool
) -> Report:
    """Finished jobs older than ``older_than`` seconds, chosen the way the queue's own cleanup does."""
    why = "map timestamps.finished so the age of a finished job is known"
    _require(s, s.actions.verbs.purge, "purge", why)
    fields: dict[str, Any] = {
        "older_than_seconds": older_than,
        "include_failed": include_failed,
        "batch": batch,
    }
    record: dict[str, Any] = {"dry_run": not yes, "verb": "deleted", **fields}
    try:
        tally = await _purge_walk(s, older_than, include_failed, batch, commit=yes)
    except PurgeInterrupted as stop:
        record_run(
            "manual_purge",
            s.target.name,
            "error",
            changed=stop.tally.sample,
            total=stop.tally.total,
            error=str(stop.cause),
            **record,
        )
        done = f" after deleting {stop.tally.total} job(s)" if yes else ""
        raise DatabaseFailure(f"purge on target {s.target.name!r} failed{done}: {stop.cause}")
    capped = not yes and tally.total >= PREVIEW_CAP
    result = ("dry_run" if not yes else "deleted") if tally.total else "nothing"
    record_run(
        "manual_purge",
        s.target.name,
        result,
        changed=tally.sample,
        total=tally.total,
        batches=tally.batches,
        **record,
    )
    verb = "would delete" if not yes else "deleted"
    count = f"at least {tally.total}" if capped else str(tally.total)
    return Report(
        command="purge",
        target=s.target.name,
        result=result,
        summary=f"{verb} {count} finished job(s) older than {_duration(older_than)} "
        f"({tally.batches} batch(es) of up to {batch})",
        columns=("queue", "kind", "state", "jobs"),
        rows=[
            {"queue": q, "kind": k, "state": st, "jobs": n}
            for (q, k, st), n in sorted(tally.groups.items())
        ],
        dry_run=not yes,
        details={
            "jobs_total": tally.total,
            "count_capped": capped,
            "batches": tally.batches,
            **fields,
        },
    )


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# -- output ---------------------------------------------------------------------------------------

JOB_COLUMNS = (
    "id",
    "queue",
    "kind",
    "state",
    "attempts",
    "last_error",
    "lock_owner",
    "is_stale",
    "can_retry",
    "hint",
)
CHANGED_COLUMNS = ("id", "queue", "kind", "new_state")
_CELL_WIDTH = 48


# never shortened: a hint holds a command to copy
_FULL_WIDTH = {"hint"}


def _cell(value: Any, full: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = " ".join(str(value).split())
    return text if full or len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def render_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    cells = [[_cell(row.get(c), c in _FULL_WIDTH) for c in columns] for row in rows]
    header = [c.upper() for c in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [header, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def render(report: Report, as_json: bool) -> str:
    if as_json:
        body: dict[str, Any] = {
            "command": report.command,
            "target": report.target,
            "result": report.result,
            "summary": report.summary,
        }
        if report.dry_run is not None:
            body["dry_run"] = report.dry_run
        body["jobs"] = report.rows
        body.update(report.details)
        return json.dumps(body, indent=2, default=str)
    lines = [f"target {report.target}: {report.summary}"]
    if report.rows:
        lines += ["", render_table(report.columns, report.rows)]
    if report.dry_run:
        lines += ["", DRY_RUN_NOTE]
    return "\n".join(lines)


# -- command entry points (wired in cli.py) -------------------------------------------------------

Body = Callable[[Session, argparse.Namespace], Awaitable[Report]]


def _run(
    args: argparse.Namespace,
    body: Body,
    retry_state: str | None = None,
    check: Callable[[Target], None] | None = None,
) -> int:
    """Load the config, open the target's session, run ``body``, print its report: exit 0, or 2 for an
    operator mistake, 1 for a database failure."""
    config = load_config(args.config)  # a ConfigError is reported by cli.main (exit 2)
    setup_logging(config.log_format, "info")

    command = f"jobqueue-exporter {{verb}} --config {shlex.quote(str(args.config))} --target " + (
        shlex.quote(args.target)
    )

    async def go() -> Report:
        if check is not None:
            check(find_target(config, args.target))
        async with open_session(config, args.target, retry_state) as session:
            return await body(dataclasses.replace(session, command=command), args)

    try:
        report = asyncio.run(go())
    except (OperatorError, SchemaProblem, NoOperatorVerbs) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatabaseFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SourceFailure as exc:  # unreachable, or failed mid-way (named as the poller does)
        print(f"error: target {args.target}: {exc}", file=sys.stderr)
        return 1
    print(render(report, args.json))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    return _run(args, jobs_report)


def cmd_recover_stale(args: argparse.Namespace) -> int:
    async def body(s: Session, a: argparse.Namespace) -> Report:
        limit = a.limit if a.limit is not None else s.target.recovery.max_jobs_per_run
        return await recover_stale(s, a.queue, a.kind, limit, a.yes)

    return _run(args, body, check=refuse_builtin_rescue)


def cmd_retry(args: argparse.Namespace) -> int:
    if (args.job_id is None) == (not args.all_failed):
        print("error: give either one JOB_ID or --all-failed", file=sys.stderr)
        return 2
    if args.job_id is not None and (args.queue or args.kind or args.limit is not None):
        print(
            "error: --queue, --kind and --limit go with --all-failed, not with a JOB_ID",
            file=sys.stderr,
        )
        return 2

    async def body(s: Session, a: argparse.Namespace) -> Report:
        limit = a.limit if a.limit is not None else DEFAULT_RETRY_LIMIT
        return await retry_jobs(s, a.job_id, a.queue, a.kind, limit, a.yes)

    return _run(args, body, retry_state=args.to)


def cmd_purge(args: argparse.Namespace) -> int:
    try:
        older_than = parse_duration(args.older_than)
    except ValueError as exc:
        print(f"error: --older-than: {exc}", file=sys.stderr)
        return 2
    if older_than <= 0:
        print("error: --older-than must be more than 0, e.g. 30d", file=sys.stderr)
        return 2

    async def body(s: Session, a: argparse.Namespace) -> Report:
        return await purge(s, older_than, a.include_failed, a.batch, a.yes)

    return _run(args, body)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value
