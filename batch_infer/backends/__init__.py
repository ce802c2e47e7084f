"""Choosing and loading a backend. Each backend lives in its own module behind `Backend`."""

from __future__ import annotations

from batch_infer.backends.base import Backend
from batch_infer.errors import BackendError
from batch_infer.model import ModelSignature

NAMES = ("onnxruntime", "tensorrt", "tensorrt-rtx")


def choose_backend(requested: str, gpus: int) -> tuple[str, str]:
    """The backend to run and why, given what the cluster has. Never falls back silently."""
    if requested == "auto":
        if gpus == 0:
            return "onnxruntime", "auto: the cluster has no GPU, so ONNX Runtime on the CPU"
        return "onnxruntime", "auto: ONNX Runtime"
    if requested in ("tensorrt", "tensorrt-rtx") and gpus == 0:
        raise BackendError(f"backend {requested!r} needs a GPU, and this Ray cluster has none")
    return requested, f"backend {requested!r} as the spec asks"


def load_backend(name: str, signature: ModelSignature, threads: int) -> Backend:
    """Load the model on this process's device; raise BackendError if the backend cannot run."""
    if name == "onnxruntime":
        from batch_infer.backends.onnxruntime_cpu import OnnxRuntimeCPU

        return OnnxRuntimeCPU(signature, threads=threads)
    raise BackendError(f"backend {name!r} is not available in this build")
