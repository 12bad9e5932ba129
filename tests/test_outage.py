"""Outages as an operator sees them: a hung server is down within one poll deadline, never stale
values; every failure says what happened, on the metrics and on /readyz."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp
import asyncpg
from helpers import make_config, scrape, series, value, wait_for
from jobqueue_exporter.embedded import EmbeddedPostgres
from jobqueue_exporter.exporter import Exporter
from jobqueue_exporter.poll import TargetPoller
from procrastinate_app import apply_schema


def _server_pids(server: EmbeddedPostgres) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer, ...)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


async def test_hung_server_is_down_within_one_poll_and_recovers(
    own_server: EmbeddedPostgres,
) -> None:
    dsn = own_server.dsn()
    await apply_schema(dsn)
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, status, args) "
        "SELECT 'q', 't', 'todo', '{}' FROM generate_series(1, 7)"
    )
    await conn.close()
    config = make_config(
        {"name": "app", "dsn": dsn, "preset": "procrastinate", "statement_timeout": "1s"},
        poll_interval="500ms",
        listen="127.0.0.1:0",
    )
    exporter = Exporter(config)
    poller = exporter.pollers[0]
    assert poller.deadline == 2.0  # max(2s floor, min(interval, 2 x statement_timeout))
    await exporter.start()
    url = f"http://127.0.0.1:{exporter.port}"
    pids: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def served() -> dict:
                async with http.get(url + "/metrics") as response:
                    from helpers import parse_metrics

                    return parse_metrics(await response.text())

            await wait_for(lambda: poller.state.up is True, message="first poll succeeded")
            samples = await served()
            assert value(samples, "jobqueue_jobs", queue="q", kind="t", state="pending") == 7

            pids = _server_pids(own_server)
            _signal_all(pids, signal.SIGSTOP)  # no RST, no error: the server just stops answering
            stopped = time.monotonic()
            await wait_for(lambda: poller.state.up is False, timeout=30, message="marked down")
            # one poll that cannot finish: at most an interval of waiting plus its deadline
            assert time.monotonic() - stopped <= poller.interval + poller.deadline + 1.0
            samples = await served()
            assert value(samples, "jobqueue_up", target="app") == 0
            assert not series(samples, "jobqueue_jobs"), "no stale job series while hung"
            assert not series(samples, "jobqueue_oldest_pending_age_seconds")
            assert poller.state.last_error == (
                f"timeout: no answer from 127.0.0.1:{own_server.port} within 2s"
            )
            async with http.get(url + "/readyz") as response:
                assert response.status == 503
                text = await response.text()
            assert "app (procrastinate): DOWN since" in text
            assert f"timeout: no answer from 127.0.0.1:{own_server.port} within 2s" in text

            _signal_all(pids, signal.SIGCONT)
            pids = []
            await wait_for(lambda: poller.state.up is True, timeout=60, message="recovered")
            samples = await served()
            assert value(samples, "jobqueue_jobs", queue="q", kind="t", state="pending") == 7
            assert poller.state.errors["timeout"] + poller.state.errors["connection"] >= 1
    finally:
        _signal_all(pids, signal.SIGCONT)
        await exporter.stop()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_failures_say_what_happened(dsn: str, db: asyncpg.Connection) -> None:
    await apply_schema(dsn)
    port = _closed_port()
    config = make_config(
        {"name": "app", "dsn": dsn, "preset": "procrastinate"},
        {
            "name": "refused",
            "dsn": f"postgresql://u:secret@127.0.0.1:{port}/x",
            "preset": "procrastinate",
        },
        {
            "name": "unknown",
            "dsn": "postgresql://u:secret@db.invalid:5432/x",
            "preset": "procrastinate",
        },
    )
    app, refused, unknown = (TargetPoller(config, t) for t in config.targets)
    for poller in (refused, unknown):
        try:
            await poller.poll_once()
        except Exception:  # noqa: BLE001 - the state is what is under test
            pass
    assert refused.state.last_error == f"connection: connection refused by 127.0.0.1:{port}"
    assert unknown.state.last_error.startswith("connection: could not resolve host db.invalid")
    for poller in (refused, unknown):
        assert "secret" not in poller.state.last_error
        assert value(scrape(poller), "jobqueue_poll_errors_total", reason="connection") == 1

    await app.poll_once()
    # the server ends our session in the middle of a poll (blocked behind a lock meanwhile)
    locker = await asyncpg.connect(dsn)
    async with locker.transaction():
        await locker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
        poll = asyncio.create_task(app.poll_once())

        async def terminated() -> bool:
            return await db.fetchval(
                "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'jobqueue-exporter/app' AND wait_event_type = 'Lock'"
            )

        await wait_for(terminated, message="the poll waits on the lock")
        try:
            await poll
        except Exception:  # noqa: BLE001
            pass
    await locker.close()
    endpoint = dsn.split("@")[1].split("/")[0]
    assert app.state.up is False
    assert app.state.last_error.startswith(
        f"connection: connection to {endpoint} lost during poll"
    ), app.state.last_error
    await app.poll_once()
    assert app.state.up is True
    await app.close()
