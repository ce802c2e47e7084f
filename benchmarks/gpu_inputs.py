"""GPU benchmark of real inputs (run by hand on the GPU machine): encoded JPEGs into
ResNet-50 fp16 and raw text into BERT-base fp16, decoders' rates next to the model's.

Images: >= 50,000 photo-like JPEGs of about 500x375 (q90, a quarter portrait), generated on
every core into Parquet (a binary column, 1,024 images a file); for a longer job, the same
files linked --image-copies times (4: 200,000 rows, each image 4 times). Side by side:
  cpu_decode   Pillow's decode + resize to 224x224 on every core (processes), rows/s;
  gpu_decode   nvImageCodec's batch decode + the GPU resize (the job's GPU decoder), rows/s;
  compute      ResNet-50 fp16 on one batch resident on the GPU (gpu_bench.compute_rate);
  job          `python3 -m batch_infer.cli run` as a whole process, timed from outside: with
               the decoder batch-infer picks (`device: auto`), and with `device: cpu`; and
               `device: auto` over the linked copies.
Text: sentences of 10-150 words (a random vocabulary), a BERT WordPiece tokenizer trained on
them here with `tokenizers`; tokenization rate (the job's own `encode`, all cores), BERT-base
fp16 compute at seq 128, and the whole job on each of --texts rows (65,536 and 262,144).

fp16 models come from ONNX Runtime's converter (inputs and outputs kept fp32/int), as in
gpu_bench.py. Writes gpu-inputs.json and gpu-inputs.md under --out ($OUT).

    python3 benchmarks/gpu_inputs.py --images 50000 --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch_infer.data.decode.images import ImageDecode, decode_pillow
from benchmarks.gpu_bench import write_files
from jobs.make_examples import jpeg, photo

ROOT = Path(__file__).resolve().parent.parent
BATCH = 256
SEQ = 128
D = ImageDecode("image", 224, 224, "shorter_side_crop", "NHWC", "RGB", "auto", False)
CORES = os.cpu_count() or 2


def image_jpeg(rng: np.random.Generator, i: int) -> bytes:
    """The benchmarks' image i: a photo-like JPEG (q90) of 500x375, every fourth portrait."""
    return jpeg(photo(rng, 500, 375) if i % 4 else photo(rng, 375, 500), 90)


def _image_file(args: tuple[Path, int, int]) -> int:
    path, start, n = args
    rng = np.random.default_rng(start)
    blobs = [image_jpeg(rng, i) for i in range(n)]
    table = pa.table({"id": np.arange(start, start + n), "image": pa.array(blobs, pa.binary())})
    pq.write_table(table, path, row_group_size=256, compression="none")
    return n


def make_images(root: Path, images: int, per_file: int = 1024) -> None:
    """JPEG files of about 500x375 (a quarter portrait): files of 1,024, row groups of 256."""
    write_files(root, images, per_file, _image_file, CORES)


def sample_images(root: Path, n: int) -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(root.glob("*.parquet")):
        out += pq.read_table(path, columns=["image"])["image"].to_pylist()
        if len(out) >= n:
            break
    return out[:n]


def _decode_chunk(blobs: list[bytes]) -> int:
    for b in blobs:
        decode_pillow(b, D)
    return len(blobs)


def cpu_decode_rate(blobs: list[bytes]) -> float:
    """Pillow on every core (processes), rows/s wall clock."""
    chunks = [blobs[i : i + 64] for i in range(0, len(blobs), 64)]
    with ProcessPoolExecutor(CORES) as pool:
        list(pool.map(_decode_chunk, chunks[:CORES]))  # warm up
        start = time.perf_counter()
        done = sum(pool.map(_decode_chunk, chunks))
        return done / (time.perf_counter() - start)


def gpu_decode_rate(blobs: list[bytes], batch: int = 2048) -> dict:
    """The job's GPU decoder on batches of `batch` (all of `blobs` where fewer), rows/s wall
    clock; or why it cannot run. Also its largest difference from Pillow's pixels on the
    first images."""
    from batch_infer.data.decode.images import NvImageCodecDecoder

    batch = min(batch, len(blobs))
    try:
        decoder = NvImageCodecDecoder(0)
    except Exception as exc:
        return {"available": False, "why": f"{type(exc).__name__}: {exc}"}
    out = np.zeros((batch, 224, 224, 3), np.uint8)
    decoder.decode(blobs[:batch], D, out)  # warm up
    start, done, retried = time.perf_counter(), 0, 0
    for i in range(0, len(blobs) - batch + 1, batch):
        retried += len(decoder.decode(blobs[i : i + batch], D, out))
        done += batch
    rate = done / (time.perf_counter() - start)
    streams = [decoder.codec.CodeStream(b) for b in blobs[:batch]]
    start = time.perf_counter()
    for _ in range(3):
        decoder.decoder.decode(streams, params=decoder.params, cuda_stream=decoder.stream.ptr)
        decoder.stream.synchronize()
    decode_only = 3 * batch / (time.perf_counter() - start)
    hw_only = _decoders(blobs, _hw_only(), 1)[0]  # which of its decoders gives which pixels
    return {"available": True, "rate": rate, "decode_only": decode_only,
            "decoder": decoder.describe(), "retried": retried,
            "vs_pillow": _pillow_diff(decoder, blobs, 64),
            "vs_pillow_512": _pillow_diff(decoder, blobs, 512),
            "hw_only_vs_pillow_512": _pillow_diff(hw_only, blobs, 512)}  # fmt: skip


def _pillow_diff(decoder, blobs: list[bytes], n: int) -> dict:
    """How far `decoder`'s pixels for the first `n` images (one batch) are from Pillow's;
    images it left for the CPU (`retried`) are not counted."""
    got = np.zeros((n, 224, 224, 3), np.uint8)
    retried = decoder.decode(blobs[:n], D, got)
    keep = [i for i in range(n) if i not in retried]
    ref = np.stack([decode_pillow(blobs[i], D) for i in keep])
    diff = np.abs(got[keep].astype(int) - ref)
    per_image = diff.reshape(len(keep), -1).max(axis=1)
    return {"max": int(diff.max()), "mean": round(float(diff.mean()), 5),
            "images_over_2": int((per_image > 2).sum()), "retried": len(retried)}  # fmt: skip


def _decoder_setups() -> list[tuple[str, dict | None, int]]:
    """(name, nvimgcodec.Decoder arguments or None for the job's own, decoder threads)."""
    from nvidia import nvimgcodec

    k, b = nvimgcodec.BackendKind, nvimgcodec.Backend
    hw, hybrid = b(k.HW_GPU_ONLY), b(k.HYBRID_CPU_GPU)
    return [
        ("job", None, 3),
        ("job", None, 6),
        ("job, 4 CPU threads a decoder", {"backends": [hw, hybrid], "max_num_cpu_threads": 4}, 3),
        ("hw only", {"backends": [hw]}, 3),
        ("hybrid only", {"backends": [hybrid]}, 3),
        ("hw 0.5 + hybrid", {"backends": [b(k.HW_GPU_ONLY, load_hint=0.5), hybrid]}, 3),
        ("hw 0.3 + hybrid", {"backends": [b(k.HW_GPU_ONLY, load_hint=0.3), hybrid]}, 3),
    ]


def _on_threads(work, n: int) -> float:
    """`work(k)` for k < n, each on a thread of its own, all at once; the seconds taken."""
    import threading

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def _decode_for(
    blobs: list[bytes],
    decoders: list,
    seconds: float,
    batch: int = 512,
    how: str = "job",
    split: dict | None = None,
) -> float:
    """Rows/s of `decoders`, one thread each, decoding batches of `blobs` for `seconds`.
    `how`: job (decode, GPU resize, copy back), decode (nvImageCodec's decode alone, waited
    for), reuse (the same into the thread's last batch's image buffers). `split`, when given
    (decode and reuse): filled with the seconds per call spent in nvImageCodec's decode call
    and in waiting for its stream after it, and the threads' native ids."""
    import threading

    stop, counts = time.perf_counter() + seconds, [0] * len(decoders)
    spent = {"call": 0.0, "wait": 0.0, "calls": 0, "tids": []}

    def work(k: int) -> None:
        spent["tids"].append(threading.get_native_id())
        out = np.zeros((batch, 224, 224, 3), np.uint8)
        d, images = decoders[k], None
        if isinstance(d, GreenDecoder):
            d.enter()
        i = k * batch
        while time.perf_counter() < stop:
            part = [blobs[(i + j) % len(blobs)] for j in range(batch)]
            if how == "job":
                d.decode(part, D, out)
            else:
                streams = [d.codec.CodeStream(b) for b in part]
                kwargs = {"images": images} if how == "reuse" and images else {}
                t0 = time.perf_counter()
                images = d.decoder.decode(
                    streams, params=d.params, cuda_stream=d.stream.ptr, **kwargs
                )
                t1 = time.perf_counter()
                d.stream.synchronize()
                spent["call"] += t1 - t0
                spent["wait"] += time.perf_counter() - t1
                spent["calls"] += 1
            counts[k] += batch
            i += len(decoders) * batch

    elapsed = _on_threads(work, len(decoders))
    if split is not None and spent["calls"]:
        calls = spent["calls"]
        split.update(
            call_ms=round(1000 * spent["call"] / calls, 1),
            wait_ms=round(1000 * spent["wait"] / calls, 1),
            calls=calls,
            tids=spent["tids"],
        )
    return sum(counts) / elapsed


def _check(result: tuple) -> object:
    """cuda.bindings' (error, value...) -> value, raising on an error."""
    from cuda.bindings import driver as cu

    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver: {err}")
    return values[0] if len(values) == 1 else values


class GreenSplit:
    """The GPU's SMs in two CUDA green contexts' shares: `sms` for JPEG decoders, the rest
    for the model. Does the decode beside a running model slow because its few kernels wait
    behind the model's? A decoder in a share of its own cannot wait for SMs."""

    def __init__(self, sms: int) -> None:
        from cuda.bindings import driver as cu

        self.cu = cu
        _check(cu.cuInit(0))
        self.dev = _check(cu.cuDeviceGet(0))
        self.primary = _check(cu.cuDevicePrimaryCtxRetain(self.dev))
        whole = _check(
            cu.cuDeviceGetDevResource(self.dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
        )
        groups, _, rest = _check(cu.cuDevSmResourceSplitByCount(1, whole, 0, sms))
        self.decoders = _check(cu.cuDevResourceGenerateDesc([groups[0]], 1))
        self.model = _check(cu.cuDevResourceGenerateDesc([rest], 1))

    def context(self, desc: object) -> object:
        """A new green context on `desc` (one per thread: green contexts are not shared)."""
        cu = self.cu
        flags = cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        green = _check(cu.cuGreenCtxCreate(desc, self.dev, flags))
        return green, _check(cu.cuCtxFromGreenCtx(green))

    def enter(self, ctx: object) -> None:
        _check(self.cu.cuCtxSetCurrent(ctx))


class GreenDecoder:
    """A hardware-only nvImageCodec decoder made and run inside a green context of the
    decoders' share of `split`."""

    def __init__(self, split: GreenSplit) -> None:
        from nvidia import nvimgcodec

        self.split, self.codec = split, nvimgcodec
        cu = split.cu
        green, self.ctx = split.context(split.decoders)
        non_blocking = cu.CUstream_flags.CU_STREAM_NON_BLOCKING
        self.handle = _check(cu.cuGreenCtxStreamCreate(green, non_blocking, 0))
        self.ptr, self.stream = int(self.handle), self
        self.enter()
        try:  # -1: the context current here (nvImageCodec's NVIMGCODEC_DEVICE_CURRENT)
            self.decoder = nvimgcodec.Decoder(device_id=-1, **_hw_only())
        except (TypeError, ValueError, RuntimeError):
            self.decoder = nvimgcodec.Decoder(device_id=0, **_hw_only())
        self.params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            allow_any_depth=False,
            sample_format=nvimgcodec.SampleFormat.I_RGB,
        )
        split.enter(split.primary)

    def enter(self) -> None:
        """Make the green context this thread's current one."""
        self.split.enter(self.ctx)

    def synchronize(self) -> None:
        _check(self.split.cu.cuStreamSynchronize(self.handle))


model_tid = [0]  # the native id of the thread running the model in `_beside_model`


@contextlib.contextmanager
def _beside_model(model: Path, pixels: np.ndarray, rows: list, enter=None) -> Iterator:
    """`measure(name, threads, decode)`: `decode()`'s rate alone and while ResNet-50 runs flat
    out in this process (made and run with `enter()` called first, when given), and the
    model's rate meanwhile; each a row of `rows`. `decode()` may return (rate, more fields
    for the row)."""
    import threading

    from batch_infer.backends.onnxruntime_cuda import OnnxRuntimeCUDA
    from batch_infer.model import read_signature

    if enter:
        enter()
    with (
        OnnxRuntimeCUDA(read_signature(str(model)), slots=1) as backend,
        backend.resident({"pixels": pixels}) as batch,
    ):
        busy = threading.Event()
        done = [0]

        def model_loop() -> None:
            model_tid[0] = threading.get_native_id()
            if enter:
                enter()
            while busy.is_set():
                batch.launch(1)
                batch.wait()
                done[0] += batch.rows

        def measure(name: str, threads: int, decode) -> None:
            for load in (False, True):
                if load:
                    done[0] = 0
                    busy.set()
                    runner = threading.Thread(target=model_loop)
                    runner.start()
                    time.sleep(0.5)
                    done[0] = 0
                start = time.perf_counter()
                rate = decode()
                model_rate = done[0] / (time.perf_counter() - start) if load else None
                if load:
                    busy.clear()
                    runner.join()
                rate, extra = rate if isinstance(rate, tuple) else (rate, {})
                row = {"setup": name, "threads": threads, "model_busy": load, "decode": round(rate)}
                row["model"] = model_rate and round(model_rate)
                row.update(extra, model_tid=model_tid[0] if load else None)
                rows.append(row)
                print(f"decode under load: {row}", flush=True)

        yield measure


def _green_rows(blobs: list[bytes], model: Path, pixels: np.ndarray, seconds: float) -> list:
    """The hardware decoder (decode alone, 3 threads) in green contexts of a few SMs, beside
    the model on all SMs and beside the model in a green context of the rest."""
    rows: list[dict] = []
    for sms in (8, 16, 32):
        try:
            split = GreenSplit(sms)
            greens = [GreenDecoder(split) for _ in range(3)]
            _decode_for(blobs[:1536], greens, 0.01, how="decode")  # warm up
            _, model_ctx = split.context(split.model)
        except Exception as exc:
            rows.append({"setup": f"hw only, green {sms} SMs", "error": repr(exc)})
            print(f"decode under load: green {sms} SMs: {exc!r}", flush=True)
            continue
        run = lambda gs=greens: _decode_for(blobs, gs, seconds, how="decode")  # noqa: E731
        in_rest = lambda c=model_ctx, s=split: s.enter(c)  # noqa: E731
        for label, enter in (("all SMs", None), ("the rest", in_rest)):
            try:
                with _beside_model(model, pixels, rows, enter) as measure:
                    measure(f"hw only, decode, {sms} SMs of its own; model on {label}", 3, run)
            except Exception as exc:
                rows.append({"setup": f"green {sms} SMs, model on {label}", "error": repr(exc)})
                print(f"decode under load: green {sms}, model on {label}: {exc!r}", flush=True)
            split.enter(split.primary)
    return rows


def _hw_only() -> dict:
    """nvImageCodec Decoder arguments for the hardware JPEG decoder alone."""
    from nvidia import nvimgcodec

    return {"backends": [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]}


def _decoders(blobs: list[bytes], kwargs: dict | None, n: int) -> list:
    """`n` of the job's GPU decoders (with nvImageCodec Decoder `kwargs` instead of the job's
    set-up, when given), each warmed up on 64 of `blobs`."""
    from nvidia import nvimgcodec

    from batch_infer.data.decode.images import NvImageCodecDecoder

    made = []
    for _ in range(n):
        d = NvImageCodecDecoder(0)
        if kwargs is not None:
            d.decoder = nvimgcodec.Decoder(device_id=0, **kwargs)
        d.decode(blobs[:64], D, np.zeros((64, 224, 224, 3), np.uint8))
        made.append(d)
    return made


def _hw_in_process(conn, blobs: list[bytes]) -> None:
    """A process of its own (its own CUDA context) decoding with the hardware decoder on 3
    threads, `seconds` at a time as asked through `conn`: does the decode still slow when
    nothing of the model's is in its context?"""
    ds = _decoders(blobs, _hw_only(), 3)
    _decode_for(blobs[:1536], ds, 0.01, how="decode")  # warm up
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        conn.send(_decode_for(blobs, ds, seconds, how="decode"))


def _separate_rows(blobs: list[bytes], model: Path, pixels: np.ndarray, seconds: float) -> list:
    """The hardware decoder (decode alone, 3 threads) in this process and in a process of its
    own, each alone and beside the model in this process."""
    import multiprocessing

    rows: list[dict] = []
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=_hw_in_process, args=(theirs, blobs[:2048])
    )
    child.start()
    try:
        ds = _decoders(blobs, _hw_only(), 3)
        _decode_for(blobs[:1536], ds, 0.01, how="decode")
        ours.recv()

        def elsewhere() -> float:
            ours.send(seconds)
            return ours.recv()

        with _beside_model(model, pixels, rows) as measure:
            measure("hw only, decode", 3, lambda: _decode_for(blobs, ds, seconds, how="decode"))
            measure("hw only, decode, in a process of its own", 3, elsewhere)
    finally:
        ours.send(None)
        child.join()
    return rows


def _preallocated(batch: int = 512, side: int = 512) -> str:
    """Options that make nvImageCodec's hardware decoder pre-allocate nvJPEG's buffers for
    `batch` images of up to `side`x`side` (its default is 1 image of 1x1, grown as needed).
    Nothing else is set: nvImageCodec 0.9's default options are none, so each decoder keeps
    its own defaults, and nvJPEG's upsample chroma by interpolation, as libjpeg (Pillow)
    does. (The seventh session's probes also passed ":fancy_upsampling=0", the default the
    project's newer source documents, so their hardware decoder did not.)"""
    hints = {"preallocate_batch_size": batch, "preallocate_width_hint": side,
             "preallocate_height_hint": side}  # fmt: skip
    return " ".join(f"nvjpeg_hw_decoder:{k}={v}" for k, v in hints.items())


# The jobs' GPU set-ups that --job-setups names, as environment for the job's process: "job",
# batch-infer's own (32 CUDA hardware queues, batch_infer/__init__.py); "c8", CUDA's default
# 8, with which the hardware decoder's steps wait behind the model's runs (docs/inputs.md);
# "prealloc", nvJPEG's buffers for a batch made with each decoder, not in the first shards;
# "decoders2", "decoders6": that many GPU decoders for the 12 reader threads (3 by default;
# 2, 3 and 6 gave the same before the 32 queues, docs/inputs.md 2026-12-05); "switch": the
# job's Python hands the GIL on every 0.5 ms instead of 5 (`switch_interval`); "threads1",
# "threads2", "threads4": each GPU decoder's nvImageCodec pool of that many CPU threads (by
# default one fewer than the cores; with 1, nvImageCodec sets each batch up on the calling
# thread; benchmarks/gpu_decoder_threads.py); "yield": threads waiting for the
# GPU yield their core rather than spin (`cuda_yield`).
JOB_SETUPS = {
    "job": {},
    "c8": {"CUDA_DEVICE_MAX_CONNECTIONS": "8"},
    "prealloc": {"BATCH_INFER_NVIMGCODEC_OPTIONS": _preallocated()},
    "decoders2": {"BATCH_INFER_GPU_DECODERS": "2"},
    "decoders6": {"BATCH_INFER_GPU_DECODERS": "6"},
    "threads1": {"BATCH_INFER_NVIMGCODEC_THREADS": "1"},
    "threads2": {"BATCH_INFER_NVIMGCODEC_THREADS": "2"},
    "threads4": {"BATCH_INFER_NVIMGCODEC_THREADS": "4"},
    "switch": {},  # PYTHONPATH: switch_interval's folder first
    "yield": {},  # PYTHONPATH: cuda_yield's folder first
    "baseline": {},  # the batch-infer of --baseline
    "gpu-codecs": {},  # NVIMGCODEC_EXTENSIONS_PATH: nvImageCodec's nvJPEG extension alone
}


def _summarize_trace(path: Path, ours: dict[str, int | list]) -> dict:
    """A Chrome trace from torch.profiler (CUPTI) boiled down: per thread, the CUDA runtime
    and driver calls that took longest in all; per stream, kernels and how long each waited
    between its launch call's end and its start on the GPU, by launching thread."""
    events = json.loads(path.read_text())["traceEvents"]
    api: dict[int, dict[str, list[float]]] = {}
    launches: dict[int, tuple[int, float]] = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e:
            api.setdefault(e["tid"], {}).setdefault(e["name"], []).append(e["dur"])
            if "correlation" in e.get("args", {}):
                launches[e["args"]["correlation"]] = (e["tid"], e["ts"] + e["dur"])
    names = {tid: label for label, tids in ours.items()
             for tid in (tids if isinstance(tids, list) else [tids])}  # fmt: skip

    def top(calls: dict[str, list[float]]) -> list:
        ranked = sorted(calls.items(), key=lambda kv: -sum(kv[1]))[:8]
        return [{"call": k, "n": len(v), "total_ms": round(sum(v) / 1000, 1),
                 "max_ms": round(max(v) / 1000, 2)} for k, v in ranked]  # fmt: skip

    threads = [{"tid": tid, "thread": names.get(tid, "other"), "calls": top(calls)}
               for tid, calls in api.items()]  # fmt: skip
    streams: dict[tuple, dict] = {}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        a = e.get("args", {})
        tid, end = launches.get(a.get("correlation"), (None, None))
        key = (a.get("stream"), names.get(tid, "other"))
        s = streams.setdefault(key, {"n": 0, "busy_ms": 0.0, "delays": [], "names": {}})
        s["n"] += 1
        s["busy_ms"] += e.get("dur", 0) / 1000
        s["names"][e["name"][:60]] = s["names"].get(e["name"][:60], 0) + 1
        if end is not None:
            s["delays"].append((e["ts"] - end) / 1000)
    per_stream = []
    for (stream, who), s in sorted(streams.items(), key=lambda kv: -kv[1]["n"]):
        d = np.array(s["delays"] or [0.0])
        delay = {"median": np.median(d), "p90": np.quantile(d, 0.9), "max": d.max()}
        per_stream.append(
            {
                "stream": stream,
                "launched_by": who,
                "n": s["n"],
                "busy_ms": round(s["busy_ms"], 1),
                "launch_to_start_ms": {k: round(float(v), 3) for k, v in delay.items()},
                "top": sorted(s["names"].items(), key=lambda kv: -kv[1])[:3],
            }
        )
    return {"threads": threads, "streams": per_stream}


def _profiled(decode, out: Path, label: str) -> tuple[float, dict]:
    """`decode()` under torch.profiler's CUDA activity (every CUDA call and kernel of this
    process, ONNX Runtime's and nvImageCodec's too), and the trace's summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    split: dict = {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rate = decode(split)
    trace = Path("/tmp") / f"trace-{label}.json"
    prof.export_chrome_trace(str(trace))
    summary = _summarize_trace(trace, {"model": model_tid[0], "decoder": split.get("tids", [])})
    (out / f"trace-summary-{label}.json").write_text(json.dumps(summary, indent=1))
    return rate, {**split, "trace": f"trace-summary-{label}.json"}


class NvjpegHw:
    """nvJPEG's hardware decoder called directly (ctypes), all of its GPU work on one stream
    of a chosen priority. nvImageCodec runs the decode on streams of its own at CUDA's default
    (lowest) priority; do its kernels wait behind the model's for that reason?"""

    # nvjpegOutputFormat_t: interleaved RGB (what nvImageCodec asks for) or planar RGB.
    FORMATS = {"RGBI": 5, "RGB": 3}

    def __init__(self, priority: int, batch: int = 512, fmt: str = "RGBI") -> None:
        import ctypes as ct

        import cupy
        import nvidia

        path = next(Path(r) / "cu13/lib/libnvjpeg.so.13" for r in nvidia.__path__
                    if (Path(r) / "cu13/lib/libnvjpeg.so.13").exists())  # fmt: skip
        lib = self.lib = ct.CDLL(str(path))
        vp, i = ct.c_void_p, ct.c_int

        class Image(ct.Structure):  # nvjpegImage_t
            _fields_ = [("channel", ct.c_void_p * 4), ("pitch", ct.c_size_t * 4)]

        self.Image, self.ct = Image, ct
        lib.nvjpegCreateEx.argtypes = [i, vp, vp, ct.c_uint, ct.POINTER(vp)]
        lib.nvjpegJpegStateCreate.argtypes = [vp, ct.POINTER(vp)]
        lib.nvjpegDecodeBatchedPreAllocate.argtypes = [vp, vp, i, i, i, i, i]
        lib.nvjpegDecodeBatchedInitialize.argtypes = [vp, vp, i, i, i]
        pointers = [ct.POINTER(ct.c_char_p), ct.POINTER(ct.c_size_t), ct.POINTER(Image)]
        lib.nvjpegDecodeBatched.argtypes = [vp, vp, *pointers, vp]
        self.handle, self.state = vp(), vp()
        hardware, css_420, self.fmt = 3, 2, self.FORMATS[fmt]
        interpolate = 1 << 5  # NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION, as nvImageCodec's
        self._ok(lib.nvjpegCreateEx(hardware, None, None, interpolate, ct.byref(self.handle)),
                 "create")  # fmt: skip
        self._ok(lib.nvjpegJpegStateCreate(self.handle, ct.byref(self.state)), "state")
        status = lib.nvjpegDecodeBatchedPreAllocate(
            self.handle, self.state, batch, 512, 512, css_420, self.fmt
        )
        self._ok(status, "pre-allocate")
        self.cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True, priority=priority)
        self.buffer = cupy.empty(0, cupy.uint8)

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"nvJPEG {what}: status {status}")

    def decode(self, blobs: list[bytes], sizes: list[tuple[int, int]]) -> None:
        """Decode `blobs` (of (height, width) `sizes`) to RGB on the GPU and wait for it."""
        ct, n = self.ct, len(blobs)
        total = sum(h * w * 3 for h, w in sizes)
        if self.buffer.size < total:
            self.buffer = self.cupy.empty(total, self.cupy.uint8)
        images, at = (self.Image * n)(), self.buffer.data.ptr
        planar = self.fmt == self.FORMATS["RGB"]
        for k, (h, w) in enumerate(sizes):
            for c in range(3 if planar else 1):  # planar: three h x w planes, one after another
                images[k].channel[c], images[k].pitch[c] = at + c * h * w, w if planar else w * 3
            at += h * w * 3
        data = (ct.c_char_p * n)(*blobs)
        lengths = (ct.c_size_t * n)(*[len(b) for b in blobs])
        lib = self.lib
        self._ok(lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, n, 1, self.fmt), "init")
        self._ok(lib.nvjpegDecodeBatched(self.handle, self.state, data, lengths, images,
                                         self.stream.ptr), "decode")  # fmt: skip
        self.stream.synchronize()


def _nvjpeg_for(blobs: list[bytes], sizes: list, decoders: list, seconds: float) -> float:
    """Rows/s of direct nvJPEG decoders, one thread each, on batches of 512 for `seconds`."""

    stop, counts, batch = time.perf_counter() + seconds, [0] * len(decoders), 512

    def work(k: int) -> None:
        i = k * batch
        while time.perf_counter() < stop:
            idx = [(i + j) % len(blobs) for j in range(batch)]
            decoders[k].decode([blobs[j] for j in idx], [sizes[j] for j in idx])
            counts[k] += batch
            i += len(decoders) * batch

    elapsed = _on_threads(work, len(decoders))  # before the sum: the threads fill `counts`
    return sum(counts) / elapsed


def _nvjpeg_rows(
    measure, rows: list, blobs: list[bytes], formats: tuple[str, ...] = ("RGBI",)
) -> None:
    """Direct nvJPEG hardware decoders (3 threads) to each of `formats`, on a stream of the
    lowest and of the highest priority, alone and beside the model; their pixels against
    Pillow's decode. Should ctypes' nvJPEG fail, an error row of `rows` says why."""
    try:
        _nvjpeg_measure(measure, blobs, formats)
    except Exception as exc:
        rows.append({"setup": "nvJPEG direct", "error": f"{type(exc).__name__}: {exc}"})
        print(f"decode under load: nvJPEG direct: {exc!r}", flush=True)


def _nvjpeg_measure(measure, blobs: list[bytes], formats: tuple[str, ...]) -> None:
    """`_nvjpeg_rows`' measurements, which it wraps so that a failure is a row."""
    import io

    from PIL import Image

    sizes = []
    for b in blobs:
        w, h = Image.open(io.BytesIO(b)).size
        sizes.append((h, w))
    for fmt in formats:
        for label, priority in (("lowest", 0), ("highest", -1000)):
            ds = [NvjpegHw(priority, fmt=fmt) for _ in range(3)]
            _nvjpeg_for(blobs[:1536], sizes[:1536], ds, 0.01)  # warm up
            if label == "lowest":  # the pixels: the first image against Pillow's full decode
                ds[0].decode(blobs[:1], sizes[:1])
                h, w = sizes[0]
                got = ds[0].buffer[: h * w * 3].get()
                got = got.reshape(3, h, w).transpose(1, 2, 0) if fmt == "RGB" else got
                ref = np.asarray(Image.open(io.BytesIO(blobs[0])).convert("RGB")).astype(int)
                diff = np.abs(got.reshape(h, w, 3).astype(int) - ref).max()
                print(f"nvJPEG direct ({fmt}) vs Pillow: max diff {diff}", flush=True)
            measure(f"nvJPEG hardware decoder direct, {fmt}, {label} priority stream", 3,
                    lambda ds=ds: _nvjpeg_for(blobs, sizes, ds, seconds=2.5))  # fmt: skip


def _timed(blobs: list[bytes], ds: list, seconds: float):
    """A `measure()` decode: the decoders' decode call alone, each call's time split."""

    def timed() -> tuple[float, dict]:
        split: dict = {}
        return _decode_for(blobs, ds, seconds, how="decode", split=split), split

    return timed


def _traced(blobs: list[bytes], ds: list, seconds: float, out: Path, label: str):
    """A `measure()` decode under a CUDA trace, summarized to trace-summary-<label>-alone.json
    and then -busy.json, in the order in which `measure()` calls it."""
    phases = iter(("alone", "busy"))

    def traced() -> tuple[float, dict]:
        def run(split: dict) -> float:
            return _decode_for(blobs, ds, min(seconds, 2.0), how="decode", split=split)

        return _profiled(run, out, f"{label}-{next(phases)}")

    return traced


def _options_rows(
    blobs: list[bytes], model: Path, pixels: np.ndarray, seconds: float, out: Path
) -> list:
    """The hardware decoder with nvImageCodec's pre-allocation options against without; each
    call's time in nvImageCodec's decode call and in the wait after it; and a CUDA trace of
    the decode beside the model (which calls wait, and how long its kernels queue)."""
    from nvidia import nvimgcodec

    k, b = nvimgcodec.BackendKind, nvimgcodec.Backend
    job_backends = [b(k.HW_GPU_ONLY), b(k.GPU_ONLY), b(k.HYBRID_CPU_GPU)]
    rows: list[dict] = []
    with _beside_model(model, pixels, rows) as measure:
        for label, options in (("default", ""), ("preallocated", _preallocated())):
            ds = _decoders(blobs, {**_hw_only(), "options": options}, 3)
            _decode_for(blobs[:1536], ds, 0.01, how="decode")  # warm up
            name = f"hw only, decode, {label} options"
            measure(name, 3, _timed(blobs, ds, seconds))
            if label == "default" or rows[-1]["decode"] < rows[-2]["decode"] / 2:
                measure(f"{name}, CUDA trace", 3, _traced(blobs, ds, seconds, out, label))
            del ds
        job = _decoders(blobs, {"backends": job_backends, "options": _preallocated()}, 3)
        measure(
            "job's decoder, preallocated options", 3, lambda j=job: _decode_for(blobs, j, seconds)
        )
        del job
        _nvjpeg_rows(measure, rows, blobs)
    return rows


def _formats_rows(
    blobs: list[bytes], model: Path, pixels: np.ndarray, seconds: float, out: Path
) -> list:
    """Does the hardware decoder's per-image kernel wait behind the model? The options probe's
    trace shows, per image, an `rgba2rgb` kernel (interleaved RGB out of what the decoding
    engine writes) and a wait for it. Here nvImageCodec's hardware decoder is asked for
    interleaved RGB (the job's), planar RGB and planar YUV, and nvJPEG directly for
    interleaved and planar RGB on a stream of the lowest and of the highest priority; each
    alone and beside the model, with a CUDA trace of planar RGB."""
    from nvidia import nvimgcodec

    rows: list[dict] = []
    with _beside_model(model, pixels, rows) as measure:
        for fmt in ("I_RGB", "P_RGB", "P_YUV"):
            try:
                ds = _decoders(blobs, _hw_only(), 3)
                for d in ds:  # after the job's warm-up, which wants interleaved RGB
                    d.params = nvimgcodec.DecodeParams(
                        apply_exif_orientation=False,
                        color_spec=getattr(
                            nvimgcodec.ColorSpec, "UNCHANGED" if fmt == "P_YUV" else "SRGB"
                        ),
                        allow_any_depth=False,
                        sample_format=getattr(nvimgcodec.SampleFormat, fmt),
                    )
                _decode_for(blobs[:1536], ds, 0.01, how="decode")  # warm up
            except Exception as exc:
                rows.append({"setup": f"hw only, {fmt}", "error": f"{type(exc).__name__}: {exc}"})
                print(f"decode under load: hw only, {fmt}: {exc!r}", flush=True)
                continue
            measure(f"hw only, decode, {fmt}", 3, _timed(blobs, ds, seconds))
            if fmt == "P_RGB":
                traced = _traced(blobs, ds, seconds, out, fmt)
                measure(f"hw only, decode, {fmt}, CUDA trace", 3, traced)
            del ds
        _nvjpeg_rows(measure, rows, blobs, ("RGBI", "RGB"))
    return rows


def decode_under_load(
    blobs: list[bytes], model: Path, pixels: np.ndarray, seconds: float, which: str, out: Path
) -> list:
    """Each decoder set-up's rate alone and while the model runs flat out on the same GPU in
    the same process (as in a job's own process), with the model's rate meanwhile; also
    Pillow's process pool, alone-GPU-busy and beside the job's GPU decoders. `which`: hw,
    only the hardware JPEG decoder, its parts apart (is it the decode that slows beside the
    model, or the resize and copy after it; do fresh image buffers matter); green, the
    hardware decoder in a process of its own and in CUDA green contexts; options, the
    hardware decoder with pre-allocation options and a CUDA trace beside the model (`out`);
    else all."""
    if which == "options":
        return _options_rows(blobs, model, pixels, seconds, out)
    if which == "formats":
        return _formats_rows(blobs, model, pixels, seconds, out)
    if which == "green":
        return _separate_rows(blobs, model, pixels, seconds) + _green_rows(
            blobs, model, pixels, seconds
        )
    rows: list[dict] = []
    with _beside_model(model, pixels, rows) as measure:
        if which == "hw":
            for n in (3, 1):
                ds = _decoders(blobs, _hw_only(), n)
                for how in ("job", "decode", "reuse"):
                    measure(f"hw only, {how}", n, lambda ds=ds, h=how: _decode_for(
                        blobs, ds, seconds, how=h))  # fmt: skip
                del ds
        else:
            for name, kwargs, n in _decoder_setups():
                try:
                    ds = _decoders(blobs, kwargs, n)
                except Exception as exc:
                    rows.append({"setup": name, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                measure(name, n, lambda ds=ds: _decode_for(blobs, ds, seconds))
                del ds
            chunks = [blobs[i : i + 64] for i in range(0, len(blobs), 64)]
            with ProcessPoolExecutor(CORES - 2) as pool:
                list(pool.map(_decode_chunk, chunks[:CORES]))

                def pillow() -> float:
                    start, n = time.perf_counter(), 0
                    while time.perf_counter() - start < seconds:
                        n += sum(pool.map(_decode_chunk, chunks[: 4 * CORES]))
                    return n / (time.perf_counter() - start)

                measure(f"pillow ({CORES - 2} processes)", CORES - 2, pillow)

                def both(gpu: list) -> float:
                    with ThreadPoolExecutor(1) as side:
                        cpu = side.submit(pillow)
                        rate = _decode_for(blobs, gpu, seconds)
                        return rate + cpu.result()

                # The hardware decoder alone left the model 0.92 of its rate (2026-12-06) and
                # Pillow's processes all of it: together, shards split between them.
                for label, kwargs in (("job's", None), ("hw-only", _hw_only())):
                    gpu = _decoders(blobs, kwargs, 3)
                    measure(f"pillow + {label} gpu decoders", CORES + 1, lambda gpu=gpu: both(gpu))
                    del gpu
    return rows


WORDS = 20000


def _syllables(rng: np.random.Generator, n: int) -> list[str]:
    parts = ["ka", "lo", "mi", "tre", "su", "van", "do", "pe", "ri", "zo", "an", "el", "or", "qu"]
    return ["".join(rng.choice(parts, rng.integers(1, 5))) for _ in range(n)]


def make_texts(root: Path, rows: int, per_file: int = 8192) -> None:
    if root.exists():
        return
    rng = np.random.default_rng(0)
    vocab = np.array(_syllables(rng, WORDS))
    tmp = root.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        lengths = rng.integers(10, 150, n)
        words = vocab[rng.zipf(1.3, lengths.sum()) % WORDS]
        cuts = np.cumsum(lengths)[:-1]
        texts = [" ".join(w) + "." for w in np.split(words, cuts)]
        table = pa.table({"id": np.arange(start, start + n), "text": texts})
        pq.write_table(table, tmp / f"part-{f:05d}.parquet")
    tmp.rename(root)


def make_tokenizer(texts: Path, path: Path) -> None:
    """A BERT WordPiece tokenizer (lowercase, [CLS] ... [SEP]) trained on the texts, offline."""
    if path.exists():
        return
    from tokenizers import BertWordPieceTokenizer, processors

    sample = pq.read_table(next(texts.glob("*.parquet")))["text"].to_pylist()
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(sample, vocab_size=30522, min_frequency=1)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    tok.save(str(path))


def tokenize_rate(texts: Path, tokenizer: Path, rows: int) -> tuple[float, dict]:
    """The job's own `encode` (tokenizers' batch encode, every core), rows/s; and a batch."""
    from batch_infer.data.decode.text import TextEncode, encode, load_tokenizer, pad_token

    text = tokenizer.read_text()
    pad_id, pad = pad_token(load_tokenizer(text))
    t = TextEncode("text", text, "bench", SEQ, "max_length", True, "input_ids", pad_id, pad)
    column = pq.read_table(next(texts.glob("*.parquet")))["text"].combine_chunks()
    encode(column.slice(0, 256), t)  # warm up
    start, done = time.perf_counter(), 0
    while done < rows:
        fields, _ = encode(column, t)
        done += len(column)
    rate = done / (time.perf_counter() - start)
    feeds = {"ids": fields["input_ids"][:BATCH], "mask": fields["attention_mask"][:BATCH]}
    return rate, feeds


def _started_with(folder: Path, code: str) -> dict[str, str]:
    """Environment for a job whose Python runs `code` as it starts: `folder`, first on its
    path, holds it as sitecustomize.py."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def switch_interval(work: Path, seconds: float = 0.0005) -> dict[str, str]:
    """Environment for a job whose Python hands the GIL on every `seconds` (CPython's
    default is 0.005): a folder first on its path with a sitecustomize.py that sets it. A
    thread back from a call that let the GIL go waits for a thread running Python to reach
    the interval; if the job runs faster so, its threads queue for the GIL."""
    return _started_with(
        work / f"switch-{seconds}", f"import sys\n\nsys.setswitchinterval({seconds})\n"
    )


def cuda_yield(work: Path) -> dict[str, str]:
    """Environment for a job whose CUDA context yields its thread while it waits for the GPU
    (CU_CTX_SCHED_YIELD) instead of spinning, CUDA's choice where the process has fewer
    contexts than cores: a folder first on its path with a sitecustomize.py that sets the
    primary context's flags before anything makes it (and the 32 hardware queues
    batch-infer sets, in case CUDA reads them when it starts). Its import and cuInit add to
    the job's start. Blocking sync, tried on the decoder alone beside a busy GPU, made it 3.3
    times slower (docs/inputs.md)."""
    return _started_with(
        work / "cuda-yield",
        "import os\n\n"
        'os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")\n'
        "from cuda.bindings import driver\n\n"
        "driver.cuInit(0)\n"
        "_, device = driver.cuDeviceGet(0)\n"
        "driver.cuDevicePrimaryCtxSetFlags(device, driver.CUctx_flags.CU_CTX_SCHED_YIELD)\n",
    )


def run_job(
    name: str,
    spec: dict,
    work: Path,
    out_dir: Path,
    env: dict | None = None,
    stacks: bool = False,
    tree: Path | None = None,
) -> dict:
    """`python3 -m batch_infer.cli -v run` as a whole process (with `env` added to its
    environment), timed from outside; with `stacks`, its threads' stacks sampled into
    `out_dir/{name}.stacks.txt` (benchmarks/stacks.py); with `tree`, the batch-infer of that
    directory runs (`-m` looks in the working directory first)."""
    out = work / f"out-{name}"
    spec = {"name": name, "batch_size": BATCH, **spec,
            "output": {"path": str(out), "keep_columns": ["id"]}}  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    argv = [sys.executable, "-m", "batch_infer.cli", "-v", "run", str(path), "--overwrite", "-q"]
    where = out_dir.resolve() / f"{name}.stacks.txt"
    if stacks:
        argv[1:1] = ["-m", "benchmarks.stacks", str(where), "--"]
    environ = {**os.environ, **(env or {})}
    if tree is not None:  # benchmarks.stacks still from here
        environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with (out_dir / f"{name}.log").open("w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=tree)
    seconds, ended = time.perf_counter() - start, time.time()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    runs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    run = max(runs, key=lambda r: r["started_at"]) if runs else {}
    entries = [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]
    t0 = run.get("started_at", 0.0)
    firsts = [[round(e["prepare_started"] - t0, 3), e["prepare_seconds"],
               round(e["infer_started"] - t0, 3)]
              for e in sorted(entries, key=lambda e: e["infer_started"])[:3]]  # fmt: skip
    return {
        "rc": proc.returncode,
        "seconds": round(seconds, 2),
        "rows": run.get("rows", 0),
        "rate": run.get("rows", 0) / seconds,
        "timeline": run.get("timeline"),
        "backend": run.get("backend"),
        "decoders": sorted({e.get("preprocess", "") for e in entries}),
        "prepare_seconds_sum": round(sum(e["prepare_seconds"] for e in entries), 1),
        # what the first batch waited on: the run's own process's lane (model loaded, warmed
        # up; decoders ready) and its first shards (read and decoded from, for; ran from)
        "lane": next((a for a in run.get("actor_stats", []) if a["actor"] == -1), None),
        "first_shards": firsts,
        # after the run's record was written: the summary, os._exit and the process's teardown
        # (CUDA's context, pinned memory), and of that what came after os._exit (--stacks)
        "after_finished": round(ended - t0 - run["timeline"]["finished"], 3) if run else None,
        "after_exit_call": _after_exit_call(where, ended) if stacks else None,
        "cpu": _cpu_used(before, used, seconds),
    }


def _cpu_used(before: Any, after: Any, seconds: float) -> dict:
    """What the job's process took of the machine: CPU seconds in user code and in the
    kernel, the cores that kept busy on the average, page faults (a page touched for the
    first time: fresh allocations) and context switches (waits, and being made to wait)."""
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"user_seconds": round(user, 1), "system_seconds": round(system, 1),
            "cores_busy": round((user + system) / seconds, 2),
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "waits": after.ru_nvcsw - before.ru_nvcsw,
            "preempted": after.ru_nivcsw - before.ru_nivcsw}  # fmt: skip


def _after_exit_call(stacks: Path, ended: float) -> float | None:
    """Seconds from the job's os._exit call (benchmarks/stacks.py's first line) to its end."""
    first = stacks.read_text().split("\n", 1)[0] if stacks.exists() else ""
    return round(ended - float(first.split()[-1]), 3) if first.startswith("# os._exit") else None


def linked_copies(root: Path, copies: int) -> Path:
    """`root`'s files, each linked `copies` times under another name: a job `copies` times as
    long over the same distinct images (generating them is the slow part here)."""
    out = root.with_name(f"{root.name}-x{copies}")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            for f in sorted(root.glob("*.parquet")):
                os.link(f, tmp / f"copy{k}-{f.name}")
        tmp.rename(out)
    return out


def gpu_codecs_only(work: Path) -> Path:
    """A folder laid out as nvImageCodec's package with only its nvJPEG extension, for
    NVIMGCODEC_EXTENSIONS_PATH (batch-infer's own leaves out only those it cannot load)."""
    from batch_infer.data.decode.gpu_codecs import linked_package, nvimgcodec_package

    package = nvimgcodec_package()
    assert package is not None
    return linked_package(package, sorted((package / "extensions").glob("libnvjpeg_ext.so*")), work)


def resnet50_fp16(work: Path) -> Path:
    """ResNet-50 (uint8 NHWC pixels in) made fp16 by ONNX Runtime's converter, under `work`
    once."""
    from benchmarks.gpu_bench import to_fp16
    from tests.gpu_models import export_resnet50

    fp32, fp16 = work / "resnet50-fp32.onnx", work / "resnet50-fp16.onnx"
    if not fp16.exists():
        work.mkdir(parents=True, exist_ok=True)
        export_resnet50(fp32)
        to_fp16(fp32, fp16)
    return fp16


def images(args: argparse.Namespace, res: dict) -> None:
    from benchmarks.gpu_bench import compute_rate

    t = time.perf_counter()
    make_images(args.work / "images", args.images)
    res["images_made_seconds"] = round(time.perf_counter() - t, 1)
    fp16 = resnet50_fp16(args.work)
    blobs = sample_images(args.work / "images", args.decode_sample)
    res["mean_jpeg_kib"] = round(float(np.mean([len(b) for b in blobs])) / 1024, 1)
    res["cpu_decode"] = cpu_decode_rate(blobs)
    print(f"images: CPU decode (Pillow, {CORES} processes) {res['cpu_decode']:,.0f}/s", flush=True)
    res["gpu_decode"] = gpu_decode_rate(blobs)
    print(f"images: GPU decode {res['gpu_decode']}", flush=True)
    pixels = np.stack([decode_pillow(b, D) for b in blobs[:BATCH]])
    res["compute"] = compute_rate(fp16, {"pixels": pixels}, args.seconds)
    print(f"images: ResNet-50 fp16 compute {res['compute']:,.0f}/s", flush=True)
    if args.decode_load:
        which = args.decode_load
        which = which if which in ("hw", "green", "options", "formats") else "all"
        res["decode_under_load"] = decode_under_load(
            blobs, fp16, pixels, args.seconds / 2, which, args.out
        )
        if args.decode_load != "also":
            return
    inputs = {"pixels": {"column": "image", "decode": "image", "size": [224, 224]}}
    first = args.job_setups[0]
    runs = []
    if args.plain_jobs:
        runs += [("auto", args.work / "images", first), ("cpu", args.work / "images", first)]
    for n, k in enumerate(k for k in args.image_copies if k > 1):
        copies = linked_copies(args.work / "images", k)
        runs += [("auto", copies, label) for label in args.job_setups[: 1 if n else None]]
    res["jobs"] = []
    for device, root, label in runs:
        inputs["pixels"]["device"] = device
        spec = {"input": {"path": str(root)},
                "model": {"onnx": str(fp16), "inputs": inputs}}  # fmt: skip
        name = f"resnet50-decode-{device}-{root.name}-{label}"
        tree = args.baseline if label == "baseline" else None
        env = JOB_SETUPS[label]
        if label == "gpu-codecs":
            env = {"NVIMGCODEC_EXTENSIONS_PATH": str(gpu_codecs_only(args.work))}
        elif label == "switch":
            env = switch_interval(args.work)
        elif label == "yield":
            env = cuda_yield(args.work)
        job = run_job(name, spec, args.work, args.out, env, args.stacks, tree)
        res["jobs"].append({"device": device, "setup": label, **job})
        print(f"images: job (decode {device}, {root.name}, set-up {label}) {job}", flush=True)


def text(args: argparse.Namespace, res: dict) -> None:
    from benchmarks.gpu_bench import compute_rate, to_fp16
    from tests.gpu_models import export_bert

    for rows in args.texts:
        make_texts(args.work / f"texts-{rows}", rows)
    first = args.work / f"texts-{args.texts[0]}"
    tokenizer = args.work / "bert-tokenizer.json"
    make_tokenizer(first, tokenizer)
    fp32, fp16 = args.work / "bert-fp32.onnx", args.work / "bert-fp16.onnx"
    if not fp16.exists():
        export_bert(fp32, seq=SEQ)
        to_fp16(fp32, fp16)
    res["tokenize"], feeds = tokenize_rate(first, tokenizer, 32768)
    print(f"text: tokenization {res['tokenize']:,.0f}/s", flush=True)
    res["compute"] = compute_rate(fp16, feeds, args.seconds)
    print(f"text: BERT-base fp16 compute {res['compute']:,.0f}/s", flush=True)
    form = {"column": "text", "tokenizer": str(tokenizer), "max_length": SEQ}
    inputs = {"ids": form | {"field": "input_ids"}, "mask": form | {"field": "attention_mask"}}
    res["jobs"] = []
    for rows in args.texts:
        spec = {
            "input": {"path": str(args.work / f"texts-{rows}")},
            "model": {"onnx": str(fp16), "inputs": inputs},
        }
        job = run_job(f"bert-text-{rows}", spec, args.work, args.out)
        res["jobs"].append(job)
        print(f"text: job ({rows:,} rows) {job}", flush=True)


def markdown(results: dict) -> str:
    lines = [
        "| workload | rows | decode or tokenize (rows/s) | compute (rows/s) | job wall clock "
        "| job rows/s | job / compute | first batch | decoder |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def row(name: str, j: dict, rates: str, compute: float) -> str:
        first = (j.get("timeline") or {}).get("first_batch")
        return (
            f"| {name} | {j['rows']:,} | {rates} | {compute:,.0f} | {j['seconds']:.1f} s | "
            f"{j['rate']:,.0f} | {j['rate'] / compute:.2f} | "
            f"{'-' if first is None else f'{first:.1f} s'} | {'; '.join(j['decoders'])} |"
        )

    img = results.get("images")
    if img:
        gpu = img["gpu_decode"]
        rates = f"CPU {img['cpu_decode']:,.0f}; GPU " + (
            f"{gpu['rate']:,.0f}" if gpu["available"] else "not available"
        )
        for j in img.get("jobs", []):
            name = f"ResNet-50 fp16, JPEG (decode: {j['device']}, set-up: {j['setup']})"
            lines.append(row(name, j, rates, img["compute"]))
    if img and img.get("decode_under_load"):
        lines += ["", "| decoder set-up | threads | decode alone | decode, model busy "
                  "| model meanwhile |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        pairs: dict[tuple, dict] = {}
        for r in img["decode_under_load"]:
            pairs.setdefault((r["setup"], r.get("threads")), {}).update(
                {r.get("model_busy"): r} if "decode" in r else {"error": r["error"]}
            )
        for (setup, threads), p in pairs.items():
            if "error" in p:
                lines.append(f"| {setup} | - | {p['error']} | | |")
            else:
                alone, busy = p[False], p[True]
                lines.append(f"| {setup} | {threads} | {alone['decode']:,} | {busy['decode']:,} "
                             f"| {busy['model']:,} |")  # fmt: skip
    txt = results.get("text")
    if txt:
        for j in txt["jobs"]:
            rate = f"{txt['tokenize']:,.0f}"
            lines.append(row("BERT-base fp16, raw text", j, rate, txt["compute"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["images", "text"])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--plain-jobs", action=argparse.BooleanOptionalAction, default=True,
                    help="the jobs over the images once, with GPU and with CPU decode")  # fmt: skip
    ap.add_argument("--image-copies", type=int, nargs="+", default=[4],
                    help="also a job over each file K times, for each K")  # fmt: skip
    ap.add_argument("--texts", type=int, nargs="+", default=[65_536, 262_144])
    ap.add_argument("--decode-sample", type=int, default=16_384)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--job-setups",
        nargs="+",
        choices=sorted(JOB_SETUPS),
        default=["job"],
        help="the jobs' GPU set-ups (job: batch-infer's; c8: CUDA's default 8 hardware "
        "queues; prealloc: nvJPEG's buffers pre-allocated; decoders2, decoders6: that many "
        "GPU decoders; threads1, threads2, threads4: that many CPU threads in each decoder's pool; "
        "gpu-codecs: nvImageCodec's nvJPEG extension alone; yield: CUDA yields the core "
        "of a thread waiting for the GPU; switch: the GIL "
        "handed on every 0.5 ms; baseline: the batch-infer in --baseline): the job over the "
        "first --image-copies runs with each, the others with the first",
    )
    ap.add_argument("--baseline", type=Path,
                    help="a directory holding another commit's batch_infer/ (git archive "
                    "COMMIT batch_infer | tar -x -C DIR), for set-up baseline")  # fmt: skip
    ap.add_argument(
        "--decode-load",
        choices=["also", "only", "hw", "green", "options", "formats"],
        help="decoder set-ups alone and beside the running model (only: no jobs; hw: the "
        "hardware decoder's parts apart, no jobs; green: the hardware decoder in a process "
        "of its own and in CUDA green contexts, no jobs; options: its pre-allocation options, "
        "a CUDA trace and nvJPEG called directly on a low or high priority stream, no jobs; "
        "formats: the hardware decoder's output formats, nvImageCodec's and nvJPEG's, no jobs)",
    )
    ap.add_argument("--cuda-connections", type=int,
                    help="CUDA_DEVICE_MAX_CONNECTIONS for this process and its jobs (default "
                    "batch-infer's, 32): "
                    "how many hardware queues the streams share")  # fmt: skip
    ap.add_argument("--stacks", action="store_true",
                    help="sample the image jobs' thread stacks (benchmarks/stacks.py)")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-inputs"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()
    if ("baseline" in args.job_setups) != (args.baseline is not None):
        ap.error("set-up baseline and --baseline go together")
    # absolute: a baseline job runs in its own working directory
    args.baseline, args.work = args.baseline and args.baseline.resolve(), args.work.resolve()
    if args.cuda_connections:  # read when CUDA starts: nothing here has started it yet
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = str(args.cuda_connections)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    connections = int(os.environ["CUDA_DEVICE_MAX_CONNECTIONS"])  # set on batch_infer's import
    results: dict = {"cores": CORES, "cuda_connections": connections}
    for name in args.workloads:
        res: dict = {}
        (images if name == "images" else text)(args, res)
        results[name] = res
        (args.out / "gpu-inputs.json").write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (args.out / "gpu-inputs.md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
