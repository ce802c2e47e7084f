"""CPU benchmark (run by hand): the small CNN's job in fp32 and in int8 made by `model.optimize`.

Side by side in one run, on pattern images (tests/optimize_models.py) in Parquet:
  optimize  `batch-infer optimize SPEC` as a whole process: calibration on the job's own rows,
            int8 quantization for ONNX Runtime on this CPU, the accuracy gate, the cache;
  job       `batch-infer run` as a whole process, fp32 and int8 (the int8 run finds the
            optimized model in the cache), alternated, each repeated; wall clock and the
            run's own steady rate (first to last batch);
  compute   ONNX Runtime on all cores, one batch launched again and again, per model.
The quickstart model (models/digits.onnx) is optimized to int8 too, for its gate figures.

    python benchmarks/cpu_optimize.py --rows 60000 --out benchmarks/results/cpu-optimize.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.optimize_models import CNN, write_images  # noqa: E402 - after the path


def timed(argv: list[str]) -> float:
    """Wall clock of a whole process, as a user waits for it."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - start


def spec(data: Path, out: Path, cache: Path, batch: int, precision: str | None) -> Path:
    doc = {
        "name": f"cnn-{precision or 'fp32'}",
        "input": {"path": str(data)},
        "model": {"onnx": str(CNN), "inputs": {"pixels": "pixels"}},
        "batch_size": batch,
        "output": {"path": str(out), "keep_columns": ["id", "label"]},
        "tensorrt": {"cache_dir": str(cache)},
    }
    if precision:
        doc["model"]["optimize"] = {"precision": precision}
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(doc))
    return path


def job(spec_path: Path, out: Path) -> dict:
    """`batch-infer run` as a whole process: wall clock, its run record's steady rate."""
    shutil.rmtree(out, ignore_errors=True)
    seconds = timed(["batch-infer", "run", str(spec_path), "-q"])
    (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    t = run["timeline"]
    steady = run["rows"] / max(t["last_batch"] - t["first_batch"], 1e-9)
    return {"seconds": round(seconds, 2), "rows": run["rows"], "steady": round(steady, 1),
            "planned": t.get("planned"), "backend": run["backend"]}  # fmt: skip


def compute_rates(models: dict[str, str], batch: int, rounds: int = 3) -> dict[str, float]:
    """ONNX Runtime on all cores, one batch of real rows launched again and again for 3 s;
    the models alternated, `rounds` times each: the median rate per model."""
    import onnxruntime as ort

    from tests.optimize_models import pattern_images

    pixels, _ = pattern_images(batch, seed=99)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                for name, path in models.items()}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, session in sessions.items():
            session.run(None, {"pixels": pixels})
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < 3.0:
                session.run(None, {"pixels": pixels})
                runs += 1
            rates[name].append(runs * batch / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def optimize(spec_path: Path, report: Path, *more: str) -> tuple[float, dict]:
    seconds = timed(["batch-infer", "optimize", str(spec_path), "--json", str(report), *more])
    return seconds, json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-optimize.md")
    args = ap.parse_args()
    work = args.work / "optimize"
    data = work / f"images-{args.rows}"
    if not data.exists():
        write_images(data, args.rows, files=max(1, args.rows // 20_000), group=4096)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # the optimize step is measured from scratch
    fp32_spec = spec(data, work / "out-fp32", cache, args.batch, None)
    int8_spec = spec(data, work / "out-int8", cache, args.batch, "int8")

    opt_seconds, report = optimize(int8_spec, work / "report-int8.json")
    print(f"optimize: {opt_seconds:.1f} s, gate {report['gate']['outputs']}", flush=True)
    digits_seconds, digits = optimize(
        ROOT / "jobs" / "quickstart.yaml", work / "report-digits.json",
        "--set", "model.optimize.precision=int8", "--set", f"tensorrt.cache_dir={cache}",
        "--set", f"output.path={work / 'out-digits'}",
    )  # fmt: skip
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    loads = []
    for _ in range(args.repeats):
        for name, path in (("fp32", fp32_spec), ("int8", int8_spec)):
            loads.append(os.getloadavg()[0])
            runs[name].append(job(path, work / f"out-{name}"))
            print(name, runs[name][-1], flush=True)
    loads.append(os.getloadavg()[0])
    rates = compute_rates({"fp32": str(CNN), "int8": report["optimized_model"]}, args.batch)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    wall = med("fp32", "seconds") / med("int8", "seconds")
    steady = med("int8", "steady") / med("fp32", "steady")
    logits = report["gate"]["outputs"]["logits"]
    dl = digits["gate"]["outputs"]
    result = {
        "rows": args.rows, "batch": args.batch, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "int8_dot": report["target"]["key"], "recipe": report["recipe"],
        "optimize_seconds": round(opt_seconds, 1), "gate": report["gate"],
        "report_speed": report["speed"], "runs": runs, "compute_rows_per_s": rates,
        "job_speedup_wall": round(wall, 3), "job_speedup_steady": round(steady, 3),
        "load_average_1m": loads, "digits": {"seconds": round(digits_seconds, 1),
                                             "gate": digits["gate"]},
    }  # fmt: skip
    each = [f"{n}: " + ", ".join(f"{r['seconds']} s / {r['steady']:,.0f}" for r in rs)
            for n, rs in runs.items()]  # fmt: skip
    lines = [
        f"# CPU: the small CNN's job in fp32 and int8 from `model.optimize` ({os.cpu_count()} "
        "cores)",
        "",
        f"Written by `python benchmarks/cpu_optimize.py --rows {args.rows}` (one run; jobs "
        f"alternated fp32/int8, {args.repeats} each, medians). {args.rows:,} pattern images "
        f"(32x32x3 uint8, raw bytes) in Parquet; models/patterns_cnn.onnx; batch {args.batch}; "
        f"ONNX Runtime on the CPU. Target key `{report['target']['key']}`: recipe "
        + ", ".join(f"{k} {v}" for k, v in report["recipe"].items() if k != "target")
        + ". 1-minute load average at each job's start and before the compute rates: "
        + ", ".join(f"{x:.1f}" for x in loads)
        + " (this machine is shared).",
        "",
        "| | fp32 | int8 | int8 / fp32 |",
        "|---|---:|---:|---:|",
        f"| job wall clock, whole process (s) | {med('fp32', 'seconds'):.1f} | "
        f"{med('int8', 'seconds'):.1f} | {wall:.2f}x faster |",
        f"| job steady rate, first to last batch (rows/s) | {med('fp32', 'steady'):,.0f} | "
        f"{med('int8', 'steady'):,.0f} | {steady:.2f}x |",
        f"| compute: ORT, {os.cpu_count()} threads, one batch again and again, 3 x 3 s "
        "alternated, median (rows/s) | "
        f"{rates['fp32']:,.0f} | {rates['int8']:,.0f} | {rates['int8'] / rates['fp32']:.2f}x |",
        f"| `batch-infer optimize` report: one calibration batch (rows/s) | "
        f"{report['speed']['original_rows_per_s']:,.0f} | "
        f"{report['speed']['optimized_rows_per_s']:,.0f} | {report['speed']['speedup']:.2f}x |",
        "",
        f"`batch-infer optimize` (whole process, from an empty cache): {opt_seconds:.1f} s. "
        f"Gate on {report['gate']['rows']} held-out rows: logits relative L2 "
        f"{logits['rel_l2']:.4f}, max abs {logits['max_abs']:.3f}, cosine "
        f"{logits['cosine']:.6f}, top-1 agreement {logits['top1_agreement']:.4f}. Weights "
        f"{report['before']['weights_bytes']:,} -> {report['after']['weights_bytes']:,} bytes.",
        "",
        f"Quickstart (models/digits.onnx) int8, {digits_seconds:.1f} s: gate on "
        f"{digits['gate']['rows']} held-out rows: logits relative L2 "
        f"{dl['logits']['rel_l2']:.4f}, top-1 agreement {dl['logits']['top1_agreement']:.4f}, "
        f"predicted agreement {dl['predicted']['agreement']:.4f}; speed on its calibration batch "
        f"{digits['speed']['speedup']:.2f}x (a 64->32->10 MLP: too little arithmetic for int8 to "
        "pay off).",
        "",
        "Runs (wall clock s / steady rows/s): " + "; ".join(each),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
