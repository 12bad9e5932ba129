"""The web configuration file (``--web.config.file``): TLS, client certificates, basic auth, headers.

The file has the keys of prometheus/exporter-toolkit's web configuration (what node_exporter's
``--web.config.file`` reads), so a file written for a Prometheus exporter works here as well. What
this server cannot do the same way is an error naming the key and what to use instead, never
silently ignored. Everything is read and checked once, by :func:`load_web_config`: a missing file,
a key that does not match its certificate or a malformed bcrypt hash stops the exporter at startup.

The server side is an aiohttp middleware (:meth:`WebConfig.middleware`) and an
:class:`ssl.SSLContext` (:meth:`WebConfig.ssl_context`) for ``web.TCPSite``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import difflib
import hashlib
import ipaddress
import math
import os
import re
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from aiohttp import hdrs, web

from .config import ConfigError, _UniqueKeyLoader

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

REALM = "jobqueue-exporter"
# successful (user, sha256(password)) checks kept, so a scrape every few seconds costs no bcrypt
AUTH_CACHE_SIZE = 100

# set by the middleware on every request it lets through; read it with WebConfig.is_authenticated
AUTHENTICATED: Any = (
    web.RequestKey("jobqueue_authenticated", bool)
    if hasattr(web, "RequestKey")
    else "jobqueue_authenticated"
)

_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)
_HTTP_KEYS = ("http2", "headers")
_RATE_LIMIT_KEYS = ("interval", "burst")

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# exporter-toolkit's policies that accept a client certificate without verifying it against a CA:
# OpenSSL through Python's ssl module either verifies a presented certificate or asks for none
_CLIENT_AUTH_UNVERIFIED = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_VERSIONS_REFUSED = ("TLS10", "TLS11")

# Go's names (crypto/tls CipherSuites(), what exporter-toolkit accepts) -> OpenSSL's names
_TLS12_CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
}
# TLS 1.3 suites are not configurable (in Go either); OpenSSL enables these three, as Go does
_TLS13_CIPHERS = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)

_CURVES = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

# exporter-toolkit's headers; a tuple lists the only values allowed (compared exactly, as there)
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-Content-Type-Options": ("nosniff",),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_HINT = (
    'make one with: python -c \'import bcrypt; print(bcrypt.hashpw(b"PASSWORD", '
    "bcrypt.gensalt()).decode())' or htpasswd -nBC 10 \"\" | tr -d ':\\n'"
)
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class _Problems:
    """Collects one message per mistake, each naming the file and the key path."""

    def __init__(self, source: str):
        self.source = source
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"web config {self.source}: {where}: {message}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """The known keys of a section (``{}`` for an empty or null one); None if not a mapping."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(where, f"must be a mapping of keys to values, found {_kind(value)}")
            return None
        known: dict[str, Any] = {}
        for key, item in value.items():
            if key in allowed:
                known[key] = item
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            self.add(
                _join(where, key),
                f"unknown key: {hint}remove it or fix its spelling "
                "(the keys are those of exporter-toolkit's web configuration file)",
            )
        return known


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _string(problems: _Problems, value: Any, where: str) -> str | None:
    """A string value; None (and no problem) when unset or empty, which exporter-toolkit treats
    as unset too."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.add(where, f"must be a string, found {_kind(value)}")
        return None
    return value


def _string_list(problems: _Problems, value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        problems.add(where, f"must be a list of strings, found {_kind(value)}")
        return None
    items: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            problems.add(f"{where}[{i}]", f"must be a non-empty string, found {_kind(item)}")
        else:
            items.append(item)
    return items


def _given(section: dict[str, Any], key: str) -> bool:
    return section.get(key) not in (None, "")


def _suggest(value: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, for inline ``cert``/``key``/``client_ca`` values:
    an anonymous in-memory file where Linux offers one, else a private temporary file, removed as
    soon as it is loaded."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("jobqueue-webconfig-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="jobqueue-webconfig-") as tmp:
        path = os.path.join(tmp, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path


class _Pem:
    """One PEM input: from a file (``path``) or inline in the config file."""

    def __init__(self, where: str, data: bytes, path: Path | None):
        self.where, self.data, self.path = where, data, path

    @property
    def described(self) -> str:
        return f"file '{self.path}'" if self.path is not None else "the inline value"

    @contextlib.contextmanager
    def open(self) -> Iterator[str]:
        if self.path is not None:
            yield str(self.path)
        else:
            with _pem_path(self.data) as path:
                yield path


def _pem_source(
    problems: _Problems,
    tls: dict[str, Any],
    inline_key: str,
    file_key: str,
    base_dir: Path,
    what: str,
) -> _Pem | None:
    """Read ``file_key`` (relative to the config file's directory) or take ``inline_key``."""
    inline_where = f"tls_server_config.{inline_key}"
    file_where = f"tls_server_config.{file_key}"
    inline = _string(problems, tls.get(inline_key), inline_where)
    filename = _string(problems, tls.get(file_key), file_where)
    if inline is not None and filename is not None:
        problems.add(
            inline_where, f"set either {inline_key} or {file_key}, not both: remove one of them"
        )
        return None
    if inline is not None:
        return _Pem(inline_where, inline.encode(), None)
    if filename is None:
        return None
    path = (base_dir / filename).absolute()
    if not path.exists():
        problems.add(file_where, f"file '{path}' not found: mount the {what} there or fix the path")
        return None
    if not path.is_file():
        problems.add(file_where, f"'{path}' is not a file: point {file_key} at the {what} file")
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.add(
            file_where,
            f"cannot read file '{path}': {exc.strerror or exc}: make it readable by the exporter",
        )
        return None
    return _Pem(file_where, data, path)


def _refuse_password() -> bytes:
    # never prompt on a terminal for an encrypted key (OpenSSL would); the load fails instead
    raise ValueError("encrypted private key")


def _load_certificate(
    problems: _Problems, ctx: ssl.SSLContext, cert: _Pem | None, key: _Pem | None
) -> None:
    if cert is not None and _PEM_CERT not in cert.data:
        problems.add(
            cert.where,
            f"{cert.described} holds no PEM certificate (a '-----BEGIN CERTIFICATE-----' block): "
            "use the PEM-encoded server certificate (convert DER with: openssl x509 -inform der)",
        )
        cert = None
    if key is not None:
        match = _PEM_KEY.search(key.data)
        if match is None:
            problems.add(
                key.where,
                f"{key.described} holds no PEM private key (a '-----BEGIN PRIVATE KEY-----' "
                "block): use the PEM-encoded key of the server certificate",
            )
            key = None
        elif b"ENCRYPTED" in match.group(1) or b"Proc-Type: 4,ENCRYPTED" in key.data:
            problems.add(
                key.where,
                f"{key.described} is an encrypted private key, which exporter-toolkit does not "
                "read either: store it decrypted (openssl pkey -in KEY -out KEY.plain) with "
                "file permissions restricting who can read it",
            )
            key = None
    if cert is None or key is None:
        return
    with cert.open() as cert_path, key.open() as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_refuse_password)
        except ssl.SSLError as exc:
            if "MISMATCH" in str(exc.reason or ""):
                problems.add(
                    key.where,
                    f"the private key in {key.described} does not match the certificate in "
                    f"{cert.described}: use the key the certificate was issued for",
                )
            else:
                problems.add(
                    cert.where,
                    f"cannot load the certificate from {cert.described} with the key from "
                    f"{key.described}: {exc.reason or exc}",
                )
        except ValueError:
            problems.add(key.where, f"{key.described} is an encrypted private key: decrypt it")


def _load_client_ca(problems: _Problems, ctx: ssl.SSLContext, ca: _Pem) -> None:
    if _PEM_CERT not in ca.data:
        problems.add(
            ca.where,
            f"{ca.described} holds no PEM certificate (a '-----BEGIN CERTIFICATE-----' block): "
            "use the PEM-encoded certificate of the CA that issues the client certificates",
        )
        return
    try:
        if ca.path is not None:
            ctx.load_verify_locations(cafile=str(ca.path))
        else:
            ctx.load_verify_locations(cadata=ca.data.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        problems.add(
            ca.where, f"cannot load CA certificates from {ca.described}: {exc.reason or exc}"
        )


def _tls_version(problems: _Problems, tls: dict[str, Any], key: str) -> ssl.TLSVersion | None:
    where = f"tls_server_config.{key}"
    value = _string(problems, tls.get(key), where)
    if value is None:
        return None
    if value in _TLS_VERSIONS_REFUSED:
        problems.add(
            where,
            f"{value} is not supported: the OpenSSL under Python refuses TLS 1.0 and 1.1 at its "
            "default security level (and RFC 8996 deprecates them): use TLS12 or TLS13",
        )
        return None
    if value not in _TLS_VERSIONS:
        problems.add(
            where,
            f"unknown TLS version {value!r}{_suggest(value, list(_TLS_VERSIONS))}: use TLS12 or TLS13",
        )
        return None
    return _TLS_VERSIONS[value]


def _ciphers(problems: _Problems, tls: dict[str, Any]) -> str | None:
    """The OpenSSL cipher string for ``cipher_suites``; None to keep OpenSSL's defaults."""
    where = "tls_server_config.cipher_suites"
    names = _string_list(problems, tls.get("cipher_suites"), where)
    if not names:
        return None  # empty: the defaults, as in exporter-toolkit
    openssl_names: list[str] = []
    ok = True
    for i, name in enumerate(names):
        if name in _TLS12_CIPHERS:
            openssl_names.append(_TLS12_CIPHERS[name])
        elif name not in _TLS13_CIPHERS:
            ok = False
            problems.add(
                f"{where}[{i}]",
                f"unknown cipher suite {name!r}{_suggest(name, [*_TLS12_CIPHERS, *_TLS13_CIPHERS])}: "
                "use one of Go's secure suites that exporter-toolkit accepts, e.g. "
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 or TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            )
    if ok and not openssl_names:
        problems.add(
            where,
            "lists only TLS 1.3 suites, which are always enabled and cannot be chosen: add the "
            "TLS 1.2 suites to allow, or set min_version: TLS13 to refuse TLS 1.2",
        )
    return ":".join(openssl_names) if ok and openssl_names else None


def _curve(problems: _Problems, tls: dict[str, Any]) -> str | None:
    where = "tls_server_config.curve_preferences"
    names = _string_list(problems, tls.get("curve_preferences"), where)
    if not names:
        return None
    curves: list[str] = []
    for i, name in enumerate(names):
        if name in _CURVES:
            curves.append(_CURVES[name])
        else:
            problems.add(
                f"{where}[{i}]",
                f"unknown curve {name!r}{_suggest(name, list(_CURVES))}: use one of "
                + ", ".join(_CURVES),
            )
    if len(curves) != len(names):
        return None
    if len(set(curves)) > 1:
        problems.add(
            where,
            f"lists {len(names)} curves, but Python's ssl module can restrict the key exchange "
            "to one curve only: keep the one curve to allow, or remove curve_preferences to "
            "let OpenSSL choose (it offers X25519, P-256, P-384 and P-521)",
        )
        return None
    return curves[0]


class _TLS:
    def __init__(self, context: ssl.SSLContext | None, allowed_sans: frozenset[str] | None):
        self.context, self.allowed_sans = context, allowed_sans


def _load_tls(problems: _Problems, section: Any, base_dir: Path) -> _TLS:
    tls = problems.mapping(section, "tls_server_config", _TLS_KEYS)
    if not tls:
        return _TLS(None, None)  # absent or empty: plain HTTP, as in exporter-toolkit
    before = len(problems.messages)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    cert = _pem_source(problems, tls, "cert", "cert_file", base_dir, "certificate")
    key = _pem_source(problems, tls, "key", "key_file", base_dir, "private key")
    for pem, inline_key, file_key, what in (
        (cert, "cert", "cert_file", "server certificate (PEM)"),
        (key, "key", "key_file", "server certificate's private key (PEM)"),
    ):
        if pem is None and not _given(tls, inline_key) and not _given(tls, file_key):
            problems.add(
                f"tls_server_config.{file_key}",
                f"required key is missing: set {file_key} (or {inline_key}) to the {what}, "
                "or remove tls_server_config to serve plain HTTP",
            )
    _load_certificate(problems, ctx, cert, key)

    client_ca = _pem_source(
        problems, tls, "client_ca", "client_ca_file", base_dir, "CA certificate"
    )
    if client_ca is not None:
        _load_client_ca(problems, ctx, client_ca)
    ca_configured = _given(tls, "client_ca") or _given(tls, "client_ca_file")

    where = "tls_server_config.client_auth_type"
    auth_type = _string(problems, tls.get("client_auth_type"), where) or "NoClientCert"
    verify_mode: ssl.VerifyMode | None = _CLIENT_AUTH.get(auth_type)
    if auth_type in _CLIENT_AUTH_UNVERIFIED:
        problems.add(
            where,
            f"{auth_type} is not supported: it accepts client certificates without verifying "
            "them against a CA, which Python's ssl module cannot do: use "
            "RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file",
        )
    elif verify_mode is None:
        problems.add(
            where,
            f"unknown client_auth_type {auth_type!r}{_suggest(auth_type, list(_CLIENT_AUTH))}: "
            "use one of " + ", ".join(_CLIENT_AUTH),
        )
    elif verify_mode == ssl.CERT_NONE and ca_configured:
        ca_key = "client_ca_file" if _given(tls, "client_ca_file") else "client_ca"
        problems.add(
            f"tls_server_config.{ca_key}",
            "a client CA is set but client_auth_type is NoClientCert (the default), so no client "
            "certificate would be asked for: set client_auth_type: RequireAndVerifyClientCert, "
            "or remove the client CA",
        )
    elif verify_mode != ssl.CERT_NONE and not ca_configured:
        problems.add(
            where,
            f"{auth_type} verifies client certificates against client_ca_file, which is not set: "
            "set client_ca_file (or client_ca) to the CA that issues the client certificates",
        )
    if verify_mode is not None:
        ctx.verify_mode = verify_mode

    where = "tls_server_config.client_allowed_sans"
    sans = _string_list(problems, tls.get("client_allowed_sans"), where)
    allowed_sans: frozenset[str] | None = None
    if sans is not None:
        if verify_mode == ssl.CERT_NONE:
            problems.add(
                where,
                "client_allowed_sans checks the SANs of verified client certificates, but "
                "client_auth_type is NoClientCert (the default): set client_auth_type: "
                "RequireAndVerifyClientCert and client_ca_file",
            )
        elif tls.get("client_allowed_sans") == []:
            problems.add(where, "is empty, so no client could connect: list the allowed SANs")
        allowed_sans = frozenset(_normalize_san(san) for san in sans)

    minimum = _tls_version(problems, tls, "min_version") or ssl.TLSVersion.TLSv1_2
    maximum = _tls_version(problems, tls, "max_version") or ssl.TLSVersion.TLSv1_3
    if minimum > maximum:
        problems.add(
            "tls_server_config.max_version",
            "is below min_version, so no connection could be made: raise max_version or lower "
            "min_version",
        )
    else:
        ctx.minimum_version, ctx.maximum_version = minimum, maximum

    ciphers = _ciphers(problems, tls)
    if ciphers is not None:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError as exc:
            problems.add(
                "tls_server_config.cipher_suites", f"OpenSSL accepts none of them: {exc.reason}"
            )
    prefer = tls.get("prefer_server_cipher_suites")
    prefer = True if prefer is None else prefer  # exporter-toolkit's default
    if not isinstance(prefer, bool):
        problems.add(
            "tls_server_config.prefer_server_cipher_suites",
            f"must be true or false, found {_kind(prefer)}",
        )
    elif prefer:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    curve = _curve(problems, tls)
    if curve is not None:
        ctx.set_ecdh_curve(curve)

    ctx.set_alpn_protocols(["http/1.1"])
    if len(problems.messages) > before:
        return _TLS(None, None)
    return _TLS(ctx, allowed_sans)


def _normalize_san(value: str) -> str:
    """IP addresses compared by value (``::1`` and ``0:0:0:0:0:0:0:1`` are one), the rest exactly."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def _peer_sans(peercert: Any) -> set[str]:
    if not isinstance(peercert, dict):
        return set()
    sans: set[str] = set()
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI"):
            sans.add(value)
        elif kind == "IP Address":
            sans.add(_normalize_san(value))
    return sans


def _load_headers(problems: _Problems, section: Any) -> dict[str, str]:
    http = problems.mapping(section, "http_server_config", _HTTP_KEYS)
    if not http:
        return {}
    http2 = http.get("http2")
    if http2 is not None and not isinstance(http2, bool):
        problems.add("http_server_config.http2", f"must be true or false, found {_kind(http2)}")
    elif http2:
        problems.add(
            "http_server_config.http2",
            "HTTP/2 is not supported: the exporter's aiohttp server speaks HTTP/1.1 only "
            "(Prometheus scrapes over it just as well): set http2: false or remove the key",
        )
    headers = http.get("headers")
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        problems.add(
            "http_server_config.headers",
            f"must be a mapping of header names to values, found {_kind(headers)}",
        )
        return {}
    result: dict[str, str] = {}
    for name, value in headers.items():
        where = f"http_server_config.headers.{name}"
        if name not in _HEADERS:
            same = [known for known in _HEADERS if known.lower() == str(name).lower()]
            if same:
                hint = f"did you mean {same[0]!r}? (header names are matched exactly, as in exporter-toolkit) "
            else:
                close = difflib.get_close_matches(str(name), list(_HEADERS), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
            problems.add(
                where,
                f"header {str(name)!r} cannot be set here: {hint}exporter-toolkit allows only "
                + ", ".join(_HEADERS),
            )
            continue
        if value is None or value == "":
            continue  # blank: not set, as exporter-toolkit documents
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int):
            value = str(value)  # X-XSS-Protection: 1
        if not isinstance(value, str):
            problems.add(where, f"must be a string, found {_kind(value)}: quote the value")
            continue
        if "\r" in value or "\n" in value:
            problems.add(where, "must be a single line: remove the line breaks")
            continue
        allowed = _HEADERS[name]
        if allowed is not None and value not in allowed:
            case = (
                " (values are case-sensitive, as in exporter-toolkit)"
                if value.lower() in allowed
                else ""
            )
            problems.add(
                where,
                f"{value!r} is not allowed{case}: use " + " or ".join(repr(v) for v in allowed),
            )
            continue
        result[name] = value
    return result


def _load_users(problems: _Problems, section: Any) -> dict[str, bytes]:
    where = "basic_auth_users"
    if section is None:
        return {}
    if not isinstance(section, dict):
        problems.add(
            where, f"must be a mapping of user names to bcrypt hashes, found {_kind(section)}"
        )
        return {}
    users: dict[str, bytes] = {}
    for user, hashed in section.items():
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            problems.add(_join(where, user), "the user name must be a string: quote it")
            continue
        user = str(user)
        user_where = _join(where, user)
        if ":" in user:
            problems.add(
                user_where,
                "user names cannot contain ':' (basic auth separates the user from the password "
                "with it, so this user could never log in): rename the user",
            )
            continue
        # the value is never echoed: it may be a password written where its hash belongs
        if not isinstance(hashed, str):
            problems.add(
                user_where, f"must be a bcrypt hash, found {_kind(hashed)}: {_BCRYPT_HINT}"
            )
            continue
        match = _BCRYPT_HASH.fullmatch(hashed.strip())
        if match is None:
            problems.add(
                user_where,
                "not a bcrypt hash (one looks like $2y$10$ followed by 53 characters; put the "
                f"hash here, never the password): {_BCRYPT_HINT}",
            )
            continue
        cost = int(match.group(1))
        if not 4 <= cost <= 31:
            problems.add(
                user_where, f"bcrypt cost {cost} is outside 4..31: make a new hash, {_BCRYPT_HINT}"
            )
            continue
        users[user] = hashed.strip().encode("ascii")
    return users


def _go_duration(value: Any) -> float:
    """Seconds in a Go duration such as ``1s``, ``500ms`` or ``1m30s`` (what exporter-toolkit
    reads); ValueError with the fix otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a duration such as 1s or 500ms, found {_kind(value)}")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0
        raise ValueError(
            f"{value} has no unit: write a duration such as {value}s or {value}ms "
            "(0 disables rate limiting)"
        )
    text = value.strip()
    if text == "0":
        return 0.0
    pos, seconds = 0, 0.0
    for match in _GO_DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(
            f"{value!r} is not a duration: write e.g. 1s, 500ms or 1m30s "
            "(units: ns, us, ms, s, m, h; 0 disables rate limiting)"
        )
    return seconds


class _TokenBucket:
    """``burst`` requests at once, then one more every ``interval`` seconds (starts full)."""

    def __init__(self, interval: float, burst: int):
        self.interval, self.burst = interval, burst
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> float:
        """0.0 when a request may go ahead, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) / self.interval)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) * self.interval


def _load_rate_limit(problems: _Problems, section: Any) -> _TokenBucket | None:
    limit = problems.mapping(section, "rate_limit", _RATE_LIMIT_KEYS)
    if not limit:
        return None
    try:
        interval = _go_duration(limit.get("interval", 0))
    except ValueError as exc:
        problems.add("rate_limit.interval", str(exc))
        return None
    burst = limit.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int):
        problems.add("rate_limit.burst", f"must be a whole number, found {_kind(burst)}")
        return None
    if interval == 0:
        return None  # exporter-toolkit's switch for "no rate limit"
    if burst < 1:
        problems.add(
            "rate_limit.burst",
            f"is {burst}, so every request would be refused: set it to at least 1 "
            "(how many requests may come at once)",
        )
        return None
    return _TokenBucket(interval, burst)


def _parse_basic(header: str) -> tuple[str, bytes] | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class WebConfig:
    """A loaded web configuration file. Build one with :func:`load_web_config` or
    :meth:`WebConfig.empty`."""

    def __init__(
        self,
        *,
        source: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        allowed_sans: frozenset[str] | None = None,
        users: Mapping[str, bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        rate_limit: _TokenBucket | None = None,
    ):
        self.source = source
        self._ssl_context = ssl_context
        self._allowed_sans = allowed_sans
        self._users = dict(users or {})
        self._headers = dict(headers or {})
        self._limiter = rate_limit
        self._cache: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._bcrypt_checks = 0
        # an unknown user is checked against this, so it costs as much as a known one; its
        # digest part never matches (only the salt and cost matter to the computation)
        self._dummy_hash: bytes | None = None
        if self._users:
            cost = max(int(h[4:6]) for h in self._users.values())
            self._dummy_hash = bcrypt.gensalt(rounds=cost) + b"." * 31

    @classmethod
    def empty(cls) -> WebConfig:
        """No TLS, no authentication, no extra headers: the default without ``--web.config.file``."""
        return cls()

    @property
    def bcrypt_checks(self) -> int:
        """How many bcrypt verifications have run (cache hits run none): for tests and debugging."""
        return self._bcrypt_checks

    @property
    def headers(self) -> dict[str, str]:
        """The configured response headers (the middleware adds them; a handler that streams its
        response sets them before sending, e.g. through ``on_response_prepare``)."""
        return dict(self._headers)

    @property
    def auth_required(self) -> bool:
        """Whether requests must authenticate (basic_auth_users or client_allowed_sans is set)."""
        return bool(self._users) or self._allowed_sans is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server context for ``web.TCPSite(..., ssl_context=)``; None without tls_server_config."""
        return self._ssl_context

    def is_authenticated(self, request: web.Request) -> bool:
        """True when no authentication is configured, or this request passed it (as checked by the
        middleware, also on open paths when the client sent credentials)."""
        if not self.auth_required:
            return True
        return bool(request.get(AUTHENTICATED, False))

    def middleware(self, open_paths: frozenset[str] = frozenset()) -> Middleware:
        """An aiohttp middleware: rate limit, client certificate SANs, basic auth and headers.

        Requests for ``open_paths`` (exact paths) are served without authentication: a health check
        must not need a password. Credentials they carry are still checked, so a handler can tell
        with :meth:`is_authenticated` whether to show details; the rate limit never refuses them
        (only such a credential check takes a token, and without one left the request is served
        as unauthenticated). The configured headers are added to every response, including 401,
        403, 404 and 429, except a streamed one whose headers were already sent.
        """
        open_paths = frozenset(open_paths)

        @web.middleware
        async def web_config_middleware(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            try:
                response = await self._guard(request, request.path in open_paths)
                if response is None:
                    response = await handler(request)
            except web.HTTPException as exc:
                self._add_headers(exc)
                raise
            self._add_headers(response)
            return response

        return web_config_middleware

    def _add_headers(self, response: Any) -> None:
        if self._headers and not getattr(response, "prepared", False):
            for name, value in self._headers.items():
                response.headers[name] = value

    async def _guard(self, request: web.Request, is_open: bool) -> web.StreamResponse | None:
        """None to let the request through (with AUTHENTICATED set), else the refusal to send."""
        header = request.headers.get(hdrs.AUTHORIZATION) if self._users else None
        check_credentials = not is_open or header is not None
        if self._limiter is not None and check_credentials:
            wait = self._limiter.take()
            if wait:
                if not is_open:
                    return web.Response(
                        status=429,
                        text="Too Many Requests\n",
                        headers={hdrs.RETRY_AFTER: str(max(1, math.ceil(wait)))},
                    )
                check_credentials = False  # serve the open path, but try no password now
        authenticated = True
        if self._allowed_sans is not None:
            sans = _peer_sans(
                request.transport.get_extra_info("peercert") if request.transport else None
            )
            if not sans & self._allowed_sans:
                request[AUTHENTICATED] = False
                if is_open:
                    return None
                return web.Response(
                    status=403,
                    text="Forbidden: the client certificate has none of the allowed SANs\n",
                )
        if self._users:
            authenticated = (
                check_credentials and header is not None and await self._check_basic(header)
            )
        request[AUTHENTICATED] = authenticated
        if not authenticated and not is_open:
            return web.Response(
                status=401,
                text="Unauthorized\n",
                headers={hdrs.WWW_AUTHENTICATE: f'Basic realm="{REALM}"'},
            )
        return None

    async def _check_basic(self, header: str) -> bool:
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        key = (user, hashlib.sha256(password).digest())
        if key in self._cache:
            self._cache.move_to_end(key)
            return True
        hashed = self._users.get(user)
        known = hashed is not None
        if hashed is None:
            assert self._dummy_hash is not None
            hashed = self._dummy_hash
        if self._executor is None:
            # one thread: bcrypt is CPU-bound, so concurrent checks queue here (off the event
            # loop) instead of crowding the default executor or every core
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="jobqueue-bcrypt"
            )
        self._bcrypt_checks += 1
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, _checkpw, password, hashed)
        if not (ok and known):
            return False
        self._cache[key] = None
        while len(self._cache) > AUTH_CACHE_SIZE:
            self._cache.popitem(last=False)
        return True


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # e.g. a password over bcrypt's 72 bytes: it cannot match
        return False


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web configuration file: ConfigError with one line per mistake."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [f"web config {source}: cannot read file: {exc.strerror or exc}: fix the path"]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"web config {source}: cannot read file: not UTF-8 text (byte {exc.start})"]
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            [f"web config {source}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"]
        ) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            [
                f"web config {source}: (top level): must be a mapping with keys such as "
                f"tls_server_config and basic_auth_users, found {_kind(data)}"
            ]
        )
    problems = _Problems(source)
    top = problems.mapping(data, "", _TOP_KEYS) or {}
    tls = _load_tls(problems, top.get("tls_server_config"), path.parent)
    headers = _load_headers(problems, top.get("http_server_config"))
    users = _load_users(problems, top.get("basic_auth_users"))
    limiter = _load_rate_limit(problems, top.get("rate_limit"))
    if problems.messages:
        raise ConfigError(problems.messages)
    return WebConfig(
        source=source,
        ssl_context=tls.context,
        allowed_sans=tls.allowed_sans,
        users=users,
        headers=headers,
        rate_limit=limiter,
    )
