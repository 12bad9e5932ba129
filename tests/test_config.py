"""Config validation and the ``check`` / ``once`` commands.

Every user mistake must become one ``error:`` line naming the exact key path and what to do, never a
traceback; ``check`` must never touch a database.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jobqueue_exporter.config import (
    DEFAULT_LISTEN,
    ConfigError,
    load_config,
    load_config_data,
    parse_duration,
)

UNSET_VAR = "JQ_TEST_SURELY_UNSET_VAR"


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems, "a ConfigError must carry at least one problem"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def split(problem: str) -> tuple[str, str]:
    path, sep, message = problem.partition(": ")
    assert sep, f"problem without a key path: {problem!r}"
    return path, message


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.pop(UNSET_VAR, None)
    return subprocess.run(
        [sys.executable, "-m", "jobqueue_exporter.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


# A valid generic table mapping (one_target indents it under "    table:").
TABLE = """\
name: jobs
state:
  column: status
  pending: [pending]
  running: [running]
timestamps:
  enqueued: created_at
  started: started_at
"""


def table(text: str = TABLE) -> str:
    return textwrap.indent(textwrap.dedent(text), "      ")


def one_target(extra: str = "", head: str = "", table_text: str | None = None) -> str:
    """A config with one target ``main``; ``extra`` lines go into the target (4-space indent)."""
    lines = [head.rstrip("\n")] if head else []
    lines += ["targets:", "  - name: main", "    dsn: postgresql://u@127.0.0.1:1/db"]
    if table_text is None:
        lines.append("    preset: procrastinate")
    else:
        lines.append("    table:")
        lines.append(table(table_text).rstrip("\n"))
    body = "\n".join(lines) + "\n"
    return body + textwrap.indent(textwrap.dedent(extra), "    ") if extra else body


T0 = "targets[0](main)"

# (id, yaml text, exact key path ("{file}" = the config file), message fragments)
MISTAKES = [
    (
        "unknown-preset",
        "targets:\n  - name: main\n    dsn: postgresql://x/db\n    preset: celery\n",
        f"{T0}.preset",
        [
            "unknown preset 'celery'",
            "known presets: asynq, bullmq, generic, procrastinate, publaryn",
        ],
    ),
    (
        "bad-duration",
        one_target("stale_after: 5 minutes\n"),
        f"{T0}.stale_after",
        ["invalid duration '5 minutes'", "30s, 5m, 1h"],
    ),
    (
        "bad-global-duration",
        one_target(head="poll_interval: fast\n"),
        "poll_interval",
        ["invalid duration 'fast'", "30s, 5m, 1h"],
    ),
    ("missing-targets", "poll_interval: 5s\n", "targets", ["required key is missing"]),
    ("empty-targets", "targets: []\n", "targets", ["at least one target is required"]),
    ("null-targets", "targets:\n", "targets", ["at least one target is required"]),
    (
        "targets-not-a-list",
        "targets:\n  main: {dsn: postgresql://u@h/db}\n",
        "targets",
        ["must be a list"],
    ),
    (
        "target-not-a-mapping",
        "targets:\n  - main\n",
        "targets[0]",
        ["must be a mapping"],
    ),
    (
        "duplicate-target-names",
        "targets:\n"
        "  - {name: main, dsn: postgresql://a/db, preset: procrastinate}\n"
        "  - {name: other, dsn: postgresql://b/db, preset: procrastinate}\n"
        "  - {name: main, dsn: postgresql://c/db, preset: publaryn}\n",
        "targets[2](main).name",
        ["duplicate target name 'main'", "also targets[0]", "unique name"],
    ),
    (
        "dsn-and-dsn-file",
        one_target("dsn_file: dsn.txt\n"),
        T0,
        ["only one of dsn or dsn_file", "not both"],
    ),
    (
        "neither-dsn-nor-dsn-file",
        "targets:\n  - name: main\n    preset: procrastinate\n",
        T0,
        ["exactly one of dsn", "dsn_file"],
    ),
    (
        "dsn-file-does-not-exist",
        "targets:\n  - name: main\n    dsn_file: secrets/no-such-dsn\n    preset: procrastinate\n",
        f"{T0}.dsn_file",
        ["secrets/no-such-dsn does not exist"],
    ),
    (
        "empty-dsn",
        "targets:\n  - name: main\n    dsn: ''\n    preset: procrastinate\n",
        f"{T0}.dsn",
        ["dsn is empty"],
    ),
    (
        "unknown-top-level-key",
        one_target(head="poll_intervall: 5s\n"),
        "poll_intervall",
        ["unknown key", "did you mean 'poll_interval'"],
    ),
    (
        "unknown-target-key",
        one_target("stale_afer: 5m\n"),
        f"{T0}.stale_afer",
        ["unknown key", "did you mean 'stale_after'"],
    ),
    (
        "unknown-state-key",
        one_target(table_text=TABLE.replace("running: [running]", "runing: [running]")),
        f"{T0}.table.state.runing",
        ["unknown key", "did you mean 'running'"],
    ),
    (
        "preset-and-table",
        one_target(table_text=TABLE).replace("    table:", "    preset: procrastinate\n    table:"),
        f"{T0}.table",
        ["preset 'procrastinate' describes its own tables", "remove 'table'"],
    ),
    (
        "generic-without-table",
        "targets:\n  - name: main\n    dsn: postgresql://x/db\n    preset: generic\n",
        T0,
        ["preset 'generic' needs a 'table' mapping"],
    ),
    (
        "no-preset-no-table",
        "targets:\n  - name: main\n    dsn: postgresql://x/db\n",
        T0,
        ["set preset", "generic, procrastinate, publaryn", "or a table mapping"],
    ),
    (
        "state-column-missing",
        one_target(table_text=TABLE.replace("  column: status\n", "")),
        f"{T0}.table.state.column",
        ["required key is missing"],
    ),
    (
        "state-value-mapped-twice",
        one_target(table_text=TABLE.replace("running: [running]", "running: [busy, pending]")),
        f"{T0}.table.state.running[1]",
        ["'pending' is mapped to both 'pending' and 'running'", "exactly one canonical state"],
    ),
    (
        "no-running-value",
        one_target(table_text=TABLE.replace("  running: [running]\n", "")),
        f"{T0}.table.state.running",
        ["no value is mapped to 'running'", "running: [running]"],
    ),
    (
        "no-waiting-value",
        one_target(table_text=TABLE.replace("  pending: [pending]\n", "")),
        f"{T0}.table.state",
        ["no waiting value is mapped", "pending: [pending]"],
    ),
    (
        "state-values-not-a-list",
        one_target(table_text=TABLE.replace("running: [running]", "running: running")),
        f"{T0}.table.state.running",
        ["must be a list"],
    ),
    (
        "stale-rule-with-two-options",
        one_target(
            table_text=TABLE + "stale:\n  heartbeat: beat_at\n  lease_expires: lease_until\n"
        ),
        f"{T0}.table.stale",
        ["exactly one", "lease_expires, started_before, heartbeat", "got lease_expires, heartbeat"],
    ),
    (
        "stale-rule-empty",
        one_target(table_text=TABLE + "stale: {}\n"),
        f"{T0}.table.stale",
        ["exactly one", "got none"],
    ),
    (
        "no-timestamps",
        one_target(table_text=TABLE.split("timestamps:")[0]),
        f"{T0}.table.timestamps",
        ["timestamps.eligible or timestamps.enqueued is required"],
    ),
    (
        "invalid-table-identifier",
        one_target(table_text=TABLE.replace("name: jobs", "name: job-queue")),
        f"{T0}.table.name",
        ["'job-queue' is not a plain SQL identifier", "letters, digits and underscores"],
    ),
    (
        "schema-qualified-table-name",
        one_target(table_text=TABLE.replace("name: jobs", "name: app.jobs")),
        f"{T0}.table.name",
        ["'app.jobs' is not a plain SQL identifier", "schema: app and name: jobs"],
    ),
    (
        "table-schema-differs-from-target-schema",
        one_target("schema: app\n", table_text=TABLE + "schema: other\n"),
        f"{T0}.table.schema",
        ["'other' differs from the target's schema 'app'", "one place"],
    ),
    (
        "reserved-label",
        one_target("labels:\n  queue: critical\n"),
        f"{T0}.labels.queue",
        ["label name 'queue' is reserved", "choose another name"],
    ),
    (
        "invalid-label-name",
        one_target("labels:\n  team-name: core\n"),
        f"{T0}.labels.team-name",
        ["'team-name' is not a valid Prometheus label name"],
    ),
    (
        "double-underscore-label",
        one_target("labels:\n  __meta: x\n"),
        f"{T0}.labels.__meta",
        ["not a valid Prometheus label name", "no leading '__'"],
    ),
    (
        "invalid-target-name",
        one_target().replace("name: main", "name: 'my target'"),
        "targets[0](my target).name",
        ["target name 'my target'", "letters, digits"],
    ),
    (
        "bad-listen-address",
        one_target(head="listen: localhost\n"),
        "listen",
        ["listen address 'localhost' must be host:port", "0.0.0.0:17410"],
    ),
    (
        "listen-port-out-of-range",
        one_target(head="listen: '0.0.0.0:70000'\n"),
        "listen",
        ["port 70000 is out of range (0-65535)"],
    ),
    (
        "zero-statement-timeout",
        one_target("statement_timeout: 0\n"),
        f"{T0}.statement_timeout",
        ["statement_timeout must be at least 1ms", "0 would disable it"],
    ),
    (
        "negative-statement-timeout",
        one_target("statement_timeout: -5s\n"),
        f"{T0}.statement_timeout",
        ["invalid duration '-5s'", "must not be negative"],
    ),
    (
        "sub-millisecond-statement-timeout",
        one_target("statement_timeout: 0.0001\n"),
        f"{T0}.statement_timeout",
        ["at least 1ms"],
    ),
    (
        "huge-statement-timeout",
        one_target("statement_timeout: 30d\n"),
        f"{T0}.statement_timeout",
        ["at most 1d"],
    ),
    (
        "zero-lock-timeout",
        one_target("lock_timeout: 0s\n"),
        f"{T0}.lock_timeout",
        ["lock_timeout must be at least 1ms"],
    ),
    (
        "infinite-duration",
        one_target("stale_after: .inf\n"),
        f"{T0}.stale_after",
        ["must be a finite number"],
    ),
    (
        "zero-target-poll-interval",
        one_target("poll_interval: 0\n"),
        f"{T0}.poll_interval",
        ["at least 50ms"],
    ),
    (
        "tiny-global-poll-interval",
        one_target(head="poll_interval: 10ms\n"),
        "poll_interval",
        ["at least 50ms"],
    ),
    (
        "zero-success-window",
        one_target("success_window: 0s\n"),
        f"{T0}.success_window",
        ["at least 1s"],
    ),
    (
        "missing-env-var",
        "targets:\n  - name: main\n    dsn: ${" + UNSET_VAR + "}\n    preset: procrastinate\n",
        f"{T0}.dsn",
        [f"environment variable {UNSET_VAR} is not set", "${" + UNSET_VAR + ":-default}"],
    ),
    (
        "invalid-yaml",
        "targets:\n  - name: main\n    dsn: [postgresql://x/db\n    preset: procrastinate\n",
        "{file}",
        ["not valid YAML at line 4"],
    ),
    (
        "yaml-tab-indentation",
        "targets:\n\t- name: main\n",
        "{file}",
        ["not valid YAML at line 2"],
    ),
    (
        "duplicate-yaml-key",
        one_target() + "targets: []\n",
        "{file}",
        ["not valid YAML at line 5", "duplicate key 'targets'", "first set at line 1"],
    ),
    (
        "top-level-list",
        "- name: main\n  dsn: postgresql://x/db\n",
        "{file}",
        ["expected a mapping with a 'targets' list at the top level", "found a list"],
    ),
    (
        "top-level-scalar",
        "just some text\n",
        "{file}",
        ["expected a mapping with a 'targets' list"],
    ),
    (
        "empty-file",
        "",
        "{file}",
        ["expected a mapping", "found an empty file"],
    ),
    (
        "bad-log-format",
        one_target(head="log_format: xml\n"),
        "log_format",
        ["must be 'text' or 'json'"],
    ),
    (
        "bad-log-level",
        one_target(head="log_level: verbose\n"),
        "log_level",
        ["must be 'debug', 'info', 'warning' or 'error'"],
    ),
    (
        "zero-max-kinds-per-queue",
        one_target("max_kinds_per_queue: 0\n"),
        f"{T0}.max_kinds_per_queue",
        ["must be at least 1"],
    ),
    (
        "empty-queues-list",
        one_target("queues: []\n"),
        f"{T0}.queues",
        ["queues is empty", "remove the key"],
    ),
    (
        "bad-finished-counting",
        one_target("finished_counting: sometimes\n"),
        f"{T0}.finished_counting",
        ["must be 'auto', 'on' or 'off'"],
    ),
]


@pytest.mark.parametrize(
    ("text", "path", "fragments"),
    [pytest.param(text, path, fragments, id=name) for name, text, path, fragments in MISTAKES],
)
def test_mistake_names_key_path_and_fix(
    tmp_path: Path, text: str, path: str, fragments: list[str]
) -> None:
    config_file = write(tmp_path, text)
    problems = problems_of(config_file)
    expected_path = path.replace("{file}", str(config_file))
    matching = [p for p in problems if split(p)[0] == expected_path]
    assert matching, f"no problem at {expected_path!r}; got {problems}"
    assert any(all(f in split(p)[1] for f in fragments) for p in matching), problems
    for problem in problems:
        assert "\n" not in problem
        assert "pydantic" not in problem and "Input should be" not in problem, problem


def test_mistakes_cover_the_brief() -> None:
    assert len(MISTAKES) >= 15
    assert len({name for name, *_ in MISTAKES}) == len(MISTAKES)


def test_every_problem_in_a_file_gets_its_own_line(tmp_path: Path) -> None:
    config_file = write(
        tmp_path,
        """\
        poll_intervall: 5s
        log_format: xml
        targets:
          - name: a
            preset: celery
            stale_after: 5 minutes
            labels: {queue: x, ok_label: y, "bad-label": z}
          - name: b
            dsn: postgresql://x/db
            table:
              name: "jobs; DROP TABLE x"
              state: {column: status, pending: [p]}
              timestamps: {enqueued: created_at, started: started_at}
        """,
    )
    problems = problems_of(config_file)
    paths = sorted(split(p)[0] for p in problems)
    assert paths == sorted(
        [
            "poll_intervall",
            "log_format",
            "targets[0](a).preset",
            "targets[0](a).stale_after",
            "targets[0](a).labels.queue",
            "targets[0](a).labels.bad-label",
            "targets[1](b).table.name",
            "targets[1](b).table.state.running",
        ]
    ), problems


def test_several_target_level_problems_are_all_reported(tmp_path: Path) -> None:
    # cross-field problems of one target (no dsn, no preset/table) do not hide each other
    config_file = write(tmp_path, "targets:\n  - name: lonely\n")
    problems = problems_of(config_file)
    assert len(problems) == 2, problems
    assert all(split(p)[0] == "targets[0](lonely)" for p in problems)
    assert any("dsn" in p for p in problems) and any("set preset" in p for p in problems)


def test_several_state_mapping_problems_are_all_reported(tmp_path: Path) -> None:
    config_file = write(
        tmp_path,
        one_target(
            table_text="""\
            name: jobs
            state:
              column: status
              succeeded: [done]
              failed: [done, broken]
              dead: [broken]
            timestamps: {enqueued: created_at, started: started_at}
            """
        ),
    )
    lines = [split(p) for p in problems_of(config_file)]
    assert (
        f"{T0}.table.state.failed[0]",
        "value 'done' is mapped to both 'succeeded' and 'failed'",
    ) in [(path, message.split(":")[0]) for path, message in lines]
    assert (
        f"{T0}.table.state.dead[0]",
        "value 'broken' is mapped to both 'failed' and 'dead'",
    ) in [(path, message.split(":")[0]) for path, message in lines]
    assert f"{T0}.table.state.running" in [path for path, _ in lines]
    assert f"{T0}.table.state" in [path for path, _ in lines]
    assert len(lines) == 4, lines


def test_missing_env_vars_are_all_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    monkeypatch.delenv(UNSET_VAR + "_2", raising=False)
    config_file = write(
        tmp_path,
        f"""\
        targets:
          - name: a
            dsn: postgresql://${{{UNSET_VAR}}}@db/${{{UNSET_VAR}_2}}
            preset: procrastinate
          - name: b
            dsn_file: ${{{UNSET_VAR}}}
            preset: procrastinate
        """,
    )
    problems = problems_of(config_file)
    assert [split(p)[0] for p in problems] == [
        "targets[0](a).dsn",
        "targets[0](a).dsn",
        "targets[1](b).dsn_file",
    ]
    assert f"{UNSET_VAR}_2 is not set" in problems[1]


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    problems = problems_of(missing)
    assert problems == [f"{missing}: cannot read config file: No such file or directory"]


def test_config_file_that_is_not_text(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_bytes(b"targets: \xff\xfe\n")
    (problem,) = problems_of(config_file)
    assert problem.startswith(f"{config_file}: cannot read config file: not UTF-8")


def test_empty_dsn_file(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("\n")
    config_file = write(tmp_path, "targets:\n- {name: a, dsn_file: dsn, preset: publaryn}\n")
    (problem,) = problems_of(config_file)
    assert problem == f"targets[0](a).dsn_file: {tmp_path / 'dsn'} is empty: put the DSN in it"


def test_dsn_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    config_file = write(tmp_path, "targets:\n- {name: a, dsn_file: secrets, preset: publaryn}\n")
    (problem,) = problems_of(config_file)
    assert (
        problem == f"targets[0](a).dsn_file: {tmp_path / 'secrets'} does not exist or is not a file"
    )


@pytest.mark.parametrize(
    "name",
    ["main\n", "-lead", "a" * 64, "", "ünï", "a/b"],
    ids=["trailing-newline", "leading-dash", "64-chars", "empty", "unicode", "slash"],
)
def test_invalid_target_names(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_data(
            {"targets": [{"name": name, "dsn": "postgresql://u@h/db", "preset": "publaryn"}]}
        )
    (problem,) = info.value.problems
    assert split(problem)[0].endswith(".name")
    assert "must be 1-63 characters" in problem


@pytest.mark.parametrize("label", ["team\n", "1team", "a.b", "__name__"])
def test_invalid_label_names(label: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_data(
            {
                "targets": [
                    {
                        "name": "a",
                        "dsn": "postgresql://u@h/db",
                        "preset": "publaryn",
                        "labels": {label: "v"},
                    }
                ]
            }
        )
    (problem,) = info.value.problems
    assert split(problem)[0] == f"targets[0](a).labels.{label}"
    assert "not a valid Prometheus label name" in problem


@pytest.mark.parametrize(
    "label", ["target", "queue", "kind", "state", "outcome", "job", "instance"]
)
def test_reserved_label_names(label: str) -> None:
    with pytest.raises(ConfigError, match=f"labels.{label}: label name '{label}' is reserved"):
        load_config_data(
            {
                "targets": [
                    {
                        "name": "a",
                        "dsn": "postgresql://u@h/db",
                        "preset": "publaryn",
                        "labels": {label: "v"},
                    }
                ]
            }
        )


# -- valid configs ------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, one_target()))
    assert config.poll_interval == 15.0
    assert config.listen == DEFAULT_LISTEN == "0.0.0.0:17410"
    assert config.log_format == "text" and config.log_level == "info"
    (target,) = config.targets
    assert target.success_window == 600.0
    assert target.statement_timeout == 5.0
    assert target.lock_timeout == 1.0
    assert target.stale_after is None
    assert target.max_kinds_per_queue == 20
    assert target.max_queues == 15 and target.label_ttl == 3600.0
    assert target.finished_counting == "auto"
    assert target.count_terminal_states is False
    assert target.queues is None and target.labels == {}
    assert target.preset_name == "procrastinate"
    assert config.interval_for(target) == 15.0


def test_per_target_poll_interval_override(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            poll_interval: 1m
            targets:
              - {name: fast, dsn: postgresql://a/db, preset: procrastinate, poll_interval: 250ms}
              - {name: slow, dsn: postgresql://b/db, preset: publaryn}
            """,
        )
    )
    fast, slow = config.targets
    assert config.poll_interval == 60.0
    assert config.interval_for(fast) == 0.25
    assert config.interval_for(slow) == 60.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2d", 172800.0),
        ("1m30s500ms", 90.5),
        (" 10s ", 10.0),
        ("45", 45.0),
        ("0.5", 0.5),
        (45, 45.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_durations(text, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 minutes", "10x", "m5", "1h 30m", "", "s", "--5s", "5M"])
def test_invalid_durations_in_config(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_data(
            {
                "targets": [
                    {
                        "name": "a",
                        "dsn": "postgresql://u@h/db",
                        "preset": "publaryn",
                        "stale_after": text,
                    }
                ]
            }
        )
    (problem,) = info.value.problems
    assert split(problem)[0] == "targets[0](a).stale_after"
    assert "invalid duration" in problem and "30s, 5m, 1h" in problem


@pytest.mark.parametrize("value", [True, None, [1], {"s": 1}])
def test_non_duration_types(value) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


def test_duration_values_in_yaml(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            poll_interval: 250ms
            targets:
              - name: a
                dsn: postgresql://x/db
                preset: procrastinate
                stale_after: 1h30m
                success_window: 5m
                statement_timeout: 30s
                lock_timeout: 0.5
                poll_interval: 2
            """,
        )
    )
    (target,) = config.targets
    assert config.poll_interval == 0.25
    assert target.stale_after == 5400.0
    assert target.success_window == 300.0
    assert target.statement_timeout == 30.0
    assert target.lock_timeout == 0.5
    assert config.interval_for(target) == 2.0


def test_env_interpolation(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JQ_TEST_DSN", "postgresql://app@db.internal:5432/jobs")
    monkeypatch.setenv("JQ_TEST_USER", "reader")
    monkeypatch.setenv("JQ_TEST_EMPTY", "")
    monkeypatch.setenv("JQ_TEST_INTERVAL", "30")
    monkeypatch.delenv(UNSET_VAR, raising=False)
    config = load_config(
        write(
            tmp_path,
            f"""\
            poll_interval: ${{JQ_TEST_INTERVAL}}
            targets:
              - name: plain
                dsn: ${{JQ_TEST_DSN}}
                preset: procrastinate
              - name: defaulted
                dsn: ${{{UNSET_VAR}:-postgresql://fallback/db}}
                preset: procrastinate
              - name: embedded
                dsn: postgresql://${{JQ_TEST_USER}}@host/${{{UNSET_VAR}:-jobs}}
                preset: publaryn
                labels:
                  env: ${{{UNSET_VAR}:-prod}}
              - name: empty-uses-default
                dsn: ${{JQ_TEST_EMPTY:-postgresql://default/db}}
                preset: publaryn
                stale_after: ${{{UNSET_VAR}:-2m}}
            """,
        )
    )
    plain, defaulted, embedded, empty = config.targets
    assert config.poll_interval == 30.0
    assert plain.resolve_dsn() == "postgresql://app@db.internal:5432/jobs"
    assert defaulted.resolve_dsn() == "postgresql://fallback/db"
    assert embedded.resolve_dsn() == "postgresql://reader@host/jobs"
    assert embedded.labels == {"env": "prod"}
    assert empty.resolve_dsn() == "postgresql://default/db"
    assert empty.stale_after == 120.0


def test_env_var_set_but_empty_without_default_is_an_empty_dsn(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JQ_TEST_EMPTY", "")
    (problem,) = problems_of(
        write(tmp_path, "targets:\n- {name: a, dsn: '${JQ_TEST_EMPTY}', preset: publaryn}\n")
    )
    assert problem.startswith("targets[0](a).dsn: dsn is empty")


def test_dsn_file_is_relative_to_the_config_file(tmp_path: Path, monkeypatch) -> None:
    conf_dir = tmp_path / "etc" / "exporter"
    (conf_dir / "secrets").mkdir(parents=True)
    (conf_dir / "secrets" / "dsn").write_text("postgresql://secret@db/jobs\n")
    absolute = tmp_path / "absolute-dsn"
    absolute.write_text("  postgresql://abs@db/jobs  \n")
    config_file = write(
        conf_dir,
        f"""\
        targets:
          - {{name: rel, dsn_file: secrets/dsn, preset: procrastinate}}
          - {{name: abs, dsn_file: "{absolute}", preset: publaryn}}
        """,
    )
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    rel, abs_ = load_config(os.path.relpath(config_file, elsewhere)).targets
    assert rel.dsn_file == conf_dir / "secrets" / "dsn"
    assert rel.dsn_file.is_absolute()
    assert rel.resolve_dsn() == "postgresql://secret@db/jobs"
    assert abs_.dsn_file == absolute
    assert abs_.resolve_dsn() == "postgresql://abs@db/jobs"


def test_generic_table_mapping(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            targets:
              - name: home-grown
                dsn: postgresql://x/db
                preset: generic
                table:
                  name: background_jobs
                  schema: app
                  id: job_id
                  queue: queue_name
                  kind: task
                  attempts: attempt_count
                  state:
                    column: status
                    pending: [queued]
                    scheduled: [scheduled]
                    running: [running, locked]
                    retrying: [retry]
                    succeeded: [done]
                    failed: [error]
                    dead: [dead]
                    cancelled: [cancelled]
                  timestamps:
                    enqueued: created_at
                    eligible: run_at
                    started: locked_at
                    finished: finished_at
                  stale:
                    heartbeat: heartbeat_at
            """,
        )
    )
    (target,) = config.targets
    mapping = target.table
    assert mapping is not None and target.preset_name == "generic"
    assert mapping.schema_ == "app" and mapping.id == "job_id"
    assert mapping.state.running == ["running", "locked"]
    assert mapping.state.values_for("pending", "retrying") == ["queued", "retry"]
    assert mapping.stale is not None
    assert (mapping.stale.kind, mapping.stale.column) == ("heartbeat", "heartbeat_at")


def test_table_without_preset_is_generic(tmp_path: Path) -> None:
    (target,) = load_config(write(tmp_path, one_target(table_text=TABLE))).targets
    assert target.preset is None and target.preset_name == "generic"


def test_started_before_replaces_timestamps_started(tmp_path: Path) -> None:
    text = one_target(
        table_text=TABLE.replace("  started: started_at\n", "")
        + "stale: {started_before: locked_at}\n"
    )
    (target,) = load_config(write(tmp_path, text)).targets
    assert target.table is not None and target.table.timestamps.started is None


def test_numeric_and_boolean_state_values(tmp_path: Path) -> None:
    """An integer (or boolean) state column: YAML numbers are accepted as their text form."""
    text = one_target(
        table_text=TABLE.replace("pending: [pending]", "pending: [0, '1']")
        .replace("running: [running]", "running: [2]")
        .replace("timestamps:", "  failed: [-1]\ntimestamps:")
    )
    (target,) = load_config(write(tmp_path, text)).targets
    assert target.table is not None
    assert target.table.state.pending == ["0", "1"]
    assert target.table.state.running == ["2"]
    assert target.table.state.failed == ["-1"]
    (bool_target,) = load_config_data(
        {
            "targets": [
                {
                    "name": "b",
                    "dsn": "postgresql://u@h/db",
                    "table": {
                        "name": "jobs",
                        "state": {"column": "busy", "running": [True], "pending": [False]},
                        "timestamps": {"enqueued": "c", "started": "s"},
                    },
                }
            ]
        }
    ).targets
    assert bool_target.table is not None
    assert bool_target.table.state.running == ["true"]
    assert bool_target.table.state.pending == ["false"]


@pytest.mark.parametrize(
    "identifier", ["order", "select", "Status", "_jobs", "JOBS2", "a" * 63, "user", "from"]
)
def test_keywords_and_mixed_case_identifiers_are_valid(identifier: str) -> None:
    config = load_config_data(
        {
            "targets": [
                {
                    "name": "a",
                    "dsn": "postgresql://u@h/db",
                    "schema": identifier,
                    "table": {
                        "name": identifier,
                        "schema": identifier,
                        "id": identifier,
                        "queue": identifier,
                        "state": {"column": identifier, "running": ["r"], "pending": ["p"]},
                        "timestamps": {"enqueued": identifier, "started": identifier},
                    },
                }
            ]
        }
    )
    mapping = config.targets[0].table
    assert mapping is not None and mapping.name == identifier == mapping.state.column


def test_listen_addresses(tmp_path: Path) -> None:
    for listen in ["127.0.0.1:9000", "[::]:17410", "[::1]:8080", ":9100", "exporter.local:80"]:
        config = load_config(write(tmp_path, one_target(head=f"listen: '{listen}'\n")))
        assert config.listen == listen


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """Duplicate keys are rejected, but a key overriding a ``<<`` merge is ordinary YAML."""
    config_file = write(
        tmp_path,
        """\
        targets:
          - &base {name: a, dsn: postgresql://x/db, preset: procrastinate, stale_after: 1m}
          - <<: *base
            name: b
            stale_after: 2m
        """,
    )
    a, b = load_config(config_file).targets
    assert (a.name, a.stale_after, b.name, b.stale_after) == ("a", 60.0, "b", 120.0)


# -- the CLI ------------------------------------------------------------------------------------


def test_check_valid_config_does_not_connect(tmp_path: Path) -> None:
    """``check`` passes with a DSN on a closed port, and never opens a connection to a live one."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        live_port = listener.getsockname()[1]
        config_file = write(
            tmp_path,
            f"""\
            targets:
              - name: closed
                dsn: postgresql://nobody@127.0.0.1:{closed_port()}/nothing?connect_timeout=1
                preset: procrastinate
              - name: listening
                dsn: postgresql://nobody@127.0.0.1:{live_port}/nothing
                table:
                  name: jobs
                  state: {{column: status, pending: [pending], running: [running]}}
                  timestamps: {{enqueued: created_at, started: started_at}}
                poll_interval: 5s
            """,
        )
        result = run_cli("check", "--config", str(config_file))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"{config_file}: OK (2 target(s))" in result.stdout
    assert "target closed: procrastinate, poll every 15s" in result.stdout
    assert "target listening: table jobs, poll every 5s" in result.stdout


def test_check_resolves_dsn_file_relative_to_config_not_cwd(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "dsn").write_text(f"postgresql://u@127.0.0.1:{closed_port()}/db\n")
    write(conf, "targets:\n- {name: a, dsn_file: dsn, preset: publaryn}\n")
    result = run_cli("check", "--config", "conf/config.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK (1 target(s))" in result.stdout


CLI_MISTAKES = [
    ("missing-file", None, 1, "cannot read config file: No such file or directory"),
    ("invalid-yaml", "targets:\n  - name: [a\n", 1, "not valid YAML at line 3"),
    ("empty-file", "", 1, "expected a mapping"),
    ("top-level-list", "- a\n- b\n", 1, "expected a mapping"),
    (
        "unknown-preset",
        "targets:\n- {name: a, dsn: postgresql://u@h/db, preset: celery}\n",
        1,
        "unknown preset",
    ),
    (
        "many-problems",
        "poll_intervall: 5s\nlog_format: xml\n"
        "targets:\n- {name: a, preset: celery, stale_after: 5 minutes, labels: {queue: q}}\n"
        "- {name: b, dsn: '${" + UNSET_VAR + ":-}', preset: publaryn}\n",
        6,
        "did you mean 'poll_interval'",
    ),
    (
        "missing-env-var",
        "targets:\n- {name: a, dsn: '${" + UNSET_VAR + "}', preset: publaryn}\n",
        1,
        f"{UNSET_VAR} is not set",
    ),
    (
        "dsn-file-missing",
        "targets:\n- {name: a, dsn_file: missing.txt, preset: publaryn}\n",
        1,
        "does not exist",
    ),
    (
        "injection-in-table-name",
        "targets:\n- name: a\n  dsn: postgresql://u@h/db\n  table:\n    name: 'jobs; DROP TABLE x; --'\n"
        "    state: {column: s, pending: [p], running: [r]}\n"
        "    timestamps: {enqueued: e, started: s}\n",
        1,
        "targets[0](a).table.name: 'jobs; DROP TABLE x; --' is not a plain SQL identifier",
    ),
]


@pytest.mark.parametrize(
    ("text", "lines", "fragment"),
    [pytest.param(text, lines, fragment, id=name) for name, text, lines, fragment in CLI_MISTAKES],
)
def test_check_invalid_config_exits_2_with_one_line_per_problem(
    tmp_path: Path, text: str | None, lines: int, fragment: str
) -> None:
    config_file = tmp_path / "config.yaml"
    if text is not None:
        config_file.write_text(text)
    result = run_cli("check", "--config", str(config_file))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "OK" not in result.stdout
    error_lines = result.stderr.splitlines()
    assert len(error_lines) == lines, result.stderr
    assert all(line.startswith("error: ") for line in error_lines), result.stderr
    assert fragment in result.stderr


def test_run_and_once_reject_invalid_config_like_check(tmp_path: Path) -> None:
    config_file = write(
        tmp_path, "targets:\n- {name: a, dsn: postgresql://u@h/db, preset: celery}\n"
    )
    for command in ("run", "once"):
        result = run_cli(command, "--config", str(config_file))
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith("error: targets[0](a).preset: unknown preset 'celery'")
        assert "Traceback" not in result.stderr


def test_once_against_unreachable_database(tmp_path: Path) -> None:
    port = closed_port()
    config_file = write(
        tmp_path,
        f"""\
        targets:
          - name: down
            dsn: postgresql://nobody@127.0.0.1:{port}/nothing
            preset: procrastinate
          - name: labelled
            dsn: postgresql://nobody@127.0.0.1:{port}/other
            preset: publaryn
        """,
    )
    result = run_cli("once", "--config", str(config_file))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert 'jobqueue_up{target="down"} 0' in result.stdout
    assert 'jobqueue_up{target="labelled"} 0' in result.stdout
    assert 'jobqueue_poll_errors_total{target="down",reason="connection"} 1' in result.stdout
    error_lines = sorted(result.stderr.splitlines())
    assert len(error_lines) == 2, result.stderr
    assert error_lines[0].startswith("error: down: connection:")
    assert error_lines[1].startswith("error: labelled: connection:")
    assert all(str(port) in line for line in error_lines)
