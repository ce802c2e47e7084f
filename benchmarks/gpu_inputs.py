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
gpu_bench.py. Writes gpu-inputs.json and gpu-inputs.md under --out ($OUT). --decode-load
runs the probes of gpu_decode_load.py (decoder set-ups beside the running model) instead of,
or as well as, the jobs.

    python3 benchmarks/gpu_inputs.py --images 50000 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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


def decode_chunk(blobs: list[bytes]) -> int:
    for b in blobs:
        decode_pillow(b, D)
    return len(blobs)


def cpu_decode_rate(blobs: list[bytes]) -> float:
    """Pillow on every core (processes), rows/s wall clock."""
    chunks = [blobs[i : i + 64] for i in range(0, len(blobs), 64)]
    with ProcessPoolExecutor(CORES) as pool:
        list(pool.map(decode_chunk, chunks[:CORES]))  # warm up
        start = time.perf_counter()
        done = sum(pool.map(decode_chunk, chunks))
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
    # which of its decoders gives which pixels
    hw_only = made_decoders(blobs, hw_only_kwargs(), 1)[0]
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


def hw_only_kwargs() -> dict:
    """nvImageCodec Decoder arguments for the hardware JPEG decoder alone."""
    from nvidia import nvimgcodec

    return {"backends": [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]}


def made_decoders(blobs: list[bytes], kwargs: dict | None, n: int) -> list:
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


def preallocated_options(batch: int = 512, side: int = 512) -> str:
    """Options that make nvImageCodec's hardware decoder pre-allocate nvJPEG's buffers for
    `batch` images of up to `side`x`side` (its default is 1 image of 1x1, grown as needed).
    Nothing else is set: nvImageCodec 0.9's default options are none, so each decoder keeps
    its own defaults, and nvJPEG's upsample chroma by interpolation, as libjpeg (Pillow)
    does. (The seventh session's probes also passed ":fancy_upsampling=0", the default the
    project's newer source documents, so their hardware decoder did not.)"""
    hints = {"preallocate_batch_size": batch, "preallocate_width_hint": side,
             "preallocate_height_hint": side}  # fmt: skip
    return " ".join(f"nvjpeg_hw_decoder:{k}={v}" for k, v in hints.items())


# The jobs' GPU set-ups that --job-setups names: (environment for the job's process, what it
# is). The help text is made from the descriptions.
JOB_SETUPS: dict[str, tuple[dict[str, str], str]] = {
    "job": ({}, "batch-infer's own (32 CUDA hardware queues, batch_infer/__init__.py)"),
    "c8": (
        {"CUDA_DEVICE_MAX_CONNECTIONS": "8"},
        "CUDA's default 8 hardware queues, with which the hardware decoder's steps wait "
        "behind the model's runs (docs/inputs.md)",
    ),
    "prealloc": (
        {"BATCH_INFER_NVIMGCODEC_OPTIONS": preallocated_options()},
        "nvJPEG's buffers for a batch made with each decoder, not in the first shards",
    ),
    "decoders2": ({"BATCH_INFER_GPU_DECODERS": "2"}, "2 GPU decoders for the 12 readers (3)"),
    "decoders6": ({"BATCH_INFER_GPU_DECODERS": "6"}, "6 GPU decoders for the 12 readers (3)"),
    "threads1": (
        {"BATCH_INFER_NVIMGCODEC_THREADS": "1"},
        "a pool of 1 CPU thread in each GPU decoder (by default one fewer than the cores): "
        "nvImageCodec sets each batch up on the calling thread",
    ),
    "threads2": ({"BATCH_INFER_NVIMGCODEC_THREADS": "2"}, "pools of 2 CPU threads"),
    "threads4": ({"BATCH_INFER_NVIMGCODEC_THREADS": "4"}, "pools of 4 CPU threads"),
    "switch": ({}, "the job's Python hands the GIL on every 0.5 ms, not 5 (`switch_interval`)"),
    "yield": ({}, "threads waiting for the GPU yield their core rather than spin (`cuda_yield`)"),
    "baseline": ({}, "the batch-infer in --baseline"),
    "gpu-codecs": ({}, "nvImageCodec's nvJPEG extension alone (`gpu_codecs_only`)"),
}


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
        from benchmarks.gpu_decode_load import decode_under_load

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
        env = JOB_SETUPS[label][0]
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
        help="the jobs' GPU set-ups ("
        + "; ".join(f"{k}: {about}" for k, (_, about) in JOB_SETUPS.items())
        + "): the job over the first --image-copies runs with each, the others with the first",
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
