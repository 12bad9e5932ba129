"""``rediss://``: the Redis source over TLS, against Debian's redis-server (built with TLS; the Valkey wheel
is not). A certificate the URL's CA does not vouch for is a failed poll naming the endpoint."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import make_config, require_binary, scrape, value, wait_for
from jobqueue_exporter.poll import TargetPoller

pytestmark = pytest.mark.redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """(TLS port, CA that signed the server's certificate, an unrelated CA)."""
    import trustme

    server = require_binary("redis-server")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    other.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    port = free_port()
    proc = subprocess.Popen(
        [
            server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
            "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"

        def ready() -> bool:
            try:
                return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
            except redis.exceptions.ConnectionError:
                return False

        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server with TLS"
            time.sleep(0.1)
        yield port, tmp_path / "ca.pem", tmp_path / "other-ca.pem"
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_rediss_target_is_read_over_tls(tls_redis: tuple[int, Path, Path]) -> None:
    port, ca, other = tls_redis
    from bullmq import Queue

    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    queue = Queue("mail", {"connection": url})  # BullMQ's own Python package, over TLS too
    for n in range(2):
        await queue.add("send", {"n": n})
    await queue.close()
    config = make_config(
        {"name": "tls", "dsn": url, "preset": "bullmq", "queues": ["mail"]},
        {
            "name": "bad-ca",
            "dsn": f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other}",
            "preset": "bullmq",
            "queues": ["mail"],
        },
    )
    good, bad = (TargetPoller(config, t) for t in config.targets)
    await good.poll_once()
    assert value(scrape(good), "jobqueue_jobs", queue="mail", kind="default", state="pending") == 2
    with pytest.raises(redis.exceptions.ConnectionError):
        await bad.poll_once()
    await wait_for(lambda: bad.state.up is False, timeout=5)
    assert value(scrape(bad), "jobqueue_poll_errors_total", reason="connection") == 1
    assert f"127.0.0.1:{port}" in (bad.state.last_error or "")
    assert "certificate" in (bad.state.last_error or "").lower()
    await good.close()
    await bad.close()
