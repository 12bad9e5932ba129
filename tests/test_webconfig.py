"""The web configuration file (--web.config.file): TLS, client certificates, basic auth, headers.

Every behaviour is checked against a real aiohttp server on 127.0.0.1 with real TLS handshakes
(certificates from trustme) and real bcrypt hashes (cost 4, to stay fast); every mistake in a file
must become exactly one message naming the file, the key path and the fix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import trustme
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from jobqueue_exporter.config import ConfigError
from jobqueue_exporter.webconfig import AUTH_CACHE_SIZE, WebConfig, load_web_config

OPEN = frozenset({"/healthz", "/readyz"})
TIMEOUT = aiohttp.ClientTimeout(total=10)
# a refused handshake: asyncio's server side drops the connection, often before its TLS alert
REFUSED = (ssl.SSLError, ConnectionError)


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


ALICE = bcrypt_hash("wonderland")
BOB = bcrypt_hash("builder")


@dataclass
class Pki:
    """A server CA and certificate, and a client CA with two client certificates, as files."""

    dir: Path
    ca: trustme.CA
    client_ca: trustme.CA
    other_ca: trustme.CA
    server: trustme.LeafCert
    scraper: trustme.LeafCert  # SAN scraper.example, from client_ca
    intruder: trustme.LeafCert  # SAN intruder.example, from client_ca
    stranger: trustme.LeafCert  # SAN scraper.example, from other_ca
    files: dict[str, Path] = field(default_factory=dict)

    def client(self, leaf: trustme.LeafCert | None = None, **versions: Any) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if leaf is not None:
            leaf.configure_cert(ctx)
        for name, value in versions.items():
            setattr(ctx, name, value)
        return ctx


@pytest.fixture(scope="module")
def cas() -> tuple[trustme.CA, trustme.CA, trustme.CA]:
    return trustme.CA(), trustme.CA(), trustme.CA()


@pytest.fixture
def pki(tmp_path: Path, cas: tuple[trustme.CA, trustme.CA, trustme.CA]) -> Pki:
    ca, client_ca, other_ca = cas
    pki = Pki(
        dir=tmp_path,
        ca=ca,
        client_ca=client_ca,
        other_ca=other_ca,
        server=ca.issue_cert("localhost", "127.0.0.1"),
        scraper=client_ca.issue_cert("scraper.example"),
        intruder=client_ca.issue_cert("intruder.example"),
        stranger=other_ca.issue_cert("scraper.example"),
    )
    other_server = ca.issue_cert("localhost")
    blobs = {
        "server.pem": pki.server.cert_chain_pems[0],
        "server.key": pki.server.private_key_pem,
        "other.key": other_server.private_key_pem,
        "client-ca.pem": client_ca.cert_pem,
    }
    for name, blob in blobs.items():
        blob.write_to_path(str(tmp_path / name))
        pki.files[name] = tmp_path / name
    return pki


def write_config(directory: Path, data: Any, name: str = "web.yml") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


TLS = {"cert_file": "server.pem", "key_file": "server.key"}
MTLS = {**TLS, "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "client-ca.pem"}


@dataclass
class Server:
    cfg: WebConfig
    url: str
    hits: list[str]


@contextlib.asynccontextmanager
async def serve(cfg: WebConfig, open_paths: frozenset[str] = OPEN) -> AsyncIterator[Server]:
    """A real aiohttp server on 127.0.0.1 (TLS when configured) with /metrics, /healthz, /readyz."""
    hits: list[str] = []

    async def metrics(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="metrics\n")

    async def healthz(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(
            text="ready: target a polled 3s ago\n" if cfg.is_authenticated(request) else "ready\n"
        )

    app = web.Application(middlewares=[cfg.middleware(open_paths)])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cfg.ssl_context())
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if cfg.ssl_context() is not None else "http"
    try:
        yield Server(cfg, f"{scheme}://127.0.0.1:{port}", hits)
    finally:
        await runner.cleanup()


def basic(user: str, password: str) -> str:
    """An RFC 7617 Authorization header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def get(
    url: str,
    ssl_ctx: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = basic(*auth)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.get(
            url, ssl=ssl_ctx if ssl_ctx is not None else True, headers=headers
        ) as response:
            return response.status, await response.text(), response.headers


async def handshake(url: str, ctx: ssl.SSLContext) -> tuple[str, str]:
    """A bare TLS handshake: (version, cipher) negotiated, or ssl.SSLError."""
    port = int(url.rsplit(":", 1)[1])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), 10
    )
    try:
        obj = writer.get_extra_info("ssl_object")
        return obj.version(), obj.cipher()[0]
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


# --- TLS ---------------------------------------------------------------------------------------


async def test_tls_server_with_relative_cert_files(pki: Pki) -> None:
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": TLS}))
    async with serve(cfg) as server:
        assert server.url.startswith("https://")
        status, body, _ = await get(f"{server.url}/metrics", pki.client())
        assert (status, body) == (200, "metrics\n")
        # the default minimum is TLS 1.2, as in exporter-toolkit
        assert cfg.ssl_context().minimum_version == ssl.TLSVersion.TLSv1_2
        version, _ = await handshake(server.url, pki.client(maximum_version=ssl.TLSVersion.TLSv1_2))
        assert version == "TLSv1.2"
        # a client that does not trust the CA refuses the server
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(f"{server.url}/metrics", ssl.create_default_context())


async def test_plain_http_to_tls_port_fails(pki: Pki) -> None:
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": TLS}))
    async with serve(cfg) as server:
        with pytest.raises(aiohttp.ClientError):
            await get(server.url.replace("https://", "http://") + "/metrics")
        assert server.hits == []


async def test_min_version_tls13_rejects_tls12_client(pki: Pki) -> None:
    cfg = load_web_config(
        write_config(pki.dir, {"tls_server_config": {**TLS, "min_version": "TLS13"}})
    )
    async with serve(cfg) as server:
        with pytest.raises(REFUSED):
            await handshake(server.url, pki.client(maximum_version=ssl.TLSVersion.TLSv1_2))
        assert (await handshake(server.url, pki.client()))[0] == "TLSv1.3"


async def test_max_version_tls12_rejects_tls13_only_client(pki: Pki) -> None:
    cfg = load_web_config(
        write_config(pki.dir, {"tls_server_config": {**TLS, "max_version": "TLS12"}})
    )
    async with serve(cfg) as server:
        with pytest.raises(REFUSED):
            await handshake(server.url, pki.client(minimum_version=ssl.TLSVersion.TLSv1_3))
        assert (await handshake(server.url, pki.client()))[0] == "TLSv1.2"


async def test_inline_cert_and_key(pki: Pki) -> None:
    tls = {
        "cert": pki.server.cert_chain_pems[0].bytes().decode(),
        "key": pki.server.private_key_pem.bytes().decode(),
        "client_auth_type": "RequireAndVerifyClientCert",
        "client_ca": pki.client_ca.cert_pem.bytes().decode(),
    }
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": tls}))
    async with serve(cfg) as server:
        status, _, _ = await get(f"{server.url}/metrics", pki.client(pki.scraper))
        assert status == 200


async def test_cipher_suites_map_to_openssl(pki: Pki) -> None:
    # trustme's keys are ECDSA, so ECDSA suites; TLS 1.3 suite names are accepted and always on
    tls = {
        **TLS,
        "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"],
    }
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": tls}))
    tls12 = ssl.TLSVersion.TLSv1_2
    async with serve(cfg) as server:
        assert await handshake(server.url, pki.client(maximum_version=tls12)) == (
            "TLSv1.2",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
        )
        other = pki.client(maximum_version=tls12)
        other.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        with pytest.raises(REFUSED):
            await handshake(server.url, other)
        assert (await handshake(server.url, pki.client()))[0] == "TLSv1.3"


async def test_one_curve_preference_is_enforced(pki: Pki) -> None:
    cfg = load_web_config(
        write_config(pki.dir, {"tls_server_config": {**TLS, "curve_preferences": ["CurveP384"]}})
    )
    async with serve(cfg) as server:
        p256_only = pki.client()
        p256_only.set_ecdh_curve("prime256v1")
        with pytest.raises(REFUSED):
            await handshake(server.url, p256_only)
        p384 = pki.client()
        p384.set_ecdh_curve("secp384r1")
        assert (await handshake(server.url, p384))[0] == "TLSv1.3"


def test_prefer_server_cipher_suites(pki: Pki) -> None:
    default = load_web_config(write_config(pki.dir, {"tls_server_config": TLS}))
    assert default.ssl_context().options & ssl.OP_CIPHER_SERVER_PREFERENCE
    off = {"tls_server_config": {**TLS, "prefer_server_cipher_suites": False}}
    client_order = load_web_config(write_config(pki.dir, off))
    assert not client_order.ssl_context().options & ssl.OP_CIPHER_SERVER_PREFERENCE


# --- client certificates -----------------------------------------------------------------------


async def test_require_and_verify_client_cert(pki: Pki) -> None:
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": MTLS}))
    async with serve(cfg) as server:
        url = f"{server.url}/metrics"
        with pytest.raises(aiohttp.ClientError):  # no client certificate
            await get(url, pki.client())
        with pytest.raises(aiohttp.ClientError):  # a certificate from a CA not in client_ca_file
            await get(url, pki.client(pki.stranger))
        assert server.hits == []
        status, body, _ = await get(url, pki.client(pki.scraper))
        assert (status, body) == (200, "metrics\n")
        # the TLS layer needs the certificate on every path, open ones too
        with pytest.raises(aiohttp.ClientError):
            await get(f"{server.url}/healthz", pki.client())
        # no basic auth or SAN rule: a verified client counts as authenticated
        assert not cfg.auth_required
        status, body, _ = await get(f"{server.url}/readyz", pki.client(pki.scraper))
        assert (status, body) == (200, "ready: target a polled 3s ago\n")


async def test_verify_client_cert_if_given(pki: Pki) -> None:
    tls = {**MTLS, "client_auth_type": "VerifyClientCertIfGiven"}
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": tls}))
    async with serve(cfg) as server:
        url = f"{server.url}/metrics"
        assert (await get(url, pki.client()))[0] == 200
        assert (await get(url, pki.client(pki.scraper)))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await get(url, pki.client(pki.stranger))


async def test_client_allowed_sans(pki: Pki) -> None:
    tls = {**MTLS, "client_allowed_sans": ["scraper.example", "::1"]}
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": tls}))
    async with serve(cfg) as server:
        status, body, _ = await get(f"{server.url}/metrics", pki.client(pki.scraper))
        assert (status, body) == (200, "metrics\n")
        status, body, _ = await get(f"{server.url}/metrics", pki.client(pki.intruder))
        assert status == 403
        assert "none of the allowed SANs" in body
        # open paths are served, but the client does not count as authenticated there
        status, body, _ = await get(f"{server.url}/readyz", pki.client(pki.intruder))
        assert (status, body) == (200, "ready\n")
        status, body, _ = await get(f"{server.url}/readyz", pki.client(pki.scraper))
        assert (status, body) == (200, "ready: target a polled 3s ago\n")
        assert server.hits == ["/metrics", "/readyz", "/readyz"]


async def test_client_allowed_sans_with_optional_client_cert(pki: Pki) -> None:
    tls = {
        **MTLS,
        "client_auth_type": "VerifyClientCertIfGiven",
        "client_allowed_sans": ["scraper.example"],
    }
    cfg = load_web_config(write_config(pki.dir, {"tls_server_config": tls}))
    async with serve(cfg) as server:
        # without a certificate: the health check is served, nothing else
        assert (await get(f"{server.url}/healthz", pki.client()))[:2] == (200, "ok\n")
        assert (await get(f"{server.url}/metrics", pki.client()))[0] == 403
        assert (await get(f"{server.url}/metrics", pki.client(pki.scraper)))[0] == 200


# --- basic auth --------------------------------------------------------------------------------


def users_config(tmp_path: Path, **extra: Any) -> WebConfig:
    return load_web_config(
        write_config(tmp_path, {"basic_auth_users": {"alice": ALICE, "bob": BOB}, **extra})
    )


async def test_basic_auth(tmp_path: Path) -> None:
    cfg = users_config(tmp_path)
    assert cfg.ssl_context() is None
    async with serve(cfg) as server:
        url = f"{server.url}/metrics"
        status, body, _ = await get(url, auth=("alice", "wonderland"))
        assert (status, body) == (200, "metrics\n")
        assert (await get(url, auth=("bob", "builder")))[0] == 200

        for auth in (
            ("alice", "builder"),  # another user's password
            ("alice", ""),
            ("mallory", "wonderland"),  # unknown user
        ):
            status, body, headers = await get(url, auth=auth)
            assert (status, body) == (401, "Unauthorized\n")
            assert headers["WWW-Authenticate"] == 'Basic realm="jobqueue-exporter"'

        status, _, headers = await get(url)  # no Authorization header
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="jobqueue-exporter"'
        for header in ("Bearer abc", "Basic !!notbase64", "Basic YWxpY2U="):  # last: no colon
            assert (await get(url, headers={"Authorization": header}))[0] == 401
        assert server.hits == ["/metrics", "/metrics"]


async def test_open_paths_skip_auth_and_readyz_details_need_it(tmp_path: Path) -> None:
    cfg = users_config(tmp_path)
    async with serve(cfg) as server:
        assert (await get(f"{server.url}/healthz"))[:2] == (200, "ok\n")
        assert (await get(f"{server.url}/readyz"))[:2] == (200, "ready\n")
        wrong = ("alice", "nope")
        assert (await get(f"{server.url}/readyz", auth=wrong))[:2] == (200, "ready\n")
        right = ("alice", "wonderland")
        status, body, _ = await get(f"{server.url}/readyz", auth=right)
        assert (status, body) == (200, "ready: target a polled 3s ago\n")
        # only exact paths are open
        assert (await get(f"{server.url}/healthz/"))[0] == 401


async def test_successful_checks_are_cached_and_unknown_users_cost_a_check(tmp_path: Path) -> None:
    cfg = users_config(tmp_path)
    async with serve(cfg) as server:
        url = f"{server.url}/metrics"
        right = ("alice", "wonderland")
        assert cfg.bcrypt_checks == 0
        assert (await get(url, auth=right))[0] == 200
        assert cfg.bcrypt_checks == 1
        for _ in range(3):
            assert (await get(url, auth=right))[0] == 200
        assert cfg.bcrypt_checks == 1  # cache hits
        # failures are not cached: each one costs a check, an unknown user's as much as a known one's
        for _ in range(2):
            assert (await get(url, auth=("alice", "wrong")))[0] == 401
        assert cfg.bcrypt_checks == 3
        assert (await get(url, auth=("mallory", "x")))[0] == 401
        assert cfg.bcrypt_checks == 4


async def test_password_with_colon(tmp_path: Path) -> None:
    """Only the first ':' separates the user from the password."""
    cfg = load_web_config(
        write_config(tmp_path, {"basic_auth_users": {"carol": bcrypt_hash("a:b")}})
    )
    async with serve(cfg) as server:
        assert (await get(f"{server.url}/metrics", auth=("carol", "a:b")))[0] == 200


async def test_auth_cache_is_bounded(tmp_path: Path) -> None:
    users = {f"user{i}": bcrypt_hash(f"pw{i}") for i in range(AUTH_CACHE_SIZE + 1)}
    cfg = load_web_config(write_config(tmp_path, {"basic_auth_users": users}))
    async with serve(cfg) as server:
        url = f"{server.url}/metrics"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            for i in range(AUTH_CACHE_SIZE + 1):  # user0 is the least recently used at the end
                async with session.get(
                    url, headers={"Authorization": basic(f"user{i}", f"pw{i}")}
                ) as r:
                    assert r.status == 200
            assert cfg.bcrypt_checks == AUTH_CACHE_SIZE + 1
            async with session.get(url, headers={"Authorization": basic("user100", "pw100")}) as r:
                assert r.status == 200
            assert cfg.bcrypt_checks == AUTH_CACHE_SIZE + 1  # still cached
            async with session.get(url, headers={"Authorization": basic("user0", "pw0")}) as r:
                assert r.status == 200
            assert cfg.bcrypt_checks == AUTH_CACHE_SIZE + 2  # was evicted


async def test_tls_and_basic_auth_together(pki: Pki) -> None:
    cfg = load_web_config(
        write_config(pki.dir, {"tls_server_config": TLS, "basic_auth_users": {"alice": ALICE}})
    )
    async with serve(cfg) as server:
        url = f"{server.url}/metrics"
        assert (await get(url, pki.client()))[0] == 401
        right = ("alice", "wonderland")
        assert (await get(url, pki.client(), auth=right))[0] == 200


# --- headers and rate limit --------------------------------------------------------------------

HEADERS = {
    "X-Frame-Options": "deny",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-XSS-Protection": 1,
    "Content-Security-Policy": "default-src 'self'",
}
EXPECTED_HEADERS = {**HEADERS, "X-XSS-Protection": "1"}


async def test_headers_on_every_response(tmp_path: Path) -> None:
    cfg = users_config(tmp_path, http_server_config={"http2": False, "headers": HEADERS})
    right = ("alice", "wonderland")
    async with serve(cfg) as server:
        for path, auth, status in (
            ("/metrics", right, 200),
            ("/metrics", None, 401),
            ("/healthz", None, 200),
            ("/nowhere", right, 404),  # aiohttp raises HTTPNotFound through the middleware
        ):
            got, _, headers = await get(f"{server.url}{path}", auth=auth)
            assert got == status, path
            assert {name: headers.get(name) for name in EXPECTED_HEADERS} == EXPECTED_HEADERS


async def test_blank_header_is_not_set(tmp_path: Path) -> None:
    cfg = load_web_config(
        write_config(tmp_path, {"http_server_config": {"headers": {"X-Frame-Options": ""}}})
    )
    async with serve(cfg) as server:
        _, _, headers = await get(f"{server.url}/metrics")
        assert "X-Frame-Options" not in headers


async def test_rate_limit(tmp_path: Path) -> None:
    cfg = users_config(
        tmp_path,
        rate_limit={"interval": "1h", "burst": 2},
        http_server_config={"headers": {"X-Frame-Options": "deny"}},
    )
    right = ("alice", "wonderland")
    async with serve(cfg) as server:
        url = f"{server.url}/metrics"
        assert (await get(url, auth=right))[0] == 200
        assert (await get(url))[0] == 401  # a refused request uses up a token too
        status, body, headers = await get(url, auth=right)
        assert (status, body) == (429, "Too Many Requests\n")
        assert int(headers["Retry-After"]) > 3000
        assert headers["X-Frame-Options"] == "deny"
        # a liveness probe is never refused; with credentials it is served, unauthenticated
        assert (await get(f"{server.url}/healthz"))[0] == 200
        assert (await get(f"{server.url}/readyz", auth=right))[:2] == (200, "ready\n")
        assert cfg.bcrypt_checks == 1


async def test_rate_limit_zero_interval_disables_it(tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, {"rate_limit": {"interval": 0, "burst": 0}}))
    async with serve(cfg) as server:
        for _ in range(5):
            assert (await get(f"{server.url}/metrics"))[0] == 200


# --- defaults ----------------------------------------------------------------------------------


async def test_empty_config(tmp_path: Path) -> None:
    for cfg in (WebConfig.empty(), load_web_config(write_config(tmp_path, ""))):
        assert cfg.ssl_context() is None
        assert not cfg.auth_required
        async with serve(cfg) as server:
            status, body, headers = await get(f"{server.url}/readyz")
            assert (status, body) == (200, "ready: target a polled 3s ago\n")
            assert "X-Frame-Options" not in headers


def test_empty_sections_mean_plain_http(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "tls_server_config:\nhttp_server_config: {}\nbasic_auth_users: {}\nrate_limit:\n",
    )
    cfg = load_web_config(path)
    assert cfg.ssl_context() is None
    assert not cfg.auth_required


# --- configuration errors ----------------------------------------------------------------------


def errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    return info.value.problems


def error(directory: Path, data: Any) -> str:
    path = write_config(directory, data)
    problems = errors(path)
    assert len(problems) == 1, problems
    prefix = f"web config {path}: "
    assert problems[0].startswith(prefix)
    return problems[0][len(prefix) :]


UNKNOWN = "remove it or fix its spelling (the keys are those of exporter-toolkit's web configuration file)"


def test_unknown_keys(pki: Pki) -> None:
    d = pki.dir
    assert error(d, {"basic_auth_user": {}}) == (
        f"basic_auth_user: unknown key: did you mean 'basic_auth_users'? {UNKNOWN}"
    )
    assert error(d, {"tls_server_config": {**TLS, "min_verison": "TLS13"}}) == (
        f"tls_server_config.min_verison: unknown key: did you mean 'min_version'? {UNKNOWN}"
    )
    assert error(d, {"http_server_config": {"header": {}}}) == (
        f"http_server_config.header: unknown key: did you mean 'headers'? {UNKNOWN}"
    )
    assert error(d, {"rate_limit": {"interval": "1s", "burst": 1, "zzz": 1}}) == (
        f"rate_limit.zzz: unknown key: {UNKNOWN}"
    )


def test_missing_and_unreadable_files(pki: Pki) -> None:
    d = pki.dir
    assert error(d, {"tls_server_config": {**TLS, "cert_file": "nope.pem"}}) == (
        f"tls_server_config.cert_file: file '{d / 'nope.pem'}' not found: "
        "mount the certificate there or fix the path"
    )
    assert error(d, {"tls_server_config": {**TLS, "key_file": "/nonexistent/server.key"}}) == (
        "tls_server_config.key_file: file '/nonexistent/server.key' not found: "
        "mount the private key there or fix the path"
    )
    assert error(d, {"tls_server_config": {**MTLS, "client_ca_file": "ca.pem"}}) == (
        f"tls_server_config.client_ca_file: file '{d / 'ca.pem'}' not found: "
        "mount the CA certificate there or fix the path"
    )
    assert error(d, {"tls_server_config": {**TLS, "cert_file": "."}}) == (
        f"tls_server_config.cert_file: '{d}' is not a file: point cert_file at the certificate file"
    )
    assert error(d, {"tls_server_config": {"key_file": "server.key"}}) == (
        "tls_server_config.cert_file: required key is missing: set cert_file (or cert) to the "
        "server certificate (PEM), or remove tls_server_config to serve plain HTTP"
    )
    assert error(d, {"tls_server_config": {"min_version": "TLS13", "cert_file": "server.pem"}}) == (
        "tls_server_config.key_file: required key is missing: set key_file (or key) to the "
        "server certificate's private key (PEM), or remove tls_server_config to serve plain HTTP"
    )
    inline = {**TLS, "cert": pki.server.cert_chain_pems[0].bytes().decode()}
    assert error(d, {"tls_server_config": inline}) == (
        "tls_server_config.cert: set either cert or cert_file, not both: remove one of them"
    )


def test_bad_certificates_and_keys(pki: Pki) -> None:
    d = pki.dir
    key = pki.files["server.key"]
    assert error(d, {"tls_server_config": {**TLS, "key_file": "other.key"}}) == (
        f"tls_server_config.key_file: the private key in file '{d / 'other.key'}' does not match "
        f"the certificate in file '{d / 'server.pem'}': use the key the certificate was issued for"
    )
    assert error(d, {"tls_server_config": {**TLS, "cert_file": "server.key"}}) == (
        f"tls_server_config.cert_file: file '{key}' holds no PEM certificate (a '-----BEGIN "
        "CERTIFICATE-----' block): use the PEM-encoded server certificate (convert DER with: "
        "openssl x509 -inform der)"
    )
    assert error(d, {"tls_server_config": {**TLS, "key_file": "server.pem"}}) == (
        f"tls_server_config.key_file: file '{d / 'server.pem'}' holds no PEM private key (a "
        "'-----BEGIN PRIVATE KEY-----' block): use the PEM-encoded key of the server certificate"
    )
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (d / "encrypted.key").write_bytes(encrypted)
    assert error(d, {"tls_server_config": {**TLS, "key_file": "encrypted.key"}}) == (
        f"tls_server_config.key_file: file '{d / 'encrypted.key'}' is an encrypted private key, "
        "which exporter-toolkit does not read either: store it decrypted (openssl pkey -in KEY "
        "-out KEY.plain) with file permissions restricting who can read it"
    )
    assert error(d, {"tls_server_config": {**MTLS, "client_ca_file": "server.key"}}) == (
        f"tls_server_config.client_ca_file: file '{key}' holds no PEM certificate (a '-----BEGIN "
        "CERTIFICATE-----' block): use the PEM-encoded certificate of the CA that issues the "
        "client certificates"
    )


def test_client_auth_type_errors(pki: Pki) -> None:
    d = pki.dir
    assert error(d, {"tls_server_config": {**MTLS, "client_auth_type": "RequireAndVerify"}}) == (
        "tls_server_config.client_auth_type: unknown client_auth_type 'RequireAndVerify' (did you "
        "mean 'RequireAndVerifyClientCert'?): use one of NoClientCert, VerifyClientCertIfGiven, "
        "RequireAndVerifyClientCert"
    )
    for unsupported in ("RequireAnyClientCert", "RequestClientCert", "RequireClientCert"):
        assert error(d, {"tls_server_config": {**MTLS, "client_auth_type": unsupported}}) == (
            f"tls_server_config.client_auth_type: {unsupported} is not supported: it accepts "
            "client certificates without verifying them against a CA, which Python's ssl module "
            "cannot do: use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with "
            "client_ca_file"
        )
    assert error(
        d, {"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert"}}
    ) == (
        "tls_server_config.client_auth_type: RequireAndVerifyClientCert verifies client "
        "certificates against client_ca_file, which is not set: set client_ca_file (or "
        "client_ca) to the CA that issues the client certificates"
    )
    assert error(d, {"tls_server_config": {**TLS, "client_ca_file": "client-ca.pem"}}) == (
        "tls_server_config.client_ca_file: a client CA is set but client_auth_type is "
        "NoClientCert (the default), so no client certificate would be asked for: set "
        "client_auth_type: RequireAndVerifyClientCert, or remove the client CA"
    )
    assert error(d, {"tls_server_config": {**TLS, "client_allowed_sans": ["a"]}}) == (
        "tls_server_config.client_allowed_sans: client_allowed_sans checks the SANs of verified "
        "client certificates, but client_auth_type is NoClientCert (the default): set "
        "client_auth_type: RequireAndVerifyClientCert and client_ca_file"
    )
    assert error(d, {"tls_server_config": {**MTLS, "client_allowed_sans": []}}) == (
        "tls_server_config.client_allowed_sans: is empty, so no client could connect: "
        "list the allowed SANs"
    )


def test_unsupported_tls_options(pki: Pki) -> None:
    d = pki.dir
    assert error(d, {"tls_server_config": {**TLS, "min_version": "TLS10"}}) == (
        "tls_server_config.min_version: TLS10 is not supported: the OpenSSL under Python refuses "
        "TLS 1.0 and 1.1 at its default security level (and RFC 8996 deprecates them): use "
        "TLS12 or TLS13"
    )
    assert error(d, {"tls_server_config": {**TLS, "max_version": "TLS1.3"}}) == (
        "tls_server_config.max_version: unknown TLS version 'TLS1.3' (did you mean 'TLS13'?): "
        "use TLS12 or TLS13"
    )
    assert error(
        d, {"tls_server_config": {**TLS, "min_version": "TLS13", "max_version": "TLS12"}}
    ) == (
        "tls_server_config.max_version: is below min_version, so no connection could be made: "
        "raise max_version or lower min_version"
    )
    assert error(
        d, {"tls_server_config": {**TLS, "cipher_suites": ["TLS_RSA_WITH_AES_128_GCM_SHA256"]}}
    ) == (
        "tls_server_config.cipher_suites[0]: unknown cipher suite 'TLS_RSA_WITH_AES_128_GCM_SHA256' "
        "(did you mean 'TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256'?): use one of Go's secure suites "
        "that exporter-toolkit accepts, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 or "
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
    )
    assert error(
        d, {"tls_server_config": {**TLS, "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}}
    ) == (
        "tls_server_config.cipher_suites: lists only TLS 1.3 suites, which are always enabled and "
        "cannot be chosen: add the TLS 1.2 suites to allow, or set min_version: TLS13 to refuse "
        "TLS 1.2"
    )
    curves = ["CurveP256", "CurveP384", "CurveP521", "X25519"]
    assert error(d, {"tls_server_config": {**TLS, "curve_preferences": curves}}) == (
        "tls_server_config.curve_preferences: lists 4 curves, but Python's ssl module can "
        "restrict the key exchange to one curve only: keep the one curve to allow, or remove "
        "curve_preferences to let OpenSSL choose (it offers X25519, P-256, P-384 and P-521)"
    )
    assert error(d, {"tls_server_config": {**TLS, "curve_preferences": ["P256"]}}) == (
        "tls_server_config.curve_preferences[0]: unknown curve 'P256' (did you mean "
        "'CurveP256'?): use one of CurveP256, CurveP384, CurveP521, X25519"
    )
    assert error(d, {"http_server_config": {"http2": True}}) == (
        "http_server_config.http2: HTTP/2 is not supported: the exporter's aiohttp server speaks "
        "HTTP/1.1 only (Prometheus scrapes over it just as well): set http2: false or remove the "
        "key"
    )


def test_bad_bcrypt_hashes(tmp_path: Path) -> None:
    hint = (
        'make one with: python -c \'import bcrypt; print(bcrypt.hashpw(b"PASSWORD", '
        "bcrypt.gensalt()).decode())' or htpasswd -nBC 10 \"\" | tr -d ':\\n'"
    )
    message = error(tmp_path, {"basic_auth_users": {"alice": "wonderland"}})
    assert message == (
        "basic_auth_users.alice: not a bcrypt hash (one looks like $2y$10$ followed by 53 "
        f"characters; put the hash here, never the password): {hint}"
    )
    assert "wonderland" not in message  # a password written there is never echoed
    assert error(tmp_path, {"basic_auth_users": {"alice": ALICE[:-1]}}).startswith(
        "basic_auth_users.alice: not a bcrypt hash"
    )
    assert error(tmp_path, {"basic_auth_users": {"alice": "$apr1$abc$def"}}).startswith(
        "basic_auth_users.alice: not a bcrypt hash"
    )
    assert error(tmp_path, {"basic_auth_users": {"alice": "$2y$03$" + ALICE[7:]}}) == (
        f"basic_auth_users.alice: bcrypt cost 3 is outside 4..31: make a new hash, {hint}"
    )
    assert error(tmp_path, {"basic_auth_users": {"alice": None}}) == (
        f"basic_auth_users.alice: must be a bcrypt hash, found NoneType: {hint}"
    )
    assert error(tmp_path, {"basic_auth_users": {"a:b": ALICE}}) == (
        "basic_auth_users.a:b: user names cannot contain ':' (basic auth separates the user from "
        "the password with it, so this user could never log in): rename the user"
    )
    assert error(tmp_path, {"basic_auth_users": ["alice"]}) == (
        "basic_auth_users: must be a mapping of user names to bcrypt hashes, found a list"
    )
    # htpasswd's $2y$ and Python bcrypt's $2b$ are both fine
    load_web_config(write_config(tmp_path, {"basic_auth_users": {"a": "$2y$" + ALICE[4:]}}))


def test_header_errors(tmp_path: Path) -> None:
    allowed = (
        "exporter-toolkit allows only Content-Security-Policy, X-Frame-Options, "
        "X-Content-Type-Options, X-XSS-Protection, Strict-Transport-Security"
    )

    def header_error(headers: dict[str, Any]) -> str:
        return error(tmp_path, {"http_server_config": {"headers": headers}})

    assert header_error({"Server": "nginx"}) == (
        f"http_server_config.headers.Server: header 'Server' cannot be set here: {allowed}"
    )
    assert header_error({"x-frame-options": "deny"}) == (
        "http_server_config.headers.x-frame-options: header 'x-frame-options' cannot be set "
        "here: did you mean 'X-Frame-Options'? (header names are matched exactly, as in "
        f"exporter-toolkit) {allowed}"
    )
    assert header_error({"X-Frame-Option": "deny"}) == (
        "http_server_config.headers.X-Frame-Option: header 'X-Frame-Option' cannot be set "
        f"here: did you mean 'X-Frame-Options'? {allowed}"
    )
    assert header_error({"X-Frame-Options": "allow"}) == (
        "http_server_config.headers.X-Frame-Options: 'allow' is not allowed: use 'deny' or "
        "'sameorigin'"
    )
    assert header_error({"X-Frame-Options": "DENY"}) == (
        "http_server_config.headers.X-Frame-Options: 'DENY' is not allowed (values are "
        "case-sensitive, as in exporter-toolkit): use 'deny' or 'sameorigin'"
    )
    assert header_error({"X-Content-Type-Options": "sniff"}) == (
        "http_server_config.headers.X-Content-Type-Options: 'sniff' is not allowed: use 'nosniff'"
    )
    assert header_error({"Content-Security-Policy": "a\r\nSet-Cookie: x"}) == (
        "http_server_config.headers.Content-Security-Policy: must be a single line: remove the "
        "line breaks"
    )


def test_rate_limit_errors(tmp_path: Path) -> None:
    assert error(tmp_path, {"rate_limit": {"interval": 1, "burst": 5}}) == (
        "rate_limit.interval: 1 has no unit: write a duration such as 1s or 1ms "
        "(0 disables rate limiting)"
    )
    assert error(tmp_path, {"rate_limit": {"interval": "1d", "burst": 5}}) == (
        "rate_limit.interval: '1d' is not a duration: write e.g. 1s, 500ms or 1m30s "
        "(units: ns, us, ms, s, m, h; 0 disables rate limiting)"
    )
    assert error(tmp_path, {"rate_limit": {"interval": "1s"}}) == (
        "rate_limit.burst: is 0, so every request would be refused: set it to at least 1 "
        "(how many requests may come at once)"
    )
    assert error(tmp_path, {"rate_limit": {"interval": "1m30s", "burst": "5"}}) == (
        "rate_limit.burst: must be a whole number, found a string"
    )


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yml"
    assert errors(missing) == [
        f"web config {missing}: cannot read file: No such file or directory: fix the path"
    ]
    path = write_config(tmp_path, "basic_auth_users: [\n")
    [message] = errors(path)
    assert message.startswith(f"web config {path}: not valid YAML at line 2, column 1: ")
    path = write_config(tmp_path, "basic_auth_users: {}\nbasic_auth_users: {}\n")
    [message] = errors(path)
    assert message.startswith(f"web config {path}: not valid YAML at line 2, column 1: ")
    assert "duplicate key 'basic_auth_users' (first set at line 1): keep only one" in message
    path = write_config(tmp_path, "- tls_server_config\n")
    assert errors(path) == [
        f"web config {path}: (top level): must be a mapping with keys such as tls_server_config "
        "and basic_auth_users, found a list"
    ]


def test_every_mistake_is_reported_once(pki: Pki) -> None:
    path = write_config(
        pki.dir,
        {
            "tls_server_config": {"cert_file": "missing.pem", "key_file": "server.key"},
            "http_server_config": {"http2": True, "headers": {"X-Frame-Options": "DENY"}},
            "basic_auth_users": {"alice": "plain"},
            "rate_limt": {},
        },
    )
    problems = errors(path)
    keys = [p.removeprefix(f"web config {path}: ").split(":", 1)[0] for p in problems]
    assert keys == [
        "rate_limt",
        "tls_server_config.cert_file",
        "http_server_config.http2",
        "http_server_config.headers.X-Frame-Options",
        "basic_auth_users.alice",
    ]


def test_documented_example_loads(
    tmp_path: Path, cas: tuple[trustme.CA, trustme.CA, trustme.CA]
) -> None:
    """The README's example web configuration file is a working file."""
    doc = (Path(__file__).parent.parent / "README.md").read_text()
    section = doc.split("### TLS, client certificates and basic auth", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "tls").mkdir()
    leaf = cas[0].issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls" / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls" / "tls.key"))
    cfg = load_web_config(write_config(tmp_path, example))
    assert cfg.ssl_context() is not None
    assert cfg.auth_required
