"""Encoded images (JPEG, PNG, WebP, ...) -> fixed-size pixel tensors.

On the CPU: Pillow (libjpeg-turbo inside), measured against OpenCV, simplejpeg and
Pillow-SIMD in docs/inputs.md; its antialiased bilinear resize is what models trained with
torchvision saw. On the GPU: nvImageCodec (nvJPEG, the hardware decoder where the GPU has
one) with Pillow's own resize arithmetic in a CuPy kernel, used where this process sees a GPU
and both import; anything it cannot decode is retried on the CPU, so a reason is Pillow's.

An image that is missing, empty or cannot be decoded is a bad row with its reason, never a
failed shard; a store that cannot be reached fails the shard instead (`_read_file`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import logging
import multiprocessing
import os
import posixpath
import queue
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from batch_infer.data.decode.gpu_codecs import load_installed_codecs_only, nvimgcodec_package
from batch_infer.data.tensors import binary_offsets
from batch_infer.errors import BackendError, InputError, SettingError, one_line
from batch_infer.settings import setting

log = logging.getLogger("batch_infer")

# Reading files named in a column: a pool per process, so object stores' latency overlaps.
_READERS = 16


@dataclass(frozen=True)
class ImageDecode:
    """How one model input is made from an image column (planned once, sent to workers)."""

    column: str
    height: int
    width: int
    resize: str  # shorter_side_crop | stretch
    layout: str  # NHWC | NCHW
    channels: str  # RGB | BGR | L
    device: str  # auto | cpu | gpu
    from_paths: bool  # the column holds paths/URIs, not bytes

    def config(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "decode": "image",
            "size": [self.height, self.width],
            "resize": self.resize,
            "layout": self.layout,
            "channels": self.channels,
        }


def crop_box(width: int, height: int, d: ImageDecode) -> tuple[tuple[float, ...], int, int]:
    """(source box, output width, output height) for Pillow's `resize(size, box=...)`.

    shorter_side_crop: the shorter side scaled to the output's (the longer one by the same
    factor, truncated), then the centre; a crop done through `box`, so only the output's
    pixels are computed. stretch: the whole image to the output's size."""
    if d.resize == "stretch":
        return (0.0, 0.0, float(width), float(height)), d.width, d.height
    scale = max(d.width / width, d.height / height)
    rw, rh = max(d.width, int(width * scale)), max(d.height, int(height * scale))
    left, top = (rw - d.width) // 2, (rh - d.height) // 2
    sx, sy = width / rw, height / rh
    box = (left * sx, top * sy, (left + d.width) * sx, (top + d.height) * sy)
    return box, d.width, d.height


def _mode(d: ImageDecode) -> str:
    return "L" if d.channels == "L" else "RGB"


def decode_pillow(data: bytes | memoryview, d: ImageDecode) -> np.ndarray:
    """One image -> [H, W, C] uint8 (C = 1 or 3); raises on anything undecodable."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a truncated or corrupt file raises here
        im = im.convert(_mode(d))
        box, w, h = crop_box(im.width, im.height, d)
        out = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR, box=box))
    out = out.reshape(h, w, -1)
    return out[..., ::-1] if d.channels == "BGR" else out


def _luma(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 RGB -> [..., 1] luma, in Pillow's integer arithmetic (Convert.c L24):
    the reference the GPU resize's luma follows."""
    x = rgb.astype(np.int32)
    luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _reason(exc: BaseException) -> str:
    """Why a row's image did not decode, the same in every run (for `GROUP BY _reason`):
    Pillow's own "cannot identify image file" names a buffer's address."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a decodable image (not in a format Pillow knows)"
    return f"not a decodable image ({one_line(exc) or type(exc).__name__})"


@lru_cache(maxsize=64)
def _filesystem(uri_root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(uri_root)[0]


def _locate(value: str, fs: pafs.FileSystem, base: str) -> tuple[pafs.FileSystem, str]:
    """A path in a column: a URI (s3://, gs://, file://), an absolute local path, or a path
    relative to the folder of the data file that names it (on the input's filesystem)."""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        rest, query = rest.split("?", 1) if "?" in rest else (rest, "")
        # one filesystem per bucket (or host) and options (`?endpoint_override=...`)
        root = f"{scheme}://{rest.split('/', 1)[0]}" if scheme != "file" else "file:///"
        filesystem = _filesystem(root + (f"?{query}" if query else ""))
        return filesystem, pafs.FileSystem.from_uri(value)[1]
    if value.startswith("/"):
        return pafs.LocalFileSystem(), value
    return fs, posixpath.normpath(posixpath.join(base, value))


def _read_file(value: str, fs: pafs.FileSystem, base: str) -> bytes | str:
    """The file's bytes, or why its row is bad: missing, empty, a folder, not readable to
    us, not a path or URI. Anything else (the network, credentials, a store that fails) is
    no fault of the row: an InputError, so that its shard is not committed and a rerun
    retries it, rather than every row of a store that cannot be reached marked bad."""
    try:
        filesystem, path = _locate(value, fs, base)
    except ValueError as exc:  # an unknown scheme, a malformed URI (ArrowInvalid too)
        return f"not a path or URI that can be read: {value!r} ({one_line(exc)})"
    except (OSError, pa.ArrowException) as exc:  # S3 finds the bucket's region first
        raise InputError(f"cannot reach {value!r} ({one_line(exc)})") from None
    try:
        with filesystem.open_input_file(path) as f:
            data = f.read()
    except FileNotFoundError:
        return f"no such file {value!r}"
    except PermissionError:
        return f"no permission to read {value!r}"
    except (OSError, pa.ArrowException) as exc:
        if filesystem.type_name == "local":  # (asking a store again would wait again)
            with contextlib.suppress(OSError, pa.ArrowException):
                if filesystem.get_file_info(path).type == pafs.FileType.Directory:
                    return f"{value!r} is a folder, not a file"
        raise InputError(f"cannot read {value!r} ({one_line(exc)})") from None
    return data if data else f"empty file {value!r}"


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_READERS, thread_name_prefix="batch-infer-image-read")
        return _pool


# One encoded image: bytes read from a file, or a view of a binary column's buffer.
Blob = bytes | memoryview


def _views(column: pa.Array) -> list[Any]:
    """Each row of a binary column as a view of the column's own buffer (None where null).
    `to_pylist` copied every image into a new bytes object while holding the GIL (about
    40 ms for a shard of 1,024 photos of 80 KB), which the run's other threads waited for."""
    t = column.type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return column.to_pylist()  # strings (paths) and binary_view
    offsets = binary_offsets(column).tolist()
    data_buffer = column.buffers()[2]
    data = memoryview(data_buffer if data_buffer is not None else b"")
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
    return [
        data[offsets[i] : offsets[i + 1]] if valid is None or valid[i] else None
        for i in range(len(column))
    ]


def fetch(
    column: pa.Array, from_paths: bool, fs: pafs.FileSystem, base: str
) -> tuple[list[Blob | None], dict[int, str]]:
    """(encoded image per row, None where the row is bad; {row: reason}). Bytes in a column
    stay where they are (views, no copies); files named in a column are read."""
    values = _views(column)
    reasons: dict[int, str] = {}
    for i, v in enumerate(values):
        if v is None:
            reasons[i] = "null"
        elif len(v) == 0:
            reasons[i] = "empty path" if from_paths else "empty (0 bytes)"
    if not from_paths:
        return [None if i in reasons else v for i, v in enumerate(values)], reasons
    todo = [i for i in range(len(values)) if i not in reasons]
    reads = [_readers().submit(_read_file, values[i], fs, base) for i in todo]
    data: list[Blob | None] = [None] * len(values)
    try:
        for i, read in zip(todo, reads, strict=True):
            got = read.result()
            if isinstance(got, str):
                reasons[i] = got
            else:
                data[i] = got
    finally:  # a store that cannot be reached: the shard fails now, not after every row
        for read in reads:
            read.cancel()
    return data, reasons


def _decode_some(blobs: Sequence[Blob | None], d: ImageDecode) -> tuple[np.ndarray, dict]:
    """Pillow on a run of rows: (pixels, {index in the run: reason})."""
    c = 1 if d.channels == "L" else 3
    out = np.zeros((len(blobs), d.height, d.width, c), np.uint8)
    reasons = {}
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        try:
            out[i] = decode_pillow(blob, d)
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
            reasons[i] = _reason(exc)
    return out, reasons


def _in_ray_task() -> bool:
    # The run's own process imports Ray on another thread while it decodes its first shards.
    from batch_infer.backends import ray_initialized

    return ray_initialized() and bool(sys.modules["ray"].get_runtime_context().get_task_id())


def decode_processes() -> int:
    """Processes the run's own process decodes with (0: on its own threads). Its reader
    threads share one interpreter, and Pillow's per-image Python work does not run in
    parallel there (docs/inputs.md: 1,400-1,900 images/s on 12 threads of 16 cores against
    4,300-4,800 on 16 processes); a Ray task has its one core and decodes in place.
    BATCH_INFER_DECODE_PROCESSES overrides the choice."""
    chosen = setting("BATCH_INFER_DECODE_PROCESSES")
    if chosen is not None:
        return int(chosen)
    cores = os.cpu_count() or 1
    return cores - 2 if cores >= 8 and not _in_ray_task() else 0


_processes: ProcessPoolExecutor | None = None


def _process_pool(workers: int) -> ProcessPoolExecutor:
    global _processes
    with _pool_lock:
        if _processes is None:  # spawned: this process has threads, CUDA and maybe Ray
            context = multiprocessing.get_context("spawn")
            _processes = ProcessPoolExecutor(workers, mp_context=context)
        return _processes


def release_processes() -> None:
    """Shut the decoding pool down after its processes were killed, so that its queues'
    semaphores are released here: the CLI leaves with `os._exit`, which runs no
    finalizers, and Python's resource tracker would report them as leaked."""
    global _processes
    with _pool_lock:
        pool, _processes = _processes, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
        del pool
        gc.collect()


class PillowDecoder:
    """The CPU decoder: Pillow, in this process or, in the run's own process on a machine
    with cores to spare, on a pool of processes in runs of `CHUNK` images."""

    name = "pillow"
    CHUNK = 64

    def describe(self, rows: int | None = None) -> str:
        """What decodes (`rows` images at once, when known)."""
        import PIL

        procs = decode_processes() if rows is None or rows > self.CHUNK else 0
        return f"Pillow {PIL.__version__} on the CPU" + (f" ({procs} processes)" if procs else "")

    def decode(
        self, data: Sequence[Blob | None], d: ImageDecode, out: np.ndarray
    ) -> dict[int, str]:
        """Decode the rows that hold bytes into `out` (other rows are left as they are: a
        retry after the GPU decoder fills only the rows it could not); {row: reason}."""
        procs = decode_processes()
        small = procs == 0 or len(data) <= self.CHUNK
        size = max(1, len(data) if small else self.CHUNK)
        starts = range(0, len(data), size)
        chunks = [data[s : s + size] for s in starts]
        if small:
            runs = [_decode_some(chunk, d) for chunk in chunks]
        else:
            pool = _process_pool(procs)
            sent = [[None if b is None else bytes(b) for b in c] for c in chunks]  # pickled
            runs = [f.result() for f in [pool.submit(_decode_some, c, d) for c in sent]]
        reasons = {}
        for s, chunk, (pixels, why) in zip(starts, chunks, runs, strict=True):
            done = [i for i, blob in enumerate(chunk) if blob is not None and i not in why]
            out[[s + i for i in done]] = pixels[done]
            reasons.update({s + i: r for i, r in why.items()})
        return reasons


# Pillow's fixed-point resampling (Resample.c): coefficients scaled by 2**22, sums rounded
# and clipped to 8 bits after each pass, the horizontal pass first.
PRECISION_BITS = 22


def resize_taps(size: int, start: float, stop: float, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear weights (a triangle, widened when shrinking) for one axis, as Pillow
    computes them: (first source index [out] int32, fixed-point weights [out, taps] int32);
    output i is sum_k weights[i, k] * source[first[i] + k]. The box is single precision, as
    in Pillow; every first + taps stays within the source."""
    lo32, hi32 = np.float32(start), np.float32(stop)
    scale = float(np.float32(hi32 - lo32)) / out
    filterscale = max(scale, 1.0)
    support = filterscale
    spans = []
    for i in range(out):
        center = float(lo32) + (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size)
        x = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((x - center + 0.5) / filterscale))
        total = w.sum()
        spans.append((lo, w / total if total else w))
    taps = max(len(w) for _, w in spans)
    first = np.zeros(out, np.int32)
    weights = np.zeros((out, taps), np.int32)
    for i, (lo, w) in enumerate(spans):
        first[i] = min(lo, size - taps)  # the row of taps stays inside the source
        at = lo - first[i]
        weights[i, at : at + len(w)] = np.floor(0.5 + w * (1 << PRECISION_BITS))
    return first, weights


def _resample_numpy(x: np.ndarray, first: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One pass along `axis` of a uint8 array, in NumPy: the reference the GPU kernel follows."""
    index = first[:, None] + np.arange(weights.shape[1])  # [out, taps]
    taken = np.take(x, index, axis=axis).astype(np.int64)  # axis -> (out, taps)
    shape = [1] * taken.ndim
    shape[axis], shape[axis + 1] = weights.shape
    acc = (taken * weights.reshape(shape)).sum(axis=axis + 1) + (1 << (PRECISION_BITS - 1))
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def _axes(height: int, width: int, d: ImageDecode) -> tuple[tuple, tuple]:
    box, w, h = crop_box(width, height, d)
    return resize_taps(width, box[0], box[2], w), resize_taps(height, box[1], box[3], h)


def resize_batch(pixels: np.ndarray, d: ImageDecode) -> np.ndarray:
    """[B, H, W, C] uint8 images of one size -> [B, h, w, C], in NumPy, with Pillow's own
    arithmetic: equal to `Image.resize(BILINEAR, box=crop_box(...))` pixel for pixel."""
    (fx, wx), (fy, wy) = _axes(pixels.shape[1], pixels.shape[2], d)
    return _resample_numpy(_resample_numpy(pixels, fx, wx, 2), fy, wy, 1)


# The resize on the GPU, in the same arithmetic as `_resample_numpy`. The horizontal pass
# reads each image where the decoder left it, through a table of [address, row pitch] per
# image (interleaved RGB, 3 bytes a pixel), into [images, rows, n_out, c]: only the `rows`
# source rows from `top` that the vertical pass reads (a crop leaves the others out). With
# c = 1 it takes each tap's luma first, as Pillow's convert("L") before its resize would.
_RESAMPLE_ROWS = (
    "raw int64 table, raw int32 first, raw int32 weights, int32 taps, int32 top, int32 rows, "
    "int32 n_out, int32 c",
    "uint8 dst",
    """
    long long q = i / c;
    int ch = (int)(i - q * c);
    int j = (int)(q % n_out);
    long long yb = q / n_out;
    long long b = yb / rows;
    long long y = top + (yb - b * rows);
    const unsigned char* row =
        (const unsigned char*)table[2 * b] + y * table[2 * b + 1] + first[j] * 3;
    int acc = 1 << 21;
    for (int k = 0; k < taps; k++) {
        const unsigned char* p = row + k * 3;
        int v = c == 1 ? ((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16) : p[ch];
        acc += v * weights[j * taps + k];
    }
    acc >>= 22;
    dst = (unsigned char)(acc < 0 ? 0 : (acc > 255 ? 255 : acc));
    """,
    "batch_infer_resample_rows",
)
# The vertical pass, over the output [outer, n_out, inner]: each element sums `taps` source
# elements `inner` apart.
_RESAMPLE_COLUMNS = (
    "raw uint8 src, raw int32 first, raw int32 weights, int32 taps, int32 n_out, int32 n_in, "
    "int32 inner",
    "uint8 dst",
    """
    long long q = i / inner;
    long long r = i - q * inner;
    int j = (int)(q % n_out);
    long long base = ((q / n_out) * n_in + first[j]) * inner + r;
    int acc = 1 << 21;
    for (int k = 0; k < taps; k++) acc += (int)src[base + k * inner] * weights[j * taps + k];
    acc >>= 22;
    dst = (unsigned char)(acc < 0 ? 0 : (acc > 255 ? 255 : acc));
    """,
    "batch_infer_resample_columns",
)


@lru_cache(maxsize=1)
def _resample_kernels() -> tuple[Any, Any]:
    import cupy as cp

    return cp.ElementwiseKernel(*_RESAMPLE_ROWS), cp.ElementwiseKernel(*_RESAMPLE_COLUMNS)


def _resize_gpu(images: list[tuple[int, int]], height: int, width: int, d: ImageDecode,
                cache: dict) -> Any:  # fmt: skip
    """`resize_batch` (after `_luma` for d.channels "L") in CuPy, over RGB images of one size
    given as (device address, row pitch): read in place, so no array per image and no copy
    into one batch. Each output reads only its few taps, and the horizontal pass computes
    only the rows the vertical pass reads. `cache` keeps the taps of each image size on the
    device."""
    import cupy as cp

    rows_kernel, columns_kernel = _resample_kernels()
    key = (height, width, d.height, d.width, d.resize)
    if key not in cache:
        (fx, wx), (fy, wy) = _axes(height, width, d)
        top = int(fy.min())  # the source rows the vertical pass reads: top .. top + span - 1
        span = int(fy.max()) + wy.shape[1] - top
        cache[key] = (top, span, *(cp.asarray(a) for a in (fx, wx, fy - top, wy)))
    top, span, fx, wx, fy, wy = cache[key]
    c = 1 if d.channels == "L" else 3
    table = cp.asarray(np.array(images, np.int64))
    rows = cp.empty((len(images), span, d.width, c), cp.uint8)
    rows_kernel(table, fx, wx, wx.shape[1], top, span, d.width, c, rows)
    out = cp.empty((len(images), d.height, d.width, c), cp.uint8)
    columns_kernel(rows, fy, wy, wy.shape[1], d.height, span, d.width * c, out)
    return out


def _rgb_in_place(image: Any) -> tuple[int, int, int, int, int | None] | None:
    """(height, width, device address, row pitch, stream) of a decoded image (an nvImageCodec
    Image) that is interleaved 8-bit RGB; None for anything else, which is retried on the
    CPU. `stream`: the CUDA stream its pixels are written on (None: they are ready)."""
    if image is None:
        return None
    face = image.__cuda_array_interface__
    shape = face["shape"]
    if face["typestr"] != "|u1" or len(shape) != 3 or shape[2] != 3:
        return None
    height, width = shape[0], shape[1]
    pitch, pixel, sample = face["strides"] or (width * 3, 3, 1)
    if (pixel, sample) != (3, 1):
        return None
    return height, width, face["data"][0], pitch, face.get("stream")


def _truncated_jpeg(blob: Blob) -> bool:
    """A JPEG without its end marker (zero bytes after it allowed)."""
    if bytes(blob[:2]) != b"\xff\xd8":
        return False
    tail = bytes(blob[-64:]).rstrip(b"\x00") or bytes(blob).rstrip(b"\x00")
    return not tail.endswith(b"\xff\xd9")


class NvImageCodecDecoder:
    """The GPU decoder: a shard's images decoded as one batch by nvImageCodec (hardware
    JPEG decoder first, then CUDA), resized on the same GPU, and copied back already small.
    Images it cannot decode (formats without a GPU codec, corrupt files) come back as
    failures, and the caller retries them on the CPU. The resize and copy go on a stream of
    its own that does not wait on the model's streams, at the highest priority: its few small
    kernels feed the model, so they run ahead of the model's own rather than behind them.
    (nvImageCodec decodes on streams of its own, at CUDA's default priority.)
    BATCH_INFER_NVIMGCODEC_OPTIONS, when set, replaces nvImageCodec's decoder options;
    BATCH_INFER_NVIMGCODEC_THREADS sets the CPU threads of each decoder's own pool
    (nvImageCodec's default: one fewer than the cores)."""

    # Clamped by CUDA to the device's highest stream priority.
    PRIORITY = -1000

    name = "nvimgcodec"

    def __init__(self, device: int) -> None:
        import cupy

        load_installed_codecs_only()  # before nvImageCodec's first import in this process
        from nvidia import nvimgcodec

        self.device = device
        self.cupy, self.codec = cupy, nvimgcodec
        kinds = nvimgcodec.BackendKind
        with cupy.cuda.Device(device):
            self.stream = cupy.cuda.Stream(non_blocking=True, priority=self.PRIORITY)
            options = os.environ.get("BATCH_INFER_NVIMGCODEC_OPTIONS")
            threads = setting("BATCH_INFER_NVIMGCODEC_THREADS")
            self.decoder = nvimgcodec.Decoder(
                device_id=device,
                **({"options": options} if options else {}),
                **({"max_num_cpu_threads": threads} if threads else {}),
                backends=[
                    nvimgcodec.Backend(kinds.HW_GPU_ONLY),
                    nvimgcodec.Backend(kinds.GPU_ONLY),
                    nvimgcodec.Backend(kinds.HYBRID_CPU_GPU),
                ],
            )
        self.params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,  # as Pillow: pixels as stored
            color_spec=nvimgcodec.ColorSpec.SRGB,
            allow_any_depth=False,
            sample_format=nvimgcodec.SampleFormat.I_RGB,
        )
        self.resizing: dict = {}  # the resize taps of each image size, on the device
        self.host: np.ndarray | None = None
        self._set_hardware_share()

    def _set_hardware_share(self) -> None:
        """Decode one whole batch of tiny JPEGs first. nvImageCodec fixes the hardware
        decoder's share of every later batch from its first batch's size (rounded up to one
        round of the engines' cores); the rest of each batch goes to nvJPEG's CUDA decoder,
        which decodes the Huffman codes of images under a megapixel on the CPU. A first
        batch of one image, or of a shard's small first piece, left the hardware a few dozen
        images of every BATCH and the CPU the rest."""
        blob = _flat_jpeg(64, 64)
        streams = [self.codec.CodeStream(blob) for _ in range(self.BATCH)]
        with self.cupy.cuda.Device(self.device), self.stream:
            images = self.decoder.decode(streams, params=self.params, cuda_stream=self.stream.ptr)
            self.stream.synchronize()  # before the images' memory goes
        del images

    def describe(self) -> str:
        return f"nvImageCodec {getattr(self.codec, '__version__', '')} on GPU {self.device}"

    def _pinned(self, shape: tuple[int, ...]) -> np.ndarray:
        """A page-locked host buffer of `shape` (uint8), kept and grown as needed."""
        import cupyx

        size = int(np.prod(shape))
        if self.host is None or self.host.size < size:
            self.host = cupyx.empty_pinned((size,), np.uint8)
        return self.host[:size].reshape(shape)

    BATCH = 512  # images decoded and resized at once: bounds the GPU memory a batch takes

    def decode(
        self, data: Sequence[Blob | None], d: ImageDecode, out: np.ndarray
    ) -> dict[int, str]:
        """Decode what it can into `out`; {row: ''} for rows to retry on the CPU."""
        retry: dict[int, str] = {}
        for start in range(0, len(data), self.BATCH):
            part = data[start : start + self.BATCH]
            again = self._decode(part, d, out[start : start + len(part)])
            retry.update({start + i: why for i, why in again.items()})
        return retry

    def _decode(
        self, data: Sequence[Blob | None], d: ImageDecode, out: np.ndarray
    ) -> dict[int, str]:
        cp = self.cupy
        retry: dict[int, str] = {}
        rows, streams = [], []
        for i, blob in enumerate(data):
            if blob is None:
                continue
            if _truncated_jpeg(blob):  # nvJPEG decodes what is there; Pillow says it is
                retry[i] = ""  # truncated (or decodes one with bytes after its end)
                continue
            try:
                streams.append(self.codec.CodeStream(blob))
                rows.append(i)
            except Exception:  # not a format it can parse: Pillow says why
                retry[i] = ""
        if not streams:
            return retry
        with cp.cuda.Device(self.device), self.stream:
            images = self.decoder.decode(streams, params=self.params, cuda_stream=self.stream.ptr)
            # (height, width) -> [(row, (address, row pitch))]: each image read where it lies,
            # ordered after its decode by the stream (no wait here, no array per image)
            sizes: dict[tuple[int, int], list[tuple[int, tuple[int, int]]]] = {}
            written_on: set[int | None] = set()
            for i, image in zip(rows, images, strict=True):
                if (lies := _rgb_in_place(image)) is None:
                    retry[i] = ""
                    continue
                height, width, address, pitch, stream = lies
                written_on.add(stream)
                sizes.setdefault((height, width), []).append((i, (address, pitch)))
            done = sorted(i for group in sizes.values() for i, _ in group)
            if not done:
                return retry
            for other in written_on - {None, self.stream.ptr}:  # decoded on another stream:
                self.stream.wait_event(cp.cuda.ExternalStream(other).record())  # read after
            small, at = None, {}
            for (height, width), group in sizes.items():  # one size: resized as one batch
                resized = _resize_gpu([where for _, where in group], height, width, d,
                                      self.resizing)  # fmt: skip
                if len(sizes) == 1:  # rows in order already
                    small = resized
                    break
                if small is None:  # several sizes: each group's rows put in order
                    small = cp.empty((len(done), *resized.shape[1:]), cp.uint8)
                    at = {i: k for k, i in enumerate(done)}
                small[cp.asarray([at[i] for i, _ in group])] = resized
            assert small is not None
            if d.channels == "BGR":
                small = cp.ascontiguousarray(small[..., ::-1])
            if len(done) == len(out):  # every row: copied straight into `out`
                small.get(stream=self.stream, out=out)
            else:
                host = self._pinned(small.shape)  # page-locked: a full-speed copy
                small.get(stream=self.stream, out=host)
                out[done] = host
        return retry


class GpuDecoders:
    """Up to a few `NvImageCodecDecoder`s, each with a stream of its own, handed to one
    thread at a time: the run's own process prepares several shards at once, so one shard's
    resize and copies overlap another's decode. One is made at once (1.7-2.5 s on an H100,
    the first time in a process); the others (0.6-1.0 s each there, most of it their first
    batch, `_set_hardware_share`) by a shard that finds none free.
    BATCH_INFER_GPU_DECODERS sets how many (3)."""

    name = "nvimgcodec"

    def __init__(self, device: int) -> None:
        self.device = device
        self.count = int(setting("BATCH_INFER_GPU_DECODERS"))
        self.free: queue.Queue[NvImageCodecDecoder] = queue.Queue()
        self.made, self.lock = 0, threading.Lock()
        first = self._make()
        assert first is not None
        self.free.put(first)
        self.about = f"{first.describe()} ({self.count} decoders)"

    def describe(self, rows: int | None = None) -> str:
        return self.about

    def _make(self) -> NvImageCodecDecoder | None:
        """A new decoder, or None when `count` are made already."""
        with self.lock:
            if self.made >= self.count:
                return None
            self.made += 1
            index = self.made
        start = time.perf_counter()
        try:
            decoder = NvImageCodecDecoder(self.device)
        except BaseException:  # not made: a later shard may try again
            with self.lock:
                self.made -= 1
            raise
        log.info("GPU image decoder %d of %d made in %.2f s", index, self.count,
                 time.perf_counter() - start)  # fmt: skip
        return decoder

    def _take(self) -> NvImageCodecDecoder:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            return self._make() or self.free.get()

    def decode(
        self, data: Sequence[Blob | None], d: ImageDecode, out: np.ndarray
    ) -> dict[int, str]:
        decoder = self._take()
        try:
            return decoder.decode(data, d, out)
        finally:
            self.free.put(decoder)


_decoders: dict[tuple[str, int | None], Any] = {}
_decoders_lock = threading.Lock()


def _gpu_here() -> int | None:
    """The GPU this process decodes on: the first it sees (the one a local run's own
    process computes on, an actor's own), or None. A Ray task given no GPU (a prepare
    task) has none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return None
    if _in_ray_task() and not sys.modules["ray"].get_gpu_ids():
        return None
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device
        return None
    return 0 if count > 0 else None


def decoder_for(device: str) -> tuple[Any, str]:
    """(decoder, why) for this process: nvImageCodec when `device` allows it, a GPU is
    visible and nvImageCodec and CuPy import; else Pillow. Chosen once per process."""
    gpu = None if device == "cpu" else _gpu_here()
    key = (device, gpu)
    with _decoders_lock:
        if key in _decoders:
            return _decoders[key]
        why = "device: cpu" if device == "cpu" else "no GPU visible to this process"
        chosen: tuple[Any, str] | None = None
        broken = False
        if gpu is not None:
            try:
                chosen = (GpuDecoders(gpu), f"GPU {gpu} visible, nvImageCodec imports")
            except SettingError:  # a knob set wrong: say so, not a slow CPU decode
                raise
            except Exception as exc:  # not installed, or it cannot start on this GPU
                why = f"nvImageCodec unusable here ({type(exc).__name__}: {one_line(exc)})"
                # installed, yet it cannot start: the run will be far slower than it should
                broken = nvimgcodec_package() is not None
        if chosen is None:
            if device == "gpu":
                raise BackendError(f"image decode device: gpu, but {why}")
            chosen = (PillowDecoder(), why)
        level = logging.WARNING if broken else logging.INFO
        log.log(level, "image decoder: %s (%s)", chosen[0].describe(), chosen[1])
        _decoders[key] = chosen
        return chosen


def warm_up_images(d: ImageDecode) -> None:
    """Start this process's decoder for `d` ahead of the first shard: on a GPU, creating the
    first decoder and its first decode (the resize kernels compile) take a second or more."""
    decoder, _ = decoder_for(d.device)
    if decoder.name == "pillow":
        return
    nhwc = dataclasses.replace(d, layout="NHWC")
    decoder.decode([_flat_jpeg(320, 240)], nhwc, np.zeros((1, *item_shape(nhwc)), np.uint8))


def _flat_jpeg(width: int, height: int) -> bytes:
    """A one-colour JPEG: warm-up work whose pixels nobody reads."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


def decode_images(
    column: pa.Array, d: ImageDecode, fs: pafs.FileSystem, base: str
) -> tuple[np.ndarray, dict[int, str], str]:
    """A column of images -> ([rows, ...model item shape] pixels, {row: reason}, decoder).

    Rows with a reason hold zeros. `fs` and `base`: where relative paths are looked up."""
    try:
        data, reasons = fetch(column, d.from_paths, fs, base)
    except InputError as exc:  # the store, not a row: the shard fails
        raise InputError(f"{d.column}: {exc}") from None
    c = 1 if d.channels == "L" else 3
    out = np.zeros((len(data), d.height, d.width, c), np.uint8)
    decoder, _ = decoder_for(d.device)
    retry = decoder.decode(data, d, out)
    used = decoder.describe(len(data))
    if retry and decoder.name != "pillow":
        used += f" ({len(retry)} retried on the CPU)"
        again = [data[i] if i in retry else None for i in range(len(data))]
        retry = PillowDecoder().decode(again, d, out)
    reasons.update(retry)
    if d.layout == "NCHW":
        out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    return out, {i: f"{d.column}: {why}" for i, why in reasons.items()}, used


def describe_size(d: ImageDecode) -> str:
    c = 1 if d.channels == "L" else 3
    dims = (d.height, d.width, c) if d.layout == "NHWC" else (c, d.height, d.width)
    return "[N, " + ", ".join(map(str, dims)) + "]"


def item_shape(d: ImageDecode) -> tuple[int, int, int]:
    c = 1 if d.channels == "L" else 3
    return (d.height, d.width, c) if d.layout == "NHWC" else (c, d.height, d.width)
