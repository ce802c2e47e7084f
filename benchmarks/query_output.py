"""Benchmark (run by hand): `batch-infer query --format csv|ndjson` against the duckdb CLI.

Builds an output of --rows prediction rows in batch-infer's layout (`part-*.parquet` of 65,536-
row groups, zstd, as the writer writes them, + `_manifest/job.json` + `_runs/<run>.json` +
`_SUCCESS`): keep columns `id`, `label`, model outputs `logits` (float[10]) and `predicted`.
Then times whole processes, side by side, each --repeat times (the median counts):

  batch-infer query OUT "SELECT * FROM predictions" --format csv --out f.csv
  duckdb -c "COPY (SELECT * FROM read_parquet('OUT/part-*.parquet')) TO 'f.csv' (HEADER)"

and the same for ndjson (`FORMAT json`), plus batch-infer writing to stdout (`> f.csv`) and
the duckdb CLI writing lists as JSON, as batch-infer's CSV does. --before REV adds the
query command of that git revision (stdout only, csv and json: what it had), run once; and
the alternative weighed against DuckDB's COPY: Arrow batches into pyarrow's CSV writer.

    pip download --no-deps duckdb-cli   # or: python -m venv v && v/bin/pip install duckdb-cli
    python benchmarks/query_output.py --duckdb PATH/TO/duckdb --results benchmarks/results/query.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_FILE = 250_000


def make_output(out: Path, rows: int) -> None:
    """Predictions as batch-infer writes them, written directly (no model run needed)."""
    rng = np.random.default_rng(0)
    (out / "_manifest").mkdir(parents=True)
    (out / "_runs").mkdir()
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        logits = rng.standard_normal((n, 10)).astype(np.float32)
        table = pa.table(
            {
                "id": np.arange(start, start + n, dtype=np.int64),
                "label": rng.integers(0, 10, n),
                "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), 10),
                "predicted": logits.argmax(axis=1).astype(np.int64),
            }
        )
        pq.write_table(table, out / f"part-{i:05d}.parquet", 65536, compression="zstd")
    job = {
        "keep_columns": ["id", "label"],
        "outputs": {"logits": "logits", "predicted": "predicted"},
    }
    (out / "_manifest" / "job.json").write_text(json.dumps(job))
    run = {"run_id": "bench", "name": "bench", "status": "succeeded", "rows": rows}
    (out / "_runs" / "bench.json").write_text(json.dumps(run | {"started_at": time.time()}))
    (out / "_SUCCESS").write_text("{}")


def timed(cmd: list[str], stdout: Path | None) -> float:
    with open(stdout or os.devnull, "wb") as sink:
        start = time.perf_counter()
        subprocess.run(cmd, stdout=sink, check=True)
        return time.perf_counter() - start


def before(rev: str, work: Path) -> Path:
    """The tree of a git revision, to run its `batch-infer query` (PYTHONPATH)."""
    tree = work / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_400_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duckdb", default=shutil.which("duckdb"), help="the duckdb CLI")
    parser.add_argument("--before", metavar="REV", help="also time this revision's query")
    parser.add_argument("--results", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="query-bench-"))
    out = work / "out"
    make_output(out, args.rows)
    ours = [sys.executable, "-m", "batch_infer.cli", "query", str(out), "SELECT * FROM predictions"]
    parts = f"read_parquet('{out}/part-*.parquet')"
    if args.duckdb:
        version = subprocess.check_output([args.duckdb, "--version"], text=True).split()[0]
        duck, duck_name = [args.duckdb, "-c"], f"duckdb CLI {version}"
    else:  # no CLI: the same COPY through the Python module, and the results say so
        duck = [sys.executable, "-c", "import duckdb, sys; duckdb.sql(sys.argv[1])"]
        duck_name = f"python -c duckdb.sql (duckdb {duckdb.__version__}; no CLI found)"
    # (what, format, command, file standing for stdout)
    cases: list[tuple[str, str, list[str], Path | None]] = []
    for fmt, options in (("csv", "(HEADER)"), ("ndjson", "(FORMAT json)")):
        f = work / f"f.{fmt}"
        copy = f"COPY (SELECT * FROM {parts}) TO '{f}' {options}"
        cases.append((f"{duck_name}: `{copy.replace(str(work), '…')}`", fmt, [*duck, copy], None))
        what = f"`batch-infer query OUT 'SELECT * FROM predictions' --format {fmt} --out f.{fmt}`"
        cases.append((what, fmt, [*ours, "--format", fmt, "--out", str(f)], None))
    listed = f"SELECT * REPLACE (to_json(logits) AS logits) FROM {parts}"
    copy = f"COPY ({listed}) TO '{work / 'j.csv'}' (HEADER)"
    cases.append(
        (
            f"{duck_name}, lists as JSON as batch-infer writes them: "
            f"`{copy.replace(str(work), '…')}`",
            "csv",
            [*duck, copy],
            None,
        )
    )
    cases.append(
        (
            "`batch-infer query ... --format csv > f.csv` (stdout)",
            "csv",
            [*ours, "--format", "csv"],
            work / "stdout.csv",
        )
    )
    # the alternative weighed: DuckDB's Arrow batches through pyarrow's CSV writer (which
    # cannot write lists, so DuckDB turns them into JSON text first)
    arrow = (
        "import sys, pyarrow.csv as c; from batch_infer.ops.query import connect; "
        "r = connect(sys.argv[1]).sql('SELECT * REPLACE (to_json(logits) AS logits) "
        "FROM predictions').to_arrow_reader(); w = c.CSVWriter(sys.argv[2], r.schema); "
        "[w.write_batch(b) for b in r]; w.close()"
    )
    what = "alternative: `relation.to_arrow_reader()` + `pyarrow.csv.CSVWriter` to f.csv"
    cases.append((what, "csv", [sys.executable, "-c", arrow, str(out), str(work / "a.csv")], None))
    if args.before:
        # -P: the current directory (maybe this checkout) must not shadow the old tree
        old = ["env", f"PYTHONPATH={before(args.before, work)}", sys.executable, "-P", *ours[1:]]
        for fmt in ("csv", "json"):
            what = f"`batch-infer query ... --format {fmt} > f.{fmt}` at {args.before} (before)"
            cases.append(
                (
                    what,
                    "csv" if fmt == "csv" else "ndjson",
                    [*old, "--format", fmt],
                    work / f"before.{fmt}",
                )
            )
    times: list[list[float]] = [[] for _ in cases]
    loads = [os.getloadavg()[0]]
    for i in range(args.repeat):  # interleaved, so a slow moment hits every case alike
        for (what, _, cmd, stdout), runs in zip(cases, times, strict=True):
            if i and "(before)" in what:
                continue  # row by row in Python: once is enough
            runs.append(timed(cmd, stdout))
            loads.append(os.getloadavg()[0])
            print(f"{runs[-1]:7.2f} s  {what}", file=sys.stderr)
    base: dict[str, list[float]] = {}  # per format, the first duckdb CLI case: the plain COPY
    for (what, fmt, _, _), runs in zip(cases, times, strict=True):
        if what.startswith(duck_name):
            base.setdefault(fmt, runs)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:,.0f} MB" for p in work.glob("*.*"))
    files = len(list(out.glob("part-*.parquet")))
    lines = [
        "# `batch-infer query` writing results vs the duckdb CLI",
        "",
        f"Machine: this project's {os.cpu_count()}-core {platform.machine()} development box "
        f"({platform.platform()}); Python {platform.python_version()}, duckdb (Python) "
        f"{duckdb.__version__}, pyarrow {pa.__version__}; {duck_name}. The box is shared: its "
        f"1-minute load average was {min(loads):.1f} to {max(loads):.1f} during the runs.",
        "",
        f"Output: {args.rows:,} prediction rows in {files} part files (id, label, logits "
        "float[10], predicted; zstd, 65,536-row groups), written directly in batch-infer's "
        f"layout. Each command runs as one whole process, {args.repeat} times interleaved; "
        "ratio: batch-infer's seconds / the duckdb CLI's for the same format (ndjson for "
        "json), by median and by fastest run (least disturbed by other work on the box). "
        f"Run as `python benchmarks/query_output.py --rows {args.rows} --repeat {args.repeat}"
        + (f" --before {args.before}" if args.before else "")
        + " --duckdb PATH --results benchmarks/results/query.md`.",
        "",
        "| command | median s | fastest s | runs (s) | ratio, median | ratio, fastest |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for (what, fmt, _, _), runs in zip(cases, times, strict=True):
        median, fastest = statistics.median(runs), min(runs)
        ratios = f"{median / statistics.median(base[fmt]):.2f} | {fastest / min(base[fmt]):.2f}"
        lines.append(
            f"| {what} | {median:.2f} | {fastest:.2f} | {', '.join(f'{t:.2f}' for t in runs)} "
            f"| {ratios} |"
        )
    lines += ["", f"Files written: {sizes}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        args.results.write_text(text)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
