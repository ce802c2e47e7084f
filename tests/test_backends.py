"""Backends exercised directly, without Ray: the lifecycle contract every backend keeps.

ONNX Runtime on the CPU here; the GPU backends and the slot ring have the same checks in
tests/test_gpu.py (run on the GPU machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from batch_infer.backends import actor_concurrency, load_backend, resolve
from batch_infer.backends.base import GPU_CONCURRENCY, BackendOptions
from batch_infer.backends.onnxruntime_cpu import OnnxRuntimeCPU
from batch_infer.errors import BackendError
from batch_infer.model import read_signature
from tests.conftest import ROOT

DIGITS = str(ROOT / "models" / "digits.onnx")


@pytest.fixture
def signature():
    return read_signature(DIGITS)


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 64)).astype(np.float32)


def _direct(pixels: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(DIGITS, providers=["CPUExecutionProvider"])
    logits, predicted = session.run(["logits", "predicted"], {"pixels": pixels})
    return {"logits": logits, "predicted": predicted}


def test_run_yields_every_batch_in_order(signature):
    batches = [{"pixels": _pixels(n, seed)} for seed, n in enumerate((7, 64, 1, 33))]
    with OnnxRuntimeCPU(signature) as backend:
        results = list(backend.run(iter(batches)))
    assert len(results) == len(batches)
    for feeds, got in zip(batches, results, strict=True):
        want = _direct(feeds["pixels"])
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-6)
        assert got["predicted"].tolist() == want["predicted"].tolist()


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({}, r"inputs \[\]; the model takes \['pixels'\]"),
        ({"pixels": _pixels(2), "extra": _pixels(2)}, "the model takes"),
        ({"pixels": _pixels(2).astype(np.float64)}, "'pixels' is float64; the model takes float32"),
        ({"pixels": _pixels(2)[:, :63]}, r"shape \[2, 63\]; the model takes \['N', 64\]"),
        ({"pixels": _pixels(2).reshape(2, 8, 8)}, r"shape \[2, 8, 8\]"),
    ],
)
def test_wrong_feeds_are_one_clear_error(signature, feeds, message):
    with OnnxRuntimeCPU(signature) as backend, pytest.raises(BackendError, match=message):
        backend.infer(feeds)


def test_close_twice_run_after_close_and_close_after_an_error(signature):
    backend = OnnxRuntimeCPU(signature)
    with pytest.raises(BackendError):
        backend.infer({"pixels": _pixels(2).astype(np.int32)})
    backend.infer({"pixels": _pixels(2)})  # an error leaves the backend usable
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="run after close"):
        backend.infer({"pixels": _pixels(2)})


def test_threads_up_to_the_declared_concurrency_get_their_own_results(signature):
    """The actor runs `concurrency` shards at once; each thread gets its own outputs."""
    threads = max(2, OnnxRuntimeCPU.concurrency)
    inputs = [[{"pixels": _pixels(16, 10 * t + i)} for i in range(20)] for t in range(threads)]
    results: dict[int, list] = {}
    with OnnxRuntimeCPU(signature) as backend:

        def work(t: int) -> None:
            results[t] = list(backend.run(inputs[t]))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
    for t in range(threads):
        got = np.concatenate([r["logits"] for r in results[t]])
        want = _direct(np.concatenate([f["pixels"] for f in inputs[t]]))["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_concurrency_is_declared_by_the_backends():
    assert actor_concurrency("cpu") == OnnxRuntimeCPU.concurrency == 1
    assert actor_concurrency("gpu") == GPU_CONCURRENCY == 2


def test_cpu_actor_resolves_to_onnxruntime_on_the_cpu(signature):
    name, why = resolve(BackendOptions(requested="auto"), "cpu")
    assert name == "onnxruntime" and "CPU" in why
    backend, _ = load_backend(signature, BackendOptions(), device="cpu", threads=1)
    with backend:
        assert isinstance(backend, OnnxRuntimeCPU)
        assert "CPU (1 thread(s))" in backend.describe()


def test_signature_says_whether_the_model_convolves_in_fp16(tmp_path):
    """ONNX Runtime CUDA gives models that convolve in fp16 NHWC convolutions (faster on
    tensor cores, same outputs: docs/gpu.md); other models keep their layout."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    scenes = ROOT / "models" / "scenes.onnx"
    half = tmp_path / "scenes-fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(scenes)), keep_io_types=True), str(half))
    assert not read_signature(DIGITS).half_convolutions  # no convolutions
    assert not read_signature(str(scenes)).half_convolutions  # fp32 convolutions
    assert read_signature(str(half)).half_convolutions


_SIGNATURE = """
import importlib.util, json, sys
if sys.argv[2] == "fallback":  # onnx's generated file cannot be loaded alone here
    def refuse(*args, **kwargs):
        raise ImportError("no loader")
    importlib.util.spec_from_file_location = refuse
from batch_infer.model import read_signature
s = read_signature(sys.argv[1])
tensors = [[t.name, str(t.dtype), list(t.shape)] for t in s.inputs + s.outputs]
print(json.dumps({"imported_onnx": "onnx" in sys.modules, "half": s.half_convolutions,
                  "tensors": tensors}))
"""


@pytest.mark.parametrize("how", ["alone", "fallback"])
def test_signature_read_without_onnx_and_through_it_agree(tmp_path, how):
    """The signature is read with onnx's generated classes alone (no `import onnx`: 0.55 s
    of every run's start with ml_dtypes 0.7); where that file cannot be loaded, through
    `import onnx`. Both give what onnx itself reads, in a fresh process each."""
    import json
    import subprocess
    import sys

    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = tmp_path / "scenes-fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(ROOT / "models" / "scenes.onnx"))), half)
    for path, is_half in ((DIGITS, False), (str(half), True)):
        done = subprocess.run([sys.executable, "-c", _SIGNATURE, path, how], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert got["imported_onnx"] == (how == "fallback")
        assert got["half"] == is_half
        graph = onnx.load(path).graph
        want = [[v.name, str(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                 [d.dim_value or -1 for d in v.type.tensor_type.shape.dim]]
                for v in [*graph.input, *graph.output]]  # fmt: skip
        assert got["tensors"] == want


@pytest.mark.parametrize("given", [None, "4"])
def test_import_gives_cuda_32_hardware_queues_unless_the_user_chose(given):
    """CUDA reads it when a process makes its context: set on import, a user's value kept."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if given:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = given
    code = "import os, batch_infer; print(os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True).stdout  # fmt: skip
    assert out.strip() == (given or "32")
