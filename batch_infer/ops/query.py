"""SQL over job outputs with DuckDB: `batch-infer query|inspect` and `batch_infer.query()`.

Views and formats: docs/operations.md (Query). Local paths are read by DuckDB itself; URIs
(file:// too) through pyarrow.fs, as Arrow datasets DuckDB scans (its httpfs cannot be relied
on). `query` only reads: DuckDB's `enable_external_access` cannot let it read the output yet
not write into it, so statements that could write files or change settings are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import posixpath
import re
import shutil
import sys
import threading
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from batch_infer.errors import OutputError, UserError
from batch_infer.location import Location, is_uri, open_location
from batch_infer.ops import console, quiet_pipe
from batch_infer.sink.manifest import RunRecord, committed_entries, timeline_text

if TYPE_CHECKING:  # DuckDB and Rich load on first use: `batch-infer --help` stays fast
    import duckdb
    from rich.text import Text

MARKERS = ("_manifest", "_runs", "_errors")  # a folder holding one of these is a job output
COPY = dict(csv="FORMAT csv, HEADER", json="FORMAT json, ARRAY", ndjson="FORMAT json")
COPY |= dict(parquet="FORMAT parquet")  # DuckDB's COPY options per --format
ERROR_COLUMNS = {"_shard": "VARCHAR", "_file": "VARCHAR", "_row": "BIGINT", "_reason": "VARCHAR"}
_READS = {"SELECT", "EXPLAIN", "CREATE", "INSERT", "UPDATE", "DELETE", "DROP", "MULTI"}  # PIVOT
_EXPLAIN = re.compile(r"\s*EXPLAIN\s+(ANALY[SZ]E\s+|\([^)]*\)\s*)?", re.IGNORECASE)
_TYPES = {str: "VARCHAR", int: "BIGINT", float: "DOUBLE", bool: "BOOLEAN", list[str]: "VARCHAR[]"}
_STYLES = dict(succeeded="green", yes="green", failed="red", interrupted="yellow", no="yellow")
_RUN_KEYS = ("date", "started_at", "run_id", "status", "rows", "bad_rows", "seconds", "errors")
_OUTPUT_KEYS = ("output", "success", "shards", "rows", "bad_rows", "retried", "committed_at")
_OUTPUT_KEYS += ("model_sha256",)
_WORKER_KEYS = ("node", "gpu", "backend", "shards", "rows", "infer_seconds")


def _run_fields() -> dict[str, str]:
    """RunRecord's fields with DuckDB types (JSON where not a scalar or a list of strings)."""
    hints = typing.get_type_hints(RunRecord)
    fields = {}
    for f in dataclasses.fields(RunRecord):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):  # `str | None` and the like
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        fields[f.name] = _TYPES.get(hint, "JSON")
    return fields


@dataclass
class _Output:
    """One job output at or below OUTPUT; paths on its filesystem."""

    path: str
    success: bool
    parts: list[str]
    errors: list[str]
    runs: list[str]


@dataclass
class _Layout:
    root: Location
    outputs: list[_Output]
    direct: bool  # a local path, read by DuckDB itself; URIs (file:// too) go through pyarrow

    def uri(self, path: str) -> str:
        """`path` spelled as the user spelled the location (a URI stays a URI)."""
        return path if self.direct else self.root.given.rstrip("/") + path[len(self.root.root) :]


def _hive(path: str) -> dict[str, str]:
    """`key=value` folders of a path, split at the last `=` as DuckDB splits them."""
    return {k: v for k, _, v in (seg.rpartition("=") for seg in path.split("/")) if k}


def _files(fs: pafs.FileSystem, folder: str, prefix: str, suffix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    ok = [i for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix)]
    return sorted(i.path for i in ok if i.base_name.endswith(suffix))


def _discover(output: str | os.PathLike[str]) -> _Layout:
    root = open_location(os.fspath(output), "output", OutputError)
    fs, given, outputs, pending = root.filesystem, root.given, [], [root.root]
    try:
        kind = root.info().type
        if kind == pafs.FileType.NotFound:
            raise OutputError(f"{given}: no such output (the path does not exist)")
        if kind != pafs.FileType.Directory:
            raise OutputError(f"{given}: is a file; expected a batch-infer output directory")
        while pending:
            folder = pending.pop()
            children = fs.get_file_info(pafs.FileSelector(folder))
            dirs = sorted(c.base_name for c in children if c.type == pafs.FileType.Directory)
            if any(m in dirs for m in MARKERS):
                success = any(c.base_name == "_SUCCESS" for c in children)
                parts = _files(fs, folder, "part-", ".parquet")
                errors = _files(fs, f"{folder}/_errors", "part-", ".parquet")
                runs = [r for r in _files(fs, f"{folder}/_runs", "", ".json") if "/." not in r]
                outputs.append(_Output(folder, success, parts, errors, runs))
            pending += [f"{folder}/{d}" for d in reversed(dirs) if not d.startswith(("_", "."))]
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{given}: cannot read this location: {_one_line(exc)}") from None
    if not outputs:
        raise OutputError(f"{given}: holds no batch-infer output (no _manifest/ at or below it)")
    return _Layout(root, sorted(outputs, key=lambda o: o.path), not is_uri(given))


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _key_types(layout: _Layout) -> pa.Schema:
    """The outputs' `key=value` folders, typed as DuckDB types them on local paths: DATE,
    else BIGINT, else VARCHAR ("007" stays text)."""
    values: dict[str, list[str]] = {}
    for out in layout.outputs:
        for k, v in _hive(out.path).items():
            values.setdefault(k, []).append(v)
    return pa.schema([(k, _key_type(v)) for k, v in values.items()])


def _key_type(values: list[str]) -> pa.DataType:
    text = pa.array(values, pa.string())
    for typ in (pa.date32(), pa.int64()):
        with contextlib.suppress(pa.ArrowInvalid):
            if text.cast(typ).cast(pa.string()).equals(text):
                return typ
    return pa.string()


def _as_list(f: pa.Field) -> pa.Field:
    """Fixed-size lists as lists, as DuckDB's read_parquet gives them."""
    if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type):
        return f.with_type(pa.list_(_as_list(f.type.value_field)))
    return f


def _create_views(con: duckdb.DuckDBPyConnection, layout: _Layout) -> None:
    """`predictions` and `errors` over the part files; `runs` over the run summaries, read
    through the location's filesystem (small files) and parsed by DuckDB."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    keys, fs = _key_types(layout), layout.root.filesystem
    for view, which in (("predictions", "parts"), ("errors", "errors")):
        if layout.direct:  # one read per set of keys: DuckDB refuses paths naming other keys
            groups: dict[tuple[str, ...], list[str]] = {}
            for out in layout.outputs:
                groups.setdefault(tuple(_hive(out.path)), []).extend(getattr(out, which))
            opts = "hive_partitioning = true, union_by_name = true"
            lists = ["[" + ", ".join(map(_lit, f)) + "]" for f in groups.values() if f]
            reads = [f"SELECT * FROM read_parquet({f}, {opts})" for f in lists]
            if reads:
                con.execute(f"CREATE VIEW {view} AS " + " UNION ALL BY NAME ".join(reads))
        elif files := [getattr(o, which) for o in layout.outputs if getattr(o, which)]:
            schemas = [pq.read_schema(f[0], filesystem=fs) for f in files]
            schema = pa.unify_schemas(schemas, promote_options="permissive")
            schema = pa.schema([_as_list(f) for f in schema if f.name not in keys.names] + [*keys])
            hive = ds.HivePartitioning(keys, segment_encoding="none") if keys else None
            paths = [p for f in files for p in f]
            con.register(view, ds.dataset(paths, schema, "parquet", fs, partitioning=hive))
    runs = [(out, path) for out in layout.outputs for path in out.runs]
    docs = []
    for _, path in runs:
        with fs.open_input_stream(path) as f:
            docs.append(f.read().decode())
    table = {"doc": pa.array(docs, pa.string())}
    table["output"] = pa.array([layout.uri(out.path) for out, _ in runs], pa.string())
    # each summary's path keys, typed as the part files' keys; a key named like a field of
    # the run (model=v2, output=...) gives way to it, but for date (below)
    fields = _run_fields()
    shown = [k for k in keys if k.name == "date" or k.name not in fields]
    for k in shown:
        keyed = pa.array([_hive(out.path).get(k.name) for out, _ in runs], pa.string())
        table[k.name] = keyed.cast(k.type)
    con.register("_runs_docs", pa.table(table))
    date = "TRY_CAST(r.date AS DATE)"  # the run's own date, else its path's
    date = f"coalesce({date}, TRY_CAST(d.date AS DATE))" if "date" in keys.names else date
    special = {
        "started_at": "to_timestamp(r.started_at)",
        "finished_at": "to_timestamp(coalesce(r.finished_at, r.started_at + r.seconds))",
        "output": "d.output",  # where it was found
    }
    cols = [f"{date} AS date"] + [f"d.{_q(k.name)}" for k in shown if k.name != "date"]
    cols += [f"{special.get(n, f'r.{_q(n)}')} AS {_q(n)}" for n in fields if n != "date"]
    record = _lit(json.dumps(fields))  # parsed by DuckDB, as read_json would
    parsed = f"(SELECT *, json_transform(doc, {record}) AS r FROM _runs_docs) d"
    con.execute(f"CREATE VIEW runs AS SELECT {', '.join(cols)} FROM {parsed} ORDER BY started_at")


def _empty_views(con: duckdb.DuckDBPyConnection, layout: _Layout) -> None:
    """`predictions` and `errors` with no files yet still exist, with the columns they will
    have: the newest job.json's, typed as in the other views where these have them."""
    have: dict[str, dict[str, str]] = {}
    sql = "SELECT table_name, column_name, data_type FROM information_schema.columns"
    for view, column, typ in con.execute(sql).fetchall():
        have.setdefault(view, {})[column] = typ
    known = {**have["runs"], **have.get("errors", {}), **have.get("predictions", {})}
    job: dict[str, Any] = {}
    for out in reversed(layout.outputs):
        with contextlib.suppress(OSError, ValueError):
            where = Location(layout.root.filesystem, out.path, out.path)
            job = where.read_json("_manifest/job.json")
            break
    keep = list(job.get("keep_columns", []))
    keys = dict.fromkeys((k for o in layout.outputs for k in _hive(o.path)), "VARCHAR")
    made = dict.fromkeys([*keep, *job.get("outputs", {}).values()], "VARCHAR")
    if "top_k" in (post := job.get("postprocess") or {}):  # the built-in label and score
        label = "VARCHAR" if post.get("labels") else "BIGINT"
        made |= {"label": label, "score": "FLOAT"}
        made |= {"top_labels": f"{label}[]", "top_scores": "FLOAT[]"} if post["top_k"] > 1 else {}
    wanted = {
        "predictions": made | keys,
        "errors": dict.fromkeys(keep, "VARCHAR") | ERROR_COLUMNS | keys,
    }
    for view, columns in wanted.items():
        if view not in have:
            cols = [f"CAST(NULL AS {known.get(c, t)}) AS {_q(c)}" for c, t in columns.items()]
            cols = cols or ["CAST(NULL AS VARCHAR) AS _no_columns_yet"]  # no job.json yet
            con.execute(f"CREATE VIEW {view} AS SELECT {', '.join(cols)} WHERE false")


def connect(output: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views `predictions`, `errors` and `runs`."""
    return _connect(_discover(output))


def _connect(layout: _Layout) -> duckdb.DuckDBPyConnection:
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'; SET enable_progress_bar = false")
        _create_views(con, layout)
        _empty_views(con, layout)
    except (duckdb.Error, pa.ArrowException, OSError, ValueError) as exc:
        con.close()
        raise OutputError(
            f"{layout.root.given}: cannot read the output: {_one_line(exc)}"
        ) from None
    return con


def _one_line(exc: BaseException) -> str:
    """DuckDB's message on one line, without the LINE/caret excerpt of the SQL."""
    lines = [ln.strip() for ln in str(exc).splitlines() if not ln.startswith("LINE ")]
    return " ".join(ln for ln in lines if ln.strip("^")) or type(exc).__name__


@contextlib.contextmanager
def _sql_errors(what: str) -> Iterator[None]:
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise UserError(f"{what}: {_one_line(exc)}") from None


def _reads_only(sql: str) -> None:
    """Refuse statements that could write files or change settings. EXPLAIN ANALYZE runs
    its statement, so the statement an EXPLAIN names is checked too."""
    import duckdb

    for statement in duckdb.extract_statements(sql):
        if statement.type.name == "EXPLAIN":
            _reads_only(_EXPLAIN.sub("", statement.query, count=1))
        elif statement.type.name not in _READS:
            raise UserError(
                f"query: {statement.query.split()[0].upper()} is refused: query only reads "
                "(write results with --format and --out, outside the output)"
            )


def query(output: str | os.PathLike[str], sql: str) -> pa.Table:
    """Run DuckDB SQL over a job output (or a folder of dated outputs) and return the result.
    The SQL sees the views `predictions`, `errors` and `runs` (docs/operations.md). Raises
    `UserError` for a missing output, for statements that could write, and for SQL DuckDB
    rejects (its message, on one line)."""
    with contextlib.closing(connect(output)) as con, _sql_errors("query"):
        _reads_only(sql)
        result = con.sql(sql)  # None for a statement with no result (CREATE ...)
        return pa.table({}) if result is None else result.to_arrow_table()


def _write(
    con: duckdb.DuckDBPyConnection, result: duckdb.DuckDBPyRelation, fmt: str, out: str | None
) -> None:
    """Stream the result through DuckDB's COPY into `out`, or into stdout."""
    nested = ("list", "array", "struct", "map", "union")  # DuckDB's CSV spelling is no JSON
    as_json = [c for c, t in zip(result.columns, result.types, strict=True) if t.id in nested]
    if fmt == "csv" and as_json:
        result = result.project(
            "* REPLACE (" + ", ".join(f"to_json({_q(c)}) AS {_q(c)}" for c in as_json) + ")"
        )
    result.create_view("_batch_infer_result", replace=True)

    def copy(path: str) -> None:
        con.execute(f"COPY (FROM _batch_infer_result) TO {_lit(path)} ({COPY[fmt]})")

    if out:
        copy(out)
        return
    # DuckDB writes into a pipe that a thread empties into stdout: reopening /dev/stdout
    # would truncate a file that `>>` appends to. A reader gone away (`| head`) fails the
    # relay; closing its end then fails DuckDB's next write too.
    read_fd, write_fd = os.pipe()
    gone = threading.Event()

    def relay() -> None:
        with open(read_fd, "rb") as src:
            try:
                shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                gone.set()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        copy(f"/dev/fd/{write_fd}")
    except Exception:
        if not gone.is_set():  # else the reader went away: not an error of the query
            raise
    finally:
        os.close(write_fd)
        thread.join()
    if gone.is_set():
        raise BrokenPipeError


def _cell(value: Any) -> str:
    """A value as a table shows it: short floats and lists, times to the second."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dt.datetime):  # dates and times print as ISO 8601 by themselves
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_cell, value[:8])) + (", …" if len(value) > 8 else "") + "]"
    return value.hex() if isinstance(value, bytes) else str(value)


def _status(value: str | bool | None) -> Text:
    from rich.text import Text

    text = ("yes" if value else "no") if isinstance(value, bool) else (value or "-")
    return Text(text, style=_STYLES.get(text, ""))


def _table(title: str, names: list[str], rows: list[list[Any]], caption: str = "") -> None:
    """Rows as a Rich table on stdout, one line each: the last column gets the width the
    others leave. Cells are `Text`, so data is never read as markup or emoji."""
    from rich.table import Table
    from rich.text import Text

    out = console()
    cells = [[v if isinstance(v, Text) else Text(_cell(v)) for v in row] for row in rows]
    widths = [max([len(n)] + [r[i].cell_len for r in cells]) for i, n in enumerate(names)]
    if names:
        room = out.width - sum(w + 3 for w in widths[:-1]) - 4  # padding and rules
        widths[-1] = max(len(names[-1]), min(widths[-1], room))
    table = Table(title=Text(title) if title else None, title_justify="left", header_style="bold")
    for i, (name, width) in enumerate(zip(names, widths, strict=True)):
        numeric = any(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows)
        right = "right" if numeric else "left"
        table.add_column(Text(name), justify=right, no_wrap=True, overflow="ellipsis", width=width)
    for row in cells:
        table.add_row(*row)
    out.print(table)
    if caption:
        out.print(caption)


def _print_result(result: duckdb.DuckDBPyRelation, max_rows: int) -> None:
    """The first `max_rows` rows (0: all) as a table; the rest are counted, not converted."""
    reader = result.to_arrow_reader()
    kept, total = [], 0
    for batch in reader:
        if not max_rows or total < max_rows:
            kept.append(batch.slice(0, max_rows - total if max_rows else None))
        total += batch.num_rows
    shown = pa.Table.from_batches(kept, reader.schema)
    caption = f"{total:,} row{'s' if total != 1 else ''}"
    if shown.num_rows < total:
        caption = f"first {shown.num_rows:,} of {total:,} rows (--max-rows 0 shows all)"
    rows = [list(r) for r in zip(*(c.to_pylist() for c in shown.columns), strict=True)]
    _table("", shown.column_names, rows, caption)


def _report(layout: _Layout, runs: int, outputs: int) -> dict[str, Any]:
    """What `inspect` shows: the last `runs` runs, the last `outputs` outputs, their workers."""
    with contextlib.closing(_connect(layout)) as con, _sql_errors("inspect"):
        all_runs = con.sql("SELECT * FROM runs").to_arrow_table().to_pylist()
    nested = [n for n, t in _run_fields().items() if t == "JSON"]  # nested in the JSON report
    for run in all_runs:
        run |= {n: json.loads(run[n]) for n in nested if run[n] is not None}
    shown, workers = [], {}
    for out in layout.outputs[-outputs:] if outputs else []:
        try:
            where = Location(layout.root.filesystem, out.path, out.path)
            done = list(committed_entries(where).values())
        except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
            raise OutputError(f"{layout.uri(out.path)}: unreadable manifest: {exc}") from None
        last = max((e.committed_at for e in done), default=0.0)
        values = (
            posixpath.relpath(out.path, layout.root.root),
            out.success,
            len(done),
            sum(e.rows for e in done),
            sum(e.bad_rows for e in done),
            sum(e.attempt > 0 for e in done),
            dt.datetime.fromtimestamp(last, dt.timezone.utc) if last else None,
            sorted({e.model_sha256 for e in done} - {""}),
        )
        shown.append(dict(zip(_OUTPUT_KEYS, values, strict=True)))
        for e in done:
            key = (e.node, e.gpu or "", e.backend)
            w = workers.setdefault(key, dict(zip(_WORKER_KEYS, (*key, 0, 0, 0.0), strict=True)))
            w["shards"] += 1
            w["rows"] += e.rows
            w["infer_seconds"] = round(w["infer_seconds"] + e.infer_seconds, 3)
    return {
        "output": layout.root.given,
        "outputs_total": len(layout.outputs),
        "runs_total": len(all_runs),
        "runs": all_runs[-runs:] if runs else [],
        "outputs": shown,
        "workers": [workers[k] for k in sorted(workers)],
    }


def inspect(
    output: str | os.PathLike[str], runs: int = 10, outputs: int = 10, as_json: bool = False
) -> None:
    """Print one screen about an output (its latest runs, its outputs' shards, the workers
    that computed them), or the same as one JSON document for scripts."""
    report = _report(_discover(output), runs, outputs)
    if as_json:
        print(json.dumps(report, indent=1, default=lambda v: v.isoformat()))  # dates, times
        return
    runs, outs = report["runs"], report["outputs"]
    head = f"{report['output']}: {report['outputs_total']} output(s), {report['runs_total']} run(s)"
    console().print(head, style="bold")
    show = {"status": _status, "success": _status, "errors": lambda e: "; ".join(e or ["-"])}
    show |= {"node": lambda n: n[:12], "gpu": lambda g: g or "-"}
    show |= {"model_sha256": lambda s: ", ".join(h[:12] for h in s)}
    show |= dict.fromkeys(("started_at", "committed_at"), lambda t: t and t.strftime("%m-%d %H:%M"))
    dated = any(r["date"] for r in runs)
    for title, rows, keys in (
        (f"runs (last {len(runs)} of {report['runs_total']})", runs, _RUN_KEYS[not dated :]),
        (f"outputs (last {len(outs)} of {report['outputs_total']})", outs, _OUTPUT_KEYS),
        ("shards by worker (the outputs above)", report["workers"], _WORKER_KEYS),
    ):
        cells = [[show.get(k, lambda v: v)(r[k]) for k in keys] for r in rows]
        _table(title, list(keys), cells)
    if runs and runs[-1].get("timeline"):
        timeline = timeline_text(runs[-1]["timeline"])
        console().print(f"last run's timeline (s after its start): {timeline}")


def _cmd_query(args: argparse.Namespace) -> int:
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if args.out and args.format == "table":
        raise UserError("--out writes csv, json, ndjson or parquet: add --format")
    if args.format == "parquet" and not args.out:
        raise UserError("--format parquet writes a file: add --out PATH")
    layout = _discover(args.output)
    if args.out and layout.root.contains(open_location(args.out, "--out")):
        raise UserError(f"--out {args.out}: is inside the output {args.output}; write elsewhere")
    with contextlib.closing(_connect(layout)) as con, _sql_errors("query"):
        _reads_only(sql)
        result = con.sql(sql)
        if result is not None and args.format == "table":
            _print_result(result, args.max_rows)
        elif result is not None:
            _write(con, result, args.format, args.out)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.timeline:
        from batch_infer.ops.timeline import write_timeline

        out = open_location(args.output, "output", OutputError)
        record = write_timeline(out, args.timeline, args.run)
        print(f"wrote the timeline of run {record.run_id} to {args.timeline}", file=sys.stderr)
        return 0
    inspect(args.output, runs=args.runs, outputs=args.outputs, as_json=args.json)
    return 0


def register(subparsers: Any) -> None:
    """Add `query` and `inspect` to the CLI's subparsers."""
    where = "the output path or URI, or a folder above several outputs"
    q = subparsers.add_parser(
        "query",
        help="run SQL (DuckDB) over an output: views predictions, errors, runs",
        description="Run DuckDB SQL over a job output, or a folder holding several (e.g. "
        "dated) outputs. Views: predictions (part files; key=value folders such as date=... "
        "as columns), errors (_errors part files), runs (one row per run). Only reads: "
        "COPY, EXPORT, ATTACH, SET, PRAGMA, INSTALL are refused.",
    )
    q.add_argument("output", help=where)
    q.add_argument("sql", help='the SQL, e.g. "SELECT count(*) FROM predictions"; - reads stdin')
    q.add_argument(
        "--format",
        choices=("table", *COPY),
        default="table",
        help="table (default), csv (a header; lists as JSON), json (one array), ndjson (one "
        "object a line) or parquet (needs --out)",
    )
    q.add_argument("--out", metavar="PATH", help="write to this file, not stdout")
    q.add_argument("--max-rows", type=int, default=100, metavar="N", help="table: rows (0: all)")
    q.set_defaults(func=quiet_pipe(_cmd_query))
    i = subparsers.add_parser("inspect", help="one screen about an output: runs, shards, workers")
    i.add_argument("output", help=where)
    i.add_argument("--runs", type=int, default=10, metavar="N", help="runs shown (default 10)")
    i.add_argument("--outputs", type=int, default=10, metavar="N", help="the last N outputs")
    i.add_argument("--json", action="store_true", help="the same as one JSON document")
    i.add_argument(
        "--timeline",
        metavar="FILE.html",
        help="draw a run's timeline (a lane per actor, shards as bars) into one HTML file",
    )
    i.add_argument("--run", metavar="ID", help="with --timeline: this run (default: the latest)")
    i.set_defaults(func=quiet_pipe(_cmd_inspect))
