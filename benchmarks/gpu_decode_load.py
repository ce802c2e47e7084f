"""The GPU image decoders beside the running model: the probes behind `gpu_inputs.py
--decode-load` (docs/inputs.md, the sessions of 2026-12-06 and 07), run by hand on the GPU
machine through that command (this module has no command of its own). Each measures a
decoder set-up's rate alone and while ResNet-50 fp16 runs flat out in the same process, with
the model's rate meanwhile: which decoders, threads, options, output formats, CUDA green
contexts or a process of its own let the model keep its rate. `gpu_inputs.py` makes the
images and the model and calls `decode_under_load`; `gpu_decoder_threads.py --beside-model`
uses `beside_model`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.gpu_inputs import (
    CORES,
    D,
    decode_chunk,
    hw_only_kwargs,
    made_decoders,
    preallocated_options,
)


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
            self.decoder = nvimgcodec.Decoder(device_id=-1, **hw_only_kwargs())
        except (TypeError, ValueError, RuntimeError):
            self.decoder = nvimgcodec.Decoder(device_id=0, **hw_only_kwargs())
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


model_tid = [0]  # the native id of the thread running the model in `beside_model`


@contextlib.contextmanager
def beside_model(model: Path, pixels: np.ndarray, rows: list, enter=None) -> Iterator:
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
                with beside_model(model, pixels, rows, enter) as measure:
                    measure(f"hw only, decode, {sms} SMs of its own; model on {label}", 3, run)
            except Exception as exc:
                rows.append({"setup": f"green {sms} SMs, model on {label}", "error": repr(exc)})
                print(f"decode under load: green {sms}, model on {label}: {exc!r}", flush=True)
            split.enter(split.primary)
    return rows


def _hw_in_process(conn, blobs: list[bytes]) -> None:
    """A process of its own (its own CUDA context) decoding with the hardware decoder on 3
    threads, `seconds` at a time as asked through `conn`: does the decode still slow when
    nothing of the model's is in its context?"""
    ds = made_decoders(blobs, hw_only_kwargs(), 3)
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
        ds = made_decoders(blobs, hw_only_kwargs(), 3)
        _decode_for(blobs[:1536], ds, 0.01, how="decode")
        ours.recv()

        def elsewhere() -> float:
            ours.send(seconds)
            return ours.recv()

        with beside_model(model, pixels, rows) as measure:
            measure("hw only, decode", 3, lambda: _decode_for(blobs, ds, seconds, how="decode"))
            measure("hw only, decode, in a process of its own", 3, elsewhere)
    finally:
        ours.send(None)
        child.join()
    return rows


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
    with beside_model(model, pixels, rows) as measure:
        for label, options in (("default", ""), ("preallocated", preallocated_options())):
            ds = made_decoders(blobs, {**hw_only_kwargs(), "options": options}, 3)
            _decode_for(blobs[:1536], ds, 0.01, how="decode")  # warm up
            name = f"hw only, decode, {label} options"
            measure(name, 3, _timed(blobs, ds, seconds))
            if label == "default" or rows[-1]["decode"] < rows[-2]["decode"] / 2:
                measure(f"{name}, CUDA trace", 3, _traced(blobs, ds, seconds, out, label))
            del ds
        job = made_decoders(blobs, {"backends": job_backends, "options": preallocated_options()}, 3)
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
    with beside_model(model, pixels, rows) as measure:
        for fmt in ("I_RGB", "P_RGB", "P_YUV"):
            try:
                ds = made_decoders(blobs, hw_only_kwargs(), 3)
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
    with beside_model(model, pixels, rows) as measure:
        if which == "hw":
            for n in (3, 1):
                ds = made_decoders(blobs, hw_only_kwargs(), n)
                for how in ("job", "decode", "reuse"):
                    measure(f"hw only, {how}", n, lambda ds=ds, h=how: _decode_for(
                        blobs, ds, seconds, how=h))  # fmt: skip
                del ds
        else:
            for name, kwargs, n in _decoder_setups():
                try:
                    ds = made_decoders(blobs, kwargs, n)
                except Exception as exc:
                    rows.append({"setup": name, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                measure(name, n, lambda ds=ds: _decode_for(blobs, ds, seconds))
                del ds
            chunks = [blobs[i : i + 64] for i in range(0, len(blobs), 64)]
            with ProcessPoolExecutor(CORES - 2) as pool:
                list(pool.map(decode_chunk, chunks[:CORES]))

                def pillow() -> float:
                    start, n = time.perf_counter(), 0
                    while time.perf_counter() - start < seconds:
                        n += sum(pool.map(decode_chunk, chunks[: 4 * CORES]))
                    return n / (time.perf_counter() - start)

                measure(f"pillow ({CORES - 2} processes)", CORES - 2, pillow)

                def both(gpu: list) -> float:
                    with ThreadPoolExecutor(1) as side:
                        cpu = side.submit(pillow)
                        rate = _decode_for(blobs, gpu, seconds)
                        return rate + cpu.result()

                # The hardware decoder alone left the model 0.92 of its rate (2026-12-06) and
                # Pillow's processes all of it: together, shards split between them.
                for label, kwargs in (("job's", None), ("hw-only", hw_only_kwargs())):
                    gpu = made_decoders(blobs, kwargs, 3)
                    measure(f"pillow + {label} gpu decoders", CORES + 1, lambda gpu=gpu: both(gpu))
                    del gpu
    return rows
