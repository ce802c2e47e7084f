"""The output and its exactly-once protocol: the layout, the records, and `OutputSink`.

Layout under the output path:

    part-<shard>.parquet            predictions of one committed shard
    _errors/part-<shard>.parquet    rows of that shard that could not be converted
    _manifest/job.json              what the outputs were computed from (model, mapping)
    _manifest/shards/<shard>.json   one `ShardEntry` per committed shard: the commit point
    _staging/<shard>-<nonce>/       files of a shard being written (never read by users)
    _runs/<run>.json                one `RunRecord` per run, failed or not
    _SUCCESS                        the last run finished with every row accounted for
    _LOCK, _LOCK.json               held by the running driver

A shard is committed when its entry lands in `_manifest/shards/` (written to a temporary
name, then renamed). Its files are staged first and moved into place after the entry, so a
crash between the two is finished on the next run (roll forward), and anything staged
without an entry is removed.

`OutputSink`'s lifecycle follows Ray Data's `Datasink`: the driver calls `on_write_start`
(refuse foreign folders, lock, check what the outputs depend on, recover), writer actors
call `write` once per shard (the commit), and the driver ends with `on_write_complete`
(count, decide, `_SUCCESS`) or `on_write_failed`, then `record_run` (always).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from batch_infer.errors import BadRowsError, JobFailedError, OutputError, OutputFailedError
from batch_infer.location import Location, open_location

MANIFEST = "_manifest"
JOB = "_manifest/job.json"
SHARDS = "_manifest/shards"
STAGING = "_staging"
ERRORS = "_errors"
RUNS = "_runs"
SUCCESS = "_SUCCESS"
LOCK = "_LOCK"
LOCK_INFO = "_LOCK.json"

R = TypeVar("R", bound="_Record")
log = logging.getLogger("batch_infer")


class _Record:
    """JSON in and out; unknown keys (newer versions) are ignored, missing ones defaulted."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[R], doc: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass
class ShardEntry(_Record):
    """One committed shard. Built in three steps, each in its own process: the prepare task
    (what was read), the inference actor (where and how it ran), the writer (the files)."""

    shard: str
    file: str
    row_start: int
    row_stop: int
    rows: int
    good_rows: int
    bad_rows: int
    input_fingerprint: str
    model_sha256: str
    run: str
    attempt: int = 0
    prepare_started: float = 0.0  # epoch seconds: the shard's bar on the run's timeline
    prepare_seconds: float = 0.0
    preprocess: str = ""  # how decoded inputs were made, e.g. "pixels: Pillow 13.0.0 on the CPU"
    backend: str = ""
    actor: int | None = None  # which inference actor of the run (its lane on the timeline)
    infer_started: float = 0.0
    infer_seconds: float = 0.0
    node: str = ""
    gpu: str | None = None
    files: list[str] = field(default_factory=list)
    staged: dict[str, str] = field(default_factory=dict)
    committed_at: float = 0.0


@dataclass
class RunRecord(_Record):
    """One run of a job: what `batch_infer.run` returns and `_runs/<run>.json` holds."""

    run_id: str
    name: str
    date: str | None = None  # the logical date (YYYY-MM-DD) of a dated or scheduled spec
    status: str = "running"  # running | succeeded | failed | interrupted
    rows: int = 0  # input rows accounted for in the output, all runs
    good_rows: int = 0
    bad_rows: int = 0
    rows_this_run: int = 0
    shards_total: int = 0
    shards_committed: int = 0  # by this run
    shards_skipped: int = 0  # committed by an earlier run
    shards_failed: int = 0
    retries: int = 0
    files_written: int = 0
    seconds: float = 0.0
    rows_per_second: float = 0.0
    backend: str = ""
    backend_reason: str = ""
    model: str = ""  # the model as the spec names it
    model_sha256: str = ""  # of the model that ran: the optimized one with model.optimize
    optimized: dict[str, Any] | None = None  # model.optimize: the recipe and the model it made
    output: str = ""
    actors: int = 0
    nodes: list[str] = field(default_factory=list)  # Ray nodes that ran shards ("driver": its lane)
    errors: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)  # the process's start, epoch seconds
    finished_at: float | None = None
    # Where the wall clock went: phase -> seconds after `started_at` (see `PHASES`), and per
    # inference actor: its node and GPU, when its backend was ready, its first and last
    # batch (seconds after `started_at`), and the seconds its device spent computing.
    timeline: dict[str, float] = field(default_factory=dict)
    actor_stats: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, phase: str, at: float | None = None) -> None:
        """Note that `phase` happened now (or at epoch `at`); the first mark of a phase wins."""
        when = round((time.time() if at is None else at) - self.started_at, 3)
        self.timeline.setdefault(phase, when)


# The phases of a run, in the order they happen (RunRecord.timeline's keys).
PHASES = (
    "imported",  # the interpreter started, batch-infer imported: the run's first step
    "planned",  # spec, model, input schema, shards and the output checked
    "ray_ready",
    "backend_ready",  # the first inference actor loaded the model
    "first_batch",  # the first batch went to a device
    "first_commit",
    "last_batch",
    "last_commit",
    "finished",  # the run's record written: what the user waits for, bar the process exit
)


def timeline_text(timeline: dict[str, float]) -> str:
    """A run's phases in the order they happened, one line: "planned 0.4 s, ..." """
    marks = sorted((t, phase.replace("_", " ")) for phase, t in timeline.items())
    return ", ".join(f"{name} {t:.1f} s" for t, name in marks)


class OutputLock:
    """One run per output at a time.

    Local paths use an OS file lock, which a killed driver releases by dying. Other
    filesystems get a lock file that a thread of the holder refreshes for as long as it
    holds it (whatever the run is doing); one not refreshed for `stale_after` seconds is
    taken over.
    """

    def __init__(self, out: Location, run_id: str, stale_after: float = 120.0) -> None:
        self.out, self.run_id, self.stale_after = out, run_id, stale_after
        self._filelock: FileLock | None = None
        self._released = threading.Event()  # ends the heartbeat thread
        self.lost_to: dict[str, Any] | None = None  # who took a lock this run did not refresh
        self.info = {"run": run_id, "host": socket.gethostname(), "pid": os.getpid()}

    def acquire(self) -> None:
        self.out.filesystem.create_dir(self.out.root, recursive=True)
        if self.out.is_local:
            self._filelock = FileLock(self.out.path(LOCK), timeout=0)
            try:
                self._filelock.acquire()
            except Timeout:
                raise OutputError(self._held_message()) from None
            try:
                self.out.write_json(LOCK_INFO, {**self.info, "since": time.time()})
            except BaseException:
                self._filelock.release()
                raise
            return
        if self.out.exists(LOCK_INFO):
            held = self.out.read_json(LOCK_INFO)
            if time.time() - held.get("heartbeat", 0) < self.stale_after:
                raise OutputError(self._held_message())
        self._refresh()
        time.sleep(0.5)  # a racing writer may have written after us: the last one wins
        if self.out.read_json(LOCK_INFO).get("run") != self.run_id:
            raise OutputError(self._held_message())
        threading.Thread(target=self._heartbeat, name="batch-infer-lock", daemon=True).start()

    def _refresh(self) -> None:
        self.out.write_json(LOCK_INFO, {**self.info, "heartbeat": time.time()})

    def _heartbeat(self) -> None:
        """Refresh the lock file, a quarter of `stale_after` apart, while it is ours."""
        while not self._released.wait(self.stale_after / 4):
            try:
                held = self.out.read_json(LOCK_INFO)
                if held.get("run") != self.run_id:  # this process stalled past stale_after
                    self.lost_to = held
                    log.error("%s", self._held_message())
                    return
                self._refresh()
            except (OSError, ValueError) as exc:  # the next beat tries again
                log.warning("could not refresh the lock of %s: %s", self.out.root, exc)

    def check(self) -> None:
        """Raise if another run took the lock (this one missed its refreshes)."""
        if self.lost_to is not None:
            raise OutputFailedError(
                f"{self.out.root}: run {self.lost_to.get('run')} (pid {self.lost_to.get('pid')} "
                f"on {self.lost_to.get('host')}) took this output's lock while this run "
                f"held it, after {self.stale_after:.0f} s without a refresh; this run stops "
                "without marking the output complete: let the other run finish"
            )

    def _held_message(self) -> str:
        try:
            held = self.out.read_json(LOCK_INFO)
            who = f" (run {held.get('run')}, pid {held.get('pid')} on {held.get('host')})"
        except (OSError, ValueError):
            who = ""
        return f"{self.out.root}: another batch-infer run is writing to this output{who}"

    def release(self) -> None:
        self._released.set()
        try:  # locally only a note of who holds it: the OS lock is what excludes, and goes now
            with contextlib.suppress(OSError, ValueError):
                if self.out.is_local or self.out.read_json(LOCK_INFO).get("run") == self.run_id:
                    self.out.delete(LOCK_INFO)  # never the lock of a run that took it over
        finally:
            if self._filelock is not None:
                self._filelock.release()


SHOWN_ERRORS = 10  # shard failures an error message lists; the run's record has them all

# OS errors of the output that no retry fixes: the run stops at the first one.
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _os_error(out: Location, exc: OSError, doing: str) -> OutputFailedError:
    """One line for an OS error on the output: what, where, and what to do."""
    what = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "free some space, then rerun the same command to resume",
        errno.EDQUOT: "free some of your quota, then rerun the same command to resume",
        errno.EROFS: "the file system is read-only: choose another output.path",
    }.get(exc.errno or 0, "fix the output's permissions or choose another output.path")
    where = exc.filename or out.root
    return OutputFailedError(f"output.path: {where}: {what} while {doing}; {hint}")


def _ours(name: str) -> bool:
    """Files a lock leaves at the top of an output, also half-written ones."""
    return name in (LOCK, LOCK_INFO) or name.startswith(f".{LOCK_INFO}.tmp-")


# What to do about a manifest file changed outside batch-infer (a crash cannot leave one).
_FIX_ENTRY = "delete that file to compute its shard again, or rerun with --overwrite"
_FIX_JOB = "rerun with --overwrite to start over"


def _read_manifest(out: Location, rel: str, fix: str) -> Any:
    """A manifest file's JSON; one that cannot be parsed is an OutputError naming it."""
    try:
        return out.read_json(rel)
    except ValueError as exc:
        raise OutputError(f"{out.path(rel)}: unreadable ({exc}); {fix}") from None


def committed_entries(out: Location) -> dict[str, ShardEntry]:
    entries = {}
    for info in out.list(SHARDS):
        if info.base_name.endswith(".json") and not info.base_name.startswith("."):
            rel = posixpath.relpath(info.path, out.root)
            doc = _read_manifest(out, rel, _FIX_ENTRY)
            try:
                entry = ShardEntry.from_json(doc)
            except (TypeError, KeyError, AttributeError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                raise OutputError(
                    f"{out.path(rel)}: not a shard entry ({why}); {_FIX_ENTRY}"
                ) from None
            entries[entry.shard] = entry
    return entries


def recover(out: Location) -> dict[str, ShardEntry]:
    """Finish interrupted commits, drop uncommitted leftovers; return the committed entries."""
    entries = committed_entries(out)
    for shard_id, entry in list(entries.items()):
        whole = True
        for final, staged in entry.staged.items():
            if not out.exists(final):
                if out.exists(staged):
                    out.filesystem.move(out.path(staged), out.path(final))
                else:
                    whole = False
        if not whole:  # cannot happen unless files were deleted by hand: recompute the shard
            out.delete(f"{SHARDS}/{shard_id}.json")
            del entries[shard_id]
    out.delete(STAGING)
    referenced = {f for e in entries.values() for f in e.files}
    for rel_dir in ("", ERRORS, SHARDS):
        for info in out.list(rel_dir):
            rel = posixpath.relpath(info.path, out.root)
            if (info.base_name.startswith("part-") and rel not in referenced) or ".tmp-" in rel:
                out.delete(rel)
    return entries


class OutputSink:
    """Where a job's predictions go, and the protocol that makes every row land once.

    Made on the driver and sent to the writer actors (the lock stays behind)."""

    def __init__(self, path: str, row_group_rows: int = 65536) -> None:
        self.out = open_location(path, "output.path", OutputError)
        self.row_group_rows = row_group_rows
        self._lock: OutputLock | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lock": None}

    # -- driver: before any shard -------------------------------------------------------

    def refuse_foreign(self) -> None:
        """Before the output is touched at all: it must be new, empty, or a batch-infer output."""
        out = self.out
        info = out.info()
        if info.type == pafs.FileType.File:
            raise OutputError(f"output.path: {out.root} is a file; expected a directory")
        foreign = info.type == pafs.FileType.Directory and not out.exists(MANIFEST)
        if foreign and [i for i in out.list() if not _ours(i.base_name)]:
            raise OutputError(
                f"output.path: {out.root} is not empty and holds no batch-infer output; "
                "choose another path or empty it"
            )

    def on_write_start(
        self,
        run_id: str,
        config: dict[str, Any],
        fingerprints: dict[str, str],
        overwrite: bool = False,
    ) -> dict[str, ShardEntry]:
        """Lock the output, make it ready for this job, and return the shards committed
        before. `config` is what the outputs depend on; `fingerprints` maps every planned
        shard to its input's fingerprint. Refuses to mix results of other inputs or models.
        An OS error (no space, read-only, a file where a folder should be) is one line, and
        leaves nothing behind that would block a rerun."""
        lock = OutputLock(self.out, run_id)
        try:
            self.refuse_foreign()
            lock.acquire()
        except OSError as exc:
            raise _os_error(self.out, exc, "taking the output's lock") from None
        self._lock = lock
        try:
            done = self._prepare(config, overwrite)
            for shard_id, entry in done.items():
                if fingerprints.get(shard_id) != entry.input_fingerprint:
                    raise OutputError(
                        f"{self.out.root}: the input changed since shard {shard_id} "
                        f"({entry.file}, rows {entry.row_start}-{entry.row_stop}) was "
                        "committed; refusing to mix old and new results. Rerun with "
                        "--overwrite to start over"
                    )
            self.out.delete(SUCCESS)
        except OSError as exc:
            self._release()
            raise _os_error(self.out, exc, "preparing the output") from None
        except BaseException:
            self._release()
            raise
        return done

    def _release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    def _prepare(self, config: dict[str, Any], overwrite: bool) -> dict[str, ShardEntry]:
        out = self.out
        if overwrite:
            for info in out.list():
                if not _ours(info.base_name):
                    out.delete(info.base_name)
        if out.exists(JOB):
            before = _read_manifest(out, JOB, _FIX_JOB)
            # both ways: a key only one side has (a postprocess dropped or added) is a change
            keys = [*config, *(k for k in before if k not in config)]
            changed = [k for k in keys if before.get(k) != config.get(k)]
            if changed:
                raise OutputError(
                    f"{out.root}: holds outputs computed with a different "
                    f"{', '.join(changed)}; rerun with --overwrite to start over, or choose "
                    "another output path"
                )
        else:
            out.write_json(JOB, config)
        return recover(out)

    # -- writer actors: one call per shard -----------------------------------------------

    def _write_parquet(self, table: pa.Table, rel: str) -> None:
        self.out.filesystem.create_dir(self.out.path(posixpath.dirname(rel)), recursive=True)
        with self.out.filesystem.open_output_stream(self.out.path(rel)) as f:
            pq.write_table(table, f, row_group_size=self.row_group_rows, compression="zstd")

    def write(
        self, entry: ShardEntry, predictions: pa.Table, errors: pa.Table | None
    ) -> ShardEntry:
        """Commit one shard: stage its files, write its entry (the commit), move into place.

        Raises `OutputFailedError` for an OS error no retry fixes (no space, read-only)."""
        try:
            return self._write(entry, predictions, errors)
        except OSError as exc:
            if exc.errno in FATAL_ERRNOS:
                raise _os_error(self.out, exc, f"committing shard {entry.shard}") from None
            raise

    def _write(
        self, entry: ShardEntry, predictions: pa.Table, errors: pa.Table | None
    ) -> ShardEntry:
        out, shard = self.out, entry.shard
        bad = 0 if errors is None else errors.num_rows
        if (predictions.num_rows, bad) != (entry.good_rows, entry.bad_rows):
            raise RuntimeError(  # never commit a shard that does not account for every row
                f"shard {shard}: {predictions.num_rows} predictions and {bad} error rows for "
                f"{entry.good_rows} good and {entry.bad_rows} bad rows"
            )
        stage = f"{STAGING}/{shard}-{uuid.uuid4().hex[:8]}"
        staged: dict[str, str] = {}
        try:
            for table, final in (
                (predictions, f"part-{shard}.parquet"),
                (errors, f"{ERRORS}/part-{shard}.parquet"),
            ):
                if table is not None and table.num_rows:
                    tmp = f"{stage}/{final.replace('/', '_')}"
                    self._write_parquet(table, tmp)
                    staged[final] = tmp
            # the files, then the commit that names them: a power loss keeps no entry whose
            # files it lost (the entry itself is durable once written)
            if staged:
                files = [out.path(tmp) for tmp in staged.values()]
                out.sync(*files, out.path(stage), out.path(STAGING))
            entry = dataclasses.replace(
                entry, files=sorted(staged), staged=staged, committed_at=time.time()
            )
            out.write_json(f"{SHARDS}/{shard}.json", entry.to_json())  # the commit point
        except BaseException:
            with contextlib.suppress(OSError):  # nothing of this attempt was committed
                out.delete(stage)
            raise
        for final, tmp in staged.items():
            out.filesystem.create_dir(out.path(posixpath.dirname(final)), recursive=True)
            out.filesystem.move(out.path(tmp), out.path(final))
        out.delete(stage)
        return entry

    # -- driver: after the last shard ----------------------------------------------------

    def on_write_complete(self, record: RunRecord, shard_ids: list[str], max_bad_rows: int) -> None:
        """Count every committed row of the planned shards; decide success; mark it.

        Raises `JobFailedError` if shards failed, `BadRowsError` past `max_bad_rows`, and
        `OutputFailedError` for an OS error (no space for `_SUCCESS`, say)."""
        try:
            self._complete(record, shard_ids, max_bad_rows)
        except OSError as exc:
            raise _os_error(self.out, exc, "completing the output") from None

    def _complete(self, record: RunRecord, shard_ids: list[str], max_bad_rows: int) -> None:
        self.out.delete(STAGING)  # the writers are gone: nothing is staged any more
        done = committed_entries(self.out)
        entries = [done[s] for s in shard_ids if s in done]
        record.rows = sum(e.rows for e in entries)
        record.good_rows = sum(e.good_rows for e in entries)
        record.bad_rows = sum(e.bad_rows for e in entries)
        record.nodes = sorted({e.node for e in entries if e.node and e.run == record.run_id})
        if not record.backend and entries:
            record.backend = entries[-1].backend
        if record.shards_failed:
            record.status = "failed"
            shown = record.errors[:SHOWN_ERRORS]
            more = len(record.errors) - len(shown)
            shown += [f"... and {more} more, in the run's record ({RUNS}/)"] if more else []
            raise JobFailedError(
                f"{record.shards_failed} shard(s) failed; the {len(entries)} committed shard(s) "
                "are kept and a rerun resumes from them:\n  " + "\n  ".join(shown)
            )
        if record.bad_rows > max_bad_rows:
            record.status = "failed"
            msg = (
                f"{record.bad_rows} row(s) could not be converted (max_bad_rows is "
                f"{max_bad_rows}); they are in {self.out.path(ERRORS)}"
            )
            record.errors.append(msg)
            raise BadRowsError(msg)
        if self._lock is not None:
            self._lock.check()  # the output is another run's now: it is not ours to mark
        record.status = "succeeded"
        self.out.write_json(SUCCESS, {"run": record.run_id, "rows": record.rows})

    def on_write_failed(self, record: RunRecord, exc: BaseException) -> None:
        record.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        if not record.errors:
            record.errors.append(f"{type(exc).__name__}: {exc}")

    def record_run(self, record: RunRecord) -> None:
        """Write `_runs/<run>.json` and let go of the output. Called once, whatever happened."""
        record.finished_at = time.time()
        record.mark("finished", record.finished_at)
        record.seconds = round(record.finished_at - record.started_at, 3)
        record.rows_per_second = round(record.rows_this_run / max(record.seconds, 1e-9), 1)
        try:
            self.out.write_json(f"{RUNS}/{record.run_id}.json", record.to_json())
        except OSError as exc:  # a full disk must not hide why the run ended
            log.warning("could not record the run in %s: %s", self.out.path(RUNS), exc)
        finally:
            self._release()
