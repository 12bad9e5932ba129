"""PostgreSQL catalog checks, run once per connection before the first read: the preset's tables and
columns exist (each missing one named, with the schema where a table of that name does exist), the
mapping's time columns have a readable type, and every value the state column holds is mapped to a
state or deliberately ignored (from an enum, a CHECK constraint, or the newest rows)."""

from __future__ import annotations

import difflib
import re

import asyncpg

from ...config import CANONICAL_STATES, StateMapping, TableMapping, Target
from .. import SchemaProblem
from .presets import Preset, generic


def resolve_preset(target: Target, types: dict[str, generic.ColumnType] | None = None) -> Preset:
    """The target's preset; a table mapping is built into one (with the columns' real types once known)."""
    if target.table is not None:
        return generic.build(target.table, types, target.recovery)
    from .presets import PRESETS

    return PRESETS[target.preset_name]


async def check_schema(conn: asyncpg.Connection, target: Target, preset: Preset) -> Preset:
    """Check the preset's tables and columns exist (SchemaProblem naming what is missing) and return the
    preset to use: for a table mapping, rebuilt with the columns' real types."""
    schema = target.schema_ or preset.schema
    # to_regclass resolves unqualified names through search_path, as the statements will
    rows = await conn.fetch(
        """
        SELECT t.name AS table_name, a.attname AS column_name,
               format_type(a.atttypid, NULL) AS data_type,
               n.nspname AS udt_schema, ty.typname AS udt_name
        FROM unnest($1::text[]) AS t(name)
        JOIN pg_class c ON c.oid = to_regclass(
            CASE WHEN $2::text IS NULL THEN quote_ident(t.name)
                 ELSE quote_ident($2::text) || '.' || quote_ident(t.name) END)
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        JOIN pg_type ty ON ty.oid = a.atttypid
        JOIN pg_namespace n ON n.oid = ty.typnamespace
        """,
        list(preset.required_columns),
        schema,
    )
    found: dict[str, dict[str, generic.ColumnType]] = {}
    for row in rows:
        found.setdefault(row["table_name"], {})[row["column_name"]] = generic.ColumnType(
            row["data_type"], row["udt_schema"], row["udt_name"]
        )
    problems = []
    where = f"schema {schema}" if schema else "the search_path"
    missing_tables = [table for table in preset.required_columns if table not in found]
    elsewhere = await _schemas_holding(conn, missing_tables) if missing_tables else {}
    for table, columns in preset.required_columns.items():
        if table not in found:
            problem = f"table {table!r} not found in {where}"
            others = [s for s in elsewhere.get(table, []) if s != schema]
            if others:
                problem += (
                    f"; a table of that name exists in schema {', '.join(others)}: set "
                    f"schema: {others[0]} on the target"
                )
            problems.append(problem)
            continue
        missing = [c for c in columns if c not in found[table]]
        for column in missing:
            problems.append(
                f"table {table!r} has no column {column!r} (columns: {', '.join(sorted(found[table]))})"
            )
    if problems:
        raise SchemaProblem(f"target {target.name}: " + "; ".join(problems))
    if target.table is None:
        return preset
    problems = generic.timestamp_problems(target.table, found[target.table.name])
    if problems:
        raise SchemaProblem(f"target {target.name}: " + "; ".join(problems))
    await _check_state_values(conn, target, found[target.table.name])
    return resolve_preset(target, found[target.table.name])


async def _schemas_holding(conn: asyncpg.Connection, tables: list[str]) -> dict[str, list[str]]:
    """Schemas (readable by this role) holding a table of each name, for a "not found" hint."""
    rows = await conn.fetch(
        "SELECT c.relname AS table_name, array_agg(n.nspname::text ORDER BY n.nspname) AS schemas"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        " AND has_schema_privilege(n.oid, 'USAGE') GROUP BY c.relname",
        tables,
    )
    return {r["table_name"]: list(r["schemas"]) for r in rows}


async def _check_state_values(
    conn: asyncpg.Connection, target: Target, columns: dict[str, generic.ColumnType]
) -> None:
    """Every value the state column holds must be mapped to a state or ignored, and every mapped value
    must be one it can hold: a typo would silently read 0 (or fail every poll). The column's values are
    known completely from an enum type or a CHECK constraint listing them, else sampled from the
    newest rows."""
    table = target.table
    assert table is not None
    mapping = table.state
    column = columns[mapping.column]
    where = f"{table.name}.{mapping.column}"
    mapped = mapping.values_for(*CANONICAL_STATES, "ignore")
    labels = await conn.fetchval(
        "SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_enum e"
        " JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace"
        " WHERE n.nspname = $1 AND t.typname = $2",
        column.udt_schema,
        column.udt_name,
    )
    if labels is not None:
        unknown = [v for v in mapped if v not in labels]
        if unknown:
            raise SchemaProblem(
                f"target {target.name}: state value(s) {', '.join(map(repr, unknown))} are not "
                f"labels of enum {column.udt_name} (labels: {', '.join(labels)})"
            )
        held, complete = list(labels), True
    else:
        allowed = await _check_constraint_values(conn, target, table)
        if allowed is not None:
            name, values = allowed
            unknown = [v for v in mapped if v not in values]
            if unknown:
                raise SchemaProblem(
                    f"target {target.name}: state value(s) {', '.join(map(repr, unknown))} are not "
                    f"allowed by CHECK constraint {name} of {where} (allowed: {', '.join(values)})"
                )
            held, complete = values, True
        else:
            rows = await conn.fetch(generic.state_values_sample(table), generic.STATE_SAMPLE_ROWS)
            held, complete = sorted(r["value"] for r in rows), False
    unmapped = [value for value in held if mapping.state_of(value) is None]
    if unmapped:
        source = (
            "the column's type allows it"
            if complete
            else f"found among the newest {generic.STATE_SAMPLE_ROWS} rows"
        )
        raise SchemaProblem(
            f"target {target.name}: "
            + "; ".join(_unmapped_value(value, where, mapping) for value in unmapped)
            + f" ({source}). Map every value under table.state.<state> or list it in "
            "table.state.ignore"
        )


def _unmapped_value(value: str, where: str, mapping: StateMapping) -> str:
    text = f"value {value!r} of {where} is mapped to no state"
    mapped = mapping.values_for(*CANONICAL_STATES)
    close = difflib.get_close_matches(value, mapped, n=1, cutoff=0.6)
    if close:
        return f"{text}; the mapping has {close[0]!r} for {mapping.state_of(close[0])}: a typo?"
    return text


# `status IN ('a', 'b')` and `status = ANY (ARRAY['a', 'b'])` both read back as = ANY (ARRAY[...])
_ANY_ARRAY = re.compile(r"=\s*ANY\s*\(+\s*ARRAY\s*\[(.*?)\]", re.S)
_LITERAL = re.compile(r"'((?:[^']|'')*)'")


async def _check_constraint_values(
    conn: asyncpg.Connection, target: Target, table: TableMapping
) -> tuple[str, list[str]] | None:
    """(constraint name, values) of a CHECK constraint on the state column alone that lists its
    values; None when there is none (or its expression is something else)."""
    schema = target.schema_ or table.schema_
    rows = await conn.fetch(
        """
        SELECT c.conname AS name, pg_get_constraintdef(c.oid) AS definition
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.contype = 'c' AND cardinality(c.conkey) = 1 AND a.attname = $3
          AND c.conrelid = to_regclass(
              CASE WHEN $1::text IS NULL THEN quote_ident($2)
                   ELSE quote_ident($1) || '.' || quote_ident($2) END)
        ORDER BY c.conname
        """,
        schema,
        table.name,
        table.state.column,
    )
    for row in rows:
        match = _ANY_ARRAY.search(row["definition"])
        if match and " OR " not in row["definition"] and " AND " not in row["definition"]:
            values = [v.replace("''", "'") for v in _LITERAL.findall(match.group(1))]
            if values:
                return row["name"], values
    return None
