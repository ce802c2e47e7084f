"""User hooks: `package.module:function`, imported where they run (prepare tasks, actors).

A hook that raises fails its shard with one line naming the hook, the shard and the first
row it fails on (found by running it again on shorter prefixes of the shard), so nothing of
that shard is committed and the user knows which row to look at.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from batch_infer.errors import HookError, SpecError, one_line


def load_hook(name: str, key: str) -> Callable[..., Any]:
    """The function `name` names; a SpecError (for `key`) when it cannot be imported."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself raised while importing
        raise SpecError(
            f"{key}: {name!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise SpecError(f"{key}: {name!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise SpecError(f"{key}: {name!r} is not a function")
    return fn


def first_failing_row(call: Callable[[int], Any], rows: int) -> int | None:
    """The index of the first row the hook fails on: the last row of the shortest prefix
    `call(k)` (the hook on the first k rows) raises on, by bisection (the whole raised)."""
    if rows == 0:
        return None
    lo, hi = 1, rows
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            call(mid)
        except Exception:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def run_hook(
    fn: Callable[[Any], Any],
    name: str,
    kind: str,
    where: str,
    value: Any,
    rows: int,
    prefix: Callable[[int], Any],
    row_of: Callable[[int], int],
) -> Any:
    """`fn(value)`; if it raises, a HookError naming the `kind` hook `name`, `where` (the
    shard) and the first row it fails on: `prefix(k)` is `value`'s first k rows, `row_of(i)`
    the input row (in its file) that row i of `value` came from."""
    try:
        return fn(value)
    except Exception as exc:
        cause = f"{type(exc).__name__}: {one_line(exc)}"
        row = first_failing_row(lambda k: fn(prefix(k)), rows)
        at = f"first at row {row_of(row)}" if row is not None else "with no rows"
        raise HookError(f"{kind} hook {name} failed on {where}, {at}: {cause}") from None


def check_array(
    value: Any, rows: int, dtype: np.dtype | None, item: tuple[int, ...] | None, what: str
) -> np.ndarray:
    """A hook's array, one row per row: cast to `dtype` where no value changes kind, with
    `item` (the model input's row shape, -1 dynamic) checked; HookError otherwise."""
    arr = np.asarray(value)
    if arr.ndim == 0 or arr.shape[0] != rows:
        got = "a scalar" if arr.ndim == 0 else f"{arr.shape[0]} rows"
        raise HookError(f"{what}: returned {got} for {rows} rows")
    fits = item is None or (
        len(arr.shape) - 1 == len(item)
        and all(d < 0 or d == g for d, g in zip(item, arr.shape[1:], strict=True))
    )
    if not fits:
        shape = "[N, " + ", ".join("?" if d < 0 else str(d) for d in item or ()) + "]"
        raise HookError(f"{what}: returned shape {list(arr.shape)}, the model takes {shape}")
    if dtype is not None and arr.dtype != dtype:
        if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
            raise HookError(f"{what}: returned {arr.dtype}, the model takes {dtype}")
        arr = arr.astype(dtype)
    return np.ascontiguousarray(arr)


def split_result(value: Any, rows: int, what: str) -> tuple[dict[str, Any], dict[int, str]]:
    """A hook's result: a dict, or (dict, reasons) with a reason (str) or None per row."""
    reasons: dict[int, str] = {}
    if isinstance(value, tuple) and len(value) == 2:
        value, why = value
        why = list(why)
        if len(why) != rows:
            raise HookError(f"{what}: returned {len(why)} bad-row reasons for {rows} rows")
        reasons = {i: str(r) for i, r in enumerate(why) if r}
    if not isinstance(value, dict):
        raise HookError(
            f"{what}: returned {type(value).__name__}; expected a dict of arrays, or "
            "(dict, reasons)"
        )
    return value, reasons
