"""SQL over outputs (DuckDB): `batch-infer query`, `batch-infer inspect`, `batch_infer.ops.query`.

OUTPUT is one job output or any folder above several of them (a scheduled job writing to
`out/digits/date={date}/` gives `out/digits/date=2026-11-01/`, ...). Every folder at or below
OUTPUT that holds `_manifest/`, `_runs/` or `_errors/` is a job output; folders whose name
starts with `_` or `.` are never searched. Three views:

    predictions   the `part-*.parquet` files of every output
    errors        their `_errors/part-*.parquet` files (keep columns, _shard, _file, _row, _reason)
    runs          one row per `_runs/<run>.json` summary

`key=value` folders in a file's path (hive partitions, e.g. `date=2026-11-01`) become columns
of all three views: ISO dates as DATE, integers as BIGINT, anything else as VARCHAR. The runs
view always has a `date` column: the run's own `date` when it recorded one, else the path's.

Local paths are read by DuckDB itself (`read_parquet`); URIs (s3://, gs://, hdfs://, file://)
through `pyarrow.dataset` on the URI's pyarrow filesystem, registered in DuckDB, so any
filesystem pyarrow can open works without DuckDB extensions.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import logging
import math
import os
import posixpath
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from rich.text import Text

from batch_infer.errors import OutputError, UserError

log = logging.getLogger("batch_infer")

VIEWS = ("predictions", "errors", "runs")
ERROR_COLUMNS = (
    ("_shard", "VARCHAR"),
    ("_file", "VARCHAR"),
    ("_row", "BIGINT"),
    ("_reason", "VARCHAR"),
)
_MARKERS = ("_manifest", "_runs", "_errors")  # a folder holding one of these is a job output
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_INT = re.compile(r"^-?\d{1,18}$")
_GLOB_CHARS = re.compile(r"[*?\[\]{}]")


# --------------------------------------------------------------------------- discovery


@dataclass
class _Job:
    """One job output found at or below OUTPUT."""

    path: str  # on the filesystem (no scheme)
    partitions: dict[str, str]  # key=value folders in its path
    parts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    success: bool = False


@dataclass
class _Layout:
    location: str  # as the user gave it
    filesystem: pafs.FileSystem
    root: str
    direct: bool  # a local path: DuckDB reads the files itself
    jobs: list[_Job]

    def keys(self) -> dict[str, tuple[pa.DataType, str]]:
        """Partition keys over all jobs, in order of appearance, with their Arrow/SQL types."""
        values: dict[str, list[str]] = {}
        for job in self.jobs:
            for k, v in job.partitions.items():
                values.setdefault(k, []).append(v)
        return {k: _column_type(v) for k, v in values.items()}

    def label(self, job: _Job) -> str:
        rel = posixpath.relpath(job.path, self.root)
        return "." if rel == "." else rel

    def uri(self, job: _Job) -> str:
        if self.direct:
            return job.path
        return self.location.rstrip("/") + job.path[len(self.root) :]


def _partitions(path: str) -> dict[str, str]:
    """Hive `key=value` folders anywhere in a path (as DuckDB reads them)."""
    found = {}
    for part in path.split("/"):
        key, eq, value = part.partition("=")
        if eq and key:
            found[key] = value
    return found


def _column_type(values: Iterable[str | None]) -> tuple[pa.DataType, str]:
    present = [v for v in values if v not in (None, "")]
    if present and all(_DATE.match(v) for v in present):
        try:
            for v in present:
                dt.date.fromisoformat(v)
            return pa.date32(), "DATE"
        except ValueError:
            pass
    if present and all(_INT.match(v) for v in present):
        return pa.int64(), "BIGINT"
    if not present:
        return pa.date32(), "DATE"
    return pa.string(), "VARCHAR"


def _convert(value: str | None, typ: pa.DataType) -> Any:
    if value in (None, ""):
        return None
    if typ == pa.date32():
        return dt.date.fromisoformat(value)
    if typ == pa.int64():
        return int(value)
    return value


def _open(output: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str, bool]:
    location = os.fspath(output)
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location).replace(os.sep, "/"), True
    try:
        fs, root = pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise OutputError(f"{location}: cannot open this location: {exc}") from None
    return fs, root.rstrip("/") or "/", False


def _discover(output: str | os.PathLike[str]) -> _Layout:
    location = os.fspath(output)
    fs, root, direct = _open(output)
    try:
        info = fs.get_file_info(root)
    except (pa.ArrowException, OSError) as exc:
        raise OutputError(f"{location}: cannot read this location: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise OutputError(f"{location}: no such output (the path does not exist)")
    if info.type != pafs.FileType.Directory:
        raise OutputError(f"{location}: is a file; expected a batch-infer output directory")
    jobs: list[_Job] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        children = fs.get_file_info(pafs.FileSelector(folder))
        names = {c.base_name: c for c in children}
        dirs = sorted(c.base_name for c in children if c.type == pafs.FileType.Directory)
        if any(m in dirs for m in _MARKERS):
            job = _Job(folder, _partitions(folder))
            job.parts = sorted(
                c.path for c in children if c.type == pafs.FileType.File and _is_part(c.base_name)
            )
            job.success = "_SUCCESS" in names
            if "_errors" in dirs:
                job.errors = sorted(
                    c.path
                    for c in fs.get_file_info(pafs.FileSelector(names["_errors"].path))
                    if c.type == pafs.FileType.File and _is_part(c.base_name)
                )
            if "_runs" in dirs:
                job.runs = sorted(
                    c.path
                    for c in fs.get_file_info(pafs.FileSelector(names["_runs"].path))
                    if c.type == pafs.FileType.File and c.base_name.endswith(".json")
                )
            jobs.append(job)
        pending.extend(
            posixpath.join(folder, d) for d in reversed(dirs) if not d.startswith(("_", "."))
        )
    if not jobs:
        raise OutputError(
            f"{location}: holds no batch-infer output (no _manifest/ folder at or below it)"
        )
    jobs.sort(key=lambda j: j.path)
    return _Layout(location, fs, root, direct, jobs)


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


# --------------------------------------------------------------------------- views


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> dict[str, str]:
    return {row[0]: row[1] for row in con.execute(f"DESCRIBE {_q(view)}").fetchall()}


def _parquet_view(con: duckdb.DuckDBPyConnection, name: str, layout: _Layout, which: str) -> bool:
    """`name` over the jobs' `which` files (parts or errors); False when there are none."""
    jobs = [j for j in layout.jobs if getattr(j, which)]
    if not jobs:
        return False
    keys = layout.keys()
    if layout.direct:
        # DuckDB reads the files; one read_parquet per set of partition keys (it refuses
        # files with different keys in one call), globbing each job's folder.
        groups: dict[tuple[str, ...], list[str]] = {}
        for job in jobs:
            sources = groups.setdefault(tuple(job.partitions), [])
            folder = job.path if which == "parts" else posixpath.join(job.path, "_errors")
            if _GLOB_CHARS.search(folder):
                sources.extend(getattr(job, which))
            else:
                sources.append(posixpath.join(folder, "part-*.parquet"))
        selects = []
        for group_keys, sources in groups.items():
            options = ["union_by_name = true"]
            if group_keys:
                types = ", ".join(f"{_lit(k)}: {keys[k][1]}" for k in group_keys)
                options += ["hive_partitioning = true", f"hive_types = {{{types}}}"]
            else:
                options.append("hive_partitioning = false")
            files = ", ".join(_lit(s) for s in sources)
            selects.append(f"SELECT * FROM read_parquet([{files}], {', '.join(options)})")
        con.execute(f"CREATE VIEW {_q(name)} AS " + " UNION ALL BY NAME ".join(selects))
        return True
    # Any other filesystem: one Arrow dataset over the files, schemas unified by name.
    files = [f for j in jobs for f in getattr(j, which)]
    schemas = [pq.read_schema(getattr(j, which)[0], filesystem=layout.filesystem) for j in jobs]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    schema = pa.schema([_as_list(f) for f in schema if f.name not in keys])
    partitioning = None
    if keys:
        part_schema = pa.schema([(k, t[0]) for k, t in keys.items()])
        partitioning = ds.HivePartitioning(part_schema, segment_encoding="none")
        schema = pa.unify_schemas([schema, part_schema])
    dataset = ds.dataset(
        files,
        filesystem=layout.filesystem,
        format="parquet",
        partitioning=partitioning,
        schema=schema,
    )
    con.register(name, dataset)
    return True


def _as_list(f: pa.Field) -> pa.Field:
    """Fixed-size lists as lists, as DuckDB's read_parquet gives them (same columns either way)."""
    t = f.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t) or pa.types.is_list(t):
        return f.with_type(pa.list_(_as_list(t.value_field)))
    return f


def _empty_view(con: duckdb.DuckDBPyConnection, name: str, columns: list[tuple[str, str]]) -> None:
    cols = ", ".join(f"CAST(NULL AS {typ}) AS {_q(col)}" for col, typ in columns)
    if not cols:  # nothing says what the columns will be (no _manifest/job.json)
        cols = "CAST(NULL AS VARCHAR) AS _no_columns_yet"
    con.execute(f"CREATE VIEW {_q(name)} AS SELECT {cols} WHERE false")


def _job_config(layout: _Layout) -> dict[str, Any]:
    """keep_columns and outputs from the newest job's `_manifest/job.json`, if any."""
    for job in reversed(layout.jobs):
        path = posixpath.join(job.path, "_manifest", "job.json")
        try:
            with layout.filesystem.open_input_stream(path) as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            continue
    return {}


def _parquet_views(con: duckdb.DuckDBPyConnection, layout: _Layout) -> None:
    keys = [(k, t[1]) for k, t in layout.keys().items()]
    config = _job_config(layout)
    keep = list(config.get("keep_columns", []))
    outputs = list(config.get("outputs", {}).values())
    have_predictions = _parquet_view(con, "predictions", layout, "parts")
    have_errors = _parquet_view(con, "errors", layout, "errors")
    # Views with no files yet still exist, with the columns they will have.
    if not have_predictions:
        known = _columns(con, "errors") if have_errors else {}
        columns = [(c, known.get(c, "VARCHAR")) for c in keep + outputs]
        _empty_view(con, "predictions", columns + [k for k in keys if k[0] not in keep + outputs])
    if not have_errors:
        known = _columns(con, "predictions")
        columns = [(c, known.get(c, "VARCHAR")) for c in keep] + list(ERROR_COLUMNS)
        _empty_view(con, "errors", columns + [k for k in keys if k[0] not in keep])


_RUN_FIELDS: list[tuple[str, pa.DataType]] = [
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("run_id", pa.string()),
    ("name", pa.string()),
    ("status", pa.string()),
    ("rows", pa.int64()),
    ("good_rows", pa.int64()),
    ("bad_rows", pa.int64()),
    ("rows_this_run", pa.int64()),
    ("seconds", pa.float64()),
    ("rows_per_second", pa.float64()),
    ("shards_total", pa.int64()),
    ("shards_committed", pa.int64()),
    ("shards_skipped", pa.int64()),
    ("shards_failed", pa.int64()),
    ("retries", pa.int64()),
    ("backend", pa.string()),
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("actors", pa.int64()),
    ("nodes", pa.list_(pa.string())),
    ("errors", pa.list_(pa.string())),
    ("output", pa.string()),
]


def _runs_table(layout: _Layout) -> pa.Table:
    """One row per `_runs/*.json` of every job, oldest first."""
    docs: list[tuple[_Job, dict[str, Any]]] = []
    for job in layout.jobs:
        for path in job.runs:
            try:
                with layout.filesystem.open_input_stream(path) as f:
                    doc = json.loads(f.read())
            except (OSError, ValueError) as exc:
                log.warning("%s: skipped, not a readable run summary (%s)", path, exc)
                continue
            if isinstance(doc, dict):
                docs.append((job, doc))
    # `date`: the run's own, else its path's; then the path's other partition keys.
    keys = {"date": None, **{k: None for j in layout.jobs for k in j.partitions}}

    def date_of(job: _Job, doc: dict[str, Any]) -> str | None:
        value = doc.get("date") or job.partitions.get("date")
        return None if value is None else str(value)

    types = {
        k: _column_type(date_of(j, d) if k == "date" else j.partitions.get(k) for j, d in docs)[0]
        for k in keys
    }
    columns: dict[str, list[Any]] = {k: [] for k in keys}
    columns.update({name: [] for name, _ in _RUN_FIELDS})
    for job, doc in sorted(docs, key=lambda jd: _number(jd[1].get("started_at")) or 0.0):
        for k in keys:
            raw = date_of(job, doc) if k == "date" else job.partitions.get(k)
            columns[k].append(_convert(raw, types[k]))
        started = _number(doc.get("started_at"))
        seconds = _number(doc.get("seconds"))
        row = {
            **doc,
            "started_at": _timestamp(started),
            "finished_at": _timestamp(started + seconds) if started and seconds else None,
            "output": layout.uri(job),
        }
        for name, typ in _RUN_FIELDS:
            columns[name].append(_field(row.get(name), typ))
    fields = [(k, types[k]) for k in keys] + _RUN_FIELDS
    return pa.table({n: pa.array(columns[n], t) for n, t in fields}, schema=pa.schema(fields))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _timestamp(seconds: float | None) -> dt.datetime | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def _field(value: Any, typ: pa.DataType) -> Any:
    """A summary value of the column's type, or null (older summaries may lack fields)."""
    if value is None:
        return None
    if pa.types.is_list(typ):
        return [str(v) for v in value] if isinstance(value, list) else None
    if pa.types.is_int64(typ):
        number = _number(value)
        return None if number is None else int(number)
    if pa.types.is_float64(typ):
        return _number(value)
    if pa.types.is_string(typ):
        return str(value)
    return value


def connect(output: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views `predictions`, `errors` and `runs`."""
    layout = _discover(output)
    return _connect(layout)


def _connect(layout: _Layout) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    with contextlib.suppress(duckdb.Error):  # without ICU, timestamps are UTC anyway
        con.execute("SET TimeZone = 'UTC'")
    try:
        _parquet_views(con, layout)
    except duckdb.Error as exc:
        raise OutputError(f"{layout.location}: cannot read the output: {_one_line(exc)}") from None
    con.register("runs", _runs_table(layout))
    return con


def _one_line(exc: BaseException) -> str:
    """DuckDB's message on one line, without the LINE/caret excerpt of the SQL."""
    lines = [
        ln.strip()
        for ln in str(exc).splitlines()
        if ln.strip() and not ln.startswith("LINE ") and set(ln.strip()) != {"^"}
    ]
    return " ".join(lines) or type(exc).__name__


def _fetch(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    relation = con.sql(sql)
    if relation is None:  # a statement without a result (SET, CREATE ...)
        return pa.table({})
    if hasattr(relation, "to_arrow_table"):
        return relation.to_arrow_table()
    return relation.fetch_arrow_table()  # older DuckDB


def query(output: str | os.PathLike[str], sql: str) -> pa.Table:
    """Run DuckDB SQL over a job output (or a folder of dated outputs); return the result.

    The SQL sees three views: `predictions` (every `part-*.parquet`), `errors` (every
    `_errors/part-*.parquet`) and `runs` (one row per `_runs/<run>.json`); `key=value`
    folders in the paths (e.g. `date=2026-11-01`) are columns of each. Raises `UserError`
    for a missing output and for SQL DuckDB rejects (its message, on one line).
    """
    con = connect(output)
    try:
        return _fetch(con, sql)
    except duckdb.Error as exc:
        raise UserError(f"query: {_one_line(exc)}") from None
    finally:
        con.close()


# --------------------------------------------------------------------------- printing


def _cell(value: Any, for_table: bool = False) -> str:
    if value is None:
        return "" if not for_table else "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if for_table and math.isfinite(value):
            return f"{value:.6g}"
        return repr(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds" if for_table else "auto")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | dict | tuple):
        if for_table and isinstance(value, list | tuple):
            shown = ", ".join(_cell(v, True) for v in value[:8])
            return f"[{shown}{', …' if len(value) > 8 else ''}]"
        return json.dumps(_jsonable(value), default=str, ensure_ascii=False)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)  # Decimal, UUID, timedelta ...


def _rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=4096):
        yield from batch.to_pylist()


def _stdout_console() -> Console:
    console = Console(soft_wrap=False, highlight=False)
    if not console.is_terminal:  # piped: print tables at their natural width
        console = Console(width=10_000, highlight=False)
    return console


def print_table(table: pa.Table, fmt: str = "table", max_rows: int = 100) -> None:
    """Print a query result to stdout as a rich table, CSV (header first) or a JSON array."""
    names = table.column_names
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(names)
        for row in _rows(table):
            writer.writerow([_cell(row[n]) for n in names])
        return
    if fmt == "json":
        out = sys.stdout
        out.write("[")
        for i, row in enumerate(_rows(table)):
            # JSON Lines inside an array: one object per line, still one valid JSON document
            out.write(",\n" if i else "\n")
            out.write(json.dumps(_jsonable(row), ensure_ascii=False, default=str))
        out.write("\n]\n" if table.num_rows else "]\n")
        return
    shown = table if not max_rows else table.slice(0, max_rows)
    n = table.num_rows
    caption = f"{n:,} row{'s' if n != 1 else ''}"
    if shown.num_rows < n:
        caption = f"first {shown.num_rows:,} of {n:,} rows (--max-rows 0 shows all)"
    out = Table(header_style="bold")
    for name, typ in zip(names, table.schema.types, strict=True):
        numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
        out.add_column(name, justify="right" if numeric else "left", overflow="fold")
    for row in _rows(shown):
        out.add_row(*(_cell(row[n], for_table=True) for n in names))
    console = _stdout_console()
    console.print(out)
    console.print(caption, soft_wrap=True)


# --------------------------------------------------------------------------- inspect


def _shard_entries(layout: _Layout, job: _Job) -> list[dict[str, Any]]:
    folder = posixpath.join(job.path, "_manifest", "shards")
    entries = []
    try:
        infos = layout.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (OSError, pa.ArrowException):
        return []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        try:
            with layout.filesystem.open_input_stream(info.path) as f:
                entries.append(json.loads(f.read()))
        except (OSError, ValueError):
            continue
    return entries


def _when(value: Any, fmt: str = "%m-%d %H:%M") -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = _timestamp(float(value))
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime(fmt)
    return "-" if value is None else str(value)


_STATUS_STYLE = {"succeeded": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}


def _status(status: str | None) -> str:
    style = _STATUS_STYLE.get(status or "")
    return f"[{style}]{status}[/]" if style else str(status or "-")


def _print_screen_table(console: Console, title: str, columns: str, rows: list[list[str]]) -> None:
    """Columns as "name:<" (left) or "name:>" (right). Each row takes one line: the last
    column gets the width the others leave (cut short with an ellipsis)."""
    names = [c.rsplit(":", 1) for c in columns.split("|")]
    widths = [
        max([len(name)] + [Text.from_markup(r[i]).cell_len for r in rows])
        for i, (name, _) in enumerate(names)
    ]
    room = console.width - sum(w + 3 for w in widths[:-1]) - 4  # padding and rules
    table = Table(title=title, title_justify="left", header_style="bold")
    for i, (name, justify) in enumerate(names):
        last = i == len(names) - 1
        table.add_column(
            name,
            justify="right" if justify == ">" else "left",
            no_wrap=True,
            overflow="ellipsis" if last else "fold",
            width=max(len(name), min(widths[i], room)) if last else widths[i],
        )
    for r in rows:
        table.add_row(*r)
    console.print(table)


def inspect(output: str | os.PathLike[str], runs: int = 10, outputs: int = 10) -> None:
    """Print one screen about an output: its latest runs, its outputs' shards, the workers."""
    layout = _discover(output)
    all_runs = _runs_table(layout).to_pylist()
    console = _stdout_console()
    head = f"[bold]{layout.location}[/]: {len(layout.jobs)} output(s), {len(all_runs)} run(s)"
    if all_runs:
        last = all_runs[-1]
        head += (
            f"; last run {last['run_id']} {_status(last['status'])} at "
            f"{_when(last['started_at'], '%Y-%m-%d %H:%M:%S')} UTC, "
            f"backend {last['backend'] or '-'}, "
            f"model {last['model'] or '-'} (sha256 {(last['model_sha256'] or '-')[:12]})"
        )
    console.print(head, soft_wrap=True)

    shown_runs = all_runs[-runs:] if runs else []
    dated = any(r["date"] is not None for r in shown_runs)
    rows = []
    for r in shown_runs:
        cells = [_when(r["started_at"])]
        if dated:
            cells.append(_cell(r["date"]) or "-")
        cells += [
            r["run_id"] or "-",
            _status(r["status"]),
            _count(r["rows"]),
            _count(r["bad_rows"]),
            f"{r['seconds']:.1f}" if r["seconds"] is not None else "-",
            (r["errors"] or [""])[0],
        ]
        rows.append(cells)
    _print_screen_table(
        console,
        f"runs (last {len(shown_runs)} of {len(all_runs)})",
        "started (UTC):<|"
        + ("date:<|" if dated else "")
        + "run:<|status:<|rows:>|bad:>|s:>|error:<",
        rows,
    )

    shown = layout.jobs[-outputs:] if outputs else []
    workers: Counter[tuple[str, str, str]] = Counter()
    worker_rows: Counter[tuple[str, str, str]] = Counter()
    worker_seconds: Counter[tuple[str, str, str]] = Counter()
    rows = []
    for job in shown:
        entries = _shard_entries(layout, job)
        shas = sorted({str(e.get("model_sha256", ""))[:12] for e in entries} - {""})
        rows.append(
            [
                layout.label(job),
                "[green]yes[/]" if job.success else "[yellow]no[/]",
                _count(len(entries)),
                _count(sum(int(e.get("rows", 0)) for e in entries)),
                _count(sum(int(e.get("bad_rows", 0)) for e in entries)),
                _count(sum(1 for e in entries if int(e.get("attempt", 0) or 0) > 0)),
                _when(max((e.get("committed_at", 0) for e in entries), default=None)),
                ", ".join(shas) or "-",
            ]
        )
        for e in entries:
            key = (
                str(e.get("node") or "-")[:12],
                str(e.get("gpu") or "-"),
                str(e.get("backend") or "-"),
            )
            workers[key] += 1
            worker_rows[key] += int(e.get("rows", 0))
            worker_seconds[key] += float(e.get("infer_seconds", 0) or 0)
    _print_screen_table(
        console,
        f"outputs (last {len(shown)} of {len(layout.jobs)})",
        "output:<|_SUCCESS:<|shards:>|rows:>|bad:>|retried:>|committed (UTC):<|model:<",
        rows,
    )
    rows = [
        [key[0], key[1], _count(n), _count(worker_rows[key]), f"{worker_seconds[key]:.1f}", key[2]]
        for key, n in sorted(workers.items())
    ]
    _print_screen_table(
        console,
        "shards by worker (the outputs above)",
        "node:<|gpu:<|shards:>|rows:>|infer s:>|backend:<",
        rows,
    )


def _count(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


# --------------------------------------------------------------------------- command line


def _cmd_query(args: argparse.Namespace) -> int:
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    print_table(query(args.output, sql), args.format, args.max_rows)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    inspect(args.output, runs=args.runs, outputs=args.outputs)
    return 0


def register(subparsers: Any) -> None:
    """Add `query` and `inspect` to the CLI's subparsers."""
    q = subparsers.add_parser(
        "query",
        help="run SQL (DuckDB) over an output: views predictions, errors, runs",
        description=(
            "Run DuckDB SQL over a job output, or a folder holding several (e.g. dated) "
            "outputs. Views: predictions (part files; key=value folders such as date=... "
            "as columns), errors (_errors part files), runs (one row per run)."
        ),
    )
    q.add_argument("output", help="the output path or URI, or a folder above several outputs")
    q.add_argument("sql", help='the SQL, e.g. "SELECT count(*) FROM predictions"; - reads stdin')
    q.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (default), csv (with a header) or json (an array of objects)",
    )
    q.add_argument(
        "--max-rows",
        type=int,
        default=100,
        metavar="N",
        help="table format: rows shown (default 100; 0: all)",
    )
    q.set_defaults(func=_cmd_query)
    i = subparsers.add_parser(
        "inspect", help="one screen about an output: its runs, shards and workers"
    )
    i.add_argument("output", help="the output path or URI, or a folder above several outputs")
    i.add_argument("--runs", type=int, default=10, metavar="N", help="runs shown (default 10)")
    i.add_argument(
        "--outputs",
        type=int,
        default=10,
        metavar="N",
        help="outputs shown, the last N by path (default 10)",
    )
    i.set_defaults(func=_cmd_inspect)
