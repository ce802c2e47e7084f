"""GPU benchmark (run by hand on the GPU machine; see docs/gpu.md for the figures).

For each workload, side by side in one run, all with ONNX Runtime CUDA and batch 256:
  (1) compute: the backend's own binding, device-resident inputs, no copies;
  (2) slot loop with copies (pinned host -> device -> host), one slot, then K slots;
  (3) the full job, Parquet to Parquet, with GPU utilization and actor RSS sampled.

    python benchmarks/gpu_bench.py --workloads resnet50-fp16-bytes resnet50-fp16-list \
        --images 40000 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

import batch_infer
from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA
from batch_infer.model import read_signature
from benchmarks.steady import shard_entries, steady_rate
from tests.gpu_models import export_bert, export_resnet50

BATCH = 256


def workload(name: str, work: Path, images: int, texts: int) -> dict:
    """(model path, data dir, spec inputs, rows) for a workload name like resnet50-fp16-bytes."""
    family, precision, layout = [*name.split("-"), "tokens"][:3]
    fp16 = precision == "fp16"
    model = work / f"{family}-{precision}.onnx"
    data = work / f"data-{family}-{layout}"
    if family == "resnet50":
        if not model.exists():
            export_resnet50(model, fp16=fp16)
        if not data.exists():
            data.mkdir(parents=True)
            rng = np.random.default_rng(0)
            per_file = 4096
            for i, start in enumerate(range(0, images, per_file)):
                n = min(per_file, images - start)
                px = rng.integers(0, 256, (n, 224 * 224 * 3), dtype=np.uint8)
                col = (
                    pa.FixedSizeListArray.from_arrays(pa.array(px.reshape(-1)), px.shape[1])
                    if layout == "list"
                    else pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(px.shape[1]), n, [None, pa.py_buffer(px)]
                    )
                )
                pq.write_table(
                    pa.table({"id": np.arange(start, start + n), "pixels": col}),
                    data / f"part-{i:04d}.parquet",
                    row_group_size=512,
                    compression="none",
                )
        return {
            "model": str(model),
            "data": str(data),
            "inputs": {"pixels": "pixels"},
            "rows": images,
        }
    if not model.exists():
        export_bert(model, fp16=fp16)
    if not data.exists():
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        seq = 128
        ids = rng.integers(1000, 30000, (texts, seq))
        lengths = rng.integers(16, seq, texts)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        table = pa.table(
            {
                "id": np.arange(texts),
                "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq),
                "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), seq),
            }
        )
        pq.write_table(table, data / "tokens.parquet", row_group_size=4096)
    return {
        "model": str(model),
        "data": str(data),
        "inputs": {"ids": "ids", "mask": "mask"},
        "rows": texts,
    }


def sample_batches(w: dict, count: int) -> list[dict[str, np.ndarray]]:
    """Real rows from the data set, converted the way the job converts them."""
    from batch_infer.actor import prepare_shard
    from batch_infer.data.sharding import plan_shards
    from batch_infer.planning import build_plan
    from batch_infer.spec import resolve_spec

    spec = resolve_spec(
        {
            "name": "s",
            "input": {"path": w["data"]},
            "model": {"onnx": w["model"], "inputs": w["inputs"]},
            "output": {"path": "/tmp/unused"},
        }
    )
    plan = build_plan(spec)
    _, keep, feeds, _ = prepare_shard(plan, plan_shards(plan.dataset, None)[0], "bench", 0)
    n = max(1, keep.num_rows // BATCH)
    return [
        {k: v[(i % n) * BATCH : (i % n + 1) * BATCH] for k, v in feeds.items()}
        for i in range(count)
    ]


def compute_rate(sig, batches, seconds: float) -> float:
    """The backend's own rate: one batch resident on the device, launched again and again."""
    with OnnxRuntimeCUDA(sig, slots=1) as backend, backend.resident(batches[0]) as batch:
        batch.launch(5)
        batch.wait()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch.launch(10)
            runs += 10
            batch.wait()
        return runs * batch.rows / (time.perf_counter() - start)


def loop_rate(sig, batches, slots: int, seconds: float) -> float:
    backend = OnnxRuntimeCUDA(sig, slots=slots)
    for _ in backend.run(batches[:4]):
        pass
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in backend.run(batches):
            rows += BATCH
    rate = rows / (time.perf_counter() - start)
    backend.close()
    return rate


class Sampler:
    """GPU utilization (nvidia-smi) and the inference actors' RSS, while the job runs."""

    def __init__(self, path: Path) -> None:
        self.smi = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=index,utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
            ],
            stdout=open(path, "w"),  # noqa: SIM115 - nvidia-smi writes to it until finish()
        )
        self.path, self.rss, self.stop = path, 0, False
        self.thread = threading.Thread(target=self._rss, daemon=True)
        self.thread.start()

    def _rss(self) -> None:
        while not self.stop:
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "InferenceActor" in cmd and p.info["memory_info"]:
                    self.rss = max(self.rss, p.info["memory_info"].rss)
            time.sleep(0.5)

    def finish_per_device(self) -> tuple[dict[str, float], int]:
        """Mean utilization of each GPU over the samples where it was busy, and peak RSS."""
        self.stop = True
        self.smi.terminate()
        self.thread.join()
        per: dict[str, list[float]] = {}
        for line in self.path.read_text().splitlines():
            if line.count(",") == 2:
                index, util, _ = (x.strip() for x in line.split(","))
                per.setdefault(index, []).append(float(util))
        means = {
            i: round(float(np.mean([u for u in v if u > 0] or [0])), 1) for i, v in per.items()
        }
        return means, self.rss

    def finish(self) -> tuple[list[float], int]:
        self.stop = True
        self.smi.terminate()
        self.thread.join()
        util = [
            float(line.split(",")[1])
            for line in self.path.read_text().splitlines()
            if line.count(",") == 2
        ]
        return util, self.rss


def job_rate(w: dict, work: Path, name: str, slots: int, out_dir: Path) -> dict:
    out = work / f"out-{name}"
    spec = {
        "name": name,
        "input": {"path": w["data"]},
        "model": {"onnx": w["model"], "inputs": w["inputs"]},
        "batch_size": BATCH,
        "slots": slots,
        "shard_rows": 1024 if "resnet" in name else 4096,
        "output": {"path": str(out), "keep_columns": ["id"]},
    }
    sampler = Sampler(out_dir / f"smi-{name}.csv")
    summary = batch_infer.run(spec, overwrite=True)
    util, rss = sampler.finish()
    busy = [u for u in util if u > 0]
    return {
        "rows": summary.rows,
        "wall_rate": summary.rows / summary.seconds,
        "steady_rate": steady_rate(shard_entries(out)),
        "gpu_util_mean_busy": float(np.mean(busy)) if busy else 0.0,
        "gpu_util_samples": len(util),
        "actor_peak_rss_mib": rss / 2**20,
        "seconds": summary.seconds,
        "backend": summary.backend,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", required=True)
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--texts", type=int, default=100000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    for name in args.workloads:
        t0 = time.perf_counter()
        w = workload(name, args.work, args.images, args.texts)
        made = time.perf_counter() - t0
        sig = read_signature(w["model"])
        batches = sample_batches(w, 16)
        res = {"workload": name, "batch": BATCH, "setup_seconds": round(made, 1)}
        res["compute"] = compute_rate(sig, batches, args.seconds)
        res["loop_1_slot"] = loop_rate(sig, batches, 1, args.seconds)
        res[f"loop_{args.slots}_slots"] = loop_rate(sig, batches, args.slots, args.seconds)
        res["job"] = job_rate(w, args.work, name, args.slots, args.out)
        (args.out / f"gpu-{name}.json").write_text(json.dumps(res, indent=1))
        c = res["compute"]
        print(
            f"{name}: compute {c:,.0f}/s | loop 1 slot {res['loop_1_slot'] / c:.2f} | "
            f"loop {args.slots} slots {res[f'loop_{args.slots}_slots'] / c:.2f} | "
            f"job steady {res['job']['steady_rate'] / c:.2f} "
            f"({res['job']['steady_rate']:,.0f}/s), wall {res['job']['wall_rate'] / c:.2f} | "
            f"GPU util {res['job']['gpu_util_mean_busy']:.0f}% | actor RSS "
            f"{res['job']['actor_peak_rss_mib']:,.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
