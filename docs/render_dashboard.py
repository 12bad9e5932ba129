#!/usr/bin/env python3
"""Render docs/overview.png: the main panels of the "Job Queue / Overview" dashboard over a live demo run.

    python docs/render_dashboard.py [--minutes 5] [--out docs/overview.png]

It starts ``jobqueue-exporter demo`` (embedded PostgreSQL, a real Procrastinate workload with failures,
retries and a worker killed mid-job) and a real ``prometheus`` scraping it every second, lets it run, then
evaluates the panel expressions - read from dashboards/jobqueue-overview.json, not re-typed - with
``/api/v1/query_range`` and draws them with matplotlib in the style of the Grafana panels (title, unit,
thresholds, colour overrides, table legend). Needs the ``docs`` extra (``pip install -e '.[docs]'``) and the
``prometheus`` binary on PATH (or ``--prometheus``).

The stack code (``demo_stack``, ``DemoStack``, ``substitute``) is shared with
tests/test_dashboards_e2e.py, which imports this file; matplotlib is imported only when drawing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobqueue_exporter.demo import TARGET  # the demo's one target

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
JOB = "jobqueue-exporter"  # the scrape job name the shipped alert rules and dashboards expect
SCRAPE_INTERVAL = "1s"
# What $__rate_interval becomes. Grafana would pick 4 x the scrape interval (4s), but the demo's exporter
# polls every 2s, so a 4s window holds one or two distinct counter values; 1m gives rates that read well.
RATE_INTERVAL = "1m"
# The chart starts one rate interval into the run, so that its first rates cover a full window.
WARMUP_SECONDS = 60.0

# -- the stack: demo + Prometheus --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DemoStack:
    """A running ``jobqueue-exporter demo`` scraped by a running Prometheus (both subprocesses)."""

    prometheus: str  # base URL of Prometheus' HTTP API
    metrics: str  # the demo's /metrics URL
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)

    def api(self, path: str, **params: Any) -> Any:
        """``data`` of a successful Prometheus API call (GET, list values repeat the parameter)."""
        url = f"{self.prometheus}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            try:
                body = json.load(exc)
            except ValueError:
                raise AssertionError(f"{path} {params}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Instant vector result of ``promql`` at the current time."""
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict]:
        data = self.api("/api/v1/query_range", query=promql, start=start, end=end, step=step)
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"/api/v1/label/{label}/values", **{"match[]": match})

    def log(self, name: str, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.logs / f"{name}.log").read_text().splitlines()[-lines:])
        return ""

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name}.log (tail) ---\n{self.log(name)}" for name in self.procs)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited early ({proc.returncode})\n{self.diagnostics()}"
                )

    def wait_until(
        self, condition: Callable[[], Any], timeout: float, message: str, interval: float = 0.5
    ) -> Any:
        """Poll ``condition`` until it returns something truthy; fail with the logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(OSError, AssertionError):
                result = condition()
                if result:
                    return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not within {timeout:g}s: {message}\n{self.diagnostics()}"
                ) from None
            time.sleep(interval)


def _spawn(stack: DemoStack, name: str, *args: str) -> None:
    with (stack.logs / f"{name}.log").open("wb") as log:
        stack.procs[name] = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # its own session: a Ctrl-C in the terminal reaches only us, and we stop it in order
            start_new_session=True,
        )


def _stop(stack: DemoStack, name: str, sig: int, timeout: float) -> None:
    proc = stack.procs[name]
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stack.exit_codes[name] = proc.returncode


@contextlib.contextmanager
def demo_stack(
    workdir: Path, prometheus: str = "prometheus", lifetime: float = 600.0
) -> Iterator[DemoStack]:
    """Start the demo and Prometheus (scrape job ``jobqueue-exporter``, every second); yield once the
    demo target is scraped and its database polled. The demo stops itself after ``lifetime`` seconds
    should nobody stop it; on exit the demo gets SIGINT (its Ctrl-C) and Prometheus SIGTERM."""
    workdir.mkdir(parents=True, exist_ok=True)
    demo_port, prom_port = free_port(), free_port()
    stack = DemoStack(
        prometheus=f"http://127.0.0.1:{prom_port}",
        metrics=f"http://127.0.0.1:{demo_port}/metrics",
        logs=workdir,
    )
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"]}]}
        ],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    try:
        _spawn(
            stack,
            "demo",
            sys.executable,
            "-m",
            "jobqueue_exporter.cli",
            "demo",
            "--listen",
            f"127.0.0.1:{demo_port}",
            "--duration",
            f"{lifetime:g}",
        )
        _spawn(
            stack,
            "prometheus",
            prometheus,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        )

        def ready() -> bool:
            with urllib.request.urlopen(f"{stack.prometheus}/-/ready", timeout=2) as response:
                return response.status == 200

        stack.wait_until(ready, timeout=60, message="Prometheus ready")
        stack.wait_until(
            lambda: stack.query(f'jobqueue_up{{job="{JOB}", target="{TARGET}"}} == 1'),
            timeout=120,
            message="the demo scraped by Prometheus, its database polled",
        )
        yield stack
    finally:
        if "demo" in stack.procs:
            _stop(stack, "demo", signal.SIGINT, timeout=30)
        if "prometheus" in stack.procs:
            _stop(stack, "prometheus", signal.SIGTERM, timeout=30)


# -- dashboards ----------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def load_dashboard(name: str) -> dict:
    return json.loads((DASHBOARDS / f"{name}.json").read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    return [p for top in board["panels"] for p in (top, *top.get("panels", []))]


def find_panel(board: dict, title: str, kind: str) -> dict:
    """The panel of type ``kind`` titled ``title`` (titles repeat across types, e.g. "Stale jobs")."""
    found = [p for p in panels(board) if p["title"] == title and p["type"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} panels titled {title!r}"
    return found[0]


def substitute(expr: str, values: dict[str, str], rate_interval: str = RATE_INTERVAL) -> str:
    """A dashboard expression as Grafana sends it, for the chosen variable values (a multi-value
    variable set to All gets its allValue, e.g. ``.+``)."""
    values = {"__rate_interval": rate_interval, **values}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


# -- drawing -------------------------------------------------------------------------------------------

# Grafana's dark theme and its named and "classic palette" colours.
BACKGROUND, PANEL, BORDER = "#111217", "#181b1f", "#2c2e33"
TEXT, MUTED, GRID = "#ccccdc", "#8e8e9a", "#2a2c31"
NAMED_COLORS = {
    "green": "#73BF69",
    "red": "#F2495C",
    "dark-red": "#C4162A",
    "orange": "#FF9830",
    "yellow": "#FADE2A",
    "blue": "#5794F2",
    "purple": "#B877D9",
    "text": TEXT,
}
PALETTE = [
    "#7EB26D",
    "#EAB839",
    "#6ED0E0",
    "#EF843C",
    "#E24D42",
    "#1F78C1",
    "#BA43A9",
    "#705DA0",
    "#508642",
    "#CCA300",
    "#447EBC",
    "#C15C17",
    "#890F02",
    "#0A437C",
    "#6D1F62",
    "#584477",
]
CALC_NAMES = {"lastNotNull": "Last *", "max": "Max", "min": "Min", "mean": "Mean"}

# The overview's main panels, placed on Grafana's 24-column grid: (type, title, x, y, w, h).
LAYOUT = [
    ("stat", "Targets down", 0, 0, 4, 4),
    ("stat", "Pending jobs", 4, 0, 4, 4),
    ("stat", "Running jobs", 8, 0, 4, 4),
    ("stat", "Stale jobs", 12, 0, 4, 4),
    ("stat", "Oldest pending job", 16, 0, 4, 4),
    ("stat", "Jobs finished per second", 20, 0, 4, 4),
    ("timeseries", "Jobs by state", 0, 4, 12, 11),
    ("timeseries", "Oldest pending job age", 12, 4, 6, 11),
    ("timeseries", "Stale jobs", 18, 4, 6, 11),
    ("timeseries", "Throughput by outcome", 0, 15, 8, 10),
    ("timeseries", "Success ratio", 8, 15, 8, 10),
    ("state-timeline", "Target up", 16, 15, 8, 3),
    ("timeseries", "Poll duration", 16, 18, 8, 7),
]
GRID_W_IN, GRID_H_IN = 16.0 / 24, 0.36  # inches per grid column / row
HEADER_IN, GAP_IN = 0.75, 0.07
HIDE_ZEROS_ABOVE = (
    8  # a panel with more series than this hides its all-zero ones (noted in the legend)
)


def _number(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    a = abs(v)
    return (
        f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"
    )


def format_value(v: float, unit: str) -> str:
    """A value in a Grafana unit: short, s, ops, percentunit."""
    if v is None or math.isnan(v):
        return "-"
    if unit == "percentunit":
        return f"{_number(round(v * 100, 1))}%"
    if unit == "ops":
        return f"{_number(v)} ops/s"
    if unit == "s":
        a = abs(v)
        if a == 0:
            return "0 s"
        for size, name in ((86400, "day"), (3600, "hour"), (60, "min"), (1, "s")):
            if a >= size:
                return f"{_number(v / size)} {name}"
        return f"{_number(v * 1000)} ms"
    if abs(v) >= 1e6:
        return f"{_number(v / 1e6)} Mil"
    if abs(v) >= 1e3:
        return f"{_number(v / 1e3)} K"
    return _number(v)


def color(name: str) -> str:
    return NAMED_COLORS.get(name, name)


def threshold_color(panel: dict, value: float) -> str:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    chosen = "green"
    for step in steps:
        if step["value"] is None or value >= step["value"]:
            chosen = step["color"]
    return color(chosen)


def legend_name(fmt: str | None, metric: dict[str, str]) -> str:
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()


@dataclass
class Series:
    name: str
    times: list[float]
    values: list[float]

    def finite(self) -> list[float]:
        return [v for v in self.values if not math.isnan(v)]

    def calc(self, name: str) -> float:
        finite = self.finite()
        if not finite:
            return math.nan
        return {
            "lastNotNull": finite[-1],
            "max": max(finite),
            "min": min(finite),
            "mean": sum(finite) / len(finite),
        }[name]


def panel_series(
    stack: DemoStack, panel: dict, values: dict[str, str], start: float, end: float, step: float
) -> list[Series]:
    """Every series of every query of the panel, on a regular time grid (gaps as NaN)."""
    grid = [start + i * step for i in range(int((end - start) // step) + 1)]
    found = []
    for target in panel["targets"]:
        for result in stack.query_range(substitute(target["expr"], values), start, end, step):
            points = {round(float(t), 3): float(v) for t, v in result["values"]}
            found.append(
                Series(
                    legend_name(target.get("legendFormat"), result["metric"]),
                    grid,
                    [points.get(round(t, 3), math.nan) for t in grid],
                )
            )
    return sorted(found, key=lambda s: s.name)


def series_colors(panel: dict, series: list[Series]) -> dict[str, str]:
    fixed = {}
    for override in panel["fieldConfig"].get("overrides", []):
        if override["matcher"]["id"] == "byName":
            for prop in override["properties"]:
                if prop["id"] == "color" and prop["value"].get("mode") == "fixed":
                    fixed[override["matcher"]["options"]] = color(prop["value"]["fixedColor"])
    return {s.name: fixed.get(s.name, PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)}


def _panel_box(fig, x: int, y: int, w: int, h: int) -> tuple[float, float, float, float]:
    """Figure-relative (left, bottom, width, height) of a grid cell, inset by the gap."""
    width_in, height_in = fig.get_size_inches()
    left = (x * GRID_W_IN + GAP_IN) / width_in
    top = 1 - (HEADER_IN + y * GRID_H_IN + GAP_IN) / height_in
    box_w = (w * GRID_W_IN - 2 * GAP_IN) / width_in
    box_h = (h * GRID_H_IN - 2 * GAP_IN) / height_in
    return left, top - box_h, box_w, box_h


def _draw_frame(fig, box: tuple[float, float, float, float], title: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    left, bottom, width, height = box
    fig.patches.append(
        FancyBboxPatch(
            (left, bottom),
            width,
            height,
            boxstyle="round,pad=0,rounding_size=0.004",
            transform=fig.transFigure,
            facecolor=PANEL,
            edgecolor=BORDER,
            linewidth=0.8,
            zorder=-10,  # behind the panel's axes, which figure artists would otherwise cover
        )
    )
    pad = 0.1 / fig.get_size_inches()[0]
    fig.text(
        left + pad,
        bottom + height - 0.08 / fig.get_size_inches()[1],
        title,
        color=TEXT,
        fontsize=10,
        fontweight="bold",
        va="top",
    )


def _style_axes(ax, unit: str, integers: bool = False) -> None:
    from matplotlib import dates, ticker

    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=MUTED, labelsize=8, length=0, pad=3)
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: format_value(v, unit)))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=4, min_n_ticks=2, integer=integers))
    ax.xaxis.set_major_locator(dates.MinuteLocator())
    ax.xaxis.set_major_formatter(dates.DateFormatter("%H:%M"))


def _times(series: Series) -> list:
    from datetime import datetime

    return [datetime.fromtimestamp(t) for t in series.times]


def draw_stat(fig, panel: dict, box, series: list[Series]) -> None:
    _draw_frame(fig, box, panel["title"])
    unit = panel["fieldConfig"]["defaults"]["unit"]
    left, bottom, width, height = box
    value = series[0].calc("lastNotNull") if series else math.nan
    tint = threshold_color(panel, value) if not math.isnan(value) else MUTED
    if series and panel["options"].get("graphMode") == "area":
        ax = fig.add_axes((left, bottom + 0.002, width, height * 0.4))
        ax.set_axis_off()
        ax.fill_between(_times(series[0]), series[0].values, color=tint, alpha=0.18, linewidth=0)
        ax.plot(_times(series[0]), series[0].values, color=tint, linewidth=1, alpha=0.7)
        finite = series[0].finite()
        top = max(finite) if finite else 1
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.margins(x=0)
    fig.text(
        left + width / 2,
        bottom + height * 0.47,
        format_value(value, unit) if not math.isnan(value) else "No data",
        color=tint,
        fontsize=22,
        fontweight="bold",
        ha="center",
        va="center",
    )


def draw_state_timeline(fig, panel: dict, box, series: list[Series]) -> None:
    _draw_frame(fig, box, panel["title"])
    left, bottom, width, height = box
    defaults = panel["fieldConfig"]["defaults"]
    mappings = {}
    for mapping in defaults.get("mappings", []):
        if mapping["type"] == "value":
            mappings.update(mapping["options"])
    fig_w, fig_h = fig.get_size_inches()
    ax = fig.add_axes(
        (
            left + 0.75 / fig_w,
            bottom + 0.3 / fig_h,
            width - 0.9 / fig_w,
            height - 0.62 / fig_h,
        )
    )
    _style_axes(ax, "short")
    ax.grid(False)
    for row, s in enumerate(series):
        times = _times(s)
        for i, v in enumerate(s.values[:-1]):
            if math.isnan(v):
                continue
            key = _number(v)
            tint = color(mappings.get(key, {}).get("color", "green"))
            ax.axvspan(
                times[i],
                times[i + 1],
                ymin=row / len(series),
                ymax=(row + 0.9) / len(series),
                color=tint,
                alpha=0.8,
                linewidth=0,
            )
        last = s.calc("lastNotNull")
        text = mappings.get(_number(last), {}).get("text", _number(last)) if s.finite() else "-"
        ax.text(
            times[0],
            (row + 0.45) / len(series),
            f"  {text}",
            color="#111217",
            fontsize=8,
            fontweight="bold",
            va="center",
            transform=ax.get_xaxis_transform(),
        )
    ax.set_yticks([(row + 0.45) / len(series) for row in range(len(series))])
    ax.set_yticklabels([s.name for s in series])
    ax.set_ylim(0, 1)
    if series:
        ax.set_xlim(_times(series[0])[0], _times(series[0])[-1])


def draw_timeseries(fig, panel: dict, box, series: list[Series]) -> None:
    _draw_frame(fig, box, panel["title"])
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults["unit"]
    custom = defaults.get("custom", {})
    from matplotlib.lines import Line2D

    calcs = panel["options"].get("legend", {}).get("calcs", [])
    hidden = 0
    if len(series) > HIDE_ZEROS_ABOVE:
        shown = [s for s in series if any(v != 0 for v in s.finite())]
        hidden, series = len(series) - len(shown), shown
    colors = series_colors(panel, series)

    left, bottom, width, height = box
    fig_w, fig_h = fig.get_size_inches()
    columns = 2 if len(series) > 5 and width * fig_w > 7 else 1
    rows = math.ceil(len(series) / columns) + 1 + (1 if hidden else 0)
    row_in = 0.155
    legend_in = rows * row_in + 0.1
    ax = fig.add_axes(
        (
            left + 0.72 / fig_w,
            bottom + (legend_in + 0.3) / fig_h,
            width - 0.85 / fig_w,
            height - (legend_in + 0.3 + 0.4) / fig_h,
        )
    )
    # counts of jobs get whole-number ticks
    integral = all(v == int(v) for s in series for v in s.finite())
    _style_axes(ax, unit, integers=unit == "short" and integral)
    ymin, ymax = math.inf, -math.inf
    for s in series:
        times = _times(s)
        tint = colors[s.name]
        ax.plot(times, s.values, color=tint, linewidth=custom.get("lineWidth", 1) * 1.3)
        fill = custom.get("fillOpacity", 0) / 100
        if fill:
            ax.fill_between(times, s.values, color=tint, alpha=fill, linewidth=0)
        if s.finite():
            ymin, ymax = min(ymin, min(s.finite())), max(ymax, max(s.finite()))
    if series:
        ax.set_xlim(_times(series[0])[0], _times(series[0])[-1])
    low = defaults.get("min", 0 if ymin >= 0 else None)
    high = defaults.get("max")
    if high is None and ymax == low:  # a flat zero line: give the axis a little room
        high = 1
    ax.set_ylim(bottom=low, top=high)
    if high is None:
        ax.set_ylim(top=ax.get_ylim()[1] * 1.05 if ax.get_ylim()[1] > 0 else 1)
    if custom.get("thresholdsStyle", {}).get("mode") == "dashed":
        lo, hi = ax.get_ylim()
        for step in defaults.get("thresholds", {}).get("steps", []):
            # like Grafana, a threshold line does not stretch the axis
            if step["value"] is not None and lo < step["value"] <= hi:
                ax.axhline(
                    step["value"],
                    color=color(step["color"]),
                    linestyle=(0, (4, 3)),
                    linewidth=1,
                    alpha=0.9,
                )

    # the table legend: Name | Last * | Max, one row per series (two blocks side by side when many)
    top = bottom + (legend_in + 0.05) / fig_h
    block = (width - 0.2 / fig_w) / columns
    value_w = 0.75 / fig_w
    per_column = math.ceil(len(series) / columns) if series else 0
    for column in range(columns):
        x0 = left + 0.12 / fig_w + column * block
        fig.text(x0, top, "Name", color=MUTED, fontsize=7.5, va="top")
        for c, calc in enumerate(reversed(calcs)):
            fig.text(
                x0 + block - 0.12 / fig_w - c * value_w,
                top,
                CALC_NAMES.get(calc, calc),
                color=MUTED,
                fontsize=7.5,
                va="top",
                ha="right",
            )
        for r, s in enumerate(series[column * per_column : (column + 1) * per_column], start=1):
            y = top - r * row_in / fig_h
            fig.lines.append(
                Line2D(
                    [x0, x0 + 0.16 / fig_w],
                    [y - 0.055 / fig_h] * 2,
                    transform=fig.transFigure,
                    color=colors[s.name],
                    linewidth=2.5,
                )
            )
            fig.text(x0 + 0.22 / fig_w, y, s.name, color=TEXT, fontsize=7.5, va="top")
            for c, calc in enumerate(reversed(calcs)):
                fig.text(
                    x0 + block - 0.12 / fig_w - c * value_w,
                    y,
                    format_value(s.calc(calc), unit),
                    color=TEXT,
                    fontsize=7.5,
                    va="top",
                    ha="right",
                )
    if hidden:
        y = top - (per_column + 1) * row_in / fig_h
        fig.text(
            left + 0.12 / fig_w,
            y,
            f"{hidden} series at 0 throughout not shown",
            color=MUTED,
            fontsize=7,
            va="top",
            style="italic",
        )


def render(
    stack: DemoStack, out: Path, start: float, end: float, step: float, minutes: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = load_dashboard("jobqueue-overview")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    # target: the demo's one target; queue: All, as Grafana sends it
    values = {"target": TARGET, "queue": variables["queue"]["allValue"]}
    rows = max(y + h for _, _, _, y, _, h in LAYOUT)
    fig = plt.figure(figsize=(24 * GRID_W_IN, HEADER_IN + rows * GRID_H_IN), facecolor=BACKGROUND)
    fig_h = fig.get_size_inches()[1]
    fig.text(
        0.008,
        1 - 0.12 / fig_h,
        board["title"],
        color=TEXT,
        fontsize=15,
        fontweight="bold",
        va="top",
    )
    fig.text(
        0.008,
        1 - 0.45 / fig_h,
        f"target = {TARGET}    queue = All    $__rate_interval = {RATE_INTERVAL}    "
        f"{minutes:g} minutes of `jobqueue-exporter demo`, scraped every {SCRAPE_INTERVAL} by "
        f"Prometheus; panel queries from dashboards/jobqueue-overview.json",
        color=MUTED,
        fontsize=9,
        va="top",
    )
    draw = {"stat": draw_stat, "timeseries": draw_timeseries, "state-timeline": draw_state_timeline}
    for kind, title, x, y, w, h in LAYOUT:
        panel = find_panel(board, title, kind)
        series = panel_series(stack, panel, values, start, end, step)
        if not series or not any(s.finite() for s in series):
            raise AssertionError(f"panel {title!r} has no data over the run")
        draw[kind](fig, panel, _panel_box(fig, x, y, w, h), series)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor=BACKGROUND)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help=f"minutes shown (default 5), after a {WARMUP_SECONDS:g}s warm-up",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "overview.png")
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    parser.add_argument("--step", type=float, default=2.0, help="query_range step in seconds")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("matplotlib is missing: pip install -e '.[docs]'")
    if not shutil.which(args.prometheus) and not os.access(args.prometheus, os.X_OK):
        parser.error(f"no prometheus binary at {args.prometheus!r} (see --prometheus)")

    # the demo and Prometheus run in their own sessions; a SIGTERM must still stop them on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    run_seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="render-dashboard-") as tmp:
        lifetime = WARMUP_SECONDS + run_seconds + 300  # the demo ends itself should we not
        with demo_stack(Path(tmp), args.prometheus, lifetime=lifetime) as stack:
            start = time.time() + WARMUP_SECONDS
            print(
                f"demo scraped by Prometheus at {stack.prometheus}; "
                f"running {WARMUP_SECONDS:g}s + {args.minutes:g} min",
                flush=True,
            )
            while (left := start + run_seconds - time.time()) > 0:
                print(f"  {left / 60:.1f} min left", flush=True)
                stack.check_alive()
                time.sleep(min(left, 30))
            end = time.time()
            render(stack, args.out, start, end, args.step, args.minutes)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
