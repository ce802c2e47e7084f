"""Model outputs -> the columns a user wants: built-in label and score (softmax, argmax,
top k, a labels file), or a user's postprocess hook. Runs in the actor, after the model;
the built-ins are vectorized in NumPy and Arrow (no per-row Python)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch_infer.data.decode.hooks import load_hook, run_hook
from batch_infer.data.tensors import to_arrow
from batch_infer.errors import HookError, one_line
from batch_infer.model import TensorInfo

BUILTIN_COLUMNS = ("label", "score", "top_labels", "top_scores")


@dataclass(frozen=True)
class Builtin:
    """Label and score from one output of class scores, [N, classes]."""

    output: str
    softmax: bool
    top_k: int
    labels: tuple[str, ...] | None

    @property
    def columns(self) -> tuple[str, ...]:
        return BUILTIN_COLUMNS if self.top_k > 1 else BUILTIN_COLUMNS[:2]

    def config(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "softmax": self.softmax,
            "top_k": self.top_k,
            "labels": list(self.labels) if self.labels else None,
        }


@dataclass(frozen=True)
class Hook:
    """A user's function: {model output name: array} -> {column: values}."""

    function: str

    def config(self) -> dict[str, Any]:
        return {"postprocess": self.function}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def builtin_columns(b: Builtin, scores: np.ndarray) -> list[tuple[str, pa.Array]]:
    """label (a string with labels, else the class index), score (float32) and, for top_k
    above 1, top_labels and top_scores as fixed-size lists, best first."""
    n, classes = scores.shape[0], scores.shape[-1]
    x = scores.reshape(n, classes).astype(np.float32, copy=False)
    if b.softmax:
        x = softmax(x)
    k = min(b.top_k, classes)
    if k == 1:
        top = x.argmax(axis=1)[:, None]
    else:
        part = np.argpartition(-x, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(x, part, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)
    top_scores = np.take_along_axis(x, top, axis=1)
    flat = pa.array(top.reshape(-1).astype(np.int64))
    names = pc.take(pa.array(b.labels, pa.string()), flat) if b.labels else flat
    first = pc.list_element(pa.FixedSizeListArray.from_arrays(names, k), 0) if n else names
    columns = [("label", first), ("score", pa.array(top_scores[:, 0]))]
    if b.top_k > 1:
        columns += [
            ("top_labels", pa.FixedSizeListArray.from_arrays(names, k)),
            ("top_scores", pa.FixedSizeListArray.from_arrays(pa.array(top_scores.reshape(-1)), k)),
        ]
    return columns


def _column(values: Any, rows: int, what: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        try:
            arr = np.asarray(values)
        except ValueError:  # rows of different lengths: Arrow's lists hold them
            arr = np.empty(len(values), object)
            for i, v in enumerate(values):
                arr[i] = v
        if arr.ndim == 0:
            raise HookError(f"{what}: returned a scalar, not one value per row")
        try:
            if arr.dtype == object or arr.dtype.kind in "US":
                values = pa.array(arr.tolist())
            else:
                values = to_arrow(arr, TensorInfo("", arr.dtype, arr.shape))
        except (pa.ArrowException, TypeError, ValueError) as exc:  # no retry makes it fit
            cause = f"{type(exc).__name__}: {one_line(exc)}"
            raise HookError(f"{what}: not a Parquet column ({cause})") from None
    if len(values) != rows:
        raise HookError(f"{what}: returned {len(values)} values for {rows} rows")
    return values


def hook_columns(
    h: Hook, outputs: dict[str, np.ndarray], rows: int, where: str, row_of: Any
) -> list[tuple[str, pa.Array]]:
    """Run the user's postprocess on a shard's outputs (`row_of(i)`: the input row of
    prediction i, for an error) and make its values columns."""
    fn = load_hook(h.function, "model.postprocess")

    def prefix(k: int) -> dict[str, np.ndarray]:
        return {name: a[:k] for name, a in outputs.items()}

    result = run_hook(fn, h.function, "postprocess", where, outputs, rows, prefix, row_of)
    what = f"postprocess hook {h.function} on {where}"
    if not isinstance(result, dict) or not result:
        raise HookError(f"{what}: returned {type(result).__name__}; expected a dict of columns")
    return [(str(col), _column(v, rows, f"{what}: {col!r}")) for col, v in result.items()]
