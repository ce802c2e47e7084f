"""What TensorRT made of an optimized model: one row per engine layer (type, precision, the
ONNX nodes fused into it), from a DETAILED profiling-verbosity build.

TensorRT-RTX logs the table while it builds, also on a machine without a GPU (it builds
ahead for a chosen compute capability); where a GPU can load the engine, TensorRT's
`IEngineInspector` gives it as JSON, which is used instead. The build also proves that the
optimized model parses and builds for its target before it is cached.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

from batch_infer.backends.tensorrt_build import Profile, build_engine, load_bindings, make_logger
from batch_infer.optimize.targets import tensorrt_runs_here

_LAYER = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*), Inputs: (?P<rest>.*)$")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
_DTYPE = re.compile(r"Datatype: (\w+)")
# The precision a layer computes in: the narrowest type among its inputs and weights.
_ORDER = ("FP8", "Int8", "Int4", "Half", "BFloat16", "Float")
_INSPECTOR_TYPES = {"FP32": "Float", "FP16": "Half", "BF16": "BFloat16", "Int8": "Int8",
                    "INT8": "Int8", "FP8": "FP8", "Int32": "Int32", "Int64": "Int64"}  # fmt: skip


def _precision(types: list[str]) -> str:
    return next((t for t in _ORDER if t in types), types[0] if types else "-")


def parse_layer_log(lines: list[str]) -> list[dict]:
    """Layers from TensorRT-RTX's DETAILED build log: rows such as
    `Name: X, LayerType: gemm, Inputs: [ {... Datatype: Half ...}], Constants: [...],
    Outputs: [...], TacticName: T, StreamId: 0, Metadata: [ONNX Layer: a][ONNX Layer: b]`."""
    layers = []
    for message in lines:
        for line in message.splitlines():
            m = _LAYER.match(line.strip())
            if m is None:
                continue
            rest = m["rest"]
            inputs, _, rest = rest.partition(", Constants: ")
            constants, _, rest = rest.partition(", Outputs: ")
            outputs, _, rest = rest.partition(", TacticName: ")
            _, _, metadata = rest.partition("Metadata: ")
            ins, weights, outs = (_DTYPE.findall(x) for x in (inputs, constants, outputs))
            layers.append(
                {
                    "name": m["name"],
                    "type": m["type"],
                    "precision": _precision(ins + weights),
                    "inputs": sorted(set(ins)),
                    "weights": sorted(set(weights)),
                    "outputs": sorted(set(outs)),
                    "onnx_nodes": _ONNX_LAYER.findall(metadata),
                }
            )
    return layers


def parse_inspector(text: str) -> list[dict]:
    """Layers from `IEngineInspector.get_engine_information(JSON)` (DETAILED verbosity)."""

    def dtypes(tensors: list[Any]) -> list[str]:
        found = []
        for t in tensors or []:
            if not isinstance(t, dict):
                continue
            words = str(t.get("Format/Datatype", t.get("Datatype", ""))).split()
            found += [_INSPECTOR_TYPES[w] for w in words if w in _INSPECTOR_TYPES]
        return found

    layers = []
    for layer in json.loads(text).get("Layers", []):
        if not isinstance(layer, dict):  # layer names only: the build was not DETAILED
            continue
        ins, outs = dtypes(layer.get("Inputs")), dtypes(layer.get("Outputs"))
        layers.append(
            {
                "name": layer.get("Name", ""),
                "type": layer.get("LayerType", ""),
                "precision": _precision(ins),
                "inputs": sorted(set(ins)),
                "weights": [],
                "outputs": sorted(set(outs)),
                "onnx_nodes": _ONNX_LAYER.findall(str(layer.get("Metadata", ""))),
            }
        )
    return layers


def _inspect(backend: str, engine: bytes) -> str | None:
    """The engine's layers as JSON from IEngineInspector, where a GPU here can load it."""
    if not tensorrt_runs_here(backend):
        return None
    trt = load_bindings(backend)
    runtime = trt.Runtime(make_logger(trt))
    loaded = runtime.deserialize_cuda_engine(engine)
    if loaded is None:
        return None
    inspector = loaded.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def layer_report(
    onnx_path: str,
    backend: str,
    profile: Profile,
    compute_capability: tuple[int, int] | None,
    sparse_weights: bool,
) -> dict:
    """Build an engine of the optimized model (one profile, DETAILED) and describe its layers."""
    lines: list[str] = []
    started = time.perf_counter()
    engine = build_engine(
        onnx_path,
        backend=backend,
        profile=profile,
        slots=1,
        compute_capability=compute_capability,
        sparse_weights=sparse_weights,
        verbose=lines.append,
    )
    seconds = time.perf_counter() - started
    inspected = _inspect(backend, engine)
    layers = parse_inspector(inspected) if inspected else parse_layer_log(lines)
    cc = compute_capability
    return {
        "backend": backend,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else "this GPU",
        "source": "IEngineInspector" if inspected else "DETAILED build log",
        "engine_bytes": len(engine),
        "build_seconds": round(seconds, 2),
        "precisions": dict(Counter(layer["precision"] for layer in layers)),
        "layers": layers,
    }
