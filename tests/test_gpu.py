"""On a GPU (marked `gpu`): the job on ONNX Runtime CUDA gives the CPU run's predictions.

Run on the GPU machine: python -m pytest -m gpu tests/test_gpu.py
Tolerances (stated, measured values are printed): relative L2 error of the outputs against
ONNX Runtime on the CPU, 1e-3 for the digits MLP and 2e-2 for ResNet-50 and BERT-base in
fp32 (cuDNN/cuBLAS may use TF32 on Hopper); the predicted classes must agree.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import batch_infer
from tests.conftest import ROOT, read_output, run_records

cuda_streams = pytest.importorskip("batch_infer.backends.cuda_streams", reason="needs cuda-python")
device_count = cuda_streams.device_count
DIGITS = str(ROOT / "models" / "digits.onnx")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(device_count() == 0, reason="needs an NVIDIA GPU"),
    pytest.mark.usefixtures("ray_start_regular"),
]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _run_both(spec: dict, tmp_path) -> tuple[pa.Table, pa.Table, batch_infer.RunSummary]:
    gpu_spec = {**spec, "output": {**spec["output"], "path": str(tmp_path / "gpu")}}
    cpu_spec = {
        **spec,
        "device": "cpu",
        "output": {**spec["output"], "path": str(tmp_path / "cpu")},
    }
    summary = batch_infer.run(gpu_spec)
    assert "CUDA" in summary.backend, summary.backend
    batch_infer.run(cpu_spec)
    return (
        read_output(tmp_path / "gpu").sort_by("id"),
        read_output(tmp_path / "cpu").sort_by("id"),
        summary,
    )


def test_quickstart_on_cuda_matches_cpu(tmp_path):
    spec = batch_infer.resolve_spec(ROOT / "jobs" / "quickstart.yaml").model_dump()
    spec["batch_size"] = 100  # several batches in flight, a smaller last batch per shard
    gpu, cpu, summary = _run_both(spec, tmp_path)
    assert gpu.num_rows == cpu.num_rows == 1797
    err = _rel(
        np.stack(gpu["logits"].to_numpy(zero_copy_only=False)),
        np.stack(cpu["logits"].to_numpy(zero_copy_only=False)),
    )
    print(f"digits logits relative error {err:.2e}; backend {summary.backend}")
    assert err < 1e-3
    assert gpu["predicted"].to_pylist() == cpu["predicted"].to_pylist()


def _images(path, n: int) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    raw = pa.array([p.tobytes() for p in pixels], pa.binary())
    pq.write_table(pa.table({"id": np.arange(n), "pixels": raw}), path, row_group_size=128)


def test_resnet50_on_cuda_matches_cpu(tmp_path):
    from tests.gpu_models import export_resnet50

    model = export_resnet50(tmp_path / "resnet50.onnx")
    (tmp_path / "in").mkdir()
    _images(tmp_path / "in" / "images.parquet", 384)
    spec = {
        "name": "resnet",
        "input": {"path": str(tmp_path / "in")},
        "model": {"onnx": model, "inputs": {"pixels": "pixels"}},
        "batch_size": 64,
        "output": {"path": "", "keep_columns": ["id"]},
    }
    gpu, cpu, _ = _run_both(spec, tmp_path)
    a = np.stack(gpu["logits"].to_numpy(zero_copy_only=False))
    b = np.stack(cpu["logits"].to_numpy(zero_copy_only=False))
    err = _rel(a, b)
    agree = float(np.mean(a.argmax(1) == b.argmax(1)))
    print(f"resnet50 logits relative error {err:.2e}; top-1 agreement {agree:.4f}")
    assert err < 2e-2 and agree >= 0.99


def test_bert_on_cuda_matches_cpu(tmp_path):
    from tests.gpu_models import export_bert

    model = export_bert(tmp_path / "bert.onnx")
    rng = np.random.default_rng(0)
    n, seq = 256, 128
    ids = rng.integers(1000, 30000, (n, seq))
    lengths = rng.integers(8, seq, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table(
            {
                "id": np.arange(n),
                "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq),
                "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), seq),
            }
        ),
        tmp_path / "in" / "tokens.parquet",
        row_group_size=64,
    )
    spec = {
        "name": "bert",
        "input": {"path": str(tmp_path / "in")},
        "model": {"onnx": model, "inputs": {"ids": "ids", "mask": "mask"}},
        "batch_size": 32,
        "output": {"path": "", "keep_columns": ["id"]},
    }
    gpu, cpu, _ = _run_both(spec, tmp_path)
    err = _rel(
        np.stack(gpu["pooled"].to_numpy(zero_copy_only=False)),
        np.stack(cpu["pooled"].to_numpy(zero_copy_only=False)),
    )
    print(f"bert pooled relative error {err:.2e}")
    assert err < 2e-2


@pytest.mark.skipif(device_count() != 1, reason="one GPU: the run's own process drives it")
def test_local_run_on_one_gpu_needs_no_ray(tmp_path):
    """As a user runs it (`batch-infer run`, a process of its own): the run's own process
    drives the one GPU and Ray never starts; every row once, as the CPU run predicts them."""
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "batch_infer.cli", "run", "jobs/quickstart.yaml", "--set",
            f"output.path={out}", "--set", "batch_size=100", "--set", "device=gpu"]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "No registered plugin EP device" not in proc.stderr  # ONNX Runtime's noise
    (record,) = run_records(out)
    assert "CUDA" in record["backend"] and record["shards_committed"] == record["shards_total"]
    assert "ray_ready" not in record["timeline"], record["timeline"]
    assert [a["node"] for a in record["actor_stats"]] == ["driver"]
    spec = batch_infer.resolve_spec(ROOT / "jobs" / "quickstart.yaml").model_dump()
    cpu = {**spec, "device": "cpu", "output": {**spec["output"], "path": str(tmp_path / "cpu")}}
    batch_infer.run(cpu)
    gpu_rows, cpu_rows = (read_output(tmp_path / d).sort_by("id") for d in ("gpu", "cpu"))
    assert gpu_rows["id"].to_pylist() == cpu_rows["id"].to_pylist()  # every row once
    assert gpu_rows["predicted"].to_pylist() == cpu_rows["predicted"].to_pylist()


@pytest.mark.skipif(device_count() < 2, reason="needs two GPUs")
def test_two_gpus_two_actors_rows_split(tmp_path):
    spec = batch_infer.resolve_spec(ROOT / "jobs" / "quickstart.yaml").model_dump()
    spec["shard_rows"] = 100
    spec["output"]["path"] = str(tmp_path / "out")
    summary = batch_infer.run(spec)
    assert summary.actors == 2
    entries = [
        json.loads(p.read_text())
        for p in (tmp_path / "out" / "_manifest" / "shards").glob("*.json")
    ]
    gpus = {e["gpu"] for e in entries}
    print(f"shards per GPU: { {g: sum(e['gpu'] == g for e in entries) for g in gpus} }")
    assert len(gpus) == 2
    assert sum(e["rows"] for e in entries) == 1797
    out = ds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(out["id"].to_pylist()) == list(range(1797))


def _cpu_logits(pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(DIGITS, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": pixels})[0]


def test_slot_ring_backend_threads_errors_and_close():
    """ORT CUDA on the slot ring, directly: two threads share the slots and each gets its own
    outputs in order, the model's runs one after another on the device; a failing batch
    stream hands every slot back; close is idempotent."""
    import threading

    from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA
    from batch_infer.errors import BackendError
    from batch_infer.model import read_signature

    rng = np.random.default_rng(0)
    inputs = [[rng.integers(0, 17, (37, 64)).astype(np.float32) for _ in range(30)] for _ in "ab"]
    backend = OnnxRuntimeCUDA(read_signature(DIGITS), slots=3)
    ring = backend.ring
    results: dict[int, list] = {}

    def work(t: int) -> None:
        results[t] = [r["logits"] for r in backend.run({"pixels": p} for p in inputs[t])]

    workers = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    for t in range(2):
        got, want = np.concatenate(results[t]), _cpu_logits(np.concatenate(inputs[t]))
        assert _rel(got, want) < 1e-3
    assert backend.busy_seconds() > 0
    spans = sorted(ring._busy)  # the model's runs went one after another on the device
    assert len(spans) == 60
    assert all(b[0] >= a[1] - 1e-3 for a, b in itertools.pairwise(spans)), spans

    def failing():
        yield {"pixels": inputs[0][0]}
        yield {"pixels": inputs[0][1]}
        raise RuntimeError("the shard's reader broke")

    with pytest.raises(RuntimeError, match="reader broke"):
        list(backend.run(failing()))
    assert ring._free.qsize() == 3  # every slot is back
    with pytest.raises(BackendError, match="float64"):
        backend.infer({"pixels": inputs[0][0].astype(np.float64)})
    assert ring._free.qsize() == 3
    assert _rel(backend.infer({"pixels": inputs[1][0]})["logits"], _cpu_logits(inputs[1][0])) < 1e-3

    with backend.resident({"pixels": inputs[0][0]}) as batch:  # compute without copies
        batch.launch(5)
        batch.wait()
    assert ring._free.qsize() == 3
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="after close"):
        backend.infer({"pixels": inputs[0][0]})
