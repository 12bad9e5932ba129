"""HTTP endpoints through aiohttp's test client and through a real socket; `run` and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
from helpers import make_config, parse_metrics, value, wait_for
from jobqueue_exporter.exporter import Exporter, build_cache, build_pollers
from jobqueue_exporter.http import make_app
from procrastinate_app import apply_schema


async def test_endpoints_with_test_client(aiohttp_client, dsn: str, db: asyncpg.Connection) -> None:
    await apply_schema(dsn)
    config = make_config({"name": "app", "dsn": dsn, "preset": "procrastinate"})
    pollers = build_pollers(config)
    client = await aiohttp_client(make_app(build_cache(pollers), pollers))

    assert (await client.get("/healthz")).status == 200
    not_ready = await client.get("/readyz")
    assert not_ready.status == 503
    assert "app (procrastinate): waiting for the first poll" in await not_ready.text()
    page = await (await client.get("/")).text()
    assert 'href="/metrics"' in page and "app (procrastinate): waiting for the first poll" in page

    await pollers[0].poll_once()
    assert (await client.get("/readyz")).status == 200
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = parse_metrics(await response.text())
    assert value(samples, "jobqueue_up", target="app") == 1
    assert "app (procrastinate): up" in await (await client.get("/")).text()
    openmetrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await openmetrics.text()).rstrip().endswith("# EOF")
    await pollers[0].close()


async def test_real_socket_and_down_target(dsn: str, db: asyncpg.Connection) -> None:
    await apply_schema(dsn)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    config = make_config(
        {"name": "app", "dsn": dsn, "preset": "procrastinate"},
        {
            "name": "gone",
            "dsn": f"postgresql://postgres@127.0.0.1:{closed}/x",
            "preset": "procrastinate",
        },
        poll_interval="100ms",
        listen="127.0.0.1:0",
    )
    exporter = Exporter(config)
    await exporter.start()
    base = f"http://127.0.0.1:{exporter.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def both_polled() -> bool:
                async with http.get(f"{base}/metrics") as response:
                    samples = parse_metrics(await response.text())
                return ("jobqueue_up", frozenset({("target", "gone")})) in samples and (
                    "jobqueue_up",
                    frozenset({("target", "app")}),
                ) in samples

            await wait_for(both_polled, message="both targets polled")
            async with http.get(f"{base}/metrics") as response:
                samples = parse_metrics(await response.text())
            assert value(samples, "jobqueue_up", target="app") == 1
            assert value(samples, "jobqueue_up", target="gone") == 0
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 503
                text = await response.text()
            # every target's line, with the cause of the one that is down
            assert "app (procrastinate): up, polled" in text
            assert (
                "gone (procrastinate): DOWN since" in text
                and f"no successful poll yet: connection: connection refused by 127.0.0.1:{closed}"
                in text
            ), text
            async with http.get(f"{base}/") as response:
                assert "gone (procrastinate): DOWN since" in await response.text()
    finally:
        await exporter.stop()


async def test_run_command_serves_and_stops_on_sigterm(tmp_path: Path, dsn: str, db) -> None:
    await apply_schema(dsn)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "dsn").write_text(dsn + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "poll_interval: 200ms\nlog_format: json\ntargets:\n"
        "  - name: app\n    preset: procrastinate\n    dsn_file: dsn\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobqueue_exporter.cli", "run", "--config", str(config)]
        + ["--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=60, interval=0.1, message="exporter ready")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert code == 0, stderr
    assert elapsed < 1.0, f"shutdown took {elapsed:.2f}s"
    assert '"message": "shutting down"' in stderr, "json logs"
    assert "Traceback" not in stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "targets:\n  - name: app\n    preset: procrastinate\n    dsn: postgresql://x@127.0.0.1:1/x\n"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "jobqueue_exporter.cli", "run", "--config", str(config)]
            + ["--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.startswith("error: listen: ") and "address already in use" in result.stderr
    assert "Traceback" not in result.stderr
