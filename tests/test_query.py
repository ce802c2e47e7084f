"""`batch_infer.ops.query` / `batch-infer query|inspect`: real DuckDB over real outputs.

The module's fixture runs the two_io job three times on the module's real local Ray, into two
dated outputs under one folder (out/date=2026-11-01/, out/date=2026-11-02/): the first date has
bad rows, so its first run fails (max_bad_rows 0) and its rerun succeeds (max_bad_rows 5).
Every query result is checked against the same computation in pyarrow.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import make_table, read_output, run_records, two_io_spec

import batch_infer
from batch_infer.errors import BadRowsError, OutputError, UserError
from batch_infer.ops.query import query
from batch_infer.sink.manifest import RunRecord

DATES = ("2026-11-01", "2026-11-02")
BAD = {3: "seq: null or holds nulls", 25: "a: null", 41: "seq: null or holds nulls"}


def _input(n: int, start: int, seed: int, bad: bool) -> pa.Table:
    t = make_table(n, start=start, seed=seed)
    t = t.set_column(5, "label", pa.array([f"class-{i % 3}" for i in range(n)]))
    if bad:
        seq, a = t.column("seq").to_pylist(), t.column("a").to_pylist()
        for row, reason in BAD.items():
            if reason.startswith("seq"):
                seq[row] = None
            else:
                a[row] = None
        t = t.set_column(1, "seq", pa.array(seq, pa.list_(pa.float32())))
        t = t.set_column(2, "a", pa.array(a, pa.float64()))
    return t


@pytest.fixture(scope="module")
def out(ray_start_regular, tmp_path_factory, models) -> Path:
    """out/date=D/ for both dates: three real runs (failed, succeeded, succeeded)."""
    tmp = tmp_path_factory.mktemp("query")
    root = tmp / "out"
    for i, date in enumerate(DATES):
        data = tmp / f"data-{date}"
        data.mkdir()
        pq.write_table(
            _input(60, start=1000 * i, seed=i, bad=i == 0), data / "f.parquet", row_group_size=20
        )
        spec = two_io_spec(
            data, root / f"date={date}", models["two_io"], shard_rows=20, num_actors=1
        )
        if i == 0:
            with pytest.raises(BadRowsError):
                batch_infer.run(spec)
            spec["max_bad_rows"] = 5
        assert batch_infer.run(spec).status == "succeeded"
    return root


def _expected_predictions(out: Path) -> pa.Table:
    """What a user would compute with pyarrow: each dated output read, the date added."""
    tables = []
    for date in DATES:
        t = read_output(out / f"date={date}")
        tables.append(t.append_column("date", pa.array([dt.date.fromisoformat(date)] * len(t))))
    return pa.concat_tables(tables)


def _expected_errors(out: Path) -> pa.Table:
    tables = []
    for date in DATES:
        files = sorted((out / f"date={date}" / "_errors").glob("part-*.parquet"))
        for f in files:
            t = pq.read_table(f)
            tables.append(t.append_column("date", pa.array([dt.date.fromisoformat(date)] * len(t))))
    return pa.concat_tables(tables)


def _run_docs(out: Path) -> list[dict]:
    docs = [json.loads(p.read_text()) for p in out.glob("date=*/_runs/*.json")]
    return sorted(docs, key=lambda d: d["started_at"])


# --------------------------------------------------------------------------- the views


def test_counts_and_means_per_label_equal_pyarrow(out: Path):
    got = query(
        out,
        "SELECT date, label, count(*) AS n, avg(score) AS mean_score, sum(emb[1]) AS emb0 "
        "FROM predictions GROUP BY date, label ORDER BY date, label",
    )
    expected = _expected_predictions(out)
    emb0 = pc.list_element(expected.column("emb"), 0)
    agg = (
        expected.append_column("emb0", emb0)
        .group_by(["date", "label"])
        .aggregate([("id", "count"), ("score", "mean"), ("emb0", "sum")])
        .sort_by([("date", "ascending"), ("label", "ascending")])
    )
    assert got.column_names == ["date", "label", "n", "mean_score", "emb0"]
    assert got.schema.field("date").type == pa.date32()
    assert got.column("date").to_pylist() == agg.column("date").to_pylist()
    assert got.column("label").to_pylist() == agg.column("label").to_pylist()
    assert got.column("n").to_pylist() == agg.column("id_count").to_pylist()
    assert got.column("mean_score").to_pylist() == pytest.approx(
        agg.column("score_mean").to_pylist(), rel=1e-6
    )
    assert got.column("emb0").to_pylist() == pytest.approx(
        agg.column("emb0_sum").to_pylist(), rel=1e-5
    )
    # every good row once: 57 on the first date, 60 on the second
    assert sum(got.column("n").to_pylist()) == 117
    whole = query(out, "SELECT * FROM predictions ORDER BY id")
    assert whole.column("id").to_pylist() == sorted(expected.column("id").to_pylist())
    assert set(whole.column_names) == {"id", "label", "emb", "score", "date"}


def test_predictions_join_errors_counts_and_runs(out: Path):
    got = query(
        out,
        """
        WITH p AS (SELECT date, count(*) AS good FROM predictions GROUP BY date),
             e AS (SELECT date, count(*) AS bad FROM errors GROUP BY date),
             r AS (SELECT date, arg_max(good_rows, started_at) AS good_rows,
                          arg_max(bad_rows, started_at) AS bad_rows
                   FROM runs GROUP BY date)
        SELECT p.date, p.good, coalesce(e.bad, 0) AS bad, r.good_rows, r.bad_rows
        FROM p LEFT JOIN e USING (date) JOIN r USING (date) ORDER BY p.date
        """,
    )
    predictions, errors = _expected_predictions(out), _expected_errors(out)
    good = predictions.group_by("date").aggregate([("id", "count")]).to_pydict()
    bad = errors.group_by("date").aggregate([("id", "count")]).to_pydict()
    good_by_date = dict(zip(good["date"], good["id_count"], strict=True))
    bad_by_date = dict(zip(bad["date"], bad["id_count"], strict=True))
    dates = [dt.date.fromisoformat(d) for d in DATES]
    assert got.to_pylist() == [
        {
            "date": d,
            "good": good_by_date[d],
            "bad": bad_by_date.get(d, 0),
            "good_rows": good_by_date[d],
            "bad_rows": bad_by_date.get(d, 0),
        }
        for d in dates
    ]
    assert bad_by_date == {dates[0]: 3}

    # the errors view: keep columns, where the row came from and why, the date
    rows = query(out, "SELECT * FROM errors ORDER BY id")
    assert rows.column_names == ["id", "label", "_shard", "_file", "_row", "_reason", "date"]
    assert rows.column("id").to_pylist() == sorted(BAD)
    assert rows.column("_reason").to_pylist() == [BAD[i] for i in sorted(BAD)]
    assert rows.column("_file").to_pylist() == ["f.parquet"] * 3


def test_runs_view_has_one_row_per_run(out: Path):
    docs = _run_docs(out)
    assert len(docs) == 3
    runs = query(
        out,
        "SELECT date, status, rows, good_rows, bad_rows, seconds, backend, model_sha256, "
        "run_id, started_at, output FROM runs ORDER BY started_at",
    )
    assert runs.num_rows == 3
    assert runs.column("run_id").to_pylist() == [d["run_id"] for d in docs]
    assert runs.column("status").to_pylist() == ["failed", "succeeded", "succeeded"]
    dates = [dt.date.fromisoformat(d) for d in (DATES[0], *DATES)]
    assert runs.column("date").to_pylist() == dates
    assert runs.column("rows").to_pylist() == [d["rows"] for d in docs] == [60, 60, 60]
    assert runs.column("bad_rows").to_pylist() == [3, 3, 0]
    assert runs.column("seconds").to_pylist() == [d["seconds"] for d in docs]
    assert runs.column("model_sha256").to_pylist() == [d["model_sha256"] for d in docs]
    assert all(b.startswith("onnxruntime") for b in runs.column("backend").to_pylist())
    started = [t.timestamp() for t in runs.column("started_at").to_pylist()]
    assert started == pytest.approx([d["started_at"] for d in docs], abs=1e-3)
    assert runs.column("output").to_pylist() == [str(out / f"date={d}") for d in (DATES[0], *DATES)]


def test_folder_keys_named_like_run_fields_give_way_to_them(out: Path, tmp_path: Path):
    """model=v1/output=x folders: `runs` keeps the run's own model and where it was found
    (no DuckDB-renamed model_1 column); predictions still get the folder keys."""
    day = out / f"date={DATES[1]}"
    (doc,) = run_records(day)
    for where in (tmp_path / "model=v1" / "output=x", tmp_path / "model=v2" / "output=y"):
        shutil.copytree(day, where)
    for root in (str(tmp_path), tmp_path.as_uri()):  # read by DuckDB, and through pyarrow.fs
        runs = query(root, "SELECT * FROM runs ORDER BY output")
        assert "model_1" not in runs.column_names and "output_1" not in runs.column_names
        assert runs.column("model").to_pylist() == [doc["model"]] * 2
        found = [f"{root}/model=v1/output=x", f"{root}/model=v2/output=y"]
        assert runs.column("output").to_pylist() == found
        keys = query(root, "SELECT DISTINCT model, output FROM predictions ORDER BY 1")
        assert keys.to_pylist() == [{"model": "v1", "output": "x"}, {"model": "v2", "output": "y"}]


def test_one_dated_output_and_uri_give_the_same_views(out: Path):
    day2 = out / f"date={DATES[1]}"
    local = query(day2, "SELECT date, id, score, emb FROM predictions ORDER BY id")
    expected = _expected_predictions(out).filter(pc.field("date") == dt.date(2026, 11, 2))
    assert local.column("id").to_pylist() == sorted(expected.column("id").to_pylist())
    assert set(local.column("date").to_pylist()) == {dt.date(2026, 11, 2)}
    # its errors view exists though it has no error files, with the columns it would have
    empty = query(day2, "SELECT * FROM errors")
    assert empty.num_rows == 0
    assert empty.column_names == ["id", "label", "_shard", "_file", "_row", "_reason", "date"]
    assert [str(t) for t in empty.schema.types] == [
        "int64",
        "string",
        "string",
        "string",
        "int64",
        "string",
        "date32[day]",
    ]
    # the same through pyarrow.fs (a file:// URI): Arrow datasets registered in DuckDB
    uri = out.as_uri()
    for sql in (
        "SELECT date, id, label, score, emb FROM predictions ORDER BY id",
        "SELECT * FROM errors ORDER BY id",
        "SELECT date, label, count(*) n, avg(score) m FROM predictions GROUP BY ALL ORDER BY ALL",
        "SELECT * EXCLUDE (output) FROM runs ORDER BY started_at",
    ):
        assert query(uri, sql).equals(query(out, sql)), sql
    assert query(day2.as_uri(), "SELECT * FROM errors").schema == empty.schema


def test_output_with_no_predictions_yet_gives_empty_views(out: Path, tmp_path: Path):
    # an output whose first run has just started: only _manifest/job.json (a real one)
    fresh = tmp_path / "date=2026-11-03"
    (fresh / "_manifest").mkdir(parents=True)
    shutil.copy(out / f"date={DATES[1]}" / "_manifest" / "job.json", fresh / "_manifest")
    for view, columns in {
        "predictions": ["id", "label", "emb", "score", "date"],
        "errors": ["id", "label", "_shard", "_file", "_row", "_reason", "date"],
    }.items():
        t = query(fresh, f"SELECT * FROM {view}")
        assert (t.num_rows, t.column_names) == (0, columns)
    runs = query(tmp_path, "SELECT * FROM runs")
    assert runs.num_rows == 0
    assert runs.column_names == ["date", *(f.name for f in fields(RunRecord) if f.name != "date")]
    assert runs.schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert query(fresh, "SELECT count(*) AS n FROM predictions").to_pylist() == [{"n": 0}]


def test_bad_sql_and_missing_output_are_clear_errors(out: Path, tmp_path: Path):
    with pytest.raises(UserError) as err:
        query(out, "SELEC count(*) FROM predictions")
    assert str(err.value) == 'query: Parser Error: syntax error at or near "SELEC"'
    with pytest.raises(UserError) as err:
        query(out, "SELECT nope FROM predictions")
    assert str(err.value).startswith('query: Binder Error: Referenced column "nope" not found')
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="Table with name nothing does not exist"):
        query(out, "SELECT * FROM nothing")
    missing = tmp_path / "no" / "such"
    with pytest.raises(OutputError) as err:
        query(missing, "SELECT 1")
    assert str(err.value) == f"{missing}: no such output (the path does not exist)"
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="holds no batch-infer output"):
        query(tmp_path / "empty", "SELECT 1")


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


SQL = "SELECT date, label, count(*) AS n FROM predictions GROUP BY ALL ORDER BY ALL"


def test_cli_prints_table_csv_and_json(out: Path):
    expected = query(out, SQL).to_pylist()
    assert len(expected) == 6

    csv_out = _cli("query", str(out), SQL, "--format", "csv")
    assert csv_out.returncode == 0, csv_out.stderr
    parsed = pacsv.read_csv(io.BytesIO(csv_out.stdout.encode()))
    assert parsed.column_names == ["date", "label", "n"]
    assert parsed.to_pylist() == expected
    assert csv_out.stdout.splitlines()[1] == "2026-11-01,class-0,19"

    nested = "SELECT id, date, label, emb, score FROM predictions ORDER BY id LIMIT 3"
    json_out = _cli("query", str(out), nested, "--format", "json")
    assert json_out.returncode == 0, json_out.stderr
    ref = query(out, nested).to_pylist()
    assert [{**r, "date": r["date"].isoformat()} for r in ref] == [
        {**r, "emb": pytest.approx(r["emb"]), "score": pytest.approx(r["score"])}
        for r in json.loads(json_out.stdout)
    ]

    table = _cli("query", str(out), SQL)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(ln for ln in lines if "date" in ln and "label" in ln)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["date", "label", "n"]
    body = [ln for ln in lines if "class-" in ln]
    assert len(body) == 6
    for line, row in zip(body, expected, strict=True):
        cells = [c.strip() for c in line.strip("│┃| ").split("│")]
        assert cells == [row["date"].isoformat(), row["label"], str(row["n"])]
    assert "6 rows" in table.stdout


def test_cli_user_errors_exit_2_without_traceback(out: Path, tmp_path: Path):
    bad = _cli("query", str(out), "SELEC 1")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.strip() == 'error: query: Parser Error: syntax error at or near "SELEC"'
    missing = _cli("query", str(tmp_path / "nowhere"), "SELECT 1", "--format", "csv")
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (
        f"error: {tmp_path / 'nowhere'}: no such output (the path does not exist)"
    )
    gone = _cli("inspect", str(tmp_path / "nowhere"))
    assert (gone.returncode, gone.stdout) == (2, "")
    assert "Traceback" not in gone.stderr


def test_cli_inspect_shows_runs_and_shards(out: Path):
    res = _cli("inspect", str(out))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "2 output(s), 3 run(s)" in text
    for doc in _run_docs(out):
        assert doc["run_id"] in text
    assert "date=2026-11-01" in text and "date=2026-11-02" in text
    assert text.count("failed") == 1 and text.count("succeeded") >= 2


# --------------------------------------------------------------------------- output formats

NESTED = "SELECT id, date, label, emb, score FROM predictions ORDER BY id"


def test_csv_ndjson_json_and_parquet_keep_every_value_exactly(out: Path, tmp_path: Path):
    ref = query(out, NESTED)
    assert ref.num_rows == 117
    emb = [[float(x) for x in row] for row in ref.column("emb").to_pylist()]
    score = ref.column("score").to_pylist()  # float32 values, as Python floats

    # csv: a header, lists as JSON arrays; float32 written shortest, so read back as float32
    res = _cli("query", str(out), NESTED, "--format", "csv")
    assert res.returncode == 0, res.stderr
    types = {"score": pa.float32(), "emb": pa.string(), "date": pa.date32()}
    got = pacsv.read_csv(
        io.BytesIO(res.stdout.encode()), convert_options=pacsv.ConvertOptions(column_types=types)
    )
    assert got.column_names == ref.column_names
    assert got.column("score").to_pylist() == score
    assert [json.loads(e) for e in got.column("emb").to_pylist()] == emb
    assert got.select(["id", "date", "label"]).equals(ref.select(["id", "date", "label"]))

    # ndjson: one object a line; float32 values as their exact doubles
    res = _cli("query", str(out), NESTED, "--format", "ndjson")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    expected = [{**r, "date": r["date"].isoformat()} for r in ref.to_pylist()]
    assert rows == expected

    # json: one valid JSON array, the same objects
    res = _cli("query", str(out), NESTED, "--format", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == expected

    # --out: the same bytes as stdout; parquet needs it and gives the same table
    for fmt in ("csv", "ndjson", "json"):
        target = tmp_path / f"r.{fmt}"
        res = _cli("query", str(out), NESTED, "--format", fmt, "--out", str(target))
        assert (res.returncode, res.stdout) == (0, ""), res.stderr
        assert target.read_text() == _cli("query", str(out), NESTED, "--format", fmt).stdout
    target = tmp_path / "r.parquet"
    res = _cli("query", str(out), NESTED, "--format", "parquet", "--out", str(target))
    assert res.returncode == 0, res.stderr
    assert pq.read_table(target).to_pylist() == ref.to_pylist()


def test_json_formats_of_an_empty_result_and_of_nan(out: Path):
    res = _cli("query", str(out), "SELECT id FROM predictions WHERE false", "--format", "json")
    assert (res.returncode, json.loads(res.stdout)) == (0, [])
    res = _cli("query", str(out), "SELECT id FROM predictions WHERE false", "--format", "csv")
    assert res.stdout == "id\n"
    sql = "SELECT 'nan'::DOUBLE AS x, ['inf'::FLOAT] AS l, 'a\"b' AS s"
    res = _cli("query", str(out), sql, "--format", "ndjson")
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]  # Python reads NaN tokens
    assert row["x"] != row["x"] and row["l"] == [float("inf")] and row["s"] == 'a"b'


def test_stdout_appended_to_is_not_truncated(out: Path, tmp_path: Path):
    target = tmp_path / "log.csv"
    target.write_text("kept\n")
    with target.open("ab") as f:
        cmd = [sys.executable, "-m", "batch_infer.cli", "query", str(out), SQL, "--format", "csv"]
        assert subprocess.run(cmd, stdout=f, timeout=60).returncode == 0
    lines = target.read_text().splitlines()
    assert lines[:3] == ["kept", "date,label,n", "2026-11-01,class-0,19"]
    assert len(lines) == 8


def test_bad_format_and_out_combinations_are_one_line_errors(out: Path, tmp_path: Path):
    for args, message in (
        (["--format", "parquet"], "error: --format parquet writes a file: add --out PATH"),
        (
            ["--out", str(tmp_path / "x")],
            "error: --out writes csv, json, ndjson or parquet: add --format",
        ),
        (
            ["--format", "csv", "--out", str(out / "date=2026-11-02" / "part-x.csv")],
            f"error: --out {out / 'date=2026-11-02' / 'part-x.csv'}: is inside the output "
            f"{out}; write elsewhere",
        ),
    ):
        res = _cli("query", str(out), "SELECT 1", *args)
        assert (res.returncode, res.stdout, res.stderr.strip()) == (2, "", message)
    assert not list(out.rglob("part-x*"))


# --------------------------------------------------------------------------- pipes


def _piped_to_head(*args: str) -> subprocess.CompletedProcess:
    cli = shlex.join([sys.executable, "-m", "batch_infer.cli", *args])
    return subprocess.run(
        ["bash", "-c", f"{cli} | head -1; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_output_cut_short_by_head_exits_141_without_a_traceback(out: Path):
    many = "SELECT range AS i, range * 0.5 AS x FROM range(2000000)"
    for fmt, first in (("csv", "i,x\n"), ("ndjson", '{"i":0,"x":0.0}\n'), ("json", "[\n")):
        res = _piped_to_head("query", str(out), many, "--format", fmt)
        assert (res.returncode, res.stderr, res.stdout) == (141, "", first), fmt
    # a reader gone before the first write (Rich writes a table in one go): every command
    for args in (
        ("query", str(out), SQL),
        ("query", str(out), SQL, "--format", "ndjson"),
        ("inspect", str(out)),
        ("inspect", str(out), "--json"),
    ):
        cmd = [sys.executable, "-m", "batch_infer.cli", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (141, b""), args


# --------------------------------------------------------------------------- literal text


MARKUP = ["[bold]hi[/bold]", ":smile:", "root:x:0:0", "path/a[/b]c"]


def test_table_prints_markup_and_emoji_codes_literally(out: Path):
    values = ", ".join(f"'{v}' AS c{i}" for i, v in enumerate(MARKUP))
    res = _cli("query", str(out), f'SELECT {values}, 1 AS "[red]n[/red]"')
    assert res.returncode == 0, res.stderr
    cells = [c.strip() for c in res.stdout.splitlines()[3].strip("│ ").split("│")]
    assert cells == [*MARKUP, "1"]
    assert "[red]n[/red]" in res.stdout and "\x1b" not in res.stdout


def test_inspect_prints_markup_literally(out: Path, tmp_path: Path):
    root = tmp_path / "a[/b]c"
    shutil.copytree(out / f"date={DATES[1]}", root / f"date={DATES[1]}")
    runs = root / f"date={DATES[1]}" / "_runs"
    doc = json.loads(next(runs.glob("*.json")).read_text())
    doc |= {"run_id": "[bold]r1[/bold]", "status": "failed", "errors": [":smile: root:x:0:0"]}
    doc["started_at"] += 3600
    (runs / "zz.json").write_text(json.dumps(doc))
    res = _cli("inspect", str(root))
    assert res.returncode == 0, res.stderr
    for text in (str(root), "[bold]r1[/bold]", ":smile: root:x:0:0"):
        assert text in res.stdout
    assert "\x1b" not in res.stdout


def test_inspect_json_says_what_the_screen_says(out: Path):
    res = _cli("inspect", str(out), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    docs = _run_docs(out)
    assert (report["outputs_total"], report["runs_total"]) == (2, 3)
    assert [r["run_id"] for r in report["runs"]] == [d["run_id"] for d in docs]
    assert [r["status"] for r in report["runs"]] == ["failed", "succeeded", "succeeded"]
    assert [o["output"] for o in report["outputs"]] == [f"date={d}" for d in DATES]
    assert [o["success"] for o in report["outputs"]] == [True, True]
    assert [o["rows"] for o in report["outputs"]] == [60, 60]
    assert [o["bad_rows"] for o in report["outputs"]] == [3, 0]
    assert sum(w["rows"] for w in report["workers"]) == 120
    assert dt.datetime.fromisoformat(report["runs"][0]["started_at"]).timestamp() == (
        pytest.approx(docs[0]["started_at"], abs=1e-3)
    )
    # every RunRecord field, nested values nested, as the summary holds them
    for run, doc in zip(report["runs"], docs, strict=True):
        assert set(run) == {f.name for f in fields(RunRecord)}
        same = set(run) - {"date", "started_at", "finished_at", "output"}
        assert {k: run[k] for k in same} == {k: doc.get(k) for k in same}


# --------------------------------------------------------------------------- discovery


def test_partitions_typed_by_duckdb_and_hidden_folders_skipped(out: Path, tmp_path: Path):
    root = tmp_path / "root[1]"  # glob characters in a path are no pattern
    day = out / f"date={DATES[1]}"
    shutil.copytree(day, root / "shard=7" / f"date={DATES[1]}")
    shutil.copytree(day, root / "plain")  # no keys: another read, its keys null
    shutil.copytree(day, root / "_old" / f"date={DATES[0]}")  # never searched
    shutil.copytree(day, root / ".trash" / f"date={DATES[0]}")
    for where in (root, root.as_uri()):
        got = query(
            where, "SELECT shard, date, count(*) AS n FROM predictions GROUP BY ALL ORDER BY ALL"
        )
        assert got.schema.field("shard").type == pa.int64()
        assert got.schema.field("date").type == pa.date32()
        assert got.to_pylist() == [
            {"shard": 7, "date": dt.date(2026, 11, 2), "n": 60},
            {"shard": None, "date": None, "n": 60},
        ]
        runs = query(where, "SELECT shard, date, output FROM runs ORDER BY shard")
        assert runs.column("shard").to_pylist() == [7, None]
        assert runs.column("date").to_pylist() == [dt.date(2026, 11, 2), None]


# --------------------------------------------------------------------------- runs


def test_runs_view_follows_run_record_and_old_summaries_give_nulls(out: Path, tmp_path: Path):
    root = tmp_path / "out"
    shutil.copytree(out / f"date={DATES[1]}", root / f"date={DATES[1]}")
    runs_dir = root / f"date={DATES[1]}" / "_runs"
    (doc,) = [json.loads(p.read_text()) for p in runs_dir.glob("*.json")]
    old = {"run_id": "old", "name": "two-io", "started_at": doc["started_at"] - 100.5}
    (runs_dir / "old.json").write_text(json.dumps(old | {"seconds": 2.25, "status": "failed"}))
    own = old | {"run_id": "own", "date": "2026-10-31", "started_at": old["started_at"] + 1}
    (runs_dir / "own.json").write_text(json.dumps(own))
    names = ["date", *(f.name for f in fields(RunRecord) if f.name != "date")]
    for where in (root, root.as_uri()):
        runs = query(where, "SELECT * FROM runs")
        assert runs.column_names == names
        assert runs.column("run_id").to_pylist() == ["old", "own", doc["run_id"]]
        assert runs.column("date").to_pylist() == [
            dt.date(2026, 11, 2),
            dt.date(2026, 10, 31),
            dt.date(2026, 11, 2),
        ]
        assert runs.schema.field("finished_at").type == pa.timestamp("us", tz="UTC")
        old_row, own_row, new_row = runs.to_pylist()
        finished = old_row["finished_at"].timestamp()  # started + seconds
        assert finished == pytest.approx(old["started_at"] + 2.25, abs=1e-5)
        assert own_row["finished_at"] is None and own_row["backend_reason"] is None
        assert new_row["finished_at"].timestamp() == pytest.approx(doc["finished_at"], abs=1e-5)
        assert new_row["backend_reason"] == doc["backend_reason"]
        assert new_row["files_written"] == doc["files_written"]


# --------------------------------------------------------------------------- read only


def test_statements_that_could_write_are_refused(out: Path, tmp_path: Path):
    target = out / f"date={DATES[1]}" / "part-evil.parquet"
    for sql, word in (
        (f"COPY (SELECT 1 AS id) TO '{target}'", "COPY"),
        (f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}'", "COPY"),
        (f"EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{target}'", "COPY"),
        (f"SELECT 1; EXPORT DATABASE '{out}'", "EXPORT"),
        (f"ATTACH '{tmp_path / 'x.db'}' AS x", "ATTACH"),
        (f"SET temp_directory = '{out}'", "SET"),
        ("PRAGMA enable_profiling", "PRAGMA"),
        ("INSTALL httpfs", "INSTALL"),
    ):
        with pytest.raises(UserError) as err:
            query(out, sql)
        assert str(err.value) == (
            f"query: {word} is refused: query only reads (write results with --format and "
            "--out, outside the output)"
        )
    assert not target.exists() and not (tmp_path / "x.db").exists()
    res = _cli("query", str(out), f"COPY predictions TO '{target}'")
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr.strip().startswith("error: query: COPY is refused")
    # what only reads still runs, also several statements
    two = "CREATE TEMP TABLE t AS SELECT count(*) AS n FROM predictions; SELECT n FROM t"
    assert query(out, two).to_pylist() == [{"n": 117}]
    assert query(out, "EXPLAIN SELECT * FROM predictions").num_rows == 1


def test_importing_the_cli_loads_neither_duckdb_nor_ray():
    code = (
        "import sys, batch_infer.cli; "
        "print(sorted(m for m in ('duckdb', 'ray', 'onnxruntime') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout.strip()) == (0, "[]"), res.stderr
