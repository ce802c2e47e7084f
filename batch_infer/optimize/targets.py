"""Which backend an optimized model is made for: the recipe depends on it.

An int8 model for ONNX Runtime on the CPU (unsigned activations, 7-bit weights where the CPU
lacks VNNI) is slow and can saturate on TensorRT's terms, and TensorRT's (signed symmetric)
is slow and can saturate on a CPU without VNNI: one model per target. The target is resolved
once, in planning, and the job's backend is pinned to it.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from batch_infer.backends import resolve
from batch_infer.backends.base import BackendOptions
from batch_infer.errors import SpecError
from batch_infer.spec import JobSpec

TARGETS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "tensorrt-rtx")
# The CPU features that give int8 dot products without 16-bit saturation (VNNI, AMX).
_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Target:
    """An optimization target: the job backend it pins, and the CPU features that matter."""

    name: str  # one of TARGETS
    why: str  # how it was chosen, for the report
    int8_dot: str | None = None  # onnxruntime-cpu: the VNNI/AMX flag this CPU has, if any

    @property
    def backend(self) -> str:
        """The job's `backend` for this target (ONNX Runtime on CPU or CUDA is one backend)."""
        return "onnxruntime" if self.name.startswith("onnxruntime") else self.name

    @property
    def is_tensorrt(self) -> bool:
        return self.name in ("tensorrt", "tensorrt-rtx")

    def key(self) -> str:
        """The target as it enters the cache key: the CPU's int8 instructions included, since
        the onnxruntime-cpu recipe depends on them."""
        if self.name != "onnxruntime-cpu":
            return self.name
        return f"{self.name}/{platform.machine()}/{self.int8_dot or 'no-vnni'}"


@cache
def int8_dot_flag() -> str | None:
    """The CPU feature that gives int8 dot products without 16-bit saturation (VNNI; every
    CPU with AMX has it too), as NumPy's CPUID probe sees it: the CPU this process runs on.
    Where NumPy cannot say, /proc/cpuinfo; None where neither can, so the recipe stays on
    the safe side (reduce_range)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x keeps it under numpy.core
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            features = None
    if features is not None:
        found = {"AVX512VNNI": "avx512_vnni", "AVXVNNI": "avx_vnni"}
        return next((flag for key, flag in found.items() if features.get(key)), None)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return next((f for f in _INT8_DOT_FLAGS if f in flags), None)


def gpu_here() -> bool:
    """Whether this machine has an NVIDIA GPU that cuda-python can see."""
    try:
        from batch_infer.backends.cuda_streams import device_count

        return device_count() > 0
    except Exception:  # no cuda-python bindings, no driver: no GPU here
        return False


def tensorrt_runs_here(backend: str) -> bool:
    """Whether `backend` (tensorrt, tensorrt-rtx) can run engines on this machine's GPU."""
    if not gpu_here():
        return False
    if backend == "tensorrt":
        return importlib.util.find_spec("tensorrt") is not None
    from batch_infer.backends import RTX_CAPABILITIES
    from batch_infer.backends.cuda_streams import compute_capability

    cc = compute_capability(0)
    found = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
    return found and (cc in RTX_CAPABILITIES or cc[0] == 12)


def resolve_target(spec: JobSpec, options: BackendOptions) -> Target:
    """The target for `spec`: `model.optimize.target` when set, else the backend the job would
    use: its `backend` and `device`, and for `auto` what this machine's GPU (if any) runs,
    by the rule the actors follow (`backends.resolve`, given the planned `options`)."""
    assert spec.model.optimize is not None
    asked = spec.model.optimize.target
    if asked != "auto":
        name, why = asked, "model.optimize.target"
        if spec.backend not in ("auto", Target(name, "").backend):
            raise SpecError(
                f"model.optimize.target: {name} does not run on backend {spec.backend!r}; set "
                f"backend to auto or {Target(name, '').backend}"
            )
    elif spec.backend in ("tensorrt", "tensorrt-rtx"):
        name, why = spec.backend, f"backend {spec.backend}"
    elif spec.device == "cpu":
        name, why = "onnxruntime-cpu", "device cpu"
    elif gpu_here():
        backend, why = resolve(options, "gpu")
        name = {"onnxruntime": "onnxruntime-cuda"}.get(backend, backend)
    elif spec.device != "gpu":
        name, why = "onnxruntime-cpu", "no GPU here"
    elif spec.backend == "onnxruntime":
        name, why = "onnxruntime-cuda", "backend onnxruntime, device gpu"
    else:
        raise SpecError(
            "model.optimize: backend auto with device gpu, and this machine has no GPU to tell "
            "which backend the GPUs will run; set model.optimize.target (or backend)"
        )
    return Target(name, why, int8_dot_flag() if name == "onnxruntime-cpu" else None)
