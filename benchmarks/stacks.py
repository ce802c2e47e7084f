"""Where a Python program's threads spend their wall clock and their CPU time: sampled stacks,
grouped by thread.

    python -m benchmarks.stacks OUT.txt -- -m batch_infer.cli run job.yaml

runs the module (or script) after `--` in this process, with a thread that looks at every
other thread's stack every few milliseconds (`sys._current_frames`, so it sees threads waiting
in C as well: a thread blocked on a lock or in a CUDA call shows at the Python line that
called it). OUT.txt gets, per thread name (numbers dropped), the innermost lines it was seen
at most often, with the batch-infer line that led there; it is written at the end, also when
the program ends with os._exit (as batch-infer's CLI does: then its first line says when), and
every two seconds before. CPU time (Linux): each sample also reads how long each thread has
run on a CPU (/proc/self/task/TID/schedstat) and charges what it ran since the last sample to
the line it is at now, so a line that waits shows wall clock and no CPU; at the end, every
thread of the process (also those a library started in C) is summed by its OS name.
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


def _cpu_ns(tid: int | str) -> int | None:
    """Nanoseconds thread `tid` of this process has run on a CPU, or None (not Linux, gone)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_os_threads: dict[str, tuple[str, int]] = {}  # tid -> (OS name, CPU ns when last seen)


def by_os_name() -> collections.Counter:
    """CPU nanoseconds of every thread of this process, summed by its OS name (digits
    dropped): also the threads a library started in C, which no Python stack shows. A
    thread that has ended counts as of when it was last seen (each write looks)."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = re.sub(r"[_-]?\d+$", "", f.read().strip()) or "?"
        except OSError:
            continue
        if (ns := _cpu_ns(tid)) is not None:
            _os_threads[tid] = (name, ns)
    total: collections.Counter = collections.Counter()
    for name, ns in _os_threads.values():
        total[name] += ns
    return total


def _sample(out: Path, counts: dict[str, collections.Counter], cpu: dict) -> None:
    me = threading.get_ident()
    last_write = time.monotonic()
    # OS thread id -> its CPU nanoseconds at the last sample. Not Python's ident: CPython
    # gives a new thread the ident of one that ended, whose count it would inherit.
    ran: dict[int, int] = {}
    while True:
        threads = {t.ident: t for t in threading.enumerate()}
        with _lock:
            for ident, frame in sys._current_frames().items():
                if ident == me or ident not in threads:
                    continue
                name = re.sub(r"^Thread-\d+ |[_-]?\d+$", "", threads[ident].name)
                where = _where(frame)
                counts.setdefault(name, collections.Counter())[where] += 1
                tid = threads[ident].native_id or 0
                now = _cpu_ns(tid)
                if now is not None:
                    if tid in ran:
                        cpu.setdefault(name, collections.Counter())[where] += now - ran[tid]
                    ran[tid] = now
        if time.monotonic() - last_write > 2:
            _write(out, counts, cpu)
            last_write = time.monotonic()
        time.sleep(INTERVAL)


def _write(
    out: Path, counts: dict[str, collections.Counter], cpu: dict, exit_at: float | None = None
) -> None:
    """The counts and CPU times; with `exit_at` (epoch seconds), a first line saying when
    os._exit was called, so that the process's teardown after it can be told from the
    program's work. That write is the last: the sampler's own writes come before it (the
    lock) or not at all."""
    with _lock:
        if _exit_written.is_set():
            return
        lines = [] if exit_at is None else [f"# os._exit at {exit_at:.3f}"]
        totals = {name: sum(seen.values()) for name, seen in counts.items()}
        for name, total in sorted(totals.items(), key=lambda t: -t[1]):
            lines.append(f"== {name}: {total} samples (thread-samples, {INTERVAL * 1000:.0f} ms)")
            for where, n in counts[name].most_common(12):
                lines.append(f"{n / total:6.1%}  {where}")
            used = cpu.get(name, collections.Counter())
            if spent := sum(used.values()):
                lines.append(f"  CPU {spent / 1e9:.2f} s, where it ran:")
                for where, ns in used.most_common(8):
                    lines.append(f"{ns / spent:6.1%}  {where}")
        by_name = by_os_name()
        if by_name:
            lines.append("== CPU seconds by OS thread name, every thread of the process")
            lines += [f"{ns / 1e9:9.2f}  {name}" for name, ns in by_name.most_common(16)]
        out.write_text("\n".join(lines) + "\n")
        if exit_at is not None:
            _exit_written.set()


def main() -> None:
    args = sys.argv[1:]
    out, rest = args[0] if args else "", args[2:]
    if len(args) < 3 or args[1] != "--":
        raise SystemExit("usage: python -m benchmarks.stacks OUT.txt -- (-m module | script) ...")
    counts: dict[str, collections.Counter] = {}
    cpu: dict[str, collections.Counter] = {}
    target = Path(out)
    sampler = threading.Thread(target=_sample, args=(target, counts, cpu), name="stacks",
                               daemon=True)  # fmt: skip
    sampler.start()
    exit_now = os._exit

    def written_then_exit(code: int) -> None:
        try:
            _write(target, counts, cpu, time.time())
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
        _write(target, counts, cpu)


if __name__ == "__main__":
    main()
