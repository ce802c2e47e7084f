"""What a model graph holds, for the report: op counts, weight bytes, Q/DQ nodes, the
precision each matrix-multiplying node computes in, and which weights follow 2:4 sparsity.
Read from the ONNX alone (ONNX shape inference for types), nothing is run."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# Nodes whose precision decides a model's speed: the matrix products.
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "MultiHeadAttention")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_TYPE_NAMES = {
    TensorProto.FLOAT: "fp32",
    TensorProto.FLOAT16: "fp16",
    TensorProto.BFLOAT16: "bf16",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.FLOAT8E4M3FN: "fp8",
}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count (domain-qualified for non-standard ops, e.g. com.microsoft.Attention)."""
    names = (f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
             for n in model.graph.node)  # fmt: skip
    return dict(sorted(Counter(names).items()))


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (and Constant nodes' tensors): the model's weights."""
    total = 0
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                if a.HasField("t")]  # fmt: skip
    for t in tensors:
        count = int(np.prod(t.dims)) if t.dims else 1
        size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += count * size
    return total


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value types filled in: ONNX's shape inference, or for a model with
    ONNX Runtime's contrib ops (Attention, SkipLayerNormalization, ...) its symbolic shape
    inference, which knows them (and is slower)."""
    try:
        if any(n.domain == "com.microsoft" for n in model.graph.node):
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a graph inference refuses: what the model itself declares
        return model


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> element type; a node output still unknown takes its first input's."""
    g = _inferred(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types |= {t.name: t.data_type for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            types[n.output[0]] = next(a.t.data_type for a in n.attribute if a.HasField("t"))
        elif n.op_type == "Cast":
            types[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
        for out in n.output:
            if not types.get(out):
                types[out] = next((types[i] for i in n.input if types.get(i)), 0)
    return types


def compute_precisions(model: onnx.ModelProto) -> list[dict]:
    """Each matrix-multiplying node and the precision it computes in: the quantized type of
    its weight (Q/DQ), else the type of its first input."""
    producers = {out: n for n in model.graph.node for out in n.output}
    types = _elem_types(model)
    scale_types = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            scale_types[n.output[0]] = types.get(n.input[0], TensorProto.UNDEFINED)
    out = []
    for n in model.graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        weight = n.input[1] if len(n.input) > 1 else n.input[0]
        src = producers.get(weight)
        if src is not None and src.op_type == "DequantizeLinear":
            elem = scale_types.get(weight, TensorProto.UNDEFINED)
        else:
            elem = types.get(n.input[0], TensorProto.UNDEFINED)
        precision = _TYPE_NAMES.get(elem, TensorProto.DataType.Name(elem).lower())
        out.append({"node": n.name or n.output[0], "op": n.op_type, "precision": precision})
    return out


def qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(n.op_type for n in model.graph.node if n.op_type in _QDQ)
    return {op: counts.get(op, 0) for op in _QDQ}


def _weight_matrix(model: onnx.ModelProto) -> list[tuple[str, str, np.ndarray, int]]:
    """(tensor, op, weight array, input-channel axis) for every constant weight of a Conv,
    MatMul or Gemm (through a DequantizeLinear: its quantized values)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        name = n.input[1]
        src = producers.get(name)
        if src is not None and src.op_type == "DequantizeLinear":
            name = src.input[0]
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if n.op_type == "Conv":
            axis = 1  # [K, C, R, S]: C
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            axis = 1 if trans_b else 0
        else:
            axis = w.ndim - 2  # x @ W: W's rows
        if w.ndim >= 2:
            found.append((name, n.op_type, w, axis))
    return found


def sparsity_2_4(model: onnx.ModelProto) -> list[dict]:
    """Per weight: does it follow 2:4 structured sparsity along the input-channel axis (in
    every group of 4 consecutive input channels, at most 2 non-zero values), the pattern
    TensorRT's sparse kernels take. `groups_ok` is the share of groups that do."""
    out = []
    for name, op, w, axis in _weight_matrix(model):
        moved = np.moveaxis(w, axis, -1)
        channels = moved.shape[-1]
        pad = (-channels) % 4
        if pad:
            moved = np.concatenate([moved, np.zeros((*moved.shape[:-1], pad), w.dtype)], axis=-1)
        groups = (moved.reshape(-1, 4) != 0).sum(axis=1)
        share = float(np.mean(groups <= 2)) if groups.size else 0.0
        out.append({"tensor": name, "op": op, "shape": list(w.shape),
                    "input_channels": int(channels), "groups_ok": round(share, 4),
                    "qualifies": bool(share == 1.0)})  # fmt: skip
    return out
