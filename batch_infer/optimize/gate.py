"""The accuracy gate: the optimized model against the original on held-out rows of the input.

Both run on the target backend where it runs here, else on ONNX Runtime on the CPU; a
TensorRT-targeted model then runs with ONNX Runtime's graph optimizations off, so its Q/DQ
nodes compute exactly what they say (quantize, dequantize, fp32 math) instead of going
through CPU int8 kernels that TensorRT would not use. Figures per output: relative L2 error,
largest absolute difference, cosine similarity, and for classifier outputs (and integer
outputs, such as an argmax) the share of rows whose top-1 class agrees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from batch_infer.backends.base import Backend, BackendOptions, Feeds
from batch_infer.errors import BackendError, UserError
from batch_infer.model import ModelSignature
from batch_infer.optimize.targets import Target, gpu_here, tensorrt_runs_here
from batch_infer.spec import GateSpec

_CLASSIFIER_NAMES = ("logit", "prob", "score", "class")
SPEED_SECONDS = 1.0  # at least this long per model when measuring speed


class GateFailed(UserError):
    """The optimized model's outputs differ from the original's beyond the gate: exit 2,
    nothing cached or used. `report` holds every figure."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


def classifier_outputs(path: str, signature: ModelSignature) -> set[str]:
    """Float [N, C>=2] outputs that look like class scores: fed to ArgMax/TopK, made by
    (Log)Softmax, or named like logits, probs or scores."""
    graph = onnx.load(path, load_external_data=False).graph
    producers = {out: n.op_type for n in graph.node for out in n.output}
    consumers: dict[str, set[str]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, set()).add(n.op_type)
    found = set()
    for t in signature.outputs:
        if t.dtype.kind != "f" or len(t.shape) != 2 or not (t.shape[1] > 1 or t.shape[1] < 0):
            continue
        if (
            consumers.get(t.name, set()) & {"ArgMax", "TopK"}
            or producers.get(t.name) in ("Softmax", "LogSoftmax")
            or any(word in t.name.lower() for word in _CLASSIFIER_NAMES)
        ):
            found.add(t.name)
    return found


def compare(ref: np.ndarray, got: np.ndarray, classifier: bool) -> dict[str, float]:
    """Figures for one output: integers by exact agreement per row, floats by error."""
    rows = len(ref)
    if ref.dtype.kind in "iub":
        same = (ref.reshape(rows, -1) == got.reshape(rows, -1)).all(axis=1)
        return {"agreement": float(same.mean())}
    r, g = ref.astype(np.float64).reshape(rows, -1), got.astype(np.float64).reshape(rows, -1)
    if not np.isfinite(g).all():
        return {"rel_l2": float("inf"), "max_abs": float("inf"), "cosine": float("nan"),
                **({"top1_agreement": 0.0} if classifier else {})}  # fmt: skip
    norm = np.linalg.norm(r)
    diff = np.linalg.norm(g - r)
    out = {
        "rel_l2": float(diff / norm) if norm > 0 else float(diff),
        "max_abs": float(np.abs(g - r).max()) if g.size else 0.0,
        "cosine": float((r * g).sum() / max(norm * np.linalg.norm(g), 1e-300)),
    }
    if classifier:
        out["top1_agreement"] = float((r.argmax(axis=1) == g.argmax(axis=1)).mean())
    return out


def failures(figures: dict[str, dict[str, float]], gate: GateSpec) -> list[str]:
    """What fails the gate, one phrase each; empty when it passes."""
    bad = []
    for name, f in figures.items():
        if "agreement" in f and f["agreement"] < gate.min_top1_agreement:
            bad.append(f"{name} agreement {f['agreement']:.4f} < {gate.min_top1_agreement}")
        if "rel_l2" in f and not f["rel_l2"] <= gate.max_rel_l2:
            bad.append(f"{name} relative L2 {f['rel_l2']:.4g} > {gate.max_rel_l2}")
        if "top1_agreement" in f and f["top1_agreement"] < gate.min_top1_agreement:
            bad.append(
                f"{name} top-1 agreement {f['top1_agreement']:.4f} < {gate.min_top1_agreement}"
            )
        if gate.max_abs is not None and "max_abs" in f and not f["max_abs"] <= gate.max_abs:
            bad.append(f"{name} max abs error {f['max_abs']:.4g} > {gate.max_abs}")
        if gate.min_cosine is not None and "cosine" in f and not f["cosine"] >= gate.min_cosine:
            bad.append(f"{name} cosine {f['cosine']:.6f} < {gate.min_cosine}")
    return bad


class _Emulated(Backend):
    """ONNX Runtime on the CPU with graph optimizations off: Q/DQ nodes run as written."""

    name = "onnxruntime-cpu, graph optimizations off (the model's Q/DQ and fp16 as written)"

    def __init__(self, signature: ModelSignature) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = os.cpu_count() or 1
        try:
            self._session = ort.InferenceSession(
                signature.path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot load {signature.path}: {exc}") from None
        self.inputs, self.outputs = signature.inputs, signature.outputs
        self._names = [t.name for t in signature.outputs]

    def run(self, batches: Any) -> Iterator[Feeds]:
        for feeds in self.checked(batches):
            yield dict(zip(self._names, self._session.run(self._names, feeds), strict=True))

    def warm_up(self, rows: int) -> None:
        """The gate runs a few batches once: nothing to warm ahead."""

    def busy_seconds(self) -> float:
        return 0.0

    def close(self) -> None:
        self._session = None


@dataclass(frozen=True)
class Runner:
    """Where the gate runs: a function loading a model there, and what it is called."""

    where: str
    load: Callable[[ModelSignature], Backend]
    measures_target: bool  # False: the target cannot run here, so no speed is measured


def runner(target: Target, options: BackendOptions) -> Runner:
    """The target backend when it can run here, else ONNX Runtime on the CPU."""
    from batch_infer.backends.onnxruntime_cpu import OnnxRuntimeCPU

    threads = os.cpu_count() or 1
    if target.name == "onnxruntime-cuda" and gpu_here():
        from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA, cuda_available

        if cuda_available():
            return Runner(target.name, lambda s: OnnxRuntimeCUDA(s, slots=1), True)
    if target.is_tensorrt and options.engine is not None and tensorrt_runs_here(target.name):
        from batch_infer.backends.tensorrt import TensorRTBackend

        pinned = BackendOptions(target.name, options.batch_size, 1, options.engine)
        return Runner(target.name, lambda s: TensorRTBackend(s, pinned, backend=target.name), True)
    if target.is_tensorrt:
        return Runner(_Emulated.name, _Emulated, False)
    cpu = f"onnxruntime-cpu ({threads} threads)"
    return Runner(cpu, lambda s: OnnxRuntimeCPU(s, threads=threads), target.name.endswith("cpu"))


def _batches(feeds: Feeds, size: int, fixed: int | None) -> Iterator[tuple[int, Feeds]]:
    rows = len(next(iter(feeds.values())))
    size = fixed or size
    for start in range(0, rows, size):
        part = {k: v[start : start + size] for k, v in feeds.items()}
        real = len(next(iter(part.values())))
        if fixed and real < fixed:
            part = {k: np.concatenate([v, np.zeros((fixed - real, *v.shape[1:]), v.dtype)])
                    for k, v in part.items()}  # fmt: skip
        yield real, part


def run_rows(backend: Backend, feeds: Feeds, size: int) -> dict[str, np.ndarray]:
    """Every row of `feeds` through `backend` in batches of `size` (or the model's fixed
    batch, padded), outputs concatenated."""
    fixed = backend.inputs[0].fixed_batch
    pieces = list(_batches(feeds, size, fixed))
    results = list(backend.run(part for _, part in pieces))
    return {
        t.name: np.concatenate([r[t.name][:real] for (real, _), r in zip(pieces, results,
                                                                          strict=True)])
        for t in backend.outputs
    }  # fmt: skip


def rows_per_second(backend: Backend, feeds: Feeds, size: int) -> float:
    """Rows per second through `backend` on one batch of `size` rows of `feeds` (the
    calibration batch), run again and again for at least SPEED_SECONDS after a warm-up."""
    batch = {k: v[:size] for k, v in feeds.items()}
    rows = len(next(iter(batch.values())))
    run_rows(backend, batch, size)  # warm up: first runs allocate and tune
    runs, start = 0, time.perf_counter()
    while True:
        run_rows(backend, batch, size)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= SPEED_SECONDS:
            return runs * rows / elapsed
