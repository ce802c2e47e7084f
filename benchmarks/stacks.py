"""Where a Python program's threads spend their wall clock: sampled stacks, grouped by thread.

    python -m benchmarks.stacks OUT.txt -- -m batch_infer.cli run job.yaml

runs the module (or script) after `--` in this process, with a thread that looks at every
other thread's stack every few milliseconds (`sys._current_frames`, so it sees threads waiting
in C as well: a thread blocked on a lock or in a CUDA call shows at the Python line that
called it). OUT.txt gets, per thread name (numbers dropped), the innermost lines it was seen
at most often, with the batch-infer line that led there; it is written at the end, also when
the program ends with os._exit (as batch-infer's CLI does: then its first line says when), and
every two seconds before.
py-spy does this from outside, but it needs ptrace, which the GPU machines' sandbox may refuse.
"""

from __future__ import annotations

import collections
import os
import re
import runpy
import sys
import threading
import time
from pathlib import Path
from types import FrameType

INTERVAL = 0.01
_lock = threading.Lock()  # the counts and the file: the sampler adds and writes, os._exit writes
_exit_written = threading.Event()


def _where(frame: FrameType) -> str:
    """The innermost line, and the innermost batch-infer line if that is another."""
    inner = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
    f: FrameType | None = frame
    while f is not None and "batch_infer" not in f.f_code.co_filename:
        f = f.f_back
    if f is None or f is frame:
        return inner
    ours = f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"
    return f"{inner} < {ours}"


def _sample(out: Path, counts: dict[str, collections.Counter]) -> None:
    me = threading.get_ident()
    last_write = time.monotonic()
    while True:
        names = {t.ident: re.sub(r"^Thread-\d+ |[_-]?\d+$", "", t.name)
                 for t in threading.enumerate()}  # fmt: skip
        with _lock:
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, "?")
                counts.setdefault(name, collections.Counter())[_where(frame)] += 1
        if time.monotonic() - last_write > 2:
            _write(out, counts)
            last_write = time.monotonic()
        time.sleep(INTERVAL)


def _write(out: Path, counts: dict[str, collections.Counter], exit_at: float | None = None) -> None:
    """The counts; with `exit_at` (epoch seconds), a first line saying when os._exit was
    called, so that the process's teardown after it can be told from the program's work.
    That write is the last: the sampler's own writes come before it (the lock) or not at all."""
    with _lock:
        if _exit_written.is_set():
            return
        lines = [] if exit_at is None else [f"# os._exit at {exit_at:.3f}"]
        totals = {name: sum(seen.values()) for name, seen in counts.items()}
        for name, total in sorted(totals.items(), key=lambda t: -t[1]):
            lines.append(f"== {name}: {total} samples (thread-samples, {INTERVAL * 1000:.0f} ms)")
            for where, n in counts[name].most_common(12):
                lines.append(f"{n / total:6.1%}  {where}")
        out.write_text("\n".join(lines) + "\n")
        if exit_at is not None:
            _exit_written.set()


def main() -> None:
    args = sys.argv[1:]
    out, rest = args[0] if args else "", args[2:]
    if len(args) < 3 or args[1] != "--":
        raise SystemExit("usage: python -m benchmarks.stacks OUT.txt -- (-m module | script) ...")
    counts: dict[str, collections.Counter] = {}
    target = Path(out)
    sampler = threading.Thread(target=_sample, args=(target, counts), name="stacks", daemon=True)
    sampler.start()
    exit_now = os._exit

    def written_then_exit(code: int) -> None:
        try:
            _write(target, counts, time.time())
        finally:
            exit_now(code)

    os._exit = written_then_exit
    try:
        if rest[0] == "-m":
            sys.argv = [rest[1], *rest[2:]]
            runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = rest
            runpy.run_path(rest[0], run_name="__main__")
    finally:
        _write(target, counts)


if __name__ == "__main__":
    main()
