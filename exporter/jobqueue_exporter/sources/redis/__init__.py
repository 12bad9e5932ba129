"""The Redis source: one redis-py (asyncio) connection per target, reads only.

* one connection per target (a pool of one: redis-py's pipelines take a pool connection, so a
  ``single_connection_client`` would still open a second one), opened lazily, closed after any error;
* every command has the target's ``socket_timeout`` (Redis has no server-side statement timeout);
* a poll is a few pipelined round trips of plain read commands (the preset's); no Lua, no KEYS, no
  library helper. The suite runs them as a user whose ACL allows only those commands (README: Redis);
* a Redis restart, a refused connection or a timeout is a failed poll like any other.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import redis.asyncio as aioredis
from redis import exceptions as rexc

from ...config import Target
from .. import Capabilities, JobActions, Reading, SourceFailure
from .presets import PRESETS, Memory, RedisPreset

log = logging.getLogger(__name__)


def describe_endpoint(url: str) -> str:
    """``host:port`` (or the socket path) of a Redis URL, for messages; never the password."""
    try:
        from redis.connection import parse_url

        parts = parse_url(url)
    except ValueError:
        return "the Redis server"
    if "path" in parts:
        return f"socket {parts['path']}"
    host, port = parts.get("host", "localhost"), parts.get("port", 6379)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def explain(exc: BaseException, connecting: bool, endpoint: str) -> SourceFailure:
    if isinstance(exc, SourceFailure):
        return exc
    if isinstance(exc, socket.gaierror):
        return SourceFailure("connection", f"could not resolve host {endpoint.rsplit(':', 1)[0]}")
    if isinstance(exc, (asyncio.TimeoutError, rexc.TimeoutError)):
        return SourceFailure(
            "connection" if connecting else "timeout", f"no answer from {endpoint}"
        )
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, rexc.AuthenticationError):
        return SourceFailure("connection", f"cannot connect to {endpoint}: {text}")
    if isinstance(exc, rexc.NoPermissionError):
        return SourceFailure(
            "query",
            f"{text} (on {endpoint}): grant the exporter's user the commands in README: Redis",
        )
    if isinstance(exc, (rexc.ConnectionError, OSError)):
        if connecting or "refused" in text.lower():
            return SourceFailure("connection", f"cannot connect to {endpoint}: {text}")
        return SourceFailure("connection", f"connection to {endpoint} lost during poll: {text}")
    return SourceFailure("query", text)


class RedisSource:
    def __init__(self, target: Target, connect_timeout: float):
        self.target = target
        self.connect_timeout = min(10.0, connect_timeout)
        self.preset: RedisPreset = PRESETS[target.preset_name]
        self.endpoint = describe_endpoint(target.dsn or "")
        self.capabilities = Capabilities(
            preset=self.preset.name,
            outcomes=self.preset.outcomes,
            default_stale_after=self.preset.default_stale_after,
            self_rescue=self.preset.self_rescue,
            finished_counting=target.finished_counting != "off",
            terminal_states=True,
            stale_jobs=True,
        )
        self.connecting = False
        self._client: aioredis.Redis | None = None
        self._aborting: asyncio.Future[None] | None = None
        self._memory = Memory()

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def _connect(self) -> aioredis.Redis:
        url = self.target.resolve_dsn()
        self.endpoint = describe_endpoint(url)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=1,
            timeout=self.target.socket_timeout,
            socket_timeout=self.target.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            retry_on_timeout=False,
            client_name=f"jobqueue-exporter/{self.target.name}"[:63].replace(" ", "_"),
        )
        client = aioredis.Redis(connection_pool=pool)
        self._client = client
        await client.ping()
        return client

    async def read(self, stale_after: float, want_stale: bool) -> Reading:
        if self._client is None:
            self.connecting = True
            client = await self._connect()
            self.connecting = False
        else:
            client = self._client
        reading = await self.preset.read(client, self.target, stale_after, want_stale, self._memory)
        if self.target.finished_counting == "off":
            reading = Reading(
                live=reading.live,
                terminal=reading.terminal,
                stale=reading.stale,
                paused=reading.paused,
            )
        return reading

    def abort(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # drop the socket without waiting on a server that stopped answering
            self._aborting = asyncio.ensure_future(
                client.connection_pool.disconnect(inuse_connections=True)
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.aclose(), timeout=2.0)
            except BaseException:  # noqa: BLE001 - closing a dead connection may fail any way
                pass

    def explain(self, exc: BaseException, connecting: bool) -> SourceFailure:
        return explain(exc, connecting, self.endpoint)

    def actions(self) -> JobActions:
        raise NotImplementedError("no job verbs for Redis targets yet (report-only)")
