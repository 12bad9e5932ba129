#!/usr/bin/env python
"""What does a scrape cost at the exporter's HTTP edge?

Loads N Procrastinate databases whose jobs are spread over Q queues x K task names (Q=20, K=21 gives
about 5,000 series per target), runs the real exporter as a separate process
(``jobqueue-exporter run``), and measures it from the outside: series count and body size, sequential
/metrics latency, a storm of C concurrent scrapers (``wrk`` when installed, else a multi-process aiohttp
client) with /healthz probed every 50 ms, the poll duration during the storm, and the exporter
process's RSS and CPU. A second scenario runs 10 targets with 2 scrapers. Every measurement is printed
next to its budget with PASS/FAIL.

    .venv/bin/python bench/scrape.py [--targets N] [--queues Q] [--kinds K] [--concurrency C]
                                     [--duration S] [--json out.json] [--strict]

Everything listens on 127.0.0.1 and stops by itself. See bench/README.md ("Scrape cost").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import http.client
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
TEMPLATE_DB = "jq_scrape_tpl"
POLL_INTERVAL_S = 5.0
IDLE_S = 5.0  # idle window before a storm: one poll interval, so idle CPU includes one poll
POST_S = 5.0  # observation after a storm (CPU drain, RSS after)
SAMPLE_S = 0.1  # RSS/CPU sampling period
HEALTHZ_EVERY_S = 0.05
PROBE_TIMEOUT_S = 5.0  # a /healthz probe slower than this counts as an error (and as 5 s)
WATCH_EVERY_S = 2.0  # /metrics read for the poll-duration gauge during a storm (< poll interval)
READY_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Budgets (see bench/README.md)
SEQ_P50_MS = 15.0
STORM_METRICS_P99_MS = 500.0
STORM_HEALTHZ_P99_MS = 250.0
POLL_MAX_S = 2.0
STORM_RSS_GROWTH_MIB = 60.0
CPU_IDLE_TOLERANCE_PCT = 5.0  # "back to idle": within 5 percentage points of one core of idle
MULTI_P99_MS = 300.0
MULTI_RSS_MIB = 200.0

# Series per (queue, kind): jobqueue_jobs x 4 live states, oldest pending/running age, stale jobs,
# jobs_finished x 4 Procrastinate outcomes, success ratio. Plus 7 per target and 1 build info.
SERIES_PER_PAIR = 12
SERIES_PER_TARGET = 7

# What Prometheus 2.x sends by default (OpenMetrics preferred); informational only
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;"
    "q=0.4,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {\"requests\": %.0f, \"duration_us\": %.0f, \"bytes\": %.0f, \"connect\": %.0f, " ..
    "\"read\": %.0f, \"write\": %.0f, \"status\": %.0f, \"timeout\": %.0f, \"p50_us\": %.0f, " ..
    "\"p90_us\": %.0f, \"p99_us\": %.0f, \"max_us\": %.0f, \"mean_us\": %.1f}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# -- data -------------------------------------------------------------------------------------------

# Per (queue, task) pair: 3 pending, 1 scheduled, 1 retrying, 1 running job, and 6 jobs that finished
# in the last 2 minutes (4 succeeded, 1 failed, 1 cancelled), so every series exists, the success ratio
# included. Rows are inserted directly; the insert trigger writes the `deferred` events of `todo` rows.
_PAIRS = """
SELECT format('queue_%s', lpad(q::text, 2, '0')) AS queue,
       format('app.tasks.task_%s', lpad(k::text, 2, '0')) AS task, q * $2::int + k AS n
FROM generate_series(0, $1::int - 1) AS q, generate_series(0, $2::int - 1) AS k
"""

_LOAD = [
    # todo: pending (due now), scheduled (future, first attempt), retrying (future, attempts > 0)
    f"""
    INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at, attempts)
    SELECT p.queue, p.task, jsonb_build_object('n', p.n, 'i', i),
           CASE WHEN i <= 3 THEN NULL WHEN i = 4 THEN now() + interval '2 hours'
                ELSE now() + interval '1 hour' END,
           CASE WHEN i = 5 THEN 1 ELSE 0 END
    FROM ({_PAIRS}) AS p, generate_series(1, 5) AS i
    """,
    # the waiting jobs piled up over the last 10 minutes
    """
    UPDATE procrastinate_events SET at = now() - make_interval(secs => 30 + job_id % 570)
    WHERE type = 'deferred'
    """,
    """INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now())""",
    # running, held by that worker
    f"""
    WITH j AS (
        INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts, worker_id)
        SELECT p.queue, p.task, jsonb_build_object('n', p.n), 'doing', 0,
               (SELECT max(id) FROM procrastinate_workers)
        FROM ({_PAIRS}) AS p
        RETURNING id
    )
    INSERT INTO procrastinate_events (job_id, type, at)
    SELECT j.id, v.type, v.at FROM j CROSS JOIN LATERAL (
        VALUES ('deferred'::procrastinate_job_event_type, now() - interval '90 seconds'),
               ('started'::procrastinate_job_event_type, now() - make_interval(secs => 5 + j.id % 55))
    ) AS v(type, at)
    """,
    # finished in the last 2 minutes: 4 succeeded, 1 failed, 1 cancelled per pair
    f"""
    WITH j AS (
        INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)
        SELECT p.queue, p.task, jsonb_build_object('n', p.n, 'i', i),
               CASE WHEN i <= 4 THEN 'succeeded' WHEN i = 5 THEN 'failed' ELSE 'cancelled' END
                   ::procrastinate_job_status,
               CASE WHEN i = 6 THEN 0 ELSE 1 END
        FROM ({_PAIRS}) AS p, generate_series(1, 6) AS i
        RETURNING id, status
    )
    INSERT INTO procrastinate_events (job_id, type, at)
    SELECT j.id, v.type, v.at FROM j CROSS JOIN LATERAL (
        VALUES (1, 'deferred'::procrastinate_job_event_type,
                now() - make_interval(secs => 20 + j.id % 100) - interval '3 seconds'),
               (2, CASE WHEN j.status = 'cancelled' THEN NULL
                        ELSE 'started'::procrastinate_job_event_type END,
                now() - make_interval(secs => 20 + j.id % 100) - interval '1 second'),
               (3, j.status::text::procrastinate_job_event_type,
                now() - make_interval(secs => 20 + j.id % 100))
    ) AS v(n, type, at)
    WHERE v.type IS NOT NULL
    ORDER BY j.id, v.n
    """,
]


def with_database(dsn: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def build_databases(admin_dsn: str, count: int, queues: int, kinds: int) -> list[str]:
    """A loaded template database, copied ``count`` times; returns the copies' DSNs."""
    import asyncpg
    import procrastinate

    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    tpl = with_database(admin_dsn, TEMPLATE_DB)
    # procrastinate warns that an App is created in __main__; harmless here (no tasks, no worker)
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=tpl))
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    conn = await asyncpg.connect(tpl, server_settings={"synchronous_commit": "off"})
    try:
        async with conn.transaction():
            for sql in _LOAD:
                if "$1" in sql:
                    await conn.execute(sql, queues, kinds)
                else:
                    await conn.execute(sql)
        await conn.execute("VACUUM (ANALYZE)")
        rows = await conn.fetch(
            "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1 ORDER BY 1"
        )
        log("per target: " + ", ".join(f"{r[0]} {r[1]:,}" for r in rows) + " jobs")
    finally:
        await conn.close()
    admin = await asyncpg.connect(admin_dsn)
    names = [f"jq_scrape_{i:02d}" for i in range(count)]
    try:
        for name in names:
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    return [with_database(admin_dsn, name) for name in names]


# -- the exporter process ---------------------------------------------------------------------------


def exporter_binary() -> str:
    local = Path(sys.executable).parent / "jobqueue-exporter"
    if local.exists():
        return str(local)
    found = shutil.which("jobqueue-exporter")
    if not found:
        sys.exit("error: jobqueue-exporter is not installed in this environment")
    return found


def _has_cardinality_caps(source: Path | None) -> bool:
    """Whether the exporter to run knows max_queues (older commits reject unknown keys)."""
    root = source if source is not None else Path(__file__).resolve().parent.parent
    config = root / "exporter" / "jobqueue_exporter" / "config.py"
    return config.is_file() and "max_queues" in config.read_text()


class ExporterProcess:
    def __init__(self, workdir: Path, dsns: list[str], tag: str, source: Path | None = None):
        self.port = free_port()
        self.source = source
        self.config = workdir / f"{tag}.yaml"
        self.logfile = workdir / f"{tag}.log"
        target: dict = {"preset": "procrastinate"}
        if _has_cardinality_caps(source):
            # the measured shape (e.g. 20 queues x 21 kinds) must not be folded into __other__
            target.update(max_queues=10_000, max_kinds_per_queue=10_000)
        config = {
            "poll_interval": POLL_INTERVAL_S,
            "log_level": "warning",
            "targets": [
                {"name": f"bench-{i:02d}", "dsn": dsn, **target} for i, dsn in enumerate(dsns)
            ],
        }
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ)
        if self.source is not None:
            # ahead of the editable install's path entry: this tree's package is the one imported
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.source / "exporter"), *filter(None, [env.get("PYTHONPATH")])]
            )
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    exporter_binary(),
                    "run",
                    "--config",
                    str(self.config),
                    "--listen",
                    f"{HOST}:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"exporter exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def wait_ready(self, n_targets: int, pairs: int) -> float:
        """Until /readyz is 200 and /metrics has every target's job and success-ratio series."""
        started = time.monotonic()
        want_jobs, want_ratio = n_targets * pairs * 4, n_targets * pairs
        seen = ""
        while time.monotonic() - started < READY_TIMEOUT_S:
            self.check_alive()
            try:
                status, _, _, _ = get(self.port, "/readyz", timeout=5)
                if status == 200:
                    _, _, body, _ = get(self.port, "/metrics", timeout=REQUEST_TIMEOUT_S)
                    jobs = len(re.findall(rb"^jobqueue_jobs\{", body, re.M))
                    ratio = len(re.findall(rb"^jobqueue_success_ratio\{", body, re.M))
                    seen = f"{jobs} jobqueue_jobs, {ratio} jobqueue_success_ratio series"
                    if jobs == want_jobs and ratio == want_ratio:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        tail = self.logfile.read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"exporter not ready within {READY_TIMEOUT_S:.0f}s (want {want_jobs} jobqueue_jobs and"
            f" {want_ratio} jobqueue_success_ratio series; last seen: {seen or 'nothing'});"
            f" its log:\n{tail}"
        )


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, utime + stime in clock ticks) of the process, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(match.group(1)) if match else 0), int(fields[11]) + int(fields[12])


class Sampler(threading.Thread):
    """RSS and CPU ticks of the exporter every SAMPLE_S, for its whole life."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, rss KiB, cpu ticks)
        self.stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            sample = proc_sample(self.pid)
            if sample is None:
                return
            self.samples.append((time.monotonic(), *sample))
            next_at += SAMPLE_S
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def between(self, t0: float, t1: float) -> list[tuple[float, int, int]]:
        return [s for s in list(self.samples) if t0 <= s[0] <= t1]

    def at(self, t: float) -> tuple[float, int, int]:
        """The sample nearest to t."""
        return min(list(self.samples), key=lambda s: abs(s[0] - t))

    def cpu_pct(self, t0: float, t1: float) -> float:
        """CPU of the exporter between t0 and t1, in percent of one core."""
        a, b = self.at(t0), self.at(t1)
        if b[0] <= a[0]:
            return math.nan
        return (b[2] - a[2]) / CLK_TCK / (b[0] - a[0]) * 100

    def rss_mib(self, t0: float, t1: float, how: str) -> float:
        values = [s[1] / 1024 for s in self.between(t0, t1)]
        if not values:
            return math.nan
        return max(values) if how == "max" else statistics.median(values)


# -- HTTP clients -----------------------------------------------------------------------------------


def get(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, str], bytes, float]:
    """One GET: (status, headers, body as received, seconds to the last byte)."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        started = time.perf_counter()
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - started
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, elapsed
    finally:
        if own:
            conn.close()


def sequential(port: int, headers: dict[str, str], requests: int) -> dict[str, Any]:
    """``requests`` back-to-back GET /metrics on one keep-alive connection (after 5 warm-up)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    latencies, errors, size, encoding = [], 0, 0, ""
    try:
        for i in range(5 + requests):
            status, hdrs, body, elapsed = get(port, "/metrics", headers, conn=conn)
            if i < 5:
                continue
            if status != 200:
                errors += 1
            latencies.append(elapsed * 1000)
            size, encoding = len(body), hdrs.get("content-encoding", "")
    finally:
        conn.close()
    return {
        "requests": requests,
        "errors": errors,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
        "max_ms": max(latencies),
        "bytes_received": size,
        "content_encoding": encoding or "none",
    }


class HealthzProber(threading.Thread):
    """GET /healthz every 50 ms on a fresh connection (as a kubelet probe does) until ``until``."""

    def __init__(self, port: int, until: float):
        super().__init__(daemon=True)
        self.port, self.until = port, until
        self.latencies: list[float] = []
        self.errors = 0

    def run(self) -> None:
        while (start := time.monotonic()) < self.until:
            try:
                status, _, _, elapsed = get(self.port, "/healthz", timeout=PROBE_TIMEOUT_S)
                self.latencies.append(elapsed * 1000)
                if status != 200:
                    self.errors += 1
            except OSError:
                self.errors += 1
                self.latencies.append(PROBE_TIMEOUT_S * 1000)
            time.sleep(max(0.0, start + HEALTHZ_EVERY_S - time.monotonic()))


_POLL_LINE = re.compile(
    rb'^jobqueue_(poll_duration_seconds|last_poll_success_timestamp_seconds)\{target="([^"]*)"'
    rb"[^}]*\} (\S+)$",
    re.M,
)
_ERRORS_LINE = re.compile(rb"^jobqueue_poll_errors_total\{[^}]*\} (\S+)$", re.M)


def poll_gauges(body: bytes) -> dict[str, tuple[float, float]]:
    """target -> (last successful poll's end as Unix time, its duration in seconds)."""
    found: dict[str, dict[bytes, float]] = {}
    for name, target, value in _POLL_LINE.findall(body):
        found.setdefault(target.decode(), {})[name] = float(value)
    return {
        t: (v[b"last_poll_success_timestamp_seconds"], v[b"poll_duration_seconds"])
        for t, v in found.items()
        if len(v) == 2
    }


def poll_errors(body: bytes) -> float:
    return sum(float(v) for v in _ERRORS_LINE.findall(body))


class PollWatcher(threading.Thread):
    """Reads /metrics every WATCH_EVERY_S until ``until`` and keeps every poll it sees."""

    def __init__(self, port: int, until: float):
        super().__init__(daemon=True)
        self.port, self.until = port, until
        self.polls: set[tuple[str, float, float]] = set()  # (target, end unix time, duration)
        self.failed_reads = 0
        self.reads = 0

    def add(self, body: bytes) -> None:
        for target, (end, duration) in poll_gauges(body).items():
            self.polls.add((target, end, duration))

    def run(self) -> None:
        while (start := time.monotonic()) < self.until:
            try:
                self.add(get(self.port, "/metrics", timeout=REQUEST_TIMEOUT_S)[2])
                self.reads += 1
            except (OSError, http.client.HTTPException):
                self.failed_reads += 1
            time.sleep(max(0.0, min(start + WATCH_EVERY_S, self.until) - time.monotonic()))


# -- load generators --------------------------------------------------------------------------------


def run_wrk(
    wrk: str, port: int, concurrency: int, duration: float, workdir: Path
) -> dict[str, Any]:
    script = workdir / "report.lua"
    script.write_text(WRK_LUA)
    cmd = [
        wrk,
        f"-t{min(2, concurrency)}",
        f"-c{concurrency}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-H",
        "Accept-Encoding: gzip",
        "-s",
        str(script),
        f"http://{HOST}:{port}/metrics",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no report (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    r = json.loads(line.removeprefix("WRK_JSON "))
    errors = {k: int(r[k]) for k in ("connect", "read", "write", "status", "timeout")}
    return {
        "tool": "wrk",
        "requests": int(r["requests"]),
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000,
        "mean_ms": r["mean_us"] / 1000,
    }


async def _loadgen_async(url: str, connections: int, duration: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=connections)
    headers = {"Accept-Encoding": "gzip"}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                            continue
                    latencies.append((time.perf_counter() - started) * 1000)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return {"latencies_ms": latencies, "errors": errors}


def run_aiohttp_loadgen(port: int, concurrency: int, duration: float) -> dict[str, Any]:
    """Fallback without wrk: 2 client processes, each with half of the connections."""
    procs = []
    shares = [concurrency // 2 + concurrency % 2, concurrency // 2] if concurrency > 1 else [1]
    for share in shares:
        if share:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "_loadgen",
                        f"http://{HOST}:{port}/metrics",
                        str(share),
                        str(duration),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
    latencies: list[float] = []
    errors = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=duration + 60)
        r = json.loads(out)
        latencies += r["latencies_ms"]
        errors += r["errors"]
    return {
        "tool": "aiohttp (2 processes)",
        "requests": len(latencies) + errors,
        "errors": errors,
        "errors_by_kind": {},
        "rps": len(latencies) / duration,
        "p50_ms": pct(latencies, 50),
        "p90_ms": pct(latencies, 90),
        "p99_ms": pct(latencies, 99),
        "max_ms": max(latencies, default=math.nan),
        "mean_ms": statistics.fmean(latencies) if latencies else math.nan,
    }


# -- scenarios --------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    targets: int
    concurrency: int
    duration: float
    series: int = 0
    body_bytes: int = 0
    gzip6_bytes: int = 0
    served_gzip_bytes: int = 0  # the body served to Accept-Encoding: gzip, as sent
    served_encoding: str = ""
    ready_s: float = 0.0
    rss_ready_mib: float = 0.0
    idle_rss_mib: float = 0.0
    idle_cpu_pct: float = 0.0
    sequential: dict[str, dict[str, Any]] = field(default_factory=dict)
    storm: dict[str, Any] = field(default_factory=dict)
    healthz: dict[str, Any] = field(default_factory=dict)
    polls: dict[str, Any] = field(default_factory=dict)
    storm_cpu_pct: float = 0.0
    peak_rss_mib: float = 0.0
    after_rss_mib: float = 0.0
    after_cpu_pct: float = 0.0
    settled_after_s: float | None = None
    budgets: list[dict[str, Any]] = field(default_factory=list)

    def budget(self, what: str, measured: float, limit: float, unit: str, skip: str = "") -> None:
        """A measurement against its budget; NaN fails, unless ``skip`` says why it is n/a."""
        ok = bool(skip) or (not math.isnan(measured) and measured <= limit)
        self.budgets.append(
            {
                "what": what,
                "measured": measured,
                "budget": limit,
                "unit": unit,
                "ok": ok,
                "skipped": skip,
            }
        )


def measure_body(sc: Scenario, port: int) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body, _ = get(port, "/metrics", {"Accept-Encoding": "identity"})
    assert status == 200, status
    sc.series = sum(len(f.samples) for f in text_string_to_metric_families(body.decode()))
    sc.body_bytes = len(body)
    sc.gzip6_bytes = len(gzip.compress(body, compresslevel=6))
    _, headers, served, _ = get(port, "/metrics", {"Accept-Encoding": "gzip"})
    sc.served_gzip_bytes = len(served)
    sc.served_encoding = headers.get("content-encoding", "none")


def run_storm(
    sc: Scenario, exporter: ExporterProcess, sampler: Sampler, wrk: str | None, workdir: Path
) -> None:
    port = exporter.port
    before = get(port, "/metrics")[2]
    errors_before = poll_errors(before)
    log(f"{sc.name}: idle {IDLE_S:g}s")
    t_idle = time.monotonic()
    time.sleep(IDLE_S)
    t0 = time.monotonic()
    sc.idle_cpu_pct = sampler.cpu_pct(t_idle, t0)
    sc.idle_rss_mib = sampler.rss_mib(t_idle, t0, "median")
    log(f"{sc.name}: {sc.concurrency} concurrent scrapers for {sc.duration:g}s")
    t_end = t0 + sc.duration
    wall0 = time.time()
    prober, watcher = HealthzProber(port, t_end), PollWatcher(port, t_end)
    watcher.add(before)
    prober.start()
    watcher.start()
    if wrk:
        sc.storm = run_wrk(wrk, port, sc.concurrency, sc.duration, workdir)
    else:
        sc.storm = run_aiohttp_loadgen(port, sc.concurrency, sc.duration)
    t_done = time.monotonic()
    # the probers stop at t_end; wait for a probe in flight (never scrape during the drain window)
    prober.join(PROBE_TIMEOUT_S + 1)
    watcher.join(REQUEST_TIMEOUT_S + 1)
    # one read just after the 1 s CPU window catches a poll that ended after the watcher's last read
    time.sleep(max(0.0, t_done + 1.05 - time.monotonic()))
    watcher.add(get(port, "/metrics")[2])
    time.sleep(max(0.0, max(t_end + POST_S, t_done + 1.5) - time.monotonic()))
    exporter.check_alive()
    sc.storm["load_generator_exit_s_after_end"] = t_done - t_end
    sc.storm_cpu_pct = sampler.cpu_pct(t0, t_end)
    sc.peak_rss_mib = sampler.rss_mib(t0, t_end, "max")
    sc.after_rss_mib = sampler.at(t_end + POST_S)[1] / 1024
    # "after" starts when the load generator has exited (its last connection is closed by then)
    sc.after_cpu_pct = sampler.cpu_pct(t_done, t_done + 1.0)
    threshold = sc.idle_cpu_pct + CPU_IDLE_TOLERANCE_PCT
    sc.settled_after_s = None
    k = 0.0
    while t_done + k + 0.5 <= t_end + POST_S + 1e-6:
        if sampler.cpu_pct(t_done + k, t_done + k + 0.5) <= threshold:
            sc.settled_after_s = k
            break
        k += 0.25
    sc.healthz = {
        "probes": len(prober.latencies),
        "errors": prober.errors,
        "p50_ms": pct(prober.latencies, 50),
        "p99_ms": pct(prober.latencies, 99),
        "max_ms": max(prober.latencies, default=math.nan),
    }
    after = get(port, "/metrics")[2]
    wall_after = time.time()
    watcher.add(after)
    wall_end = wall0 + sc.duration
    # Slip: the longest gap between two successive polls of a target around the storm, minus the
    # interval. A poll that is due but cannot start (the event loop is busy) leaves the gauge at
    # its last, fast value: only the gap shows it. The read after the storm closes the last gap (a
    # lower bound when no poll completed since). Reads are < 5 s apart, so no poll is missed.
    slip = 0.0
    for target in {t for t, _, _ in watcher.polls}:
        ends = sorted(end for t, end, _ in watcher.polls if t == target) + [wall_after]
        for a, b in itertools.pairwise(ends):
            if b > wall0 and a < wall_end:
                slip = max(slip, b - a - POLL_INTERVAL_S)
    # polls that overlapped the storm: started before its end, ended after its start
    during = [(t, end, d) for t, end, d in watcher.polls if end - d < wall_end and end > wall0]
    sc.polls = {
        "polls_seen": len(during),
        "max_s": max((d for _, _, d in during), default=math.nan),
        "median_s": statistics.median([d for _, _, d in during]) if during else math.nan,
        "slip_s": slip,
        "poll_errors": poll_errors(after) - errors_before,
        "metrics_reads": watcher.reads,
        "metrics_reads_failed": watcher.failed_reads,
        # every poll seen: (target, end relative to the storm's start, duration), seconds
        "seen": sorted((t, round(end - wall0, 3), round(d, 3)) for t, end, d in watcher.polls),
    }


def run_scenario(
    sc: Scenario,
    dsns: list[str],
    pairs: int,
    workdir: Path,
    wrk: str | None,
    requests: int,
    source: Path | None,
) -> None:
    exporter = ExporterProcess(workdir, dsns, sc.name, source)
    exporter.start()
    sampler = Sampler(exporter.pid)
    sampler.start()
    try:
        sc.ready_s = exporter.wait_ready(sc.targets, pairs)
        measure_body(sc, exporter.port)
        sc.rss_ready_mib = sampler.samples[-1][1] / 1024
        log(
            f"{sc.name}: ready after {sc.ready_s:.1f}s, {sc.series:,} series,"
            f" {sc.body_bytes:,} bytes"
        )
        if requests:
            variants = {
                "text, Accept-Encoding: gzip": {"Accept-Encoding": "gzip"},
                "text, no compression": {"Accept-Encoding": "identity"},
                "OpenMetrics Accept + gzip": {
                    "Accept": PROMETHEUS_ACCEPT,
                    "Accept-Encoding": "gzip",
                },
            }
            for label, headers in variants.items():
                log(f"{sc.name}: {requests} sequential scrapes, {label}")
                sc.sequential[label] = sequential(exporter.port, headers, requests)
        run_storm(sc, exporter, sampler, wrk, workdir)
    finally:
        sampler.stop_event.set()
        exporter.stop()
        sampler.join(2)


def check_storm_budgets(sc: Scenario) -> None:
    for label in ("text, Accept-Encoding: gzip", "text, no compression"):
        if label in sc.sequential:
            p50 = sc.sequential[label]["p50_ms"]
            sc.budget(f"sequential /metrics p50 ({label})", p50, SEQ_P50_MS, "ms")
    sc.budget("storm /metrics p99", sc.storm["p99_ms"], STORM_METRICS_P99_MS, "ms")
    sc.budget("storm /metrics errors", sc.storm["errors"], 0, "")
    sc.budget("storm /healthz p99", sc.healthz["p99_ms"], STORM_HEALTHZ_P99_MS, "ms")
    seen = sc.polls["polls_seen"]
    sc.budget(
        f"poll duration max during storm ({seen} poll(s) overlapped it)",
        sc.polls["max_s"],
        POLL_MAX_S,
        "s",
        skip="storm shorter than the poll interval, no poll was due"
        if not seen and sc.duration < POLL_INTERVAL_S
        else "",
    )
    sc.budget(
        f"poll slip during storm (longest gap between polls - {POLL_INTERVAL_S:g} s)",
        sc.polls["slip_s"],
        POLL_MAX_S,
        "s",
    )
    sc.budget(
        f"RSS peak during storm (idle {sc.idle_rss_mib:.1f} + {STORM_RSS_GROWTH_MIB:g})",
        sc.peak_rss_mib,
        sc.idle_rss_mib + STORM_RSS_GROWTH_MIB,
        "MiB",
    )
    sc.budget(
        f"CPU in the 1 s after the storm (idle {sc.idle_cpu_pct:.1f}% + {CPU_IDLE_TOLERANCE_PCT:g})",
        sc.after_cpu_pct,
        sc.idle_cpu_pct + CPU_IDLE_TOLERANCE_PCT,
        "%",
    )


def check_multi_budgets(sc: Scenario) -> None:
    sc.budget("/metrics p99", sc.storm["p99_ms"], MULTI_P99_MS, "ms")
    sc.budget("/metrics errors", sc.storm["errors"], 0, "")
    sc.budget("RSS peak", sc.peak_rss_mib, MULTI_RSS_MIB, "MiB")


# -- reporting --------------------------------------------------------------------------------------


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_scenario(sc: Scenario) -> None:
    print(
        f"\n== {sc.name}: {sc.targets} target(s), {sc.concurrency} concurrent scraper(s) for"
        f" {sc.duration:g}s =="
    )
    rows: list[tuple[str, str]] = [
        ("series (parsed samples)", fmt(sc.series)),
        ("body bytes, plain", fmt(sc.body_bytes)),
        ("body bytes, gzip -6 of it", fmt(sc.gzip6_bytes)),
        (
            "body bytes served to Accept-Encoding: gzip",
            f"{fmt(sc.served_gzip_bytes)} (Content-Encoding: {sc.served_encoding})",
        ),
        ("ready after (s)", fmt(sc.ready_s)),
        ("RSS at ready (MiB)", fmt(sc.rss_ready_mib)),
    ]
    for label, r in sc.sequential.items():
        rows.append(
            (
                f"sequential ({label}): p50 / p99 / max ms",
                f"{fmt(r['p50_ms'])} / {fmt(r['p99_ms'])} / {fmt(r['max_ms'])}"
                f"  ({fmt(r['bytes_received'])} B, Content-Encoding: {r['content_encoding']},"
                f" {r['errors']} errors)",
            )
        )
    s, h, p = sc.storm, sc.healthz, sc.polls
    rows += [
        ("idle: RSS MiB / CPU % of a core", f"{fmt(sc.idle_rss_mib)} / {fmt(sc.idle_cpu_pct)}"),
        (
            f"storm /metrics ({s['tool']}): p50 / p90 / p99 / max ms",
            f"{fmt(s['p50_ms'])} / {fmt(s['p90_ms'])} / {fmt(s['p99_ms'])} / {fmt(s['max_ms'])}",
        ),
        (
            "storm /metrics: requests, req/s, errors",
            f"{fmt(s['requests'])}, {fmt(s['rps'])}, {s['errors']} {s.get('errors_by_kind') or ''}",
        ),
        (
            "storm /healthz every 50 ms: p50 / p99 / max ms",
            f"{fmt(h['p50_ms'])} / {fmt(h['p99_ms'])} / {fmt(h['max_ms'])}"
            f"  ({h['probes']} probes, {h['errors']} errors)",
        ),
        (
            "polls during storm: seen, median / max s",
            f"{p['polls_seen']}, {fmt(p['median_s'], 3)} / {fmt(p['max_s'], 3)}"
            f"  ({fmt(p['poll_errors'], 0)} poll errors)",
        ),
        ("poll slip: longest gap between polls - interval (s)", fmt(p["slip_s"], 2)),
        ("CPU during storm (% of a core)", fmt(sc.storm_cpu_pct)),
        ("RSS peak during storm (MiB)", fmt(sc.peak_rss_mib)),
        (f"RSS {POST_S:g}s after storm (MiB)", fmt(sc.after_rss_mib)),
        ("CPU in the 1 s after storm (% of a core)", fmt(sc.after_cpu_pct)),
        (
            "CPU back to idle (0.5 s window) after",
            f"{sc.settled_after_s:.2f} s"
            if sc.settled_after_s is not None
            else f"> {POST_S - 0.5:g} s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    print()
    for b in sc.budgets:
        unit = f" {b['unit']}" if b["unit"] else ""
        nd = 3 if b["unit"] == "s" else 1
        measured, limit = (
            (fmt(float(b["measured"]), nd), fmt(float(b["budget"]), nd))
            if unit
            else (fmt(int(b["measured"])), fmt(int(b["budget"])))
        )
        verdict = "SKIP" if b["skipped"] else "PASS" if b["ok"] else "FAIL"
        print(
            f"  {verdict}: {b['what']}: {measured}{unit} (budget <= {limit}{unit})"
            + (f" ({b['skipped']})" if b["skipped"] else "")
        )


# -- main -------------------------------------------------------------------------------------------


def no_nan(value: Any) -> Any:
    """NaN (nothing measured) as null: the JSON file stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def describe_code(source: Path | None) -> str:
    if source is not None:
        return f"source tree {source}"
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "exporter"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "installed package"
    return f"installed package, {repo} at {head or '?'}" + (
        " with uncommitted changes under exporter/" if dirty else ""
    )


async def prepare(args: argparse.Namespace, server: Any) -> list[str]:
    count = max(args.targets, args.multi_targets)
    started = time.perf_counter()
    dsns = await build_databases(server.dsn(), count, args.queues, args.kinds)
    log(f"{count} target database(s) ready in {time.perf_counter() - started:.1f}s")
    return dsns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    load_start = os.getloadavg()
    from jobqueue_exporter.embedded import EmbeddedPostgres

    wrk = None if args.no_wrk else shutil.which("wrk")
    log(f"load generator: {wrk or 'aiohttp (wrk not found; Debian: apt-get install wrk)'}")
    pairs = args.queues * args.kinds
    expected = SERIES_PER_PAIR * pairs + SERIES_PER_TARGET + 1  # + build info
    log(f"{args.queues} queues x {args.kinds} kinds: about {expected:,} series per target")
    code = describe_code(args.source)
    log(f"exporter code: {code}")
    server = EmbeddedPostgres().start()
    log(f"embedded PostgreSQL on {server.dsn()}")
    workdir = Path(tempfile.mkdtemp(prefix="jq-scrape-"))
    scenarios: list[Scenario] = []
    try:
        dsns = asyncio.run(prepare(args, server))
        main_sc = Scenario("storm", args.targets, args.concurrency, args.duration)
        run_scenario(main_sc, dsns[: args.targets], pairs, workdir, wrk, args.requests, args.source)
        check_storm_budgets(main_sc)
        scenarios.append(main_sc)
        if args.multi_targets:
            multi = Scenario("multi", args.multi_targets, args.multi_concurrency, args.duration)
            run_scenario(multi, dsns[: args.multi_targets], pairs, workdir, wrk, 0, args.source)
            check_multi_budgets(multi)
            scenarios.append(multi)
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\n{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs, python"
        f" {platform.python_version()}, {args.queues} queues x {args.kinds} kinds per target,"
        f" poll_interval {POLL_INTERVAL_S:g}s"
    )
    print(f"exporter code: {code}")
    for sc in scenarios:
        print_scenario(sc)
    ok = all(b["ok"] for sc in scenarios for b in sc.budgets)
    runtime = time.perf_counter() - began
    load_end = os.getloadavg()
    print(
        "load average (1/5/15 min) at start "
        + "/".join(f"{x:.2f}" for x in load_start)
        + ", at end "
        + "/".join(f"{x:.2f}" for x in load_end)
        + " (other processes on this machine skew every timing)"
    )
    print(f"\n{'all budgets met' if ok else 'some budgets FAILED'}; total runtime {runtime:.0f}s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                no_nan(
                    {
                        "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "args": vars(args),
                        "exporter_code": code,
                        "runtime_s": runtime,
                        "loadavg_start": load_start,
                        "loadavg_end": load_end,
                        "scenarios": [asdict(sc) for sc in scenarios],
                    }
                ),
                indent=2,
                default=str,
            )
        )
    return 1 if (args.strict and not ok) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=1, help="targets in the storm (default 1)")
    parser.add_argument("--queues", type=int, default=20, help="queues per target (default 20)")
    parser.add_argument("--kinds", type=int, default=21, help="task names per queue (default 21)")
    parser.add_argument(
        "--concurrency", type=int, default=50, help="concurrent scrapers in the storm (default 50)"
    )
    parser.add_argument(
        "--duration", type=float, default=15.0, help="seconds of each storm (default 15)"
    )
    parser.add_argument(
        "--requests", type=int, default=200, help="sequential scrapes per variant (default 200)"
    )
    parser.add_argument(
        "--multi-targets",
        type=int,
        default=10,
        help="targets of the second scenario; 0 skips it (default 10)",
    )
    parser.add_argument(
        "--multi-concurrency",
        type=int,
        default=2,
        help="concurrent scrapers of the second scenario (default 2)",
    )
    parser.add_argument("--no-wrk", action="store_true", help="use the aiohttp load generator")
    parser.add_argument(
        "--source",
        type=Path,
        help="run the exporter from this source tree (its exporter/ directory goes first on"
        " PYTHONPATH), e.g. an export of one commit: git archive HEAD exporter | tar -x -C DIR"
        " (default: the installed package)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a budget is missed")
    args = parser.parse_args(argv)
    for name in ("targets", "queues", "kinds", "concurrency", "multi_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.multi_targets < 0 or args.requests < 0:
        parser.error("--multi-targets and --requests must not be negative")
    if not 1 <= args.duration <= 300:
        parser.error("--duration must be between 1 and 300 seconds")
    if args.source is not None and not (args.source / "exporter" / "jobqueue_exporter").is_dir():
        parser.error(f"--source {args.source}: no exporter/jobqueue_exporter in it")
    return args


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_loadgen":  # internal: one aiohttp client process
        result = asyncio.run(_loadgen_async(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
