"""GPU benchmark (run by hand on nvidia-h100-x1): models made by `model.optimize` for ONNX
Runtime CUDA against their fp32 exports.

  BERT-base, eager attention (transformers' attn_implementation="eager", random weights,
            seq 128), fusion + fp16: ONNX Runtime's transformer optimizer (num_heads 12,
            hidden 768), then its fp16 converter with fp32 inputs and outputs;
  ResNet-50 (tests/gpu_models.py), fp16 (no fusion: ONNX Runtime fuses convolutions itself).

Each is optimized in-process exactly as `batch-infer optimize` does (calibration and gate rows
from the job's own Parquet input, the accuracy gate on ONNX Runtime CUDA, the cache), then:
  compute   the backend's own rate, fp32 and optimized: one batch of 256 real rows resident
            on the device, launched again and again (benchmarks/gpu_bench.py's compute_rate);
  job       `batch-infer run` on the optimized model (a spec with model.optimize: it finds the
            optimized model in the cache) as a whole process: wall clock and steady rate
            against the optimized model's compute rate.
Prints the optimize report (fused ops, Attention among them) and the gate figures, and
writes gpu-optimize.json and gpu-optimize.md under --out ($OUT on the device machine).

    python benchmarks/gpu_optimize.py --out $OUT                 # about 3-4 minutes
    python benchmarks/gpu_optimize.py --target onnxruntime-cpu --bert tiny --workloads bert \\
        --texts 2048 --out /tmp/gpu-optimize-smoke                # its CPU-runnable parts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_bench import BATCH, CLI, SEQ, make_images, make_tokens, timed  # noqa: E402

BERT_SIZES = {  # name -> (layers, hidden, heads, intermediate)
    "base": (12, 768, 12, 3072),
    "tiny": (2, 64, 4, 128),
}


def export_bert_eager(path: Path, size: str, seq: int = SEQ) -> None:
    """BERT with eager attention, random weights: int64 ids, mask [N, seq] -> pooled [N, H]."""
    from tests.gpu_models import export_bert

    layers, hidden, heads, inner = BERT_SIZES[size]
    export_bert(
        path, seq, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=inner, attn_implementation="eager",
    )  # fmt: skip


def workloads(args: argparse.Namespace) -> dict[str, dict]:
    """Per workload: the fp32 export, its data and the spec's `model.optimize`."""
    out = {}
    target = {"target": args.target}
    if "bert" in args.workloads:
        fp32 = args.work / f"bert-{args.bert}-eager.onnx"
        if not fp32.exists():
            export_bert_eager(fp32, args.bert)
        make_tokens(args.work / "tokens", args.texts)
        _, hidden, heads, _ = BERT_SIZES[args.bert]
        out["bert"] = {
            "fp32": fp32, "data": args.work / "tokens", "inputs": {"ids": "ids", "mask": "mask"},
            "optimize": {"precision": "fp16", "fuse": True, "num_heads": heads,
                         "hidden_size": hidden, **target},
        }  # fmt: skip
    if "resnet50" in args.workloads:
        from tests.gpu_models import export_resnet50

        fp32 = args.work / "resnet50-fp32.onnx"
        if not fp32.exists():
            export_resnet50(fp32)
        make_images(args.work / "images", args.images)
        out["resnet50"] = {
            "fp32": fp32, "data": args.work / "images", "inputs": {"pixels": "pixels"},
            "optimize": {"precision": "fp16", "fuse": False, **target},
        }  # fmt: skip
    return out


def spec_doc(name: str, w: dict, work: Path, cache: Path, optimize: bool) -> dict:
    doc = {
        "name": name,
        "input": {"path": str(w["data"])},
        "model": {"onnx": str(w["fp32"]), "inputs": w["inputs"]},
        "backend": "onnxruntime",
        "batch_size": BATCH,
        "output": {"path": str(work / f"out-{name}"), "keep_columns": ["id"]},
        "tensorrt": {"cache_dir": str(cache)},
    }
    if optimize:
        doc["model"]["optimize"] = w["optimize"]
    return doc


def optimize(doc: dict) -> tuple[float, dict, dict[str, np.ndarray]]:
    """`batch-infer optimize` in-process: (seconds, report, one batch of the job's rows)."""
    from batch_infer.actor import prepare_shard
    from batch_infer.data.sharding import plan_shards
    from batch_infer.planning import build_plan
    from batch_infer.spec import resolve_spec

    started = time.perf_counter()
    plan = build_plan(resolve_spec(doc))
    seconds = time.perf_counter() - started
    assert plan.optimized is not None
    report = plan.optimized.report | {
        "optimized_model": plan.signature.path,
        "optimized_sha256": plan.signature.sha256,
        "cached": not plan.optimized.made,
    }
    shard = max(plan_shards(plan.dataset, None)[:8], key=lambda s: s.rows or 0)
    _, _, feeds, _ = prepare_shard(plan, shard, "bench", 0)
    return seconds, report, {k: v[:BATCH] for k, v in feeds.items()}


def compute_rate(model: str, feeds: dict[str, np.ndarray], seconds: float, target: str) -> float:
    """The backend's own rate on one batch: resident on the GPU (gpu_bench's), or on the CPU
    (ONNX Runtime on all cores) for a run without one."""
    if target == "onnxruntime-cuda":
        from benchmarks.gpu_bench import compute_rate as on_gpu

        return on_gpu(Path(model), feeds, seconds)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feeds)
        runs += 1
    return runs * len(next(iter(feeds.values()))) / (time.perf_counter() - start)


def job(doc: dict, work: Path, out: Path) -> dict:
    """`batch-infer run` as a whole process, timed from outside, with its run record."""
    path = work / f"{doc['name']}.yaml"
    path.write_text(json.dumps(doc))
    seconds = timed([*CLI, "run", str(path), "--overwrite", "-q"], out / f"{doc['name']}-job.log")
    output = Path(doc["output"]["path"])
    (run,) = [json.loads(p.read_text()) for p in (output / "_runs").glob("*.json")]
    t = run["timeline"]
    steady = run["rows"] / max(t["last_batch"] - t["first_batch"], 1e-9)
    job_json = json.loads((output / "_manifest" / "job.json").read_text())
    return {"seconds": round(seconds, 2), "rows": run["rows"], "steady": round(steady, 1),
            "timeline": t, "backend": run["backend"], "model_sha256": job_json["model_sha256"],
            "recipe": job_json.get("optimize", {}).get("recipe")}  # fmt: skip


def summary(name: str, r: dict) -> list[str]:
    rep, j = r["report"], r["job"]
    gate = rep["gate"]
    figures = "; ".join(
        f"{o}: rel L2 {f.get('rel_l2', float('nan')):.2e}, max abs "
        f"{f.get('max_abs', float('nan')):.3g}, cosine {f.get('cosine', float('nan')):.6f}"
        + (f", top-1 {f['top1_agreement']:.4f}" if "top1_agreement" in f else "")
        for o, f in gate["outputs"].items()
    )
    fused = rep.get("fusion", {}).get("fused", {})
    return [
        f"## {name}",
        "",
        f"- recipe: {', '.join(f'{k} {v}' for k, v in rep['recipe'].items())}",
        f"- fused: {fused or 'none'}; not fused: {rep.get('fusion', {}).get('not_fused') or '-'}",
        f"- gate ({'passed' if gate['passed'] else 'FAILED'}, {gate['rows']} held-out rows, "
        f"{gate['ran_on']}): {figures}",
        f"- optimize: {r['optimize_seconds']:.1f} s; nodes {rep['before']['nodes']} -> "
        f"{rep['after']['nodes']}; weights {rep['before']['weights_bytes']:,} -> "
        f"{rep['after']['weights_bytes']:,} bytes",
        "",
        "| | rows/s | vs fp32 compute |",
        "|---|---:|---:|",
        f"| compute, fp32 export | {r['compute_fp32']:,.0f} | 1.00 |",
        f"| compute, optimized | {r['compute']:,.0f} | {r['compute'] / r['compute_fp32']:.2f}x |",
        f"| job on the optimized model, steady (first to last batch) | {j['steady']:,.0f} | "
        f"{j['steady'] / r['compute_fp32']:.2f}x ({j['steady'] / r['compute']:.2f} of its "
        "compute) |",
        f"| job on the optimized model, wall clock ({j['rows']:,} rows in {j['seconds']:.1f} s) "
        f"| {j['rows'] / j['seconds']:,.0f} | {j['rows'] / j['seconds'] / r['compute_fp32']:.2f}x"
        f" ({j['rows'] / j['seconds'] / r['compute']:.2f} of its compute) |",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["bert", "resnet50"])
    ap.add_argument("--target", default="onnxruntime-cuda",
                    choices=("onnxruntime-cuda", "onnxruntime-cpu"))  # fmt: skip
    ap.add_argument("--bert", default="base", choices=sorted(BERT_SIZES))
    ap.add_argument("--texts", type=int, default=65_536)
    ap.add_argument("--images", type=int, default=20_480)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-optimize"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    started = time.perf_counter()
    ws = workloads(args)
    print(f"models and data ready in {time.perf_counter() - started:.0f} s", flush=True)
    results = {}
    for name, w in ws.items():
        seconds, report, feeds = optimize(spec_doc(name, w, args.work, cache, True))
        print(f"{name}: optimized in {seconds:.1f} s -> {report['optimized_model']}", flush=True)
        print(json.dumps({k: report.get(k) for k in ("recipe", "fusion", "gate", "speed")},
                         indent=1), flush=True)  # fmt: skip
        res = {"report": report, "optimize_seconds": round(seconds, 1), "batch": BATCH}
        res["compute_fp32"] = compute_rate(str(w["fp32"]), feeds, args.seconds, args.target)
        res["compute"] = compute_rate(report["optimized_model"], feeds, args.seconds, args.target)
        res["job"] = job(spec_doc(name, w, args.work, cache, True), args.work, args.out)
        assert res["job"]["model_sha256"] == report["optimized_sha256"]
        results[name] = res
        print("\n".join(summary(name, res)), flush=True)
    lines = [
        f"# Models optimized for {args.target} by `model.optimize` against their fp32 exports",
        "",
        f"Written by `python benchmarks/gpu_optimize.py --target {args.target} --bert "
        f"{args.bert}` ({time.perf_counter() - started:.0f} s in all). Batch {BATCH}; compute: "
        "one batch of real rows resident on the device, launched again and again; job: "
        "`batch-infer run` as a whole process (its plan finds the optimized model in the "
        "cache).",
        "",
    ]
    for name, res in results.items():
        lines += summary(name, res)
    (args.out / "gpu-optimize.md").write_text("\n".join(lines))
    (args.out / "gpu-optimize.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / 'gpu-optimize.md'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
