"""Where a one-GPU run's time goes (run by hand on the GPU machine, before changing the run).

ResNet-50 fp16 on raw bytes, side by side in one run:
  compute    one stream, one resident batch launched again and again (gpu_bench's figure);
  2 slots    two resident batches on two slots, launched alternately: what the run's two
             slots can reach at best (on the one compute stream they share since a68990c);
  first run  the first launch of a freshly loaded session against a warm one;
  jobs       `batch-infer run` whole processes with `slots` 2 and 4; each shard's prepare,
             inference and commit times in the first (where the time before the first batch
             and between batches goes).

    python benchmarks/gpu_probe.py --images 50000 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.gpu_bench import BATCH, job, sample_feeds, workloads


def two_stream_rate(model: Path, feeds: dict, seconds: float) -> float:
    from batch_infer.backends.cuda_streams import check, cudart
    from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA
    from batch_infer.model import read_signature

    with OnnxRuntimeCUDA(read_signature(str(model)), slots=2) as backend:
        a, b = backend.resident(feeds), backend.resident(feeds)
        for batch in (a, b):
            batch.launch(3)
        a.wait(), b.wait()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(5):
                a.launch()
                b.launch()
            runs += 10
            check(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        rate = runs * BATCH / (time.perf_counter() - start)
        a.close(), b.close()
        return rate


def first_run(model: Path, feeds: dict) -> dict:
    from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA
    from batch_infer.model import read_signature

    started = time.perf_counter()
    backend = OnnxRuntimeCUDA(read_signature(str(model)), slots=2)
    loaded = time.perf_counter()
    times = []
    with backend, backend.resident(feeds) as batch:
        for _ in range(3):
            t = time.perf_counter()
            batch.launch()
            batch.wait()
            times.append(round(time.perf_counter() - t, 4))
    return {"load_seconds": round(loaded - started, 3), "launches": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    w = workloads(["resnet50"], args.work, args.images, 0)["resnet50"]
    feeds = sample_feeds(w)
    from benchmarks.gpu_bench import compute_rate

    res: dict = {"first_run": first_run(w["model"], feeds)}
    res["compute_1_stream"] = compute_rate(w["model"], feeds, 4.0)
    res["compute_2_streams"] = two_stream_rate(w["model"], feeds, 4.0)
    print(json.dumps(res), flush=True)
    for slots in (2, 4):
        j = job(f"probe-s{slots}", w, args.work, args.out, extra={"slots": slots})
        j.pop("shard_rates")
        res[f"job_slots{slots}"] = j
        print(slots, json.dumps(j), flush=True)
    out = args.work / "out-probe-s2" / "_manifest" / "shards"
    entries = sorted(
        (json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda e: e["infer_started"]
    )
    start = min(e["prepare_started"] for e in entries)
    res["shards"] = [
        [round(e["prepare_started"] - start, 3), e["prepare_seconds"],
         round(e["infer_started"] - start, 3), e["infer_seconds"],
         round(e["committed_at"] - start, 3), e["rows"]]
        for e in entries
    ]  # fmt: skip
    print(json.dumps(res["shards"]), flush=True)
    (args.out / "gpu-probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
