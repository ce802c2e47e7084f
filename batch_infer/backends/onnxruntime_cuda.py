"""ONNX Runtime on CUDA, driven through the shared slot ring.

One session for every slot, bound to the ring's shared compute stream
(`user_compute_stream`): the model's runs go one after another on the device anyway, so a
second session would only load the model twice. Each slot has its own IO binding to its
device buffers and copies on its own stream; `disable_synchronize_execution_providers=1`
makes `run_with_iobinding` only enqueue work.
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort

from batch_infer.backends.cuda_streams import Slot, SlotRing, StreamBackend
from batch_infer.errors import BackendError
from batch_infer.model import ModelSignature

# CUDA execution provider options every session gets (ONNX Runtime's names and values).
# cuDNN's exhaustive search runs again for every new batch shape in every session (about a
# second each for ResNet-50 on an H100) and picked nothing faster than its heuristics there
# (8,532 vs 8,536 images/s, benchmarks/results/gpu.md): the heuristics it is.
CUDA_OPTIONS: dict[str, str] = {"cudnn_conv_algo_search": "HEURISTIC"}
# Convolutions in NHWC, the layout the GPU's tensor cores take: ResNet-50 fp16 on an H100
# ran 10,776 images/s against 8,555 in NCHW, with the same outputs to the bit; BERT-base
# (no convolutions) ran 4% slower with it (docs/gpu.md). Measured on fp16 only: models that
# convolve in fp16 get it.
CONV_OPTIONS: dict[str, str] = {"prefer_nhwc": "1"}


def provider_options(signature: ModelSignature) -> dict[str, str]:
    """The CUDA execution provider options this backend gives the model's sessions."""
    return {**CUDA_OPTIONS, **(CONV_OPTIONS if signature.half_convolutions else {})}


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeCUDA(StreamBackend):
    name = "onnxruntime-cuda"
    pads_batches = True  # one shape: one plan for cuDNN and ONNX Runtime to make per session

    def __init__(
        self,
        signature: ModelSignature,
        slots: int = 2,
        device: int = 0,
        cuda_options: dict[str, str] | None = None,
    ) -> None:
        if not cuda_available():
            raise BackendError(
                "ONNX Runtime here has no CUDAExecutionProvider: install onnxruntime-gpu "
                "(pip install 'batch-infer[gpu]') on the GPU nodes"
            )
        self.inputs, self.outputs, self.device = signature.inputs, signature.outputs, device
        self._static = {t.name: all(d > 0 for d in t.item_shape) for t in self.outputs}
        self._session: Any = None
        self._bindings: list[Any] = []
        self.ring = SlotRing(
            signature.inputs, signature.outputs, slots=slots, device=device, shared_compute=True
        )
        self._options = {**provider_options(signature), **(cuda_options or {})}
        stream = str(self.ring.slots[0].compute_handle)
        # ONNX Runtime >= 1.26 first looks for a plugin EP device matching a given device_id,
        # finds none for its built-in CUDA provider, and logs a warning for every session
        # before falling back to it; device 0 is the provider's default, so it is left out.
        where = {"device_id": str(device)} if device else {}
        options = {**self._options, **where, "user_compute_stream": stream}
        provider = ("CUDAExecutionProvider", options)
        try:
            session = ort.InferenceSession(
                signature.path, ort.SessionOptions(), providers=[provider]
            )
            if session.get_providers()[0] != "CUDAExecutionProvider":
                raise BackendError(f"ONNX Runtime did not put {signature.path} on CUDA")
            self._session = session
            self._bindings = [session.io_binding() for _ in self.ring.slots]
        except Exception as exc:
            self.close()
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"ONNX Runtime CUDA cannot load {signature.path}: {exc}") from None
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def enqueue(
        self, slot: Slot, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[tuple[int, ...], int]]:
        session, io = self._session, self._bindings[slot.index]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for t in self.inputs:
            io.bind_input(
                t.name, "cuda", self.device, t.dtype, list(shapes[t.name]), slot.dev_in[t.name].ptr
            )
        rows = next(iter(shapes.values()))[0]
        produced: dict[str, tuple[tuple[int, ...], int]] = {}
        for t in self.outputs:
            if self._static[t.name]:  # written straight into the slot's own buffer
                shape = (rows, *t.item_shape)
                ptr = self._ring().output_buffer(slot, t, shape)
                io.bind_output(t.name, "cuda", self.device, t.dtype, list(shape), ptr)
                produced[t.name] = (shape, ptr)
            else:  # shape known only after the run: ORT allocates; it lives until the next bind
                io.bind_output(t.name, "cuda", self.device)
        session.run_with_iobinding(io, self._run_options)
        if len(produced) < len(self.outputs):
            for t, value in zip(self.outputs, io.get_outputs(), strict=True):
                if t.name not in produced:
                    produced[t.name] = (tuple(value.shape()), int(value.data_ptr()))
        return produced

    def describe(self) -> str:
        slots = len(self._bindings)
        layout = ", NHWC" if self._options.get("prefer_nhwc") == "1" else ""
        return f"onnxruntime {ort.__version__} CUDA (GPU {self.device}, {slots} slots{layout})"

    def release(self) -> None:
        self._session, self._bindings = None, []
