"""Errors a new user meets (issue 9): each names the key or the thing that is wrong, and the fix."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import yaml
from helpers import make_config
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.sources import SchemaProblem
from test_operate import cli


async def test_a_table_in_another_schema_is_named_with_the_fix(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        "CREATE SCHEMA jobs; CREATE TABLE jobs.work (id serial PRIMARY KEY, status text,"
        " created_at timestamptz, started_at timestamptz)"
    )
    table = {
        "name": "work",
        "state": {"column": "status", "pending": ["p"], "running": ["r"]},
        "timestamps": {"enqueued": "created_at", "started": "started_at"},
    }
    config = make_config({"name": "home", "dsn": dsn, "table": table})
    with pytest.raises(SchemaProblem) as raised:
        await TargetPoller(config, config.targets[0]).poll_once()
    assert (
        "table 'work' not found in the search_path; a table of that name exists in schema jobs: "
        "set schema: jobs on the target" in str(raised.value)
    )
    fixed = make_config({"name": "home", "dsn": dsn, "table": table, "schema": "jobs"})
    await TargetPoller(fixed, fixed.targets[0]).poll_once()


async def test_listen_port_out_of_range_is_named(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"targets": [{"name": "a", "dsn": "postgresql://u@h/db", "preset": "publaryn"}]}
        )
    )
    code, _, err = await cli("run", "--config", str(config), "--listen", "127.0.0.1:99999")
    assert code == 2 and "Traceback" not in err
    assert (
        "error: --listen: listen address '127.0.0.1:99999': port 99999 is out of range (0-65535)"
        in err
    )


async def test_an_operator_command_names_an_unknown_host(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    target = {"name": "a", "dsn": "postgresql://u@db.invalid:5432/db", "preset": "publaryn"}
    config.write_text(yaml.safe_dump({"targets": [target]}))
    code, _, err = await cli("jobs", "--config", str(config), "--target", "a")
    assert code == 1 and "Traceback" not in err
    assert "error: target a: could not resolve host db.invalid" in err


@pytest.mark.parametrize(
    ("dsn", "fragment"),
    [
        ("mysql://app@db:3306/app", "scheme 'mysql' is not supported"),
        ("postgresql://app@db:notaport/app", "port is not a number"),
        ("postgresql://app@db:99999/app", "port 99999 is out of range"),
        ("postgresql://app@db/app?sslmode=bogus", "sslmode 'bogus' is not valid"),
        ("postgresql://app:p@ss@db/app", "the password contains an unencoded '@'"),
        ("host=db dbname=app user=app password=s3cret", "use the URI form instead"),
    ],
    ids=["mysql", "port-word", "port-range", "sslmode", "at-in-password", "keyword-form"],
)
async def test_check_rejects_bad_dsns_naming_the_key_and_the_fix(
    tmp_path: Path, dsn: str, fragment: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"targets": [{"name": "a", "dsn": dsn, "preset": "publaryn"}]})
    )
    code, out, err = await cli("check", "--config", str(config))
    assert code == 2 and "Traceback" not in err, (out, err)
    (line,) = err.splitlines()
    assert line.startswith("error: targets[0](a).dsn: ") and fragment in line
    assert "s3cret" not in err and "p@ss" not in err, "never the password"


async def test_a_bad_dsn_in_a_dsn_file_is_named_too(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("postgresql://app@db:5432/app?sslmode=verify_ca\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"targets": [{"name": "a", "dsn_file": "dsn", "preset": "publaryn"}]})
    )
    code, _, err = await cli("check", "--config", str(config))
    assert code == 2
    assert "targets[0](a).dsn_file: " in err and "did you mean 'verify-ca'?" in err
