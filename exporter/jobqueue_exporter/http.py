"""HTTP: /metrics (Prometheus or OpenMetrics text), /healthz, /readyz and a small landing page."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import __version__
from .poll import TargetPoller

READY_INTERVALS = 3


def ready(pollers: Sequence[TargetPoller], now: float | None = None) -> tuple[bool, list[str]]:
    """Ready when every target was polled successfully within the last READY_INTERVALS intervals."""
    now = time.time() if now is None else now
    problems = []
    for poller in pollers:
        last = poller.state.last_success
        if last is None:
            reason = poller.state.last_error or "waiting for the first poll"
            problems.append(f"{poller.target.name}: no successful poll yet ({reason})")
        elif now - last > READY_INTERVALS * poller.interval:
            problems.append(f"{poller.target.name}: last successful poll {now - last:.0f}s ago")
    return not problems, problems


def _status_line(poller: TargetPoller, now: float) -> str:
    state = poller.state
    if state.up is None:
        status = "waiting for the first poll"
    elif state.up:
        status = f"up, polled {now - (state.last_success or now):.0f}s ago"
    else:
        status = f"DOWN: {state.last_error}"
    return f"{state.name} ({state.preset}): {status}"


def make_app(registry: CollectorRegistry, pollers: Sequence[TargetPoller]) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ok, problems = ready(pollers)
        if ok:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n" + "\n".join(problems) + "\n")

    async def index(request: web.Request) -> web.Response:
        now = time.time()
        lines = "".join(f"<li>{html.escape(_status_line(p, now))}</li>" for p in pollers)
        body = (
            "<!doctype html><html><head><title>jobqueue-exporter</title></head><body>"
            f"<h1>jobqueue-exporter {__version__}</h1>"
            '<p><a href="/metrics">Metrics</a> · <a href="/healthz">healthz</a> · '
            '<a href="/readyz">readyz</a></p>'
            f"<h2>Targets</h2><ul>{lines}</ul></body></html>"
        )
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
    return app
