"""Offline checks of a target's ``dsn`` before the exporter hands it to asyncpg.

asyncpg parses a connection URI with :func:`urllib.parse.urlparse` and then splits the
authority on its *first* ``@``. Several common mistakes therefore do not fail with a clear
error. They are misparsed without any warning:

* ``postgresql://user:p@ss@host/db`` becomes user ``user``, password ``p`` and host
  ``ss@host``. That host name then goes to DNS and the error is a name-resolution failure
  that never mentions the password.
* ``postgresql://admin:2024/pw@host/app`` (a ``/`` in the password) becomes host ``admin``,
  port 2024 and database ``pw@host/app``.
* ``?``, ``#``, ``[`` or ``]`` in a password end in an error that does not point at the
  password (``bad query field``, ``invalid literal for int()``, ``Invalid IPv6 URL``), or,
  when what comes before them happens to read as ``host:port``, in a connection to the
  wrong host.
* ``postgresql://u@[::1]:abc/db`` silently uses port 5432. ``:99999`` is accepted and then
  fails only when the socket is opened (``OverflowError``).
* A libpq keyword/value string (``host=db dbname=app``) is rejected with a bare
  "scheme is expected to be ..." error.

:func:`dsn_problems` finds these without any network or DNS access. It reports what is wrong
and how to fix it, and never repeats a password. :func:`redact` hides the passwords in a DSN
so that the DSN can appear in a message.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["SSLMODES", "TARGET_SESSION_ATTRS", "dsn_problems", "redact"]

# libpq's spelling. asyncpg's SSLMode.parse also takes "verify_ca" and is case-sensitive.
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# asyncpg.connect_utils.SessionAttribute
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")

SCHEMES = ("postgresql", "postgres")
EXAMPLE_URI = "postgresql://user:password@host:5432/dbname"

# Characters that cannot appear unencoded in a URI's user name or password under asyncpg:
# "@" moves the split between user info and host, "/", "?" and "#" end the authority
# early, and "[" or "]" make urllib.parse raise "Invalid IPv6 URL".
_USERINFO_BREAKERS = {"@": "%40", "/": "%2F", "?": "%3F", "#": "%23", "[": "%5B", "]": "%5D"}
_AUTHORITY_END = "/?#"
# What may follow "@" as a host list: names, IPv4, bracketed IPv6, ports, commas, %-escapes.
_HOSTLIKE = re.compile(r"[A-Za-z0-9._~%\-\[\]:,]*")
# Characters no host name, IP address or %-escape contains (non-ASCII names are left alone).
_NOT_IN_HOSTS = re.compile(r"[\s!\"$&'()*+;<=>\\^`{|}@/?#]")
_KEYWORD_START = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
_PORT = re.compile(r"[0-9]+")
_SECRET_KEYS = ("password", "sslpassword")


def dsn_problems(dsn: str) -> list[str]:
    """Return one message per problem with ``dsn``. An empty list means it is fine.

    Each message says what is wrong and how to fix it. It is meant to follow a key path such as
    ``targets[0](app).dsn: ``. Messages never contain the password. Nothing is resolved or
    connected to.
    """
    text = dsn.strip()
    if not text:
        return [f"is empty: set a connection URI, e.g. {EXAMPLE_URI}"]
    if _KEYWORD_START.match(text):
        return [_keyword_form_message(text)]
    scheme, sep, rest = text.partition("://")
    if not sep:
        return [f"is not a connection URI: write it as {EXAMPLE_URI}"]
    if scheme.lower() not in SCHEMES:
        if not scheme:
            shown = "an empty scheme is"
        elif re.fullmatch(r"(jdbc:)?[A-Za-z][A-Za-z0-9+.-]*", scheme):
            shown = f"scheme '{scheme}' is"
        else:  # not a scheme ("user:secret" perhaps), so it is not shown
            shown = "the text before :// is not a scheme and"
        return [
            f"{shown} not supported: the supported schemes are postgresql:// and postgres:// "
            f"(PostgreSQL), redis://, rediss:// and unix:// (Redis); a PostgreSQL URI looks like "
            f"{EXAMPLE_URI}"
        ]

    userinfo, hostspec, tail, ambiguous = _split_authority(rest)
    problems: list[str] = []
    if userinfo is not None:
        userinfo_problems = _userinfo_problems(userinfo, bracket_ok=_urlparse_ok(text))
        if ambiguous and userinfo_problems:
            userinfo_problems[-1] += (
                "; if the last '@' belongs to the database name instead, percent-encode it "
                "there as %40"
            )
        problems.extend(userinfo_problems)
    problems.extend(_host_problems(hostspec, has_userinfo=userinfo is not None))
    before_fragment, hash_sign, _ = tail.partition("#")
    if hash_sign:
        problems.append(
            "contains an unencoded '#': asyncpg ignores it and everything after it; "
            "percent-encode it as %23"
        )
    _, question_mark, query = before_fragment.partition("?")
    if question_mark:
        problems.extend(_query_problems(query))

    if not problems:
        # Safety net: the stdlib parsing asyncpg relies on must not raise. The exception text is
        # left out because it can contain part of the password.
        try:
            parsed = urllib.parse.urlparse(text)
            if parsed.query:
                urllib.parse.parse_qs(parsed.query, strict_parsing=True)
        except ValueError:
            problems.append(
                "cannot be parsed as a URI: percent-encode special characters in the user "
                f"name, password and database name (e.g. '@' as %40), e.g. {EXAMPLE_URI}"
            )
    return problems


def redact(dsn: str) -> str:
    """Return ``dsn`` with every password (and ``sslpassword``) replaced by ``***``.

    Handles the URI form (``user:password@`` and the ``password`` query parameter) and the
    libpq keyword/value form (``password=...``, quoted or not). A malformed URI is read
    the way :func:`dsn_problems` reads it, only more generously: the whole intended password
    is hidden, including any part after an unencoded ``@``, ``/``, ``?`` or ``#``. When in doubt,
    more is hidden, never less.
    """
    text = dsn
    if _KEYWORD_START.match(text):
        return _redact_keywords(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    userinfo, hostspec, tail, _ = _split_authority(rest, paranoid=True)
    if _NOT_IN_HOSTS.search(hostspec):
        hostspec = "***"  # most likely a piece of a password split in the wrong place
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        if colon and password:
            userinfo = f"{user}:***"
        authority = f"{userinfo}@{hostspec}"
    else:
        # "user:secret/db" (no "@host"): the "port" may be a password, so it is hidden too
        host, colon, port = hostspec.partition(":")
        ipv6 = hostspec.startswith("[") or hostspec.count(":") > 1
        hidden = colon and port and not ipv6 and "," not in hostspec and not _PORT.fullmatch(port)
        authority = f"{host}:***" if hidden else hostspec
    secret = "|".join(_SECRET_KEYS)
    tail = re.sub(rf"(?i)([?&](?:{secret})=)[^&#]*", lambda m: m.group(1) + "***", tail)
    return f"{scheme}{sep}{authority}{tail}"


# --- URI parsing ------------------------------------------------------------------------------


def _first_of(text: str, chars: str, start: int = 0) -> int:
    """Index of the first of ``chars`` in ``text`` at or after ``start``, else ``len(text)``."""
    hits = [i for i in (text.find(c, start) for c in chars) if i != -1]
    return min(hits) if hits else len(text)


def _bad_pseudo_port(netloc: str) -> bool:
    """Whether the authority's last host reads as ``host:port`` with a port that is no number.

    ``user:pa`` (from ``user:pa/ss@host``) does; ``h:5432``, ``h`` and ``[::1]`` do not.
    """
    spec = netloc.rpartition("@")[2].split(",")[-1]
    if spec.startswith("["):
        m = re.fullmatch(r"\[[^\[\]]*\](?::(.*))?", spec)
        if not m:
            return True
        port = m.group(1)
    else:
        port = spec.partition(":")[2] if ":" in spec else None
    return port is not None and not _PORT.fullmatch(port)


def _split_authority(rest: str, *, paranoid: bool = False) -> tuple[str | None, str, str, bool]:
    """Split the part after ``scheme://`` into (user info or None, host list, tail, ambiguous).

    Reads the URI as it was *meant*, not as asyncpg would misread it. The user info ends at
    the last ``@`` of the authority, not the first. If the authority looks cut short by an
    unencoded ``/``, ``?`` or ``#`` in the password (``user:pa/ss@host/db``), the user info
    extends to the last later ``@`` that is followed by a host list. For that, the ``user:``
    colon must lie in the cut-off authority. Also, the ``@`` must not sit in a query value
    (``?application_name=a@b``). The tail starts with ``/``, ``?``, ``#``, or is empty.
    ``ambiguous`` is true when the extended reading could also be a valid URI with an ``@``
    in the database name (``u:pw@h/my@db``). ``paranoid`` (for :func:`redact`) drops the
    colon condition, so that it hides too much rather than too little.
    """
    netloc_end = _first_of(rest, _AUTHORITY_END)
    netloc = rest[:netloc_end]
    at = netloc.rfind("@")
    ambiguous = False

    colon = rest.find(":")
    first_at = netloc.find("@")
    bad_port = _bad_pseudo_port(netloc)
    if paranoid and _NOT_IN_HOSTS.search(netloc.rpartition("@")[2]):
        bad_port = True  # the authority is broken anyway: hide up to the last plausible "@"
    # "u@h:5432/x@y": that colon is a port's, the authority was not cut short
    if paranoid or (0 <= colon < netloc_end and (first_at == -1 or colon < first_at or bad_port)):
        later = [i for i in range(netloc_end, len(rest)) if rest[i] == "@"]
        for candidate in reversed(later):
            host_end = _first_of(rest, _AUTHORITY_END, candidate + 1)
            if not _HOSTLIKE.fullmatch(rest[candidate + 1 : host_end]):
                continue
            between = rest[netloc_end:candidate]
            in_query = "?" in between and "=" in between.partition("?")[2]
            # an "@" in a query value is fine, unless what precedes it is broken anyway or a
            # path follows it ("user:pa?x=y@host/db")
            if in_query and not (bad_port or rest[host_end : host_end + 1] == "/"):
                continue
            at = candidate
            ambiguous = host_end == len(rest) and not bad_port
            break

    if at == -1:
        return None, netloc, rest[netloc_end:], False
    host_end = _first_of(rest, _AUTHORITY_END, at + 1)
    return rest[:at], rest[at + 1 : host_end], rest[host_end:], ambiguous


# Why each character breaks asyncpg's reading of the URI (verified against asyncpg 0.32).
_BREAK_REASON = {
    "@": "asyncpg splits at the first '@', so the rest would be looked up as a host name",
    "/": "the host part ends at the first '/', so asyncpg would read the text before it "
    "as host:port",
    "?": "the host part ends at the first '?', so asyncpg would read the text before it "
    "as host:port and the rest as query parameters",
    "#": "asyncpg drops everything from the first '#' on, so it would read the text before it "
    "as host:port",
    "[": "urllib.parse, which asyncpg uses, would reject the URI as an invalid IPv6 address",
    "]": "urllib.parse, which asyncpg uses, would reject the URI as an invalid IPv6 address",
}


def _urlparse_ok(text: str) -> bool:
    try:
        urllib.parse.urlparse(text)
    except ValueError:
        return False
    return True


def _userinfo_problems(userinfo: str, *, bracket_ok: bool) -> list[str]:
    """Problems with the user name and password. ``bracket_ok``: urllib.parse took the URI."""
    user, _, password = userinfo.partition(":")
    problems = []
    for part, name, example in (
        (user, "user name", "postgresql://me{}example.com:password@host/db"),
        (password, "password", "postgresql://user:p{}ss@host/db"),
    ):
        # "[" and "]" only matter when urllib.parse trips over them ("u:]@[::1]" passes)
        bad = [c for c in _USERINFO_BREAKERS if c in part and not (bracket_ok and c in "[]")]
        if not bad:
            continue
        if len(bad) == 1:
            what = f"an unencoded '{bad[0]}'"
            fix = f"percent-encode it as {_USERINFO_BREAKERS[bad[0]]}"
        else:
            listed = ", ".join(f"'{c}'" for c in bad[:-1]) + f" and '{bad[-1]}'"
            what = f"unencoded {listed}"
            encodings = ", ".join(f"'{c}' as {_USERINFO_BREAKERS[c]}" for c in bad)
            fix = f"percent-encode them ({encodings})"
        problems.append(
            f"the {name} contains {what}: {fix}, "
            f"e.g. {example.format(_USERINFO_BREAKERS[bad[0]])} ({_BREAK_REASON[bad[0]]})"
        )
    return problems


def _port_problem(
    port: str | None, label: str, example: str, *, empty_ok: bool = True
) -> str | None:
    if not port and empty_ok:  # "host" or "host:" both mean the default port
        return None
    if not port or not _PORT.fullmatch(port):
        # the value is not shown: in a misparsed URI it can be a piece of the password
        return f"{label} is not a number: use a number from 1 to 65535, e.g. {example}"
    if not 1 <= int(port) <= 65535:
        return f"{label} {int(port)} is out of range: use a number from 1 to 65535, e.g. {example}"
    return None


def _host_problems(hostspec: str, *, has_userinfo: bool) -> list[str]:
    if not hostspec:  # no host: the libpq default (local socket, or ?host=)
        return []
    if _NOT_IN_HOSTS.search(hostspec):
        # not shown: this is usually a piece of a password that was split in the wrong place
        return [
            "the host part contains characters no host name has (such as a space, '!', '=' or "
            "'$'): if they belong to the password, percent-encode the password's special "
            "characters (e.g. '@' as %40, '/' as %2F, '?' as %3F)"
        ]
    specs = hostspec.split(",")
    problems = []
    if "" in specs:
        problems.append(
            "the host list has an empty entry: remove the stray ',' "
            "(several hosts are written host1:5432,host2:5432)"
        )
    for i, spec in enumerate(specs, 1):
        if not spec:
            continue
        where = f"host {i} of {len(specs)}: " if len(specs) > 1 else ""
        port: str | None
        if spec.startswith("["):
            m = re.fullmatch(r"\[([^\[\]]+)\](?::(.*))?", spec)
            if not m:
                problems.append(
                    f"{where}malformed IPv6 address: write it in brackets, "
                    "optionally with a port, e.g. [::1]:5432"
                )
                continue
            port = m.group(2)
        elif "[" in spec or "]" in spec:
            problems.append(
                f"{where}unbalanced '[' or ']': brackets are only for IPv6 addresses, "
                "e.g. [::1]:5432; elsewhere percent-encode them ('[' as %5B, ']' as %5D)"
            )
            continue
        elif spec.count(":") > 1:
            problems.append(
                f"{where}looks like an IPv6 address without brackets: write it as "
                "[address]:port, e.g. [::1]:5432"
            )
            continue
        else:
            port = spec.partition(":")[2]
        problem = _port_problem(port, f"{where}port", "host:5432")
        if problem:
            if not has_userinfo and len(specs) == 1 and not _PORT.fullmatch(port or "0"):
                problem += " (if this is user:password, add @host after it)"
            problems.append(problem)
    return problems


def _query_problems(query: str) -> list[str]:
    if not query:
        return []
    try:
        # exactly the call asyncpg makes: no blank values, no fields without "="
        params = urllib.parse.parse_qs(query, strict_parsing=True)
    except ValueError:
        return [
            "the query string after '?' is malformed: write parameters as name=value joined "
            "by '&', with no empty parts (such as a trailing '&'), and percent-encode '&' or "
            "'=' inside a value (as %26, %3D)"
        ]
    problems = []
    for key, valid in (("sslmode", SSLMODES), ("target_session_attrs", TARGET_SESSION_ATTRS)):
        if key not in params:
            continue
        value = params[key][-1]  # asyncpg, like libpq, uses the last one
        if value in valid:
            continue
        hint = ""
        guess = value.strip().lower().replace("_", "-")
        if guess in valid:
            hint = f" (did you mean '{guess}'?)"
        problems.append(f"{key} '{value}' is not valid{hint}: use one of {', '.join(valid)}")
    if "port" in params:
        ports = params["port"][-1].split(",")
        for i, port in enumerate(ports, 1):
            label = "the port parameter"
            if len(ports) > 1:
                label = f"entry {i} of {len(ports)} of the port parameter"
            problem = _port_problem(port, label, "port=5432", empty_ok=False)
            if problem:
                problems.append(problem)
    return problems


# --- libpq keyword/value form -------------------------------------------------------------------


class _KeywordSyntaxError(ValueError):
    pass


def _parse_keywords(text: str) -> list[tuple[str, str, int, int]]:
    """Parse a libpq keyword/value string like libpq's conninfo_parse.

    Returns (keyword, value, value_start, value_end) tuples. The positions are those of the
    value as written, quotes included.
    """
    out: list[tuple[str, str, int, int]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return out
        start = i
        while i < n and text[i] != "=" and not text[i].isspace():
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=" or not key:
            raise _KeywordSyntaxError(f'missing "=" after "{key}"')
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value_start = i
        chars = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise _KeywordSyntaxError("unterminated quoted string")
                if text[i] == "\\" and i + 1 < n:
                    chars.append(text[i + 1])
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    chars.append(text[i])
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    chars.append(text[i + 1])
                    i += 2
                else:
                    chars.append(text[i])
                    i += 1
        out.append((key, "".join(chars), value_start, i))


def _keywords_to_uri(params: dict[str, str]) -> str:
    """Build the URI equivalent of libpq keyword/value parameters, with the password as ***."""
    params = dict(params)
    user = params.pop("user", "")
    password = params.pop("password", None)
    host = params.pop("host", "")
    if not host and "hostaddr" in params:  # asyncpg has no hostaddr: connect to it as the host
        host = params.pop("hostaddr")
    port = params.pop("port", "")
    dbname = params.pop("dbname", "")

    userinfo = urllib.parse.quote(user, safe="")
    if password is not None:
        userinfo += ":***"
    query: list[tuple[str, str]] = []
    hosts = host.split(",") if host else []
    ports = port.split(",") if port else []
    if hosts and not any(h.startswith("/") or not h for h in hosts):
        if len(ports) > 1 and len(ports) != len(hosts):
            pairs = [(h, "") for h in hosts]
            query.append(("port", port))
        elif len(ports) == len(hosts):
            pairs = list(zip(hosts, ports, strict=True))
        else:  # no port, or one port for every host (libpq's rule)
            pairs = [(h, port) for h in hosts]
        hostspec = ",".join(
            (f"[{h}]" if ":" in h else urllib.parse.quote(h, safe="")) + (f":{p}" if p else "")
            for h, p in pairs
        )
    else:
        # Unix-socket directories (or no host at all) go in the query, as libpq allows
        hostspec = ""
        if host:
            query.append(("host", host))
        if port:
            query.append(("port", port))
    query.extend(params.items())

    authority = f"{userinfo}@{hostspec}" if userinfo else hostspec
    uri = f"postgresql://{authority}/{urllib.parse.quote(dbname, safe='')}"
    if query:
        uri += "?" + "&".join(
            f"{urllib.parse.quote(k, safe='')}="
            + ("***" if k in _SECRET_KEYS else urllib.parse.quote(v, safe="/,:"))
            for k, v in query
        )
    return uri


def _keyword_form_message(text: str) -> str:
    head = "is a libpq keyword/value string, which asyncpg does not accept (it takes only URIs)"
    try:
        params = {key: value for key, value, _, _ in _parse_keywords(text)}
    except _KeywordSyntaxError:
        return f"{head} and cannot be parsed either: use the URI form instead, e.g. {EXAMPLE_URI}"
    message = f"{head}: use the URI form instead: {_keywords_to_uri(params)}"
    if any(k in params for k in _SECRET_KEYS):
        message += " (put the real password, percent-encoded, in place of ***)"
    return message


def _redact_keywords(text: str) -> str:
    try:
        spans = [(s, e) for k, _, s, e in _parse_keywords(text) if k in _SECRET_KEYS]
    except _KeywordSyntaxError:
        # unparseable: hide from each password= to the next blank, or to the end if quoted
        return re.sub(
            r"\b((?:ssl)?password\s*=\s*)('.*|\S*)",
            lambda m: m.group(1) + "***",
            text,
            flags=re.DOTALL,
        )
    for start, end in reversed(spans):
        text = text[:start] + "***" + text[end:]
    return text


def redis_dsn_problems(dsn: str) -> list[str]:
    """Problems of a Redis URL (``redis://``, ``rediss://`` TLS, ``unix://`` socket), as redis-py parses
    it: the port, the database number, and the same unencoded characters in the password."""
    from redis.connection import parse_url

    text = dsn.strip()
    scheme, _, rest = text.partition("://")
    problems: list[str] = []
    userinfo, hostspec, tail, _ = _split_authority(rest)
    if userinfo is not None:
        problems += [
            p.replace("asyncpg", "redis-py") for p in _userinfo_problems(userinfo, bracket_ok=True)
        ]
    if scheme.lower() != "unix":
        port = hostspec.rpartition(":")[2] if not hostspec.endswith("]") else ""
        if ":" in hostspec and port and not _PORT.fullmatch(port):
            problems.append("port is not a number: use a number from 1 to 65535, e.g. host:6379")
        elif port and _PORT.fullmatch(port) and not 1 <= int(port) <= 65535:
            problems.append(
                f"port {int(port)} is out of range: use a number from 1 to 65535, e.g. host:6379"
            )
        path = tail.partition("?")[0].strip("/")
        if path and not path.isdigit():
            problems.append(
                f"database {path!r} is not a number: Redis databases are numbered, e.g. "
                "redis://host:6379/0"
            )
    if not problems:
        try:
            parse_url(text)
        except ValueError:
            problems.append(
                "cannot be parsed as a Redis URL: percent-encode special characters in the user "
                "name and password (e.g. '@' as %40), e.g. redis://user:password@host:6379/0"
            )
    return problems
