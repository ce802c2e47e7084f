"""From a planned job with `model.optimize` to the same plan on the optimized model.

The steps, each in its module: the target (`targets`), the recipe (`recipes`), rows of the
job's own input (`calibration`), the optimized model (`recipes.apply_recipe`), the accuracy
gate and the speed of both models (`gate`), TensorRT's layer table (`tensorrt_layers`), the
cache (`cache`). A model that fails the gate, or does not build for its target, is neither
cached nor used.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections import Counter
from pathlib import Path

import onnx

from batch_infer.backends.base import BackendOptions
from batch_infer.backends.tensorrt_build import parse_capability
from batch_infer.errors import BackendError, SpecError
from batch_infer.model import ModelSignature, read_signature
from batch_infer.optimize import graph
from batch_infer.optimize.cache import ArtifactKey, get_or_make
from batch_infer.optimize.calibration import Sample, draw_sample
from batch_infer.optimize.gate import (
    GateFailed,
    Runner,
    classifier_outputs,
    compare,
    failures,
    rows_per_second,
    run_rows,
    runner,
)
from batch_infer.optimize.recipes import Recipe, apply_recipe, make_recipe
from batch_infer.optimize.targets import Target, gpu_here, resolve_target
from batch_infer.planning import JobPlan, backend_options
from batch_infer.spec import JobSpec


def _tools(recipe: Recipe) -> dict[str, str]:
    """Versions of the tools that make the model: a new version may make another model."""
    import onnxruntime

    from batch_infer import __version__

    found = {"batch-infer": __version__, "onnxruntime": onnxruntime.__version__,
             "onnx": onnx.__version__}  # fmt: skip
    if recipe.tool == "modelopt":
        found["nvidia-modelopt"] = importlib.metadata.version("nvidia-modelopt")
    return found


def pinned_options(spec: JobSpec, signature: ModelSignature, target: Target) -> BackendOptions:
    """The job's backend options with the backend pinned to the target (a model optimized
    for one backend is not run on another), TensorRT's sparse-weights flag as asked, and for
    full TensorRT (weakly typed) the precision flag the optimized model needs."""
    trt = spec.tensorrt
    opt = spec.model.optimize
    assert opt is not None
    if opt.sparsity and not target.is_tensorrt:
        raise SpecError(
            f"model.optimize.sparsity: sparse weights are a TensorRT flag; the target is "
            f"{target.name} ({target.why})"
        )
    if target.name == "tensorrt" and trt.precision is None and opt.precision in ("fp16", "int8"):
        trt = trt.model_copy(update={"precision": opt.precision})
    pinned = spec.model_copy(update={"backend": target.backend, "tensorrt": trt})
    options = backend_options(pinned, signature)
    if opt.sparsity and options.engine is not None:
        engine = dataclasses.replace(options.engine, sparse_weights=True)
        options = dataclasses.replace(options, engine=engine)
    return options


def _same_io(original: ModelSignature, optimized: ModelSignature) -> None:
    def io(s: ModelSignature) -> list:
        return [(t.name, t.dtype.str, t.shape) for t in (*s.inputs, *s.outputs)]

    if io(original) != io(optimized):
        raise BackendError(
            f"model.optimize: the optimized model's inputs and outputs {io(optimized)} differ "
            f"from the original's {io(original)}"
        )


def _graph_summary(path: str) -> dict:
    model = onnx.load(path)
    precisions = graph.compute_precisions(model)
    return {
        "ops": graph.op_counts(model),
        "nodes": len(model.graph.node),
        "weights_bytes": graph.weight_bytes(model),
        "qdq": graph.qdq_counts(model),
        "compute_precisions": dict(Counter(p["precision"] for p in precisions)),
        "compute_nodes": precisions,
        "sparsity_2_4": graph.sparsity_2_4(model),
    }


def _evaluate(
    run: Runner, original: ModelSignature, optimized: ModelSignature, sample: Sample, batch: int
) -> tuple[dict, dict, dict]:
    """Both models through `run`: (reference outputs, optimized outputs, rows/s of each on
    the calibration rows, where the target runs here)."""
    outputs: dict[str, dict] = {}
    speed: dict[str, float] = {}
    for label, signature in (("original", original), ("optimized", optimized)):
        try:
            backend = run.load(signature)
        except BackendError as exc:
            raise BackendError(
                f"model.optimize: the accuracy gate cannot run the {label} model on {run.where} "
                f"here ({exc}); run batch-infer optimize where the target runs"
            ) from None
        with backend:
            outputs[label] = run_rows(backend, sample.gate, batch)
            if run.measures_target:
                speed[label] = rows_per_second(backend, sample.calibration, batch)
    return outputs["original"], outputs["optimized"], speed


def _tensorrt_layers(spec: JobSpec, target: Target, options: BackendOptions, path: str) -> dict:
    """TensorRT's layer table for the optimized model, when an engine can be built here."""
    from batch_infer.optimize.tensorrt_layers import layer_report

    if options.engine is None:
        return {"skipped": options.engine_problem or "no engine recipe"}
    wanted = spec.tensorrt.compute_capability
    if wanted is None and not gpu_here():
        return {
            "skipped": "no GPU here and tensorrt.compute_capability is unset: no engine was "
            'built (set it, e.g. "8.9", to build a TensorRT-RTX engine ahead)'
        }
    cc = parse_capability(wanted) if wanted is not None else None
    if target.name == "tensorrt" and not gpu_here():
        return {"skipped": "full TensorRT builds only on the GPU it targets; none is here"}
    engine = options.engine
    return layer_report(path, target.name, engine.profile, cc, engine.sparse_weights)


def optimize_plan(plan: JobPlan) -> JobPlan:
    """`plan` on its optimized model: from the cache, or made, gated and cached now.

    Raises GateFailed (exit 2, with every figure) when the optimized model's outputs differ
    from the original's beyond `model.optimize.gate`; then nothing is cached or used.
    """
    started = time.perf_counter()  # the report's time: the sample's read included
    spec = plan.spec
    opt = spec.model.optimize
    assert opt is not None
    target = resolve_target(spec, plan.backend)
    recipe = make_recipe(opt, target)
    options = pinned_options(spec, plan.signature, target)
    sample = draw_sample(plan, opt.calibration_rows, opt.gate.rows, opt.seed)
    key = ArtifactKey(
        source_sha256=plan.signature.sha256,
        target=target.key(),
        recipe=recipe.describe(),
        calibration=sample.fingerprint(),
        gate=opt.gate.model_dump(),
        tools=_tools(recipe),
    )
    original = plan.signature

    def make(work: Path) -> tuple[Path, dict]:
        path, notes = apply_recipe(original.path, recipe, sample.calibration, work)
        optimized = read_signature(str(path))
        _same_io(original, optimized)
        report: dict = {
            "model": original.path,
            "source_sha256": original.sha256,
            "target": {"name": target.name, "why": target.why, "key": target.key()},
            "recipe": recipe.describe(),
            "calibration": sample.describe(),
            "before": _graph_summary(original.path),
            "after": _graph_summary(str(path)),
            **notes,
        }
        if target.is_tensorrt:  # proves it builds for its target before it is cached
            report["tensorrt"] = _tensorrt_layers(spec, target, options, str(path))
        run = runner(target, options)
        batch = min(spec.batch_size, sample.calibration_rows)
        ref, got, speed = _evaluate(run, original, optimized, sample, batch)
        classifiers = classifier_outputs(original.path, original)
        figures = {name: compare(ref[name], got[name], name in classifiers) for name in ref}
        failed = failures(figures, opt.gate)
        report["gate"] = {
            "ran_on": run.where,
            "rows": sample.gate_rows,
            "thresholds": opt.gate.model_dump(),
            "outputs": figures,
            "classifier_outputs": sorted(classifiers),
            "passed": not failed,
            "failures": failed,
        }
        report["speed"] = (
            {
                "ran_on": run.where,
                "batch": batch,
                "original_rows_per_s": round(speed["original"], 1),
                "optimized_rows_per_s": round(speed["optimized"], 1),
                "speedup": round(speed["optimized"] / speed["original"], 3),
            }
            if speed
            else {"skipped": f"{target.name} cannot run here; the gate ran on {run.where}"}
        )
        report["seconds"] = round(time.perf_counter() - started, 2)
        if failed:
            raise GateFailed(
                f"model.optimize: the {recipe.precision} model for {target.name} fails the "
                f"accuracy gate on {sample.gate_rows} held-out rows (ran on {run.where}): "
                f"{'; '.join(failed)}; nothing was cached or used",
                report,
            )
        return path, report

    artifact = get_or_make(key, make, cache_dir=spec.tensorrt.cache_dir)
    pinned = spec.model_copy(update={"backend": target.backend})
    return dataclasses.replace(
        plan, spec=pinned, signature=artifact.signature, backend=options, optimized=artifact
    )
