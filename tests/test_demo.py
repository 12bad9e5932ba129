"""``jobqueue-exporter demo`` end to end: a real process, scraped over HTTP, stopped with Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url: str) -> dict[str, dict[Labels, float]] | None:
    """Sample name -> {sorted labels: value}; None while the demo is not serving yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def values(samples: dict[str, dict[Labels, float]], name: str, **match: str) -> list[float]:
    return [
        value
        for labels, value in samples.get(name, {}).items()
        if all(dict(labels).get(k) == v for k, v in match.items())
    ]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, Path]]:
    port = free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobqueue_exporter.cli",
                "demo",
                "--listen",
                f"127.0.0.1:{port}",
                "--duration",
                "90",
            ],
            stdout=stdout,
            stderr=stderr,
        )
    try:
        yield proc, f"http://127.0.0.1:{port}/metrics", out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_demo_serves_live_metrics_and_stops_cleanly_on_ctrl_c(demo) -> None:
    proc, url, out, err = demo
    seen = {
        "up": False,
        "succeeded": False,
        "failed": False,
        "moving": False,
        "stale": False,
        # the Redis target beside it: BullMQ jobs finishing, retried and dead ones
        "redis up": False,
        "redis succeeded": False,
        "redis retried": False,
        "redis dead": False,
    }
    first_total: float | None = None
    deadline = time.monotonic() + 80
    while not all(seen.values()):
        assert proc.poll() is None, f"demo exited early ({proc.returncode}): {err.read_text()}"
        assert time.monotonic() < deadline, (
            f"demo metrics never showed {[k for k, v in seen.items() if not v]}\n"
            f"stdout:\n{out.read_text()}\nstderr:\n{err.read_text()}"
        )
        samples = scrape(url)
        if samples is not None:
            finished = "jobqueue_jobs_finished_total"
            seen["up"] |= values(samples, "jobqueue_up", target="demo") == [1.0]
            seen["succeeded"] |= any(values(samples, finished, outcome="succeeded"))
            seen["failed"] |= any(values(samples, finished, outcome="failed"))
            total = sum(values(samples, finished))
            if first_total is None and total:
                first_total = total
            seen["moving"] |= first_total is not None and total > first_total
            stale = values(samples, "jobqueue_stale_jobs", target="demo", queue="imports")
            seen["stale"] |= any(v >= 1 for v in stale)
            seen["redis up"] |= values(samples, "jobqueue_up", target="demo-bullmq") == [1.0]
            for outcome in ("succeeded", "retried", "dead"):
                seen[f"redis {outcome}"] |= any(
                    values(samples, finished, target="demo-bullmq", outcome=outcome)
                )
        time.sleep(1)

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    stdout, stderr = out.read_text(), err.read_text()
    assert url in stdout
    assert "(stops after" in stdout and "Ctrl-C" not in stdout, "a duration was given"
    assert "finished since start:" in stdout and "imports" in stdout
    assert "Traceback" not in stderr, stderr


def test_summary_reads_the_exporter_state() -> None:
    from jobqueue_exporter.demo import format_summary
    from jobqueue_exporter.poll import TargetState
    from jobqueue_exporter.snapshot import QueueStats, SuccessWindow, TargetSnapshot

    state = TargetState(name="demo", preset="procrastinate", labels={}, window=SuccessWindow(60))
    assert "no data (first poll pending)" in format_summary(state, 100.0, 3.0)

    stats = QueueStats(oldest_pending_age_seconds=12.34, stale_jobs=1)
    stats.jobs.update(pending=7, running=2)
    state.snapshot = TargetSnapshot(
        taken_at=99.0,
        series={
            ("emails", "send_email"): stats,
            ("mixed", "a"): QueueStats(),
            ("mixed", "b"): QueueStats(),
        },
    )
    state.finished.update(
        {("emails", "send_email", "succeeded"): 9, ("emails", "send_email", "failed"): 1}
    )
    state.window.add(99.0, state.finished.copy())
    lines = format_summary(state, 100.0, 65.0).splitlines()
    assert (
        lines[0]
        == "[01:05] target demo up, polled 1.0s ago; finished since start: 9 succeeded, 1 failed, 0 retried"
    )
    assert lines[2].split() == ["emails", "7", "0", "2", "0", "12.3s", "1", "90%", "9/1/0"]
    assert [line.split()[0] for line in lines[3:]] == ["mixed/a", "mixed/b"]
