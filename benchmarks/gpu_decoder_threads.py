"""What the GPU decoder costs the CPU, by the size of nvImageCodec's own thread pool.

In the image job on a slow 16-core machine, the threads of nvImageCodec's pools
(`[NVIMGCODEC][TP`, one fewer than the cores per decoder by default) used 260-370 CPU
seconds of a 50-58 second job, about two thirds of the process's (docs/inputs.md, fourteenth
session).
This probe runs the job's decoder (`NvImageCodecDecoder`: decode, resize, copy back) alone on
the GPU, on C decoders at once, each driven by a thread of its own, for each pool size T
(BATCH_INFER_NVIMGCODEC_THREADS; 0: nvImageCodec's default), and records images/s and the
CPU seconds per 1,000 images, of the whole process and of nvImageCodec's pool threads.

    python benchmarks/gpu_decoder_threads.py --images 2048 --threads 0 1 2 4 8 --decoders 1 3

--busy-gpu keeps the GPU busy beside the decoders (fp16 matrix products on a stream of their
own, as a stand-in for the model); --beside-model WORK measures each set-up alone and then
while the image job's ResNet-50 fp16 (made under WORK, as gpu_inputs.py makes it) runs flat
out in this process, with the model's rate meanwhile. --cuda-schedule sets how this
process's threads wait for the GPU (cudaSetDeviceFlags before anything starts CUDA; auto:
CUDA's choice, which is to spin where the process has fewer contexts than cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_inputs import D, image_jpeg
from benchmarks.stacks import by_os_name

POOL = "[NVIMGCODEC][TP"  # the OS name of nvImageCodec's pool threads, digits dropped


def _image(i: int) -> bytes:
    """JPEG i of the set, made as the image job's are, from a generator of its own."""
    return image_jpeg(np.random.default_rng(i), i)


def measure(blobs: list[bytes], threads: int, decoders: int, repeat: int) -> dict:
    """`decoders` decoders with pools of `threads`, each decoding `blobs` `repeat` times on a
    thread of its own."""
    from batch_infer.data.decode.images import NvImageCodecDecoder

    if threads:
        os.environ["BATCH_INFER_NVIMGCODEC_THREADS"] = str(threads)
    else:
        os.environ.pop("BATCH_INFER_NVIMGCODEC_THREADS", None)
    made = [NvImageCodecDecoder(0) for _ in range(decoders)]
    outs = [np.zeros((len(blobs), D.height, D.width, 3), np.uint8) for _ in made]
    for decoder, out in zip(made, outs, strict=True):  # warm up: buffers, kernels
        decoder.decode(blobs, D, out)

    def work(k: int) -> None:
        for _ in range(repeat):
            made[k].decode(blobs, D, outs[k])

    workers = [threading.Thread(target=work, args=(k,)) for k in range(decoders)]
    cpu, pool, start = os.times(), by_os_name()[POOL], time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    after = os.times()
    images = len(blobs) * repeat * decoders
    used = (after.user - cpu.user) + (after.system - cpu.system)
    pool_s = (by_os_name()[POOL] - pool) / 1e9
    made.clear()  # the decoders and their pools go before the next set-up
    outs.clear()
    gc.collect()
    return {"threads": threads or "default", "decoders": decoders, "images": images,
            "seconds": round(wall, 3), "rate": round(images / wall),
            "cpu_s_per_1000": round(1000 * used / images, 3),
            "pool_cpu_s_per_1000": round(1000 * pool_s / images, 3),
            "cores_busy": round(used / wall, 2)}  # fmt: skip


SCHEDULES = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}  # cudaDeviceSchedule*


def keep_busy(stop: threading.Event) -> threading.Thread:
    """A thread running fp16 matrix products on a stream of its own until `stop`."""
    import torch

    def run() -> None:
        stream = torch.cuda.Stream()
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.half)
        with torch.cuda.stream(stream):
            while not stop.is_set():
                for _ in range(20):
                    a @ a
                stream.synchronize()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(1)  # its first products are running
    return thread


def beside_model(blobs: list[bytes], args: argparse.Namespace, rows: list[dict]) -> None:
    """Each set-up's row alone and while ResNet-50 runs (gpu_decode_load.beside_model)."""
    from batch_infer.data.decode.images import decode_pillow
    from benchmarks import gpu_decode_load
    from benchmarks.gpu_inputs import resnet50_fp16

    model = resnet50_fp16(args.beside_model)
    pixels = np.stack([decode_pillow(b, D) for b in blobs[:256]])
    with gpu_decode_load.beside_model(model, pixels, rows) as under:
        for decoders in args.decoders:
            for threads in args.threads:

                def decode(threads: int = threads, decoders: int = decoders) -> tuple:
                    row = measure(blobs, threads, decoders, args.repeat)
                    return row.pop("rate"), row

                under(f"{decoders} decoders, pool {threads or 'default'}", threads, decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--decoders", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--busy-gpu", action="store_true")
    ap.add_argument("--beside-model", type=Path, metavar="WORK")
    ap.add_argument("--cuda-schedule", choices=sorted(SCHEDULES), default="auto")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    if SCHEDULES[args.cuda_schedule]:
        from cuda.bindings import runtime

        runtime.cudaSetDeviceFlags(SCHEDULES[args.cuda_schedule])
    with ProcessPoolExecutor() as pool:
        blobs = list(pool.map(_image, range(args.images), chunksize=64))
    stop = threading.Event()
    busy = keep_busy(stop) if args.busy_gpu else None
    rows: list[dict] = []
    if args.beside_model:
        beside_model(blobs, args, rows)
    else:
        for decoders in args.decoders:
            for threads in args.threads:
                rows.append(measure(blobs, threads, decoders, args.repeat))
                print(json.dumps(rows[-1]), flush=True)
    if busy is not None:
        stop.set()
        busy.join()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-decoder-threads.json").write_text(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "busy_gpu": args.busy_gpu,
                "cuda_schedule": args.cuda_schedule,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
