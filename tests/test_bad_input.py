"""Bad input: one clear error naming the file / column / key, and nothing wrong committed.

Spec, path and schema errors are found before Ray starts, so those tests need no cluster and
check that the output directory was not even created. Tests that run shards (backend, bad
rows, a file missing a column) use the module's real local Ray and come last in the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_matches_direct, make_table, read_output, run_records, two_io_spec
from onnx import TensorProto, helper

import batch_infer
from batch_infer.errors import (
    BackendError,
    BadRowsError,
    InputError,
    OutputError,
    SettingError,
    SpecError,
)
from batch_infer.planning import build_plan
from batch_infer.settings import KNOBS, check_settings, setting
from batch_infer.spec import parse_overrides, resolve_spec

ERROR_COLUMNS = ["_shard", "_file", "_row", "_reason"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """One flat Parquet file for the two_io model: id, seq[4], a, b, c, label."""
    d = tmp_path / "data"
    d.mkdir()
    pq.write_table(make_table(20), d / "f.parquet")
    return d


def _write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _make_int64_model(path: Path, width: int, dtype: int = TensorProto.INT64) -> str:
    """x int64[N,width] -> y int64[N,width] (Identity); `dtype` another integer type."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "int_identity",
        [helper.make_tensor_value_info("x", dtype, ["N", width])],
        [helper.make_tensor_value_info("y", dtype, ["N", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def _spec_with_model(data: Path, out: Path, model: str, **model_keys) -> dict:
    """two_io_spec with keys of its `model` section replaced (its `model` argument is the file)."""
    spec = two_io_spec(data, out, model)
    spec["model"] = {**spec["model"], **model_keys}
    return spec


def _part_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("part-*.parquet"))


def _assert_nothing_committed(out: Path) -> None:
    """No predictions, no error rows, no shard entries and no success marker."""
    assert _part_files(out) == []
    assert list(out.glob("_errors/part-*.parquet")) == []
    assert list(out.glob("_manifest/shards/*.json")) == []
    assert not (out / "_SUCCESS").exists()


def _runs(out: Path) -> list[dict]:
    docs = run_records(out)
    return sorted(docs, key=lambda d: d["started_at"])


def _entries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_manifest/shards").glob("*.json")]


def _errors_table(out: Path) -> pa.Table:
    return ds.dataset(str(out / "_errors"), format="parquet").to_table().sort_by("_row")


# --------------------------------------------------------------------------- 1. spec


def test_malformed_yaml_names_file_and_line(tmp_path: Path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: job\ninput:\n  path: data\n format: parquet\n")
    with pytest.raises(SpecError) as err:
        resolve_spec(spec)
    msg = str(err.value)
    assert msg.startswith(f"{spec}: malformed YAML at line 4, column 2")
    assert "\n" not in msg


def test_a_spec_not_in_utf8_names_file_and_line(tmp_path: Path):
    spec = tmp_path / "job.yaml"
    spec.write_bytes("name: job\nmodel: café.onnx\n".encode("latin-1"))
    with pytest.raises(SpecError) as err:
        resolve_spec(spec)
    assert str(err.value) == f"{spec}: not UTF-8 text (byte 0xe9 at line 2); save it as UTF-8"


def test_files_that_disagree_on_a_columns_type_are_one_line(tmp_path: Path, models):
    """A partition key that one file also holds as a column of another type: pyarrow cannot
    merge the schemas (ArrowTypeError), which is one line naming the input."""
    d = tmp_path / "in"
    for k, table in (
        ("1", make_table(10).append_column("k", pa.array(["a"] * 10))),
        ("2", make_table(10)),
    ):
        (d / f"k={k}").mkdir(parents=True)
        pq.write_table(table, d / f"k={k}" / "f.parquet")
    with pytest.raises(InputError) as err:
        batch_infer.run(two_io_spec(d, tmp_path / "out", models["two_io"]))
    assert str(err.value).startswith(f"input.path: {d}: cannot read the input as parquet: ")
    assert "Unable to merge: Field k has incompatible types" in str(err.value)


def test_unknown_key_names_dotted_key(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"])
    spec["model"]["input"] = spec["model"].pop("inputs")  # a typo
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    lines = str(err.value).splitlines()
    assert "spec: key 'model.input': unknown key" in lines
    assert "spec: key 'model.inputs': required key is missing" in lines
    assert not out.exists()
    # the same spec from YAML names the file
    path = _write_spec(tmp_path / "typo.yaml", spec)
    with pytest.raises(SpecError, match=r"typo\.yaml: key 'model\.input': unknown key"):
        resolve_spec(path)


def test_missing_required_key(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"])
    del spec["output"]["path"]
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    assert str(err.value) == "spec: key 'output.path': required key is missing"
    assert not out.exists()


def test_wrong_type_names_key(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    path = _write_spec(
        tmp_path / "job.yaml", two_io_spec(data, out, models["two_io"], batch_size="big")
    )
    with pytest.raises(SpecError) as err:
        batch_infer.run(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: key 'batch_size': ")
    assert "valid integer" in msg
    assert not out.exists()


def test_unknown_backend_lists_backends(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    with pytest.raises(SpecError) as err:
        batch_infer.run(two_io_spec(data, out, models["two_io"], backend="cuda"))
    msg = str(err.value)
    assert msg.startswith("spec: key 'backend': ")
    for name in ("'auto'", "'onnxruntime'", "'tensorrt'", "'tensorrt-rtx'"):
        assert name in msg
    assert not out.exists()


@pytest.mark.parametrize("pair", ["batch_size", "=5", ""])
def test_set_without_key_or_equals_is_refused(pair: str):
    with pytest.raises(SpecError) as err:
        parse_overrides(["batch_size=4", pair])
    assert str(err.value) == f"--set {pair!r}: expected key.sub=value"


def test_set_value_that_is_not_yaml_is_refused():
    with pytest.raises(SpecError, match=r"--set 'output\.keep_columns=\[id': .*not valid YAML"):
        parse_overrides(["output.keep_columns=[id"])


def test_set_through_a_scalar_is_refused(tmp_path: Path, data: Path, models):
    path = _write_spec(tmp_path / "job.yaml", two_io_spec(data, tmp_path / "out", models["two_io"]))
    with pytest.raises(SpecError, match=r"^--set name\.x: 'name' is not a mapping$"):
        resolve_spec(path, parse_overrides(["name.x=1"]))


def test_set_overrides_nested_keys(tmp_path: Path, data: Path, models):
    spec = two_io_spec(data, tmp_path / "out", models["two_io"])
    path = _write_spec(tmp_path / "job.yaml", spec)
    overrides = parse_overrides(
        [
            "batch_size=7",
            "output.keep_columns=[id]",
            "output.row_group_rows=10",
            "model.inputs.feat=[c, b, a]",
            "model.outputs.score=s",
        ]
    )
    assert overrides["batch_size"] == 7
    job = resolve_spec(path, overrides)
    assert job.batch_size == 7
    assert job.output.keep_columns == ["id"]
    assert job.output.row_group_rows == 10
    assert job.output.path == str(tmp_path / "out")  # a sibling key is untouched
    assert job.model.inputs == {"seq": "seq", "feat": ["c", "b", "a"]}
    assert job.model.outputs == {"score": "s"}
    # and an override is validated like the file
    with pytest.raises(SpecError, match=r"key 'output\.row_group_rows': .*greater than or equal"):
        resolve_spec(path, parse_overrides(["output.row_group_rows=0"]))


def test_overrides_do_not_change_the_callers_spec(tmp_path: Path, models):
    spec = two_io_spec(tmp_path / "no-such-input", tmp_path / "out", models["two_io"])
    with pytest.raises(InputError):
        batch_infer.run(spec, overrides={"output.path": str(tmp_path / "elsewhere")})
    assert spec["output"]["path"] == str(tmp_path / "out")


# --------------------------------------------------------------------------- 2. paths


def test_input_path_does_not_exist(tmp_path: Path, models):
    missing = tmp_path / "no" / "such" / "dir"
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        batch_infer.run(two_io_spec(missing, out, models["two_io"]))
    assert str(err.value) == f"input.path: {missing}: no such file or directory"
    assert not out.exists()


def test_directory_without_parquet_files(tmp_path: Path, models):
    d = tmp_path / "data"
    d.mkdir()
    (d / "rows.csv").write_text("id\n1\n")
    (d / "README.txt").write_text("not data")
    (d / "_hidden.parquet").write_bytes(b"ignored: underscored files are not input")
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        batch_infer.run(two_io_spec(d, out, models["two_io"]))
    assert str(err.value) == f"input.path: {d}: no parquet files found"
    assert not out.exists()


def test_model_file_missing(tmp_path: Path, data: Path):
    model = tmp_path / "models" / "gone.onnx"
    out = tmp_path / "out"
    with pytest.raises(SpecError) as err:
        batch_infer.run(two_io_spec(data, out, str(model)))
    assert str(err.value) == f"model.onnx: {model}: no such file"
    assert not out.exists()


def test_corrupt_model_file(tmp_path: Path, data: Path):
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(np.random.default_rng(0).bytes(256))
    out = tmp_path / "out"
    with pytest.raises(SpecError) as err:
        batch_infer.run(two_io_spec(data, out, str(model)))
    assert str(err.value).startswith(f"model.onnx: {model}: not a readable ONNX model")
    assert not out.exists()


def test_empty_model_file_and_a_folder_named_as_the_model(tmp_path: Path, data: Path):
    """The model file is mapped to be read: an empty one (which cannot be mapped) and a
    folder still get one line each."""
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    for model, says in ((empty, "the graph has no inputs or no outputs"),
                        (folder, "cannot be read")):  # fmt: skip
        out = tmp_path / f"out-{model.stem}"
        with pytest.raises(SpecError) as err:
            batch_infer.run(two_io_spec(data, out, str(model)))
        assert str(err.value).startswith(f"model.onnx: {model}: {says}"), str(err.value)
        assert not out.exists()


def test_corrupt_parquet_file(tmp_path: Path, models):
    d = tmp_path / "data"
    d.mkdir()
    bad = d / "garbage.parquet"
    bad.write_bytes(np.random.default_rng(1).bytes(1000))
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        batch_infer.run(two_io_spec(d, out, models["two_io"]))
    msg = str(err.value)
    assert msg.startswith(f"input.path: {d}: cannot read the input as parquet")
    assert str(bad) in msg
    assert not out.exists()


def test_corrupt_parquet_file_after_a_good_one(tmp_path: Path, data: Path, models):
    """The schema comes from the first file; the corrupt second one fails shard planning."""
    bad = data / "g.parquet"  # sorts after f.parquet
    bad.write_bytes(b"PAR1" + np.random.default_rng(2).bytes(500))
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        batch_infer.run(two_io_spec(data, out, models["two_io"]))
    assert str(err.value).startswith(f"{bad}: not a readable Parquet file")
    _assert_nothing_committed(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_parquet_file(tmp_path: Path, data: Path, models):
    f = data / "f.parquet"
    f.chmod(0)
    out = tmp_path / "out"
    try:
        with pytest.raises(InputError) as err:
            batch_infer.run(two_io_spec(data, out, models["two_io"]))
    finally:
        f.chmod(0o644)
    assert str(f) in str(err.value)
    assert not out.exists()


# --------------------------------------------------------------------------- 3. model vs schema


def test_model_input_mapped_to_missing_column(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    spec = _spec_with_model(
        data, out, models["two_io"], inputs={"seq": "sequence", "feat": ["a", "b", "c"]}
    )
    with pytest.raises(InputError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        "model.inputs.seq: column 'sequence' (for model input 'seq') is not in the input; "
        "columns are: id, seq, a, b, c, label"
    )
    assert not out.exists()


def test_model_input_not_mapped(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    spec = _spec_with_model(data, out, models["two_io"], inputs={"seq": "seq"})
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    assert str(err.value) == "model.inputs: model input 'feat' is not mapped to a column"
    assert not out.exists()


def test_mapping_a_name_that_is_not_a_model_input(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    inputs = {"seq": "seq", "feat": ["a", "b", "c"], "extra": "id"}
    with pytest.raises(SpecError) as err:
        batch_infer.run(_spec_with_model(data, out, models["two_io"], inputs=inputs))
    assert str(err.value) == (
        f"model.inputs: 'extra' is not an input of {models['two_io']}; its inputs are: seq, feat"
    )
    assert not out.exists()


def test_unknown_model_output(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    spec = _spec_with_model(data, out, models["two_io"], outputs={"logits": "p"})
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        f"model.outputs: 'logits' is not an output of {models['two_io']}; "
        "its outputs are: emb, score"
    )
    assert not out.exists()


def test_keep_column_missing(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], output={"keep_columns": ["id", "nope"]})
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        "output.keep_columns: column 'nope' is not in the input; "
        "columns are: id, seq, a, b, c, label"
    )
    assert not out.exists()


def test_fixed_size_list_of_wrong_size(tmp_path: Path, models):
    d = tmp_path / "data"
    d.mkdir()
    t = make_table(10)
    seq5 = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(50, dtype=np.float32)), 5)
    pq.write_table(t.set_column(t.schema.get_field_index("seq"), "seq", seq5), d / "f.parquet")
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        batch_infer.run(two_io_spec(d, out, models["two_io"]))
    assert str(err.value) == (
        "model.inputs.seq: column 'seq' holds 5 values per row; "
        "model input 'seq' takes float32 of shape [?, 4] needs 4"
    )
    assert not out.exists()


def test_float_column_for_int64_model_input(tmp_path: Path, data: Path):
    model = _make_int64_model(tmp_path / "int64.onnx", width=3)
    out = tmp_path / "out"
    spec = {
        "name": "ints",
        "input": {"path": str(data)},
        "model": {"onnx": model, "inputs": {"x": ["id", "b", "a"]}},  # a is float64
        "output": {"path": str(out)},
    }
    with pytest.raises(InputError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        "model.inputs.x: column 'a' (double) for model input 'x' takes int64 of shape [?, 3]: "
        "double would be truncated to int64; cast the column or the model input"
    )
    assert not out.exists()
    # integer columns (int64, int32) for the same input are accepted
    spec["model"]["inputs"] = {"x": ["id", "b", "id"]}
    plan = build_plan(resolve_spec(spec))
    assert [b.columns for b in plan.bindings] == [("id", "b", "id")]


def test_stacked_column_count_mismatch(tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    spec = _spec_with_model(data, out, models["two_io"], inputs={"seq": "seq", "feat": ["a", "b"]})
    with pytest.raises(InputError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        "model.inputs.feat: 2 stacked columns cannot fill model input "
        "'feat' takes float32 of shape [?, 3]"
    )
    assert not out.exists()


@pytest.mark.parametrize("where", ["out", "."])
def test_output_inside_input_directory(tmp_path: Path, data: Path, models, where: str):
    out = (data / where).resolve()
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(SpecError) as err:
        batch_infer.run(two_io_spec(data, out, models["two_io"]))
    assert str(err.value) == f"output.path: {out} is inside the input directory {data}"
    assert sorted(p.name for p in data.iterdir()) == before


def test_output_is_a_foreign_nonempty_directory(tmp_path: Path, data: Path, models):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as err:
        batch_infer.run(two_io_spec(data, out, models["two_io"]), overwrite=True)
    assert str(err.value) == (
        f"output.path: {out} is not empty and holds no batch-infer output; "
        "choose another path or empty it"
    )
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite did not delete it
    assert not (out / "_manifest").exists()
    _assert_nothing_committed(out)


def test_refused_foreign_directory_is_left_untouched(tmp_path: Path, data: Path, models):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        batch_infer.run(two_io_spec(data, out, models["two_io"]))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["notes.txt"]


def test_output_path_is_a_file(tmp_path: Path, data: Path, models):
    out = tmp_path / "results.parquet"
    out.write_bytes(b"someone's file")
    with pytest.raises(OutputError, match=r"^output\.path: ") as err:
        batch_infer.run(two_io_spec(data, out, models["two_io"]))
    assert str(out) in str(err.value)
    assert out.read_bytes() == b"someone's file"


# --------------------------------------------------------------------------- 7. CLI


def _cli(
    args: list[str], cwd: Path, columns: int | None = 500, **extra: str
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | extra
    if columns is not None:
        env["COLUMNS"] = str(columns)  # a wide console: rich does not wrap the message
    return subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", "run", *args, "-q"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_malformed_spec(tmp_path: Path):
    (tmp_path / "job.yaml").write_text("name: job\ninput:\n  path: data\n format: parquet\n")
    proc = _cli(["job.yaml"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == (
        "error: job.yaml: malformed YAML at line 4, column 2: "
        "expected <block end>, but found '<block mapping start>'"
    )


def test_cli_bad_set_and_unknown_key(tmp_path: Path, data: Path, models):
    _write_spec(tmp_path / "job.yaml", two_io_spec(data, tmp_path / "out", models["two_io"]))
    proc = _cli(["job.yaml", "--set", "model.input.seq=seq"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: job.yaml: key 'model.input': unknown key" in proc.stderr
    proc = _cli(["job.yaml", "--set", "batch_size"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --set 'batch_size': expected key.sub=value"
    assert not (tmp_path / "out").exists()


def test_cli_missing_input_path(tmp_path: Path, models):
    missing = tmp_path / "nowhere"
    out = tmp_path / "out"
    _write_spec(tmp_path / "job.yaml", two_io_spec(missing, out, models["two_io"]))
    proc = _cli(["job.yaml"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == f"error: input.path: {missing}: no such file or directory"
    assert not out.exists()


def test_cli_error_is_one_line_on_a_pipe(tmp_path: Path, models):
    missing = tmp_path / "a-rather-long-directory-name-for-the-input-data" / "2024-01-01"
    _write_spec(tmp_path / "job.yaml", two_io_spec(missing, tmp_path / "out", models["two_io"]))
    proc = _cli(["job.yaml"], tmp_path, columns=None)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: input.path: {missing}: no such file or directory"


def test_cli_error_keeps_brackets_in_file_names(tmp_path: Path):
    (tmp_path / "job[v2].yaml").write_text("name: [job\n")
    proc = _cli(["job[v2].yaml"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "job[v2].yaml: malformed YAML at line 2" in proc.stderr


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BATCH_INFER_STALL_NOTICE_SECONDS", "abc", "a number >= 0.1"),
        ("BATCH_INFER_STALL_NOTICE_SECONDS", "nan", "a number >= 0.1"),
        ("BATCH_INFER_DECODE_PROCESSES", "two", "a whole number >= 0"),
        ("BATCH_INFER_DECODE_PROCESSES", "-1", "a whole number >= 0"),
        ("BATCH_INFER_GPU_DECODERS", "1.5", "a whole number >= 1"),
        ("BATCH_INFER_NVIMGCODEC_THREADS", "0", "a whole number >= 1"),
    ],
)
def test_cli_bad_setting_is_one_line_before_anything_is_written(
    tmp_path: Path, data: Path, models, name: str, value: str, expected: str
):
    """A knob set wrong stopped the CLI with a traceback at import (the stall notice), failed
    every shard after four tries (decode processes), or fell back to the CPU decoder."""
    out = tmp_path / "out"
    _write_spec(tmp_path / "job.yaml", two_io_spec(data, out, models["two_io"]))
    proc = _cli(["job.yaml"], tmp_path, **{name: value})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == f"error: {_knob_line(name, value, expected)}"
    assert not out.exists()


def _knob_line(name: str, value: str, expected: str) -> str:
    return (
        f"environment variable {name}={value!r}: expected {expected} "
        f"({KNOBS[name].means}), or unset for the default"
    )


def test_settings_read_as_their_kind_with_defaults(monkeypatch):
    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)
    assert setting("BATCH_INFER_STALL_NOTICE_SECONDS") == 60.0
    assert setting("BATCH_INFER_GPU_DECODERS") == 3
    assert setting("BATCH_INFER_DECODE_PROCESSES") is None  # the code chooses
    monkeypatch.setenv("BATCH_INFER_STALL_NOTICE_SECONDS", " 2.5 ")
    monkeypatch.setenv("BATCH_INFER_DECODE_PROCESSES", "0")
    monkeypatch.setenv("BATCH_INFER_GPU_DECODERS", "")  # set but empty: the default
    assert setting("BATCH_INFER_STALL_NOTICE_SECONDS") == 2.5
    assert setting("BATCH_INFER_DECODE_PROCESSES") == 0
    assert setting("BATCH_INFER_GPU_DECODERS") == 3
    check_settings()


def test_run_from_python_checks_settings_first(tmp_path: Path, data: Path, models, monkeypatch):
    monkeypatch.setenv("BATCH_INFER_DECODE_PROCESSES", "many")
    out = tmp_path / "out"
    with pytest.raises(SettingError, match=r"^environment variable BATCH_INFER_DECODE_PROCESSES="):
        batch_infer.run(two_io_spec(data, out, models["two_io"]))
    assert not out.exists()


# --------------------------------------------------------------------------- 4-6. with Ray


def test_tensorrt_backend_without_gpu(ray_start_regular, tmp_path: Path, data: Path, models):
    out = tmp_path / "out"
    with pytest.raises(BackendError) as err:
        batch_infer.run(two_io_spec(data, out, models["two_io"], backend="tensorrt"))
    msg = str(err.value)
    assert msg.startswith("backend 'tensorrt' needs a GPU, and ")
    assert "\n" not in msg
    _assert_nothing_committed(out)
    (summary,) = _runs(out)
    assert summary["status"] == "failed"
    assert summary["errors"] == [f"BackendError: {err.value}"]
    assert not (out / "_LOCK.json").exists()


def _bad_rows_table() -> tuple[pa.Table, dict[int, str]]:
    """40 rows; row 5 has a null seq, row 17 a seq of 3 values, row 30 a null `a`."""
    t = make_table(40)
    seq = t.column("seq").to_pylist()
    seq[5] = None
    seq[17] = seq[17][:3]
    a = t.column("a").to_pylist()
    a[30] = None
    t = t.set_column(t.schema.get_field_index("seq"), "seq", pa.array(seq, pa.list_(pa.float32())))
    t = t.set_column(t.schema.get_field_index("a"), "a", pa.array(a, pa.float64()))
    reasons = {
        5: "seq: null or holds nulls",
        17: "seq: does not have 4 values (input 'seq' (from seq))",
        30: "a: null",
    }
    return t, reasons


def test_bad_rows_go_to_errors_and_fail_the_run(ray_start_regular, tmp_path: Path, models):
    d = tmp_path / "data"
    d.mkdir()
    table, reasons = _bad_rows_table()
    pq.write_table(table, d / "bad.parquet", row_group_size=10)
    out = tmp_path / "out"
    spec = two_io_spec(d, out, models["two_io"], shard_rows=10, num_actors=1, batch_size=4)

    with pytest.raises(BadRowsError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        f"3 row(s) could not be converted (max_bad_rows is 0); they are in {out / '_errors'}"
    )
    assert not (out / "_SUCCESS").exists()

    # every shard is committed and kept: 4 shards, good rows predicted once each
    entries = _entries(out)
    assert len(entries) == 4
    assert sum(e["rows"] for e in entries) == 40
    assert sum(e["bad_rows"] for e in entries) == 3
    predictions = read_output(out)
    good_ids = [i for i in range(40) if i not in reasons]
    assert sorted(predictions.column("id").to_pylist()) == good_ids
    assert_matches_direct(models["two_io"], table.take(good_ids), predictions)

    # bad rows: keep_columns, shard, file, row index, reason; one file per affected shard
    assert len(list((out / "_errors").glob("part-*.parquet"))) == 3
    errors = _errors_table(out)
    assert errors.column_names == ["id", "label", *ERROR_COLUMNS]
    assert errors.column("id").to_pylist() == sorted(reasons)
    assert errors.column("_row").to_pylist() == sorted(reasons)
    assert errors.column("label").to_pylist() == [f"row-{i}" for i in sorted(reasons)]
    assert errors.column("_file").to_pylist() == ["bad.parquet"] * 3
    assert errors.column("_reason").to_pylist() == [reasons[i] for i in sorted(reasons)]
    by_shard = {e["shard"]: e for e in entries}
    for shard, row in zip(errors.column("_shard").to_pylist(), sorted(reasons), strict=True):
        assert by_shard[shard]["row_start"] <= row < by_shard[shard]["row_stop"]
        assert f"_errors/part-{shard}.parquet" in by_shard[shard]["files"]

    (summary,) = _runs(out)
    assert summary["status"] == "failed"
    assert (summary["rows"], summary["good_rows"], summary["bad_rows"]) == (40, 37, 3)
    assert summary["shards_committed"] == 4
    assert summary["errors"] == [str(err.value)]

    # allowing them: the rerun succeeds without recomputing anything
    parts = {p.name: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}
    summary2 = batch_infer.run(spec, overrides={"max_bad_rows": 5})
    assert summary2.status == "succeeded"
    assert summary2.shards_committed == 0
    assert summary2.shards_skipped == 4
    assert (summary2.rows, summary2.good_rows, summary2.bad_rows) == (40, 37, 3)
    assert (out / "_SUCCESS").exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")} == parts
    assert [r["status"] for r in _runs(out)] == ["failed", "succeeded"]
    assert sorted(read_output(out).column("id").to_pylist()) == good_ids


def test_csv_non_numeric_cell_is_a_bad_row(ray_start_regular, tmp_path: Path, models):
    d = tmp_path / "csv"
    d.mkdir()
    (d / "data.csv").write_text(
        "id,a,b,c\n0,0.5,1,2\n1,1.5,abc,3\n2,-1,4,0.25\n3,2, 7 ,1\n4,3,1e1,-2\n"
    )
    out = tmp_path / "out"
    spec = {
        "name": "csv-bad",
        "input": {"path": str(d), "format": "csv"},
        "model": {"onnx": models["linear"], "inputs": {"x": ["a", "b", "c"]}},
        "output": {"path": str(out), "keep_columns": ["id"]},
        "num_actors": 1,
        "max_bad_rows": 1,
    }
    summary = batch_infer.run(spec)
    assert summary.status == "succeeded"
    assert (summary.rows, summary.good_rows, summary.bad_rows) == (5, 4, 1)
    assert (out / "_SUCCESS").exists()
    predictions = read_output(out).sort_by("id")
    assert predictions.column("id").to_pylist() == [0, 2, 3, 4]
    # linear: y = 1*a + 2*b + 3*c
    np.testing.assert_allclose(predictions.column("y").to_numpy(), [8.5, 7.75, 19.0, 17.0])
    errors = _errors_table(out)
    assert errors.column_names == ["id", *ERROR_COLUMNS]
    assert errors.column("id").to_pylist() == [1]
    assert errors.column("_row").to_pylist() == [1]
    assert errors.column("_file").to_pylist() == ["data.csv"]
    assert errors.column("_reason").to_pylist() == ["b: is not a number"]


@pytest.fixture(scope="module")
def int64_csv_run(ray_start_regular, tmp_path_factory) -> tuple[pa.Table, pa.Table]:
    """A CSV text column (one dirty cell makes it text) feeding an int64 model input."""
    root = tmp_path_factory.mktemp("int64_csv")
    d = root / "csv"
    d.mkdir()
    (d / "data.csv").write_text("id,v\n0,1\n1,2.5\n2,1e30\n3,4\n4,abc\n")
    out = root / "out"
    spec = {
        "name": "int64-csv",
        "input": {"path": str(d), "format": "csv"},
        "model": {"onnx": _make_int64_model(root / "int64.onnx", width=1), "inputs": {"x": "v"}},
        "output": {"path": str(out), "keep_columns": ["id"]},
        "num_actors": 1,
        "max_bad_rows": 5,
    }
    summary = batch_infer.run(spec)
    assert summary.status == "succeeded"
    assert summary.rows == 5
    return read_output(out).sort_by("id"), _errors_table(out)


def _check_row_is_bad(run: tuple[pa.Table, pa.Table], row: int) -> None:
    predictions, errors = run
    assert 4 in errors.column("id").to_pylist()  # 'abc' is always a bad row
    assert row not in predictions.column("id").to_pylist(), dict(
        zip(predictions.column("id").to_pylist(), predictions.column("y").to_pylist(), strict=True)
    )
    assert row in errors.column("id").to_pylist()


def test_csv_text_out_of_int64_range_is_a_bad_row(int64_csv_run):
    _check_row_is_bad(int64_csv_run, 2)


def test_csv_text_with_a_fraction_for_int64_is_a_bad_row(int64_csv_run):
    _check_row_is_bad(int64_csv_run, 1)


@pytest.mark.parametrize(
    ("dtype", "limit"), [(TensorProto.INT32, 2**31), (TensorProto.INT64, 2**63)]
)
def test_csv_integers_past_the_inputs_range_are_bad_rows_never_wrapped(tmp_path, dtype, limit):
    """Text that is an integer but does not fit the model's integer type (also just past
    int64's limits, where float64 cannot tell), beside text that is no integer: each a bad
    row with its reason, the rest predicted exactly (no value wrapped around)."""
    d = tmp_path / "csv"
    d.mkdir()
    cells = ["1", "x", str(limit), str(-limit - 1), str(limit - 1), str(-limit), "-7"]
    (d / "data.csv").write_text("id,v\n" + "".join(f"{i},{c}\n" for i, c in enumerate(cells)))
    out = tmp_path / "out"
    spec = {
        "name": "int-range",
        "input": {"path": str(d), "format": "csv"},
        "model": {"onnx": _make_int64_model(tmp_path / "m.onnx", 1, dtype), "inputs": {"x": "v"}},
        "output": {"path": str(out), "keep_columns": ["id"]},
        "max_bad_rows": 5,
    }
    assert batch_infer.run(spec).status == "succeeded"
    predictions = read_output(out).sort_by("id")
    assert predictions.column("id").to_pylist() == [0, 4, 5, 6]
    assert predictions.column("y").to_pylist() == [1, limit - 1, -limit, -7]
    errors = _errors_table(out).sort_by("id")
    name = "int32" if dtype == TensorProto.INT32 else "int64"
    assert errors.column("_reason").to_pylist() == [
        "v: is not an integer",
        f"v: has a value outside the range of {name}",
        f"v: has a value outside the range of {name}",
    ]


def test_with_a_dynamic_row_length_a_bad_first_row_does_not_set_it(tmp_path: Path):
    """x float[N, M]: the first row that fits sets M for the shard; an empty first row is
    one bad row, not the measure that makes every other row bad."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "dynamic.onnx")
    d = tmp_path / "in"
    d.mkdir()
    rows = [[], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0, 7.0]]
    pq.write_table(pa.table({"id": range(4), "v": rows}), d / "f.parquet")
    out = tmp_path / "out"
    spec = {
        "name": "dynamic",
        "input": {"path": str(d)},
        "model": {"onnx": str(tmp_path / "dynamic.onnx"), "inputs": {"x": "v"}},
        "output": {"path": str(out), "keep_columns": ["id"]},
        "max_bad_rows": 2,
    }
    assert batch_infer.run(spec).status == "succeeded"
    predictions = read_output(out).sort_by("id")
    assert predictions.to_pylist() == [{"id": 1, "y": [1.0, 2.0]}, {"id": 2, "y": [3.0, 4.0]}]
    errors = _errors_table(out).sort_by("id")
    assert errors.column("id").to_pylist() == [0, 3]
    assert set(errors.column("_reason").to_pylist()) == {
        "v: does not have 2 values (input 'x' (from v))"
    }


def test_a_later_file_that_does_not_fit_is_refused_before_any_work(tmp_path: Path, models):
    """Every Parquet footer is read while planning: a later file without a model column, with
    a kept column of another kind, or with floats where the first held integers for an
    integer input (they would be truncated) is one line before anything is written."""
    first = make_table(30)
    later_id = pa.array([f"z{i}" for i in range(30)])
    cases = {
        "missing": (
            make_table(30, start=30, seed=1).drop_columns(["c"]),
            "column 'c' (for model input 'feat') is not in the input",
        ),
        "kept": (
            make_table(30, start=30, seed=1).set_column(0, "id", later_id),
            "column 'id' (output.keep_columns) is string here and int64 in the input's first",
        ),
    }
    for name, (later_table, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        pq.write_table(first, d / "f0.parquet", row_group_size=10)
        later = d / "f1.parquet"
        pq.write_table(later_table, later, row_group_size=10)
        out = tmp_path / f"out-{name}"
        spec = two_io_spec(d, out, models["two_io"], shard_rows=10, num_actors=1)
        with pytest.raises(InputError) as err:
            batch_infer.run(spec)
        assert str(err.value).startswith(f"input file {later}: {message}"), str(err.value)
        assert not out.exists()  # nothing written: not even the output's folder
    d = tmp_path / "ints"
    d.mkdir()
    pq.write_table(pa.table({"id": [0, 1], "v": [1, 2]}), d / "f0.parquet")
    pq.write_table(pa.table({"id": [2, 3], "v": [1.7, 2.9]}), d / "f1.parquet")
    spec = {
        "name": "ints",
        "input": {"path": str(d)},
        "model": {"onnx": _make_int64_model(tmp_path / "int64.onnx", 1), "inputs": {"x": "v"}},
        "output": {"path": str(tmp_path / "out-ints")},
    }
    with pytest.raises(InputError) as err:
        batch_infer.run(spec)
    assert str(err.value).startswith(f"input file {d / 'f1.parquet'}: column 'v' (double) ")
    assert str(err.value).endswith(
        "double would be truncated to int64; cast the column or the model input"
    )
