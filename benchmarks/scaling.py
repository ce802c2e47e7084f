"""Scaling run (by hand, on a machine with several GPUs): `batch-infer run` on 1..N GPUs.

The same data and fp16 model as `gpu_bench.py`, each GPU count a whole `batch-infer run`
process whose Ray sees only that many GPUs (CUDA_VISIBLE_DEVICES): wall clock, rows/s, the
ratio to one GPU, and each actor's device-busy share from the run's timeline.

    python benchmarks/scaling.py --gpus 1 2 --workloads resnet50 bert --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.gpu_bench import job, workloads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workloads", nargs="+", default=["resnet50", "bert"])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--texts", type=int, default=131_072)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, w in workloads(args.workloads, args.work, args.images, args.texts).items():
        rates = {}
        for gpus in args.gpus:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
            res = job(f"{name}-{gpus}gpu", w, args.work, args.out, env)
            rates[gpus] = res["rows"] / res["seconds"]
            busy = [a["busy_while_running"] for a in res["actors"]]
            print(
                f"{name} on {gpus} GPU(s): {rates[gpus]:,.0f} rows/s (wall), "
                f"x{rates[gpus] / rates[args.gpus[0]]:.2f}, busy {busy}",
                flush=True,
            )
            results[f"{name}-{gpus}"] = res
    (args.out / "scaling.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
