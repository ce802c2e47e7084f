"""What a one-GPU run pays before its first batch and after its record (run by hand on the
GPU machine).

Pieces: each a whole fresh process timed from outside (median of `--repeat`), so their
differences say where a run's first second goes:
  bare         `python -c pass` (interpreter, site-packages)
  cli          importing `batch_infer.cli` (what `batch-infer run` imports before it starts)
  backends     importing `batch_infer.backends` (cuda-python comes with it only when used)
  gpus         that, and counting the GPUs (CUDA's initialization: the run decides with it
               whether Ray starts)
  onnxruntime  importing onnxruntime (the lane does it while the shards are planned)
  cupy, nvimgcodec  importing what the GPU image decoder needs

Chains (`--chains N`, N fresh processes each): a local GPU image run's two start-up chains,
with batch-infer's own code on `--spec` (default: ResNet-50 fp16 on JPEGs, made here):
  device   the device found (`prepare_local`: CUDA's context, ONNX Runtime's import) beside
           the plan, then the model loaded and warmed up (the lane's `ShardRunner`)
  inputs   the plan, then the first image decoder made and run once (`warm_up_images`)
  both     the two as a run does them now: the decoder from when the plan is made
  late     the two as `e504f45` did: the decoder from when the device is found
Steps (`--steps N`, N fresh processes each): each chain alone, one step after another, each
marked, to say which step is long:
  device-steps    the GPUs counted, CUDA's context, ONNX Runtime's import, the model's load
                  and warm-up
  decoder-steps   CuPy's import, the GPUs counted, CUDA's context (a CuPy stream),
                  nvImageCodec's import, the first decoder, its first decode alone, the
                  resize's first use, a shard of 1,024 JPEGs twice, a second decoder
  decoder-steps-gpu-codecs   the same, nvImageCodec's import reading only its nvJPEG
                  extension (NVIMGCODEC_EXTENSIONS_PATH): what its other extensions cost
Each mark is seconds since the process started, as a run's timeline. Each process then
leaves with `os._exit`, as the CLI does, and `teardown` is the time from that call until its
parent saw it end (CUDA's context, pinned memory, the libraries' threads): a run's own
teardown is likely longer, its decoders having grown their buffers.

Job (`--job`, default on): side by side, ResNet-50's compute rate and a `batch-infer run` on
`--images` pre-decoded images (whole-process wall clock and the run's timeline).

    python benchmarks/gpu_startup.py --chains 3 --steps 3 --no-job --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PIECES = {
    "bare": "pass",
    "cli": "import batch_infer.cli",
    "backends": "import batch_infer.backends",
    "gpus": "import batch_infer.backends as b; b.local_gpus()",
    "onnxruntime": "import onnxruntime",
    "cupy": "import cupy; cupy.cuda.runtime.getDeviceCount()",
    "nvimgcodec": "from nvidia import nvimgcodec",
}
CHAINS = ("device", "inputs", "both", "late")
STEPS = ("device-steps", "decoder-steps", "decoder-steps-gpu-codecs")


def seconds(code: str, repeat: int) -> float | None:
    """Median wall clock of `python -c code` as a fresh process (None: it failed)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        if subprocess.run([sys.executable, "-c", code], stderr=subprocess.DEVNULL).returncode:
            return None
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def _marks() -> tuple[float, dict[str, float], Callable[[str], None]]:
    """The process's start, its marks so far, and `mark(what)`: seconds since that start."""
    from batch_infer.cli import process_started_at

    t0 = process_started_at()
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = round(time.time() - t0, 3)

    return t0, marks, mark


def chain(which: str, spec_path: Path) -> None:
    """In this fresh process: one start-up chain, its marks printed as JSON, then os._exit."""
    t0, marks, mark = _marks()

    import batch_infer.job  # noqa: F401  (what the CLI has imported when a run starts)
    from batch_infer.actor import ShardRunner
    from batch_infer.backends import prepare_local
    from batch_infer.data.decode.images import ImageDecode, warm_up_images
    from batch_infer.planning import build_plan
    from batch_infer.spec import resolve_spec

    mark("imported")
    spec = resolve_spec(str(spec_path))
    finding: dict[str, str | None] = {}

    def find() -> None:
        finding["here"] = prepare_local(spec.backend, spec.device)
        mark("device_found")

    finder = threading.Thread(target=find)
    if which != "inputs":
        finder.start()
    plan = build_plan(spec)
    mark("planned")
    images = [d.source for d in plan.decoded if isinstance(d.source, ImageDecode)]

    def inputs() -> None:
        for d in images:
            warm_up_images(d)
        mark("decoder_ready")

    decoding = threading.Thread(target=inputs)
    if which in ("inputs", "both"):
        decoding.start()
    if which != "inputs":
        finder.join()
        if which == "late":
            decoding.start()
        here = finding["here"] or "cpu"
        runner = ShardRunner(plan, here, 1, -1, "driver", "0" if here == "gpu" else None)
        marks["model_loading"] = round(runner.loading_at - t0, 3)
        marks["model_loaded"] = round(runner.loaded_at - t0, 3)
        mark("model_warmed")
    if which != "device":
        decoding.join()
    print(json.dumps(marks), flush=True)
    print("EXIT", time.time(), flush=True)
    os._exit(0)


def steps(which: str, spec_path: Path) -> None:
    """In this fresh process: one chain's steps one after another, each marked, then os._exit."""
    t0, marks, mark = _marks()

    import batch_infer.job  # noqa: F401
    from batch_infer.planning import build_plan
    from batch_infer.spec import resolve_spec

    mark("imported")
    spec = resolve_spec(str(spec_path))
    plan = build_plan(spec)
    mark("planned")
    if which == "device-steps":
        from batch_infer.actor import ShardRunner
        from batch_infer.backends import local_gpus
        from batch_infer.backends.cuda_streams import start_context

        local_gpus()
        mark("gpus")
        start_context(0)
        mark("context")
        import onnxruntime  # noqa: F401

        mark("onnxruntime")
        runner = ShardRunner(plan, "gpu", 1, -1, "driver", "0")
        marks["model_loading"] = round(runner.loading_at - t0, 3)
        marks["model_loaded"] = round(runner.loaded_at - t0, 3)
        mark("model_warmed")
    else:
        import io

        import numpy as np
        import pyarrow.parquet as pq
        from PIL import Image

        from batch_infer.data.decode.images import ImageDecode, NvImageCodecDecoder, item_shape

        d = next(x.source for x in plan.decoded if isinstance(x.source, ImageDecode))
        first = sorted(Path(spec.input.path).glob("*.parquet"))[0]
        blobs = pq.read_table(first, columns=[d.column])[d.column].to_pylist()[:1024]
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (90, 120, 150)).save(buf, "JPEG")
        small = buf.getvalue()
        import cupy

        mark("cupy")
        cupy.cuda.runtime.getDeviceCount()
        mark("gpus")
        with cupy.cuda.Device(0):
            cupy.cuda.Stream(non_blocking=True)
        mark("context")
        from batch_infer.data.decode.gpu_codecs import load_installed_codecs_only

        load_installed_codecs_only()  # as NvImageCodecDecoder does before this import
        from nvidia import nvimgcodec

        mark("nvimgcodec")
        decoder = NvImageCodecDecoder(0)
        mark("decoder")
        with cupy.cuda.Device(0):
            stream = [nvimgcodec.CodeStream(small)]
            decoder.decoder.decode(stream, params=decoder.params, cuda_stream=decoder.stream.ptr)
            decoder.stream.synchronize()
        mark("decode_first")
        d = dataclasses.replace(d, layout="NHWC")
        decoder.decode([small], d, np.zeros((1, *item_shape(d)), np.uint8))
        mark("resize_first")
        out = np.zeros((len(blobs), *item_shape(d)), np.uint8)
        decoder.decode(blobs, d, out)
        mark("shard_first")
        decoder.decode(blobs, d, out)
        mark("shard_second")
        NvImageCodecDecoder(0)
        mark("decoder_second")
    print(json.dumps(marks), flush=True)
    print("EXIT", time.time(), flush=True)
    os._exit(0)


def chains(spec: Path, n: int, which_ones: tuple[str, ...] = CHAINS) -> dict[str, dict[str, float]]:
    """Each chain `n` times in fresh processes: the median of each mark, and of teardown."""
    out = {}
    for which in which_ones:
        runs: list[dict[str, float]] = []
        env = dict(os.environ)
        if which.endswith("gpu-codecs"):
            from benchmarks.gpu_inputs import gpu_codecs_only

            try:
                env["NVIMGCODEC_EXTENSIONS_PATH"] = str(gpu_codecs_only(spec.parent))
            except ImportError as exc:  # said, and the other chains still run
                print(f"chain {which} skipped: {exc}", flush=True)
                continue
        mode = "--steps-child" if which in STEPS else "--chain"
        for _ in range(n):
            argv = [sys.executable, __file__, mode, which, "--spec", str(spec)]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
            assert proc.stdout is not None
            lines = proc.stdout.read().splitlines()
            proc.wait()
            ended = time.time()
            if proc.returncode or len(lines) < 2:  # said, and the other chains still run
                print(f"chain {which} failed (exit {proc.returncode}): {lines}", flush=True)
                break
            marks = json.loads(lines[-2])
            marks["teardown"] = round(ended - float(lines[-1].split()[1]), 3)
            runs.append(marks)
        if not runs:
            continue
        out[which] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        print(f"chain {which}: {out[which]}", flush=True)
    return out


def image_spec(work: Path) -> Path:
    """ResNet-50 fp16 on 1,024 JPEGs as a run reads them (gpu_inputs.py's)."""
    from benchmarks.gpu_inputs import make_images, resnet50_fp16

    fp16 = resnet50_fp16(work)
    make_images(work / "images-startup", 1024)
    spec = {
        "name": "startup",
        "input": {"path": str(work / "images-startup")},
        "model": {
            "onnx": str(fp16),
            "inputs": {"pixels": {"column": "image", "decode": "image", "size": [224, 224]}},
        },
        "output": {"path": str(work / "out-startup")},
    }
    path = work / "startup.json"
    path.write_text(json.dumps(spec))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200_000, help="the job's pre-decoded images")
    ap.add_argument("--repeat", type=int, default=3, help="each piece this many times")
    ap.add_argument("--chains", type=int, default=0, help="each chain this many times")
    ap.add_argument("--steps", type=int, default=0, help="each steps chain this many times")
    ap.add_argument("--spec", type=Path, help="the chains' job spec (JSON or YAML)")
    ap.add_argument("--job", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--chain", choices=CHAINS, help=argparse.SUPPRESS)  # in a child
    ap.add_argument("--steps-child", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    if args.chain:  # a chain's process imports only what a run does
        return chain(args.chain, args.spec)
    if args.steps_child:
        return steps(args.steps_child, args.spec)
    from benchmarks.gpu_bench import compute_rate, job, sample_feeds, workloads

    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict = {"pieces": {k: seconds(code, args.repeat) for k, code in PIECES.items()}}
    print(json.dumps(res), flush=True)
    if args.chains or args.steps:
        spec = (args.spec or image_spec(args.work)).resolve()
    if args.steps:
        res["steps"] = chains(spec, args.steps, STEPS)
    if args.chains:
        res["chains"] = chains(spec, args.chains)
    if args.job:
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
