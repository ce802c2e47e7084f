"""The driver: spec -> plan -> shards -> inference actors -> writers -> Parquet + manifest.

It holds shard descriptions and small manifest entries, never the data: actors' results
stay in the object store and go from there to a writer. It keeps a bounded number of
shards in flight (backpressure), retries shards whose actor or writer died, and records
every run in `_runs/`, failed or not (`OutputSink` carries the protocol).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
import uuid
from collections import deque
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batch_infer.actor import InferenceActor, prepare_shard, threads_for
from batch_infer.backends import actor_concurrency, check_request
from batch_infer.data.sharding import Shard, plan_shards
from batch_infer.errors import UserError
from batch_infer.planning import JobPlan, build_plan
from batch_infer.sink.manifest import OutputSink, RunRecord, ShardEntry
from batch_infer.sink.writing import ShardWriter
from batch_infer.spec import SpecSource, resolve_spec

log = logging.getLogger("batch_infer")

# Errors that mean a process died, not that the shard is bad: the shard is retried.
_DIED = (
    RayActorError,
    WorkerCrashedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)


def connect(address: str | None = None) -> None:
    """Join the Ray cluster the caller names: `address`, else `RAY_ADDRESS` (set by Ray Jobs
    for a submitted run), else the one this process already joined with `ray.init`.
    Otherwise start a local Ray of the run's own: never one that happens to be running on
    this machine, which may be another user's."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


class _Pool:
    """The inference actors and writers of one run; replaces the ones that die."""

    def __init__(self, plan: JobPlan, sink: OutputSink, device: str, run_id: str) -> None:
        spec = plan.spec
        resources = ray.cluster_resources()
        self.plan, self.sink, self.device, self.run_id = plan, sink, device, run_id
        cpus = max(1, int(resources.get("CPU", 1)))
        concurrency = actor_concurrency(device)
        if device == "gpu":  # one actor per GPU; the other cores prepare shards ahead of it
            self.count = int(resources.get("GPU", 0))
            self.options = {"num_gpus": 1, "num_cpus": 1, "max_concurrency": concurrency}
            self.prepare_cpus = 1.0
            self.depth = max(3, (cpus - 2 * self.count) // self.count)
        else:  # the actors hold the cores; preparing shares them, two shards per actor
            self.count = spec.num_actors or cpus
            self.options = {"num_cpus": 1, "max_concurrency": concurrency}
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

    def _name(self, role: str, i: int) -> str:
        return f"batch-infer:{self.run_id}:{role}-{i}-{uuid.uuid4().hex[:4]}"

    def _new_actor(self, i: int) -> Any:
        cls = ray.remote(InferenceActor).options(
            **self.options,
            name=self._name("infer", i),
            scheduling_strategy="SPREAD",
            max_restarts=0,
        )
        return cls.remote(self.plan, self.device, self.threads)

    def _new_writer(self, i: int) -> Any:
        cls = ray.remote(ShardWriter).options(
            num_cpus=0, name=self._name("writer", i), scheduling_strategy="SPREAD"
        )
        return cls.remote(self.sink)

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
    sink: OutputSink,
    todo: list[Shard],
    record: RunRecord,
    device: str,
    progress: bool,
) -> None:
    pool = _Pool(plan, sink, device, record.run_id)
    try:
        record.backend, record.backend_reason = ray.get(pool.actors[0].describe.remote())
    except RayTaskError as exc:
        pool.shutdown()
        cause = _cause(exc)
        raise cause if isinstance(cause, UserError) else exc from None
    log.info("backend: %s", record.backend_reason)
    record.actors = pool.count
    per_actor = pool.depth  # shards prepared or queued ahead of each actor
    max_pending_commits = 2 * len(pool.writers) + pool.count  # backpressure on writers
    queue: deque[tuple[Shard, int]] = deque((s, 0) for s in todo)
    running: dict[Any, tuple[str, int, Any, Shard, int, tuple]] = {}  # ref -> what it is
    load = [0] * pool.count
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
            record.retries += 1
            log.warning("shard %s: %s; retrying", shard.id, why)
            queue.append((shard, attempt + 1))
        else:
            record.shards_failed += 1
            record.errors.append(
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
                        pool.plan_ref, shard, record.run_id, attempt
                    )
                    refs = actor.infer.options(num_returns=2).remote(entry, keep, feeds)
                    running[refs[0]] = ("process", i, actor, shard, attempt, (refs[1], errors))
                    load[i] += 1
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if time.time() - last_refresh > 10:
                sink.keep_alive()
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
                    role = "actor" if kind == "process" else "writer"
                    retry(shard, attempt, f"{role} died ({type(exc).__name__})")
                    continue
                except RayTaskError as exc:
                    cause = _cause(exc)
                    if isinstance(cause, UserError):  # bad data: retrying cannot help
                        record.shards_failed += 1
                        record.errors.append(str(cause))
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
                entry: ShardEntry = result
                record.shards_committed += 1
                record.rows_this_run += entry.rows
                record.files_written += len(entry.files)
                rate = record.rows_this_run / max(1e-9, time.time() - started)
                bar.update(task, advance=1, rows=record.rows_this_run, rate=rate)
                done = record.shards_committed
                if lines and (time.time() - last_line > 10 or done == len(todo)):
                    last_line = time.time()
                    print(
                        f"{plan.spec.name}: {done}/{len(todo)} shards, "
                        f"{record.rows_this_run:,} rows, {rate:,.0f} rows/s",
                        file=sys.stderr,
                        flush=True,
                    )
            del ready
    pool.shutdown()


def run(
    spec: SpecSource,
    *,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    date: dt.date | str | None = None,
    address: str | None = None,
) -> RunRecord:
    """Run a job to completion; committed shards of an earlier run of it are skipped.

    `spec` is a YAML path, a mapping or a `JobSpec` (see `resolve_spec` for `overrides`
    and `date`). `address` is a Ray cluster to join (default: `RAY_ADDRESS`, else a local
    Ray of the run's own).

    Raises a `UserError` for bad specs, inputs and outputs, `BadRowsError` when more rows
    were bad than allowed, and `JobFailedError` when shards failed after their retries.
    """
    spec = resolve_spec(spec, overrides, date)
    plan = build_plan(spec)
    record = RunRecord(
        run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        name=spec.name,
        date=spec.date,
        model=spec.model.onnx,
        model_sha256=plan.signature.sha256,
        output=spec.output.path,
    )
    shards = plan_shards(plan.dataset, spec.shard_rows)  # reads every Parquet footer
    sink = OutputSink(spec.output.path, spec.output.row_group_rows)
    fingerprints = {s.id: s.fingerprint for s in shards}
    done = sink.on_write_start(record.run_id, plan.config(), fingerprints, overwrite)
    try:
        record.shards_total = len(shards)
        record.shards_skipped = len(done)
        todo = [s for s in shards if s.id not in done]
        if todo:
            connect(address)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            device = check_request(spec.backend, spec.device, gpus)
            _execute(plan, sink, todo, record, device, progress)
        sink.on_write_complete(record, list(fingerprints), spec.max_bad_rows)
    except BaseException as exc:
        sink.on_write_failed(record, exc)
        raise
    finally:
        sink.record_run(record)
    return record
