"""Both Grafana dashboards against live data: every panel query, sent to a real Prometheus scraping the real
demo workload, returns data, and the template variables list the demo's target, queues and kinds.

``jobqueue-exporter demo`` (embedded PostgreSQL, a Procrastinate workload with failures and retries, and a
worker SIGKILLed mid-job so that a job turns stale) runs as a subprocess, scraped every second by
``prometheus`` under the job name the dashboards and alerts expect. Once Prometheus holds finished-job
increases of every working queue and the stale job, each expression is sent to ``/api/v1/query`` as Grafana
would send it: ``$__rate_interval`` -> ``RATE_INTERVAL``, ``$target`` -> ``demo``, a queue or All (the
variable's ``allValue``), ``$kind`` -> All. The stack is started by the code in docs/render_dashboard.py,
which draws docs/overview.png from the same setup.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
from helpers import require_binary
from jobqueue_exporter import demo_redis
from jobqueue_exporter.demo import DYING_QUEUE, REDIS_TARGET, TARGET
from test_dashboards import DASHBOARDS, exprs, load, variable_selector, variables

ROOT = Path(__file__).resolve().parent.parent


def _import_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_dashboard", ROOT / "docs" / "render_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


render = _import_render()
JOB, RATE_INTERVAL = render.JOB, render.RATE_INTERVAL
# The demo's queues: three drained by its workers, and one whose worker is killed mid-job.
WORKING_QUEUES = ("emails", "payments", "reports")
QUEUES = sorted((*WORKING_QUEUES, DYING_QUEUE))
ALL = None  # stands for a multi-value variable set to All

pytestmark = pytest.mark.slow


def _ready_for_dashboards(stack) -> bool:
    """Prometheus holds what every panel shows: the stale job, finished-job increases (successes in
    every working queue, failures somewhere) and the exporter's success ratio of every working queue."""
    sel = f'job="{JOB}", target="{TARGET}"'
    stale = stack.query(f'sum(jobqueue_stale_jobs{{{sel}, queue="{DYING_QUEUE}"}}) >= 1')
    increased = stack.query(
        f"sum by (queue, outcome) (increase(jobqueue_jobs_finished_total{{{sel},"
        f' outcome=~"succeeded|failed"}}[{RATE_INTERVAL}])) > 0'
    )
    succeeded = {r["metric"]["queue"] for r in increased if r["metric"]["outcome"] == "succeeded"}
    failed = {r["metric"]["queue"] for r in increased if r["metric"]["outcome"] == "failed"}
    ratios = {r["metric"]["queue"] for r in stack.query(f"jobqueue_success_ratio{{{sel}}}")}
    return bool(stale) and set(WORKING_QUEUES) <= succeeded & ratios and bool(failed)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    prometheus = require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("dashboards-e2e")
    with render.demo_stack(workdir, prometheus, lifetime=300) as running:
        # the stale job appears ~20s after the demo's worker is killed; finished jobs within seconds
        running.wait_until(
            lambda: _ready_for_dashboards(running),
            timeout=150,
            message="a stale job and finished-job increases of every demo queue in Prometheus",
        )
        yield running
    # SIGINT is the demo's Ctrl-C and SIGTERM Prometheus' stop: both end cleanly, not killed
    assert running.exit_codes == {"demo": 0, "prometheus": 0}, running.diagnostics()


# -- template variables ----------------------------------------------------------------------------


def _label_values_query(query: str) -> tuple[str, str]:
    """(selector, label) of Grafana's label_values(selector, label)."""
    label = re.fullmatch(r"label_values\(.+,\s*([a-zA-Z_]\w*)\)", query)
    assert label, query
    return variable_selector(query), label.group(1)


@pytest.mark.parametrize(
    ("name", "target"),
    [("jobqueue-overview", TARGET), ("jobqueue-overview", ALL), ("jobqueue-queue", TARGET)],
    ids=["overview, target=demo", "overview, target=All", "queue, target=demo"],
)
def test_template_variables_list_the_demo(stack, name: str, target: str | None) -> None:
    found = variables(load(name))
    chosen = {"target": target or found["target"]["allValue"], "queue": "emails"}
    # the demo's two targets: Procrastinate on PostgreSQL and BullMQ on Redis (both have "emails")
    every = target is None
    expected = {
        "target": sorted([TARGET, REDIS_TARGET]),
        "queue": sorted(set(QUEUES) | set(demo_redis.QUEUES)) if every else QUEUES,
        "kind": ["default", "send_email"] if every else ["send_email"],
    }
    resolved = {}
    for variable in found.values():
        if variable["type"] != "query":
            continue
        selector, label = _label_values_query(variable["query"])
        # what Grafana asks Prometheus for the variable's options (refresh on load / time range)
        resolved[variable["name"]] = sorted(
            stack.label_values(label, render.substitute(selector, chosen))
        )
    assert resolved == {v: expected[v] for v in resolved}
    assert set(resolved) >= {"target", "queue"}


# -- panel queries ---------------------------------------------------------------------------------


def _at_least(n: float) -> Callable[[list[float]], bool]:
    return lambda values: max(values) >= n


def _equal(n: float) -> Callable[[list[float]], bool]:
    return lambda values: all(v == n for v in values)


def _ratio(values: list[float]) -> bool:
    return all(0 <= v <= 1 for v in values)


def _rate(values: list[float]) -> bool:
    return all(v >= 0 for v in values)


def _positive(values: list[float]) -> bool:
    return all(v > 0 for v in values)


def _recent(values: list[float]) -> bool:
    return all(0 <= v < 30 for v in values)  # the demo polls every 2s, Prometheus scrapes every 1s


HEALTH = {
    "Target up": _equal(1),
    "Time since last successful poll": _recent,
    "Last successful poll": _recent,
    "Poll duration": _positive,
    # the demo has no poll errors, but the counters are exported at 0 per reason, so the rate is
    # data (0); a poll timing out on a loaded machine would be no reason to fail here
    "Poll errors by reason": _rate,
}


@dataclass
class Case:
    dashboard: str
    values: dict[str, str | None]
    # panel title -> check of the finite values of its result (over every panel with that title)
    expect: dict[str, Callable[[list[float]], bool]] = field(default_factory=dict)
    # panel title -> why it has no (finite) value for this selection
    no_value: dict[str, str] = field(default_factory=dict)


CASES = {
    "overview, all queues": Case(
        "jobqueue-overview",
        {"target": TARGET, "queue": ALL},
        {
            **HEALTH,
            "Targets down": _equal(0),
            "Stale jobs": _at_least(1),
            "Jobs finished per second": _positive,
            "Throughput by queue": _at_least(0.01),
            "Success ratio": _ratio,
        },
    ),
    "overview, all targets, emails": Case(
        "jobqueue-overview",
        {"target": ALL, "queue": "emails"},
        {**HEALTH, "Targets down": _equal(0), "Stale jobs": _equal(0), "Success ratio": _ratio},
    ),
    **{
        f"queue {queue}": Case(
            "jobqueue-queue",
            {"target": TARGET, "queue": queue, "kind": ALL},
            {
                **HEALTH,
                "Stale jobs": _equal(0),
                "Throughput by kind": _positive,
                "Success ratio by kind": _ratio,
                "Success ratio by kind (exporter window)": _ratio,
            },
        )
        for queue in WORKING_QUEUES
    },
    # the same dashboard, unchanged, on the Redis target (BullMQ: retries, delays, failures)
    "queue emails on Redis": Case(
        "jobqueue-queue",
        {"target": REDIS_TARGET, "queue": "emails", "kind": ALL},
        {
            **HEALTH,
            "Throughput by kind": _positive,
            "Success ratio by kind": _ratio,
            "Success ratio by kind (exporter window)": _ratio,
        },
    ),
    f"queue {DYING_QUEUE}": Case(
        "jobqueue-queue",
        {"target": TARGET, "queue": DYING_QUEUE, "kind": ALL},
        {**HEALTH, "Stale jobs": _at_least(1), "Running jobs": _at_least(1)},
        no_value={
            # nothing in this queue ever finishes (its worker is killed mid-job), so the ratio is
            # 0/0 = NaN (a gap in Grafana) and the exporter's ratio is absent, as documented
            "Success ratio by kind": "NaN: no job of the queue finished",
            "Success ratio by kind (exporter window)": "absent: no job of the queue finished",
        },
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_panel_query_returns_data(stack, case: Case) -> None:
    board = load(case.dashboard)
    found = variables(board)
    values = {
        name: value if value is not ALL else found[name]["allValue"]
        for name, value in case.values.items()
    }
    checked: dict[str, list[float]] = {}
    problems = []
    for expr, panel, target in exprs(board):
        title = panel["title"]
        promql = render.substitute(expr, values, RATE_INTERVAL)
        result = stack.query(promql)  # fails unless the API answered status "success"
        finite = [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]
        where = f"{panel['type']} {title!r}: {promql}"
        if title in case.no_value:
            # documented as valueless here: it must still be a valid query, and indeed valueless
            assert not finite, f"{where} now has values {finite}; update no_value"
            continue
        if not result or not finite:
            problems.append(f"{where} -> {'no series' if not result else result}")
            continue
        legend = re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", ""))
        for series in result:
            missing = [label for label in legend if label not in series["metric"]]
            if missing:
                problems.append(f"{where}: legend labels {missing} absent in {series['metric']}")
            chosen = case.values["target"]
            allowed = {TARGET, REDIS_TARGET} if chosen is ALL else {chosen}
            if "target" in series["metric"] and series["metric"]["target"] not in allowed:
                problems.append(f"{where}: foreign target {series['metric']}")
        checked.setdefault(title, []).extend(finite)
    assert not problems, "\n".join(problems)
    assert len(checked) + len(case.no_value) == len({p["title"] for _, p, _ in exprs(board)})
    wrong = {
        title: checked[title]
        for title, check in case.expect.items()
        if title in checked and not check(checked[title])
    }
    assert not wrong, f"unexpected values: {wrong}"
    assert set(case.expect) - set(checked) <= set(HEALTH), "an expectation names no panel"


def test_cases_cover_every_dashboard() -> None:
    assert {case.dashboard for case in CASES.values()} == set(DASHBOARDS)
