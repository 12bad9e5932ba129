"""A real BullMQ program for the tests: install it, add jobs with it, run its worker.

The Node.js source is ``tests/bullmq_app/bullmq_app.mjs`` (``bullmq`` pinned in its
``package.json``, exact versions in ``package-lock.json``); ``node_modules`` is not in git:
:func:`ensure_node_modules` runs ``npm ci`` once per session when it is missing or older than the
lockfile. The worker's job names pick what its processor does: ``ok`` returns a value, ``fail``
throws (attempts and backoff apply; the last failure goes to the failed set), ``block`` runs until
the file named by ``data["gate"]`` exists (forever without one), any other name succeeds.

Every helper takes the server as a ``redis://[user:password@]host:port/db`` URL and the key
prefix (BullMQ's default, ``bull``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest
from helpers import require_binary

APP_DIR = Path(__file__).parent / "bullmq_app"
SCRIPT = APP_DIR / "bullmq_app.mjs"
NODE_MODULES = APP_DIR / "node_modules"
TIMEOUT = 60.0
NPM_CI_TIMEOUT = 600.0


def _node_modules_stale() -> bool:
    """No ``node_modules``, or one older than the lockfile (or package.json). npm writes
    ``node_modules/.package-lock.json`` at the end of every ``npm ci``/``npm install``."""
    stamp = NODE_MODULES / ".package-lock.json"
    if not stamp.exists() or not (NODE_MODULES / "bullmq" / "package.json").exists():
        return True
    newest_input = max(
        (APP_DIR / name).stat().st_mtime for name in ("package-lock.json", "package.json")
    )
    return stamp.stat().st_mtime < newest_input


@functools.cache
def ensure_node_modules() -> str:
    """Path of ``node``, once ``tests/bullmq_app/node_modules`` is installed and up to date.

    Skips where node or npm is not installed, fails in CI (env ``CI`` set) instead; a failing
    ``npm ci`` is always a failure."""
    node = require_binary("node")
    npm = require_binary("npm")
    # one npm ci at a time (another pytest process may be at it): a lock outside the work tree
    digest = hashlib.sha256(str(APP_DIR.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"jobqueue-bullmq-npm-ci-{digest}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _node_modules_stale():
            started = time.monotonic()
            try:
                result = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund"],
                    cwd=APP_DIR,
                    capture_output=True,
                    text=True,
                    timeout=NPM_CI_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"npm ci in {APP_DIR} took over {NPM_CI_TIMEOUT:.0f}s")
            if result.returncode != 0:
                pytest.fail(f"npm ci in {APP_DIR} failed:\n{result.stdout}{result.stderr}")
            print(f"bullmq_driver: npm ci took {time.monotonic() - started:.1f}s")
    return node


def _run(subcommand: str, url: str, *args: str, prefix: str = "bull") -> str:
    node = ensure_node_modules()
    command = [node, str(SCRIPT), subcommand, "--url", url, "--prefix", prefix, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(
            f"bullmq_app {subcommand} {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
    return result.stdout


def add(
    url: str,
    queue: str,
    name: str,
    n: int = 1,
    *,
    prefix: str = "bull",
    delay: int | None = None,
    priority: int | None = None,
    attempts: int | None = None,
    backoff: int | None = None,
    remove_on_complete: int | None = None,
    lifo: bool = False,
    data: dict[str, Any] | None = None,
) -> list[str]:
    """Add ``n`` jobs named ``name`` with ``Queue.add``; returns their ids, in order.

    ``delay``: ms; ``backoff``: a fixed retry delay in ms; ``remove_on_complete``: how many
    completed jobs to keep; ``data``: the job's data (``{"gate": path}`` for ``block``)."""
    args = ["--queue", queue, "--name", name, "--n", str(n)]
    for flag, value in (
        ("--delay", delay),
        ("--priority", priority),
        ("--attempts", attempts),
        ("--backoff", backoff),
        ("--remove-on-complete", remove_on_complete),
    ):
        if value is not None:
            args += [flag, str(value)]
    if lifo:
        args.append("--lifo")
    if data is not None:
        args += ["--data", json.dumps(data)]
    return _run("add", url, *args, prefix=prefix).split()


def pause(url: str, queue: str, *, prefix: str = "bull") -> None:
    """``Queue.pause()``: the queue is paused for every worker."""
    _run("pause", url, "--queue", queue, prefix=prefix)


def resume(url: str, queue: str, *, prefix: str = "bull") -> None:
    """``Queue.resume()``."""
    _run("resume", url, "--queue", queue, prefix=prefix)


def counts(url: str, queue: str, *, prefix: str = "bull") -> dict[str, int]:
    """``Queue.getJobCounts()``, for a test's reference only: BullMQ's count script may pop a
    legacy marker off the wait list (a write), which an exporter must never do."""
    return json.loads(_run("counts", url, "--queue", queue, prefix=prefix))


def _first_line(proc: subprocess.Popen) -> str:
    """The first line ``proc`` prints ("" if it exits first), waiting at most ``TIMEOUT``."""
    # readline() has no timeout: read on a thread and wait on a queue with one
    lines: Queue[str] = Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")  # EOF: the worker exited

    threading.Thread(target=read, daemon=True).start()
    try:
        return lines.get(timeout=TIMEOUT)
    except Empty:
        raise RuntimeError(f"bullmq worker printed no 'ready' within {TIMEOUT:.0f}s") from None


def start_worker(
    url: str,
    queue: str,
    concurrency: int = 4,
    lock_ms: int = 30000,
    stalled_ms: int = 30000,
    *,
    prefix: str = "bull",
) -> subprocess.Popen:
    """Start a BullMQ ``Worker`` on ``queue`` and return once it is connected and running.

    ``lock_ms`` is its ``lockDuration`` (locks are renewed every half of it), ``stalled_ms`` its
    ``stalledInterval``. Stop it with :func:`stop_worker` (SIGTERM: ``worker.close()``; a running
    ``block`` job goes back to wait) or ``kill()`` (SIGKILL: jobs stay in active, their locks
    expire after ``lock_ms``). The worker's own errors go to the inherited stderr."""
    node = ensure_node_modules()
    proc = subprocess.Popen(
        [
            node,
            str(SCRIPT),
            "work",
            "--url",
            url,
            "--prefix",
            prefix,
            "--queue",
            queue,
            "--concurrency",
            str(concurrency),
            "--lock-ms",
            str(lock_ms),
            "--stalled-ms",
            str(stalled_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = _first_line(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"bullmq worker did not start (printed {line!r}, exit code {proc.returncode})"
        )
    return proc


def stop_worker(proc: subprocess.Popen, timeout: float = TIMEOUT) -> int:
    """SIGTERM (a clean ``worker.close()``), SIGKILL if it has not exited within ``timeout``;
    returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
