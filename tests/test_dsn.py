"""jobqueue_exporter.dsn: offline DSN checks, plus what asyncpg (and libpq) do with the same input.

No database is needed. asyncpg's own DSN parser
(``asyncpg.connect_utils._parse_connect_dsn_and_args``) runs offline: it reads only the
environment and files under ``$HOME`` (pgpass, service file, client certificates), which the
``asyncpg_parse`` fixture points at an empty temporary directory. libpq's parser is reached
through psycopg's ``conninfo_to_dict`` (PQconninfoParse) when psycopg is installed.
"""

from __future__ import annotations

import inspect
import os
import random
import string
import urllib.parse
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from asyncpg import connect_utils
from jobqueue_exporter.dsn import SSLMODES, TARGET_SESSION_ATTRS, dsn_problems, redact

EXAMPLE = "postgresql://user:password@host:5432/dbname"

VALID = [
    "postgresql://u:p%40ss@h:5432/db?sslmode=require&application_name=x",
    "postgresql://u@h1:5432,h2:5433/db",
    "postgresql://u@h1,h2,h3/db",
    "postgresql://u@[::1]:5432,h2:5433/db",
    "postgresql://u@[::1]:5432/db",
    "postgresql://u@[::1]/db",
    "postgresql:///db?host=/var/run/postgresql",
    "postgresql:///db?host=/var/run/postgresql&port=5433",
    "postgresql:///db",  # no host: libpq's default socket
    "postgresql://u@/db",
    "postgresql://",
    "postgres://u@h/db",
    "postgres://u:pw@h:5432/db",
    "postgresql://u:pa:ss@h/db",  # a ':' in the password is fine: the first ':' splits
    "postgresql://u@h:/db",  # empty port: the default
    "postgresql://u@h:1/db",
    "postgresql://u@h:65535/db",
    "postgresql://u@h/db?target_session_attrs=read-write&sslmode=disable",
    "postgresql://u@h/db?target_session_attrs=prefer-standby",
    "postgresql://u@h/db?foo=bar&statement_timeout=5000",  # unknown: sent as server settings
    "postgresql://u:pw@h/db?options=-c%20search_path%3Dx",
    "postgresql://host:5432/db?application_name=a@b",  # '@' in a query value is fine
    "postgresql://u:pw@h/db?application_name=exporter@prod",
    "postgresql://h1:5432,h2:5433/db?application_name=a@b",
    "postgresql://u@h:5432/db?options=x@y&sslmode=require",
    "postgresql://u:p ss$!*=&+@h/db",  # characters that do not break asyncpg's parsing
    "postgresql://u@xn--bcher-kva.example/db",
    "postgresql://u@h/db?",
    "postgresql://u@h/db?sslmode=",  # blank values are dropped by asyncpg
    "postgresql://u@h/db?port=5432",
    "postgresql://u%40corp.com:p%2F%3F%23%5B%5D@h/db",
    "  postgresql://u@h/db  ",
]
# valid too, but asyncpg's parser would go and look for ~/.postgresql/root.crt
VALID_NEEDING_CERTS = [
    "postgresql://u@h/db?sslmode=verify-ca",
    "postgresql://u@h/db?sslmode=verify-full&target_session_attrs=primary",
]


# --- asyncpg's own parser, offline ---------------------------------------------------------------


@pytest.fixture
def asyncpg_parse(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Callable[[str], tuple[list[Any], Any]]:
    """asyncpg's DSN parser with a clean environment: no PG* variables, an empty $HOME."""
    parse = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:
        pytest.skip("this asyncpg has no _parse_connect_dsn_and_args")
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USER", "tester")
    names = inspect.signature(parse).parameters

    def run(dsn: str) -> tuple[list[Any], Any]:
        kwargs: dict[str, Any] = {name: None for name in names}
        kwargs["dsn"] = dsn
        return parse(**kwargs)

    return run


@pytest.mark.parametrize("dsn", VALID + VALID_NEEDING_CERTS)
def test_valid_dsns_have_no_problems(dsn: str) -> None:
    assert dsn_problems(dsn) == []


@pytest.mark.parametrize("dsn", VALID)
def test_valid_dsns_are_accepted_by_asyncpg(dsn: str, asyncpg_parse: Callable) -> None:
    addrs, params = asyncpg_parse(dsn.strip())
    assert addrs


def test_valid_values_match_asyncpg() -> None:
    assert SSLMODES == tuple(m.name.replace("_", "-") for m in connect_utils.SSLMode)
    assert TARGET_SESSION_ATTRS == tuple(m.value for m in connect_utils.SessionAttribute)


# --- scheme -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "scheme"),
    [
        ("mysql://u@h/db", "mysql"),
        ("http://example.com/", "http"),
        ("https://u:pw@example.com/db", "https"),
        ("jdbc:postgresql://h/db", "jdbc:postgresql"),
    ],
)
def test_unsupported_scheme(dsn: str, scheme: str) -> None:
    assert dsn_problems(dsn) == [
        f"scheme '{scheme}' is not supported: the supported schemes are postgresql:// and "
        "postgres:// (PostgreSQL), redis://, rediss:// and unix:// (Redis); a PostgreSQL URI "
        f"looks like {EXAMPLE}"
    ]


def test_unsupported_scheme_is_rejected_by_asyncpg(asyncpg_parse: Callable) -> None:
    with pytest.raises(asyncpg.ClientConfigurationError, match="scheme is expected"):
        asyncpg_parse("mysql://u@h/db")


def test_not_a_uri_and_empty() -> None:
    assert dsn_problems("db.example.com:5432/app") == [
        f"is not a connection URI: write it as {EXAMPLE}"
    ]
    assert dsn_problems("") == [f"is empty: set a connection URI, e.g. {EXAMPLE}"]
    assert dsn_problems("  ") == [f"is empty: set a connection URI, e.g. {EXAMPLE}"]
    assert dsn_problems("://h/db") == [
        "an empty scheme is not supported: the supported schemes are postgresql:// and "
        "postgres:// (PostgreSQL), redis://, rediss:// and unix:// (Redis); a PostgreSQL URI "
        f"looks like {EXAMPLE}"
    ]


def test_scheme_that_is_not_a_scheme_is_not_shown() -> None:
    # "user:secret://..." is not echoed: it may hold a password
    (problem,) = dsn_problems("admin:s3cr3t://db/app")
    assert problem.startswith("the text before :// is not a scheme and not supported:")
    assert "s3cr3t" not in problem


def test_uppercase_scheme_is_accepted_like_asyncpg(asyncpg_parse: Callable) -> None:
    # urllib.parse lower-cases the scheme, so asyncpg accepts it (libpq would not)
    assert dsn_problems("POSTGRESQL://u@h/db") == []
    addrs, _ = asyncpg_parse("POSTGRESQL://u@h/db")
    assert addrs == [("h", 5432)]


# --- ports ------------------------------------------------------------------------------------

NOT_A_NUMBER = "port is not a number: use a number from 1 to 65535, e.g. host:5432"


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u@h:notaport/db", [NOT_A_NUMBER]),
        ("postgresql://u@h:5432x/db", [NOT_A_NUMBER]),
        (
            "postgresql://u@h:99999/db",
            ["port 99999 is out of range: use a number from 1 to 65535, e.g. host:5432"],
        ),
        (
            "postgresql://u@h:0/db",
            ["port 0 is out of range: use a number from 1 to 65535, e.g. host:5432"],
        ),
        ("postgresql://u@h1:5432,h2:x/db", [f"host 2 of 2: {NOT_A_NUMBER}"]),
        (
            "postgresql://u@h1:70000,h2:5433,h3:0/db",
            [
                "host 1 of 3: port 70000 is out of range: use a number from 1 to 65535, "
                "e.g. host:5432",
                "host 3 of 3: port 0 is out of range: use a number from 1 to 65535, e.g. host:5432",
            ],
        ),
        ("postgresql://u@[::1]:abc/db", [NOT_A_NUMBER]),
        ("postgresql://u@[::1]:5432,[::2]:x/db", [f"host 2 of 2: {NOT_A_NUMBER}"]),
        (
            "postgresql:///db?port=x",
            ["the port parameter is not a number: use a number from 1 to 65535, e.g. port=5432"],
        ),
        (
            "postgresql:///db?host=/tmp&port=5432,,99999",
            [
                "entry 2 of 3 of the port parameter is not a number: use a number from 1 to "
                "65535, e.g. port=5432",
                "entry 3 of 3 of the port parameter 99999 is out of range: use a number from 1 "
                "to 65535, e.g. port=5432",
            ],
        ),
    ],
)
def test_bad_ports(dsn: str, expected: list[str]) -> None:
    assert dsn_problems(dsn) == expected


def test_bad_ports_in_urllib_and_asyncpg(asyncpg_parse: Callable) -> None:
    # urllib.parse raises on .port for these, and on every multi-host URI
    for dsn in ("postgresql://u@h:notaport/db", "postgresql://u@h:99999/db"):
        with pytest.raises(ValueError):
            _ = urllib.parse.urlsplit(dsn).port
    with pytest.raises(ValueError):
        _ = urllib.parse.urlsplit("postgresql://u@h1:5432,h2:5433/db").port
    # asyncpg: int() fails for a non-number, an out-of-range port is accepted until connect(),
    # and a bad port after a bracketed IPv6 address is silently replaced by 5432
    with pytest.raises(ValueError, match="invalid literal for int"):
        asyncpg_parse("postgresql://u@h:notaport/db")
    assert asyncpg_parse("postgresql://u@h:99999/db")[0] == [("h", 99999)]
    assert asyncpg_parse("postgresql://u@[::1]:abc/db")[0] == [("::1", 5432)]
    assert asyncpg_parse("postgresql://u@h1:5432,h2:5433/db")[0] == [("h1", 5432), ("h2", 5433)]


def test_port_problem_hints_at_missing_host() -> None:
    # "user:password" with the "@host" forgotten reads as host "user", port "password"
    problems = dsn_problems("postgresql://user:s3cr3t/db")
    assert problems == [NOT_A_NUMBER + " (if this is user:password, add @host after it)"]


def test_malformed_host_lists() -> None:
    assert dsn_problems("postgresql://u@h1,/db") == [
        "the host list has an empty entry: remove the stray ',' "
        "(several hosts are written host1:5432,host2:5432)"
    ]
    assert dsn_problems("postgresql://u@::1/db") == [
        "looks like an IPv6 address without brackets: write it as [address]:port, e.g. [::1]:5432"
    ]
    assert dsn_problems("postgresql://u@[::1/db") == [
        "malformed IPv6 address: write it in brackets, optionally with a port, e.g. [::1]:5432"
    ]


def test_empty_host_entry_crashes_asyncpg(asyncpg_parse: Callable) -> None:
    with pytest.raises(IndexError):
        asyncpg_parse("postgresql://u@h1,/db")


# --- query parameters -------------------------------------------------------------------------


def test_bad_sslmode() -> None:
    assert dsn_problems("postgresql://u@h/db?sslmode=bogus") == [
        "sslmode 'bogus' is not valid: use one of disable, allow, prefer, require, verify-ca, "
        "verify-full"
    ]
    assert dsn_problems("postgresql://u@h/db?sslmode=verify_ca") == [
        "sslmode 'verify_ca' is not valid (did you mean 'verify-ca'?): use one of disable, "
        "allow, prefer, require, verify-ca, verify-full"
    ]
    # the last value wins, in asyncpg as in libpq
    assert dsn_problems("postgresql://u@h/db?sslmode=bogus&sslmode=require") == []
    assert len(dsn_problems("postgresql://u@h/db?sslmode=require&sslmode=bogus")) == 1


def test_bad_target_session_attrs() -> None:
    assert dsn_problems("postgresql://u@h/db?target_session_attrs=bogus") == [
        "target_session_attrs 'bogus' is not valid: use one of any, primary, standby, "
        "prefer-standby, read-write, read-only"
    ]
    assert dsn_problems("postgresql://u@h/db?target_session_attrs=read_write") == [
        "target_session_attrs 'read_write' is not valid (did you mean 'read-write'?): use one "
        "of any, primary, standby, prefer-standby, read-write, read-only"
    ]


def test_bad_query_values_are_rejected_by_asyncpg(asyncpg_parse: Callable) -> None:
    with pytest.raises(asyncpg.ClientConfigurationError, match="sslmode"):
        asyncpg_parse("postgresql://u@h/db?sslmode=bogus")
    with pytest.raises(asyncpg.ClientConfigurationError, match="target_session_attrs"):
        asyncpg_parse("postgresql://u@h/db?target_session_attrs=bogus")


def test_unknown_query_parameters_are_server_settings(asyncpg_parse: Callable) -> None:
    dsn = "postgresql://u@h/db?search_path=jobs&application_name=x"
    assert dsn_problems(dsn) == []
    _, params = asyncpg_parse(dsn)
    assert params.server_settings == {"search_path": "jobs", "application_name": "x"}


def test_malformed_query_string(asyncpg_parse: Callable) -> None:
    dsn = "postgresql://u@h/db?sslmode=require&"
    assert dsn_problems(dsn) == [
        "the query string after '?' is malformed: write parameters as name=value joined by "
        "'&', with no empty parts (such as a trailing '&'), and percent-encode '&' or '=' "
        "inside a value (as %26, %3D)"
    ]
    with pytest.raises(ValueError, match="bad query field"):
        asyncpg_parse(dsn)


def test_fragment(asyncpg_parse: Callable) -> None:
    dsn = "postgresql://u@h/db#x"
    assert dsn_problems(dsn) == [
        "contains an unencoded '#': asyncpg ignores it and everything after it; "
        "percent-encode it as %23"
    ]
    _, params = asyncpg_parse(dsn)
    assert params.database == "db"


# --- characters that break the user info --------------------------------------------------------


def test_at_sign_in_password() -> None:
    assert dsn_problems("postgresql://user:p@ss@host/db") == [
        "the password contains an unencoded '@': percent-encode it as %40, "
        "e.g. postgresql://user:p%40ss@host/db "
        "(asyncpg splits at the first '@', so the rest would be looked up as a host name)"
    ]


def test_at_sign_in_password_under_asyncpg(asyncpg_parse: Callable) -> None:
    # asyncpg splits the authority at the FIRST '@': the password is cut at it and the rest
    # becomes the host name, which connect() would look up in DNS
    addrs, params = asyncpg_parse("postgresql://user:p@ss@host/db")
    assert addrs == [("ss@host", 5432)]
    assert (params.user, params.password, params.database) == ("user", "p", "db")
    # the suggested fix
    addrs, params = asyncpg_parse("postgresql://user:p%40ss@host/db")
    assert addrs == [("host", 5432)]
    assert (params.user, params.password) == ("user", "p@ss")


def test_at_sign_in_password_under_libpq() -> None:
    conninfo = pytest.importorskip("psycopg.conninfo")
    # libpq splits at the first '@' as well
    parsed = conninfo.conninfo_to_dict("postgresql://user:p@ss@host/db")
    assert parsed["host"] == "ss@host"
    assert parsed["password"] == "p"


def test_at_sign_in_user_name(asyncpg_parse: Callable) -> None:
    dsn = "postgresql://me@corp.com:s3cr3t@host/db"
    assert dsn_problems(dsn) == [
        "the user name contains an unencoded '@': percent-encode it as %40, "
        "e.g. postgresql://me%40example.com:password@host/db "
        "(asyncpg splits at the first '@', so the rest would be looked up as a host name)"
    ]
    with pytest.raises(ValueError, match="invalid literal for int"):
        asyncpg_parse(dsn)


@pytest.mark.parametrize(
    ("dsn", "char", "encoded"),
    [
        ("postgresql://user:pa/ss@host/db", "/", "%2F"),
        ("postgresql://user:pa?ss@host/db", "?", "%3F"),
        ("postgresql://user:pa#ss@host/db", "#", "%23"),
        ("postgresql://user:pa[ss@host/db", "[", "%5B"),
        ("postgresql://user:pa]ss@host/db", "]", "%5D"),
        ("postgresql://user:pa/ss@host", "/", "%2F"),
        ("postgresql://admin:2024/pw@dbhost/app", "/", "%2F"),
    ],
)
def test_other_breaking_characters_in_password(dsn: str, char: str, encoded: str) -> None:
    (problem,) = dsn_problems(dsn)
    assert problem.startswith(
        f"the password contains an unencoded '{char}': percent-encode it as {encoded}, "
        f"e.g. postgresql://user:p{encoded}ss@host/db ("
    )


def test_other_breaking_characters_under_asyncpg(asyncpg_parse: Callable) -> None:
    # '/' ends the authority: "admin:2024" becomes host and port, the rest the database name
    addrs, params = asyncpg_parse("postgresql://admin:2024/pw@dbhost/app")
    assert addrs == [("admin", 2024)]
    assert params.database == "pw@dbhost/app"
    with pytest.raises(ValueError, match="invalid literal for int"):
        asyncpg_parse("postgresql://user:pa/ss@host/db")
    with pytest.raises(ValueError, match="bad query field"):
        asyncpg_parse("postgresql://user:pa?ss@host/db")
    with pytest.raises(ValueError, match="invalid literal for int"):
        asyncpg_parse("postgresql://user:pa#ss@host/db")
    with pytest.raises(ValueError, match="Invalid IPv6 URL"):
        asyncpg_parse("postgresql://user:pa[ss@host/db")
    # all of them work percent-encoded
    addrs, params = asyncpg_parse("postgresql://user:p%40%2F%3F%23%5B%5D:s@host/db")
    assert addrs == [("host", 5432)]
    assert params.password == "p@/?#[]:s"


def test_several_breaking_characters() -> None:
    assert dsn_problems("postgresql://user:p@s/s@host/db") == [
        "the password contains unencoded '@' and '/': percent-encode them ('@' as %40, "
        "'/' as %2F), e.g. postgresql://user:p%40ss@host/db "
        "(asyncpg splits at the first '@', so the rest would be looked up as a host name)"
    ]


def test_at_sign_in_user_name_and_slash_in_password() -> None:
    assert dsn_problems("postgresql://me@corp.com:pa/ss@host/db") == [
        "the user name contains an unencoded '@': percent-encode it as %40, "
        "e.g. postgresql://me%40example.com:password@host/db "
        "(asyncpg splits at the first '@', so the rest would be looked up as a host name)",
        "the password contains an unencoded '/': percent-encode it as %2F, "
        "e.g. postgresql://user:p%2Fss@host/db "
        "(the host part ends at the first '/', so asyncpg would read the text before it as "
        "host:port)",
    ]


def test_at_sign_possibly_in_database_name() -> None:
    # also a valid URI whose database is "my@db"; either way, encoding fixes it
    (problem,) = dsn_problems("postgresql://u:pw@h/my@db")
    assert problem.startswith("the password contains unencoded '@' and '/'")
    assert problem.endswith(
        "; if the last '@' belongs to the database name instead, percent-encode it there as %40"
    )
    assert dsn_problems("postgresql://u:pw@h/my%40db") == []


def test_host_part_with_impossible_characters() -> None:
    # "?x=y" in the password looks like a query, so the split cannot be guessed
    assert dsn_problems("postgresql://u:@a !?x=y@db") == [
        "the host part contains characters no host name has (such as a space, '!', '=' or "
        "'$'): if they belong to the password, percent-encode the password's special "
        "characters (e.g. '@' as %40, '/' as %2F, '?' as %3F)"
    ]


PASSWORD_CHARS = string.ascii_letters + string.digits + "@/?#[]:%&=+!$ -_.~,;'\""


@pytest.mark.parametrize("seed", range(4))
def test_random_passwords(seed: int, asyncpg_parse: Callable) -> None:
    """Encoded: never a problem, and asyncpg reads the password back. Raw: either asyncpg reads
    it right or there is a problem. Never the password in a message or in redact()."""
    rnd = random.Random(seed)
    for _ in range(500):
        password = "".join(rnd.choice(PASSWORD_CHARS) for _ in range(rnd.randint(4, 12)))
        host = rnd.choice(["db", "10.0.0.1", "[::1]", "h1:5432,h2:5433", "db:6432", ""])
        tail = rnd.choice(["/app", "", "/app?sslmode=require", "/app?application_name=a@b"])
        encoded = f"postgresql://app:{urllib.parse.quote(password, safe='')}@{host}{tail}"
        assert dsn_problems(encoded) == [], encoded
        assert asyncpg_parse(encoded)[1].password == password
        assert password not in redact(encoded)

        raw = f"postgresql://app:{password}@{host}{tail}"
        problems = dsn_problems(raw)
        if not problems:
            addrs, params = asyncpg_parse(raw)
            assert params.password == urllib.parse.unquote(password), raw
            if host:
                expected = ["::1" if h[0] == "[" else h.split(":")[0] for h in host.split(",")]
                assert [a[0] for a in addrs] == expected, raw
        for problem in problems:
            assert password not in problem
        assert password not in redact(raw), raw


SECRET_DSNS = [
    "postgresql://user:s3cr3t@x@host/db",
    "postgresql://user:s3@cr3t@host:99999/db?sslmode=bogus",
    "postgresql://user:s3cr3t/x@host/db",
    "postgresql://user:s3cr3t?x@host/db",
    "postgresql://user:s3cr3t#x@host/db",
    "postgresql://user:s3cr3t[x@host/db",
    "postgresql://user:s3cr3t]x@host/db",
    "postgresql://user:s3cr3t?a=b@host/db",
    "postgresql://user:s3cr3t/db",
    "postgresql://user:s3cr3t@host:99999/db",
    "postgresql://user:s3cr3t@host/db?a=1&",
    "postgresql://me@corp:s3cr3t@host/db",
    "postgresql://user:s3[cr]3t@host/db",
    "host=db user=x password=s3cr3t port=5433",
    "host=db user=x password='s3cr3t",
]


@pytest.mark.parametrize("dsn", SECRET_DSNS)
def test_messages_never_contain_the_password(dsn: str) -> None:
    problems = dsn_problems(dsn)
    assert problems
    for problem in problems:
        for fragment in ("s3cr3t", "s3", "cr3t", "cr"):
            assert fragment not in problem


# --- libpq keyword/value form -------------------------------------------------------------------

KEYWORDS = "host=db dbname=app user=x password=secret port=5433"


def test_keyword_form() -> None:
    assert dsn_problems(KEYWORDS) == [
        "is a libpq keyword/value string, which asyncpg does not accept (it takes only URIs): "
        "use the URI form instead: postgresql://x:***@db:5433/app "
        "(put the real password, percent-encoded, in place of ***)"
    ]


@pytest.mark.parametrize(
    ("dsn", "uri"),
    [
        ("host=db dbname=app", "postgresql://db/app"),
        ("dbname=app", "postgresql:///app"),
        (
            "host = db  port = 5432 user = 'a b' dbname='my db'",
            "postgresql://a%20b@db:5432/my%20db",
        ),
        ("host=db password='it\\'s' user=x", "postgresql://x:***@db/"),
        ("host=h1,h2 port=5432,5433 dbname=app", "postgresql://h1:5432,h2:5433/app"),
        ("host=h1,h2 port=5433 dbname=app", "postgresql://h1:5433,h2:5433/app"),
        ("host=::1 dbname=app", "postgresql://[::1]/app"),
        (
            "host=/var/run/postgresql port=5433 dbname=app sslmode=disable",
            "postgresql:///app?host=/var/run/postgresql&port=5433&sslmode=disable",
        ),
        ("hostaddr=10.0.0.5 port=5433 dbname=app", "postgresql://10.0.0.5:5433/app"),
        (
            "host=db dbname=app sslmode=require application_name=exp",
            "postgresql://db/app?sslmode=require&application_name=exp",
        ),
    ],
)
def test_keyword_form_suggestions(dsn: str, uri: str) -> None:
    (problem,) = dsn_problems(dsn)
    assert f"use the URI form instead: {uri}" in problem
    assert dsn_problems(uri) == []


def test_unparseable_keyword_form() -> None:
    assert dsn_problems("host=db password='unterminated") == [
        "is a libpq keyword/value string, which asyncpg does not accept (it takes only URIs) "
        f"and cannot be parsed either: use the URI form instead, e.g. {EXAMPLE}"
    ]


def test_keyword_form_under_asyncpg(asyncpg_parse: Callable) -> None:
    # asyncpg reads every DSN as a URI: this one has no scheme
    with pytest.raises(asyncpg.ClientConfigurationError, match="scheme is expected"):
        asyncpg_parse(KEYWORDS)
    # the suggested URI, with the real password put back, means the same to asyncpg
    suggested = dsn_problems(KEYWORDS)[0].split("instead: ")[1].split(" ")[0]
    addrs, params = asyncpg_parse(suggested.replace("***", "secret"))
    assert addrs == [("db", 5433)]
    assert (params.user, params.password, params.database) == ("x", "secret", "app")


@pytest.mark.parametrize(
    "dsn",
    [
        KEYWORDS,
        "host = db  port = 5432 user = 'a b' dbname='my db'",
        "host=db password='it\\'s' user=x",
        "host=h1,h2 port=5432,5433 dbname=app",
        "host=/var/run/postgresql port=5433 dbname=app sslmode=disable",
    ],
)
def test_keyword_form_suggestion_means_the_same_to_libpq(dsn: str) -> None:
    conninfo = pytest.importorskip("psycopg.conninfo")
    suggested = dsn_problems(dsn)[0].split("instead: ")[1].split(" ")[0]
    expected = conninfo.conninfo_to_dict(dsn)
    if "password" in expected:
        expected["password"] = "***"
    assert conninfo.conninfo_to_dict(suggested) == expected


# --- redact -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:p%40ss@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u:@h/db", "postgresql://u:@h/db"),
        ("postgresql:///db?host=/tmp", "postgresql:///db?host=/tmp"),
        ("postgresql://u@h1:5432,h2:5433/db", "postgresql://u@h1:5432,h2:5433/db"),
        ("postgresql://u@[::1]:5432/db", "postgresql://u@[::1]:5432/db"),
        # malformed: the whole intended password is hidden
        ("postgresql://user:p@ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:pa/ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:pa?ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:pa#ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:secret/db", "postgresql://user:***/db"),
        ("postgresql://host:5432/db", "postgresql://host:5432/db"),
        # query parameters
        (
            "postgresql://u@h/db?password=x&sslpassword=y&sslmode=require",
            "postgresql://u@h/db?password=***&sslpassword=***&sslmode=require",
        ),
        # keyword form
        (KEYWORDS, "host=db dbname=app user=x password=*** port=5433"),
        ("host=db password = 'a b\\'c' user=x", "host=db password = *** user=x"),
        ("host=db password='unterminated user=x", "host=db password=***"),
        ("host=db sslpassword=k user=x", "host=db sslpassword=*** user=x"),
        # other schemes and no scheme
        ("mysql://u:secret@h/db", "mysql://u:***@h/db"),
        ("u:secret@h/db", "u:***@h/db"),
    ],
)
def test_redact(dsn: str, redacted: str) -> None:
    assert redact(dsn) == redacted
