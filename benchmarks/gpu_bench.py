"""GPU benchmark (run by hand on the GPU machine): what a user waits for.

For each workload, side by side in one run, ONNX Runtime CUDA, batch 256:
  compute   the backend's own rate: one batch resident on the device, launched again and
            again (no copies, no Python between launches);
  job       `batch-infer run SPEC` as a whole process (interpreter, imports, its own Ray,
            planning, model load, every shard, commits, exit), timed from outside, with the
            run's own timeline from `_runs/`;
  ray-data  the same data and model through Ray Data as a user would write it
            (read_parquet -> map_batches(ORT CUDA actor, num_gpus=1) -> write_parquet), also a
            whole process with its own `ray.init()`; its session gets the backend's CUDA
            provider options (NHWC convolutions for ResNet-50), so the two differ only in
            how rows reach the model and leave it.
fp16 models come from ONNX Runtime's converter with fp32 inputs and outputs kept (a torch
`.half()` export gives wrong answers); their agreement with fp32 is measured and printed.
BERT-base is fused first by ONNX Runtime's transformer optimizer, as `model.optimize` does
(1.66x the unfused fp16 model's compute rate on an H100, docs/gpu.md); both runs get it.
`--cudnn-search` also times cuDNN's three searches (the backend's HEURISTIC came from them).

    python benchmarks/gpu_bench.py --workloads resnet50 bert --images 100000 --texts 131072 \
        --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BATCH = 256
SEQ = 128
IMAGE = 224 * 224 * 3
# How the benchmarks start `batch-infer`: the GPU machine's pack carries no scripts, so no
# `batch-infer` on its PATH; faulthandler lets `timed` get the stacks of a run that hangs.
CLI = (sys.executable, "-X", "faulthandler", "-m", "batch_infer.cli")


def _image_file(args: tuple[Path, int, int]) -> None:
    path, start, n = args
    px = np.random.default_rng(start).integers(0, 256, (n, IMAGE), dtype=np.uint8)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(IMAGE), n, [None, pa.py_buffer(px)])
    table = pa.table({"id": np.arange(start, start + n), "pixels": col})
    pq.write_table(table, path, row_group_size=256, compression="none")


def write_files(root: Path, rows: int, per_file: int, write_file, workers: int) -> None:
    """Parquet files of `per_file` rows made by `write_file((path, start, n))` on `workers`
    processes, under a temporary name renamed at the end: a cut-short run leaves no data set."""
    if root.exists():
        return
    tmp = root.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    jobs = [
        (tmp / f"part-{i:05d}.parquet", s, min(per_file, rows - s))
        for i, s in enumerate(range(0, rows, per_file))
    ]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_file, jobs))
    tmp.rename(root)
    # On disk before anything is timed: a user's data was written long before the job, and
    # the kernel's write-back of 30 GB would slow loading the libraries and the model.
    os.sync()


def make_images(root: Path, images: int, per_file: int = 1024) -> None:
    """Raw uint8 NHWC pixels as fixed_size_binary: files of 1,024 images, row groups of 256."""
    write_files(root, images, per_file, _image_file, max(1, (os.cpu_count() or 2) - 2))


def _token_file(args: tuple[Path, int, int]) -> None:
    path, start, n = args
    rng = np.random.default_rng(start)
    ids = rng.integers(1000, 30000, (n, SEQ))
    lengths = rng.integers(16, SEQ, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    table = pa.table(
        {
            "id": np.arange(start, start + n),
            "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), SEQ),
            "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), SEQ),
        }
    )
    pq.write_table(table, path, row_group_size=1024)


def make_tokens(root: Path, rows: int, per_file: int = 4096) -> None:
    """int64 ids and mask as fixed-size lists of 128: files of 4,096 rows."""
    write_files(root, rows, per_file, _token_file, max(1, (os.cpu_count() or 2) - 2))


def to_fp16(src: Path, dst: Path) -> None:
    """ONNX Runtime's fp16 converter, inputs and outputs kept as they were."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def fuse_to_fp16(src: Path, dst: Path) -> None:
    """BERT as `model.optimize` makes it for ONNX Runtime CUDA: the transformer fusions
    (Attention, SkipLayerNormalization, ...), then fp16 with inputs and outputs kept."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=768,
                           opt_level=0, use_gpu=True)  # fmt: skip
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))


def workloads(names: list[str], work: Path, images: int, texts: int) -> dict[str, dict]:
    from tests.gpu_models import export_bert, export_resnet50

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        fp32, fp16 = work / f"{name}-fp32.onnx", work / f"{name}-fp16.onnx"
        if name == "resnet50":
            if not fp32.exists():
                export_resnet50(fp32)
            data, inputs, rows = work / f"images-{images}", {"pixels": "pixels"}, images
            make_images(data, images)
            output = "logits"
        else:
            fp32, fp16 = work / "bert-eager-fp32.onnx", work / "bert-fused-fp16.onnx"
            if not fp32.exists():  # the attention form ONNX Runtime's fusion matches
                export_bert(fp32, seq=SEQ, attn_implementation="eager")
            data, inputs, rows = work / f"tokens-{texts}", {"ids": "ids", "mask": "mask"}, texts
            make_tokens(data, texts)
            output = "pooled"
            if not fp16.exists():
                fuse_to_fp16(fp32, fp16)
        if not fp16.exists():
            to_fp16(fp32, fp16)
        out[name] = {"fp32": fp32, "model": fp16, "data": data, "inputs": inputs, "rows": rows,
                     "output": output}  # fmt: skip
    return out


def sample_feeds(w: dict) -> dict[str, np.ndarray]:
    """One batch of real rows, converted the way the job converts them."""
    from batch_infer.actor import prepare_shard
    from batch_infer.data.sharding import plan_shards
    from batch_infer.planning import build_plan
    from batch_infer.spec import resolve_spec

    spec = resolve_spec(
        {
            "name": "sample",
            "input": {"path": str(w["data"])},
            "model": {"onnx": str(w["model"]), "inputs": w["inputs"]},
            "output": {"path": "/tmp/bench-unused"},
        }
    )
    plan = build_plan(spec)
    shard = max(plan_shards(plan.dataset, None)[:8], key=lambda s: s.rows or 0)
    _, _, feeds, _ = prepare_shard(plan, shard, "bench", 0)
    return {k: v[:BATCH] for k, v in feeds.items()}


def compute_rate(model: Path, feeds: dict[str, np.ndarray], seconds: float, **cuda: str) -> float:
    """The backend's own rate: one batch resident on the device, launched again and again."""
    from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA
    from batch_infer.model import read_signature

    with (
        OnnxRuntimeCUDA(read_signature(str(model)), slots=1, cuda_options=cuda) as backend,
        backend.resident(feeds) as batch,
    ):
        batch.launch(10)
        batch.wait()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch.launch(10)
            runs += 10
            batch.wait()
        return runs * batch.rows / (time.perf_counter() - start)


def agreement(w: dict, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """fp16 against fp32 on the same batch: relative L2 error, top-1 agreement."""
    import onnxruntime as ort

    outs = []
    for model in (w["fp32"], w["model"]):
        session = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider"])
        outs.append(session.run(None, feeds)[0].astype(np.float64))
    ref, got = outs
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return {"rel_l2": rel, "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1)))}


class GpuSampler:
    """nvidia-smi utilization every 200 ms while the `with` block runs; `util` after it. It
    stops on an error too: left running, it held the benchmark's output pipe open, and a
    probe whose first job failed at once looked like a job that hung (2026-12-05)."""

    def __init__(self, path: Path) -> None:
        self.path, self.util = path, 0.0

    def __enter__(self) -> GpuSampler:
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", "200"],
            stdout=self.path.open("w"), stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()
        samples = [float(x) for x in self.path.read_text().split() if x.strip().isdigit()]
        busy = [u for u in samples if u > 0]
        self.util = round(float(np.mean(busy)), 1) if busy else 0.0


def timed(argv: list[str], log: Path, env: dict | None = None, limit: float = 900) -> float:
    """Seconds `argv` took. Past `limit`, SIGABRT: a Python started with `-X faulthandler`
    writes every thread's stack into `log` (where a run hangs), then this raises."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait()
            raise RuntimeError(f"{argv} ran past {limit:.0f} s: stacks in {log}") from None
    if rc != 0:
        raise RuntimeError(f"{argv} exited {rc}: see {log}")
    return time.perf_counter() - start


def job(
    name: str,
    w: dict,
    work: Path,
    out_dir: Path,
    env: dict | None = None,
    extra: dict | None = None,
    limit: float = 240,
) -> dict:
    """`batch-infer run` as a whole process; `env` for e.g. CUDA_VISIBLE_DEVICES, `extra`
    spec keys (e.g. slots), `limit` seconds before it is stopped with its threads' stacks in
    its log."""
    out = work / f"out-{name}"
    spec = {
        **(extra or {}),
        "name": name,
        "input": {"path": str(w["data"])},
        "model": {"onnx": str(w["model"]), "inputs": w["inputs"]},
        "batch_size": BATCH,
        "output": {"path": str(out), "keep_columns": ["id"]},
    }
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    argv = [*CLI, "-v", "run", str(path), "--overwrite"]
    with GpuSampler(out_dir / f"smi-{name}-job.csv") as sampler:
        seconds = timed(argv, out_dir / f"{name}-job.log", env, limit)
    (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    entries = sorted(
        (json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")),
        key=lambda e: e["infer_started"],
    )
    shard_rates = [(e["actor"], round(e["rows"] / max(e["infer_seconds"], 1e-3))) for e in entries]
    return {"seconds": round(seconds, 2), "rows": run["rows"], "timeline": run["timeline"],
            "shard_rates": shard_rates,
            "actors": run["actor_stats"], "shards": run["shards_total"],
            "gpu_util_busy": sampler.util, "backend": run["backend"]}  # fmt: skip


RAY_DATA = """
import json, sys, time, numpy as np, pyarrow as pa, ray, onnxruntime as ort
data, model, out, inputs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
options = json.loads(sys.argv[5])
ray.init(include_dashboard=False)

class Predict:
    def __init__(self):
        provider = ("CUDAExecutionProvider", options)
        self.session = ort.InferenceSession(model, providers=[provider])
        self.output = self.session.get_outputs()[0].name
        self.types = {i.name: i for i in self.session.get_inputs()}

    def tensor(self, column, name):
        t = self.types[name]
        if pa.types.is_fixed_size_binary(column.type):
            column, width = column.combine_chunks(), column.type.byte_width
            raw = np.frombuffer(column.buffers()[1], np.uint8)
            raw = raw[column.offset * width : (column.offset + len(column)) * width]
            return raw.reshape(len(column), *t.shape[1:])
        return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.int64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        feeds = {name: self.tensor(batch.column(name), name) for name in inputs}
        result = self.session.run([self.output], feeds)[0]
        return pa.table({"id": batch.column("id"),
                         self.output: pa.FixedSizeListArray.from_arrays(
                             pa.array(result.reshape(-1)), result.shape[1])})

ds = ray.data.read_parquet(data)
ds = ds.map_batches(Predict, batch_size=256, batch_format="pyarrow", num_gpus=1, concurrency=1)
ds.write_parquet(out)
"""


def ray_data(name: str, w: dict, work: Path, out_dir: Path) -> dict:
    out = work / f"raydata-{name}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    from batch_infer.backends.onnxruntime_cuda import provider_options
    from batch_infer.model import read_signature

    options = provider_options(read_signature(str(w["model"])))  # the backend's own
    argv = [sys.executable, "-c", RAY_DATA, str(w["data"]), str(w["model"]), str(out),
            ",".join(w["inputs"]), json.dumps(options)]  # fmt: skip
    with GpuSampler(out_dir / f"smi-{name}-raydata.csv") as sampler:
        seconds = timed(argv, out_dir / f"{name}-raydata.log")
    rows = pq.ParquetDataset(str(out)).read(columns=["id"]).num_rows
    return {"seconds": round(seconds, 2), "rows": rows, "gpu_util_busy": sampler.util}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["resnet50", "bert"])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--texts", type=int, default=131_072)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--no-ray-data", action="store_true")
    ap.add_argument("--cudnn-search", action="store_true", help="also time cuDNN's 3 searches")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    made = time.perf_counter()
    ws = workloads(args.workloads, args.work, args.images, args.texts)
    print(f"models and data ready in {time.perf_counter() - made:.0f} s", flush=True)
    results = {}
    for name, w in ws.items():
        feeds = sample_feeds(w)
        res = {"workload": name, "batch": BATCH, "rows": w["rows"]}
        res["fp16_vs_fp32"] = agreement(w, feeds)
        res["compute_fp32"] = compute_rate(w["fp32"], feeds, args.seconds)
        res["compute"] = compute_rate(w["model"], feeds, args.seconds)
        for search in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT") if args.cudnn_search else ():
            started = time.perf_counter()
            rate = compute_rate(w["model"], feeds, args.seconds, cudnn_conv_algo_search=search)
            res[f"compute_{search}"] = {"rate": rate, "seconds": time.perf_counter() - started}
        res["job"] = job(name, w, args.work, args.out)
        if not args.no_ray_data:
            res["ray_data"] = ray_data(name, w, args.work, args.out)
        results[name] = res
        c, j = res["compute"], res["job"]
        line = (
            f"{name}: fp16 compute {c:,.0f}/s (fp32 {res['compute_fp32']:,.0f}/s; fp16 vs fp32 "
            f"{res['fp16_vs_fp32']}) | job {j['rows']:,} rows in {j['seconds']:.1f} s = "
            f"{j['rows'] / j['seconds']:,.0f}/s = {j['rows'] / j['seconds'] / c:.2f} of compute"
            f" | first commit {j['timeline'].get('first_commit')} s | GPU {j['gpu_util_busy']}%"
        )
        if "ray_data" in res:
            r = res["ray_data"]
            rate = r["rows"] / r["seconds"]
            line += (
                f" | Ray Data {r['rows']:,} rows in {r['seconds']:.1f} s = {rate:,.0f}/s "
                f"({rate / c:.2f} of compute); job / Ray Data {r['seconds'] / j['seconds']:.2f}"
            )
        print(line, flush=True)
        print(f"  timeline {j['timeline']}\n  actors {j['actors']}", flush=True)
        if args.cudnn_search:
            print("  cudnn search: " + ", ".join(
                f"{k[8:]} {v['rate']:,.0f}/s ({v['seconds']:.1f} s with load and warm-up)"
                for k, v in res.items() if k.startswith("compute_") and isinstance(v, dict)
            ), flush=True)  # fmt: skip
        print(f"  per-shard rows/s: {j['shard_rates']}", flush=True)
        (args.out / f"gpu-{name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
