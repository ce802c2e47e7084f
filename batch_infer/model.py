"""What an ONNX model takes and gives, read from the file without running it.

It reads the file with onnx's own generated protobuf classes but without `import onnx`: that
package imports ml_dtypes, 0.55 s of every run's start with ml_dtypes 0.7 (0.06 s with 0.5).
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from batch_infer.errors import SpecError

if TYPE_CHECKING:
    import onnx

# ONNX element types NumPy has (TensorProto.DataType); others are looked up through onnx.
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
           9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
           14: "complex64", 15: "complex128"}  # fmt: skip


@cache
def onnx_proto() -> ModuleType:
    """onnx's generated message classes (ModelProto, TensorProto, ...): onnx's module once
    onnx is imported, else its generated file loaded alone (the same classes: the protobuf
    pool holds one definition, which a later `import onnx` finds)."""
    if "onnx" not in sys.modules:
        try:
            found = importlib.util.find_spec("onnx")
            assert found is not None and found.submodule_search_locations
            path = os.path.join(found.submodule_search_locations[0], "onnx_ml_pb2.py")
            spec = importlib.util.spec_from_file_location("batch_infer._onnx_ml_pb2", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # another layout or protobuf implementation: the usual way
            pass
    import onnx

    return onnx.onnx_ml_pb2


def _np_dtype(elem_type: int) -> np.dtype:
    if elem_type in _DTYPES:
        return np.dtype(_DTYPES[elem_type])
    from onnx import helper  # bfloat16, float8, int4...: ml_dtypes' types

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


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
    # The graph convolves in fp16 (Conv/ConvTranspose weights in float16): the layout that
    # suits the GPU's tensor cores is worth choosing for it (measured on fp16 only).
    half_convolutions: bool = False

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)


def _tensor_info(value: onnx.ValueInfoProto, where: str) -> TensorInfo:
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise SpecError(
            f"{where}: {value.name!r} is not a tensor; only tensor inputs are supported"
        )
    try:
        dtype = _np_dtype(ttype.elem_type)
    except (KeyError, TypeError, ValueError):
        name = onnx_proto().TensorProto.DataType.Name(ttype.elem_type)
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


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, node attributes, and subgraphs' (If, Loop)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """Locations (relative to the .onnx) of the files holding a model's external weights."""
    return sorted(
        {
            entry.value
            for tensor in _tensors(model.graph)
            if tensor.data_location == onnx_proto().TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )


@contextmanager
def _mapped(path: str) -> Iterator[memoryview]:
    """The model file's bytes, mapped rather than read: parsing and hashing read the page
    cache directly (a 220 MB model: 0.13 s less than `read()` on the 2-core machine)."""
    mapped = None
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size:  # an empty file cannot be mapped
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise SpecError(f"model.onnx: {path}: no such file") from None
    except OSError as exc:
        raise SpecError(f"model.onnx: {path}: cannot be read ({exc})") from None
    if mapped is None:
        yield memoryview(b"")
        return
    with mapped, memoryview(mapped) as view:
        yield view


def _parse_model(data: memoryview, path: str) -> onnx.ModelProto:
    try:
        model: Any = onnx_proto().ModelProto()
        model.ParseFromString(data)
        return model
    except Exception as exc:  # protobuf's DecodeError and friends for a corrupt file
        raise SpecError(f"model.onnx: {path}: not a readable ONNX model ({exc})") from None


def load_graph(path: str) -> onnx.ModelProto:
    """The model without its external weights; a clear error for a missing or corrupt file."""
    with _mapped(path) as data:
        return _parse_model(data, path)


def model_sha256(path: str, model: onnx.ModelProto, file_digest: str) -> str:
    """The .onnx file's sha256 (`file_digest`), extended with its external weight files:
    large models keep their weights outside the .onnx, and changed weights must change the
    digest."""
    files = external_data_files(model)
    if not files:
        return file_digest
    digest = hashlib.sha256(file_digest.encode())
    for name in files:
        weights = os.path.join(os.path.dirname(path), name)
        if not os.path.isfile(weights):
            raise SpecError(f"model.onnx: {path} refers to {name}, which is missing")
        digest.update(f"{name}:{file_sha256(weights)}".encode())
    return digest.hexdigest()


def read_signature(path: str) -> ModelSignature:
    """Load the graph (not external weights) and return its inputs and outputs.

    The file is mapped once, and hashed on a thread while it is parsed (hashlib lets go
    of the GIL): a run starts loading the model only after this, and for a 236 MB model on
    the 2-core machine it took 0.39 s read, parsed and hashed in turn, 0.14 s like this."""
    with _mapped(path) as data, ThreadPoolExecutor(1, "batch-infer-hash") as pool:
        hashing = pool.submit(hashlib.sha256, data)
        model = _parse_model(data, path)
        digest = hashing.result().hexdigest()
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_tensor_info(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor_info(v, path) for v in model.graph.output)
    if not inputs or not outputs:
        raise SpecError(f"model.onnx: {path}: the graph has no inputs or no outputs")
    weights = {i.name: i.data_type for i in model.graph.initializer}
    half = onnx_proto().TensorProto.FLOAT16
    half_convolutions = any(
        n.op_type in ("Conv", "ConvTranspose")
        and len(n.input) > 1
        and weights.get(n.input[1]) == half
        for n in model.graph.node
    )
    sha = model_sha256(path, model, digest)
    return ModelSignature(path, sha, inputs, outputs, half_convolutions)
