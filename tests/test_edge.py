"""The HTTP edge under load and abuse: cached bodies in every format, scrapers that stop reading or
go away, slowloris sockets, the connection cap.

The large expositions here are synthetic snapshots injected into a target's state (no store is
involved: what is under test is serving bytes); everything else is a real exporter on a real socket.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import subprocess

import aiohttp
from helpers import make_config, parse_metrics, require_binary, value, wait_for
from jobqueue_exporter.exporter import Exporter
from jobqueue_exporter.http import HttpLimits
from jobqueue_exporter.snapshot import LabelPolicy, build_snapshot
from procrastinate_app import apply_schema
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _synthetic_config(**settings):
    return make_config(
        {
            "name": "big",
            "dsn": f"postgresql://postgres@127.0.0.1:{_closed_port()}/x",
            "preset": "procrastinate",
            "labels": {"env": 'pr"od'},
        },
        poll_interval="30m",  # after the first (failed) poll, nothing overwrites the injected state
        listen="127.0.0.1:0",
        **settings,
    )


async def _inject(exporter: Exporter, queues: int, kinds: int) -> int:
    """Give the exporter's only target a snapshot of queues x kinds keys; return its series count."""
    poller = exporter.pollers[0]
    await wait_for(lambda: poller.state.up is False, message="first poll failed")
    rows = [
        (f"queue-{q}", f"task\\{k}\n", state, q + k, float(k), 1)
        for q in range(queues)
        for k in range(kinds)
        for state in ("pending", "running")
    ]
    policy = LabelPolicy(None, max_kinds_per_queue=10_000)
    poller.state.snapshot = build_snapshot(policy, rows, None)
    poller.state.up = True
    poller.state.last_success = poller.state.snapshot.taken_at
    await exporter.cache.update(poller.state)
    return exporter.cache.series


async def test_every_format_is_the_same_cached_exposition(dsn: str, db) -> None:
    """Plain, gzip, OpenMetrics and OpenMetrics+gzip bodies carry the same samples, parse with
    prometheus_client's parsers and pass `promtool check metrics`; the body is joined once per update,
    not per scrape."""
    promtool = require_binary("promtool")
    await apply_schema(dsn)
    await db.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, status, args) "
        "SELECT 'q' || (i % 3), 'task_' || (i % 4), 'todo', '{}' FROM generate_series(1, 50) i"
    )
    config = make_config(
        {"name": "app", "dsn": dsn, "preset": "procrastinate", "labels": {"team": "a\\b"}},
        {
            "name": "gone",
            "dsn": f"postgresql://postgres@127.0.0.1:{_closed_port()}/x",
            "preset": "procrastinate",
        },
        poll_interval="30m",
        listen="127.0.0.1:0",
    )
    exporter = Exporter(config)
    await exporter.start()
    base = f"http://127.0.0.1:{exporter.port}/metrics"
    try:
        await wait_for(
            lambda: all(p.state.up is not None for p in exporter.pollers), message="both polled"
        )
        om = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        bodies = {}
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            for accept in ("text/plain", om):
                for encoding in ("identity", "gzip"):
                    headers = {"Accept": accept, "Accept-Encoding": encoding}
                    async with http.get(base, headers=headers) as response:
                        assert response.status == 200
                        body = await response.read()
                        assert (response.headers.get("Content-Encoding") == "gzip") == (
                            encoding == "gzip"
                        )
                        assert response.headers["Content-Type"].startswith(
                            "application/openmetrics-text" if accept == om else "text/plain"
                        )
                        bodies[(accept == om, encoding == "gzip")] = body
        generation = exporter.cache.generation
        text = bodies[(False, False)].decode()
        assert gzip.decompress(bodies[(False, True)]) == bodies[(False, False)]
        assert gzip.decompress(bodies[(True, True)]) == bodies[(True, False)]
        openmetrics = bodies[(True, False)].decode()
        assert openmetrics.endswith("# EOF\n") and "# EOF" not in text

        text_samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in parse_text(text)
            for s in family.samples
        }
        om_samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in parse_om(openmetrics)
            for s in family.samples
        }
        assert text_samples == om_samples
        assert value(text_samples, "jobqueue_up", target="app") == 1
        assert value(text_samples, "jobqueue_up", target="gone") == 0
        assert value(
            text_samples,
            "jobqueue_jobs",
            target="app",
            queue="q1",
            kind="task_1",
            state="pending",
            team="a\\b",
        ) == await db.fetchval(
            "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'q1' "
            "AND task_name = 'task_1' AND status = 'todo'"
        )
        # the target that is down serves no job series at all
        assert not [
            k for k in text_samples if k[0] == "jobqueue_jobs" and ("target", "gone") in k[1]
        ]
        families = {f.name: f.type for f in parse_om(openmetrics)}
        assert families["jobqueue_jobs_finished"] == "counter"
        assert families["jobqueue_exporter_build"] == "info"

        for body in (bodies[(False, False)], gzip.decompress(bodies[(False, True)])):
            checked = subprocess.run(
                [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
            )
            assert checked.returncode == 0, checked.stdout + checked.stderr
        assert exporter.cache.generation == generation, "scrapes do not re-render"
    finally:
        await exporter.stop()


async def _slow_scraper(port: int) -> socket.socket:
    """A scraper that asks for /metrics and never reads the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


async def test_healthz_answers_while_slow_scrapers_hold_the_edge_and_their_work_ends() -> None:
    limits = HttpLimits(max_concurrent_scrapes=4)
    exporter = Exporter(_synthetic_config(), limits=limits)
    await exporter.start()
    base = f"http://127.0.0.1:{exporter.port}"
    slow: list[socket.socket] = []
    try:
        series = await _inject(exporter, queues=100, kinds=200)  # ~20k keys, ~15 MB of text
        assert series > 100_000
        for _ in range(20):
            slow.append(await _slow_scraper(exporter.port))
        stats = exporter.stats
        await wait_for(lambda: stats.scrapes_in_flight == 20, message="20 scrapes in flight")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for path, status in (("/healthz", 200), ("/readyz", 200)):
                async with http.get(base + path) as response:
                    assert response.status == status, await response.text()
        assert stats.scrapes_in_flight == 20, "the slow scrapers are still being served"
        for sock in slow:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()  # RST: the scrapers went away
        slow.clear()
        await wait_for(lambda: stats.scrapes_in_flight == 0, message="abandoned scrapes ended")
        await wait_for(lambda: stats.connections_open == 0, message="their connections closed")
        assert stats.scrapes_abandoned == 20
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/metrics", headers={"Accept-Encoding": "gzip"}) as response:
                assert response.status == 200
                samples = parse_metrics(await response.text())
        assert (
            value(samples, "jobqueue_jobs", queue="queue-7", kind="task\\3\n", state="running")
            == 10
        )
    finally:
        for sock in slow:
            sock.close()
        await exporter.stop()


async def _dribbler(port: int, sent: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    if sent:
        sock.send(sent)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def test_slowloris_sockets_are_closed_after_the_header_timeout() -> None:
    exporter = Exporter(
        _synthetic_config(),
        limits=HttpLimits(header_timeout=1.0, idle_timeout=60, max_connections=200),
    )
    await exporter.start()
    base = f"http://127.0.0.1:{exporter.port}"
    socks: list[socket.socket] = []
    try:
        # silent sockets, and sockets that dribble headers but never finish them
        for i in range(100):
            socks.append(
                await _dribbler(exporter.port, b"" if i % 2 else b"GET /metrics HTTP/1.1\r\n")
            )
        async with aiohttp.ClientSession() as http:
            # a kept-alive client that completed its request is not a slowloris
            async with http.get(base + "/healthz") as response:
                assert response.status == 200

            async def dribble_and_check() -> bool:
                for sock in socks[::2]:
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                    except OSError:
                        pass
                return all(_closed_by_server(s) for s in socks)

            await wait_for(dribble_and_check, timeout=30, interval=0.2, message="slowloris closed")
            assert exporter.stats.connections_timed_out >= 100
            async with http.get(base + "/healthz") as response:
                assert response.status == 200
            assert exporter.stats.connections_open == 1, "the kept-alive client stays connected"
    finally:
        for sock in socks:
            sock.close()
        await exporter.stop()


async def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    exporter = Exporter(_synthetic_config(), limits=HttpLimits(max_connections=5))
    await exporter.start()
    held: list[socket.socket] = []
    try:
        for _ in range(5):
            held.append(await _dribbler(exporter.port, b""))
        await wait_for(lambda: exporter.stats.connections_open == 5, message="5 open")
        extra = await _dribbler(exporter.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: _closed_by_server(extra), message="the 6th closed")
        extra.close()
        assert exporter.stats.connections_rejected == 1
        for sock in held:
            sock.close()
        held.clear()
        await wait_for(lambda: exporter.stats.connections_open == 0, message="freed")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{exporter.port}/healthz") as response:
                assert response.status == 200
    finally:
        for sock in held:
            sock.close()
        await exporter.stop()


async def test_run_serves_https_with_basic_auth_from_the_web_config(tmp_path, dsn: str, db) -> None:
    """The `run` command with --web.config.file: TLS from a private CA, basic auth on /metrics,
    /healthz open, /readyz details only for authenticated clients; a bad file is a clear error."""
    import sys

    import bcrypt
    import trustme

    await apply_schema(dsn)
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.pem\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    )
    (tmp_path / "config.yaml").write_text(
        f"poll_interval: 200ms\ntargets:\n  - name: app\n    preset: procrastinate\n    dsn: {dsn}\n"
    )
    port = _closed_port()
    base = [
        sys.executable,
        "-m",
        "jobqueue_exporter.cli",
        "run",
        "--config",
        str(tmp_path / "config.yaml"),
    ]
    (tmp_path / "bad.yml").write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
    bad = subprocess.run(
        [*base, "--web.config.file", str(tmp_path / "bad.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        bad.returncode == 2 and "basic_auth_users" in bad.stderr and "Traceback" not in bad.stderr
    )
    proc = subprocess.Popen(
        [*base, "--listen", f"127.0.0.1:{port}", "--web.config.file", str(tmp_path / "web.yml")],
        stderr=subprocess.PIPE,
    )
    client_ssl = ca.client_ssl_context() if hasattr(ca, "client_ssl_context") else None
    if client_ssl is None:
        import ssl

        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
    url = f"https://127.0.0.1:{port}"
    import base64

    def basic(user: str, password: str) -> dict[str, str]:
        return {
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        }

    auth = basic("prometheus", "s3cret")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as http:

            async def ready() -> bool:
                try:
                    async with http.get(url + "/readyz", headers=auth) as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=60, interval=0.1, message="exporter ready over HTTPS")
            async with http.get(url + "/metrics") as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Basic")
            async with http.get(url + "/metrics", headers=basic("prometheus", "wrong")) as r:
                assert r.status == 401
            async with http.get(url + "/metrics", headers=auth) as response:
                assert response.status == 200
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert value(parse_metrics(await response.text()), "jobqueue_up", target="app") == 1
            async with http.get(url + "/healthz") as response:
                assert response.status == 200
            async with http.get(url + "/readyz") as response:
                assert (response.status, await response.text()) == (200, "ready\n")
            async with http.get(url + "/readyz", headers=auth) as response:
                assert "app (procrastinate): up, polled" in await response.text()
        # plain HTTP to the TLS port gets nothing served
        async with aiohttp.ClientSession() as http:
            try:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                    assert response.status == 400
            except aiohttp.ClientError:
                pass
    finally:
        proc.terminate()
        proc.wait(10)
