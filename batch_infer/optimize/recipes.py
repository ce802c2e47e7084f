"""Recipes: how a model is made faster for one target, and the tools that do it.

- fusion: ONNX Runtime's transformer optimizer (Attention, SkipLayerNormalization, ...),
  for ONNX Runtime targets only: its com.microsoft ops do not parse in TensorRT, which
  fuses for itself.
- fp16: ONNX Runtime's converter with fp32 inputs and outputs kept (a torch `.half()` export
  gives wrong answers).
- int8: ONNX Runtime's static Q/DQ quantizer, calibrated (MinMax) on rows of the job's own
  input. For ONNX Runtime on the CPU: unsigned activations, signed per-channel weights, 7-bit
  weights (`reduce_range`) on an x86 CPU without VNNI/AMX, whose int8 dot products saturate.
  For TensorRT and TensorRT-RTX: signed symmetric activations and weights, per-channel, no
  bias quantization (TensorRT's explicit quantization).
- fp8 (TensorRT targets): NVIDIA Model Optimizer (`modelopt.onnx.quantization`), given the
  calibration rows; it is never called without them (it would calibrate on random data).
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from batch_infer.backends.base import Feeds
from batch_infer.errors import BackendError, SpecError
from batch_infer.optimize.targets import Target
from batch_infer.spec import OptimizeSpec

CALIBRATION_BATCH = 32  # rows per calibration batch
_TWO_GB = 2_000_000_000  # protobuf's limit: larger models keep their weights outside


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the optimized model besides the source and the sample."""

    target: str  # Target.key(): the CPU's int8 instructions included for onnxruntime-cpu
    precision: str  # fp32 | fp16 | int8 | fp8
    fuse: bool  # ONNX Runtime's transformer fusions (ONNX Runtime targets only)
    num_heads: int = 0  # for the Attention fusion; 0: detected from the graph
    hidden_size: int = 0
    activations: str | None = None  # int8: "uint8" (asymmetric) or "int8" (symmetric)
    per_channel: bool | None = None  # int8 weights per output channel
    reduce_range: bool | None = None  # int8 weights in 7 bits
    quantize_bias: bool | None = None
    tool: str = "onnxruntime"  # onnxruntime | modelopt

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _saturates(target: Target) -> bool:
    """Whether int8 products can saturate on this CPU: x86 without VNNI or AMX."""
    return platform.machine().lower() in ("x86_64", "amd64") and target.int8_dot is None


def make_recipe(opt: OptimizeSpec, target: Target) -> Recipe:
    """The target's recipe for `opt`, with the spec's int8 overrides (`model.optimize.int8`)."""
    fuse = opt.fuse and not target.is_tensorrt
    base = Recipe(target.key(), opt.precision, fuse, opt.num_heads, opt.hidden_size)
    if opt.precision == "fp8":
        if not target.is_tensorrt:
            raise SpecError(
                f"model.optimize.precision: fp8 runs on TensorRT targets only (the job's "
                f"target is {target.name}: {target.why}); use int8 or fp16"
            )
        return Recipe(**{**asdict(base), "tool": "modelopt"})
    if opt.precision != "int8":
        return base
    q = opt.int8
    if target.is_tensorrt:
        acts, per_channel, reduce_range, bias = "int8", True, False, False
    else:
        acts, per_channel, reduce_range, bias = "uint8", True, _saturates(target), True
    return Recipe(
        **{
            **asdict(base),
            "activations": q.activations if q.activations != "auto" else acts,
            "per_channel": q.per_channel if q.per_channel is not None else per_channel,
            "reduce_range": q.reduce_range if q.reduce_range is not None else reduce_range,
            "quantize_bias": bias,
        }
    )


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Warnings ONNX Runtime's tools log while they run, kept for the report instead of
    printed (they log through the root logger, under bare module names)."""
    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                found.append(record.getMessage())

    root = logging.getLogger()
    saved, root.handlers = root.handlers, [Keep()]
    try:
        yield found
    finally:
        root.handlers = saved


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save; weights beyond protobuf's 2 GB go to `<name>.data` beside it."""
    big = model.ByteSize() > _TWO_GB if model.ByteSize() >= 0 else True
    onnx.save_model(model, str(path), save_as_external_data=big, location=f"{path.name}.data")


def _save_fused(model: Any, path: Path) -> None:
    """Save the transformer optimizer's model its own way (sorted, with the com.microsoft
    opset its fused ops need declared), with value types from ONNX Runtime's symbolic shape
    inference: ONNX's own cannot type the outputs of fused ops, and the int8 quantizer
    leaves untyped tensors unquantized."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with contextlib.suppress(Exception):  # types only help; a graph it refuses stays as is
        inferred = SymbolicShapeInference.infer_shapes(model.model, auto_merge=True)
        model.model.graph.ClearField("value_info")
        model.model.graph.value_info.extend(inferred.graph.value_info)
    size = model.model.ByteSize()
    model.save_model_to_file(str(path), use_external_data_format=size < 0 or size > _TWO_GB)


def _fuse(src: str, recipe: Recipe, use_gpu: bool) -> tuple[Any, dict]:
    """ONNX Runtime's transformer optimizer: (its model, what it fused and why not)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with captured_warnings() as warnings:
        model = optimize_model(
            src,
            model_type="bert",
            num_heads=recipe.num_heads,
            hidden_size=recipe.hidden_size,
            opt_level=0,  # fusions only: ONNX Runtime applies its own when it loads the model
            use_gpu=use_gpu,
        )
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    softmax = sum(1 for n in model.model.graph.node if n.op_type == "Softmax")
    notes = list(dict.fromkeys(warnings))
    if softmax and not (fused.get("Attention") or fused.get("MultiHeadAttention")):
        notes.append(
            f"Attention not fused: {softmax} Softmax node(s) remain. ONNX Runtime matches "
            "eager-attention exports (transformers: attn_implementation='eager'), not SDPA "
            "ones; where it could not detect them, set model.optimize.num_heads and hidden_size"
        )
    return model, {"fused": fused, "not_fused": notes}


def _reader(feeds: Feeds) -> Any:
    """ONNX Runtime's CalibrationDataReader over the calibration rows, in small batches."""
    from onnxruntime.quantization import CalibrationDataReader

    rows = len(next(iter(feeds.values())))
    batches = iter(
        [{k: v[i : i + CALIBRATION_BATCH] for k, v in feeds.items()}
         for i in range(0, rows, CALIBRATION_BATCH)]
    )  # fmt: skip

    class Reader(CalibrationDataReader):
        def get_next(self) -> Feeds | None:
            return next(batches, None)

    return Reader()


def _int8(src: Path, dst: Path, recipe: Recipe, calibration: Feeds) -> list[str]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    symmetric = recipe.activations == "int8"
    with captured_warnings() as warnings:
        quantize_static(
            str(src),
            str(dst),
            _reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=bool(recipe.per_channel),
            reduce_range=bool(recipe.reduce_range),
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=src.stat().st_size > _TWO_GB,
            extra_options={
                "ActivationSymmetric": symmetric,
                "WeightSymmetric": True,
                "QuantizeBias": bool(recipe.quantize_bias),
            },
        )
    return [w for w in dict.fromkeys(warnings) if "pre-processing" not in w]


def _fp8(src: Path, dst: Path, calibration: Feeds) -> list[str]:
    """NVIDIA Model Optimizer's FP8 Q/DQ, calibrated on `calibration` (never on its random
    default), on ONNX Runtime's CPU provider."""
    if not calibration or not len(next(iter(calibration.values()))):
        raise SpecError("model.optimize: fp8 needs calibration rows (calibration_rows > 0)")
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise BackendError(
            f"model.optimize.precision fp8 needs NVIDIA Model Optimizer, which cannot be "
            f"imported here ({exc}); pip install 'batch-infer[optimize]'"
        ) from None
    with captured_warnings() as warnings:
        quantize(
            str(src),
            quantize_mode="fp8",
            calibration_data=dict(calibration),
            calibration_method="max",
            calibration_eps=["cpu"],
            output_path=str(dst),
            log_level="WARNING",
        )
    return list(dict.fromkeys(warnings))


def apply_recipe(src: str, recipe: Recipe, calibration: Feeds, work: Path) -> tuple[Path, dict]:
    """Make the optimized model in `work` from the model at `src`: (its path, notes for the
    report: fusions and the tools' warnings)."""
    notes: dict = {}
    out = work / "model.onnx"
    # The tools get a copy: some write beside their input (ONNX Runtime's quantizer its
    # shape-inferred model) or into it (Model Optimizer adds value_info to the file it reads).
    stage = work / "source.onnx"
    if not recipe.fuse:
        save_model(onnx.load(src), stage)
    else:
        fused, notes["fusion"] = _fuse(src, recipe, use_gpu="cuda" in recipe.target)
        if recipe.precision == "fp16":
            with captured_warnings() as warnings:
                fused.convert_float_to_float16(keep_io_types=True)
            notes["warnings"] = list(dict.fromkeys(warnings))
            _save_fused(fused, out)
            return out, notes
        stage = work / "fused.onnx"
        _save_fused(fused, stage)
    if recipe.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with captured_warnings() as warnings:
            model = convert_float_to_float16(onnx.load(str(stage)), keep_io_types=True)
        notes["warnings"] = list(dict.fromkeys(warnings))
        save_model(model, out)
    elif recipe.precision == "int8":
        notes["warnings"] = _int8(stage, out, recipe, calibration)
    elif recipe.precision == "fp8":
        notes["warnings"] = _fp8(stage, out, calibration)
    else:
        save_model(onnx.load(str(stage)), out)
    for leftover in ("fused.onnx", "fused.onnx.data", "source.onnx", "source.onnx.data"):
        (work / leftover).unlink(missing_ok=True)
    if not out.exists():
        raise BackendError(f"model.optimize: {recipe.tool} wrote no model for {src}")
    return out, notes
