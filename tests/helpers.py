"""Small helpers shared by the tests (conditions, DSNs, config building)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

from jobqueue_exporter.config import Config, load_config_data


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


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
