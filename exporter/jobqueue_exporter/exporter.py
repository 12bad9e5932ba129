"""The running exporter: one poller per target publishing to the metrics cache, and the HTTP server that
serves it. ``Exporter.start`` returns once listening; ``stop`` ends polling and serving in well under a
second whatever the stores do. ``serve`` runs it until SIGTERM/SIGINT (``jobqueue-exporter run``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import Config, ConfigError, parse_listen
from .http import OPEN_PATHS, ConnectionGuard, GuardedSite, HttpLimits, HttpStats, make_app
from .metrics import MetricsCache
from .poll import TargetPoller

if TYPE_CHECKING:
    from .webconfig import WebConfig

log = logging.getLogger("jobqueue_exporter")


def build_pollers(config: Config, cache: MetricsCache | None = None) -> list[TargetPoller]:
    """One poller per target; with a cache, each publishes to it after every poll."""
    pollers = [TargetPoller(config, target) for target in config.targets]
    if cache is not None:
        for poller in pollers:
            poller.on_update = cache.update
    return pollers


def build_cache(pollers: Sequence[TargetPoller]) -> MetricsCache:
    cache = MetricsCache([p.state for p in pollers])
    for poller in pollers:
        poller.on_update = cache.update
    return cache


class Exporter:
    """Pollers + HTTP server; ``start`` returns once listening, ``stop`` tears everything down."""

    def __init__(
        self,
        config: Config,
        listen: str | None = None,
        web_config: WebConfig | None = None,
        limits: HttpLimits | None = None,
    ):
        self.config = config
        self.host, self.port = parse_listen(listen or config.listen)
        self.web_config = web_config
        self.limits = limits or HttpLimits()
        self.pollers = build_pollers(config)
        self.cache = build_cache(self.pollers)
        self.stats = HttpStats()
        self.stop_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self.web_config.ssl_context() if self.web_config is not None else None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    async def start(self) -> None:
        guard = ConnectionGuard(self.limits, self.stats)
        middlewares: list[Any] = [guard.middleware]
        if self.web_config is not None:
            middlewares.append(self.web_config.middleware(OPEN_PATHS))
        app = make_app(
            self.cache,
            self.pollers,
            limits=self.limits,
            stats=self.stats,
            middlewares=middlewares,
            is_authenticated=self.web_config.is_authenticated if self.web_config else None,
            headers=self.web_config.headers if self.web_config else None,
        )
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=0.5,
            keepalive_timeout=self.limits.idle_timeout,
            handler_cancellation=True,  # a scraper that goes away cancels its request's work
        )
        await self._runner.setup()
        site = GuardedSite(self._runner, guard, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError([f"listen: {exc.strerror or exc}"]) from None
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        for poller in self.pollers:
            self._tasks.append(
                asyncio.create_task(poller.run(self.stop_event), name=poller.target.name)
            )
        log.info(
            "listening on %s://%s:%d/metrics, polling %d target(s)",
            self.scheme,
            self.host,
            self.port,
            len(self.pollers),
        )

    async def stop(self, grace: float = 0.25) -> None:
        """Stop polling and serving, in well under a second whatever the database does.

        Polls in flight are cancelled and every connection is closed gracefully, but a server that has
        not acknowledged within ``grace`` (a healthy one takes milliseconds) is not waited for: its
        connections are terminated. The HTTP server stops meanwhile (responses in flight get 0.5 s)."""
        self.stop_event.set()
        for task in self._tasks:
            task.cancel()

        async def close_pollers() -> None:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.gather(*(p.close() for p in self.pollers), return_exceptions=True)

        async def stop_polling() -> None:
            closing = asyncio.ensure_future(close_pollers())
            done, _ = await asyncio.wait([closing], timeout=grace)
            if not done:
                # a cancelled poll's close() waits on the server twice, up to 2 s when it does not
                # answer: drop every connection, those closing gracefully included
                for poller in self.pollers:
                    poller.abort()
                await closing

        async def stop_serving() -> None:
            runner, self._runner = self._runner, None
            if runner is not None:
                await runner.cleanup()

        await asyncio.gather(stop_polling(), stop_serving())


async def serve(
    config: Config, listen: str | None, web_config: WebConfig | None, limits: HttpLimits
) -> None:
    exporter = Exporter(config, listen, web_config, limits)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await exporter.start()
    await stop.wait()
    log.info("shutting down")
    # stop() takes well under a second (a hung database included); this is only a backstop
    try:
        await asyncio.wait_for(exporter.stop(), timeout=2.0)
    except asyncio.TimeoutError:
        log.warning("shutdown did not finish within 2s; exiting anyway")
    # Nothing is left to free but the whole heap, which the interpreter tears down on exit: its final
    # garbage collections would scan every object (60 ms idle, up to 0.5 s on a loaded machine).
    gc.freeze()


async def poll_all_once(config: Config) -> tuple[bytes, list[str]]:
    """Poll every target once, concurrently; return the exposition and per-target failures."""
    pollers = build_pollers(config)
    cache = build_cache(pollers)
    failures: list[str] = []

    async def one(poller: TargetPoller) -> None:
        try:
            await poller.poll_once()
        except Exception:  # noqa: BLE001 - reported per target below
            failures.append(f"{poller.target.name}: {poller.state.last_error}")
        finally:
            await poller.close()

    await asyncio.gather(*(one(p) for p in pollers))
    return cache.join(openmetrics=False, gzip=False), failures
