"""Choosing and loading a backend. Each backend lives in its own module behind `Backend`.

The driver only refuses what the cluster as a whole cannot do; the choice itself is made
in each actor, on its own node, where the installed libraries and the GPU can be seen.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

from batch_infer.backends.base import GPU_CONCURRENCY, Backend, BackendOptions
from batch_infer.errors import BackendError
from batch_infer.model import ModelSignature

log = logging.getLogger("batch_infer")

# Compute capabilities TensorRT-RTX runs on (it does not run on Hopper, 9.0).
RTX_CAPABILITIES = {(8, 0), (8, 6), (8, 9)}


def check_request(requested: str, device: str, gpus: int) -> str:
    """'gpu' or 'cpu' for the actors; refuse what this cluster cannot run."""
    if device == "gpu" and gpus == 0:
        raise BackendError("device: gpu, but this Ray cluster has no GPU")
    use_gpu = gpus > 0 and device != "cpu"
    if requested in ("tensorrt", "tensorrt-rtx") and not use_gpu:
        why = "device: cpu was asked for" if gpus else "this Ray cluster has no GPU"
        raise BackendError(f"backend {requested!r} needs a GPU, and {why}")
    return "gpu" if use_gpu else "cpu"


def actor_concurrency(device: str) -> int:
    """Threads an inference actor runs with: what its backends declare (`Backend.concurrency`)."""
    return GPU_CONCURRENCY if device == "gpu" else Backend.concurrency


def ray_initialized() -> bool:
    """Whether this process has joined a Ray (`ray.init`). Ray may be half imported: a run
    imports it on a thread of its own while other threads work, and a half-imported Ray has
    not been initialized (nor has a Ray this process never imported)."""
    initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
    return bool(initialized and initialized())


def local_gpus() -> int:
    """GPUs this process sees (0 without cuda-python)."""
    if not _has("cuda.bindings"):
        return 0
    from batch_infer.backends.cuda_streams import device_count

    return device_count()


def local_device(requested: str, device: str) -> str | None:
    """What this machine can run the job's backend on ('gpu' or 'cpu'), or None: what a
    local run's own process drives (`job._Lane`)."""
    if device != "cpu" and local_gpus() > 0:
        return "gpu"
    if device == "gpu" or requested in ("tensorrt", "tensorrt-rtx"):
        return None
    return "cpu"


def prepare_local(requested: str, device: str) -> str | None:
    """`local_device`, and on a GPU the CUDA context and ONNX Runtime's import started for
    the lane that will load the model: a local run does this beside its planning."""
    here = local_device(requested, device)
    if here == "gpu":
        from batch_infer.backends.cuda_streams import start_context

        start_context(0)
    if here is not None and requested in ("auto", "onnxruntime") and _has("onnxruntime"):
        import onnxruntime  # noqa: F401  (its import is most of a session's start)
    return here


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose package is missing
        return False


def _rtx_runs_here(capability: tuple[int, int]) -> bool:
    return capability in RTX_CAPABILITIES or capability[0] == 12


def resolve(options: BackendOptions, device: str, gpu: int = 0) -> tuple[str, str]:
    """(backend, why) for this process; `auto` prefers TensorRT, then TensorRT-RTX, then ORT."""
    if device == "cpu":
        return "onnxruntime", "ONNX Runtime on the CPU: no GPU for this actor"
    if options.requested != "auto":
        return options.requested, f"{options.requested} as the spec asks"
    from batch_infer.backends.cuda_streams import compute_capability
    from batch_infer.backends.onnxruntime_cuda import cuda_available

    cc = compute_capability(gpu)
    skipped = []
    if options.engine is None:
        skipped.append(f"TensorRT skipped: {options.engine_problem}")
    elif _has("tensorrt"):
        return "tensorrt", "auto: TensorRT is installed and a GPU is present"
    else:
        skipped.append("TensorRT is not installed")
    precision = options.engine.precision if options.engine else None
    if options.engine is not None and _has("tensorrt_rtx_bindings"):
        if not _rtx_runs_here(cc):
            skipped.append(f"TensorRT-RTX does not run on compute capability {cc[0]}.{cc[1]}")
        elif precision not in (None, "fp32"):
            skipped.append(f"TensorRT-RTX is strongly typed and precision {precision} is set")
        else:
            return "tensorrt-rtx", f"auto: TensorRT-RTX runs on compute capability {cc[0]}.{cc[1]}"
    why = ", ".join(skipped)
    if cuda_available():
        return "onnxruntime", f"auto: ONNX Runtime CUDA ({why})"
    return "onnxruntime-cpu", f"auto: ONNX Runtime on the CPU ({why}, no onnxruntime-gpu)"


def load_backend(
    signature: ModelSignature, options: BackendOptions, *, device: str, threads: int, gpu: int = 0
) -> tuple[Backend, str]:
    """Load the model on this process's device; BackendError if the backend cannot run.

    `gpu` is the CUDA device: an actor's own GPU is device 0 (Ray sets CUDA_VISIBLE_DEVICES
    to it); the driver's lane names the one it drives."""
    name, why = resolve(options, device, gpu)
    log.info("backend: %s", why)
    if name in ("tensorrt", "tensorrt-rtx"):
        from batch_infer.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(signature, options, backend=name, device=gpu), why
    if name == "onnxruntime" and device == "gpu":
        if not _has("onnxruntime"):
            raise BackendError("ONNX Runtime is not installed here: pip install 'batch-infer[gpu]'")
        from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA

        return OnnxRuntimeCUDA(signature, slots=options.slots, device=gpu), why
    if name in ("onnxruntime", "onnxruntime-cpu"):
        if not _has("onnxruntime"):
            raise BackendError(
                "ONNX Runtime is not installed here: pip install 'batch-infer[cpu]' (or "
                "'batch-infer[gpu]' on NVIDIA GPUs); a plain install is the client only"
            )
        from batch_infer.backends.onnxruntime_cpu import OnnxRuntimeCPU

        return OnnxRuntimeCPU(signature, threads=threads), why
    raise BackendError(f"unknown backend {name!r}")
