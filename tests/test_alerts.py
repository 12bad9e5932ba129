"""Alert rules: promtool checks and unit tests, guard-clause mutations, annotations and runbooks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import make_config, require_binary, scrape
from jobqueue_exporter.poll import TargetPoller
from procrastinate_app import apply_schema

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "jobqueue-alerts.yaml"
UNIT_TESTS = ROOT / "alerts" / "tests" / "jobqueue-alerts.test.yaml"
RUNBOOK_URL = "https://github.com/jobqueue-exporter/jobqueue-exporter/blob/main/docs/runbooks/{}.md"


def rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def guard_mutations() -> list[tuple[str, str, str]]:
    """(alert, what was removed, mutated rules file): each guard clause and each `for:` deleted."""
    mutations = []
    for index, rule in enumerate(rules()):
        clauses = re.findall(r"\n(?:and on|or)\b[^\n]*(?:\n  [^\n]*)*", rule["expr"])
        for clause in clauses:
            mutated = {**rule, "expr": rule["expr"].replace(clause, "\n")}
            mutations.append(
                (rule["alert"], clause.strip().split("\n")[0], _with_rule(index, mutated))
            )
        if "for" in rule:
            without_for = {k: v for k, v in rule.items() if k != "for"}
            mutations.append((rule["alert"], f"for: {rule['for']}", _with_rule(index, without_for)))
    return mutations


def _with_rule(index: int, rule: dict) -> str:
    data = yaml.safe_load(RULES.read_text())
    all_rules = [r for group in data["groups"] for r in group["rules"]]
    all_rules[index].clear()
    all_rules[index].update(rule)
    return yaml.safe_dump(data, sort_keys=False)


MUTATIONS = guard_mutations()


def test_every_alert_has_guards_to_mutate() -> None:
    guarded = {alert for alert, removed, _ in MUTATIONS if not removed.startswith("for:")}
    assert {"JobQueueBacklog", "JobProcessingStalled", "JobProcessingStalledBacklog"} <= guarded
    assert "JobQueueExporterDown" in guarded, "the absent() branch"


@pytest.mark.parametrize(
    "alert,removed,mutated", MUTATIONS, ids=[f"{a}: without {r}" for a, r, _ in MUTATIONS]
)
def test_unit_tests_catch_a_deleted_guard(
    tmp_path: Path, alert: str, removed: str, mutated: str
) -> None:
    (tmp_path / "jobqueue-alerts.yaml").write_text(mutated)
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text())
    assert promtool("check", "rules", str(tmp_path / "jobqueue-alerts.yaml")).returncode == 0
    result = promtool("test", "rules", str(tests / UNIT_TESTS.name))
    assert result.returncode != 0, f"{alert} still passes every unit test without `{removed}`"


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_alert_contract(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"warning", "critical"}
    annotations = rule["annotations"]
    assert annotations["summary"].endswith(".")
    assert (
        "{{ $labels.target }}" in annotations["description"]
        or rule["alert"] == "JobQueueExporterDown"
    )
    assert annotations["runbook_url"] == RUNBOOK_URL.format(rule["alert"])
    runbook = ROOT / "docs" / "runbooks" / f"{rule['alert']}.md"
    assert runbook.is_file(), f"missing runbook {runbook}"
    assert rule["alert"] in runbook.read_text().splitlines()[0]


async def test_rules_use_only_metrics_the_exporter_exports(dsn: str, db) -> None:
    await apply_schema(dsn)
    # a declared queue, so every per-queue series exists even with no jobs yet
    config = make_config(
        {"name": "app", "dsn": dsn, "preset": "procrastinate", "queues": ["default"]}
    )
    poller = TargetPoller(config, config.targets[0])
    await poller.poll_once()
    await poller.close()
    exported = {name for name, _ in scrape(poller)}
    used = set(re.findall(r"\b(jobqueue_[a-z_]+)\b", RULES.read_text()))
    assert used, "rules reference exporter metrics"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
