"""Label cardinality: max_queues, max_kinds_per_queue, label_ttl and reserved label values.

Against real tables (a generic mapping) with the truth computed independently in SQL from an ``expect``
column, the canonical state each test row was made to be in. Expiry runs on an injected clock.
"""

from __future__ import annotations

import time
from collections import Counter

import asyncpg
import pytest
from helpers import make_config, scrape, series, value
from jobqueue_exporter.config import ConfigError, load_config_data
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.snapshot import LabelPolicy, build_snapshot, label_value

OTHER = "__other__"
TTL = 3600.0
STALE_AFTER = 600.0
LIVE = ("pending", "scheduled", "running", "retrying")

SCHEMA = """
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    queue text,
    kind text,
    status text NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    locked_at timestamptz,
    finished_at timestamptz,
    expect text NOT NULL
);
CREATE INDEX ON jobs (finished_at);
"""

TABLE = {
    "name": "jobs",
    "state": {
        "column": "status",
        "pending": ["pending"],
        "retrying": ["retrying"],
        "running": ["running"],
        "succeeded": ["completed"],
        "failed": ["failed"],
        "dead": ["dead"],
    },
    "queue": "queue",
    "kind": "kind",
    "attempts": "attempts",
    "timestamps": {"eligible": "run_at", "started": "locked_at", "finished": "finished_at"},
    "stale": {"started_before": "locked_at"},
}


class Clock:
    """The policy's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def poller_for(dsn: str, clock: Clock | None = None, **target) -> TargetPoller:
    config = make_config(
        {"name": "home", "dsn": dsn, "table": TABLE, "stale_after": f"{STALE_AFTER:g}s", **target}
    )
    poller = TargetPoller(config, config.targets[0])
    if clock is not None:
        poller.policy.clock = clock
    return poller


async def add_jobs(db: asyncpg.Connection, rows: list[tuple[str | None, str | None, str, float]]):
    """Rows of (queue, kind, expected canonical state, age in seconds) as the mapping will read them."""
    await db.execute(
        """
        INSERT INTO jobs (queue, kind, status, attempts, run_at, locked_at, expect)
        SELECT q, k,
               CASE e WHEN 'running' THEN 'running' WHEN 'retrying' THEN 'retrying' ELSE 'pending' END,
               CASE WHEN e = 'retrying' THEN 1 ELSE 0 END,
               CASE WHEN e IN ('scheduled', 'retrying') THEN now() + interval '1 hour'
                    ELSE now() - make_interval(secs => a) END,
               CASE WHEN e = 'running' THEN now() - make_interval(secs => a) END,
               e
        FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS t(q, k, e, a)
        """,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )


async def finish(db: asyncpg.Connection, where: str, *args) -> int:
    """Complete the live jobs matching ``where``; how many."""
    done = await db.fetch(
        f"UPDATE jobs SET status = 'completed', finished_at = now(), expect = 'succeeded' "
        f"WHERE expect IN ('pending', 'running') AND {where} RETURNING id",
        *args,
    )
    return len(done)


async def truth(db: asyncpg.Connection, queues: list[str] | None = None) -> Counter:
    """expected state -> live jobs (and "stale"), over ``queues`` (database values) or all."""
    rows = await db.fetch(
        "SELECT expect, count(*) AS n, count(*) FILTER (WHERE expect = 'running' AND locked_at < "
        "now() - make_interval(secs => $2)) AS stale FROM jobs "
        "WHERE expect = ANY($3) AND ($1::text[] IS NULL OR queue = ANY($1)) GROUP BY expect",
        queues,
        STALE_AFTER,
        list(LIVE),
    )
    counts = Counter({r["expect"]: r["n"] for r in rows})
    counts["stale"] = sum(r["stale"] for r in rows)
    return counts


async def oldest_age(db: asyncpg.Connection, expect: str, queues: list[str]) -> float:
    column = "run_at" if expect == "pending" else "locked_at"
    return await db.fetchval(
        f"SELECT coalesce(extract(epoch FROM now() - min({column}))::float8, 0) FROM jobs "
        "WHERE expect = $1 AND queue = ANY($2)",
        expect,
        queues,
    )


def exported_queues(samples: dict) -> set[str]:
    return {dict(labels)["queue"] for labels in series(samples, "jobqueue_jobs")}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(series(samples, name, **labels).values())


def queues_with_series(samples: dict) -> set[str]:
    """Queue labels on any metric at all."""
    return {dict(labels)["queue"] for (_, labels) in samples if "queue" in dict(labels)}


# -- LabelPolicy, pure ----------------------------------------------------------------------------


def test_label_values_are_injective_and_never_reserved() -> None:
    values = [None, "", "_", "__", "x", "other", "__other", "other__", "_other_", "__other__"]
    values += ["___other__", "____other__", "__empty__", "___empty__", "__null__", "___null__"]
    values += ["__OTHER__", " __other__", "__other__ ", "default"]
    labels = [label_value(v) for v in values]
    assert len(set(labels)) == len(values), "two database values share a label value"
    assert OTHER not in labels
    assert all(labels), "no empty label value (Prometheus would drop the label)"
    assert label_value("") == "__empty__" and label_value(None) == "__null__"
    assert label_value("__other__") == "___other__"
    assert label_value("___other__") == "____other__"
    assert label_value("__empty__") == "___empty__"
    assert label_value("x") == "x" and label_value("__OTHER__") == "__OTHER__"


def test_policy_caps_queues_first_come_and_keeps_slots() -> None:
    clock = Clock()
    policy = LabelPolicy(None, 2, max_queues=2, label_ttl=TTL, clock=clock)
    assert policy.label("b", "k") == ("b", "k")
    assert policy.label("a", "k") == ("a", "k")
    assert policy.label("c", "k") == (OTHER, "k"), "third queue overflows"
    assert policy.label("c", "j") == (OTHER, "j")
    assert policy.label("d", "i") == (OTHER, OTHER), "kind cap applies to the __other__ queue too"
    for _ in range(5):  # later polls: nobody loses or gains a slot while all are active
        clock.advance(60)
        assert [policy.label(q, "k") for q in "dcba"] == [(OTHER, "k")] * 2 + [
            ("b", "k"),
            ("a", "k"),
        ]
        assert policy.expire() == set()
    assert policy.label("a", "x") == ("a", "x")
    assert policy.label("a", "y") == ("a", OTHER), "kind cap per queue"
    assert policy.label("", "") == (OTHER, OTHER)


def test_policy_expiry_frees_queue_and_kind_slots() -> None:
    clock = Clock()
    policy = LabelPolicy(None, 1, max_queues=1, label_ttl=TTL, clock=clock)
    assert policy.label("a", "x") == ("a", "x")
    assert policy.label("a", "y") == ("a", OTHER)
    assert policy.label("b", "x") == (OTHER, "x")
    clock.advance(TTL)
    policy.label("a", "y")  # still seen: ("a", "__other__") stays, ("a", "x") goes
    assert policy.expire() == set(), "exactly label_ttl unseen is not longer than label_ttl"
    clock.advance(1)
    policy.label("a", "y")
    assert policy.expire() == {("a", "x"), (OTHER, "x")}
    assert policy.label("a", "y") == ("a", "y"), "the kind slot of ('a', 'x') is free"
    assert policy.label("b", "x") == (OTHER, "x"), "queue a still holds the only queue slot"
    clock.advance(TTL + 1)
    policy.label("b", "x")
    assert policy.expire() == {("a", "y"), ("a", OTHER)}
    assert policy.label("b", "x") == ("b", "x"), "a expired: its queue slot went to b"
    assert set(policy.series_keys()) == {("b", "x"), (OTHER, "x")}
    clock.advance(TTL + 1)
    policy.label("b", "x")
    assert policy.expire() == {(OTHER, "x")}
    assert policy.series_keys() == [("b", "x")]


def test_policy_declared_queues_never_overflow_nor_expire() -> None:
    clock = Clock()
    declared = ["d1", "d2", "d3", "", "__other__"]
    policy = LabelPolicy(declared, 5, max_queues=1, label_ttl=TTL, clock=clock)
    assert [policy.label(q, "k") for q in declared] == [
        ("d1", "k"),
        ("d2", "k"),
        ("d3", "k"),
        ("__empty__", "k"),
        ("___other__", "k"),
    ]
    assert policy.label("undeclared", "k") is None, "allow-list"
    clock.advance(100 * TTL)
    assert policy.expire() == set()
    assert {q for q, _ in policy.series_keys()} == {"d1", "d2", "d3", "__empty__", "___other__"}


def test_snapshot_overflow_sums_counts_and_takes_max_ages() -> None:
    policy = LabelPolicy(None, 50, max_queues=1, label_ttl=TTL, clock=Clock())
    rows = [
        ("b", "k", "pending", 3, 30.0, 0),
        ("c", "k", "pending", 4, 70.0, 0),
        ("a", "k", "pending", 1, 10.0, 0),
        ("b", "k", "running", 2, 5.0, 1),
        ("c", "k", "running", 5, 50.0, 2),
    ]
    snapshot = build_snapshot(policy, rows, None, taken_at=0.0)
    assert set(snapshot.series) == {("a", "k"), (OTHER, "k")}, (
        "'a' sorts first, so it gets the slot"
    )
    other = snapshot.series[(OTHER, "k")]
    assert other.jobs == {"pending": 7, "scheduled": 0, "running": 7, "retrying": 0}
    assert (other.oldest_pending_age_seconds, other.oldest_running_age_seconds) == (70.0, 50.0)
    assert other.stale_jobs == 3


# -- configuration --------------------------------------------------------------------------------


def problems(**target) -> list[str]:
    base = {"name": "app", "dsn": "postgresql://u@h/db", "preset": "procrastinate"}
    poll_interval = target.pop("global_poll_interval", None)
    data = {"targets": [{**base, **target}]}
    if poll_interval is not None:
        data["poll_interval"] = poll_interval
    with pytest.raises(ConfigError) as info:
        load_config_data(data)
    return info.value.problems


def test_cardinality_defaults() -> None:
    config = make_config({"name": "app", "dsn": "postgresql://u@h/db", "preset": "procrastinate"})
    (target,) = config.targets
    assert (target.max_queues, target.max_kinds_per_queue, target.label_ttl) == (15, 20, 3600.0)
    config = make_config(
        {
            "name": "app",
            "dsn": "postgresql://u@h/db",
            "preset": "procrastinate",
            "max_queues": 200,
            "label_ttl": "25h",
        }
    )
    assert (config.targets[0].max_queues, config.targets[0].label_ttl) == (200, 90000.0)


@pytest.mark.parametrize(
    ("target", "path", "fragments"),
    [
        ({"max_queues": 0}, "max_queues", ["between 1 and 10000 (got 0)", "max_queues: 15"]),
        ({"max_queues": 10001}, "max_queues", ["between 1 and 10000", 'queue="__other__"']),
        ({"max_queues": True}, "max_queues", ["whole number, not true", "max_queues: 15"]),
        ({"max_queues": "many"}, "max_queues", ["must be a valid integer"]),
        ({"label_ttl": 0}, "label_ttl", ["at least 1s", "label_ttl: 1h"]),
        ({"label_ttl": "an hour"}, "label_ttl", ["invalid duration", "30s, 5m, 1h"]),
        ({"label_ttl": "20s"}, "label_ttl", ["shorter than two poll intervals (2 x 15s)", "30s"]),
        (
            {"label_ttl": "1h", "poll_interval": "45m"},
            "label_ttl",
            ["2 x 2700s", "at least 5400s", "label_ttl: 3h"],
        ),
        (
            {"label_ttl": "5m", "global_poll_interval": "5m"},
            "label_ttl",
            ["shorter than two poll intervals (2 x 300s)"],
        ),
    ],
)
def test_config_errors_name_the_key_and_the_fix(target: dict, path: str, fragments: list[str]):
    (problem,) = problems(**target)
    where, _, message = problem.partition(": ")
    assert where == f"targets[0](app).{path}"
    for fragment in fragments:
        assert fragment in message, (fragment, problem)


# -- against PostgreSQL ---------------------------------------------------------------------------


async def test_max_queues_overflow_totals_are_exact(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(SCHEMA)
    rows = []
    for q in range(40):
        for k in range(q % 4 + 1):
            kind = f"task{k}"
            rows += [(f"q{q:02d}", kind, "pending", 60.0 * (q + k + 1))] * (q % 3 + 1)
            rows += [(f"q{q:02d}", kind, "scheduled", 0.0)] * (k % 2)
            rows += [(f"q{q:02d}", kind, "retrying", 0.0)] * ((q + k) % 2)
            # running, some for longer than stale_after
            rows += [(f"q{q:02d}", kind, "running", 100.0 * (q % 9) + 7 * k + 3)] * (q % 2 + 1)
    await add_jobs(db, rows)
    poller = poller_for(dsn, max_queues=10, max_kinds_per_queue=3)
    await poller.poll_once()
    samples = scrape(poller)

    exported = exported_queues(samples)
    own = sorted(exported - {OTHER})
    assert OTHER in exported and len(own) == 10, exported
    overflowed = sorted({r[0] for r in rows} - set(own))
    assert len(overflowed) == 30

    everything, other = await truth(db), await truth(db, overflowed)
    for state in LIVE:
        assert total(samples, "jobqueue_jobs", state=state) == everything[state], state
        assert total(samples, "jobqueue_jobs", queue=OTHER, state=state) == other[state], state
        for queue in own:
            assert (
                total(samples, "jobqueue_jobs", queue=queue, state=state)
                == (await truth(db, [queue]))[state]
            ), (queue, state)
    assert other["stale"] > 0
    assert total(samples, "jobqueue_stale_jobs") == everything["stale"]
    assert total(samples, "jobqueue_stale_jobs", queue=OTHER) == other["stale"]
    for metric, expect in (("pending", "pending"), ("running", "running")):
        ages = series(samples, f"jobqueue_oldest_{metric}_age_seconds", queue=OTHER)
        expected = await oldest_age(db, expect, overflowed)
        assert 0 <= expected - max(ages.values()) < 10, (metric, ages, expected)

    # finished jobs of overflowed queues are counted under __other__, exactly
    in_other = await finish(db, "queue = ANY($1) AND id % 2 = 0", overflowed)
    in_own = await finish(db, "queue = $1", own[0])
    assert in_other and in_own
    await poller.poll_once()
    samples = scrape(poller)
    assert exported_queues(samples) == exported, "finishing jobs moved no queue between labels"
    finished = "jobqueue_jobs_finished_total"
    assert total(samples, finished, queue=OTHER, outcome="succeeded") == in_other
    assert total(samples, finished, queue=own[0], outcome="succeeded") == in_own
    assert total(samples, finished, outcome="succeeded") == in_other + in_own
    assert queues_with_series(samples) == exported
    everything = await truth(db)
    for state in LIVE:
        assert total(samples, "jobqueue_jobs", state=state) == everything[state], state


async def test_own_labels_are_stable_across_polls(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(SCHEMA)
    await add_jobs(db, [(f"m{q}", "k", "pending", 10.0) for q in range(8)])
    clock = Clock()
    poller = poller_for(dsn, clock, max_queues=5)
    await poller.poll_once()
    first = exported_queues(scrape(poller))
    assert len(first - {OTHER}) == 5 and OTHER in first
    # much bigger queues that sort first arrive; the ones with a slot keep it while they are active
    for round_ in range(3):
        clock.advance(TTL / 2)
        await add_jobs(db, [(f"a{round_}{q}", "k", "pending", 10.0) for q in range(4)] * 20)
        await poller.poll_once()
        samples = scrape(poller)
        assert exported_queues(samples) == first, round_
        newcomers = [f"a{r}{q}" for r in range(round_ + 1) for q in range(4)]
        overflowed = newcomers + [f"m{q}" for q in range(8) if f"m{q}" not in first]
        assert (
            value(samples, "jobqueue_jobs", queue=OTHER, kind="k", state="pending")
            == (await truth(db, overflowed))["pending"]
        )


async def test_declared_queues_never_overflow_nor_expire(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(SCHEMA)
    declared = [f"d{q}" for q in range(6)]
    await add_jobs(db, [(q, "k", "pending", 10.0) for q in declared + ["other1", "other2"]])
    await add_jobs(db, [("d0", "k", "running", 10.0)])
    clock = Clock()
    poller = poller_for(dsn, clock, queues=declared, max_queues=2)
    await poller.poll_once()
    await finish(db, "queue = 'd0' AND expect = 'running'")
    await poller.poll_once()
    samples = scrape(poller)
    assert exported_queues(samples) == set(declared), "all declared queues, no overflow, no others"
    assert value(samples, "jobqueue_jobs_finished_total", queue="d0", outcome="succeeded") == 1

    await db.execute("DELETE FROM jobs")
    for _ in range(3):
        clock.advance(10 * TTL)
        await poller.poll_once()
    samples = scrape(poller)
    assert exported_queues(samples) == set(declared), "declared keys never expire"
    assert value(samples, "jobqueue_jobs", queue="d3", kind="k", state="pending") == 0
    assert value(samples, "jobqueue_jobs_finished_total", queue="d0", outcome="succeeded") == 1


async def test_three_rounds_of_fresh_queues_leave_only_the_current_ones(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(SCHEMA)
    clock = Clock()
    poller = poller_for(dsn, clock, max_queues=100)
    for round_ in range(3):
        names = [f"r{round_}_q{q}" for q in range(30)]
        await add_jobs(
            db, [(q, "k", state, 5.0) for q in names for state in ("pending", "running")]
        )
        await poller.poll_once()  # the previous round expires here: unseen for 2 x label_ttl
        await finish(db, "expect = 'running'")
        clock.advance(60)
        await poller.poll_once()
        samples = scrape(poller)
        assert exported_queues(samples) == set(names), round_
        assert queues_with_series(samples) == set(names), "counters and ratios expired too"
        assert total(samples, "jobqueue_jobs_finished_total", outcome="succeeded") == 30
        assert len(series(samples, "jobqueue_success_ratio")) == 30
        assert {q for q, _, _ in poller.state.finished} == set(names), "not kept, just unserved"
        assert total(samples, "jobqueue_jobs", state="pending") == (await truth(db))["pending"]
        await db.execute("DELETE FROM jobs")
        clock.advance(2 * TTL)


async def test_expired_slot_goes_to_an_overflowed_queue(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(SCHEMA)
    clock = Clock()
    await add_jobs(db, [(q, "k", "pending", 5.0) for q in ("a", "b", "c")])
    poller = poller_for(dsn, clock, max_queues=2)
    await poller.poll_once()
    samples = scrape(poller)
    assert exported_queues(samples) == {"a", "b", OTHER}
    await db.execute("DELETE FROM jobs WHERE queue = 'a'")
    clock.advance(TTL / 2)
    await poller.poll_once()
    assert exported_queues(scrape(poller)) == {"a", "b", OTHER}, "empty a is kept at 0"
    assert value(scrape(poller), "jobqueue_jobs", queue="a", state="pending") == 0
    clock.advance(TTL / 2 + 1)
    await poller.poll_once()  # a expires
    assert exported_queues(scrape(poller)) == {"b", OTHER}
    await poller.poll_once()  # c takes a's slot
    samples = scrape(poller)
    assert exported_queues(samples) == {"b", "c", OTHER}
    assert value(samples, "jobqueue_jobs", queue="c", state="pending") == 1
    assert value(samples, "jobqueue_jobs", queue=OTHER, state="pending") == 0
    clock.advance(TTL + 1)
    await poller.poll_once()
    assert exported_queues(scrape(poller)) == {"b", "c"}, "__other__ expires like any key"


async def test_recovered_counters_of_expired_keys_are_dropped(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(SCHEMA)
    await add_jobs(db, [("gone", "k", "running", 2 * STALE_AFTER), ("kept", "k", "pending", 5.0)])
    clock = Clock()
    poller = poller_for(
        dsn,
        clock,
        recovery={"enabled": True, "dry_run": False, "hold_for": "60s", "reset_state": "pending"},
    )
    await poller.poll_once()
    assert poller.recoverer is not None
    await poller.recoverer.after_poll(poller._stale_jobs, now=0.0)
    await poller.poll_once()
    assert await poller.recoverer.after_poll(poller._stale_jobs, now=60.0) == "recovered"
    assert value(scrape(poller), "jobqueue_recovered_jobs_total", queue="gone", kind="k") == 1
    await db.execute("DELETE FROM jobs WHERE queue = 'gone'")
    clock.advance(TTL + 1)
    await poller.poll_once()
    samples = scrape(poller)
    assert series(samples, "jobqueue_recovered_jobs_total") == {}
    assert queues_with_series(samples) == {"kept"}


async def test_reserved_names_are_exported_distinctly_and_exactly(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(SCHEMA)
    rows = [("__other__", "k", "pending", 5.0)] * 3
    rows += [("", "k", "pending", 5.0)] * 2
    rows += [(None, "k", "pending", 5.0)] * 6
    rows += [("___other__", "k", "pending", 5.0)] * 7
    rows += [("x", "k", "pending", 5.0)] * 1 + [("y", "k", "pending", 5.0)] * 4
    rows += [("z", "", "pending", 5.0)] * 5 + [("z", "__other__", "pending", 5.0)] * 8
    rows += [("z", None, "pending", 5.0)] * 9
    await add_jobs(db, rows)
    # labels sort as ____other__, ___other__, __empty__, __null__, x, y, z: the first four get a slot
    poller = poller_for(dsn, max_queues=4)
    await poller.poll_once()
    samples = scrape(poller)

    def pending(queue: str, **kind: str) -> float:
        return total(samples, "jobqueue_jobs", queue=queue, state="pending", **kind)

    assert exported_queues(samples) == {"___other__", "____other__", "__empty__", "__null__", OTHER}
    assert pending("___other__") == 3, "the real queue named __other__"
    assert pending("____other__") == 7
    assert pending("__empty__") == 2, 'queue ""'
    assert pending("__null__") == 6, "queue NULL"
    assert pending(OTHER) == 1 + 4 + 5 + 8 + 9, "only x, y and z overflowed"
    assert pending(OTHER, kind="__empty__") == 5
    assert pending(OTHER, kind="___other__") == 8
    assert pending(OTHER, kind="__null__") == 9
    assert pending(OTHER, kind=OTHER) == 0, "no kind overflowed"
    assert total(samples, "jobqueue_jobs", state="pending") == len(rows)
    assert all(v for lbls in series(samples, "jobqueue_jobs") for k, v in lbls if k != "target")


async def test_series_per_target_stay_within_the_documented_bound(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README, Label cardinality: keys <= (max_queues + 1) x (max_kinds_per_queue + 1), per_key = 7 + 3 +
    (outcomes + 1) with terminal states and finished counting on."""
    await db.execute(SCHEMA)
    await add_jobs(
        db,
        [(f"tenant{q:03d}", f"task{k:02d}", "pending", 5.0) for q in range(200) for k in range(30)],
    )
    poller = poller_for(dsn, count_terminal_states=True)
    await poller.poll_once()
    await finish(db, "true")
    await add_jobs(
        db,
        [(f"tenant{q:03d}", f"task{k:02d}", "pending", 5.0) for q in range(200) for k in range(30)],
    )
    await poller.poll_once()
    samples = scrape(poller)
    keyed = {(name, labels) for (name, labels) in samples if {"queue", "kind"} <= set(dict(labels))}
    keys = {(dict(labels)["queue"], dict(labels)["kind"]) for _, labels in keyed}
    assert len(keys) == (15 + 1) * (20 + 1) == 336
    outcomes = len(poller.source.preset.outcomes)
    per_key = 7 + 3 + outcomes + 1
    assert per_key == 16, "generic with attempts: succeeded, failed, dead, cancelled, retried"
    assert len(keyed) == len(keys) * per_key
    assert sum(1 for (name, labels) in keyed if ("queue", "tenant000") in labels) == 21 * per_key
    assert total(samples, "jobqueue_jobs", state="pending") == 200 * 30
    assert total(samples, "jobqueue_jobs_finished_total", outcome="succeeded") == 200 * 30
