"""Benchmark (run by hand): `batch-infer run` against a direct onnxruntime script, on CPU.

Both go Parquet to Parquet over the same files and the same model, side by side in one run,
each timed as a whole process (what a user waits for):
  direct: one process, pq.ParquetFile.iter_batches -> numpy -> onnxruntime (all cores) ->
          ParquetWriter: what a hand-written script does.
  job:    `batch-infer run`: on one machine's CPU, the run's own process (reader, inference
          and commit threads; no Ray needed), with every shard committed exactly once.
  bare:   `ray.init(); ray.shutdown()`: what any Ray program pays before its first task.

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


DIRECT = """
import sys, time
import numpy as np, onnxruntime as ort, pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
data, model, out, batch, width, classes = sys.argv[1:7]
batch, width, classes = int(batch), int(width), int(classes)
out = Path(out)
out.mkdir(parents=True, exist_ok=True)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
for i, path in enumerate(sorted(Path(data).glob("*.parquet"))):
    writer = None
    for rb in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=["id", "x"]):
        x = rb.column(1).flatten().to_numpy().reshape(-1, width)
        logits, predicted = sess.run(None, {"x": x})
        flat = pa.array(logits.reshape(-1))
        t = pa.table({"id": rb.column(0),
                      "logits": pa.FixedSizeListArray.from_arrays(flat, classes),
                      "predicted": predicted})
        path = out / f"part-{i}.parquet"
        writer = writer or pq.ParquetWriter(path, t.schema, compression="zstd")
        writer.write_table(t, row_group_size=65536)
    writer.close()
"""

BARE = (
    "import ray; ray.init(address='local', include_dashboard=False, logging_level='ERROR'); "
    "ray.shutdown()"
)


def timed(argv: list[str], **kwargs) -> float:
    """Wall clock of a whole process, as a user waits for it."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)
    return time.perf_counter() - start


def direct(data: Path, model: Path, out: Path, batch: int) -> float:
    """The hand-written script: one process, onnxruntime on all cores; its wall clock."""
    shutil.rmtree(out, ignore_errors=True)
    args = [str(data), str(model), str(out), str(batch), str(WIDTH), str(CLASSES)]
    return timed([sys.executable, "-c", DIRECT, *args])


def job(data: Path, model: Path, out: Path, batch: int, shard_rows: int | None) -> dict:
    """`batch-infer run` as a whole process: wall clock, and its run record's timeline."""
    spec = {
        "name": "bench",
        "input": {"path": str(data)},
        "model": {"onnx": str(model), "inputs": {"x": "x"}},
        "batch_size": batch,
        "shard_rows": shard_rows,
        "output": {"path": str(out), "keep_columns": ["id"]},
    }
    spec_path = out.with_suffix(".yaml")
    spec_path.write_text(json.dumps(spec))
    seconds = timed(["batch-infer", "run", str(spec_path), "--overwrite", "-q"])
    (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    t = run["timeline"]
    steady = run["rows"] / max(t["last_batch"] - t["first_batch"], 1e-9)
    return {"seconds": seconds, "rows": run["rows"], "steady": steady, "timeline": t,
            "actors": run["actor_stats"], "shards": run["shards_total"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shard-rows", type=int, default=None, help="default: the planner's")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu.md"))
    ap.add_argument("--models", nargs="+", default=list(HIDDEN))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"rows-{args.rows}"
    make_data(data, args.rows)
    timed([sys.executable, "-c", BARE])  # warm: page cache, Python's bytecode caches
    rows = []
    for kind in args.models:
        model = args.work / f"mlp-{kind}.onnx"
        make_model(model, HIDDEN[kind])
        direct_s = direct(data, model, args.work / "out-direct", args.batch)
        run = job(data, model, args.work / "out-job", args.batch, args.shard_rows)
        bare = timed([sys.executable, "-c", BARE])
        rows.append((kind, direct_s, run, bare))
        t = run["timeline"]
        print(
            f"{kind}: direct {direct_s:.1f} s, job {run['seconds']:.1f} s "
            f"(ratio {direct_s / run['seconds']:.2f}), bare Ray {bare:.1f} s, first commit "
            f"{t.get('first_commit', 0):.1f} s, timeline {t}",
            flush=True,
        )
    lines = [
        f"# CPU: `batch-infer run` vs a direct onnxruntime script ({os.cpu_count()} cores)",
        "",
        "Written by `python benchmarks/cpu_job_vs_direct.py "
        f"--rows {args.rows}` (one run, side by side; each figure a whole process's wall "
        "clock, as a user waits for it). "
        f"{args.rows:,} rows of fixed_size_list<float32, {WIDTH}> in {ROWS_PER_FILE:,}-row "
        f"Parquet files; Parquet (zstd) out; batch {args.batch}. Direct: one process, "
        "iter_batches -> onnxruntime on all cores -> ParquetWriter. Job: `batch-infer run` "
        "(on one machine's CPU the run's own process: reader, inference and commit threads, "
        "no Ray; default shard planning; exactly-once commits). Bare Ray: "
        "`python -c 'import ray; ray.init(); ray.shutdown()'` in the same run: what a run "
        "that waited for Ray would pay before its first task.",
        "",
        "| model | direct s | job s | job / direct (rows/s) | bare Ray s | first commit s "
        "| first commit - bare Ray s | job steady rows/s | device busy (first to last batch) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind, direct_s, run, bare in rows:
        first = run["timeline"].get("first_commit", float("nan"))
        busy = ", ".join(f"{a['busy_while_running']:.0%}" for a in run["actors"])
        lines.append(
            f"| {kind}: {' -> '.join(map(str, [WIDTH, *HIDDEN[kind], CLASSES]))} | "
            f"{direct_s:.1f} | {run['seconds']:.1f} | {direct_s / run['seconds']:.2f} | "
            f"{bare:.1f} | {first:.1f} | {first - bare:+.1f} | {run['steady']:,.0f} | {busy} |"
        )
    lines += ["", "Timelines (seconds after the process started):", ""]
    lines += [f"- {kind}: {run['timeline']}" for kind, _, run, _ in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
