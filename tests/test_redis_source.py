"""The Redis source's edges, whatever the preset: the DSN scheme selects it, a preset of the other source
is a config error naming both, outages and timeouts are failed polls like on PostgreSQL, and the
exporter's user needs nothing beyond the documented read-only ACL."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import redis
from helpers import make_config, scrape, series, value
from jobqueue_exporter.config import ConfigError
from jobqueue_exporter.poll import TargetPoller
from jobqueue_exporter.sources import SourceFailure
from jobqueue_exporter.sources.redis import RedisSource

pytestmark = pytest.mark.redis  # also run against Debian's redis-server in CI


def poller(url: str, **target) -> TargetPoller:
    config = make_config({"name": "q", "dsn": url, "preset": "asynq", **target})
    return TargetPoller(config, config.targets[0])


def test_the_scheme_selects_the_source() -> None:
    for url in ("redis://h:6379/0", "rediss://u:p@h:6380/2", "unix:///run/redis.sock?db=1"):
        target = make_config({"name": "q", "dsn": url, "preset": "asynq"}).targets[0]
        assert target.source_kind == "redis"
    target = make_config({"name": "q", "dsn": "postgresql://u@h/db", "preset": "publaryn"}).targets[
        0
    ]
    assert target.source_kind == "postgres"


@pytest.mark.parametrize(
    ("dsn", "preset", "fragment"),
    [
        (
            "postgresql://u@h/db",
            "asynq",
            "preset 'asynq' reads Redis, but dsn is a PostgreSQL URL: use a Redis DSN (e.g. "
            "redis://user:password@host:6379/0) or a PostgreSQL preset (generic, procrastinate, "
            "publaryn)",
        ),
        (
            "redis://h:6379/0",
            "procrastinate",
            "preset 'procrastinate' reads PostgreSQL, but dsn is a Redis URL: use a PostgreSQL DSN",
        ),
        ("redis://h:notaport/0", "asynq", "port is not a number"),
        ("redis://h:6379/zero", "asynq", "database 'zero' is not a number"),
        ("redis://u:p@ss@h:6379/0", "asynq", "unencoded '@'"),
    ],
)
def test_bad_redis_targets_name_the_fix(dsn: str, preset: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config({"name": "q", "dsn": dsn, "preset": preset})
    assert fragment in str(raised.value)
    assert "p@ss" not in str(raised.value)


def test_recovery_is_refused_for_redis_targets() -> None:
    with pytest.raises(ConfigError, match="asynq targets are report-only"):
        make_config(
            {"name": "q", "dsn": "redis://h/0", "preset": "asynq", "recovery": {"enabled": True}}
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_refused_connection_is_down_with_the_endpoint() -> None:
    port = free_port()
    p = poller(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(redis.exceptions.ConnectionError):
        await p.poll_once()
    samples = scrape(p)
    assert value(samples, "jobqueue_up", target="q") == 0
    assert value(samples, "jobqueue_poll_errors_total", reason="connection") == 1
    assert f"127.0.0.1:{port}" in (p.state.last_error or "")
    assert series(samples, "jobqueue_jobs") == {}


async def test_a_server_that_does_not_answer_times_out(redis_admin_url: str) -> None:
    # a listening socket that never answers: connect succeeds, PING never returns
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        p = poller(f"redis://127.0.0.1:{port}/0", socket_timeout="300ms", poll_interval="2s")
        with pytest.raises((redis.exceptions.TimeoutError, TimeoutError)):
            await p.poll_once()
    assert p.state.up is False
    assert "no answer from 127.0.0.1" in (p.state.last_error or "")


async def test_a_command_outside_the_acl_is_a_query_error(
    redis_db: tuple[str, int], redis_admin_url: str, redis_reader_url: Callable[[str], str]
) -> None:
    url = redis_reader_url("asynq")
    reader = redis.Redis.from_url(url)
    try:
        assert reader.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.set("asynq:x", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.get("other:key")
    finally:
        reader.close()
    source = RedisSource(make_config({"name": "q", "dsn": url, "preset": "asynq"}).targets[0], 5)
    failure = source.explain(redis.exceptions.NoPermissionError("NOPERM no permissions"), False)
    assert isinstance(failure, SourceFailure) and failure.reason == "query"
    assert "README: Redis" in str(failure)


async def test_operator_commands_say_they_are_not_available_for_redis(tmp_path) -> None:
    from test_operate import cli

    config = tmp_path / "c.yaml"
    config.write_text("targets:\n- {name: tasks, dsn: 'redis://127.0.0.1:1/0', preset: asynq}\n")
    code, _, err = await cli("jobs", "--config", str(config), "--target", "tasks")
    assert code == 2 and "Traceback" not in err
    assert "the operator commands are not available for Redis targets yet" in err


async def test_one_connection_per_target(
    redis_db: tuple[str, int], redis_reader_url: Callable[[str], str]
) -> None:
    """Pipelines and single commands share the target's one connection."""
    url, _ = redis_db
    p = poller(redis_reader_url("asynq"), queues=["default"])
    for _ in range(3):
        await p.poll_once()
    admin = redis.Redis.from_url(url)
    try:
        mine = [c for c in admin.client_list() if c.get("name") == "jobqueue-exporter/q"]
    finally:
        admin.close()
    assert len(mine) == 1, mine
    await p.close()
