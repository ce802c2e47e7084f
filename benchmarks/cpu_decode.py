"""CPU image decoders side by side: decode + resize + centre crop of ImageNet-like JPEGs.

Photo-like JPEGs of about 500x375 (q90, a quarter portrait) are generated in memory, then
each library decodes them to 224x224 RGB the way the job needs (shorter side to 224, the
centre). Timed by CPU time per image in one process (`time.process_time`), so a busy
machine shifts the figures less than wall-clock time would; each figure is the best of
`--repeat` passes. `--workers N` also times Pillow (the decoder batch-infer uses) on N
threads and on N processes, wall clock.

    python benchmarks/cpu_decode.py --images 200 --repeat 3 --workers 2 --out benchmarks/results
    /tmp/simd/bin/python benchmarks/cpu_decode.py --only pillow   # Pillow-SIMD, its own venv
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch_infer.data.decode.images import ImageDecode, crop_box, decode_pillow
from jobs.make_examples import jpeg, photo

S = 224
D = ImageDecode("image", S, S, "shorter_side_crop", "NHWC", "RGB", "cpu", False)


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [jpeg(photo(rng, 500, 375) if i % 4 else photo(rng, 375, 500), 90) for i in range(n)]


def _crop(w: int, h: int) -> tuple[int, int, int, int]:
    """(resized width, height, left, top) of the same shorter-side-and-centre recipe."""
    scale = S / min(w, h)
    rw, rh = max(S, int(w * scale)), max(S, int(h * scale))
    return rw, rh, (rw - S) // 2, (rh - S) // 2


def decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    """Every decoder importable here, by name."""
    out: dict[str, Callable[[bytes], np.ndarray]] = {}
    import PIL
    from PIL import Image

    simd = ".post" in PIL.__version__ or "simd" in PIL.__version__
    out["pillow-simd" if simd else "pillow"] = lambda b: decode_pillow(b, D)

    def pillow_decode_only(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            im.load()
            return np.asarray(im)

    out["pillow (decode only)"] = pillow_decode_only
    try:
        import cv2

        cv2.setNumThreads(1)

        def opencv(interp: int) -> Callable[[bytes], np.ndarray]:
            def f(b: bytes) -> np.ndarray:
                a = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
                rw, rh, left, top = _crop(a.shape[1], a.shape[0])
                r = cv2.resize(a, (rw, rh), interpolation=interp)
                return cv2.cvtColor(r[top : top + S, left : left + S], cv2.COLOR_BGR2RGB)

            return f

        out["opencv INTER_AREA"] = opencv(cv2.INTER_AREA)
        out["opencv INTER_LINEAR (aliases)"] = opencv(cv2.INTER_LINEAR)
        out["opencv (decode only)"] = lambda b: cv2.imdecode(
            np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR
        )
    except ImportError:
        pass
    try:
        import simplejpeg

        def sj_pillow(b: bytes) -> np.ndarray:
            a = simplejpeg.decode_jpeg(b, colorspace="RGB")
            box, w, h = crop_box(a.shape[1], a.shape[0], D)
            return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR, box=box))

        out["simplejpeg + pillow resize"] = sj_pillow
        out["simplejpeg (decode only)"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG

        tj = TurboJPEG()
        out["pyturbojpeg (decode only)"] = lambda b: tj.decode(b)
    except Exception:  # ImportError, or no libturbojpeg of a version it takes
        pass
    return out


def per_core(fn: Callable[[bytes], np.ndarray], jpegs: list[bytes], repeat: int) -> float:
    """Best CPU seconds per image over `repeat` passes."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for b in jpegs:
            fn(b)
        best = min(best, (time.process_time() - start) / len(jpegs))
    return best


def _pillow_chunk(chunk: list[bytes]) -> int:
    for b in chunk:
        decode_pillow(b, D)
    return len(chunk)


def parallel(jpegs: list[bytes], workers: int, kind: str) -> float:
    """Images/s, wall clock, Pillow on `workers` threads or processes."""
    chunks = [jpegs[i::workers] for i in range(workers)]
    pool = ThreadPoolExecutor if kind == "threads" else ProcessPoolExecutor
    with pool(workers) as ex:
        list(ex.map(_pillow_chunk, [c[:2] for c in chunks]))  # warm up the workers
        start = time.perf_counter()
        done = sum(ex.map(_pillow_chunk, chunks))
        return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="also time Pillow on N threads/procs")
    ap.add_argument("--only", default="", help="substring of the decoders to run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    jpegs = make_jpegs(args.images)
    kb = np.mean([len(b) for b in jpegs]) / 1024
    load = os.getloadavg()[0]
    print(f"{len(jpegs)} JPEGs, mean {kb:.1f} KiB; {os.cpu_count()} cores, load {load:.1f}")
    results: dict = {"images": len(jpegs), "mean_kib": round(kb, 1), "load_before": load,
                     "python": platform.python_version(), "per_core": {}}  # fmt: skip
    for name, fn in decoders().items():
        if args.only not in name:
            continue
        sec = per_core(fn, jpegs, args.repeat)
        results["per_core"][name] = {"ms_cpu_per_image": round(sec * 1e3, 3),
                                     "images_per_s_per_core": round(1 / sec)}  # fmt: skip
        print(f"  {name:34s} {sec * 1e3:6.2f} ms CPU/image  {1 / sec:6.0f} images/s/core")
    if args.workers:
        for kind in ("threads", "processes"):
            rate = parallel(jpegs, args.workers, kind)
            results[f"pillow_{kind}_{args.workers}"] = round(rate)
            print(f"  pillow on {args.workers} {kind}: {rate:,.0f} images/s wall clock")
    results["load_after"] = os.getloadavg()[0]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "simd" if any("simd" in k for k in results["per_core"]) else "libs"
        (args.out / f"cpu-decode-{tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
