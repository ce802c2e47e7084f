"""TensorRT (10 and 11) and TensorRT-RTX at run time: one engine per actor from the node's
engine cache (`tensorrt_build`), one execution context per slot of the shared slot ring.

Data-dependent output shapes are refused on the engine (the documented rule): with every
input set to its profile's opt shape, `context.get_tensor_shape(output)` still containing
-1 means the shape is only known after the launch (it would need an IOutputAllocator).
Checked at load and again per batch, because the slot buffers are sized before the launch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from batch_infer.backends.base import BackendOptions
from batch_infer.backends.cuda_streams import Slot, SlotRing, StreamBackend, compute_capability
from batch_infer.backends.tensorrt_build import (
    Shape,
    ensure_engine,
    load_bindings,
    make_logger,
    product,
)
from batch_infer.errors import BackendError
from batch_infer.model import ModelSignature, TensorInfo

log = logging.getLogger("batch_infer")


class TensorRTBackend(StreamBackend):
    """One engine per actor, one execution context per slot: context i uses profile i on
    slot i's stream, so K batches are in flight at once without sharing any state."""

    def __init__(
        self,
        signature: ModelSignature,
        options: BackendOptions,
        *,
        backend: str = "tensorrt",
        device: int = 0,
    ) -> None:
        if options.engine is None:
            raise BackendError(f"{backend}: {options.engine_problem or 'no engine recipe'}")
        self.name = backend
        self.inputs, self.outputs = signature.inputs, signature.outputs
        self._trt = trt = load_bindings(backend)
        self._logger = make_logger(trt)
        self._contexts: list[Any] = []
        self._engine: Any = None
        self.ring = SlotRing(self.inputs, self.outputs, slots=options.slots, device=device)
        try:
            self._runtime = trt.Runtime(self._logger)
            # At run time the engine is for this GPU, whatever a build ahead targeted.
            recipe = replace(options.engine, compute_capability=compute_capability(device))
            self.cached = ensure_engine(
                signature, backend, recipe, validate=self._deserialize, device=device
            )
            self._check_io()
            for slot in self.ring.slots:
                context = self._engine.create_execution_context()
                if context is None:
                    raise BackendError(
                        f"{product(trt)}: cannot create execution context "
                        f"{slot.index}: {self._logger.take_errors()}"
                    )
                self._contexts.append(context)
                if not context.set_optimization_profile_async(slot.index, slot.compute_handle):
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

    def enqueue(self, slot: Slot, shapes: dict[str, Shape]) -> dict[str, tuple[Shape, int]]:
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
            ptr = self._ring().output_buffer(slot, t, shape)
            self._bind(context, t.name, ptr)
            produced[t.name] = (shape, ptr)
        if not context.execute_async_v3(slot.compute_handle):
            raise BackendError(
                f"{product(self._trt)}: execute_async_v3 failed: {self._logger.take_errors()}"
            )
        return produced

    def describe(self) -> str:
        how = "built" if self.cached.built else "cached"
        return (
            f"{product(self._trt)} ({len(self._contexts)} slot(s), {how} engine {self.cached.path})"
        )

    def release(self) -> None:
        """Contexts before the engine (the ring has already waited for the streams)."""
        self._contexts = []
        self._engine = None
