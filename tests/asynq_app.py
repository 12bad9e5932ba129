"""A real asynq program for the tests: build it, enqueue tasks with it, run its worker.

The Go source is ``tests/asynq_worker/main.go``; its task types pick what the handler does:
``ok`` succeeds, ``fail`` fails (retried per MaxRetry at once, then archived), ``skip`` fails with
``asynq.SkipRetry`` (archived at once), ``retry_later`` fails into the retry set for an hour,
``block`` runs until the file named by its payload exists (or the worker shuts down).

Every helper takes the server as ``host:port`` or a ``redis://`` URL (whose credentials are
passed on) and a DB number.
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from helpers import require_binary

SOURCE_DIR = Path(__file__).parent / "asynq_worker"
SOURCE_FILES = ("go.mod", "go.sum", "main.go")
TIMEOUT = 60.0


@functools.cache
def asynq_binary() -> Path:
    """Path of the built ``asynq_worker``, built once per source version (cached across sessions
    under the temp dir, keyed by a hash of the sources)."""
    go = require_binary("go")
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    cache = Path(tempfile.gettempdir()) / f"jobqueue-asynq-worker-{digest.hexdigest()[:16]}"
    binary = cache / "asynq_worker"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename into place: a concurrent build (another pytest
    # process) can only ever replace a complete binary with another complete one.
    partial = Path(tempfile.mkstemp(dir=cache, prefix="asynq_worker.", suffix=".partial")[1])
    try:
        result = subprocess.run(
            [go, "build", "-o", str(partial), "."],
            cwd=SOURCE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            # a broken build is a real failure, never a skip
            pytest.fail(f"go build of {SOURCE_DIR} failed:\n{result.stdout}{result.stderr}")
        os.replace(partial, binary)
    finally:
        partial.unlink(missing_ok=True)
    return binary


def _connection_args(server: str, db: int) -> list[str]:
    """``-redis``/``-db`` (and credentials) for ``host:port`` or a ``redis://`` URL."""
    if "://" not in server:
        return ["-redis", server, "-db", str(db)]
    url = urlsplit(server)
    args = ["-redis", f"{url.hostname or '127.0.0.1'}:{url.port or 6379}", "-db", str(db)]
    if url.username:
        args += ["-username", unquote(url.username)]
    if url.password:
        args += ["-password", unquote(url.password)]
    return args


def _run(subcommand: str, server: str, db: int, *args: str) -> str:
    result = subprocess.run(
        [str(asynq_binary()), subcommand, *_connection_args(server, db), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"asynq_worker {subcommand} {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stderr}"
        )
    return result.stdout


def enqueue(
    server: str,
    db: int,
    queue: str,
    task_type: str,
    n: int = 1,
    in_: str | None = None,
    retry: int | None = None,
    payload: str | None = None,
) -> list[str]:
    """Enqueue ``n`` tasks; returns their ids. ``in_`` is a Go duration ("1h", "90s") for
    ``asynq.ProcessIn``; ``retry`` is ``asynq.MaxRetry`` (asynq's default, 25, when None)."""
    args = ["-queue", queue, "-type", task_type, "-n", str(n)]
    if in_ is not None:
        args += ["-in", in_]
    if retry is not None:
        args += ["-retry", str(retry)]
    if payload is not None:
        args += ["-payload", payload]
    return _run("enqueue", server, db, *args).split()


def pause(server: str, db: int, queue: str) -> None:
    _run("pause", server, db, "-queue", queue)


def unpause(server: str, db: int, queue: str) -> None:
    _run("unpause", server, db, "-queue", queue)


def start_worker(
    server: str, db: int, queues: Iterable[str], concurrency: int = 4
) -> subprocess.Popen:
    """Start an asynq server on ``queues`` (equal priority) and return once it is processing.

    Stop it with ``terminate()`` (SIGTERM: a clean shutdown that puts unfinished tasks back to
    pending) or ``kill()`` (SIGKILL: they stay in active, with leases that then expire).
    asynq's own log goes to the inherited stderr."""
    proc = subprocess.Popen(
        [
            str(asynq_binary()),
            "work",
            *_connection_args(server, db),
            "-queues",
            ",".join(queues),
            "-concurrency",
            str(concurrency),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # readline() has no timeout: read on a thread and wait on a queue with one
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")  # EOF: the worker exited

    threading.Thread(target=read, daemon=True).start()
    try:
        line = lines.get(timeout=TIMEOUT)
    except queue.Empty:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"asynq worker printed no 'ready' within {TIMEOUT}s") from None
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"asynq worker did not start (printed {line!r}, exit code {proc.returncode})"
        )
    return proc
