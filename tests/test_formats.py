"""End to end on a real local Ray: every input layout gives the direct onnxruntime answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import batch_infer
from tests.conftest import (
    assert_matches_direct,
    make_table,
    read_output,
    two_io_spec,
    write_parquet_dataset,
)

pytestmark = pytest.mark.usefixtures("ray_start_regular")


def test_hive_parquet_multi_file_multi_row_group(tmp_path, models):
    data = write_parquet_dataset(tmp_path / "in", files=3, rows=500, row_group=64)
    out = tmp_path / "out"
    spec = two_io_spec(
        data,
        out,
        models["two_io"],
        shard_rows=200,
        output={"keep_columns": ["id", "label", "part"]},
    )
    summary = batch_infer.run(spec)
    inputs = ds.dataset(str(data), format="parquet", partitioning="hive").to_table()
    output = read_output(out)
    assert_matches_direct(models["two_io"], inputs, output)
    # hive partition values travel as a column
    by_id = dict(zip(output["id"].to_pylist(), output["part"].to_pylist(), strict=True))
    assert by_id[0] == 0 and by_id[500] == 1 and by_id[1000] == 0
    # fixed-size lists for vectors, scalars for [N, 1]
    assert output.schema.field("emb").type == pa.list_(pa.float32(), 2)
    assert output.schema.field("score").type == pa.float32()
    assert summary.status == "succeeded" and summary.rows == 1500 and summary.bad_rows == 0
    assert summary.shards_total == summary.shards_committed >= 9  # 3 files x >= 3 shards
    entries = [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]
    assert sorted(e["shard"] for e in entries) == sorted({e["shard"] for e in entries})
    assert sum(e["rows"] for e in entries) == 1500
    assert all(e["model_sha256"] == summary.model_sha256 for e in entries)
    assert (out / "_SUCCESS").exists()
    runs = list((out / "_runs").glob("*.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["status"] == "succeeded"
    assert not (out / "_staging").exists()


def test_rerun_of_finished_job_recomputes_nothing(tmp_path, models):
    data = write_parquet_dataset(tmp_path / "in", files=2, rows=100)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"])
    batch_infer.run(spec)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = batch_infer.run(spec)
    assert again.shards_committed == 0 and again.shards_skipped == again.shards_total
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    assert read_output(out).num_rows == 200
    assert len(list((out / "_runs").glob("*.json"))) == 2


def test_single_file_and_glob(tmp_path, models):
    data = write_parquet_dataset(tmp_path / "in", files=3, rows=120)
    one = next((data / "part=0").glob("*.parquet"))
    out1 = tmp_path / "one"
    batch_infer.run(two_io_spec(one, out1, models["two_io"]))
    assert_matches_direct(models["two_io"], pq.read_table(one), read_output(out1))
    out2 = tmp_path / "glob"
    batch_infer.run(two_io_spec(f"{data}/part=0/*.parquet", out2, models["two_io"]))
    assert sorted(read_output(out2)["id"].to_pylist()) == list(range(0, 120)) + list(
        range(240, 360)
    )
    # a folder whose name holds glob characters is read as it is
    odd = tmp_path / "run[1]"
    shutil.copytree(data / "part=0", odd)
    out3 = tmp_path / "odd"
    batch_infer.run(two_io_spec(odd, out3, models["two_io"]))
    assert read_output(out3).num_rows == 240


def test_ipc_input(tmp_path, models):
    data = tmp_path / "in"
    data.mkdir()
    for i in range(2):
        with pa.ipc.new_file(data / f"f{i}.arrow", make_table(10, 0).schema) as w:
            w.write_table(make_table(300, start=i * 300, seed=i), max_chunksize=100)
    out = tmp_path / "out"
    summary = batch_infer.run(two_io_spec(data, out, models["two_io"], input={"format": "ipc"}))
    inputs = pa.concat_tables(pa.ipc.open_file(data / f"f{i}.arrow").read_all() for i in range(2))
    assert_matches_direct(models["two_io"], inputs, read_output(out))
    assert summary.shards_total == 2  # whole files


def test_csv_input_stacked_columns(tmp_path, models):
    data = tmp_path / "in"
    data.mkdir()
    for i in range(3):
        t = make_table(200, start=i * 200, seed=i).drop_columns(["seq"])
        pacsv.write_csv(t, data / f"f{i}.csv")
    out = tmp_path / "out"
    spec = {
        "name": "csv",
        "input": {"path": str(data), "format": "csv"},
        "model": {"onnx": models["linear"], "inputs": {"x": ["a", "b", "c"]}},
        "output": {"path": str(out), "keep_columns": ["id"]},
    }
    summary = batch_infer.run(spec)
    inputs = pa.concat_tables(pacsv.read_csv(data / f"f{i}.csv") for i in range(3)).sort_by("id")
    output = read_output(out).sort_by("id")
    assert output["id"].to_pylist() == list(range(600))
    x = np.column_stack([inputs[c].to_numpy().astype(np.float32) for c in "abc"])
    np.testing.assert_allclose(
        output["y"].to_numpy(), x @ np.array([1, 2, 3], np.float32), rtol=1e-5, atol=1e-6
    )
    assert summary.rows == 600


def test_fixed_size_list_and_binary_inputs(tmp_path, models):
    """The same pixels as fixed_size_list<uint8> and as raw bytes: same predictions."""
    src = ds.dataset(
        str(batch_infer_root() / "data" / "digits"), format="parquet", partitioning="hive"
    ).to_table()
    pixels = np.stack(src["pixels"].to_pylist()).astype(np.uint8)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 64)
    raw = pa.array([row.astype(np.float32).tobytes() for row in pixels], pa.binary())
    table = pa.table({"id": src["id"], "label": src["label"], "fixed": fixed, "raw": raw})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "digits.parquet", row_group_size=300)
    outs = {}
    for col in ("fixed", "raw"):
        out = tmp_path / col
        batch_infer.run(
            {
                "name": col,
                "input": {"path": str(tmp_path / "in")},
                "model": {"onnx": models["digits"], "inputs": {"pixels": col}},
                "output": {"path": str(out), "keep_columns": ["id", "label"]},
            }
        )
        outs[col] = read_output(out).sort_by("id")
    assert outs["fixed"]["predicted"].to_pylist() == outs["raw"]["predicted"].to_pylist()
    accuracy = np.mean(outs["fixed"]["predicted"].to_numpy() == outs["fixed"]["label"].to_numpy())
    assert accuracy > 0.95


def batch_infer_root():
    from tests.conftest import ROOT

    return ROOT


def test_without_keep_columns_every_row_still_lands_once(tmp_path, models):
    """No kept columns: the predictions (and a bad row's record) still hold every row."""
    data = tmp_path / "in"
    data.mkdir()
    table = make_table(300)
    seq = table.column("seq").to_pylist()
    seq[7] = None  # one bad row
    table = table.set_column(1, "seq", pa.array(seq, pa.list_(pa.float32())))
    pq.write_table(table, data / "f.parquet", row_group_size=100)
    spec = two_io_spec(data, tmp_path / "out", models["two_io"], max_bad_rows=1)
    spec["output"]["keep_columns"] = []
    summary = batch_infer.run(spec)
    assert summary.status == "succeeded" and summary.good_rows == 299 and summary.bad_rows == 1
    out = read_output(tmp_path / "out")
    assert out.num_rows == 299 and out.column_names == ["emb", "score"]
    errors = pq.read_table(tmp_path / "out" / "_errors")
    assert errors.num_rows == 1 and errors.column("_row").to_pylist() == [7]
