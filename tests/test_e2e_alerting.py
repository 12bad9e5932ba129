"""End to end: database -> exporter -> Prometheus -> Alertmanager -> webhook, with the shipped alert rules.

One stack for the module, all on 127.0.0.1: PostgreSQL databases with Procrastinate's schema, the real
exporter (in process), real ``prometheus`` evaluating rules generated from ``alerts/jobqueue-alerts.yaml``
with time compressed (``e2e_rules``), real ``prometheus-alertmanager`` and a webhook receiver in this
process. Each test drives the database into a state and waits for the alert - and its resolution - to
arrive at the webhook with the labels and annotations an on-call engineer would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis
import yaml
from aiohttp import web
from e2e_rules import fast_rules, parse_duration
from helpers import (
    create_database,
    drop_database,
    make_config,
    redis_url_for,
    require_binary,
    wait_for,
    with_database,
)
from jobqueue_exporter.exporter import Exporter
from procrastinate_app import apply_schema, make_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "jobqueue-alerts.yaml"
JOB = "jobqueue-exporter"  # the scrape job name the shipped rules select
TIME_FACTOR = 60  # 10m -> 10s, 1h -> 60s, "> 600" seconds -> "> 10"
TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Webhook:
    """Alertmanager webhook receiver: records every notification payload, in arrival order."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _receive(self, request: web.Request) -> web.Response:
        self.payloads.append(await request.json())
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/alerts", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def find(self, alertname: str, status: str, after: int = 0, **labels: str) -> tuple[int, dict]:
        """(index, alert) of the first notified alert matching, in payloads from ``after`` on."""
        for index, payload in enumerate(self.payloads[after:], start=after):
            for alert in payload["alerts"]:
                if (
                    alert["status"] == status
                    and alert["labels"].get("alertname") == alertname
                    and all(alert["labels"].get(k) == v for k, v in labels.items())
                ):
                    return index, alert
        return -1, {}

    def summary(self) -> list[str]:
        return [
            f"{a['status']} {a['labels'].get('alertname')} "
            f"target={a['labels'].get('target')} queue={a['labels'].get('queue')}"
            for p in self.payloads
            for a in p["alerts"]
        ]


@dataclass
class Stack:
    admin_dsn: str
    app_dsn: str
    gate_db: str
    exporter: Exporter
    prometheus: str
    alertmanager: str
    hook: Webhook
    http: aiohttp.ClientSession
    rules: dict[str, dict]
    logs: Path
    redis_url: str = ""  # the asynq target's database (admin user)
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def query(self, promql: str) -> list[dict]:
        async with self.http.get(
            f"{self.prometheus}/api/v1/query", params={"query": promql}
        ) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    async def diagnostics(self) -> str:
        lines = ["webhook received:", *(f"  {s}" for s in self.hook.summary())]
        with contextlib.suppress(Exception):
            async with self.http.get(f"{self.prometheus}/api/v1/alerts") as resp:
                alerts = (await resp.json())["data"]["alerts"]
            lines.append("prometheus alerts:")
            lines += [
                f"  {a['state']} {a['labels'].get('alertname')} target={a['labels'].get('target')}"
                f" queue={a['labels'].get('queue')} value={a.get('value')}"
                for a in alerts
            ]
        for name in ("prometheus.log", "alertmanager.log"):
            with contextlib.suppress(OSError):
                tail = (self.logs / name).read_text().splitlines()[-15:]
                lines += [f"{name} (tail):", *(f"  {t}" for t in tail)]
        return "\n".join(lines)

    async def expect(
        self, alertname: str, status: str = "firing", after: int = 0, **labels: str
    ) -> tuple[int, dict]:
        """Wait until the webhook got ``alertname`` in ``status`` with ``labels``; check its contract."""

        def arrived() -> tuple[int, dict] | None:
            found = self.hook.find(alertname, status, after, **labels)
            return found if found[0] >= 0 else None

        try:
            index, alert = await wait_for(
                arrived,
                timeout=TIMEOUT,
                interval=0.2,
                message=f"{alertname} {status} {labels} at the webhook",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await self.diagnostics()}") from None
        rule = self.rules[alertname]
        got = alert["labels"]
        assert got["severity"] == rule["labels"]["severity"]
        assert got["job"] == JOB
        exporter = f"127.0.0.1:{self.exporter.port}"
        assert got.get("instance", exporter) == exporter  # aggregating rules drop `instance`
        assert alert["annotations"]["summary"] == rule["annotations"]["summary"]
        assert alert["annotations"]["runbook_url"].endswith(f"docs/runbooks/{alertname}.md")
        description = alert["annotations"]["description"]
        assert "{{" not in description and "<no value>" not in description, description
        for label in ("target", "queue"):
            if label in got:
                assert f"{label} {got[label]}" in description, description
        return index, alert


async def _start_process(stack: Stack, name: str, *args: str) -> None:
    log = open(stack.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()
    stack.procs.append(proc)


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout=10)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def _ready(stack: Stack, url: str) -> bool:
    for proc in stack.procs:
        assert proc.returncode is None, f"a process exited early\n{await stack.diagnostics()}"
    try:
        async with stack.http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


def _write_configs(tmp: Path, exporter_port: int, am_port: int, hook_port: int) -> Path:
    rules_file = tmp / "rules-e2e.yaml"
    rules_file.write_text(
        yaml.safe_dump(fast_rules(RULES.read_text(), TIME_FACTOR), sort_keys=False, width=1000)
    )
    prometheus = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
        },
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus, sort_keys=False))
    alertmanager = {
        "route": {
            "receiver": "test-webhook",
            "group_by": ["alertname", "namespace", "job", "target", "queue"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "test-webhook",
                "webhook_configs": [
                    {"url": f"http://127.0.0.1:{hook_port}/alerts", "send_resolved": True}
                ],
            }
        ],
    }
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager, sort_keys=False))
    return rules_file


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    admin_dsn: str, redis_admin_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    prometheus_bin = require_binary("prometheus")
    alertmanager_bin = require_binary("prometheus-alertmanager")
    promtool = require_binary("promtool")
    tmp = tmp_path_factory.mktemp("e2e")
    source_rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }

    async with contextlib.AsyncExitStack() as cleanup:
        # failing jobs on purpose log a traceback each; keep failure output readable
        worker_log = logging.getLogger("procrastinate")
        cleanup.callback(worker_log.setLevel, worker_log.level)
        worker_log.setLevel(logging.CRITICAL)
        app_db = await create_database(admin_dsn, "jqe2e_app")
        cleanup.push_async_callback(drop_database, admin_dsn, app_db)
        gate_db = await create_database(admin_dsn, "jqe2e_gate")
        cleanup.push_async_callback(drop_database, admin_dsn, gate_db)
        app_dsn = with_database(admin_dsn, app_db)
        await apply_schema(app_dsn)
        await apply_schema(with_database(admin_dsn, gate_db))

        # a Redis target beside them: the same rules must work on asynq unchanged (database 0:
        # the per-test databases are 1-15)
        redis_url = redis_url_for(redis_admin_url, 0)
        flush = redis.Redis.from_url(redis_url)
        flush.flushdb()
        flush.close()
        config = make_config(
            {"name": "app", "dsn": app_dsn, "preset": "procrastinate"},
            {"name": "gate", "dsn": with_database(admin_dsn, gate_db), "preset": "procrastinate"},
            {"name": "tasks", "dsn": redis_url, "preset": "asynq", "queues": ["waiting"]},
            poll_interval="500ms",
            listen="127.0.0.1:0",
        )
        exporter = Exporter(config)
        await exporter.start()
        cleanup.push_async_callback(exporter.stop)

        hook = Webhook()
        await hook.start()
        cleanup.push_async_callback(hook.stop)

        prom_port, am_port = free_port(), free_port()
        rules_file = _write_configs(tmp, exporter.port, am_port, hook.port)
        check = subprocess.run(
            [promtool, "check", "rules", str(rules_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"SUCCESS: {len(source_rules)} rules found" in check.stdout, check.stdout

        http = aiohttp.ClientSession()
        cleanup.push_async_callback(http.close)
        stack = Stack(
            admin_dsn=admin_dsn,
            app_dsn=app_dsn,
            gate_db=gate_db,
            exporter=exporter,
            prometheus=f"http://127.0.0.1:{prom_port}",
            alertmanager=f"http://127.0.0.1:{am_port}",
            hook=hook,
            http=http,
            rules=source_rules,
            logs=tmp,
            redis_url=redis_url,
        )

        async def stop_all() -> None:
            await asyncio.gather(*(_stop_process(p) for p in stack.procs))

        cleanup.push_async_callback(stop_all)
        await _start_process(
            stack,
            "alertmanager",
            alertmanager_bin,
            f"--config.file={tmp / 'alertmanager.yml'}",
            f"--storage.path={tmp / 'am'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",
        )
        await _start_process(
            stack,
            "prometheus",
            prometheus_bin,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'prom'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--rules.alert.resend-delay=1s",
        )
        await wait_for(
            lambda: _ready(stack, f"{stack.alertmanager}/-/ready"), timeout=60, interval=0.2
        )
        await wait_for(
            lambda: _ready(stack, f"{stack.prometheus}/-/ready"), timeout=60, interval=0.2
        )

        async def scraped() -> bool:
            up = await stack.query(f'up{{job="{JOB}"}}')
            polled = await stack.query(f'jobqueue_up{{job="{JOB}"}} == 1')
            return [r["value"][1] for r in up] == ["1"] and len(polled) == 3

        await wait_for(
            scraped, timeout=60, interval=0.2, message="exporter scraped, all three targets up"
        )
        yield stack


# -- workload ------------------------------------------------------------------------------------


async def defer(dsn: str, task: str, queue: str, count: int) -> None:
    app = make_app(dsn)
    async with app.open_async():
        await (
            app.tasks[task]
            .configure(queue=queue)
            .batch_defer_async(*({"n": n} for n in range(count)))
        )


async def work(dsn: str, queue: str) -> None:
    """Run a Procrastinate worker until the queue is empty."""
    app = make_app(dsn)
    async with app.open_async():
        await app.run_worker_async(queues=[queue], wait=False, install_signal_handlers=False)


@contextlib.asynccontextmanager
async def keep_running(step: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Repeat ``step`` in the background (a steady workload) for the duration of the block."""
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await step()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def series_seen(stack: Stack, queue: str, *kinds: str, value: float = 0) -> None:
    """Wait until Prometheus has scraped the finished counters of ``queue`` at ``value`` per kind,
    so what finishes next is an increase of an existing series (as in a long-running exporter)."""

    async def seen() -> bool:
        result = await stack.query(
            f'jobqueue_jobs_finished_total{{job="{JOB}", target="app", queue="{queue}",'
            f' outcome="succeeded"}}'
        )
        got = {r["metric"]["kind"] for r in result if float(r["value"][1]) >= value}
        return set(kinds) <= got

    await wait_for(seen, timeout=30, interval=0.2, message=f"counters of {queue} {kinds} scraped")


# -- tests ---------------------------------------------------------------------------------------

_TIME = re.compile(r"\[[^\]]*\]|offset \S+|[<>=!]=?\s*\d+(?:\.\d+)?")


async def test_fast_rules_change_nothing_but_time() -> None:
    """The generated rules are the shipped ones with every window/offset divided by TIME_FACTOR."""
    source = yaml.safe_load(RULES.read_text())["groups"]
    fast = fast_rules(RULES.read_text(), TIME_FACTOR)["groups"]
    pairs = [
        (s, f)
        for sg, fg in zip(source, fast, strict=True)
        for s, f in zip(sg["rules"], fg["rules"], strict=True)
    ]
    for shipped, generated in pairs:
        assert {k: v for k, v in generated.items() if k not in ("expr", "for")} == {
            k: v for k, v in shipped.items() if k not in ("expr", "for")
        }
        assert _TIME.sub("T", generated["expr"]) == _TIME.sub("T", shipped["expr"])
        windows = re.compile(r"\[(\w+)\]|offset (\w+)")
        for s, g in zip(
            windows.finditer(shipped["expr"]), windows.finditer(generated["expr"]), strict=True
        ):
            assert parse_duration(g[1] or g[2]) * TIME_FACTOR == parse_duration(s[1] or s[2])
        assert 2 <= parse_duration(generated["for"]) <= 5
    thresholds = re.compile(r"[<>]=?\s*(\d+(?:\.\d+)?)")
    changed = {
        s["alert"]
        for s, f in pairs
        if thresholds.findall(s["expr"]) != thresholds.findall(f["expr"])
    }
    # only thresholds on a *_seconds metric are durations; counts and ratios stay as shipped
    assert "JobProcessingStalledBacklog" in changed
    assert changed <= {s["alert"] for s, _ in pairs if "_seconds" in s["expr"]}


async def test_every_shipped_rule_is_loaded_and_evaluates(stack: Stack) -> None:
    async def evaluated() -> dict[str, dict]:
        async with stack.http.get(f"{stack.prometheus}/api/v1/rules") as resp:
            groups = (await resp.json())["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        return loaded if all(r["health"] != "unknown" for r in loaded.values()) else {}

    loaded = await wait_for(evaluated, timeout=30, interval=0.2, message="rules evaluated")
    assert set(loaded) == set(stack.rules)
    assert {name: r["health"] for name, r in loaded.items()} == dict.fromkeys(stack.rules, "ok")
    for name, rule in loaded.items():
        assert rule["labels"] == stack.rules[name]["labels"]
        assert rule["annotations"] == stack.rules[name]["annotations"]
    async with stack.http.get(f"{stack.alertmanager}/api/v2/status") as resp:
        assert resp.status == 200
    assert stack.hook.find("JobQueueExporterDown", "firing")[0] < 0, stack.hook.summary()


async def test_failing_jobs_fire_backlog_and_it_resolves(stack: Stack) -> None:
    queue = "failing"
    await defer(stack.app_dsn, "fail", queue, 1)
    await defer(stack.app_dsn, "ok", queue, 1)
    await series_seen(stack, queue, "fail", "ok")

    async def failures() -> None:
        await defer(stack.app_dsn, "fail", queue, 10)
        await work(stack.app_dsn, queue)

    labels = {"target": "app", "queue": queue}
    async with keep_running(failures):
        fired, alert = await stack.expect("JobQueueBacklog", **labels)
        assert "%" in alert["annotations"]["description"]
        await stack.expect("JobQueueDeadJobsGrowing", **labels)

    async def successes() -> None:
        await defer(stack.app_dsn, "ok", queue, 5)
        await work(stack.app_dsn, queue)

    async with keep_running(successes):
        _, resolved = await stack.expect("JobQueueBacklog", "resolved", after=fired + 1, **labels)
    assert resolved["endsAt"] > alert["startsAt"]


async def test_stalled_queue_fires_and_resolves_when_work_resumes(stack: Stack) -> None:
    queue = "stalled"
    labels = {"target": "app", "queue": queue}
    await defer(stack.app_dsn, "ok", queue, 3)
    await series_seen(stack, queue, "ok")
    await work(stack.app_dsn, queue)
    await series_seen(stack, queue, "ok", value=3)
    # work keeps arriving, but no worker takes it
    await defer(stack.app_dsn, "ok", queue, 2)

    fired = {}
    for name in (
        "JobProcessingStalled",
        "JobProcessingStalledBacklog",
        "JobQueueOldestPendingTooOld",
    ):
        fired[name], alert = await stack.expect(name, **labels)
        severity = "critical" if name == "JobProcessingStalledBacklog" else "warning"
        assert alert["labels"]["severity"] == severity

    await work(stack.app_dsn, queue)
    for name, index in fired.items():
        await stack.expect(name, "resolved", after=index + 1, **labels)


async def test_unreachable_database_fires_target_down_and_it_resolves(stack: Stack) -> None:
    admin = await asyncpg.connect(stack.admin_dsn)
    labels = {"target": "gate"}
    try:
        await admin.execute(f'ALTER DATABASE "{stack.gate_db}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            stack.gate_db,
        )
        fired, alert = await stack.expect("JobQueueTargetDown", **labels)
        assert "queue" not in alert["labels"]
        assert f"127.0.0.1:{stack.exporter.port}" in alert["annotations"]["description"]
        stale, _ = await stack.expect("JobQueueMetricsStale", **labels)
        # the other target of the same exporter keeps working and raises nothing
        assert stack.hook.find("JobQueueTargetDown", "firing", target="app")[0] < 0
    finally:
        await admin.execute(f'ALTER DATABASE "{stack.gate_db}" ALLOW_CONNECTIONS true')
        await admin.close()
    await stack.expect("JobQueueTargetDown", "resolved", after=fired + 1, **labels)
    await stack.expect("JobQueueMetricsStale", "resolved", after=stale + 1, **labels)


async def test_an_asynq_task_waiting_too_long_fires_and_resolves_when_a_worker_runs(
    stack: Stack,
) -> None:
    """The shipped rules on a Redis target: a real asynq task that nobody runs, then a real worker."""
    from asynq_app import enqueue, start_worker

    labels = {"target": "tasks", "queue": "waiting"}
    enqueue(stack.redis_url, 0, "waiting", "ok", 2)
    fired, alert = await stack.expect("JobQueueOldestPendingTooOld", **labels)
    assert alert["labels"]["severity"] == "warning"
    worker = start_worker(stack.redis_url, 0, ["waiting"])
    try:
        await stack.expect("JobQueueOldestPendingTooOld", "resolved", after=fired + 1, **labels)
    finally:
        worker.terminate()
        worker.wait(30)
