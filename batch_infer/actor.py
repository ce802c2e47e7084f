"""The inference actor: reads a shard, converts it, runs the model, returns the tables.

Its returns stay in the object store on its node; the driver passes them on to a writer
without ever fetching them, so the data never flows through the driver.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from batch_infer.backends import load_backend
from batch_infer.backends.base import Feeds
from batch_infer.errors import UserError
from batch_infer.planning import JobPlan
from batch_infer.reading import read_rows
from batch_infer.sharding import Shard
from batch_infer.tensors import to_arrow, to_tensor

ERROR_COLUMNS = ("_shard", "_file", "_row", "_reason")


class InferenceActor:
    """Loads the model once; then processes shards one at a time."""

    def __init__(self, plan: JobPlan, device: str, threads: int) -> None:
        self.plan = plan
        self.error: UserError | None = None
        try:
            self.backend, self.why = load_backend(
                plan.spec, plan.signature, device=device, threads=threads
            )
        except UserError as exc:  # kept for describe(): the driver gets it as a clear error
            self.error = exc

    def describe(self) -> tuple[str, str]:
        """(backend, why it was chosen); raises the load error, if any."""
        if self.error is not None:
            raise self.error
        return self.backend.describe(), self.why

    def _feeds(self, table: pa.Table) -> Iterator[tuple[int, Feeds]]:
        """(real rows, feeds) per micro-batch; a model with a fixed batch gets padded batches."""
        fixed = self.plan.bindings[0].tensor.fixed_batch
        size = fixed or self.plan.spec.batch_size
        for start in range(0, table.num_rows, size):
            part = table.slice(start, size)
            feeds = {b.tensor.name: to_tensor(part, b) for b in self.plan.bindings}
            if fixed and part.num_rows < fixed:
                pad = fixed - part.num_rows
                feeds = {
                    k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                    for k, v in feeds.items()
                }
            yield part.num_rows, feeds

    def _infer(self, table: pa.Table) -> dict[str, pa.Array]:
        counts: list[int] = []

        def batches() -> Iterator[Feeds]:
            for rows, feeds in self._feeds(table):
                counts.append(rows)
                yield feeds

        names = {t.name: (t, col) for t, col in self.plan.outputs}
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for i, result in enumerate(self.backend.run(batches())):
            for name in names:
                pieces[name].append(result[name][: counts[i]])
        columns = {}
        for name, (tensor, col) in names.items():
            if pieces[name]:
                columns[col] = to_arrow(np.concatenate(pieces[name]), tensor)
            else:
                empty = np.zeros((0, *(max(d, 1) for d in tensor.item_shape)), tensor.dtype)
                columns[col] = to_arrow(empty, tensor)
        return columns

    def process(
        self, shard: Shard, run_id: str, attempt: int
    ) -> tuple[dict[str, Any], pa.Table, pa.Table | None]:
        """(manifest entry draft, predictions, bad rows or None)."""
        from batch_infer.tensors import find_bad_rows

        started = time.time()
        plan = self.plan
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
        bad, reasons = find_bad_rows(table, list(plan.bindings))
        good = table.filter(pa.array(~bad)) if bad.any() else table
        keep = good.select(plan.keep_schema.names).cast(plan.keep_schema)
        predictions = keep
        for col, array in self._infer(good).items():
            predictions = predictions.append_column(col, array)
        errors = None
        if bad.any():
            rows = np.flatnonzero(bad)
            errors = (
                table.filter(pa.array(bad)).select(plan.keep_schema.names).cast(plan.keep_schema)
            )
            for name, values in zip(
                ERROR_COLUMNS,
                (
                    pa.array([shard.id] * len(rows)),
                    pa.array([shard.file.relpath] * len(rows)),
                    pa.array(rows + shard.row_start),
                    pa.array(reasons, pa.string()),
                ),
                strict=True,
            ):
                errors = errors.append_column(name, values)
        entry = {
            "shard": shard.id,
            "file": shard.file.relpath,
            "row_start": shard.row_start,
            "row_stop": shard.row_start + table.num_rows,
            "rows": table.num_rows,
            "good_rows": good.num_rows,
            "bad_rows": int(bad.sum()),
            "input_fingerprint": shard.fingerprint,
            "model_sha256": plan.signature.sha256,
            "backend": self.backend.describe(),
            "run": run_id,
            "attempt": attempt,
            "seconds": round(time.time() - started, 3),
            "node": ray.get_runtime_context().get_node_id(),
            "gpu": ",".join(map(str, ray.get_gpu_ids())) or None,
        }
        if shard.rows is not None and shard.rows != table.num_rows:
            raise RuntimeError(
                f"shard {shard.id}: read {table.num_rows} rows, planned {shard.rows}"
            )
        return entry, predictions, errors


def threads_for(num_cpus: float) -> int:
    return max(1, math.floor(num_cpus))
