"""The driver: spec -> plan -> shards -> inference actors -> writers -> Parquet + manifest.

It holds shard descriptions and small manifest entries, never the data: prepared tensors
and predictions stay in the object store and go from task to actor to writer by reference.
`OutputSink` carries the exactly-once protocol; every run is recorded in `_runs/`.

What a user waits for is the whole command, so the fixed cost is overlapped: a local Ray
starts while the shards are planned and the output is checked, and meanwhile the driver's
own lane (`_Lane`) loads the model on this machine and runs the first shards, until an
actor is ready; the actors load the model while the first shards are read; prepared
shards go to whichever actor has room (so the last ones spread over all actors); the
first and last shards are small (`data/sharding.py`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batch_infer.actor import InferenceActor, ShardRunner, prepare_shard, threads_for
from batch_infer.backends import (
    actor_concurrency,
    check_request,
    local_gpus,
    prepare_local,
    ray_initialized,
)
from batch_infer.data.decode import InputsWarmUp
from batch_infer.data.sharding import Shard, plan_shards
from batch_infer.errors import JobFailedError, OutputFailedError, UserError
from batch_infer.planning import JobPlan, build_plan
from batch_infer.settings import check_settings, setting
from batch_infer.sink.manifest import SUCCESS, OutputSink, RunRecord, ShardEntry
from batch_infer.sink.writing import ShardWriter
from batch_infer.spec import SpecSource, resolve_spec

log = logging.getLogger("batch_infer")

if TYPE_CHECKING:
    from ray.exceptions import RayTaskError

# Ray is imported where it is used: the driver's lane and the planning need none of it, so
# a local run imports it on the thread that starts Ray, beside the rest of the work.


def _died_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a process died, not that the shard is bad: the shard is retried."""
    from ray import exceptions as e

    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.OwnerDiedError)


def starts_local_ray(address: str | None) -> bool:
    """Whether `connect(address)` will start a local Ray of this run's own."""
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    return not ray_initialized()


def connect(address: str | None = None) -> None:
    """Join the Ray cluster the caller names: `address`, else `RAY_ADDRESS` (set by Ray Jobs
    for a submitted run), else the one this process already joined with `ray.init`.
    Otherwise start a local Ray of the run's own: never one that happens to be running on
    this machine, which may be another user's.

    A local Ray of the run's own listens on loopback only and uses Ray's token
    authentication on purpose (so Ray does not warn about it): no other machine can reach
    it, and no other user of this one can join it."""
    if ray_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local" and "ray" not in sys.modules:  # read when Ray is imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # Ray starts a worker per core for the first driver, which a run needs only a few
        # of: on the H100 machine's 16 cores, Ray was up 2 s sooner without them.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    import ray

    # Every failed task's result is looked at by the driver, which reports it in one line:
    # Ray's "unhandled error" tracebacks for the results nobody fetched only add noise.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    context = ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.ERROR,  # batch-infer reports what goes wrong, in one line
        log_to_driver=False,
    )
    session = context.address_info.get("session_dir")
    log.info("Ray at %s; its logs are in %s/logs", context.address_info.get("gcs_address"), session)


class _RayStart:
    """`connect` on a thread of its own, so the run goes on while Ray starts. The thread
    lives as long as the process: Ray's processes are bound to the thread that started them
    (Linux's parent-death signal), and end with the process instead."""

    def __init__(self, address: str | None) -> None:
        self.address, self.error = address, None
        self.done = threading.Event()
        threading.Thread(target=self._main, name="batch-infer-ray", daemon=True).start()

    def _main(self) -> None:
        try:
            connect(self.address)
        except BaseException as exc:  # raised by ready(), on the run's own thread
            self.error = exc
        finally:
            self.done.set()
        threading.Event().wait()  # never returns: see the class's docstring

    def ready(self, timeout: float | None = None) -> bool:
        """Whether Ray is up (waiting up to `timeout` seconds); raises why it could not start."""
        if not self.done.wait(timeout):
            return False
        if self.error is not None:
            raise self.error
        return True


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


class _Work:
    """The shards still to run and the run's counts, shared by the driver's lane (a thread)
    and the Ray loop; every change goes through one lock."""

    def __init__(self, todo: list[Shard], record: RunRecord, bar: _Progress) -> None:
        self.lock = threading.Lock()
        self.pending: deque[tuple[Shard, int]] = deque((s, 0) for s in todo)
        self.record, self.bar = record, bar
        self.fatal: OutputFailedError | None = None  # the output failed: the run stops

    def stop_for(self, exc: OutputFailedError) -> None:
        with self.lock:
            self.fatal = self.fatal or exc
            self.pending.clear()

    def raise_fatal(self) -> None:
        """Raise why the output failed, with what this run committed before it did."""
        if self.fatal is not None:
            record = self.record
            raise OutputFailedError(
                f"{self.fatal} ({record.shards_committed} shard(s), {record.rows_this_run:,} "
                "rows committed by this run are kept)"
            ) from None

    def take(self) -> tuple[Shard, int] | None:
        with self.lock:
            return self.pending.popleft() if self.pending else None

    def put_back(self, shard: Shard, attempt: int) -> None:
        with self.lock:
            self.pending.appendleft((shard, attempt))

    def committed(self, entry: ShardEntry) -> None:
        with self.lock:
            record = self.record
            record.mark("first_commit", entry.committed_at)
            record.timeline["last_commit"] = round(entry.committed_at - record.started_at, 3)
            record.shards_committed += 1
            record.rows_this_run += entry.rows
            record.files_written += len(entry.files)
            self.bar.committed(record.shards_committed, record.rows_this_run)

    def failed(self, why: str) -> None:
        with self.lock:
            self.record.shards_failed += 1
            self.record.errors.append(why)


class _Lane:
    """The run's own process driving this machine's device: the same stages as the Ray path
    (prepare, run, commit) in threads of this process, through the same sink. It needs no
    Ray, so a local run computes from its first second. On the CPU it is the whole run (a
    hand-written loop is no faster), and on a machine with one GPU (two shards in flight
    keep it as busy as an actor does: docs/gpu.md). With several GPUs it runs while Ray
    starts, and stops once an actor has loaded the model: Ray's actors drive every GPU.

    It starts loading (and warming up) the model at once, while the shards are planned;
    once `begin` hands it the run's work it reads (and decodes) the first shards while the
    model may still load, and runs them when it is ready. It stops when the queue is empty or
    `stop()` is called (the shards it has taken but not run go back to the queue), or on an
    error that is not the data's: the shard goes back, and the run falls back to Ray's
    actors."""

    def __init__(
        self,
        plan: JobPlan,
        sink: OutputSink,
        device: str,
        inputs: InputsWarmUp | None = None,
    ) -> None:
        self.plan, self.sink, self.device = plan, sink, device
        self.gpu = 0 if device == "gpu" else None  # the first this process sees
        self.inputs = inputs  # this process's decoders' warm-up, started by the run
        self._work: _Work | None = None
        self.given = threading.Event()  # set by `begin` or `stop`
        self.stopping = threading.Event()
        self.stats: dict[str, Any] | None = None
        self.error: UserError | None = None  # the model cannot load here (nor in an actor)
        cores = os.cpu_count() or 1
        # The CPU: one session on every core, reading beside it (as a hand-written loop
        # would). A GPU: the session's threads, and cores enough to read ahead of it.
        self.threads = cores if device == "cpu" else 1
        self.readers = 1 if device == "cpu" else max(2, min(12, cores - 2))
        self.prepared: deque[tuple[Shard, int, Future]] = deque()
        self.lock = threading.Lock()
        # An Event, not Thread.join(): a join interrupted by Ctrl-C or SIGTERM marks the
        # thread as ended although it still runs (CPython 3.11), and the run would record
        # itself before the lane's last commits.
        self.done = threading.Event()
        threading.Thread(target=self._main, name="batch-infer-lane", daemon=True).start()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    @property
    def work(self) -> _Work:
        assert self._work is not None, "the lane runs shards only after begin()"
        return self._work

    def begin(self, work: _Work) -> None:
        """The run's shards are planned: run them once the model is loaded."""
        self._work = work
        self.given.set()

    def stop(self) -> None:
        """Run no more shards: those read ahead but not started go back to the queue now
        (not once the model has loaded), for Ray's actors or a rerun."""
        self.stopping.set()
        self.given.set()
        self._put_back()

    def _put_back(self) -> None:
        with self.lock:
            while self.prepared:
                shard, attempt, future = self.prepared.pop()
                future.cancel()
                self.work.put_back(shard, attempt)

    def wait(self) -> None:
        """Until the lane has ended (its last commits done)."""
        while not self.done.wait(0.5):
            pass

    def _main(self) -> None:
        try:
            self._run()
        finally:
            self.done.set()

    def _run(self) -> None:
        # The first shards are read (and decoded) as soon as the work is given, while the
        # model still loads.
        try:
            with (
                ThreadPoolExecutor(self.readers, "batch-infer-read") as readers,
                ThreadPoolExecutor(2, "batch-infer-commit") as committers,
            ):
                ahead = threading.Thread(target=self._read_ahead, args=(readers,), daemon=True)
                ahead.start()
                try:
                    self._drive(readers, committers)
                finally:  # stopped, failed or done: what was taken but not run goes back
                    self.stop()
                    ahead.join()
        finally:  # no more shards here, so no more decoders; the warm-up's time is taken
            if self.inputs is not None:  # once it has ended (a tiny run may end before it)
                self.inputs.close()
                if self.stats is not None:
                    self.stats.update(self.inputs.times())

    def _drive(self, readers: ThreadPoolExecutor, committers: ThreadPoolExecutor) -> None:
        """Load the model, then run shards on it until the work is done or stopped."""
        gpu = None if self.gpu is None else str(self.gpu)
        try:
            runner = ShardRunner(
                self.plan, self.device, self.threads, -1, "driver", gpu, self.gpu or 0
            )
        except UserError as exc:  # what an actor on this machine would say too
            self.error = exc
            return
        except Exception as exc:  # Ray's actors will load it, or say why they cannot
            log.warning("this process cannot load the model (%s); Ray's actors will", exc)
            return
        try:
            self.given.wait()
            if self.stopping.is_set():
                return
            workers = [
                threading.Thread(target=self._loop, args=(runner, readers, committers))
                for _ in range(runner.backend.concurrency)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            self.stats = runner.stats()
        finally:
            runner.close()

    def _read_ahead(self, readers: ThreadPoolExecutor) -> None:
        """Once the work is given, start reading its first shards (the model may still load)."""
        self.given.wait()
        if self.stopping.is_set():
            return
        with self.lock:
            self._fill(readers)

    def _fill(self, readers: ThreadPoolExecutor) -> None:
        """Read ahead up to one shard per reader, and two more (`self.lock` held)."""
        run_id = self.work.record.run_id
        while not self.stopping.is_set() and len(self.prepared) < self.readers + 2:
            item = self.work.take()
            if item is None:
                break
            shard, attempt = item
            future = readers.submit(prepare_shard, self.plan, shard, run_id, attempt)
            self.prepared.append((shard, attempt, future))

    def _next(self, readers: ThreadPoolExecutor) -> tuple[Shard, int, Future] | None:
        """The next prepared shard, reading ahead up to one per reader (and two more)."""
        with self.lock:
            self._fill(readers)
            if self.stopping.is_set() or not self.prepared:
                return None
            return self.prepared.popleft()

    def _loop(
        self, runner: ShardRunner, readers: ThreadPoolExecutor, committers: ThreadPoolExecutor
    ) -> None:
        while (item := self._next(readers)) is not None:
            shard, attempt, future = item
            try:
                entry, keep, feeds, errors = future.result()
                entry, predictions = runner.run(entry, keep, feeds)
            except UserError as exc:  # bad data: no retry can help, as in the actors
                self.work.failed(str(exc))
                continue
            except Exception as exc:  # the device or a library: leave it to Ray's actors
                self._give_up(shard, attempt, exc)
                return
            committers.submit(self._commit, shard, attempt, entry, predictions, errors)

    def _commit(
        self, shard: Shard, attempt: int, entry: ShardEntry, predictions: Any, errors: Any
    ) -> None:
        try:
            entry = self.sink.write(entry, predictions, errors)
        except OutputFailedError as exc:  # no retry fixes a full or read-only output
            self.work.stop_for(exc)
            self.stop()
            return
        except Exception as exc:
            self._give_up(shard, attempt, exc)
            return
        self.work.committed(entry)

    def _give_up(self, shard: Shard, attempt: int, exc: Exception) -> None:
        log.warning("this process stops running shards (%s: %s)", type(exc).__name__, exc)
        self.work.put_back(shard, attempt)
        self.stop()


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
        import ray

        spec = plan.spec
        resources = ray.cluster_resources()
        self.plan, self.sink, self.device, self.run_id = plan, sink, device, run_id
        cpus = max(1, int(resources.get("CPU", 1)))
        concurrency = actor_concurrency(device)
        if device == "gpu":  # one actor per GPU; the other cores prepare shards ahead of it
            self.count = int(resources.get("GPU", 0))
            # An actor holds a core where one is left over for the prepare tasks: with as
            # many GPUs as cores, actors holding them all would starve every prepare task
            # and the run would wait forever (2 GPUs and num_cpus=2 did on an H200 pair).
            actor_cpus = 1 if cpus > self.count else 0
            self.options = {"num_gpus": 1, "num_cpus": actor_cpus, "max_concurrency": concurrency}
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
        self.prepare_needs = {"CPU": prepare_cpus}
        self.prepare = ray.remote(prepare_shard).options(
            num_returns=4, num_cpus=prepare_cpus, max_retries=2
        )
        self.actors = [self._new_actor(i) for i in range(self.count)]
        writers = spec.num_writers or max(1, -(-self.count // 4))
        self.writers = [self._new_writer(i) for i in range(writers)]

    def _name(self, role: str, i: int) -> str:
        return f"batch-infer:{self.run_id}:{role}-{i}-{uuid.uuid4().hex[:4]}"

    def _new_actor(self, i: int) -> Any:
        import ray

        cls = ray.remote(InferenceActor).options(
            **self.options,
            name=self._name("infer", i),
            scheduling_strategy="SPREAD",
            max_restarts=0,
        )
        return cls.remote(self.plan, self.device, self.threads, i)

    def _new_writer(self, i: int) -> Any:
        import ray

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

    def stats(self, loaded: list[bool]) -> list[dict[str, Any]]:
        """Each live actor's timeline lane (see `InferenceActor.stats`). Only the actors that
        have loaded the model: one still loading has run nothing, and asking it would wait
        for its load (2 s after the last commit, with two H200s on a short run)."""
        import ray
        from ray.exceptions import RayTaskError

        refs = [actor.stats.remote() for actor, ok in zip(self.actors, loaded, strict=True) if ok]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except (RayTaskError, *_died_errors()):
                continue
        return sorted(out, key=lambda s: s["actor"])

    def shutdown(self) -> None:
        """End every actor and writer now: nothing of theirs is needed any more (what they
        committed is on disk), and a process that ends releases its GPU memory, streams and
        sessions. A Ray that failed may not end them: that must not hide why the run ended."""
        import ray

        for handle in self.actors + self.writers:
            with contextlib.suppress(Exception):
                ray.kill(handle)


def _waiting(
    pool: _Pool, running: dict[Any, _Task], loaded: list[bool], seconds: float
) -> str | None:
    """What a run that has seen nothing finish for `seconds` waits for, and what Ray has
    free, when some of it waits on Ray to find resources; None when only inference is slow.
    Ray's own "cannot be scheduled" warnings do not reach the driver (log_to_driver=False)."""
    import ray

    preparing = sum(t.kind == "prepare" for t in running.values())
    starting = loaded.count(False)
    if not preparing and not starting:
        return None
    free, total = ray.available_resources(), ray.cluster_resources()

    def needs(resources: dict[str, float]) -> str:
        return ", ".join(f"{v:g} {k}" for k, v in resources.items() if v) or "nothing"

    parts = []
    if preparing:
        each = needs(pool.prepare_needs)
        parts.append(f"{preparing} shard(s) being read (each task needs {each})")
    if starting:
        actor = {"GPU": pool.options.get("num_gpus", 0), "CPU": pool.options["num_cpus"]}
        parts.append(
            f"{starting} of {pool.count} actor(s) not running the model yet (each needs "
            f"{needs(actor)})"
        )
    kinds = [k for k in ("CPU", "GPU") if k in total]
    have = ", ".join(f"{k} {free.get(k, 0):g} of {total[k]:g}" for k in kinds)
    return (
        f"nothing has finished for {seconds:.0f} s: {'; '.join(parts)}. Ray has free: "
        f"{have or 'nothing (its nodes offer no CPU or GPU)'}. Ray starts a task or an actor "
        "once a node has what it needs (other jobs may hold it, or a node may be on its way); "
        "loading a large model or building a TensorRT engine also takes this long. The run "
        "keeps waiting (Ctrl-C keeps what is committed)"
    )


def _cause(exc: RayTaskError) -> BaseException:
    return exc.cause if exc.cause is not None else exc


def _execute(
    plan: JobPlan,
    sink: OutputSink,
    work: _Work,
    lane: _Lane | None,
    ray_start: _RayStart | None,
    address: str | None,
) -> None:
    """Prepare shards ahead, hand each prepared one to the actor with the most room, commit
    what comes back; retry shards whose process died. Returns when every shard is done.

    Without `ray_start`, the run's own process (`lane`) is the whole run; Ray starts only if
    it stops with shards left (an error that is not the data's)."""
    if ray_start is None:
        if lane is not None:
            lane.wait()
            if lane.error is not None:
                raise lane.error
        work.raise_fatal()
        if not work.pending:
            return
        ray_start = _RayStart(address)
    while not ray_start.ready(0.05):
        work.raise_fatal()
        if (lane is None or not lane.running) and not work.pending:
            return  # the run's own process ran every shard while Ray was starting
    import ray

    work.record.mark("ray_ready")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = check_request(plan.spec.backend, plan.spec.device, gpus)
    pool = _Pool(plan, sink, device, work.record.run_id)
    try:
        _drive(plan, sink, work, lane, pool)
    finally:  # also after an error: a later run in this process (a backfill's next date,
        pool.shutdown()  # a notebook) gets the GPUs, and no writer commits behind its back


def _drive(plan: JobPlan, sink: OutputSink, work: _Work, lane: _Lane | None, pool: _Pool) -> None:
    """`_execute`'s loop over Ray's actors and writers, until every shard is done."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    died_errors = _died_errors()
    record = work.record
    record.actors = pool.count
    max_commits = 2 * len(pool.writers) + pool.count  # backpressure on the writers
    prepared: deque[tuple[Shard, int, tuple[Any, ...]]] = deque()
    running: dict[Any, _Task] = {}
    load = [0] * pool.count
    # Shards go only to actors whose model is loaded: a replacement for an actor lost with
    # its node may wait for resources that never come, and must not hold shards meanwhile.
    loaded = [False] * pool.count
    next_writer = 0
    last_finished = time.time()
    # Nothing finished for this long: say what the run waits for; then after twice as long.
    stall = quiet = setting("BATCH_INFER_STALL_NOTICE_SECONDS")
    for i, actor in enumerate(pool.actors):
        running[actor.describe.remote()] = _Task("ready", slot=i, handle=actor)

    def retry(shard: Shard, attempt: int, why: str) -> None:
        if attempt < plan.spec.max_retries:
            with work.lock:
                record.retries += 1
            log.warning("shard %s: %s; retrying", shard.id, why)
            work.put_back(shard, attempt + 1)
        else:
            work.failed(f"shard {shard.id} ({shard.file.relpath}): {why}, {attempt + 1} attempt(s)")

    def died(task: _Task, exc: BaseException) -> None:
        if task.kind == "commit":
            pool.replace_writer(task.slot, task.handle)
        elif task.kind in ("infer", "ready") and pool.replace_actor(task.slot, task.handle):
            new = pool.actors[task.slot]
            loaded[task.slot] = False
            running[new.describe.remote()] = _Task("ready", slot=task.slot, handle=new)
        if task.shard is not None:
            role = {"commit": "writer", "prepare": "prepare task"}.get(task.kind, "actor")
            retry(task.shard, task.attempt, f"{role} died ({type(exc).__name__})")

    def busy() -> bool:  # actors still loading hold no work: they do not keep the run
        return any(t.kind != "ready" for t in running.values())

    try:
        while work.pending or prepared or busy() or (lane is not None and lane.running):
            work.raise_fatal()
            kinds = [t.kind for t in running.values()]
            preparing, commits = kinds.count("prepare"), kinds.count("commit")
            while preparing + len(prepared) < pool.ahead and commits < max_commits:
                item = work.take()
                if item is None:
                    break
                shard, attempt = item
                entry, *refs = pool.prepare.remote(pool.plan_ref, shard, record.run_id, attempt)
                running[entry] = _Task("prepare", shard, attempt, refs=tuple(refs))
                preparing += 1
            while prepared:
                room = [(load[i], i) for i in range(pool.count) if loaded[i]]
                if not room or min(room)[0] >= pool.room:
                    break
                i = min(room)[1]
                shard, attempt, (entry, keep, feeds, errors) = prepared.popleft()
                actor = pool.actors[i]
                done, predictions = actor.infer.options(num_returns=2).remote(entry, keep, feeds)
                running[done] = _Task("infer", shard, attempt, i, actor, (predictions, errors))
                load[i] += 1
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2) if running else ([], [])
            if not running:
                time.sleep(0.05)  # only the lane is at work
            if ready or (lane is not None and lane.running):
                last_finished, quiet = time.time(), stall
            elif time.time() - last_finished > quiet:
                if notice := _waiting(pool, running, loaded, time.time() - last_finished):
                    log.warning(notice)
                quiet *= 2  # then after twice as long, and so on
            for ref in ready:
                task = running.pop(ref)
                if task.kind == "infer":
                    load[task.slot] -= 1
                try:
                    result = ray.get(ref)
                except died_errors as exc:
                    died(task, exc)
                    continue
                except RayTaskError as exc:
                    cause = _cause(exc)
                    if isinstance(cause, OutputFailedError):  # the output takes no more: stop
                        work.stop_for(cause)
                        work.raise_fatal()
                    if task.kind == "ready":  # the model cannot load: no shard can run
                        raise cause if isinstance(cause, UserError) else exc from None
                    assert task.shard is not None
                    if isinstance(cause, UserError):  # bad data: retrying cannot help
                        work.failed(str(cause))
                    else:
                        retry(task.shard, task.attempt, f"{type(cause).__name__}: {cause}")
                    continue
                if task.kind == "ready":
                    loaded[task.slot] = True
                    if lane is not None:
                        lane.stop()  # an actor took over: the lane's shards finish and commit
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
                    work.committed(result)
            del ready
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: count the commits already on their way
        commits = [ref for ref, t in running.items() if t.kind == "commit"]
        done, _ = ray.wait(commits, num_returns=len(commits), timeout=2.0) if commits else ([], [])
        for ref in done:
            with contextlib.suppress(RayError):
                work.committed(ray.get(ref))
        raise
    except RayError as exc:  # Ray itself failed (its node or raylet died), not a shard
        what = "a Ray node of this run died" if "Died" in type(exc).__name__ else "Ray failed"
        raise JobFailedError(
            f"{what} ({type(exc).__name__}); the {record.shards_committed} shard(s) committed "
            "by this run are kept: rerun the same command to resume"
        ) from None
    if lane is not None:
        lane.wait()
    lanes = pool.stats(loaded) + ([lane.stats] if lane is not None and lane.stats else [])
    _record_actors(record, lanes)


# The times in each lane's stats, epoch seconds; the run's own process's lane adds the last.
LANE_TIMES = ("loading_at", "loaded_at", "ready_at", "first_batch_at", "last_batch_at",
              "inputs_ready_at")  # fmt: skip


def _record_actors(record: RunRecord, stats: list[dict[str, Any]]) -> None:
    """Each actor's lane, in seconds after the run's start, and the phases they mark."""
    for s in stats:
        lane = dict(s)
        for key in LANE_TIMES:
            if key in s:
                lane[key] = None if s[key] is None else round(s[key] - record.started_at, 3)
        span = (s["last_batch_at"] or 0) - (s["first_batch_at"] or 0)
        lane["busy_while_running"] = round(s["busy_seconds"] / span, 3) if span > 0 else None
        lane["busy_seconds"] = round(s["busy_seconds"], 3)
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

    Raises a `UserError` for bad specs, settings, inputs and outputs, `BadRowsError` when more rows
    were bad than allowed, and `JobFailedError` when shards failed after their retries.
    """
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    record = RunRecord(run_id=run_id, name="")
    if started_at is not None:
        record.started_at = started_at
    record.mark("imported")
    check_settings()  # a bad BATCH_INFER_* knob stops the run before anything is written
    spec = resolve_spec(spec, overrides, date)
    # A local run drives this machine's device in its own process (`_Lane`); Ray starts
    # only for more: the other GPUs of a multi-GPU machine, or a cluster it was told to join.
    # Which device, CUDA's start and ONNX Runtime's import: found while the plan is made.
    finding: Future[str | None] | None = None
    if starts_local_ray(address) and spec.num_actors is None:
        finder = ThreadPoolExecutor(1, "batch-infer-device")
        finding = finder.submit(prepare_local, spec.backend, spec.device)
        finder.shutdown(wait=False)
    try:
        plan = build_plan(spec)  # spec, model and input schema checked: nothing started yet
        sink = OutputSink(spec.output.path, spec.output.row_group_rows)
        likely = _likely_work(sink, plan.config(), overwrite)
    except BaseException:
        if finding is not None:  # a process that exits while CUDA starts may abort
            with contextlib.suppress(Exception):
                finding.result()
        raise
    record.name, record.date, record.output = spec.name, spec.date, spec.output.path
    # A submitted run reads the copy Ray uploaded; `batch-infer submit` names the original.
    origin = os.environ.get("BATCH_INFER_MODEL_ORIGIN")
    record.model, record.model_sha256 = origin or spec.model.onnx, plan.signature.sha256
    if plan.optimized is not None:
        record.optimized = {**plan.optimized.record, "path": plan.signature.path}
    # This process's image decoders and tokenizers get ready from now on, beside the device's
    # start and the model's load: the lane's first shards wait on them.
    with InputsWarmUp(plan.decoded) as inputs:
        if finding is not None and likely:
            inputs.start()
        return _run_planned(
            plan, record, sink, finding, inputs, likely, overwrite, progress, address
        )


def _run_planned(
    plan: JobPlan,
    record: RunRecord,
    sink: OutputSink,
    finding: Future[str | None] | None,
    inputs: InputsWarmUp,
    likely: bool,
    overwrite: bool,
    progress: bool,
    address: str | None,
) -> RunRecord:
    """`run` once the plan is made: the lane on this machine's device (`finding`), Ray's
    actors where more is needed, until every shard is committed or has failed."""
    spec = plan.spec

    def prepare_output() -> tuple[list[Shard], dict[str, ShardEntry], _Work]:
        """Plan the shards and take the output."""
        shards = plan_shards(plan.dataset, spec.shard_rows, plan.check_file)  # every footer
        fingerprints = {s.id: s.fingerprint for s in shards}
        done = sink.on_write_start(record.run_id, plan.config(), fingerprints, overwrite)
        record.mark("planned")
        todo = [s for s in shards if s.id not in done]
        return shards, done, _Work(todo, record, _Progress(spec.name, len(todo), progress))

    # The shards are planned on a thread of their own from now on: while the device is found
    # (CUDA's start, ONNX Runtime's import), and then while Ray starts or the model loads.
    planner = ThreadPoolExecutor(1, "batch-infer-plan")
    planning = planner.submit(prepare_output)
    planner.shutdown(wait=False)
    ray_start, lane = None, None
    try:
        # What the lane drives: this machine's device, unless Ray's actors are asked for.
        here = None if finding is None else finding.result()
        device = here or ""
        if not here:  # no lane: Ray's actors decode for themselves
            inputs.close()
        # The lane is the whole run on the CPU, like a hand-written loop, and on one GPU: it
        # keeps the GPU as busy as an actor does, and Ray's start (10 s of a 16-core machine)
        # would only compete with it for the cores. Several GPUs: Ray's actors take over.
        wants_ray = here is None or (here == "gpu" and local_gpus() > 1)
        # What starts before the plan is made, so that it is ready when the plan is: Ray, and
        # this process's lane loading the model (not when the output is complete already).
        if (wants_ray or here) and likely:
            if wants_ray:
                ray_start = _RayStart(address)
            if here:
                lane = _Lane(plan, sink, device, inputs)
        shards, done, work = planning.result()
    except BaseException as exc:
        if lane is not None:  # a process that exits while a library loads the model aborts
            lane.stop()
            lane.wait()
        if planning.exception() is None:  # the output was taken: record why, and let it go
            sink.on_write_failed(record, exc)
            sink.record_run(record)
        raise
    if lane is None and work.pending and here:
        inputs.start()
        lane = _Lane(plan, sink, device, inputs)
    if lane is not None:
        if work.pending:
            lane.begin(work)
        else:  # nothing to run after all: the model was loaded in vain
            lane.stop()
            lane.wait()
            lane = None
    try:
        with work.bar.bar:
            try:
                record.shards_total = len(shards)
                record.shards_skipped = len(done)
                if work.pending or lane is not None:
                    if ray_start is None and (lane is None or wants_ray):
                        ray_start = _RayStart(address)
                    _execute(plan, sink, work, lane, ray_start, address)
            finally:
                if lane is not None:  # an error above: let the lane's shards commit first
                    lane.stop()
                    lane.wait()
                    if lane.stats and not record.actor_stats:  # no actor was needed
                        _record_actors(record, [lane.stats])
        sink.on_write_complete(record, [s.id for s in shards], spec.max_bad_rows)
    except BaseException as exc:
        sink.on_write_failed(record, exc)
        raise
    finally:
        sink.record_run(record)
    return record
