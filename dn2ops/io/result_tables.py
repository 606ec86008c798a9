"""dn2's result tables, written down once: dn2ops/io/result_tables.json.

The file holds, for the ranked table (``anomalies-*.parquet``), the errors table
(``errors-*.parquet``) and the group table (``groups-*.parquet``), each fixed column as a
BigQuery JSON schema field plus its Arrow type in the Parquet files, and the
``schema_version`` that every results manifest (``_SUCCESS``, summary.json) and every
BigQuery table description records. ``check_parquet`` compares written Parquet with it
(dn2 load-bigquery refuses files that drift; a test runs it on real dn2 output).

Manifest columns that a run carries through (``label``, ``class``, ...) follow the fixed
columns as Arrow strings; in BigQuery they are NULLABLE STRING fields, renamed by
``bigquery_names`` where BigQuery would reject or confuse the name.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import pyarrow as pa

from dn2ops.errors import UserError

# The Arrow types the schema file names (str() of each).
_ARROW = {str(t): t for t in (pa.string(), pa.float64(), pa.int64(), pa.int32(), pa.bool_(),
                              pa.list_(pa.string()), pa.list_(pa.float64()),
                              pa.list_(pa.int32()), pa.date32())}
# Column name prefixes BigQuery reserves (compared in lower case).
_RESERVED = ("_table_", "_file_", "_partition", "_row_timestamp", "__root__", "_colidentifier")
MAX_NAME = 300


class SchemaDrift(UserError, ValueError):
    """Parquet files whose columns differ from dn2's schema file."""


@functools.cache
def document() -> dict[str, Any]:
    """The schema file, parsed."""
    return json.loads(resources.files("dn2ops.io").joinpath("result_tables.json")
                      .read_text(encoding="utf-8"))


def schema_version() -> int:
    return document()["schema_version"]


def tables() -> dict[str, dict[str, Any]]:
    """name -> {files, suffix, description, fields} of every result table."""
    return document()["tables"]


def arrow_schema(table: str, extra_columns: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """The Arrow schema of ``table``'s Parquet files with ``extra_columns`` (strings)."""
    fields = [(f["name"], _ARROW[f["arrow"]]) for f in tables()[table]["fields"]]
    return pa.schema(fields + [(c, pa.string()) for c in extra_columns])


def fixed_names(table: str) -> list[str]:
    return [f["name"] for f in tables()[table]["fields"]]


def type_name(t: pa.DataType) -> str:
    """The schema file's name of an Arrow type: str() of it, a list's item field named
    ``item`` (Parquet readers name it ``element``; the name carries no meaning)."""
    if pa.types.is_list(t):
        return f"list<item: {type_name(t.value_type)}>"
    return str(t)


def check_parquet(table: str, schema: pa.Schema, where: str) -> list[str]:
    """The manifest columns of a Parquet file of ``table`` whose Arrow ``schema`` starts
    with the fixed columns, in order and of their types, followed by strings only.
    Raises SchemaDrift naming the first difference."""
    fixed = tables()[table]["fields"]
    names = schema.names
    for i, f in enumerate(fixed):
        if i >= len(names):
            raise SchemaDrift(f"{where}: column {f['name']!r} ({f['arrow']}) is missing; "
                              f"dn2 schema_version {schema_version()} has it")
        got = schema.field(i)
        if got.name != f["name"]:
            what = ("is missing" if f["name"] not in names
                    else f"is at position {names.index(f['name'])}")
            raise SchemaDrift(f"{where}: column {i} is {got.name!r}, expected {f['name']!r} "
                              f"({f['name']!r} {what}; dn2 schema_version {schema_version()})")
        if type_name(got.type) != f["arrow"]:
            raise SchemaDrift(f"{where}: column {f['name']!r} is {got.type}, expected "
                              f"{f['arrow']} (dn2 schema_version {schema_version()})")
    extras = schema.names[len(fixed):]
    for name in extras:
        if schema.field(name).type != pa.string():
            raise SchemaDrift(f"{where}: manifest column {name!r} is "
                              f"{schema.field(name).type}, expected string")
    return extras


def bigquery_names(table: str, extra_columns: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The BigQuery name of each manifest column (the rule, applied in order):

    1. every character other than an ASCII letter, digit or ``_`` becomes ``_``;
    2. a name that then is empty, starts with a digit or with a prefix BigQuery reserves
       (``_TABLE_``, ``_FILE_``, ``_PARTITION``, ``_ROW_TIMESTAMP``, ``__ROOT__``,
       ``_COLIDENTIFIER``) gets ``m_`` in front;
    3. it is cut to 300 characters;
    4. a name equal, ignoring case, to one of dn2's columns (``partition_date``
       included) or to an earlier manifest column's gets ``manifest_`` in front, then
       ``_2``, ``_3``, ... at its end until it is unique.

    Returns every manifest column (unchanged names map to themselves).
    """
    taken = {n.lower() for n in fixed_names(table)}
    taken.add(document()["partition_field"]["name"])
    out: dict[str, str] = {}
    for name in extra_columns:
        new = re.sub(r"[^A-Za-z0-9_]", "_", name)
        if not new or new[0].isdigit() or new.lower().startswith(_RESERVED):
            new = "m_" + new
        new = new[:MAX_NAME]
        if new.lower() in taken:
            new = ("manifest_" + new)[:MAX_NAME]
        base, i = new, 2
        while new.lower() in taken:
            new = f"{base[:MAX_NAME - 1 - len(str(i))]}_{i}"
            i += 1
        taken.add(new.lower())
        out[name] = new
    return out


def bigquery_fields(table: str, renamed_extras: list[str]) -> list[dict[str, Any]]:
    """The BigQuery JSON schema of ``table``: the fixed fields, ``partition_date``, then
    the (renamed) manifest columns as NULLABLE STRING."""
    fixed = [{k: v for k, v in f.items() if k != "arrow"} for f in tables()[table]["fields"]]
    return fixed + [dict(document()["partition_field"])] + [
        {"name": n, "type": "STRING", "mode": "NULLABLE", "description": "manifest column"}
        for n in renamed_extras]
