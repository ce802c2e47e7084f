"""The driver: spec -> plan -> shards -> inference actors -> writers -> Parquet + manifest.

It holds shard descriptions and small manifest entries, never the data: prepared tensors
and predictions stay in the object store and go from task to actor to writer by reference.
`OutputSink` carries the exactly-once protocol; every run is recorded in `_runs/`.

What a user waits for is the whole command, so the fixed cost is overlapped: Ray starts
while the shards are planned and the output is checked; the actors load the model while
the first shards are read; prepared shards go to whichever actor has room (so the last
ones spread over all actors); the first and last shards are small (`data/sharding.py`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batch_infer.actor import InferenceActor, prepare_shard, threads_for
from batch_infer.backends import actor_concurrency, check_request
from batch_infer.data.sharding import Shard, plan_shards
from batch_infer.errors import UserError
from batch_infer.planning import JobPlan, build_plan
from batch_infer.sink.manifest import SUCCESS, OutputSink, RunRecord, ShardEntry
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


@dataclass
class _Task:
    """What an object reference in flight stands for."""

    kind: str  # "ready" (an actor loading its model), "prepare", "infer" or "commit"
    shard: Shard | None = None
    attempt: int = 0
    slot: int = 0  # the actor's or writer's index
    handle: Any = None  # the actor or writer it runs on, to replace it if it died
    refs: tuple[Any, ...] = ()  # the task's other results, passed on to the next stage


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
            prepare_cpus = 1.0
            self.ahead = max(4, cpus - self.count)
        else:  # the actors hold the cores; preparing shares them
            self.count = spec.num_actors or cpus
            self.options = {"num_cpus": 1, "max_concurrency": concurrency}
            prepare_cpus = 0.0
            self.ahead = self.count + 1
        # Shards given to an actor at once: what it runs side by side, and one waiting.
        self.room = concurrency + 1
        self.threads = threads_for(self.options["num_cpus"])
        self.plan_ref = ray.put(plan)
        self.prepare = ray.remote(prepare_shard).options(
            num_returns=4, num_cpus=prepare_cpus, max_retries=2
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
        return cls.remote(self.plan, self.device, self.threads, i)

    def _new_writer(self, i: int) -> Any:
        cls = ray.remote(ShardWriter).options(
            num_cpus=0, name=self._name("writer", i), scheduling_strategy="SPREAD"
        )
        return cls.remote(self.sink)

    def replace_actor(self, i: int, dead: Any) -> bool:
        """A new actor for a dead one; False if it was replaced already."""
        if self.actors[i] is not dead:
            return False
        self.actors[i] = self._new_actor(i)
        return True

    def replace_writer(self, i: int, dead: Any) -> None:
        if self.writers[i] is dead:
            self.writers[i] = self._new_writer(i)

    def stats(self) -> list[dict[str, Any]]:
        """Each live actor's timeline lane (see `InferenceActor.stats`)."""
        refs = [actor.stats.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except (RayTaskError, *_DIED):
                continue
        return sorted(out, key=lambda s: s["actor"])

    def shutdown(self) -> None:
        """End every actor and writer now: the run is recorded, nothing of theirs is needed,
        and a process that ends releases its GPU memory, streams and sessions."""
        for handle in self.actors + self.writers:
            ray.kill(handle)


def _cause(exc: RayTaskError) -> BaseException:
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    return cause if cause is not None else exc


class _Progress:
    """A bar on a terminal; a plain line every 10 s otherwise (a submitted job's log, cron)."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        tty = sys.stderr.isatty()
        self.name, self.total, self.lines = name, total, enabled and not tty
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards  {task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"),
            TimeElapsedColumn(),
            disable=not enabled or not tty,
            transient=False,
        )
        self.task = self.bar.add_task(name, total=total, rows=0, rate=0.0)
        self.first: float | None = None
        self.last_line = time.time()

    def committed(self, shards: int, rows: int) -> None:
        now = time.time()
        self.first = self.first or now
        rate = rows / max(1e-9, now - self.first) if shards > 1 else 0.0
        self.bar.update(self.task, completed=shards, rows=rows, rate=rate)
        if self.lines and (now - self.last_line > 10 or shards == self.total):
            self.last_line = now
            print(
                f"{self.name}: {shards}/{self.total} shards, {rows:,} rows, {rate:,.0f} rows/s",
                file=sys.stderr,
                flush=True,
            )


def _execute(
    plan: JobPlan,
    sink: OutputSink,
    todo: list[Shard],
    record: RunRecord,
    device: str,
    progress: bool,
) -> None:
    """Prepare shards ahead, hand each prepared one to the actor with the most room, commit
    what comes back; retry shards whose process died. Returns when every shard is done."""
    pool = _Pool(plan, sink, device, record.run_id)
    record.actors = pool.count
    max_commits = 2 * len(pool.writers) + pool.count  # backpressure on the writers
    pending: deque[tuple[Shard, int]] = deque((s, 0) for s in todo)
    prepared: deque[tuple[Shard, int, tuple[Any, ...]]] = deque()
    running: dict[Any, _Task] = {}
    load = [0] * pool.count
    next_writer = 0
    bar = _Progress(plan.spec.name, len(todo), progress)
    last_refresh = time.time()
    for i, actor in enumerate(pool.actors):
        running[actor.describe.remote()] = _Task("ready", slot=i, handle=actor)

    def retry(shard: Shard, attempt: int, why: str) -> None:
        if attempt < plan.spec.max_retries:
            record.retries += 1
            log.warning("shard %s: %s; retrying", shard.id, why)
            pending.append((shard, attempt + 1))
        else:
            record.shards_failed += 1
            record.errors.append(
                f"shard {shard.id} ({shard.file.relpath}): {why}, {attempt + 1} attempt(s)"
            )

    def died(task: _Task, exc: BaseException) -> None:
        if task.kind == "commit":
            pool.replace_writer(task.slot, task.handle)
        elif task.kind in ("infer", "ready") and pool.replace_actor(task.slot, task.handle):
            new = pool.actors[task.slot]
            running[new.describe.remote()] = _Task("ready", slot=task.slot, handle=new)
        if task.shard is not None:
            role = {"commit": "writer", "prepare": "prepare task"}.get(task.kind, "actor")
            retry(task.shard, task.attempt, f"{role} died ({type(exc).__name__})")

    with bar.bar:
        while pending or prepared or running:
            kinds = [t.kind for t in running.values()]
            preparing, commits = kinds.count("prepare"), kinds.count("commit")
            while pending and preparing + len(prepared) < pool.ahead and commits < max_commits:
                shard, attempt = pending.popleft()
                entry, *refs = pool.prepare.remote(pool.plan_ref, shard, record.run_id, attempt)
                running[entry] = _Task("prepare", shard, attempt, refs=tuple(refs))
                preparing += 1
            while prepared and min(load) < pool.room:
                i = load.index(min(load))
                shard, attempt, (entry, keep, feeds, errors) = prepared.popleft()
                actor = pool.actors[i]
                done, predictions = actor.infer.options(num_returns=2).remote(entry, keep, feeds)
                running[done] = _Task("infer", shard, attempt, i, actor, (predictions, errors))
                load[i] += 1
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if time.time() - last_refresh > 10:
                sink.keep_alive()
                last_refresh = time.time()
            for ref in ready:
                task = running.pop(ref)
                if task.kind == "infer":
                    load[task.slot] -= 1
                try:
                    result = ray.get(ref)
                except _DIED as exc:
                    died(task, exc)
                    continue
                except RayTaskError as exc:
                    cause = _cause(exc)
                    if task.kind == "ready":  # the model cannot load: no shard can run
                        raise cause if isinstance(cause, UserError) else exc from None
                    assert task.shard is not None
                    if isinstance(cause, UserError):  # bad data: retrying cannot help
                        record.shards_failed += 1
                        record.errors.append(str(cause))
                    else:
                        retry(task.shard, task.attempt, f"{type(cause).__name__}: {cause}")
                    continue
                if task.kind == "ready":
                    if not record.backend:
                        record.backend, record.backend_reason = result
                        log.info("backend: %s", record.backend_reason)
                elif task.kind == "prepare":
                    assert task.shard is not None
                    prepared.append((task.shard, task.attempt, (ref, *task.refs)))
                elif task.kind == "infer":
                    w = next_writer % len(pool.writers)
                    next_writer += 1
                    writer = pool.writers[w]
                    commit = writer.commit.remote(result, *task.refs)
                    running[commit] = _Task("commit", task.shard, task.attempt, w, writer)
                else:
                    entry: ShardEntry = result
                    record.mark("first_commit", entry.committed_at)
                    record.timeline["last_commit"] = round(
                        entry.committed_at - record.started_at, 3
                    )
                    record.shards_committed += 1
                    record.rows_this_run += entry.rows
                    record.files_written += len(entry.files)
                    bar.committed(record.shards_committed, record.rows_this_run)
            del ready
    _record_actors(record, pool.stats())
    pool.shutdown()


def _record_actors(record: RunRecord, stats: list[dict[str, Any]]) -> None:
    """Each actor's lane, in seconds after the run's start, and the phases they mark."""
    for s in stats:
        lane = dict(s)
        for key in ("loading_at", "ready_at", "first_batch_at", "last_batch_at"):
            lane[key] = None if s[key] is None else round(s[key] - record.started_at, 3)
        span = (s["last_batch_at"] or 0) - (s["first_batch_at"] or 0)
        lane["busy_while_running"] = round(s["busy_seconds"] / span, 3) if span > 0 else None
        record.actor_stats.append(lane)
    ready = [s["ready_at"] for s in stats]
    firsts = [s["first_batch_at"] for s in stats if s["first_batch_at"]]
    lasts = [s["last_batch_at"] for s in stats if s["last_batch_at"]]
    if ready:
        record.mark("backend_ready", min(ready))
    if firsts:
        record.mark("first_batch", min(firsts))
    if lasts:
        record.mark("last_batch", max(lasts))


def _likely_work(sink: OutputSink, config: dict[str, Any], overwrite: bool) -> bool:
    """Whether the run will probably compute something, so Ray is worth starting before
    the shards are planned: not when the output is complete for this same job."""
    out = sink.out
    if overwrite or not out.exists(SUCCESS):
        return True
    try:
        return out.read_json("_manifest/job.json") != config
    except (OSError, ValueError):
        return True


def run(
    spec: SpecSource,
    *,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    date: dt.date | str | None = None,
    address: str | None = None,
    started_at: float | None = None,
) -> RunRecord:
    """Run a job to completion; committed shards of an earlier run of it are skipped.

    `spec` is a YAML path, a mapping or a `JobSpec` (see `resolve_spec` for `overrides`
    and `date`). `address` is a Ray cluster to join (default: `RAY_ADDRESS`, else a local
    Ray of the run's own). `started_at` (epoch seconds) is where the run's timeline starts:
    the CLI passes its process's start; by default, now.

    Raises a `UserError` for bad specs, inputs and outputs, `BadRowsError` when more rows
    were bad than allowed, and `JobFailedError` when shards failed after their retries.
    """
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    record = RunRecord(run_id=run_id, name="")
    if started_at is not None:
        record.started_at = started_at
    spec = resolve_spec(spec, overrides, date)
    plan = build_plan(spec)  # spec, model and input schema checked: nothing started yet
    record.name, record.date, record.output = spec.name, spec.date, spec.output.path
    record.model, record.model_sha256 = spec.model.onnx, plan.signature.sha256
    sink = OutputSink(spec.output.path, spec.output.row_group_rows)

    def check_output() -> tuple[list[Shard], dict[str, ShardEntry]]:
        shards = plan_shards(plan.dataset, spec.shard_rows)  # reads every Parquet footer
        fingerprints = {s.id: s.fingerprint for s in shards}
        return shards, sink.on_write_start(record.run_id, plan.config(), fingerprints, overwrite)

    ray_error: BaseException | None = None
    with ThreadPoolExecutor(1) as side:
        checking = side.submit(check_output)
        if _likely_work(sink, plan.config(), overwrite):
            try:  # Ray starts meanwhile, on this thread: its processes live as long as it does
                connect(address)
                record.mark("ray_ready")
            except BaseException as exc:  # raised below, once the output is held and recorded
                ray_error = exc
        shards, done = checking.result()
    record.mark("planned")
    try:
        if ray_error is not None:
            raise ray_error
        record.shards_total = len(shards)
        record.shards_skipped = len(done)
        todo = [s for s in shards if s.id not in done]
        if todo:
            connect(address)
            record.mark("ray_ready")
            gpus = int(ray.cluster_resources().get("GPU", 0))
            device = check_request(spec.backend, spec.device, gpus)
            _execute(plan, sink, todo, record, device, progress)
        sink.on_write_complete(record, [s.id for s in shards], spec.max_bad_rows)
    except BaseException as exc:
        sink.on_write_failed(record, exc)
        raise
    finally:
        sink.record_run(record)
    return record
