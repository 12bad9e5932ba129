"""SQL injection through the config: identifiers are validated (and quoted), state values are parameters.

Identifier fields of the generic table mapping and the target ``schema`` only accept plain identifiers;
anything else is rejected by config validation with the key path. Native state values may be any text, so
they must reach PostgreSQL as bind parameters: a malicious value is counted like any other string.
Identifiers that are SQL keywords or mixed case are legitimate and must work because they are quoted.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from jobqueue_exporter.config import ConfigError, load_config, load_config_data
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.sources import SchemaProblem
from jobqueue_exporter.sources.postgres.presets import generic

MALICIOUS_IDENTIFIERS = [
    "jobs; DROP TABLE x; --",
    'a"b',
    'jobs" ; DROP TABLE canary; --',
    "x' OR '1'='1",
    "a b",
    "1abc",
    "a" * 64,
    "jöbs",
    "ｊobs",  # fullwidth j
    "jobs\u200b",  # zero-width space
    "jobs\n",  # a `$`-anchored regex would accept this
    "\njobs",
    "",
    "jobs--",
    "jobs/*",
    "$1",
    "jobs)",
    "public.jobs",
    "public.jobs; DROP TABLE x",
    "*",
]

# dotted key inside one target -> where it sits in the target dict
IDENTIFIER_FIELDS = [
    "table.name",
    "table.schema",
    "table.id",
    "table.state.column",
    "table.queue",
    "table.kind",
    "table.attempts",
    "table.last_error",
    "table.lock_owner",
    "table.timestamps.enqueued",
    "table.timestamps.eligible",
    "table.timestamps.started",
    "table.timestamps.finished",
    "table.stale.lease_expires",
    "table.stale.started_before",
    "table.stale.heartbeat",
    "schema",
]


def base_target() -> dict[str, Any]:
    return {
        "name": "t",
        "dsn": "postgresql://nobody@127.0.0.1:1/db",
        "table": {
            "name": "jobs",
            "state": {
                "column": "status",
                "pending": ["pending"],
                "running": ["running"],
                "succeeded": ["done"],
            },
            "timestamps": {"enqueued": "created_at", "started": "started_at"},
        },
    }


def with_value(field: str, value: Any) -> dict[str, Any]:
    target = copy.deepcopy(base_target())
    *parents, key = field.split(".")
    node = target
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return target


def test_base_target_is_valid() -> None:
    """The mutations below fail because of the one bad value, not because the base is broken."""
    for field in IDENTIFIER_FIELDS:
        load_config_data({"targets": [with_value(field, "legit_name")]})


@pytest.mark.parametrize("value", MALICIOUS_IDENTIFIERS)
@pytest.mark.parametrize("field", IDENTIFIER_FIELDS)
def test_malicious_identifier_is_rejected_with_key_path(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_data({"targets": [with_value(field, value)]})
    (problem,) = info.value.problems
    assert problem.startswith(f"targets[0](t).{field}: {value!r} is not a plain SQL identifier"), (
        problem
    )


@pytest.mark.parametrize("value", [123, 1.5, True, ["jobs"], {"name": "jobs"}])
@pytest.mark.parametrize("field", ["table.name", "table.state.column", "schema"])
def test_non_string_identifier_is_rejected(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_data({"targets": [with_value(field, value)]})
    (problem,) = info.value.problems
    assert problem.startswith(f"targets[0](t).{field}: "), problem
    assert "not a plain SQL identifier" in problem


def test_every_malicious_identifier_in_one_file_is_reported(tmp_path: Path) -> None:
    """All fields at once, written as YAML: one line per field, each with its own path."""
    lines = [
        "targets:",
        "  - name: t",
        "    dsn: postgresql://nobody@127.0.0.1:1/db",
        "    schema: 'app; DROP SCHEMA app CASCADE'",
        "    table:",
        "      name: 'jobs; DROP TABLE x; --'",
        "      schema: 'a\"b'",
        "      id: \"x' OR '1'='1\"",
        "      queue: 'a b'",
        "      kind: 1abc",
        f"      attempts: {'a' * 64}",
        "      state:",
        "        column: 'status--'",
        "        pending: [pending]",
        "        running: [running]",
        "      timestamps:",
        "        enqueued: 'créé'",
        "        eligible: 'run_at)'",
        "        started: '\"started_at\"'",
        "        finished: 'finished_at /*'",
        "      stale:",
        "        heartbeat: 'beat; --'",
    ]
    config_file = tmp_path / "config.yaml"
    config_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    paths = sorted(problem.split(": ", 1)[0] for problem in info.value.problems)
    expected = [
        "schema",
        "table.name",
        "table.schema",
        "table.id",
        "table.queue",
        "table.kind",
        "table.attempts",
        "table.state.column",
        "table.timestamps.enqueued",
        "table.timestamps.eligible",
        "table.timestamps.started",
        "table.timestamps.finished",
        "table.stale.heartbeat",
    ]
    assert paths == sorted(f"targets[0](t).{p}" for p in expected), info.value.problems
    assert all("not a plain SQL identifier" in p for p in info.value.problems)


def test_longest_legal_identifier_is_accepted() -> None:
    load_config_data({"targets": [with_value("table.name", "j" * 63)]})


# -- native state values are parameters -------------------------------------------------------

PENDING = "pending'); DROP TABLE jobs; --"
OR_TRUE = "x' OR '1'='1"
RUNNING = 'running"; DROP TABLE canary; --'
SCHEDULED = "{scheduled,running}"  # array-literal syntax
RETRYING = "retry\\'; SELECT pg_sleep(10); --"
SUCCEEDED = "done'::text); DELETE FROM canary; --"
FAILED = "$1"
DEAD = "dead\x01☠"
CANCELLED = "NULL"
EVIL_QUEUE = "q'); DROP TABLE canary; --"
EVIL_KIND = 'k"}{'


def evil_target(dsn: str) -> dict[str, Any]:
    return {
        "name": "evil",
        "dsn": dsn,
        "count_terminal_states": True,
        "finished_counting": "on",
        "table": {
            "name": "jobs",
            "queue": "queue",
            "kind": "kind",
            "attempts": "attempts",
            "state": {
                "column": "status",
                "pending": [PENDING, OR_TRUE],
                "scheduled": [SCHEDULED],
                "running": [RUNNING],
                "retrying": [RETRYING],
                "succeeded": [SUCCEEDED],
                "failed": [FAILED],
                "dead": [DEAD],
                "cancelled": [CANCELLED, ""],
                # values that merely look like the mapped ones: deliberately no state
                "ignore": ["pending", "x", "running", "scheduled", "null"],
            },
            "timestamps": {
                "enqueued": "created_at",
                "eligible": "run_at",
                "started": "started_at",
                "finished": "finished_at",
            },
            "stale": {"heartbeat": "heartbeat_at"},
        },
    }


async def create_canary(db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE canary (id int PRIMARY KEY, note text)")
    await db.execute("INSERT INTO canary VALUES (1, 'still here')")


async def assert_canary(db: asyncpg.Connection) -> None:
    assert await db.fetch("SELECT id, note FROM canary") == [(1, "still here")]


def statements(poller: TargetPoller) -> list[str]:
    preset = poller.source.preset
    parts = [preset.live, preset.terminal, preset.finished_tail, preset.finished_backfill]
    return [s.sql for s in parts if s is not None]


async def test_malicious_state_values_are_bound_as_parameters(
    db: asyncpg.Connection, dsn: str
) -> None:
    await create_canary(db)
    await db.execute(
        """
        CREATE TABLE jobs (
            id bigserial PRIMARY KEY,
            status text NOT NULL,
            queue text NOT NULL DEFAULT 'default',
            kind text NOT NULL DEFAULT 'default',
            attempts int NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now() - interval '1 minute',
            run_at timestamptz,
            started_at timestamptz,
            heartbeat_at timestamptz,
            finished_at timestamptz
        );
        CREATE INDEX ON jobs (finished_at);
        """
    )
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    past = datetime.now(timezone.utc) - timedelta(minutes=2)
    rows: list[tuple[str, str, datetime | None, datetime | None, datetime | None]] = [
        # status, queue, run_at, started_at, finished_at
        *[(PENDING, "default", None, None, None)] * 3,
        *[(OR_TRUE, "default", None, None, None)] * 2,
        (PENDING, EVIL_QUEUE, None, None, None),
        (SCHEDULED, "default", future, None, None),
        (RETRYING, "default", future, None, None),
        (RUNNING, "default", None, past, None),
        # values that merely look like the mapped ones are NOT counted
        *[("pending", "default", None, None, None)] * 4,
        ("x", "default", None, None, None),
        ("running", "default", None, past, None),
        ("scheduled", "default", future, None, None),
        ("null", "default", None, None, None),
        # terminal / finished
        *[(FAILED, "default", None, past, past)] * 2,
        (DEAD, "default", None, past, past),
        (CANCELLED, "default", None, None, past),
        ("", "default", None, None, past),
        *[(SUCCEEDED, "default", None, past, past)] * 3,
    ]
    await db.executemany(
        "INSERT INTO jobs (status, queue, run_at, started_at, finished_at, heartbeat_at)"
        " VALUES ($1, $2, $3, $4, $5, $4)",
        rows,
    )
    await db.execute("UPDATE jobs SET kind = $1 WHERE queue = $2", EVIL_KIND, EVIL_QUEUE)

    config = load_config_data({"targets": [evil_target(dsn)]})
    poller = TargetPoller(config, config.targets[0])
    try:
        snapshot = await poller.poll_once()
        for sql in statements(poller):
            # ($1 and NULL occur in the SQL legitimately)
            for value in (PENDING, OR_TRUE, RUNNING, SUCCEEDED, DEAD, SCHEDULED, RETRYING):
                assert value not in sql
        main = snapshot.series[("default", "default")].jobs
        assert main == {
            "pending": 5,
            "scheduled": 1,
            "running": 1,
            "retrying": 1,
            "failed": 2,
            "dead": 1,
            "cancelled": 2,
        }
        # the malicious queue/kind values are data, returned verbatim as label values
        evil = snapshot.series[(EVIL_QUEUE, EVIL_KIND)].jobs
        assert evil["pending"] == 1 and sum(evil.values()) == 1
        # backfilled finished jobs of the window feed the success ratio: 3 / (3 + 2 + 1)
        ratios = poller.state.window.ratios(snapshot.taken_at)
        assert ratios[("default", "default")] == pytest.approx(0.5)

        # the incremental tail binds the same values
        await db.execute(
            "INSERT INTO jobs (status, finished_at) VALUES ($1, now()), ($1, now()), ($2, now())",
            SUCCEEDED,
            FAILED,
        )
        await poller.poll_once()
        finished = poller.state.finished
        assert finished[("default", "default", "succeeded")] == 2
        assert finished[("default", "default", "failed")] == 1
        assert finished[("default", "default", "dead")] == 0
    finally:
        await poller.close()
    await assert_canary(db)
    assert await db.fetchval("SELECT count(*) FROM jobs") == len(rows) + 3


async def test_malicious_values_for_an_enum_state_column(db: asyncpg.Connection, dsn: str) -> None:
    """With an enum column the values are cast to the enum type, still as parameters."""
    await create_canary(db)
    await db.execute(
        f"""
        CREATE TYPE job_state AS ENUM ({", ".join(_literal(v) for v in (PENDING, RUNNING, "idle"))});
        CREATE TABLE jobs (
            id bigserial PRIMARY KEY,
            status job_state NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            started_at timestamptz
        );
        """
    )
    await db.executemany(
        "INSERT INTO jobs (status, started_at) VALUES ($1, $2)",
        [(PENDING, None), (PENDING, None), (RUNNING, datetime.now(timezone.utc)), ("idle", None)],
    )
    config = load_config_data(
        {
            "targets": [
                {
                    "name": "enum",
                    "dsn": dsn,
                    "table": {
                        "name": "jobs",
                        "state": {
                            "column": "status",
                            "pending": [PENDING],
                            "running": [RUNNING],
                            "ignore": ["idle"],
                        },
                        "timestamps": {"enqueued": "created_at", "started": "started_at"},
                    },
                }
            ]
        }
    )
    poller = TargetPoller(config, config.targets[0])
    try:
        snapshot = await poller.poll_once()
    finally:
        await poller.close()
    jobs = snapshot.series[("default", "default")].jobs
    assert (jobs["pending"], jobs["running"]) == (2, 1)
    await assert_canary(db)


def _literal(value: str) -> str:
    """A standard-conforming SQL string literal, only for the test's own DDL."""
    return "'" + value.replace("'", "''") + "'"


# -- keywords and mixed case are quoted -------------------------------------------------------


async def test_keyword_and_mixed_case_identifiers_are_quoted(
    db: asyncpg.Connection, dsn: str
) -> None:
    await db.execute(
        """
        CREATE SCHEMA "Work";
        CREATE TYPE "Work"."JobState" AS ENUM ('waiting', 'busy', 'ok', 'bad');
        CREATE TABLE "Work"."order" (
            "Id" bigserial PRIMARY KEY,
            "select" "Work"."JobState" NOT NULL,
            "Queue" text NOT NULL DEFAULT 'mail',
            "group" text NOT NULL DEFAULT 'send',
            "limit" int NOT NULL DEFAULT 0,
            "from" timestamptz NOT NULL DEFAULT now() - interval '30 seconds',
            "where" timestamptz,
            "user" timestamptz,
            "end" timestamptz,
            "Lease" timestamptz
        );
        CREATE INDEX ON "Work"."order" ("end");
        -- same-named tables/columns differing only in case must not be picked up
        CREATE TABLE "Work"."ORDER" (id int);
        CREATE TABLE public."order" (id int);
        """
    )
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    past = datetime.now(timezone.utc) - timedelta(minutes=10)
    recent = datetime.now(timezone.utc) - timedelta(minutes=1)
    await db.executemany(
        'INSERT INTO "Work"."order" ("select", "limit", "where", "user", "end", "Lease")'
        ' VALUES ($1::text::"Work"."JobState", $2, $3, $4, $5, $6)',
        [
            ("waiting", 0, None, None, None, None),
            ("waiting", 0, None, None, None, None),
            ("waiting", 0, future, None, None, None),  # scheduled
            ("waiting", 2, future, None, None, None),  # retrying
            ("busy", 1, None, past, None, past),  # lease expired: stale
            ("busy", 0, None, past, None, future),
            ("ok", 0, None, past, recent, None),
            ("bad", 0, None, past, recent, None),
            ("ok", 0, None, past, past - timedelta(hours=1), None),  # outside the window
        ],
    )
    config = load_config_data(
        {
            "targets": [
                {
                    "name": "keywords",
                    "dsn": dsn,
                    "count_terminal_states": True,
                    "table": {
                        "name": "order",
                        "schema": "Work",
                        "id": "Id",
                        "queue": "Queue",
                        "kind": "group",
                        "attempts": "limit",
                        "state": {
                            "column": "select",
                            "pending": ["waiting"],
                            "running": ["busy"],
                            "succeeded": ["ok"],
                            "failed": ["bad"],
                        },
                        "timestamps": {
                            "enqueued": "from",
                            "eligible": "where",
                            "started": "user",
                            "finished": "end",
                        },
                        "stale": {"lease_expires": "Lease"},
                    },
                }
            ]
        }
    )
    poller = TargetPoller(config, config.targets[0])
    try:
        snapshot = await poller.poll_once()
        assert poller.state.finished_counting, 'the index on "end" must be found'
        stats = snapshot.series[("mail", "send")]
        assert stats.jobs == {
            "pending": 2,
            "scheduled": 1,
            "retrying": 1,
            "running": 2,
            "failed": 1,
            "dead": 0,
            "cancelled": 0,
        }
        assert stats.stale_jobs == 1
        assert 25 < stats.oldest_pending_age_seconds < 120
        assert 590 < stats.oldest_running_age_seconds < 700
        assert poller.state.window.ratios(snapshot.taken_at)[("mail", "send")] == 0.5

        await db.execute(
            """INSERT INTO "Work"."order" ("select", "user", "end") VALUES ('ok', now(), now())"""
        )
        await poller.poll_once()
        assert poller.state.finished[("mail", "send", "succeeded")] == 1
    finally:
        await poller.close()


async def test_mixed_case_table_and_naive_timestamps_in_public(
    db: asyncpg.Connection, dsn: str
) -> None:
    await db.execute(
        """
        CREATE TABLE "Jobs" (
            "ID" int PRIMARY KEY,
            "Status" varchar(20) NOT NULL,
            "CreatedAt" timestamp NOT NULL,
            "StartedAt" timestamp,
            "FinishedAt" timestamp
        );
        CREATE INDEX "Jobs_FinishedAt" ON "Jobs" ("FinishedAt");
        CREATE TABLE jobs (id int);  -- the unquoted twin must not be used
        """
    )
    utc_now = datetime.now(timezone.utc).replace(tzinfo=None)
    await db.executemany(
        'INSERT INTO "Jobs" VALUES ($1, $2, $3, $4, $5)',
        [
            (1, "New", utc_now - timedelta(seconds=40), None, None),
            (2, "Running", utc_now - timedelta(seconds=60), utc_now - timedelta(seconds=20), None),
            (3, "Done", utc_now - timedelta(minutes=3), utc_now, utc_now - timedelta(minutes=1)),
        ],
    )
    config = load_config_data(
        {
            "targets": [
                {
                    "name": "mixed",
                    "dsn": dsn,
                    "table": {
                        "name": "Jobs",
                        "id": "ID",
                        "state": {
                            "column": "Status",
                            "pending": ["New"],
                            "running": ["Running"],
                            "succeeded": ["Done"],
                        },
                        "timestamps": {
                            "enqueued": "CreatedAt",
                            "started": "StartedAt",
                            "finished": "FinishedAt",
                        },
                    },
                }
            ]
        }
    )
    poller = TargetPoller(config, config.targets[0])
    try:
        snapshot = await poller.poll_once()
    finally:
        await poller.close()
    stats = snapshot.series[("default", "default")]
    assert (stats.jobs["pending"], stats.jobs["running"]) == (1, 1)
    assert 35 < stats.oldest_pending_age_seconds < 100
    assert 15 < stats.oldest_running_age_seconds < 80
    assert poller.state.finished_counting
    assert poller.state.window.ratios(snapshot.taken_at) == {("default", "default"): 1.0}


async def test_identifiers_are_case_sensitive(db: asyncpg.Connection, dsn: str) -> None:
    """Because names are quoted, ``Status`` in the config does not match an unquoted ``status``
    column: the poll fails with a schema problem naming the real columns, not with bad SQL."""
    await db.execute(
        "CREATE TABLE jobs (id int, status text, created_at timestamptz, started_at timestamptz)"
    )
    target = with_value("table.state.column", "Status")
    target["dsn"] = dsn
    config = load_config_data({"targets": [target]})
    poller = TargetPoller(config, config.targets[0])
    with pytest.raises(SchemaProblem, match="has no column 'Status'.*status"):
        await poller.poll_once()
    await poller.close()
    assert poller.state.up is False
    assert poller.state.errors["schema"] == 1


async def test_target_schema_that_is_a_keyword(db: asyncpg.Connection, dsn: str) -> None:
    await db.execute(
        """
        CREATE SCHEMA "select";
        CREATE TABLE "select".jobs (
            id int, status text, created_at timestamptz DEFAULT now(), started_at timestamptz
        );
        INSERT INTO "select".jobs (id, status) VALUES (1, 'pending'), (2, 'pending');
        """
    )
    target = base_target()
    target.update(dsn=dsn, schema="select")
    config = load_config_data({"targets": [target]})
    poller = TargetPoller(config, config.targets[0])
    try:
        snapshot = await poller.poll_once()
    finally:
        await poller.close()
    assert snapshot.series[("default", "default")].jobs["pending"] == 2


async def test_target_schema_in_mixed_case(db: asyncpg.Connection, dsn: str) -> None:
    await db.execute(
        """
        CREATE SCHEMA "Work";
        CREATE TABLE "Work".jobs (
            id int, status text, created_at timestamptz DEFAULT now(), started_at timestamptz
        );
        INSERT INTO "Work".jobs (id, status) VALUES (1, 'pending');
        """
    )
    target = base_target()
    target.update(dsn=dsn, schema="Work")
    config = load_config_data({"targets": [target]})
    poller = TargetPoller(config, config.targets[0])
    try:
        snapshot = await poller.poll_once()
    finally:
        await poller.close()
    assert snapshot.series[("default", "default")].jobs["pending"] == 1


def test_generated_sql_quotes_every_identifier() -> None:
    """Unit check of the generic preset: each configured name appears only double-quoted."""
    names = {
        "name": "order",
        "schema": "Work",
        "id": "Id",
        "queue": "Queue",
        "kind": "group",
        "attempts": "limit",
    }
    target = load_config_data(
        {
            "targets": [
                {
                    "name": "t",
                    "dsn": "postgresql://u@h/db",
                    "table": {
                        **names,
                        "state": {
                            "column": "select",
                            "pending": ["p"],
                            "running": ["r"],
                            "succeeded": ["s"],
                        },
                        "timestamps": {
                            "enqueued": "from",
                            "eligible": "where",
                            "started": "user",
                            "finished": "end",
                        },
                        "stale": {"heartbeat": "Beat"},
                    },
                }
            ]
        }
    ).targets[0]
    assert target.table is not None
    preset = generic.build(target.table)
    sql = preset.live.sql + preset.finished_tail.sql + preset.finished_backfill.sql
    sql += preset.terminal.sql if preset.terminal else ""
    assert '"Work"."order"' in sql
    for ident in (
        "Id",
        "Queue",
        "group",
        "limit",
        "select",
        "from",
        "where",
        "user",
        "end",
        "Beat",
    ):
        assert f'"{ident}"' in sql, ident
    for ident in ("Id", "Queue", "Beat", "Work"):
        unquoted = sql.replace(f'"{ident}"', "")
        assert ident not in unquoted, ident
