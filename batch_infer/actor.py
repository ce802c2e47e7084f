"""The two stages each shard goes through before it is written.

`prepare_shard` (a Ray task on any core) reads the shard, sets bad rows aside and converts
the rest to tensors; a `ShardRunner` runs the model on them: inside an `InferenceActor` (one
per GPU, or per core on a CPU-only cluster), or in the driver's own lane while Ray starts.
Results stay in the object store on their node; the driver passes references along, so the
data never flows through the driver.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from batch_infer.backends import load_backend
from batch_infer.backends.base import Feeds
from batch_infer.data.decode import decode_shard
from batch_infer.data.postprocess import Builtin, builtin_columns, hook_columns
from batch_infer.data.reading import read_rows
from batch_infer.data.sharding import Shard
from batch_infer.data.tensors import find_bad_rows, to_arrow, to_tensor
from batch_infer.errors import CudaError, UserError
from batch_infer.planning import JobPlan
from batch_infer.sink.manifest import ShardEntry

log = logging.getLogger("batch_infer")

ERROR_COLUMNS = ("_shard", "_file", "_row", "_reason")
# Each kept row carries its input row to the actor: a postprocess hook's error names it, and
# the table has a column even without `keep_columns` (a table of no columns loses its row
# count on its way through Ray's object store). The actor drops it before writing.
INPUT_ROW = "__batch_infer_row"


class ShardRunner:
    """Runs prepared shards on one loaded backend: what an inference actor does, and what
    the driver's own lane does while Ray starts. Up to `backend.concurrency` threads may
    call `run` at once. `node` and `gpu` say where it runs, for the manifest."""

    def __init__(
        self,
        plan: JobPlan,
        device: str,
        threads: int,
        lane: int,
        node: str,
        gpu: str | None,
        cuda_device: int = 0,
    ) -> None:
        self.loading_at = time.time()
        self.plan, self.lane, self.node, self.gpu = plan, lane, node, gpu
        self.first_batch_at: float | None = None
        self.last_batch_at: float | None = None
        self.backend, self.why = load_backend(
            plan.signature, plan.backend, device=device, threads=threads, gpu=cuda_device
        )
        self.loaded_at = time.time()  # the load and the warm-up apart: which one is long
        try:
            self.backend.warm_up(plan.signature.inputs[0].fixed_batch or plan.spec.batch_size)
        except CudaError:  # the device is in doubt: this runner is not ready
            self.backend.close()
            raise
        except Exception as exc:  # zeros are not real rows: the model may refuse them
            log.info("warm-up skipped: the model failed on zeros (%s)", exc)
        self.ready_at = time.time()

    def stats(self) -> dict[str, Any]:
        """This lane of the run's timeline (epoch seconds) and its device's busy time."""
        return {
            "actor": self.lane,
            "node": self.node,
            "gpu": self.gpu,
            "loading_at": self.loading_at,
            "loaded_at": self.loaded_at,
            "ready_at": self.ready_at,
            "first_batch_at": self.first_batch_at,
            "last_batch_at": self.last_batch_at,
            "busy_seconds": self.backend.busy_seconds(),
        }

    def _batches(self, feeds: Feeds, rows: int) -> Iterator[tuple[int, Feeds]]:
        """(real rows, feeds) per micro-batch. A model with a fixed batch gets full batches,
        and so does a backend that tunes per shape: a short batch padded to the full size
        costs a few ms, a new shape ~0.4 s per session on the H100 (docs/gpu.md)."""
        fixed = self.plan.signature.inputs[0].fixed_batch
        size = fixed or self.plan.spec.batch_size
        pads = self.backend.pads_batches
        for start in range(0, rows, size):
            part = {k: v[start : start + size] for k, v in feeds.items()}
            real = min(size, rows - start)
            padded = fixed or (size if pads else real)
            if padded > real:
                part = {
                    k: np.concatenate([v, np.zeros((padded - real, *v.shape[1:]), v.dtype)])
                    for k, v in part.items()
                }
            yield real, part

    def run(self, entry: ShardEntry, keep: pa.Table, feeds: Feeds) -> tuple[ShardEntry, pa.Table]:
        """Run a prepared shard; (manifest entry draft, predictions). A `CudaError` leaves the
        device in doubt: the caller retires this runner."""
        started = time.time()
        counts: list[int] = []

        def batches() -> Iterator[Feeds]:
            for real, part in self._batches(feeds, keep.num_rows):
                counts.append(real)
                if self.first_batch_at is None:
                    self.first_batch_at = time.time()
                yield part

        post = self.plan.postprocess
        wanted = self.plan.signature.outputs if post else [t for t, _ in self.plan.outputs]
        pieces: dict[str, list[np.ndarray]] = {t.name: [] for t in wanted}
        for i, result in enumerate(self.backend.run(batches())):
            for name in pieces:
                pieces[name].append(result[name][: counts[i]])
        self.last_batch_at = time.time()
        arrays = {}
        for tensor in wanted:
            if pieces[tensor.name]:
                arrays[tensor.name] = np.concatenate(pieces[tensor.name])
            else:
                shape = (0, *(max(d, 1) for d in tensor.item_shape))
                arrays[tensor.name] = np.zeros(shape, tensor.dtype)
        predictions = keep.drop_columns([c for c in keep.column_names if c == INPUT_ROW])
        for tensor, col in self.plan.outputs:
            predictions = predictions.append_column(col, to_arrow(arrays[tensor.name], tensor))
        columns: list[tuple[str, pa.Array]] = []
        if isinstance(post, Builtin):
            columns = builtin_columns(post, arrays[post.output])
        elif post is not None:
            rows = keep.column(INPUT_ROW).to_numpy()
            where = f"shard {entry.shard} ({entry.file})"
            columns = hook_columns(post, arrays, keep.num_rows, where, lambda i: int(rows[i]))
        for col, values in columns:
            predictions = predictions.append_column(col, values)
        entry = dataclasses.replace(
            entry,
            backend=self.backend.describe(),
            actor=self.lane,
            infer_started=started,
            infer_seconds=round(time.time() - started, 3),
            node=self.node,
            gpu=self.gpu,
        )
        return entry, predictions

    def close(self) -> None:
        """Release the backend's sessions, device buffers, streams and events."""
        self.backend.close()


class InferenceActor:
    """A Ray actor around a `ShardRunner`: one per GPU (or per core on a CPU-only cluster)."""

    def __init__(self, plan: JobPlan, device: str, threads: int, index: int) -> None:
        import ray  # only actors need it: the driver's lane runs without Ray

        self.error: UserError | None = None
        context = ray.get_runtime_context()
        gpu = ",".join(map(str, ray.get_gpu_ids())) or None
        try:
            self.runner = ShardRunner(plan, device, threads, index, context.get_node_id(), gpu)
        except UserError as exc:  # kept for describe(): the driver gets it as a clear error
            self.error = exc

    def describe(self) -> tuple[str, str]:
        """(backend, why it was chosen); raises the load error, if any."""
        if self.error is not None:
            raise self.error
        return self.runner.backend.describe(), self.runner.why

    def stats(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return self.runner.stats()

    def infer(self, entry: ShardEntry, keep: pa.Table, feeds: Feeds) -> tuple[ShardEntry, pa.Table]:
        if self.error is not None:
            raise self.error
        try:
            return self.runner.run(entry, keep, feeds)
        except CudaError:
            # The CUDA context may be unusable now: leave, so the driver retries the shard
            # on a fresh actor. The process exit releases device memory, streams and events.
            log.exception("CUDA error; this actor exits and its shard is retried")
            import ray

            ray.actor.exit_actor()
            raise  # not reached: exit_actor ends the process


def _kept(plan: JobPlan, table: pa.Table) -> pa.Table:
    """The columns copied to the output, with the table's rows even when there are none:
    casting to an empty schema would also drop the rows (and every prediction with them)."""
    kept = table.select(plan.keep_schema.names)
    return kept.cast(plan.keep_schema) if plan.keep_schema.names else kept


def _errors_table(
    plan: JobPlan, shard: Shard, table: pa.Table, bad: np.ndarray, reasons: list[str]
) -> pa.Table:
    """The rows that could not be converted: kept columns, where they came from, and why."""
    rows = np.flatnonzero(bad)
    errors = _kept(plan, table.filter(pa.array(bad)))
    columns = (
        pa.array([shard.id] * len(rows)),
        pa.array([shard.file.relpath] * len(rows)),
        pa.array(rows + shard.row_start),
        pa.array(reasons, pa.string()),
    )
    for name, values in zip(ERROR_COLUMNS, columns, strict=True):
        errors = errors.append_column(name, values)
    return errors


def prepare_shard(
    plan: JobPlan, shard: Shard, run_id: str, attempt: int
) -> tuple[ShardEntry, pa.Table, Feeds, pa.Table | None]:
    """Read a shard, set its bad rows aside and convert the good ones to model tensors.

    Runs as a Ray task on any free core, ahead of the actor, so decoding Parquet never
    starves the GPU. Returns (manifest entry draft, kept columns, tensors, bad rows or None).
    """
    started = time.time()
    table = read_rows(
        plan.dataset,
        shard.file,
        plan.columns,
        plan.text_columns,
        shard.row_groups,
        shard.first_row,
        shard.row_start,
        shard.row_stop,
    )
    if shard.rows is not None and shard.rows != table.num_rows:
        raise RuntimeError(f"shard {shard.id}: read {table.num_rows} rows, planned {shard.rows}")
    bad, reasons = find_bad_rows(table, list(plan.bindings))
    decoded, how = {}, ""
    if plan.decoded:  # images, texts, the preprocess hook: bad rows of their own
        where = f"shard {shard.id} ({shard.file.relpath})"
        decoded, more, how = decode_shard(
            plan.decoded, table, plan.dataset, shard.file.path, where, shard.row_start
        )
        if more:
            why = np.full(table.num_rows, "", dtype=object)
            why[bad] = reasons
            for row, reason in more.items():
                if not why[row]:
                    why[row] = reason
            bad = why != ""
            reasons = why[bad].tolist()
    good = table.filter(pa.array(~bad)) if bad.any() else table
    rows = np.flatnonzero(~bad) + shard.row_start
    keep = _kept(plan, good).append_column(INPUT_ROW, pa.array(rows, pa.int64()))
    feeds = {b.tensor.name: to_tensor(good, b) for b in plan.bindings}
    feeds |= {name: array[~bad] if bad.any() else array for name, array in decoded.items()}
    errors = _errors_table(plan, shard, table, bad, reasons) if bad.any() else None
    entry = ShardEntry(
        shard=shard.id,
        file=shard.file.relpath,
        row_start=shard.row_start,
        row_stop=shard.row_start + table.num_rows,
        rows=table.num_rows,
        good_rows=good.num_rows,
        bad_rows=int(bad.sum()),
        input_fingerprint=shard.fingerprint,
        model_sha256=plan.signature.sha256,
        run=run_id,
        attempt=attempt,
        prepare_started=started,
        prepare_seconds=round(time.time() - started, 3),
        preprocess=how,
    )
    return entry, keep, feeds, errors


def threads_for(num_cpus: float) -> int:
    return max(1, math.floor(num_cpus))
