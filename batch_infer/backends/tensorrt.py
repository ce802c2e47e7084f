"""TensorRT (10 and 11) and TensorRT-RTX: build engines from the ONNX, cache them, run them.

Both share one code path through the binding module object (`tensorrt` or
`tensorrt_rtx_bindings`), whose builder and runtime APIs are the same. The differences:
- TensorRT-RTX networks are strongly typed (precision comes from the ONNX: there are no
  FP16/INT8 builder flags) and engines target a compute capability chosen at build time,
  so they can be built ahead on a machine without a GPU; it has no timing cache.
- TensorRT builds for the GPU it runs on and reuses a timing cache kept beside the engines.

Data-dependent output shapes (NonZero, NMS, ...) are refused, because the slot buffers are
sized before the launch. The rule, checked twice:
- at build time, on the network: an output with a -1 dimension whose producers include a
  layer whose output size depends on values (NON_ZERO, NMS) is data dependent. This is
  conservative (such an output is refused even if the -1 is only the batch dimension);
- at load time, on the engine (the documented rule): with every input set to its profile's
  opt shape, `context.get_tensor_shape(output)` still containing -1 means the shape is only
  known after the launch (it would need an IOutputAllocator). Checked again per batch.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from batch_infer.backends.base import Backend, Feeds
from batch_infer.engine_cache import CachedEngine, EngineKey, cache_dir_path, get_or_build
from batch_infer.engine_cache import write_atomic as _write_atomic
from batch_infer.errors import BackendError, SpecError
from batch_infer.model import ModelSignature, TensorInfo, file_sha256, read_signature

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


def make_logger(trt: ModuleType) -> Any:
    """An ILogger that keeps errors (build and parse failures are only reported there)."""

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
        how = "with Q/DQ nodes" if precision == "int8" else "e.g. with onnxconverter-common"
        raise BackendError(
            f"{product(trt)} is strongly typed: precision comes from the ONNX, so precision "
            f"{precision} cannot be applied as a builder flag. Export the model "
            f"in {precision} ({how}) and leave tensorrt.precision unset (or fp32)."
        )
    return [flag]


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
        from batch_infer.cuda_streams import CudaError, compute_capability, device_count
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


def model_digest(signature: ModelSignature) -> str:
    """The ONNX file's sha256, extended with the external weight files it names: large models
    keep their weights outside the .onnx, and changed weights must change the cache key."""
    model = onnx.load(signature.path, load_external_data=False)
    files = sorted(
        {
            e.value
            for init in model.graph.initializer
            for e in init.external_data
            if e.key == "location"
        }
    )
    if not files:
        return signature.sha256
    digest = hashlib.sha256(signature.sha256.encode())
    for name in files:
        digest.update(f"{name}:{file_sha256(str(Path(signature.path).parent / name))}".encode())
    return digest.hexdigest()


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
) -> bytes:
    """Build a serialized engine with `slots` copies of `profile` (one per execution context).

    `compute_capability` is TensorRT-RTX's target (None: this machine's GPU); full TensorRT
    always builds for the GPU it runs on. `timing_cache` is a file, read and rewritten (last
    writer wins), full TensorRT only.
    """
    trt = load_bindings(backend)
    logger = make_logger(trt)
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
        _write_atomic(path, bytes(cache.serialize()))
    return bytes(serialized)


def ensure_engine(
    signature: ModelSignature,
    *,
    backend: str,
    batch_size: int,
    slots: int = 2,
    precision: str | None = None,
    profile: ProfileOverrides | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    compute_capability: str | Sequence[int] | None = None,
    validate: Callable[[bytes], bool] | None = None,
    device: int = 0,
) -> CachedEngine:
    """The engine for this model and settings: from the node's cache, or built once under its
    lock. Everything that can be refused without building is refused first."""
    trt = load_bindings(backend)
    precision_flags(trt, precision)
    shapes = plan_profile(signature.inputs, batch_size, profile)
    cc = target_capability(trt, compute_capability, device)
    key = EngineKey(
        onnx_sha256=model_digest(signature),
        backend=backend,
        backend_version=trt.__version__,
        compute_capability=f"{cc[0]}.{cc[1]}",
        precision=precision or "fp32",
        slots=slots,
        profile=shapes,
    )
    directory = cache_dir_path(cache_dir)
    timing = directory / f"timing-{backend}-{trt.__version__}-sm{cc[0]}{cc[1]}.cache"

    def build() -> bytes:
        log.info(
            "building a %s engine for %s (compute capability %d.%d, %s, %d profile(s))",
            product(trt),
            signature.path,
            *cc,
            key.precision,
            slots,
        )
        return build_engine(
            signature.path,
            backend=backend,
            profile=shapes,
            slots=slots,
            precision=precision,
            compute_capability=cc,
            timing_cache=timing,
        )

    return get_or_build(key, build, cache_dir=directory, validate=validate)


def build_for_spec(spec: Any, *, backend: str | None = None) -> CachedEngine:
    """`batch-infer build SPEC`: build (or find) ahead of a run the engine its actors will use.

    Reads spec.backend (or `backend`), spec.batch_size, spec.model.onnx and the optional
    `tensorrt:` section (precision, slots, profile, cache_dir, compute_capability).
    """
    backend = backend or spec.backend
    if backend not in _BINDINGS:
        raise SpecError(
            f"batch-infer build builds TensorRT engines, but the spec's backend is "
            f"{backend!r}; set backend: tensorrt or tensorrt-rtx"
        )
    section = getattr(spec, "tensorrt", None)
    opts = section.model_dump() if hasattr(section, "model_dump") else dict(section or {})
    return ensure_engine(
        read_signature(spec.model.onnx),
        backend=backend,
        batch_size=spec.batch_size,
        slots=getattr(spec, "slots", None) or opts.get("slots") or 2,
        precision=opts.get("precision"),
        profile=opts.get("profile"),
        cache_dir=opts.get("cache_dir"),
        compute_capability=opts.get("compute_capability"),
    )


# -- runtime -----------------------------------------------------------------------------


class TensorRTBackend(Backend):
    """One engine per actor, one execution context per slot: context i uses profile i on
    slot i's stream, so K batches are in flight at once without sharing any state."""

    def __init__(
        self,
        signature: ModelSignature,
        *,
        backend: str = "tensorrt",
        batch_size: int,
        slots: int = 2,
        precision: str | None = None,
        profile: ProfileOverrides | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device: int = 0,
    ) -> None:
        from batch_infer.cuda_streams import SlotRing, compute_capability

        self.name = backend
        self.inputs, self.outputs = signature.inputs, signature.outputs
        self._trt = trt = load_bindings(backend)
        self._logger = make_logger(trt)
        self._contexts: list[Any] = []
        self._engine: Any = None
        self._ring = SlotRing(self.inputs, self.outputs, slots=slots, device=device)  # sets device
        try:
            self._runtime = trt.Runtime(self._logger)
            self.cached = ensure_engine(
                signature,
                backend=backend,
                batch_size=batch_size,
                slots=slots,
                precision=precision,
                profile=profile,
                cache_dir=cache_dir,
                compute_capability=compute_capability(device),
                validate=self._deserialize,
                device=device,
            )
            self._check_io()
            for slot in self._ring.slots:
                context = self._engine.create_execution_context()
                if context is None:
                    raise BackendError(
                        f"{product(trt)}: cannot create execution context "
                        f"{slot.index}: {self._logger.take_errors()}"
                    )
                self._contexts.append(context)
                if not context.set_optimization_profile_async(slot.index, slot.stream_handle):
                    raise BackendError(
                        f"{product(trt)}: cannot select optimization profile "
                        f"{slot.index}: {self._logger.take_errors()}"
                    )
            self._refuse_data_dependent()
        except BaseException:
            self.close()
            raise

    def _deserialize(self, data: bytes) -> bool:
        """The cache's load check; keeps the engine so it is deserialized once per actor."""
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            log.warning(
                "%s cannot deserialize the engine: %s",
                product(self._trt),
                self._logger.take_errors(),
            )
        return self._engine is not None

    def _check_io(self) -> None:
        engine, trt = self._engine, self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {name: engine.get_tensor_mode(name) for name in names}
        for tensors, mode in (
            (self.inputs, trt.TensorIOMode.INPUT),
            (self.outputs, trt.TensorIOMode.OUTPUT),
        ):
            for t in tensors:
                if modes.get(t.name) != mode:
                    raise BackendError(
                        f"the engine has no {mode.name.lower()} {t.name!r} (its tensors: {names})"
                    )
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(t.name)))
                if dtype != t.dtype:
                    raise BackendError(
                        f"engine tensor {t.name!r} is {dtype}, the ONNX says {t.dtype}"
                    )
                if mode == trt.TensorIOMode.INPUT and engine.is_shape_inference_io(t.name):
                    raise BackendError(
                        f"input {t.name!r} is a shape tensor (its values set "
                        f"output shapes); batch-infer does not support that"
                    )

    def _refuse_data_dependent(self) -> None:
        """The load-time rule: outputs still unknown once every input shape is set."""
        context = self._contexts[0]
        for t in self.inputs:
            _, opt, _ = self._engine.get_tensor_profile_shape(t.name, 0)
            context.set_input_shape(t.name, tuple(opt))
        for t in self.outputs:
            self._output_shape(context, t)

    def _output_shape(self, context: Any, t: TensorInfo) -> Shape:
        shape = tuple(context.get_tensor_shape(t.name))
        if any(d < 0 for d in shape):
            raise BackendError(
                f"{product(self._trt)}: output {t.name!r} has a data-dependent shape "
                f"({list(shape)} once all input shapes are set); batch-infer does not support "
                f"such models (use backend onnxruntime)"
            )
        return shape

    def _bind(self, context: Any, name: str, ptr: int) -> None:
        if not context.set_tensor_address(name, ptr):
            raise BackendError(
                f"{product(self._trt)}: set_tensor_address({name!r}) failed: "
                f"{self._logger.take_errors()}"
            )

    def _enqueue(self, slot: Any, shapes: dict[str, Shape]) -> dict[str, tuple[Shape, int]]:
        context = self._contexts[slot.index]
        for t in self.inputs:
            if not context.set_input_shape(t.name, shapes[t.name]):
                raise BackendError(
                    f"input {t.name!r} shape {list(shapes[t.name])} is outside "
                    f"the engine's profile: {self._logger.take_errors()}"
                )
            self._bind(context, t.name, slot.dev_in[t.name].ptr)
        produced = {}
        for t in self.outputs:
            shape = self._output_shape(context, t)
            ptr = self._ring.output_buffer(slot, t, shape)
            self._bind(context, t.name, ptr)
            produced[t.name] = (shape, ptr)
        if not context.execute_async_v3(slot.stream_handle):
            raise BackendError(
                f"{product(self._trt)}: execute_async_v3 failed: {self._logger.take_errors()}"
            )
        return produced

    def run(self, batches: Iterable[Feeds]) -> Iterator[Feeds]:
        yield from self._ring.run(batches, self._enqueue)

    def describe(self) -> str:
        how = "built" if self.cached.built else "cached"
        return (
            f"{product(self._trt)} ({len(self._contexts)} slot(s), {how} engine {self.cached.path})"
        )

    def close(self) -> None:
        """Wait for the streams and free buffers, then drop contexts before the engine."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._contexts = []
        self._engine = None
