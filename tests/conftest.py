"""Shared fixtures: a real local Ray, real ONNX models, real Parquet/CSV/IPC files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster on loopback only
# Ray's own switch for picking the loopback address for local nodes: every test cluster (and
# every driver a test starts as a subprocess, which inherits this) listens on 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the tests' Ray down at the end of the session."""
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_start_regular(_ray_session):
    """A local Ray with 2 CPUs (after Ray's own fixture of that name), shared by the tests
    that use it: starting one takes seconds. A module that needs another Ray (test_cluster)
    shuts this one down; the next module that asks for it starts it again."""
    if not ray.is_initialized():  # a Ray of the test's own, never one already running here
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


def _save(model: onnx.ModelProto, path: Path) -> str:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def make_two_io_model(path: Path) -> str:
    """seq float[N,4] (a list column) and feat float[N,3] (stacked scalars) ->
    emb float[N,2] and score float[N,1]."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "w")
    v = numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "v")
    nodes = [
        helper.make_node("MatMul", ["seq", "w"], ["a"]),
        helper.make_node("MatMul", ["feat", "v"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["emb"]),
        helper.make_node("ReduceSum", ["emb"], ["score"], keepdims=1, axes=[1]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_io",
        [
            helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 3]),
        ],
        [
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
        ],
        [w, v],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)


def make_linear_model(path: Path, width: int = 3) -> str:
    """x float[N,width] (stacked scalar columns) -> y float[N,1]."""
    w = numpy_helper.from_array(np.arange(1, width + 1, dtype=np.float32).reshape(width, 1), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [w],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("models")
    return {
        "two_io": make_two_io_model(d / "two_io.onnx"),
        "linear": make_linear_model(d / "linear.onnx"),
        "digits": str(ROOT / "models" / "digits.onnx"),
    }


def make_table(n: int, start: int = 0, seed: int = 0) -> pa.Table:
    """Rows for the two_io model: id, seq list<float>[4], a/b/c scalars, label."""
    rng = np.random.default_rng(seed)
    seq = rng.standard_normal((n, 4)).astype(np.float32)
    return pa.table(
        {
            "id": np.arange(start, start + n, dtype=np.int64),
            "seq": pa.array(list(seq), pa.list_(pa.float32())),
            "a": rng.standard_normal(n),
            "b": rng.integers(-5, 5, n).astype(np.int32),
            "c": rng.standard_normal(n).astype(np.float32),
            "label": pa.array([f"row-{i}" for i in range(start, start + n)]),
        }
    )


def write_parquet_dataset(root: Path, files: int = 3, rows: int = 500, row_group: int = 64) -> Path:
    """Hive-partitioned (part=...) Parquet, several files, several row groups each."""
    for i in range(files):
        d = root / f"part={i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            make_table(rows, start=i * rows, seed=i), d / f"f{i}.parquet", row_group_size=row_group
        )
    return root


def two_io_spec(input_path: Path | str, out_path: Path | str, model: str, **extra: Any) -> dict:
    spec = {
        "name": "two-io",
        "input": {"path": str(input_path), "format": "parquet"},
        "model": {"onnx": model, "inputs": {"seq": "seq", "feat": ["a", "b", "c"]}},
        "batch_size": 50,
        "output": {"path": str(out_path), "keep_columns": ["id", "label"]},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def run_records(out: Path) -> list[dict[str, Any]]:
    """The `_runs/<run>.json` records of an output folder."""
    return [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]


def read_output(path: Path | str) -> pa.Table:
    """The predictions as a user would read them (underscored folders are skipped)."""
    return ds.dataset(str(path), format="parquet").to_table()


def direct_two_io(model: str, table: pa.Table) -> dict[str, np.ndarray]:
    """The same model run directly with onnxruntime on the same rows."""
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    seq = np.stack(table.column("seq").to_pylist()).astype(np.float32)
    feat = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in "abc"])
    emb, score = sess.run(["emb", "score"], {"seq": seq, "feat": feat})
    return {"emb": emb, "score": score[:, 0]}


def assert_matches_direct(model: str, inputs: pa.Table, output: pa.Table) -> None:
    """Exactly one output row per input row, by id, equal to a direct onnxruntime run."""
    out = output.sort_by("id")
    inp = inputs.sort_by("id")
    assert out.column("id").to_pylist() == inp.column("id").to_pylist()
    ref = direct_two_io(model, inp)
    emb = np.stack(out.column("emb").to_pylist())
    np.testing.assert_allclose(emb, ref["emb"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.column("score").to_numpy(), ref["score"], rtol=1e-5, atol=1e-5)
    assert out.column("label").to_pylist() == inp.column("label").to_pylist()
