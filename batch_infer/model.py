"""What an ONNX model takes and gives, read from the file without running it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from batch_infer.errors import SpecError


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output; dynamic dimensions are -1."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The shape of one row: every dimension after the batch dimension."""
        return self.shape[1:]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model insists on, or None when the batch dimension is dynamic."""
        return self.shape[0] if self.shape and self.shape[0] > 0 else None


@dataclass(frozen=True)
class ModelSignature:
    path: str
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)


def _tensor_info(value: onnx.ValueInfoProto, where: str) -> TensorInfo:
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise SpecError(
            f"{where}: {value.name!r} is not a tensor; only tensor inputs are supported"
        )
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
    except (KeyError, TypeError):
        name = TensorProto.DataType.Name(ttype.elem_type)
        raise SpecError(f"{where}: {value.name!r} has element type {name}, not supported") from None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
    if not dims:
        raise SpecError(f"{where}: {value.name!r} is a scalar; batch inputs need a batch dimension")
    return TensorInfo(value.name, dtype, dims)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_signature(path: str) -> ModelSignature:
    """Load the graph (not external weights) and return its inputs and outputs."""
    try:
        model = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise SpecError(f"model.onnx: {path}: no such file") from None
    except Exception as exc:  # onnx raises DecodeError and friends for a corrupt file
        raise SpecError(f"model.onnx: {path}: not a readable ONNX model ({exc})") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_tensor_info(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor_info(v, path) for v in model.graph.output)
    if not inputs or not outputs:
        raise SpecError(f"model.onnx: {path}: the graph has no inputs or no outputs")
    return ModelSignature(path, file_sha256(path), inputs, outputs)
