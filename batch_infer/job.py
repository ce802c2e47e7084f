"""The driver: spec -> plan -> shards -> inference actors -> writers -> Parquet + manifest.

It holds shard descriptions and small manifest entries, never the data: actors' results
stay in the object store and go from there to a writer. It keeps a bounded number of
shards in flight (backpressure), retries shards whose actor or writer died, and records
every run in `_runs/`, failed or not.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batch_infer.actor import InferenceActor, prepare_shard, threads_for
from batch_infer.backends import check_request
from batch_infer.errors import BadRowsError, JobFailedError, OutputError, SpecError, UserError
from batch_infer.manifest import RUNS, SHARDS, STAGING, SUCCESS, Output, OutputLock, recover
from batch_infer.planning import JobPlan, build_plan
from batch_infer.sharding import Shard, plan_shards
from batch_infer.spec import JobSpec, load_spec, parse_date, spec_from_dict
from batch_infer.writing import ShardWriter

log = logging.getLogger("batch_infer")

# Errors that mean a process died, not that the shard is bad: the shard is retried.
_DIED = (
    RayActorError,
    WorkerCrashedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)


@dataclass
class RunSummary:
    run_id: str
    name: str
    date: str | None = None  # the logical date (YYYY-MM-DD) of a dated or scheduled spec
    status: str = "running"
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
    model: str = ""
    model_sha256: str = ""
    output: str = ""
    actors: int = 0
    nodes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)


def _refuse_foreign(out: Output) -> None:
    """Before the output is touched at all: it must be new, empty, or a batch-infer output."""
    info = out.filesystem.get_file_info(out.root)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output.path: {out.root} is a file; expected a directory")
    foreign = info.type == pafs.FileType.Directory and not out.exists("_manifest")
    if foreign and [i for i in out.list("") if i.base_name not in ("_LOCK", "_LOCK.json")]:
        raise OutputError(
            f"output.path: {out.root} is not empty and holds no batch-infer output; "
            "choose another path or empty it"
        )


def _check_output(out: Output, plan: JobPlan, overwrite: bool) -> dict[str, dict[str, Any]]:
    """Make the output ready for this job; return the shards already committed."""
    has_manifest = out.exists("_manifest")
    others = [i for i in out.list("") if i.base_name not in ("_LOCK", "_LOCK.json")]
    if overwrite:
        for info in others:
            out.delete(info.base_name)
        has_manifest = False
    if has_manifest and out.exists("_manifest/job.json"):
        before = out.read_json("_manifest/job.json")
        changed = [k for k, v in plan.config().items() if before.get(k) != v]
        if changed:
            raise OutputError(
                f"{out.root}: holds outputs computed with a different {', '.join(changed)}; "
                "rerun with --overwrite to start over, or choose another output path"
            )
    else:
        out.write_json("_manifest/job.json", plan.config())
    return recover(out)


def _check_unchanged(out: Output, shards: list[Shard], done: dict[str, dict[str, Any]]) -> None:
    planned = {s.id: s for s in shards}
    for shard_id, entry in done.items():
        shard = planned.get(shard_id)
        if shard is None or shard.fingerprint != entry["input_fingerprint"]:
            raise OutputError(
                f"{out.root}: the input changed since shard {shard_id} ({entry['file']}, rows "
                f"{entry['row_start']}-{entry['row_stop']}) was committed; refusing to mix old "
                "and new results. Rerun with --overwrite to start over"
            )


def _connect() -> None:
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


class _Pool:
    """The inference actors and writers of one run; replaces the ones that die."""

    def __init__(self, plan: JobPlan, device: str, run_id: str) -> None:
        spec = plan.spec
        resources = ray.cluster_resources()
        self.plan, self.device, self.run_id = plan, device, run_id
        cpus = max(1, int(resources.get("CPU", 1)))
        if device == "gpu":  # one actor per GPU; the other cores prepare shards ahead of it
            self.count = int(resources.get("GPU", 0))
            # Two shards at once share the actor's slots, so the GPU never drains between them.
            self.options = {"num_gpus": 1, "num_cpus": 1, "max_concurrency": 2}
            self.prepare_cpus = 1.0
            self.depth = max(3, (cpus - 2 * self.count) // self.count)
        else:  # the actors hold the cores; preparing shares them, two shards per actor
            self.count = spec.num_actors or cpus
            self.options = {"num_cpus": 1}
            self.prepare_cpus = 0.0
            self.depth = 2
        self.threads = threads_for(self.options["num_cpus"])
        self.plan_ref = ray.put(plan)
        self.prepare = ray.remote(prepare_shard).options(
            num_returns=4, num_cpus=self.prepare_cpus, max_retries=2
        )
        self.actors = [self._new_actor(i) for i in range(self.count)]
        writers = spec.num_writers or max(1, -(-self.count // 4))
        self.writers = [self._new_writer(i) for i in range(writers)]

    def _new_actor(self, i: int) -> Any:
        cls = ray.remote(InferenceActor).options(
            **self.options,
            name=f"batch-infer:{self.run_id}:infer-{i}-{uuid.uuid4().hex[:4]}",
            scheduling_strategy="SPREAD",
            max_restarts=0,
        )
        return cls.remote(self.plan, self.device, self.threads)

    def _new_writer(self, i: int) -> Any:
        cls = ray.remote(ShardWriter).options(
            num_cpus=0,
            name=f"batch-infer:{self.run_id}:writer-{i}-{uuid.uuid4().hex[:4]}",
            scheduling_strategy="SPREAD",
        )
        return cls.remote(self.plan.spec.output.path, self.plan.spec.output.row_group_rows)

    def replace_actor(self, i: int, dead: Any) -> None:
        if self.actors[i] is dead:
            self.actors[i] = self._new_actor(i)

    def replace_writer(self, i: int, dead: Any) -> None:
        if self.writers[i] is dead:
            self.writers[i] = self._new_writer(i)

    def shutdown(self) -> None:
        """Let every live actor release its GPU resources, then end them all."""
        closing = [actor.close.remote() for actor in self.actors]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for handle in self.actors + self.writers:
            ray.kill(handle)


def _cause(exc: RayTaskError) -> BaseException:
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    return cause if cause is not None else exc


def _execute(
    plan: JobPlan,
    todo: list[Shard],
    summary: RunSummary,
    lock: OutputLock,
    device: str,
    progress: bool,
) -> None:
    pool = _Pool(plan, device, summary.run_id)
    try:
        summary.backend, summary.backend_reason = ray.get(pool.actors[0].describe.remote())
    except RayTaskError as exc:
        pool.shutdown()
        cause = _cause(exc)
        raise cause if isinstance(cause, UserError) else exc from None
    log.info("backend: %s", summary.backend_reason)
    summary.actors = pool.count
    per_actor = pool.depth  # shards prepared or queued ahead of each actor
    max_pending_commits = 2 * len(pool.writers) + pool.count  # backpressure on writers
    queue: deque[tuple[Shard, int]] = deque((s, 0) for s in todo)
    running: dict[Any, tuple[str, int, Any, Shard, int]] = {}  # ref -> (kind, slot, handle, ...)
    load = [0] * pool.count
    nodes: set[str] = set()
    next_writer = 0
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("shards  {task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"),
        TimeElapsedColumn(),
        disable=not progress or not sys.stderr.isatty(),
        transient=False,
    )
    task = bar.add_task(plan.spec.name, total=len(todo), rows=0, rate=0.0)
    started = time.time()
    last_refresh = last_line = started
    # Not a terminal (a submitted job's log, cron): a plain line every 10 s instead of a bar.
    lines = progress and not sys.stderr.isatty()

    def retry(shard: Shard, attempt: int, why: str) -> None:
        if attempt < plan.spec.max_retries:
            summary.retries += 1
            log.warning("shard %s: %s; retrying", shard.id, why)
            queue.append((shard, attempt + 1))
        else:
            summary.shards_failed += 1
            summary.errors.append(
                f"shard {shard.id} ({shard.file.relpath}): {why}, {attempt + 1} attempt(s)"
            )

    with bar:
        while queue or running:
            commits = sum(1 for v in running.values() if v[0] == "commit")
            for i in range(pool.count):
                while queue and load[i] < per_actor and commits < max_pending_commits:
                    shard, attempt = queue.popleft()
                    actor = pool.actors[i]
                    entry, keep, feeds, errors = pool.prepare.remote(
                        pool.plan_ref, shard, summary.run_id, attempt
                    )
                    refs = actor.infer.options(num_returns=2).remote(entry, keep, feeds)
                    running[refs[0]] = ("process", i, actor, shard, attempt, (refs[1], errors))
                    load[i] += 1
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if time.time() - last_refresh > 10:
                lock.refresh()
                last_refresh = time.time()
            for ref in ready:
                kind, slot, handle, shard, attempt, extra = running.pop(ref)
                if kind == "process":
                    load[slot] -= 1
                try:
                    result = ray.get(ref)
                except _DIED as exc:
                    if kind == "process":
                        pool.replace_actor(slot, handle)
                    else:
                        pool.replace_writer(slot, handle)
                    retry(
                        shard,
                        attempt,
                        f"{'actor' if kind == 'process' else 'writer'} died ({type(exc).__name__})",
                    )
                    continue
                except RayTaskError as exc:
                    cause = _cause(exc)
                    if isinstance(cause, UserError):  # bad data: retrying cannot help
                        summary.shards_failed += 1
                        summary.errors.append(str(cause))
                    else:
                        retry(shard, attempt, f"{type(cause).__name__}: {cause}")
                    continue
                if kind == "process":
                    w = next_writer % len(pool.writers)
                    next_writer += 1
                    writer = pool.writers[w]
                    commit = writer.commit.remote(result, *extra)
                    running[commit] = ("commit", w, writer, shard, attempt, ())
                    continue
                summary.shards_committed += 1
                summary.rows_this_run += result["rows"]
                summary.good_rows += result["good_rows"]
                summary.bad_rows += result["bad_rows"]
                summary.files_written += len(result["files"])
                rate = summary.rows_this_run / max(1e-9, time.time() - started)
                bar.update(task, advance=1, rows=summary.rows_this_run, rate=rate)
                done = summary.shards_committed
                if lines and (time.time() - last_line > 10 or done == len(todo)):
                    last_line = time.time()
                    print(
                        f"{plan.spec.name}: {done}/{len(todo)} shards, "
                        f"{summary.rows_this_run:,} rows, {rate:,.0f} rows/s",
                        file=sys.stderr,
                        flush=True,
                    )
            del ready
    summary.nodes = sorted(nodes)
    pool.shutdown()


def run(
    spec: JobSpec | str | os.PathLike[str] | dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    date: dt.date | str | None = None,
) -> RunSummary:
    """Run a job to completion; committed shards of an earlier run of it are skipped.

    `date` is the logical date filled into `{date}` in the spec's paths (default: today in
    the schedule's time zone, UTC without one); it needs the spec as a path or a dict.

    Raises a `UserError` for bad specs, inputs and outputs, `BadRowsError` when more rows
    were bad than allowed, and `JobFailedError` when shards failed after their retries.
    """
    day = parse_date(date) if date is not None else None
    if isinstance(spec, dict):
        spec = spec_from_dict(copy.deepcopy(spec), overrides=overrides, date=day)
    elif not isinstance(spec, JobSpec):
        spec = load_spec(spec, overrides, date=day)
    elif day is not None and spec.date != day.isoformat():
        raise SpecError(
            f"date={day}: this JobSpec was loaded for {spec.date or 'no date'}; pass the spec "
            "as a path or a dict to fill in another date"
        )
    plan = build_plan(spec)
    summary = RunSummary(
        run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        name=spec.name,
        date=spec.date,
        model=spec.model.onnx,
        model_sha256=plan.signature.sha256,
        output=spec.output.path,
    )
    shards = plan_shards(plan.dataset, spec.shard_rows)  # reads every Parquet footer
    out = Output.at(spec.output.path)
    _refuse_foreign(out)
    lock = OutputLock(out, summary.run_id)
    lock.acquire()
    try:
        done = _check_output(out, plan, overwrite)
        _check_unchanged(out, shards, done)
        out.delete(SUCCESS)
        summary.shards_total = len(shards)
        summary.shards_skipped = len(done)
        todo = [s for s in shards if s.id not in done]
        if todo:
            _connect()
            gpus = int(ray.cluster_resources().get("GPU", 0))
            device = check_request(spec.backend, spec.device, gpus)
            _execute(plan, todo, summary, lock, device, progress)
            out.delete(STAGING)  # the writers are gone: nothing is staged any more
        _finish(out, plan, summary, shards)
    except BaseException as exc:
        summary.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        if not summary.errors:
            summary.errors.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary.seconds = round(time.time() - summary.started_at, 3)
        summary.rows_per_second = round(summary.rows_this_run / max(summary.seconds, 1e-9), 1)
        try:
            out.write_json(f"{RUNS}/{summary.run_id}.json", asdict(summary))
        finally:
            lock.release()
    return summary


def _finish(out: Output, plan: JobPlan, summary: RunSummary, shards: list[Shard]) -> None:
    """Count every committed row; decide success; mark it."""
    entries = [
        out.read_json(f"{SHARDS}/{s.id}.json")
        for s in shards
        if out.exists(f"{SHARDS}/{s.id}.json")
    ]
    summary.rows = sum(e["rows"] for e in entries)
    summary.good_rows = sum(e["good_rows"] for e in entries)
    summary.bad_rows = sum(e["bad_rows"] for e in entries)
    if not summary.backend and entries:
        summary.backend = entries[-1]["backend"]
    if summary.shards_failed:
        summary.status = "failed"
        raise JobFailedError(
            f"{summary.shards_failed} shard(s) failed; the {len(entries)} committed shard(s) are "
            "kept and a rerun resumes from them:\n  " + "\n  ".join(summary.errors)
        )
    if summary.bad_rows > plan.spec.max_bad_rows:
        summary.status = "failed"
        msg = (
            f"{summary.bad_rows} row(s) could not be converted (max_bad_rows is "
            f"{plan.spec.max_bad_rows}); they are in {out.path('_errors')}"
        )
        summary.errors.append(msg)
        raise BadRowsError(msg)
    summary.status = "succeeded"
    out.write_json(SUCCESS, {"run": summary.run_id, "rows": summary.rows})
