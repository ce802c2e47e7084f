"""TensorRT (10 and 11) and TensorRT-RTX: plan, build and cache engines (the runtime is in
`tensorrt.py`), after Polygraphy's loaders: each step a small function of the one before.

Both share one code path through the binding module object (`tensorrt` or
`tensorrt_rtx_bindings`), whose builder and runtime APIs are the same. The differences:
- TensorRT-RTX networks are strongly typed (precision comes from the ONNX: there are no
  FP16/INT8 builder flags) and engines target a compute capability chosen at build time,
  so they can be built ahead on a machine without a GPU; it has no timing cache.
- TensorRT builds for the GPU it runs on and reuses a timing cache kept beside the engines.

`plan_recipe` (pure, run in planning before any work) turns the spec into an `EngineRecipe`:
profiles, precision, target. `ensure_engine` turns a recipe into an engine from the node's
cache, or builds one (`build_engine`) under the cache's lock.

Data-dependent output shapes (NonZero, NMS, ...) are refused at build time, on the network:
an output with a -1 dimension whose producers include a layer whose output size depends on
values (NON_ZERO, NMS) is data dependent. This is conservative (such an output is refused
even if the -1 is only the batch dimension); the runtime checks the engine again.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from batch_infer.backends.base import BackendOptions
from batch_infer.backends.engine_cache import (
    CachedEngine,
    EngineKey,
    cache_dir_path,
    get_or_build,
    write_atomic,
)
from batch_infer.errors import BackendError, SpecError
from batch_infer.model import ModelSignature, TensorInfo

log = logging.getLogger("batch_infer")

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)
ProfileOverrides = Mapping[str, Mapping[str, Sequence[int]]]  # input -> {min, opt, max}

# backend -> (binding module, what to install)
_BINDINGS = {
    "tensorrt": ("tensorrt", "pip install tensorrt-cu12 (or tensorrt-cu13), version 10.x or 11.x"),
    "tensorrt-rtx": (
        "tensorrt_rtx_bindings",
        "pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116",
    ),
}
PRECISIONS = ("fp32", "fp16", "int8")
_DATA_DEPENDENT_LAYERS = ("NON_ZERO", "NMS")


def load_bindings(backend: str) -> ModuleType:
    """The binding module for `backend`; BackendError naming what to install if it is missing."""
    if backend not in _BINDINGS:
        raise BackendError(f"{backend!r} is not a TensorRT backend ({list(_BINDINGS)})")
    module, install = _BINDINGS[backend]
    try:
        trt = importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(
            f"backend {backend!r} needs the Python module {module!r}, which cannot be imported "
            f"here ({exc}). Install it: {install}"
        ) from None
    if module == "tensorrt" and int(trt.__version__.split(".")[0]) < 10:
        raise BackendError(f"backend 'tensorrt' needs TensorRT 10 or 11, found {trt.__version__}")
    return trt


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__.startswith("tensorrt_rtx")


def product(trt: ModuleType) -> str:
    return f"{'TensorRT-RTX' if is_rtx(trt) else 'TensorRT'} {trt.__version__}"


def make_logger(trt: ModuleType, verbose: Callable[[str], None] | None = None) -> Any:
    """An ILogger that keeps errors (build and parse failures are only reported there);
    `verbose` is given every info and verbose message (a DETAILED build's layer table)."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.debug("%s: %s", product(trt), msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s: %s", product(trt), msg)
            elif verbose is not None:
                verbose(msg)

        def take_errors(self) -> str:
            text, self.errors = "; ".join(self.errors) or "no error was logged", []
            return text

    return Logger()


# -- planning: profiles, precision, compute capability ------------------------------------


def _as_shape(value: Any, what: str, rank: int) -> Shape:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != rank:
        raise SpecError(f"{what}: expected a list of {rank} integers, got {value!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise SpecError(f"{what}: dimensions must be integers >= 0, got {list(value)}")
    return tuple(value)


def _override(t: TensorInfo, given: Mapping[str, Sequence[int]], batch_size: int) -> tuple:
    where = f"tensorrt.profile.{t.name}"
    if not isinstance(given, Mapping) or set(given) != {"min", "opt", "max"}:
        raise SpecError(f"{where}: give exactly min, opt and max shapes, got {given!r}")
    lo, opt, hi = (_as_shape(given[k], f"{where}.{k}", len(t.shape)) for k in ("min", "opt", "max"))
    for axis, model_dim in enumerate(t.shape):
        if model_dim >= 0 and not lo[axis] == opt[axis] == hi[axis] == model_dim:
            raise SpecError(f"{where}: dimension {axis} is fixed at {model_dim} in the model")
        if not lo[axis] <= opt[axis] <= hi[axis]:
            raise SpecError(f"{where}: dimension {axis} needs min <= opt <= max")
    if t.shape[0] < 0 and hi[0] < batch_size:
        raise SpecError(f"{where}: max batch {hi[0]} is below batch_size {batch_size}")
    return lo, opt, hi


def plan_profile(
    inputs: Sequence[TensorInfo], batch_size: int, overrides: ProfileOverrides | None = None
) -> Profile:
    """Min/opt/max per input: batch 1..batch_size (opt batch_size) unless the spec overrides.

    Dynamic dimensions other than the batch have no sensible default, so they must be given.
    """
    overrides = overrides or {}
    names = [t.name for t in inputs]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise SpecError(f"tensorrt.profile: {unknown} are not model inputs (inputs: {names})")
    profile: Profile = {}
    for t in inputs:
        if t.name in overrides:
            profile[t.name] = _override(t, overrides[t.name], batch_size)
            continue
        free = [axis for axis, d in enumerate(t.shape) if d < 0 and axis > 0]
        if free:
            raise SpecError(
                f"tensorrt.profile: input {t.name!r} has shape {list(t.shape)} with dynamic "
                f"dimension(s) {free} besides the batch; give tensorrt.profile.{t.name} "
                f"with min, opt and max shapes"
            )
        batches = (1, batch_size, batch_size) if t.shape[0] < 0 else (t.shape[0],) * 3
        lo, opt, hi = ((b, *t.shape[1:]) for b in batches)
        profile[t.name] = (lo, opt, hi)
    return profile


def precision_flags(trt: ModuleType, precision: str | None, network: Any = None) -> list[Any]:
    """Builder flags for `precision`. fp32 (or None) needs none; int8 sets only the flag, so
    the ONNX must carry Q/DQ nodes (no calibration). Strongly typed builds have no flags to
    set: asking for fp16/int8 there is an error, not a silent no-op."""
    if precision in (None, "fp32"):
        return []
    if precision not in PRECISIONS:
        raise SpecError(f"tensorrt.precision: {precision!r} is not one of {list(PRECISIONS)}")
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if (
        flag is None
        or is_rtx(trt)
        or (network is not None and strong is not None and network.get_flag(strong))
    ):
        raise BackendError(strongly_typed(product(trt), precision))
    return [flag]


def strongly_typed(product_name: str, precision: str) -> str:
    how = "with Q/DQ nodes" if precision == "int8" else "with ONNX Runtime's fp16 converter"
    return (
        f"{product_name} is strongly typed: precision comes from the ONNX, so precision "
        f"{precision} cannot be applied as a builder flag. Convert the model to {precision} "
        f"({how}) and leave tensorrt.precision unset (or fp32)."
    )


def parse_capability(value: str | Sequence[int]) -> tuple[int, int]:
    """'8.9' or (8, 9) -> (8, 9)."""
    try:
        major, minor = (int(p) for p in (value.split(".") if isinstance(value, str) else value))
    except (ValueError, TypeError):
        raise SpecError(
            f"tensorrt.compute_capability: expected 'major.minor' such as \"8.9\", got {value!r}"
        ) from None
    return major, minor


def _gpu_capability(device: int = 0) -> tuple[int, int] | None:
    """This machine's GPU, or None without one (or without cuda-python)."""
    try:
        from batch_infer.backends.cuda_streams import CudaError, compute_capability, device_count
    except ImportError:
        return None
    try:
        return compute_capability(device) if device_count() > device else None
    except CudaError:
        return None


def target_capability(
    trt: ModuleType, requested: str | Sequence[int] | None, device: int = 0
) -> tuple[int, int]:
    """The compute capability to build for: the requested one (TensorRT-RTX can build for any
    GPU it supports, even without one), else this machine's GPU."""
    gpu = _gpu_capability(device)
    want = parse_capability(requested) if requested is not None else gpu
    if want is None:
        raise BackendError(
            f"{product(trt)}: no GPU here to build for; set tensorrt.compute_capability "
            f'(for example "8.9") to build a TensorRT-RTX engine ahead'
        )
    if is_rtx(trt):
        supported = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
        if f"SM{want[0]}{want[1]}" not in supported:
            have = ", ".join(f"{m[2:-1]}.{m[-1]}" for m in supported)
            raise BackendError(
                f"{product(trt)} cannot build for compute capability {want[0]}.{want[1]} "
                f"(it supports {have})"
            )
    elif want != gpu:
        here = f"{gpu[0]}.{gpu[1]}" if gpu else "none"
        raise BackendError(
            f"{product(trt)} builds engines for the GPU it runs on (here: {here}); build for "
            f"compute capability {want[0]}.{want[1]} on such a GPU"
        )
    return want


# -- build -------------------------------------------------------------------------------


def _parse_error(err: Any) -> str:
    code = f"{err.code().name}: {err.desc()}"
    if err.node() < 0:
        return code
    return f"node {err.node()} {err.node_name()!r} (operator {err.node_operator()}): {code}"


def data_dependent_outputs(trt: ModuleType, network: Any) -> dict[str, str]:
    """Output name -> the layer whose values decide its shape (the build-time rule above)."""
    kinds = {getattr(trt.LayerType, k) for k in _DATA_DEPENDENT_LAYERS if hasattr(trt.LayerType, k)}
    producer: dict[str, Any] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    found: dict[str, str] = {}
    for k in range(network.num_outputs):
        out = network.get_output(k)
        if all(d >= 0 for d in out.shape):
            continue
        todo, seen = [out.name], {out.name}
        while todo and out.name not in found:
            layer = producer.get(todo.pop())  # None: a network input
            if layer is None:
                continue
            if layer.type in kinds:
                found[out.name] = layer.name
            for j in range(layer.num_inputs):
                tensor = layer.get_input(j)  # None for an unused optional input
                if tensor is not None and tensor.name not in seen:
                    seen.add(tensor.name)
                    todo.append(tensor.name)
    return found


def refuse_data_dependent(trt: ModuleType, network: Any) -> None:
    found = data_dependent_outputs(trt, network)
    if found:
        which = ", ".join(f"{out!r} (from layer {layer!r})" for out, layer in found.items())
        raise BackendError(
            f"{product(trt)}: output(s) {which} have data-dependent shapes, known only after "
            f"the model runs; batch-infer sizes output buffers before the launch and does not "
            f"support such models (use backend onnxruntime)"
        )


def _timing_cache(trt: ModuleType, config: Any, path: Path | None) -> Any:
    """Load (or start) the persisted timing cache; full TensorRT only (a no-op in RTX)."""
    if path is None or is_rtx(trt):
        return None
    data = path.read_bytes() if path.exists() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a damaged file: the cache only saves time, so start afresh
        cache = None
    if cache is None and data:
        log.warning("timing cache %s is unusable; starting a new one", path)
        cache = config.create_timing_cache(b"")
    if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU; not using it", path)
        return None
    return cache


def build_engine(
    onnx_model: str | os.PathLike[str] | bytes,
    *,
    backend: str,
    profile: Profile,
    slots: int = 1,
    precision: str | None = None,
    compute_capability: tuple[int, int] | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    sparse_weights: bool = False,
    verbose: Callable[[str], None] | None = None,
) -> bytes:
    """Build a serialized engine with `slots` copies of `profile` (one per execution context).

    `compute_capability` is TensorRT-RTX's target (None: this machine's GPU); full TensorRT
    always builds for the GPU it runs on. `timing_cache` is a file, read and rewritten (last
    writer wins), full TensorRT only. `sparse_weights` lets TensorRT use 2:4 sparse kernels
    for weights that follow the pattern. `verbose` gets the builder's info and verbose
    messages from a DETAILED profiling-verbosity build (its per-layer table among them).
    """
    trt = load_bindings(backend)
    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in 10+
    parser = trt.OnnxParser(network, logger)
    where = "ONNX bytes" if isinstance(onnx_model, bytes) else str(onnx_model)
    ok = (
        parser.parse(onnx_model)
        if isinstance(onnx_model, bytes)
        else parser.parse_from_file(str(onnx_model))
    )  # from a file: external weights load
    if not ok:
        errors = "; ".join(_parse_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{where}: {product(trt)} cannot parse the model: {errors}")
    refuse_data_dependent(trt, network)

    config = builder.create_builder_config()
    for flag in precision_flags(trt, precision, network):
        config.set_flag(flag)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if verbose is not None:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if is_rtx(trt):
        config.num_compute_capabilities = 1  # the count first, then the entry
        target = (
            trt.ComputeCapability.CURRENT
            if compute_capability is None
            else getattr(trt.ComputeCapability, "SM{}{}".format(*compute_capability))
        )
        if not config.set_compute_capability(target, 0):
            raise BackendError(
                f"{product(trt)}: cannot target compute capability "
                f"{compute_capability or 'of this GPU'}: {logger.take_errors()}"
            )

    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(profile):
        raise BackendError(
            f"{where}: the profile covers {sorted(profile)} but the network's "
            f"inputs are {sorted(network_inputs)}"
        )
    for _ in range(slots):
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            p.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise BackendError(
                f"{where}: invalid optimization profile {profile}: {logger.take_errors()}"
            )

    path = Path(timing_cache) if timing_cache is not None else None
    cache = _timing_cache(trt, config, path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{where}: {product(trt)} engine build failed: {logger.take_errors()}")
    if cache is not None and path is not None:
        write_atomic(path, bytes(cache.serialize()))
    return bytes(serialized)


@dataclass(frozen=True)
class EngineRecipe:
    """Everything an engine is built from besides the model and the backend: planned from
    the spec before any work starts, so a bad profile or precision is a spec error."""

    profile: Profile
    slots: int = 2
    precision: str | None = None
    compute_capability: tuple[int, int] | None = None  # None: the GPU it is built on
    cache_dir: str | None = None
    sparse_weights: bool = False  # TensorRT's 2:4 sparse kernels (model.optimize.sparsity)


def plan_recipe(
    backend: str,
    inputs: Sequence[TensorInfo],
    *,
    batch_size: int,
    slots: int = 2,
    precision: str | None = None,
    profile: ProfileOverrides | None = None,
    compute_capability: str | Sequence[int] | None = None,
    cache_dir: str | None = None,
) -> EngineRecipe:
    """Check and plan an engine without TensorRT: profiles, precision for `backend`
    (tensorrt, tensorrt-rtx, or auto: either), the target compute capability."""
    if precision not in (None, *PRECISIONS):
        raise SpecError(f"tensorrt.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if backend == "tensorrt-rtx" and precision not in (None, "fp32"):
        raise BackendError(strongly_typed("TensorRT-RTX", precision))
    return EngineRecipe(
        profile=plan_profile(inputs, batch_size, profile),
        slots=slots,
        precision=precision,
        compute_capability=(
            parse_capability(compute_capability) if compute_capability is not None else None
        ),
        cache_dir=cache_dir,
    )


def ensure_engine(
    signature: ModelSignature,
    backend: str,
    recipe: EngineRecipe,
    *,
    validate: Callable[[bytes], bool] | None = None,
    device: int = 0,
) -> CachedEngine:
    """The engine for this model and recipe: from the node's cache, or built once under its
    lock. Everything that can be refused without building is refused first."""
    trt = load_bindings(backend)
    precision_flags(trt, recipe.precision)
    cc = target_capability(trt, recipe.compute_capability, device)
    key = EngineKey(
        onnx_sha256=signature.sha256,
        backend=backend,
        backend_version=trt.__version__,
        compute_capability=f"{cc[0]}.{cc[1]}",
        precision=recipe.precision or "fp32",
        slots=recipe.slots,
        profile=recipe.profile,
        sparse_weights=recipe.sparse_weights,
    )
    directory = cache_dir_path(recipe.cache_dir)
    timing = directory / f"timing-{backend}-{trt.__version__}-sm{cc[0]}{cc[1]}.cache"

    def build() -> bytes:
        log.info(
            "building a %s engine for %s (compute capability %d.%d, %s, %d profile(s))",
            product(trt),
            signature.path,
            *cc,
            key.precision,
            recipe.slots,
        )
        return build_engine(
            signature.path,
            backend=backend,
            profile=recipe.profile,
            slots=recipe.slots,
            precision=recipe.precision,
            compute_capability=cc,
            timing_cache=timing,
            sparse_weights=recipe.sparse_weights,
        )

    return get_or_build(key, build, cache_dir=directory, validate=validate)


def build_ahead(signature: ModelSignature, options: BackendOptions) -> CachedEngine:
    """`batch-infer build SPEC`: build (or find) ahead of a run the engine its actors will
    use, from the planned `BackendOptions` (the same recipe, so the same cache key)."""
    if options.requested not in _BINDINGS:
        raise SpecError(
            f"batch-infer build builds TensorRT engines, but the spec's backend is "
            f"{options.requested!r}; set backend: tensorrt or tensorrt-rtx"
        )
    return ensure_engine(signature, options.requested, options.engine)
