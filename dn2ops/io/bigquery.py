"""A committed results directory -> BigQuery tables, one partition replaced at a time.

``load_results(RESULTS_DIR, "PROJECT.DATASET.TABLE")`` loads the ranked rows
(``anomalies-*.parquet``) into TABLE, the errors into TABLE_errors and, in group mode, the
sets (``groups-*.parquet``) into TABLE_sets. Each table is partitioned by a
``partition_date`` DATE column: the run's --partition, which must be a date.

How, and why so:

1. The Parquet files that ``_SUCCESS`` lists are checked against the schema file
   (dn2ops.io.result_tables: a drifted file stops the load before BigQuery is touched).
2. Missing tables are created (schema file + manifest columns, partitioned by
   ``partition_date``, ``schema_version`` in the description); manifest columns a table
   lacks are appended as NULLABLE STRING (renamed by result_tables.bigquery_names, the
   mapping recorded in each renamed column's description and returned).
3. Each Parquet file goes to a fresh staging table ``TABLE__dn2_staging_RUN`` in the same
   dataset by a load job (free; Parquet lists become REPEATED fields through
   ``enable_list_inference``). The staging tables expire after a day if dn2 dies before
   it drops them.
4. One multi-statement transaction then deletes the partition's rows from every table and
   inserts the staged rows with ``partition_date``: the partition is replaced in all
   tables at once, or in none. A rerun of a partition therefore never adds a second copy;
   a results directory without sets (or without ranked rows) clears that table's
   partition too.
5. The partition's row counts are read back and compared with the Parquet footers.

BIGQUERY_EMULATOR_HOST (a URL, ``http://127.0.0.1:9050``), when set, points the client at
an emulator with anonymous credentials; otherwise Application Default Credentials are used.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from dn2ops.errors import ConfigError, UserError
from dn2ops.io import features, outputs, result_tables

LOG = logging.getLogger("dn2")

EMULATOR_ENV = "BIGQUERY_EMULATOR_HOST"
STAGING_INFIX = "__dn2_staging_"
# How long an API call (with its retries) may take before the load fails.
DEADLINE_S = 300.0
# The exit status of a dn2 command whose results were committed but not loaded.
LOAD_FAILED_EXIT = 3
_PART = re.compile(r"[A-Za-z0-9_]{1,1024}\Z")
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9:.\-]{0,127}\Z")


class LoadError(UserError, RuntimeError):
    """The results are committed but could not be loaded into BigQuery."""

    exit_code = LOAD_FAILED_EXIT


def table_ref(value: str) -> tuple[str, str, str]:
    """'PROJECT.DATASET.TABLE' -> its parts (a project id may hold dots: 'example.com:p').
    Raises ConfigError."""
    parts = value.rsplit(".", 2)
    if (len(parts) != 3 or not _PROJECT.match(parts[0]) or not _PART.match(parts[1])
            or not _PART.match(parts[2])):
        raise ConfigError(f"--bigquery-table {value!r}: expected PROJECT.DATASET.TABLE "
                          "(dataset and table: letters, digits and _)")
    return parts[0], parts[1], parts[2]


def partition_date(partition: str) -> datetime.date:
    """The partition as a date (YYYY-MM-DD); ConfigError otherwise."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", partition or ""):
            return datetime.date.fromisoformat(partition)
    except ValueError:
        pass
    raise ConfigError(f"--bigquery-table needs --partition to be a date (YYYY-MM-DD, today "
                      f"or yesterday): the tables are partitioned by it; got {partition!r}")


def client(project: str):
    """A google-cloud-bigquery client for ``project``: at BIGQUERY_EMULATOR_HOST with
    anonymous credentials when it is set, else with Application Default Credentials."""
    from google.cloud import bigquery

    host = os.environ.get(EMULATOR_ENV)
    if not host:
        return bigquery.Client(project=project)
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    url = host if "://" in host else f"http://{host}"
    return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=url))


def _retry():
    from google.cloud.bigquery import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(DEADLINE_S)


def _fields(schema: list[dict[str, Any]]):
    from google.cloud import bigquery

    return [bigquery.SchemaField.from_api_repr(f) for f in schema]


def check_dataset(table: str) -> None:
    """Refuses, before any work, a table whose dataset cannot be read (it does not exist,
    the credentials lack access, the endpoint does not answer)."""
    project, dataset, _ = table_ref(table)
    try:
        client(project).get_dataset(f"{project}.{dataset}", retry=_retry().with_deadline(60),
                                    timeout=30)
    except Exception as e:  # noqa: BLE001 - any failure is the user's setup to fix
        raise UserError(f"--bigquery-table {table}: cannot read dataset {project}.{dataset} "
                        f"({type(e).__name__}: {_short(e)}); create it, or grant the "
                        "account the roles the README names") from None


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]


def description(table: str, mapping: dict[str, str], run: dict[str, Any]) -> str:
    """A table's description: what it is, then one JSON line (schema_version, the manifest
    column renaming, the last load)."""
    spec = result_tables.tables()[table]
    meta = {"dn2_schema_version": result_tables.schema_version(),
            "renamed_manifest_columns": {k: v for k, v in mapping.items() if k != v},
            "last_load": run}
    return (f"{spec['description']} (dn2 schema_version {result_tables.schema_version()}; "
            f"partitioned by partition_date)\n{json.dumps(meta, sort_keys=True)}")


def recorded_version(desc: str | None) -> int | None:
    """The schema_version a table's description records (None: not a dn2 table)."""
    for line in (desc or "").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            return json.loads(line).get("dn2_schema_version")
    return None


def _plan(results_dir: str) -> dict[str, dict[str, Any]]:
    """table -> {paths, extras, rows} of every result table the directory holds, each
    Parquet file checked against the schema file."""
    plan = {}
    fs, _ = outputs.fs_and_path(results_dir)
    for name, spec in result_tables.tables().items():
        prefix = spec["files"].split("-*", 1)[0]
        paths = features.shard_paths(results_dir, prefix)
        if not paths:
            continue
        extras, rows = None, 0
        for p in paths:
            with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
                pf = pq.ParquetFile(f)
                found = result_tables.check_parquet(name, pf.schema_arrow, p)
                rows += pf.metadata.num_rows
            if extras is not None and found != extras:
                raise result_tables.SchemaDrift(f"{p}: manifest columns {found} differ from "
                                                f"the other shards' {extras}")
            extras = found
        plan[name] = {"paths": paths, "extras": extras or [], "rows": rows}
    return plan


def _renamed_file(path: str, mapping: dict[str, str]) -> io.IOBase:
    """The Parquet file at ``path`` to upload: as it is, or rewritten (a row group at a
    time, into a temporary file) with its manifest columns renamed for BigQuery."""
    import tempfile

    fs, p = outputs.fs_and_path(path)
    if all(k == v for k, v in mapping.items()):
        return fs.open(p, "rb")
    out = tempfile.TemporaryFile()
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        names = [mapping.get(n, n) for n in pf.schema_arrow.names]
        schema = pf.schema_arrow
        for i, n in enumerate(names):
            schema = schema.set(i, schema.field(i).with_name(n))
        with pq.ParquetWriter(out, schema) as writer:
            for g in range(pf.num_row_groups):
                writer.write_table(pf.read_row_group(g).rename_columns(names))
    out.seek(0)
    return out


def _ensure_table(bq, ref: str, table: str, mapping: dict[str, str], run: dict[str, Any]):
    """The target table, created or given the manifest columns it lacks; refuses one of
    another schema_version."""
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    fields = result_tables.bigquery_fields(table, list(mapping.values()))
    for original, new in mapping.items():
        if original != new:
            fields[[f["name"] for f in fields].index(new)]["description"] = (
                f"manifest column {original!r}")
    try:
        existing = bq.get_table(ref, retry=_retry())
    except NotFound:
        t = bigquery.Table(ref, schema=_fields(fields))
        t.time_partitioning = bigquery.TimePartitioning(
            type_=bigquery.TimePartitioningType.DAY, field="partition_date")
        t.description = description(table, mapping, run)
        return bq.create_table(t, retry=_retry())
    version = recorded_version(existing.description)
    if version is None:
        raise LoadError(f"{ref} exists and was not made by dn2 (its description records no "
                        "dn2 schema_version): choose another --bigquery-table")
    if version != result_tables.schema_version():
        raise LoadError(f"{ref} records dn2 schema_version {version}, this dn2 writes "
                        f"{result_tables.schema_version()}: load into a new table, or migrate "
                        "it as the README says (BigQuery: what may change between versions)")
    have = {f.name.lower() for f in existing.schema}
    added = [f for f in fields if f["name"].lower() not in have]
    existing.description = description(table, mapping, run)
    changed = ["description"]
    if added:
        existing.schema = list(existing.schema) + _fields(added)
        changed.append("schema")
    return bq.update_table(existing, changed, retry=_retry())


def _quoted(ref: str) -> str:
    return f"`{ref}`"


def _replace_script(targets: dict[str, tuple[str, list[str] | None, str | None]],
                    day: datetime.date) -> str:
    """One transaction: each target's partition deleted, then the staged rows inserted.
    ``targets``: table ref -> (its columns, the staging table), or (None, None) for a
    table whose partition is only cleared."""
    lines = ["BEGIN TRANSACTION;"]
    for ref, (columns, staging) in targets.items():
        lines.append(f"DELETE FROM {_quoted(ref)} WHERE partition_date = DATE '{day}';")
        if staging:
            cols = ", ".join(f"`{c}`" for c in columns)
            lines.append(f"INSERT INTO {_quoted(ref)} ({cols}, `partition_date`) "
                         f"SELECT {cols}, DATE '{day}' FROM {_quoted(staging)};")
    lines.append("COMMIT TRANSACTION;")
    return "\n".join(lines)


@contextlib.contextmanager
def _staging_tables(bq) -> Iterator[list[str]]:
    """The staging tables a load creates, dropped when it ends (and expiring after a day)."""
    made: list[str] = []
    try:
        yield made
    finally:
        for ref in made:
            with contextlib.suppress(Exception):
                bq.delete_table(ref, not_found_ok=True, retry=_retry().with_deadline(60))


def load_results(results_dir: str, table: str) -> dict[str, Any]:
    """Loads a committed results directory into ``table`` (PROJECT.DATASET.TABLE) and its
    ``_errors`` / ``_sets`` tables, replacing the partition's rows (module docstring).

    Returns {"partition", "schema_version", "tables": {ref: rows}, "renamed": {ref:
    {manifest column: BigQuery name}}}. Raises LoadError (exit status LOAD_FAILED_EXIT)
    when BigQuery refuses or fails; the results directory is left as it is.
    """
    project, dataset, name = table_ref(table)
    marker = outputs.require_complete(results_dir, "results")
    day = partition_date(marker.get("partition") or "")
    try:
        plan = _plan(results_dir)
    except result_tables.SchemaDrift as e:
        raise LoadError(f"{e}; nothing was loaded into {table}") from e
    run = {"results": results_dir, "run_id": marker.get("run_id"),
           "loaded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds")}
    again = (f"the committed results are unchanged: load them again with `dn2 "
             f"load-bigquery {results_dir} --bigquery-table {table}`")
    try:
        return _load(client(project), project, dataset, name, plan, day, run)
    except LoadError as e:
        raise LoadError(f"{e}; {again}") from e
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - BigQuery's refusals and failures, all of them
        raise LoadError(f"loading {results_dir} into {table} failed ({type(e).__name__}: "
                        f"{_short(e)}); {again}") from e


def _load(bq, project: str, dataset: str, name: str, plan: dict, day: datetime.date,
          run: dict[str, Any]) -> dict[str, Any]:
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    try:
        bq.get_dataset(f"{project}.{dataset}", retry=_retry())
    except NotFound:
        raise LoadError(f"dataset {project}.{dataset} does not exist (or the account cannot "
                        "see it): create it, or grant the roles the README names") from None
    tag = uuid.uuid4().hex[:12]
    targets: dict[str, tuple[list[str] | None, str | None]] = {}
    renamed: dict[str, dict[str, str]] = {}
    expected: dict[str, int] = {}
    with _staging_tables(bq) as made:
        for table, spec in result_tables.tables().items():
            ref = f"{project}.{dataset}.{name}{spec['suffix']}"
            if table not in plan:
                try:  # a table this run has no rows for: its partition is cleared
                    bq.get_table(ref, retry=_retry())
                    targets[ref] = (None, None)
                    expected[ref] = 0
                except NotFound:
                    pass
                continue
            extras = plan[table]["extras"]
            mapping = result_tables.bigquery_names(table, extras)
            _ensure_table(bq, ref, table, mapping, run)
            columns = result_tables.fixed_names(table) + [mapping[c] for c in extras]
            staging = f"{project}.{dataset}.{name}{spec['suffix']}{STAGING_INFIX}{tag}"
            staged = bigquery.Table(staging, schema=_fields(
                [f for f in result_tables.bigquery_fields(table, list(mapping.values()))
                 if f["name"] != "partition_date"]))
            staged.expires = (datetime.datetime.now(datetime.timezone.utc)
                              + datetime.timedelta(days=1))
            bq.create_table(staged, retry=_retry())
            made.append(staging)
            parquet = bigquery.ParquetOptions()
            parquet.enable_list_inference = True
            config = bigquery.LoadJobConfig(
                source_format=bigquery.SourceFormat.PARQUET, parquet_options=parquet,
                write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
            for path in plan[table]["paths"]:
                with _renamed_file(path, mapping) as f:
                    bq.load_table_from_file(f, staging, job_config=config,
                                            timeout=DEADLINE_S).result(timeout=DEADLINE_S)
            targets[ref] = (columns, staging)
            renamed[ref] = {k: v for k, v in mapping.items() if k != v}
            expected[ref] = plan[table]["rows"]
        bq.query(_replace_script(targets, day), retry=_retry()).result(timeout=DEADLINE_S)
    loaded = {}
    for ref, rows in expected.items():
        got = next(iter(bq.query(
            f"SELECT COUNT(*) AS n FROM {_quoted(ref)} WHERE partition_date = DATE '{day}'",
            retry=_retry()).result(timeout=DEADLINE_S)))["n"]
        if got != rows:
            raise LoadError(f"{ref} holds {got} rows for partition {day} after the load, "
                            f"expected {rows}")
        loaded[ref] = got
    LOG.info("loaded partition %s into BigQuery: %s%s", day,
             ", ".join(f"{ref} {n} rows" for ref, n in loaded.items()),
             "".join(f"; {ref} renamed {m}" for ref, m in renamed.items() if m))
    return {"partition": day.isoformat(), "schema_version": result_tables.schema_version(),
            "tables": loaded, "renamed": renamed}
