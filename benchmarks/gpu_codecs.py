"""nvImageCodec with all its extensions against batch-infer's folder of the installed ones
(`batch_infer/data/decode/gpu_codecs.py`): per fresh process, the import's seconds, the
lines it prints, and which formats the job's decoder (hardware, CUDA, hybrid backends)
decodes on the GPU. On the GPU machine:

    python benchmarks/gpu_codecs.py --repeat 3 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import io, json, os, sys, time
from batch_infer.data.decode.gpu_codecs import load_installed_codecs_only  # both: same imports
if sys.argv[1] == "installed":
    load_installed_codecs_only()
t = time.perf_counter()
from nvidia import nvimgcodec
imported = time.perf_counter() - t
from PIL import Image
kinds = nvimgcodec.BackendKind
decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(k) for k in
                             (kinds.HW_GPU_ONLY, kinds.GPU_ONLY, kinds.HYBRID_CPU_GPU)])
formats = {}
for fmt in ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "JPEG2000"):
    try:
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (10, 200, 30)).save(buf, fmt)
        formats[fmt] = decoder.decode(buf.getvalue()) is not None
    except Exception as exc:
        formats[fmt] = f"{type(exc).__name__}: {exc}"[:120]
print(json.dumps({"import_seconds": round(imported, 3), "formats": formats,
                  "extensions_path": os.environ.get("NVIMGCODEC_EXTENSIONS_PATH")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "NVIMGCODEC_EXTENSIONS_PATH"}
    runs: list[dict] = []
    for _ in range(args.repeat):
        for setup in ("all", "installed"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, setup], env=env, capture_output=True, text=True
            )
            out = done.stdout.splitlines()
            ok = done.returncode == 0 and out
            result = json.loads(out[-1]) if ok else {"rc": done.returncode}
            printed = [s for s in out[:-1] + done.stderr.splitlines() if s.strip()]
            runs.append({"setup": setup, **result, "printed": printed,
                         "errors_printed": sum("[ERROR]" in line for line in printed)})  # fmt: skip
            print(runs[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-codecs.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
