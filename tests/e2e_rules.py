"""Fast variants of the shipped alert rules, generated from alerts/jobqueue-alerts.yaml for the e2e test.

Expressions, labels and annotations are kept as shipped; only time is compressed, by one factor:

* range windows and subquery steps (``[10m]``, ``[1h:5m]``) and ``offset 10m``;
* numeric thresholds compared against a ``*_seconds`` metric (``oldest_pending_age_seconds > 600``,
  ``time() - ..._timestamp_seconds > 300``) - the only thresholds that are durations;
* ``for:``, scaled and then clamped to a few seconds so every alert can fire within the test.

Counts and ratios (``>= 10``, ``< 0.90``, ``== 0``) are left alone.
"""

from __future__ import annotations

import copy
import re

import yaml

_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
_RANGE = re.compile(rf"\[\s*({_DURATION})\s*(?::\s*({_DURATION})?\s*)?\]")
_OFFSET = re.compile(rf"\boffset\s+(-?)({_DURATION})")
# binary set operators (with their matching clause) separate the comparisons of an expression
_SET_OPERATOR = re.compile(
    r"\b(?:and|or|unless)\b(?:\s+(?:on|ignoring)\s*\([^)]*\))?(?:\s+group_(?:left|right)\s*(?:\([^)]*\))?)?"
)
_COMPARISON = re.compile(r"(>=|<=|==|!=|>|<)(\s*(?:bool\s+)?)(\d+(?:\.\d+)?)(?![\w.])")
_SECONDS_METRIC = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*_seconds\b")


def parse_duration(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|[smhdwy])", text):
        total += int(number) * _UNIT_SECONDS[unit]
    if not total and text not in ("0s", "0"):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return total


def format_duration(seconds: float) -> str:
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"duration {seconds}s scales to nothing")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def scale_expr(expr: str, factor: float) -> str:
    """``expr`` with range windows, offsets and seconds thresholds divided by ``factor``."""

    def scale(text: str) -> str:
        return format_duration(parse_duration(text) / factor)

    def window(match: re.Match) -> str:
        inner = scale(match.group(1))
        if ":" in match.group(0):
            inner += ":" + (scale(match.group(2)) if match.group(2) else "")
        return f"[{inner}]"

    expr = _RANGE.sub(window, expr)
    expr = _OFFSET.sub(lambda m: f"offset {m.group(1)}{scale(m.group(2))}", expr)

    def threshold(match: re.Match) -> str:
        operator, space, number = match.groups()
        return f"{operator}{space}{_format_number(float(number) / factor)}"

    pieces, last = [], 0
    for op in _SET_OPERATOR.finditer(expr):
        pieces.append(expr[last : op.start()])
        pieces.append(op.group(0))
        last = op.end()
    pieces.append(expr[last:])
    for index in range(0, len(pieces), 2):  # even pieces are operands, odd ones operators
        if _SECONDS_METRIC.search(pieces[index]):
            pieces[index] = _COMPARISON.sub(threshold, pieces[index])
    return "".join(pieces)


def fast_rules(source: str, factor: float, min_for: float = 2.0, max_for: float = 4.0) -> dict:
    """The rules file ``source`` (YAML text) with time compressed by ``factor``."""
    data = copy.deepcopy(yaml.safe_load(source))
    for group in data["groups"]:
        if "interval" in group:
            group["interval"] = "1s"
        for rule in group["rules"]:
            rule["expr"] = scale_expr(rule["expr"], factor)
            if "for" in rule:
                seconds = parse_duration(str(rule["for"])) / factor
                rule["for"] = format_duration(min(max(seconds, min_for), max_for))
    return data
