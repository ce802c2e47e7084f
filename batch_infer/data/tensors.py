"""Arrow columns <-> model tensors.

Rows that cannot become a tensor (null, wrong number of values, text that is not a number,
an integer that does not fit) are found for a whole shard at once, with a reason per row,
before any batch is converted; conversion then runs on good rows only, batch by batch.
Everything is vectorized: no per-row Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch_infer.errors import InputError
from batch_infer.model import TensorInfo

# A decimal number as text, with optional sign, fraction and exponent (also inf and nan).
_NUMBER = r"^\s*[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)\s*$"
# Text that may feed an integer input: digits only, so nothing is truncated.
_INTEGER = r"^\s*[-+]?\d+\s*$"


@dataclass(frozen=True)
class InputBinding:
    """One model input fed from one column, or from several scalar columns stacked."""

    tensor: TensorInfo
    columns: tuple[str, ...]
    stacked: bool

    @property
    def label(self) -> str:
        cols = ", ".join(self.columns)
        return f"input {self.tensor.name!r} (from {'[' + cols + ']' if self.stacked else cols})"

    def fixed_count(self) -> int | None:
        """Values per row the model needs, or None when a row dimension is dynamic."""
        dims = self.tensor.item_shape
        return math.prod(dims) if all(d > 0 for d in dims) else None


def _is_stringy(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _leaf(t: pa.DataType) -> pa.DataType:
    while _is_list(t):
        t = t.value_type
    return t


def _leaf_fits(leaf: pa.DataType, target: np.dtype, text: bool) -> str | None:
    """None if values of `leaf` can feed `target`, else why not. `text`: the format stores
    numbers as text (CSV), so text is parsed per row and one that is not a number makes a
    bad row; in a typed format (Parquet, Arrow) a text column is a mistake in the spec."""
    if _is_stringy(leaf):
        return None if text else f"{leaf} is text, not numbers (only CSV is parsed per row)"
    if pa.types.is_boolean(leaf):
        return None
    if pa.types.is_integer(leaf):
        return None if target.kind in "iuf" else f"{leaf} cannot feed {target}"
    if pa.types.is_floating(leaf) or pa.types.is_decimal(leaf):
        if target.kind == "f":
            return None
        return f"{leaf} would be truncated to {target}; cast the column or the model input"
    return f"{leaf} is not numeric"


def check_binding(binding: InputBinding, schema: pa.Schema, where: str, text: bool = False) -> None:
    """Raise a clear error when the columns cannot feed the model input, from the schema alone.
    `text`: the input format keeps numbers as text (CSV)."""
    tensor = binding.tensor
    dims = tensor.item_shape
    shape = "[" + ", ".join("?" if d < 0 else str(d) for d in tensor.shape) + "]"
    need = f"{tensor.name!r} takes {tensor.dtype} of shape {shape}"
    for col in binding.columns:
        if col not in schema.names:
            raise InputError(
                f"{where}: column {col!r} (for model input {tensor.name!r}) is not in the input; "
                f"columns are: {', '.join(schema.names)}"
            )
    if sum(1 for d in dims if d < 0) > 1:
        raise InputError(f"{where}: model input {need}: more than one dynamic row dimension")
    if binding.stacked:
        if binding.fixed_count() != len(binding.columns):
            raise InputError(
                f"{where}: {len(binding.columns)} stacked columns cannot fill model input {need}"
            )
        for col in binding.columns:
            t = schema.field(col).type
            why = (
                "a list column cannot be stacked"
                if _is_list(t)
                else _leaf_fits(t, tensor.dtype, text)
            )
            if why:
                raise InputError(f"{where}: column {col!r} ({t}) for model input {need}: {why}")
        return
    col = binding.columns[0]
    t = schema.field(col).type
    if _is_binary(t):
        if pa.types.is_fixed_size_binary(t):
            count = binding.fixed_count()
            if count is not None and t.byte_width != count * tensor.dtype.itemsize:
                raise InputError(
                    f"{where}: column {col!r} holds {t.byte_width} bytes per row; model input "
                    f"{need} needs {count * tensor.dtype.itemsize}"
                )
        return
    if not _is_list(t) and binding.fixed_count() != 1:
        raise InputError(
            f"{where}: column {col!r} is a scalar ({t}); model input {need} needs "
            "a list column, a binary column, or a list of columns to stack"
        )
    if pa.types.is_fixed_size_list(t) and binding.fixed_count() is not None:
        count, inner = 1, t
        while pa.types.is_fixed_size_list(inner):
            count, inner = count * inner.list_size, inner.value_type
        if not _is_list(inner) and count != binding.fixed_count():
            raise InputError(
                f"{where}: column {col!r} holds {count} values per row; "
                f"model input {need} needs {binding.fixed_count()}"
            )
    why = _leaf_fits(_leaf(t), tensor.dtype, text)
    if why:
        raise InputError(f"{where}: column {col!r} ({t}) for model input {need}: {why}")


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def _explode(arr: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Flatten nested lists: (leaf values, values per row, row has a null anywhere)."""
    n = len(arr)
    null = arr.is_null().to_numpy(zero_copy_only=False)
    counts = np.ones(n, dtype=np.int64)
    items_per_row = counts  # how many items of the current level belong to each row
    level = 0
    cur = arr
    while _is_list(cur.type):
        lengths = pc.fill_null(pc.list_value_length(cur), 0).to_numpy().astype(np.int64)
        if level > 0 and cur.null_count:  # a null inner list: its row is bad
            item_rows = np.repeat(np.arange(n), items_per_row)
            null |= np.bincount(
                item_rows[cur.is_null().to_numpy(zero_copy_only=False)], minlength=n
            ).astype(bool)
        if level == 0:
            counts = lengths
        else:
            item_rows = np.repeat(np.arange(n), items_per_row)
            counts = np.bincount(item_rows, weights=lengths, minlength=n).astype(np.int64)
        items_per_row = counts
        cur = cur.flatten()
        level += 1
    if level and cur.null_count:
        value_rows = np.repeat(np.arange(n), counts)
        null |= np.bincount(
            value_rows[cur.is_null().to_numpy(zero_copy_only=False)], minlength=n
        ).astype(bool)
    return cur, counts, null


def _bad_values_rows(values: pa.Array, counts: np.ndarray, bad_values: np.ndarray) -> np.ndarray:
    """Map a mask over leaf values back to a mask over rows."""
    rows = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(rows[bad_values], minlength=len(counts)).astype(bool)


def _value_problems(values: pa.Array, target: np.dtype) -> list[tuple[np.ndarray, str]]:
    """Masks over leaf values that cannot become `target`, each with why."""
    info = np.iinfo(target) if target.kind in "iu" else None
    if _is_stringy(values.type):
        ok = pc.match_substring_regex(values, _INTEGER if info else _NUMBER, ignore_case=True)
        ok = pc.fill_null(ok, True)
        why = "is not an integer" if info else "is not a number"
        problems = [(~ok.to_numpy(zero_copy_only=False), why)]
        if info is None:
            return problems
        # in range? Text may hold any number of digits: parsed as float64, exact below 2**53,
        # and the few values past that compared as Python ints
        text = pc.if_else(ok, pc.utf8_trim_whitespace(pc.fill_null(values, "0")), "0")
        v = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
        out = (v < info.min) | (v > info.max)
        if (near := np.flatnonzero(np.abs(v) >= 2.0**53)).size:
            exact = (int(t) for t in pc.take(text, pa.array(near)).to_pylist())
            out[near] = [not info.min <= x <= info.max for x in exact]
        return [*problems, (out, f"has a value outside the range of {target}")]
    if info is not None and pa.types.is_integer(values.type):
        src = np.iinfo(values.type.to_pandas_dtype())
        if src.min >= info.min and src.max <= info.max:
            return []
        v = values.to_numpy(zero_copy_only=False)
        return [((v < info.min) | (v > info.max), f"has a value outside the range of {target}")]
    return []


def find_bad_rows(table: pa.Table, bindings: list[InputBinding]) -> tuple[np.ndarray, list[str]]:
    """For each row: is it bad, and the first reason (empty string for good rows)."""
    n = table.num_rows
    reasons = np.full(n, "", dtype=object)

    def mark(mask: np.ndarray, reason: str) -> None:
        fresh = mask & (reasons == "")
        reasons[fresh] = reason

    for b in bindings:
        for col in b.columns:
            arr = _column(table, col)
            if _is_binary(arr.type):
                lengths = pc.fill_null(pc.binary_length(arr), 0).to_numpy().astype(np.int64)
                mark(arr.is_null().to_numpy(zero_copy_only=False), f"{col}: null")
                size = b.tensor.dtype.itemsize
                expect = b.fixed_count()
                if expect is None:
                    expect = _shard_count(lengths[reasons == ""] // size, b)
                mark(
                    lengths != expect * size,
                    f"{col}: has a byte length other than {expect * size} ({b.label})",
                )
                continue
            values, counts, null = _explode(arr)
            mark(null, f"{col}: null" if not _is_list(arr.type) else f"{col}: null or holds nulls")
            if not b.stacked:
                expect = b.fixed_count()
                if expect is None:
                    expect = _shard_count(counts[reasons == ""], b)
                mark(counts != expect, f"{col}: does not have {expect} values ({b.label})")
            for mask, why in _value_problems(values, b.tensor.dtype):
                if mask.any():
                    mark(_bad_values_rows(values, counts, mask), f"{col}: {why}")
    bad = reasons != ""
    return bad, reasons[bad].tolist()


def _shard_count(counts: np.ndarray, b: InputBinding) -> int:
    """With a dynamic row dimension, the first row that fits the item shape sets the length
    for the shard (an empty or odd first row is a bad row, not the measure of the others)."""
    fixed = math.prod(d for d in b.tensor.item_shape if d > 0)
    fits = counts[(counts > 0) & (counts % fixed == 0)]
    return int(fits[0]) if fits.size else fixed


def _leaf_numpy(values: pa.Array, dtype: np.dtype) -> np.ndarray:
    if _is_stringy(values.type):  # bad rows are gone: every value parses
        parsed = pa.int64() if dtype.kind in "iu" else pa.float64()
        values = pc.cast(pc.utf8_trim_whitespace(values), parsed)
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def binary_offsets(arr: pa.Array) -> np.ndarray:
    """Where each row of a binary or large_binary array starts in its data buffer, and
    where the last ends (len + 1 values; a sliced array's own rows)."""
    width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    return np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1]


def _binary_numpy(arr: pa.Array, dtype: np.dtype) -> np.ndarray:
    """The bytes of a (fixed-size) binary column as one array, without a per-row loop."""
    if pa.types.is_fixed_size_binary(arr.type):
        width = arr.type.byte_width
        data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
        raw = data[arr.offset * width : (arr.offset + len(arr)) * width]
    else:
        offsets = binary_offsets(arr)
        raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return raw.view(dtype)


def to_tensor(table: pa.Table, b: InputBinding) -> np.ndarray:
    """Convert good rows to the model input's dtype and shape (batch first)."""
    n = table.num_rows
    dtype = b.tensor.dtype
    if b.stacked:
        flat = np.column_stack([_leaf_numpy(_column(table, c), dtype) for c in b.columns])
    else:
        arr = _column(table, b.columns[0])
        if _is_binary(arr.type):
            flat = _binary_numpy(arr, dtype)
        else:
            values, _, _ = _explode(arr)
            flat = _leaf_numpy(values, dtype)
    if n == 0:
        return np.zeros((0, *(max(d, 1) for d in b.tensor.item_shape)), dtype=dtype)
    dims = [d if d > 0 else -1 for d in b.tensor.item_shape]
    return np.ascontiguousarray(flat.reshape(n, *dims))


def to_arrow(array: np.ndarray, tensor: TensorInfo) -> pa.Array:
    """A model output as a column: scalar for [N] / [N,1], (nested) fixed-size lists otherwise."""
    n = array.shape[0]
    item = tensor.item_shape
    if item in ((), (1,)):
        return pa.array(array.reshape(n))
    out: pa.Array = pa.array(array.reshape(-1))
    for i in range(len(item) - 1, -1, -1):
        size = array.shape[i + 1]
        if item[i] > 0:
            out = pa.FixedSizeListArray.from_arrays(out, size)
        else:  # a dynamic dimension: lists, so batches of other sizes keep one schema
            offsets = pa.array(np.arange(0, len(out) + 1, size, dtype=np.int32))
            out = pa.ListArray.from_arrays(offsets, out)
    return out
