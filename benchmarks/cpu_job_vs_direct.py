"""Benchmark (run by hand): the batch-infer job against a direct onnxruntime loop, on CPU.

Both go Parquet to Parquet over the same files and the same model, side by side in one run:
  direct: one process, pq.ParquetFile.iter_batches -> numpy -> onnxruntime (all cores) ->
          ParquetWriter: what a hand-written script does.
  job:    `batch_infer.run` on a local Ray (one actor per core, a writer actor).
Then the driver's peak RSS for the job as the data grows 10x (each size in a fresh process).

    python benchmarks/cpu_job_vs_direct.py --rows 2000000 --out benchmarks/results/cpu.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

WIDTH, CLASSES = 64, 10
HIDDEN = {"light": (128,), "heavy": (1024, 1024)}  # IO-bound and compute-bound MLPs
ROWS_PER_FILE = 250_000


def make_model(path: Path, hidden: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    widths = [WIDTH, *hidden, CLASSES]
    inits, nodes, x = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        inits += [
            numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32) * 0.1, f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        out = "logits" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        x = out
    nodes.append(helper.make_node("ArgMax", ["logits"], ["predicted"], axis=1, keepdims=0))
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
            helper.make_tensor_value_info("predicted", TensorProto.INT64, ["N"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def make_data(root: Path, rows: int) -> None:
    if root.exists() and sum(pq.read_metadata(p).num_rows for p in root.glob("*.parquet")) == rows:
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        x = rng.standard_normal((n, WIDTH)).astype(np.float32)
        table = pa.table(
            {
                "id": np.arange(start, start + n),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), WIDTH),
            }
        )
        pq.write_table(table, root / f"part-{i:04d}.parquet", row_group_size=50_000)


def direct(data: Path, model: Path, out: Path, batch: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    rows = 0
    for i, path in enumerate(sorted(data.glob("*.parquet"))):
        writer = None
        for rb in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=["id", "x"]):
            x = rb.column(1).flatten().to_numpy().reshape(-1, WIDTH)
            logits, predicted = sess.run(None, {"x": x})
            t = pa.table(
                {
                    "id": rb.column(0),
                    "logits": pa.FixedSizeListArray.from_arrays(
                        pa.array(logits.reshape(-1)), CLASSES
                    ),
                    "predicted": predicted,
                }
            )
            writer = writer or pq.ParquetWriter(
                out / f"part-{i}.parquet", t.schema, compression="zstd"
            )
            writer.write_table(t, row_group_size=65536)
            rows += rb.num_rows
        writer.close()
    return rows / (time.perf_counter() - start)


def job_in_subprocess(data: Path, model: Path, out: Path, batch: int, shard_rows: int) -> dict:
    """The job in a fresh driver process: rows/s and the driver's peak RSS."""
    code = f"""
import json, resource, time, batch_infer
spec = {{"name": "bench", "input": {{"path": {str(data)!r}}},
        "model": {{"onnx": {str(model)!r}, "inputs": {{"x": "x"}}}},
        "batch_size": {batch}, "shard_rows": {shard_rows},
        "output": {{"path": {str(out)!r}, "keep_columns": ["id"]}}}}
t = time.perf_counter()
s = batch_infer.run(spec, overwrite=True)
dt = time.perf_counter() - t
from benchmarks.steady import shard_entries, steady_rate
entries = shard_entries({str(out)!r})
print(json.dumps({{"rows": s.rows, "seconds": dt, "steady": steady_rate(entries),
                   "shards": len(entries),
                   "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/data"))
    ap.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    small, big = args.work / f"rows-{args.rows // 10}", args.work / f"rows-{args.rows}"
    make_data(small, args.rows // 10)
    make_data(big, args.rows)
    table = [
        "| model | direct loop rows/s | job rows/s, wall (incl. Ray start) | ratio | "
        "job rows/s, steady | ratio | shards |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    memory = []
    for kind, hidden in HIDDEN.items():
        model = args.work / f"mlp-{kind}.onnx"
        make_model(model, hidden)
        job_in_subprocess(small, model, args.work / "out-warm", args.batch, args.shard_rows)
        direct_rate = direct(big, model, args.work / "out-direct", args.batch)
        job = job_in_subprocess(big, model, args.work / "out-job", args.batch, args.shard_rows)
        wall = job["rows"] / job["seconds"]
        table.append(
            f"| {kind}: {' -> '.join(map(str, [WIDTH, *hidden, CLASSES]))} | {direct_rate:,.0f} | "
            f"{wall:,.0f} | {wall / direct_rate:.2f} | {job['steady']:,.0f} | "
            f"{job['steady'] / direct_rate:.2f} | {job['shards']} |"
        )
        if kind == "light":
            small_job = job_in_subprocess(
                small, model, args.work / "out-small", args.batch, args.shard_rows
            )
            memory = [f"| {r['rows']:,} | {r['rss_mib']:,.0f} |" for r in (small_job, job)]
        print(table[-1], flush=True)
    lines = [
        f"# CPU: batch-infer job vs a direct onnxruntime loop ({os.cpu_count()} cores)",
        "",
        "Written by `python benchmarks/cpu_job_vs_direct.py` (one run, side by side). "
        f"{args.rows:,} rows of fixed_size_list<float32, {WIDTH}> in "
        f"{ROWS_PER_FILE:,}-row Parquet files; Parquet (zstd) out; batch {args.batch}; "
        f"the job with shard_rows {args.shard_rows:,}. Direct loop: one process, "
        "iter_batches -> onnxruntime on all cores -> ParquetWriter. Job: `batch_infer.run` "
        "in a fresh driver process on a local Ray. *Steady*: rows after the first committed "
        "shard over the time from the first to the last commit.",
        "",
        *table,
        "",
        "Driver peak RSS (light model; fresh driver process per size, Ray start-up included):",
        "",
        "| rows | driver peak RSS (MiB) |",
        "|---:|---:|",
        *memory,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
