"""What a one-GPU run pays before its lane loads the model (run by hand on the GPU machine).

The run's timeline starts at process start; on an H100 its lane began loading the model
2.1 s later, against 1.0 s on the 2-core CPU machine. Each piece here is a whole fresh
process timed from outside (median of `--repeat`), so their differences say where that goes:
  bare         `python -c pass` (interpreter, site-packages)
  cli          importing `batch_infer.cli` (what `batch-infer run` imports before it starts)
  backends     importing `batch_infer.backends` (cuda-python comes with it only when used)
  gpus         that, and counting the GPUs (CUDA's initialization: the run decides with it
               whether Ray starts)
  onnxruntime  importing onnxruntime (the lane does it while the shards are planned)
then, side by side, ResNet-50's compute rate and a `batch-infer run` on `--images` images
(whole-process wall clock and the run's timeline).

    python benchmarks/gpu_startup.py --images 200000 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_bench import compute_rate, job, sample_feeds, workloads

PIECES = {
    "bare": "pass",
    "cli": "import batch_infer.cli",
    "backends": "import batch_infer.backends",
    "gpus": "import batch_infer.backends as b; b.local_gpus()",
    "onnxruntime": "import onnxruntime",
}


def seconds(code: str, repeat: int) -> float:
    """Median wall clock of `python -c code` as a fresh process."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"pieces": {k: seconds(code, args.repeat) for k, code in PIECES.items()}}
    print(json.dumps(res), flush=True)
    w = workloads(["resnet50"], args.work, args.images, 0)["resnet50"]
    res["compute"] = compute_rate(w["model"], sample_feeds(w), 5.0)
    j = job(f"startup-{args.images}", w, args.work, args.out)
    j.pop("shard_rates")
    res["job"] = j
    res["wall_vs_compute"] = round(j["rows"] / j["seconds"] / res["compute"], 3)
    print(json.dumps(res), flush=True)
    (args.out / "gpu-startup.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
