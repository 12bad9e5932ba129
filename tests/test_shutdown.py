"""SIGTERM ends ``jobqueue-exporter run`` promptly and cleanly, also when the database hangs.

The exporter runs as a real process; its database is reached through a TCP proxy in this test that can
turn into a black hole: it stops forwarding in both directions but keeps every socket open and keeps
accepting new connections, as a frozen host or a dropped network path does (no RST, no FIN, no error).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from helpers import wait_for
from procrastinate_app import apply_schema

# What the README promises from SIGTERM/SIGINT to exit, database hung or not. The exporter needs
# about 0.3 s at worst (Exporter.stop's grace for a graceful close, then the exit); the rest is
# headroom for a loaded test machine.
SHUTDOWN_BOUND = 1.0
CANCEL_REQUEST = 80877102  # the code of a PostgreSQL CancelRequest, sent on a connection of its own


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BlackHoleProxy:
    """Forwards TCP connections to PostgreSQL until ``hang()``; from then on whatever either side sends
    is dropped, every socket stays open, and new connections are accepted and never answered."""

    def __init__(self, host: str, port: int):
        self.upstream = (host, port)
        self.hung = False
        self.swallowed = 0  # bytes sent by the exporter since the hang
        self.connects_while_hung = 0  # new connections since the hang, cancel requests excluded
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def hang(self) -> None:
        self.hung = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.hung:
                first = await reader.read(8)
                if len(first) < 8 or struct.unpack("!ii", first)[1] != CANCEL_REQUEST:
                    self.connects_while_hung += 1
                await self._pipe(reader, None, counted=False)
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_writer)
            await asyncio.gather(
                self._pipe(reader, up_writer, counted=True),
                self._pipe(up_reader, writer, counted=False),
            )
        except (ConnectionError, struct.error):
            pass

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, counted: bool
    ) -> None:
        """Copy until EOF; once hung, read and drop (the sender sees its writes succeed)."""
        try:
            while data := await reader.read(65536):
                if self.hung or writer is None:
                    if counted:
                        self.swallowed += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        if writer is not None and not self.hung:
            writer.close()


def through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class Run:
    """``jobqueue-exporter run`` in a subprocess, its output in files."""

    def __init__(self, tmp_path: Path, dsn: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp_path / "stderr.txt"
        (tmp_path / "dsn").write_text(dsn + "\n")
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            "poll_interval: 200ms\ntargets:\n"
            "  - name: app\n    preset: procrastinate\n    dsn_file: dsn\n"
            "    statement_timeout: 1s\n"
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.stderr_path.open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "jobqueue_exporter.cli",
                "run",
                "--config",
                str(self.config),
                "--listen",
                f"127.0.0.1:{self.port}",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def readyz(self) -> tuple[int, str] | None:
        assert self.proc is not None
        assert self.proc.returncode is None, f"exporter exited early: {self.stderr}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    f"{self.base}/readyz", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    return response.status, await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            answer = await self.readyz()
            return answer is not None and answer[0] == 200

        await wait_for(ready, timeout=60, interval=0.1, message="exporter ready")

    async def terminate(self, sig: signal.Signals = signal.SIGTERM) -> float:
        """Send ``sig``; seconds until the process has exited (failing after 30 s)."""
        assert self.proc is not None
        sent = time.monotonic()
        self.proc.send_signal(sig)
        await asyncio.wait_for(self.proc.wait(), timeout=30)
        return time.monotonic() - sent

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def assert_clean_exit(run: Run, elapsed: float) -> None:
    stderr = run.stderr
    assert run.proc is not None and run.proc.returncode == 0, stderr
    assert "shutting down" in stderr
    for sign in ("Traceback", "was never retrieved", "Task was destroyed", "Unclosed"):
        assert sign not in stderr, stderr
    assert elapsed < SHUTDOWN_BOUND, f"exit took {elapsed:.2f}s after the signal\n{stderr}"


@pytest.fixture
async def proxied(dsn: str) -> AsyncIterator[tuple[str, BlackHoleProxy]]:
    """A DSN of a fresh database with Procrastinate's schema, through a proxy of its own."""
    await apply_schema(dsn)
    parts = urlsplit(dsn)
    proxy = BlackHoleProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    try:
        yield through(dsn, port), proxy
    finally:
        await proxy.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_exits_promptly_with_a_healthy_database(proxied, tmp_path: Path, sig) -> None:
    dsn, _ = proxied
    run = Run(tmp_path, dsn)
    await run.start()
    try:
        await run.wait_ready()
        elapsed = await run.terminate(sig)
    finally:
        await run.kill()
    assert_clean_exit(run, elapsed)


async def test_exits_promptly_while_a_poll_waits_on_a_hung_database(
    proxied, tmp_path: Path
) -> None:
    """The worst case: a query is in flight when the signal comes. Cancelling it makes the client
    send a CancelRequest and a graceful close wait for the server: neither ever gets an answer."""
    dsn, proxy = proxied
    run = Run(tmp_path, dsn)
    await run.start()
    try:
        await run.wait_ready()
        proxy.hang()
        # the next poll has sent its query into the black hole (its deadline is 2 s away)
        await wait_for(lambda: proxy.swallowed > 0, timeout=30, message="a poll is in flight")
        elapsed = await run.terminate()
    finally:
        await run.kill()
    assert_clean_exit(run, elapsed)


async def test_exits_promptly_while_connecting_to_a_hung_database(proxied, tmp_path: Path) -> None:
    dsn, proxy = proxied
    run = Run(tmp_path, dsn)
    await run.start()
    try:
        await run.wait_ready()
        proxy.hang()

        async def down() -> bool:
            answer = await run.readyz()
            return answer is not None and "DOWN since" in answer[1]

        # the poll in flight hit its deadline, its connection was dropped; the next one connects
        await wait_for(down, timeout=30, interval=0.1, message="target marked down")
        await wait_for(lambda: proxy.connects_while_hung > 0, timeout=30, message="reconnecting")
        elapsed = await run.terminate()
    finally:
        await run.kill()
    assert_clean_exit(run, elapsed)


async def test_exits_promptly_with_scrapers_connected(proxied, tmp_path: Path) -> None:
    """An idle kept-alive connection and one that sent half a request hold nothing up."""
    dsn, _ = proxied
    run = Run(tmp_path, dsn)
    await run.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        await run.wait_ready()
        reader, idle = await asyncio.open_connection("127.0.0.1", run.port)
        idle.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        _, half = await asyncio.open_connection("127.0.0.1", run.port)
        half.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        await half.drain()
        writers = [idle, half]
        elapsed = await run.terminate()
    finally:
        for writer in writers:
            writer.close()
        await run.kill()
    assert_clean_exit(run, elapsed)


# -- demo --duration -------------------------------------------------------------------------------


def test_demo_banner_says_how_it_ends() -> None:
    from jobqueue_exporter.demo import banner

    url = "http://127.0.0.1:17410/metrics"
    assert banner(url, None).splitlines()[0] == f"Metrics: {url}   (Ctrl-C to stop)"
    assert banner(url, 90.0).splitlines()[0] == f"Metrics: {url}   (stops after 90s)"
    assert "(stops after 2.5s)" in banner(url, 2.5)
    assert "Ctrl-C" not in banner(url, 90.0)


def test_demo_duration_is_documented_and_checked(capsys) -> None:
    from jobqueue_exporter.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--duration SECONDS" in help_text
    assert "run for SECONDS once serving" in help_text and "exit 0" in help_text
    for bad in ("0", "-5", "nan", "inf"):
        assert main(["demo", "--duration", bad]) == 2
        assert "error: --duration" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_stops_by_itself_after_its_duration(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobqueue_exporter.cli", "demo"]
        + ["--listen", f"127.0.0.1:{free_port()}", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "(stops after 1s)" in result.stdout and "Ctrl-C" not in result.stdout
    assert "Stopping after 1s..." in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
