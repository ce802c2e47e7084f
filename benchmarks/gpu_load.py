"""What a GPU run's model load is made of, one fresh process per variant (run by hand).

A one-GPU run's timeline on an H100 (docs/gpu.md, 2026-12-06): imports until ~1.0 s, the
lane starts loading at ~1.5 s, the backend is ready at 2.9 s for BERT-base fused fp16 (two
ONNX Runtime CUDA sessions, their first runs side by side). This splits that into the
interpreter's start as the run's clock sees it, ONNX Runtime's import, CUDA's start, the two
sessions and their first runs, for variants of the session's options, and gives each
variant's compute rate and its outputs against the default's on one batch of real rows:

  default      what the backend does (graph optimization ALL), sessions on two threads
  sequential   the two sessions one after the other (does a session's load hold the GIL?)
  extended / basic / disabled   ONNX Runtime's graph optimization level
  one-thread   intra-op and inter-op threads 1 (the CUDA EP runs no kernel on them)
  parallel-start  ONNX Runtime's import on a thread while CUDA starts
  one-session  one session (what the backend does since a68990c), its first run
  eager        CUDA_MODULE_LOADING=EAGER: every kernel loaded when CUDA starts, none at
               the first run (is the first run's cost loading kernels?)

Every variant also times a run from a thread that has not run the model yet (`new_thread`:
is part of the first run's cost per calling thread?) and one more run after it (`warm`).

    python benchmarks/gpu_load.py --out $OUT       # models and rows from gpu_bench's work dir
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.gpu_bench import sample_feeds, workloads

VARIANTS = ["default", "sequential", "extended", "basic", "disabled", "one-thread",
            "parallel-start", "one-session", "eager"]  # fmt: skip

# One fresh process: argv model, feeds.npz, variant, nhwc, outputs.npy; prints JSON.
PROBE = r"""
import os, time
start = time.time()
stat = open("/proc/self/stat").read()
ticks = int(stat.rsplit(")", 1)[1].split()[19])
age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
res = {"interpreter": round(age, 3)}
import json, sys, threading
from concurrent.futures import ThreadPoolExecutor
import numpy as np
model, feeds_path, variant, nhwc, out_path = sys.argv[1:6]
from cuda.bindings import runtime as cudart

def lap(name, t0):
    res[name] = round(time.perf_counter() - t0, 3)
    return time.perf_counter()

t = time.perf_counter()
if variant == "parallel-start":
    def ort_import():
        import onnxruntime
    th = threading.Thread(target=ort_import); th.start()
    cudart.cudaSetDevice(0); cudart.cudaFree(0)
    th.join()
    import onnxruntime as ort
    t = lap("import_and_context", t)
else:
    import onnxruntime as ort
    t = lap("import", t)
    cudart.cudaSetDevice(0); cudart.cudaFree(0)
    t = lap("context", t)
streams = [int(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)[1]) for _ in "ab"]
level = {"extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
         "disabled": "ORT_DISABLE_ALL"}.get(variant, "ORT_ENABLE_ALL")

def load(stream):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if variant == "one-thread":
        so.intra_op_num_threads = so.inter_op_num_threads = 1
    # no device_id: GPU 0 is the default, and ONNX Runtime >= 1.26 warns when it is given
    opts = {"cudnn_conv_algo_search": "HEURISTIC",
            "user_compute_stream": str(stream), **({"prefer_nhwc": "1"} if nhwc == "1" else {})}
    return ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", opts)])

if variant == "one-session":
    streams = streams[:1]
if variant in ("sequential", "one-session"):
    sessions = [load(s) for s in streams]
else:
    with ThreadPoolExecutor(2) as pool:
        sessions = list(pool.map(load, streams))
t = lap("sessions", t)
feeds = dict(np.load(feeds_path))
dev = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
out_name = sessions[0].get_outputs()[0].name
ro = ort.RunOptions()
ro.add_run_config_entry("disable_synchronize_execution_providers", "1")

def bound(session):
    io = session.io_binding()
    for k, v in dev.items():
        io.bind_ortvalue_input(k, v)
    io.bind_output(out_name, "cuda", 0)
    return io

ios = [bound(s) for s in sessions]

def first(i):
    sessions[i].run_with_iobinding(ios[i], ro)
    cudart.cudaStreamSynchronize(streams[i])

with ThreadPoolExecutor(len(sessions)) as pool:
    list(pool.map(first, range(len(sessions))))
t = lap("first_runs", t)
first(0)  # this thread has not run the model yet
t = lap("new_thread", t)
first(0)
t = lap("warm", t)
np.save(out_path, ios[0].copy_outputs_to_cpu()[0])
runs, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 3:
    for _ in range(10):
        sessions[0].run_with_iobinding(ios[0], ro)
    cudart.cudaStreamSynchronize(streams[0])
    runs += 10
rows = next(iter(feeds.values())).shape[0]
res["rate"] = round(runs * rows / (time.perf_counter() - t0))
res["total"] = round(time.time() - start + age, 3)
print(json.dumps(res), flush=True)
os._exit(0)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["bert", "resnet50"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ws = workloads(args.workloads, args.work, 1024, 4096)
    results: dict = {}
    for name, w in ws.items():
        feeds_path, nhwc = args.work / f"{name}-feeds.npz", "1" if name == "resnet50" else "0"
        np.savez(feeds_path, **sample_feeds(w))
        results[name] = {}
        ref = None
        for variant in args.variants:
            out = args.work / f"{name}-{variant}.npy"
            argv = [sys.executable, "-c", PROBE, str(w["model"]), str(feeds_path), variant,
                    nhwc, str(out)]  # fmt: skip
            started = time.time()
            env = {**os.environ, **({"CUDA_MODULE_LOADING": "EAGER"} if variant == "eager" else {})}
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                results[name][variant] = {"error": proc.stderr[-2000:]}
                print(name, variant, "failed:", proc.stderr[-2000:], flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["outside"] = round(time.time() - started, 3)
            got = np.load(out).astype(np.float64)
            ref = got if ref is None else ref
            res["rel_l2_vs_first"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            results[name][variant] = res
            print(name, variant, json.dumps(res), flush=True)
    (args.out / "gpu-load.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
