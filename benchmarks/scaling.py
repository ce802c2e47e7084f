"""Scaling run (by hand, on a machine with several GPUs): the full job on 1..N GPUs.

Same data, same model, ONNX Runtime CUDA, batch 256: rows/s (steady state, between the first
and last shard commit), the ratio to one GPU, GPU utilization per device, and the inference
actors' CPU and memory. Each GPU count runs in a fresh Ray that sees only that many GPUs.

    python benchmarks/scaling.py --gpus 1 2 --workloads resnet50-fp16-bytes bert-fp16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import ray

import batch_infer
from benchmarks.gpu_bench import Sampler, workload
from benchmarks.steady import shard_entries, steady_rate


def run_on(gpus: int, name: str, w: dict, work: Path, out_dir: Path) -> dict:
    ray.init(
        num_gpus=gpus, include_dashboard=False, log_to_driver=False, object_store_memory=40 * 2**30
    )
    out = work / f"scale-{name}-{gpus}"
    spec = {
        "name": name,
        "input": {"path": w["data"]},
        "model": {"onnx": w["model"], "inputs": w["inputs"]},
        "batch_size": 256,
        "slots": 3,
        "shard_rows": 1024 if "resnet" in name else 4096,
        "output": {"path": str(out), "keep_columns": ["id"]},
    }
    sampler = Sampler(out_dir / f"smi-{name}-{gpus}gpu.csv")
    started = time.time()
    summary = batch_infer.run(spec, overwrite=True)
    util_rows, rss = sampler.finish_per_device()
    ray.shutdown()
    entries = shard_entries(out)
    return {
        "gpus": gpus,
        "rows": summary.rows,
        "wall_s": time.time() - started,
        "steady_rate": steady_rate(entries),
        "shards_per_gpu": {
            g: sum(e["gpu"] == g for e in entries) for g in {e["gpu"] for e in entries}
        },
        "gpu_util_mean_busy": util_rows,
        "actor_peak_rss_mib": rss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workloads", nargs="+", default=["resnet50-fp16-bytes", "bert-fp16"])
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--texts", type=int, default=200000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.workloads:
        w = workload(name, args.work, args.images, args.texts)
        results = [run_on(g, name, w, args.work, args.out) for g in args.gpus]
        base = results[0]["steady_rate"] / args.gpus[0]
        for r in results:
            r["ratio_to_one_gpu"] = r["steady_rate"] / base
            print(
                f"{name} on {r['gpus']} GPU(s): {r['steady_rate']:,.0f} rows/s steady, "
                f"{r['ratio_to_one_gpu']:.2f}x one GPU (goal {0.95 * r['gpus']:.2f}), "
                f"util per GPU {r['gpu_util_mean_busy']}, shards {r['shards_per_gpu']}, "
                f"actor RSS {r['actor_peak_rss_mib']:,.0f} MiB",
                flush=True,
            )
        (args.out / f"scaling-{name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
