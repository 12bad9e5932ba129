"""Grafana dashboards: structure and conventions, every PromQL expression parsed by Prometheus' own parser
(promtool), and every metric and label they use checked against what the real exporter serves."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import make_config, require_binary, scrape
from jobqueue_exporter.poll import TargetPoller
from procrastinate_app import apply_schema

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = {
    "jobqueue-overview": ROOT / "dashboards" / "jobqueue-overview.json",
    "jobqueue-queue": ROOT / "dashboards" / "jobqueue-queue.json",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC = re.compile(r"\b(jobqueue_[a-z_]+)\b")
SELECTOR = re.compile(r"\b(jobqueue_[a-z_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
RANGE_FUNCTIONS = re.compile(r"\b(rate|irate|increase|delta|idelta|deriv|[a-z]+_over_time)\s*\(")
# Metrics labelled per (target, queue, kind); the rest are per target only.
PER_QUEUE_METRICS = {
    "jobqueue_jobs",
    "jobqueue_oldest_pending_age_seconds",
    "jobqueue_oldest_running_age_seconds",
    "jobqueue_stale_jobs",
    "jobqueue_success_ratio",
    "jobqueue_jobs_finished_total",
}


def load(name: str) -> dict:
    return json.loads(DASHBOARDS[name].read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def exprs(board: dict) -> list[tuple[str, dict, dict]]:
    """(expression, panel, target) for every query target of every panel."""
    return [(t["expr"], p, t) for p in panels(board) for t in p.get("targets", [])]


def variables(board: dict) -> dict[str, dict]:
    return {v["name"]: v for v in board["templating"]["list"]}


def variable_selector(query: str) -> str:
    """The PromQL selector inside Grafana's label_values(selector, label)."""
    match = re.fullmatch(r"label_values\((.+),\s*([a-zA-Z_]\w*)\)", query)
    assert match, f"not a label_values(selector, label) query: {query}"
    return match.group(1)


def substituted(expr: str) -> str:
    """A dashboard expression as Prometheus would get it: $__rate_interval -> 5m, variables -> `.*`."""
    expr = expr.replace("$__rate_interval", "5m")
    return re.sub(r"\$\{?[a-zA-Z_]\w*(?::\w+)?\}?", ".*", expr)


def call_argument(expr: str, open_paren: int) -> str:
    """Text between the parenthesis at ``open_paren`` and its matching close."""
    depth = 0
    for index in range(open_paren, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[index], 0)
        if depth == 0:
            return expr[open_paren + 1 : index]
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def all_exprs() -> list[tuple[str, str]]:
    """(dashboard, expression) for every panel query and every variable's selector."""
    found = []
    for name in DASHBOARDS:
        board = load(name)
        found += [(name, expr) for expr, _, _ in exprs(board)]
        found += [
            (name, variable_selector(v["query"]))
            for v in board["templating"]["list"]
            if v["type"] == "query"
        ]
    return found


def promtool_check(tmp_path: Path, expressions: list[str]) -> subprocess.CompletedProcess:
    rules = [
        {"record": f"jobqueue_dashboard:expr_{index}", "expr": expr}
        for index, expr in enumerate(expressions)
    ]
    path = tmp_path / "dashboard-exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return subprocess.run(
        [require_binary("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_is_plain_importable_json(name: str) -> None:
    board = load(name)
    assert "dashboard" not in board, "plain dashboard JSON, as the Grafana sidecar loads it"
    assert board["uid"] == name
    assert "id" not in board, "an id would clash on import; the uid identifies the dashboard"
    assert board["tags"] == ["jobqueue"]
    assert 36 <= board["schemaVersion"] <= 41
    assert board["title"].startswith("Job Queue / ")
    assert board["panels"], "has panels"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_template_variables(name: str) -> None:
    board = load(name)
    found = variables(board)
    first = board["templating"]["list"][0]
    assert first["name"] == "datasource"
    assert first["type"] == "datasource" and first["query"] == "prometheus"
    expected = ["datasource", "target", "queue"] + (["kind"] if name == "jobqueue-queue" else [])
    assert list(found) == expected
    assert found["target"]["query"] == "label_values(jobqueue_up, target)"
    assert re.fullmatch(
        r'label_values\(jobqueue_jobs\{target=~?"\$target"\}, queue\)', found["queue"]["query"]
    )
    for variable in list(found.values())[1:]:
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["refresh"] in (1, 2), "refreshed from Prometheus, not frozen at export"
        if variable["multi"] or variable["includeAll"]:
            assert variable.get("allValue") == ".+", "All must be a regex, not a giant alternation"
    if name == "jobqueue-overview":
        assert found["target"]["multi"] and found["target"]["includeAll"]
        assert found["queue"]["multi"] and found["queue"]["includeAll"]
    else:
        # one target and queue; matched with =, since Grafana does not regex-escape single values
        assert not found["target"]["multi"] and not found["queue"]["multi"]
        assert found["kind"]["multi"] and found["kind"]["includeAll"]
        assert "$target" in found["kind"]["query"] and "$queue" in found["kind"]["query"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_and_target_uses_the_datasource_variable(name: str) -> None:
    for panel in panels(load(name)):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_has_unit_description_and_stable_layout(name: str) -> None:
    board = load(name)
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        title = panel["title"]
        assert title and panel["description"].strip(), f"panel {panel['id']} needs a description"
        assert panel["fieldConfig"]["defaults"]["unit"], f"{title} has no unit"
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), title
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, title
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells[(x, y)]}"
                cells[(x, y)] = title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{title}: duplicate refId"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_rate_and_increase_uses_rate_interval(name: str) -> None:
    counted = 0
    for expr, panel, _ in exprs(load(name)):
        for call in RANGE_FUNCTIONS.finditer(expr):
            argument = call_argument(expr, call.end() - 1)
            assert argument.rstrip().endswith("[$__rate_interval]"), (
                f"{panel['title']}: {call.group(1)}({argument})"
            )
            counted += 1
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{panel['title']}: {ranges}"
    assert counted, "the dashboard shows rates"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_query_is_filtered_by_the_variables(name: str) -> None:
    """Each selector narrows to the chosen target (and queue, and kind on the per-queue dashboard)."""
    for expr, panel, _ in exprs(load(name)):
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{panel['title']} reads no exporter metric"
        for metric, braces in selectors:
            matchers = {label: value for label, _, value in MATCHER.findall(braces)}
            assert matchers.get("target") == "$target", f"{panel['title']}: {metric}{braces}"
            if metric in PER_QUEUE_METRICS:
                assert matchers.get("queue") == "$queue", f"{panel['title']}: {metric}{braces}"
                if name == "jobqueue-queue":
                    assert matchers.get("kind") == "$kind", f"{panel['title']}: {metric}{braces}"


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The parse check below can fail: promtool really parses what it is given."""
    result = promtool_check(tmp_path, ["sum by (queue) (rate(jobqueue_jobs_finished_total[5m])"])
    assert result.returncode != 0
    result = promtool_check(tmp_path, ["rate(jobqueue_jobs)"])
    assert result.returncode != 0, "a range function without a range"


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    found = all_exprs()
    assert len(found) > 20
    expressions = [substituted(expr) for _, expr in found]
    assert not any("$" in expr for expr in expressions), expressions
    result = promtool_check(tmp_path, expressions)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


async def exported_series(dsn: str) -> dict[str, set[str]]:
    """{sample name: label names} that a real exporter serves for a Procrastinate database in which jobs
    have succeeded and failed (so that the success ratio, absent until something finished, is there)."""
    app = await apply_schema(dsn)
    async with app.open_async():
        await app.tasks["ok"].defer_async()
        await app.tasks["fail"].defer_async()
        await app.run_worker_async(queues=["default"], wait=False, install_signal_handlers=False)
    # a declared queue, so every per-queue series exists
    config = make_config(
        {"name": "app", "dsn": dsn, "preset": "procrastinate", "queues": ["default"]}
    )
    poller = TargetPoller(config, config.targets[0])
    await poller.poll_once()
    await poller.close()
    exported: dict[str, set[str]] = {}
    for sample, labels in scrape(poller):
        exported.setdefault(sample, set()).update(label for label, _ in labels)
    return exported


async def test_dashboards_use_only_metrics_and_labels_the_exporter_exports(dsn: str, db) -> None:
    exported = await exported_series(dsn)
    assert "jobqueue_success_ratio" in exported, "finished jobs make the ratio appear"
    used: set[str] = set()
    for name in DASHBOARDS:
        used |= set(METRIC.findall(DASHBOARDS[name].read_text()))
    assert used, "dashboards reference exporter metrics"
    assert used <= set(exported), f"not exported: {sorted(used - set(exported))}"
    assert used >= set(exported) - {"jobqueue_exporter_build_info"}, (
        f"exported but on no dashboard: {sorted(set(exported) - used)}"
    )

    for dashboard, expr in all_exprs():
        metrics = {metric for metric, _ in SELECTOR.findall(expr)}
        labels = set().union(*(exported[m] for m in metrics))
        for metric, braces in SELECTOR.findall(expr):
            matched = {label for label, _, _ in MATCHER.findall(braces)}
            assert matched <= exported[metric], (
                f"{dashboard}: {metric} has no {matched - exported[metric]}"
            )
        groupings = [
            {label.strip() for label in group.split(",") if label.strip()}
            for group in GROUPING.findall(expr)
        ]
        for grouping in groupings:
            assert grouping <= labels, f"{dashboard}: grouping by {grouping - labels} in {expr}"

    for name in DASHBOARDS:
        for expr, panel, target in exprs(load(name)):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            groupings = [
                {label.strip() for label in group.split(",")} for group in GROUPING.findall(expr)
            ]
            # a legend label must survive every aggregation of the expression
            kept = set.intersection(*groupings) if groupings else set()
            assert legend <= kept, f"{name}/{panel['title']}: legend uses {legend - kept}"
