"""Small helpers shared by the tests (conditions, DSNs, config building)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

from jobqueue_exporter.config import Config, load_config_data


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def create_database(admin_dsn: str, prefix: str = "jqtest") -> str:
    import uuid

    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        # a test may have closed the database to connections (a target made unreachable)
        await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def make_config(*targets: dict, **global_settings) -> Config:
    return load_config_data({"targets": list(targets), **global_settings})


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = ""):
    """Poll ``predicate`` (sync or async) until it returns a truthy value; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")
        await asyncio.sleep(interval)


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text -> {(sample name, frozenset of label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(*pollers) -> dict[tuple[str, frozenset], float]:
    """What /metrics would serve for these pollers right now."""
    from jobqueue_exporter.metrics import MetricsCache

    cache = MetricsCache([p.state for p in pollers])
    return parse_metrics(cache.join(openmetrics=False, gzip=False).decode())


def series(samples: dict, name: str, **labels: str) -> dict[frozenset, float]:
    """Samples of one metric whose labels include ``labels``."""
    wanted = set(labels.items())
    return {lbls: v for (n, lbls), v in samples.items() if n == name and wanted <= lbls}


def value(samples: dict, name: str, **labels: str) -> float:
    found = series(samples, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, found {sorted(map(dict, found))}"
    return next(iter(found.values()))


def require_binary(name: str) -> str:
    """Path of a tool the test needs; skipped where it is not installed, but a failure in CI
    (`.ci/run` installs it), so CI can never pass by skipping."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian: see .ci/run)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def redis_url_for(url: str, db: int, user: str | None = None, password: str | None = None) -> str:
    """``url`` with another database number (and, when given, user and password)."""
    from urllib.parse import quote

    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if user is not None:
        netloc = f"{quote(user, safe='')}:{quote(password or '', safe='')}@{netloc}"
    elif "@" in parts.netloc:
        netloc = parts.netloc
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{db}"))
