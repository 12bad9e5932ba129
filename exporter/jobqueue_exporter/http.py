"""HTTP: /metrics (Prometheus text or OpenMetrics, gzip when asked), /healthz, /readyz, a landing page.

The serving path does no rendering: /metrics writes bytes the metrics cache joined once per poll, so
/healthz and /readyz answer in milliseconds whatever the scrape load. The edge is guarded the way Go
exporters are: a deadline for request headers (slowloris), an idle timeout for kept-alive connections,
a cap on open connections and on concurrent scrapes, and a write deadline, so a scraper that stops
reading or goes away holds nothing for long.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import __version__
from .metrics import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, MetricsCache
from .poll import TargetPoller

READY_INTERVALS = 3
WRITE_CHUNK = 256 * 1024  # a slow reader buffers at most about this much of a body
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # /readyz details need credentials


@dataclass(frozen=True)
class HttpLimits:
    """Server-side limits of the HTTP edge (command-line flags of ``run``)."""

    header_timeout: float = 10.0  # request headers complete within this of the first byte / connect
    idle_timeout: float = 120.0  # a kept-alive connection with no request is closed after this
    max_connections: int = 64  # further connections are closed at once
    max_concurrent_scrapes: int = 8  # further /metrics requests wait for a slot
    scrape_timeout: float = 30.0  # upper bound of a /metrics request, waiting for a slot included


@dataclass
class HttpStats:
    """What the edge is doing, for tests and the landing page."""

    connections_open: int = 0
    connections_rejected: int = 0
    connections_timed_out: int = 0
    scrapes_in_flight: int = 0
    scrapes_served: int = 0
    scrapes_rejected: int = 0
    scrapes_abandoned: int = 0


class ConnectionGuard:
    """Wraps aiohttp's per-connection protocol: caps open connections and closes any connection that
    has not sent complete request headers within ``header_timeout`` of opening, or of the first byte
    of its next request after a response. aiohttp's keep-alive timeout handles idle connections."""

    def __init__(self, limits: HttpLimits, stats: HttpStats):
        self.limits = limits
        self.stats = stats
        self._watches: dict[Any, _GuardedProtocol] = {}

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(self, inner())

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        protocol = self._watches.get(request.transport)
        if protocol is not None:
            protocol.request_started()
        try:
            return await handler(request)
        finally:
            if protocol is not None:
                protocol.request_finished()


class _GuardedProtocol(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._reading = True  # a new connection owes its first request's headers
        self._rejected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        stats = self.guard.stats
        if stats.connections_open >= self.guard.limits.max_connections:
            self._rejected = True
            stats.connections_rejected += 1
            transport.abort()
            return
        stats.connections_open += 1
        self.transport = transport
        self.guard._watches[transport] = self
        self._arm()
        self.inner.connection_made(transport)

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.guard.limits.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport is not None and not self._busy:
            self.guard.stats.connections_timed_out += 1
            self.transport.abort()

    def request_started(self) -> None:
        self._busy, self._reading = True, False
        self._disarm()

    def request_finished(self) -> None:
        self._busy = False

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if not self._busy and not self._reading:
            self._reading = True  # first byte of the next request: its headers are now due
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._rejected else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._rejected:
            return
        self._disarm()
        self.guard.stats.connections_open -= 1
        self.guard._watches.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through a ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, guard: ConnectionGuard, *args: Any, **kwargs: Any):
        super().__init__(runner, *args, **kwargs)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            self.guard.factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


def wants_openmetrics(accept: str) -> bool:
    for media_range in accept.split(","):
        kind, *params = (part.strip() for part in media_range.split(";"))
        if kind == "application/openmetrics-text":
            version = dict(p.split("=", 1) for p in params if "=" in p).get("version", "1.0.0")
            if version in ("0.0.1", "1.0.0"):
                return True
    return False


def accepts_gzip(accept_encoding: str) -> bool:
    for coding in accept_encoding.split(","):
        name, *params = (part.strip() for part in coding.split(";"))
        if name.lower() == "gzip":
            return not any(
                p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params
            )
    return False


def _ago(now: float, then: float) -> str:
    return f"{max(now - then, 0):.0f}s ago"


def target_status(poller: TargetPoller, now: float) -> tuple[bool, str]:
    """(ready, one line): ready when the target was polled successfully within the last
    READY_INTERVALS intervals; the line gives the state and, when not ready, the cause."""
    state = poller.state
    name = f"{state.name} ({state.preset})"
    last = state.last_success
    if state.up is None:
        return False, f"{name}: waiting for the first poll"
    if state.up:
        assert last is not None
        took = f", took {state.last_poll_duration:.3f}s" if state.last_poll_duration else ""
        if now - last > READY_INTERVALS * poller.interval:
            return False, f"{name}: up, but last successful poll {_ago(now, last)}{took}"
        return True, f"{name}: up, polled {_ago(now, last)}{took}"
    since = f" since {_ago(now, state.down_since)}" if state.down_since else ""
    polls = state.errors.total()
    history = f"last successful poll {_ago(now, last)}" if last else "no successful poll yet"
    return False, f"{name}: DOWN{since} ({polls} failed polls), {history}: {state.last_error}"


def ready(pollers: Sequence[TargetPoller], now: float | None = None) -> tuple[bool, list[str]]:
    """Ready when every target is; ``lines`` has every target's status line."""
    now = time.time() if now is None else now
    statuses = [target_status(p, now) for p in pollers]
    return all(ok for ok, _ in statuses), [line for _, line in statuses]


def _scrape_timeout(request: web.Request, limits: HttpLimits) -> float:
    """Prometheus says how long it will wait; answer (or give up) a little before that."""
    try:
        told = float(request.headers.get("X-Prometheus-Scrape-Timeout-Seconds", ""))
    except ValueError:
        return limits.scrape_timeout
    return max(0.5, min(limits.scrape_timeout, told - 0.25))


def make_app(
    cache: MetricsCache,
    pollers: Sequence[TargetPoller],
    limits: HttpLimits | None = None,
    stats: HttpStats | None = None,
    middlewares: Sequence[Any] = (),
    is_authenticated: Callable[[web.Request], bool] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Application:
    limits = limits or HttpLimits()
    stats = stats or HttpStats()
    slots = asyncio.Semaphore(limits.max_concurrent_scrapes)

    async def metrics(request: web.Request) -> web.StreamResponse:
        started: list[bool] = []
        try:
            return await asyncio.wait_for(
                _serve_metrics(request, started), _scrape_timeout(request, limits)
            )
        except asyncio.TimeoutError:
            if started and request.transport is not None:
                request.transport.abort()  # mid-body: the client must not take a cut body as whole
            stats.scrapes_rejected += not started
            stats.scrapes_abandoned += bool(started)
            raise web.HTTPServiceUnavailable(
                text="busy: too many concurrent scrapes, try again\n"
            ) from None

    async def _serve_metrics(request: web.Request, started: list[bool]) -> web.StreamResponse:
        openmetrics = wants_openmetrics(request.headers.get("Accept", ""))
        gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        stats.scrapes_in_flight += 1
        try:
            async with slots:
                body = await cache.body(openmetrics, gzip)
                response = web.StreamResponse(
                    headers={
                        "Content-Type": OPENMETRICS_CONTENT_TYPE
                        if openmetrics
                        else TEXT_CONTENT_TYPE,
                        "Vary": "Accept, Accept-Encoding",
                        **({"Content-Encoding": "gzip"} if gzip else {}),
                    }
                )
                response.content_length = len(body)
                started.append(True)
                await response.prepare(request)
                view = memoryview(body)
                for start in range(0, len(body), WRITE_CHUNK):
                    await response.write(view[start : start + WRITE_CHUNK])
                await response.write_eof()
                stats.scrapes_served += 1
                return response
        except asyncio.CancelledError:
            stats.scrapes_abandoned += 1  # the scraper went away while waiting: stop there
            raise
        except ConnectionError:
            stats.scrapes_abandoned += 1  # the scraper went away mid-body: stop writing to it
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            stats.scrapes_in_flight -= 1

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ok, lines = ready(pollers)
        detail = is_authenticated is None or is_authenticated(request)
        text = ("ready\n" if ok else "not ready\n") + (
            "".join(f"{line}\n" for line in lines) if detail else ""
        )
        return web.Response(status=200 if ok else 503, text=text)

    async def index(request: web.Request) -> web.Response:
        now = time.time()
        items = "".join(f"<li>{html.escape(target_status(p, now)[1])}</li>" for p in pollers)
        body = (
            "<!doctype html><html><head><title>jobqueue-exporter</title></head><body>"
            f"<h1>jobqueue-exporter {__version__}</h1>"
            '<p><a href="/metrics">Metrics</a> · <a href="/healthz">healthz</a> · '
            '<a href="/readyz">readyz</a></p>'
            f"<h2>Targets</h2><ul>{items}</ul></body></html>"
        )
        return web.Response(text=body, content_type="text/html")

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in (headers or {}).items():
            response.headers.setdefault(name, value)

    app = web.Application(middlewares=list(middlewares))
    app.on_response_prepare.append(add_headers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
    return app
