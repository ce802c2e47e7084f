"""GPU benchmark (run by hand on the GPU machine): what ONNX Runtime CUDA's options and
ONNX Runtime's BERT rewrites do to the backend's compute rate, and to its answers.

Side by side in one run, batch 256, one batch resident on the device (gpu_bench's compute):
  ResNet-50 fp16 and BERT-base fp16 with the CUDA provider's `prefer_nhwc` and
  `enable_cuda_graph` on and off, outputs against the default options' on the same batch;
  BERT-base fp16 unfused, fused (ONNX Runtime's transformer optimizer: Attention,
  SkipLayerNormalization, ...) and in packing mode (padding removed inside the model),
  outputs against the fp32 model, on the benchmark's token rows (lengths 16-127 of 128).

    python benchmarks/gpu_options.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from benchmarks.gpu_bench import compute_rate, sample_feeds, to_fp16, workloads

GRID = [{}, {"prefer_nhwc": "1"}, {"enable_cuda_graph": "1"},
        {"prefer_nhwc": "1", "enable_cuda_graph": "1"}]  # fmt: skip


def outputs(model: Path, feeds: dict, **options: str) -> np.ndarray:
    """The model's first output on `feeds` from a plain session with the backend's base
    CUDA options plus `options`."""
    import onnxruntime as ort

    from batch_infer.backends.onnxruntime_cuda import CUDA_OPTIONS

    provider = ("CUDAExecutionProvider", {**CUDA_OPTIONS, **options})
    return ort.InferenceSession(str(model), providers=[provider]).run(None, feeds)[0]


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def options(ws: dict, seconds: float) -> dict:
    res = {}
    for name, w in ws.items():
        feeds, ref = sample_feeds(w), None
        for opts in GRID:
            key = f"{name} {json.dumps(opts)}"
            try:
                rate = compute_rate(w["model"], feeds, seconds, **opts)
                got = outputs(w["model"], feeds, **opts)
                ref = got if ref is None else ref
                res[key] = {"rate": round(rate), "rel_vs_default": rel(got, ref)}
            except Exception as exc:  # an option the model's graph cannot take
                res[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(key, res[key], flush=True)
    return res


def bert_forms(w: dict, work: Path, seconds: float) -> dict:
    """gpu_bench's fused BERT (`w["model"]`) against the same fp32 model converted without
    fusion, and in packing mode."""
    import onnx
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    feeds, fused = sample_feeds(w), w["model"]
    unfused = work / "bert-unfused-fp16.onnx"
    if not unfused.exists():
        to_fp16(w["fp32"], unfused)
    packing = PackingMode(OnnxModel(onnx.load(str(fused))))
    packing.convert()
    packed = work / "bert-packed-fp16.onnx"
    packing.model.save_model_to_file(str(packed))
    ref, res = outputs(w["fp32"], feeds), {}
    for form, model in [("fp16", unfused), ("fused", fused), ("packed", packed)]:
        rate = compute_rate(model, feeds, seconds)
        res[f"bert {form}"] = {"rate": round(rate), "rel_vs_fp32": rel(outputs(model, feeds), ref)}
        print(f"bert {form}", res[f"bert {form}"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-options"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ws = workloads(["resnet50", "bert"], args.work, 2048, 8192)
    res = options(ws, args.seconds) | bert_forms(ws["bert"], args.work, args.seconds)
    (args.out / "gpu-options.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
