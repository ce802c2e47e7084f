"""batch-infer: offline batch inference, exactly once, resumable.

Runs an ONNX model over a Parquet, CSV or Arrow data set and writes the predictions to
Parquet: every input row once, in the predictions or in _errors/; a rerun resumes.
Start with: batch-infer run jobs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from batch_infer.errors import EXIT_INTERRUPTED, SpecError, UserError
from batch_infer.ops.query import register as register_query
from batch_infer.ops.schedule import register as register_schedule
from batch_infer.ops.submit import register as register_submit
from batch_infer.settings import check_settings
from batch_infer.sink.manifest import RunRecord, timeline_text
from batch_infer.spec import add_spec_arguments, parse_date, parse_overrides, resolve_spec


def process_started_at() -> float:
    """When this process started (epoch seconds), so a run's timeline counts the interpreter
    and its imports too; where /proc cannot say, now."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()
    return time.time() - age


def _busy(s: RunRecord) -> str:
    lanes = [a for a in s.actor_stats if a.get("busy_while_running") is not None]
    if not lanes:
        return "-"
    share = [f"{a['busy_while_running']:.0%}" for a in lanes]
    wall = sum(a["busy_seconds"] for a in lanes) / (len(lanes) * max(s.seconds, 1e-9))
    return f"{', '.join(share)} from first to last batch; {wall:.0%} of the whole run"


def _print_summary(console: Console, s: RunRecord) -> None:
    table = Table(
        title=f"batch-infer run {s.name}: {s.status}", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    if s.date:
        table.add_row("date", s.date)
    table.add_row("rows", f"{s.rows:,} ({s.good_rows:,} predicted, {s.bad_rows:,} bad)")
    span = s.timeline.get("last_batch", 0) - s.timeline.get("first_batch", 0)
    steady = f"; {s.rows_this_run / span:,.0f} rows/s from first to last batch" if span > 0 else ""
    table.add_row(
        "this run",
        f"{s.rows_this_run:,} rows in {s.seconds:.1f} s: {s.rows_per_second:,.0f} rows/s "
        f"start to end{steady}",
    )
    if s.timeline:
        table.add_row("timeline", timeline_text(s.timeline))
        table.add_row("device busy", _busy(s))
    table.add_row(
        "shards",
        f"{s.shards_total} ({s.shards_committed} committed now, "
        f"{s.shards_skipped} earlier, {s.shards_failed} failed, "
        f"{s.retries} retries)",
    )
    table.add_row("files written", str(s.files_written))
    table.add_row(
        "backend", f"{s.backend or '-'} x {s.actors} actor(s)" if s.actors else s.backend or "-"
    )
    table.add_row("model", f"{s.model} (sha256 {s.model_sha256[:12]})")
    table.add_row("output", s.output)
    console.print(table)


def _cmd_run(args: argparse.Namespace) -> int:
    from batch_infer.job import run  # Ray and the backends load only for a run

    console = Console(stderr=True)
    summary = run(
        args.spec,
        overrides=parse_overrides(args.set),
        overwrite=args.overwrite,
        progress=not args.quiet,
        date=parse_date(args.date) if args.date else None,
        address=args.address,
        started_at=process_started_at(),
    )
    _print_summary(console, summary)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from batch_infer.backends.tensorrt_build import build_ahead
    from batch_infer.model import read_signature
    from batch_infer.planning import backend_options

    spec = resolve_spec(args.spec, parse_overrides(args.set))
    if spec.model.optimize is not None:  # the engine of the optimized model
        from batch_infer.planning import build_plan

        plan = build_plan(spec)
        signature, options = plan.signature, plan.backend
    else:
        signature = read_signature(spec.model.onnx)
        options = backend_options(spec, signature)
    engine = build_ahead(signature, options)
    state = "built" if engine.built else "already cached"
    Console().print(f"engine {state}: {engine.path} ({len(engine.data):,} bytes)", highlight=False)
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    import json

    from batch_infer.optimize.gate import GateFailed
    from batch_infer.optimize.report import print_report
    from batch_infer.planning import build_plan

    check_settings()  # its calibration decodes images as a run does
    overrides = parse_overrides(args.set)
    if args.backend:
        overrides["model.optimize.target"] = args.backend
    spec = resolve_spec(args.spec, overrides)
    if spec.model.optimize is None:
        raise SpecError(
            f"{args.spec}: model.optimize is not set; add it to the spec or pass e.g. "
            "--set model.optimize.precision=int8"
        )
    try:
        plan = build_plan(spec)
    except GateFailed as exc:
        if args.json:
            Path(args.json).write_text(json.dumps(exc.report, indent=1) + "\n")
        print_report(exc.report, Console(stderr=True))
        raise
    assert plan.optimized is not None
    report = plan.optimized.report | {
        "optimized_model": plan.signature.path,
        "optimized_sha256": plan.signature.sha256,
        "cached": not plan.optimized.made,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print_report(report, Console())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from batch_infer import __version__

    parser = argparse.ArgumentParser(
        prog="batch-infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 ok, 1 a bug (traceback), 2 a user error, 3 too many bad rows, "
        "4 shards failed, 5 the cluster or network (retry), 130 interrupted (rerun resumes).",
    )
    parser.add_argument("--version", action="version", version=f"batch-infer {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log what batch-infer decides (which backend and why, where Ray's logs are)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a job spec to completion (resumes an interrupted run)")
    p.add_argument("spec", help="the job spec (YAML)")
    add_spec_arguments(p, run=True)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--address",
        help="a Ray cluster to join, e.g. HEAD:6379 (default: RAY_ADDRESS, else a local Ray "
        "started for this run; never one merely running on this machine)",
    )
    p.set_defaults(func=_cmd_run)
    b = sub.add_parser("build", help="build the TensorRT engine a spec's actors will use")
    b.add_argument("spec")
    add_spec_arguments(b)
    b.set_defaults(func=_cmd_build)
    o = sub.add_parser(
        "optimize", help="make the spec's model faster for its backend (model.optimize), gated"
    )
    o.add_argument("spec")
    add_spec_arguments(o)
    o.add_argument(
        "--backend",
        choices=("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "tensorrt-rtx"),
        help="the target (default: model.optimize.target, else the backend the job would use)",
    )
    o.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    o.set_defaults(func=_cmd_optimize)
    for register in (register_submit, register_schedule, register_query):
        register(sub)  # each module adds its own subcommands
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (`jobs stop`, Kubernetes, systemd) ends a run the way Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("batch_infer").setLevel(logging.INFO)
    console = Console(stderr=True, soft_wrap=True)  # never break a path across lines
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)

    def error(exc: Exception, code: int) -> int:
        console.print(Text("error: ", style="red") + Text(str(exc)), highlight=False)
        return code

    try:
        return args.func(args)
    except UserError as exc:
        return error(exc, exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted: committed shards are kept; rerun the same command to resume")
        return EXIT_INTERRUPTED


def entry() -> None:
    """The `batch-infer` command. Once a run is recorded nothing is left to wait for: the
    process ends at once, and the Ray it started ends with it (Ray's processes share their
    parent's fate), instead of waiting a second or more for a polite `ray.shutdown()` or
    0.3 s for CUDA and ONNX Runtime to tear down what the exit frees anyway."""
    code = main()
    if "batch_infer.job" in sys.modules:  # a run: its files are written and closed
        import multiprocessing

        for child in multiprocessing.active_children():  # Pillow's decoding processes
            child.kill()
        if "batch_infer.data.decode.images" in sys.modules:
            sys.modules["batch_infer.data.decode.images"].release_processes()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
