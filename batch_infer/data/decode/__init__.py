"""Model inputs that are not tensors yet: images to decode, texts to tokenize, and inputs a
user's preprocess hook makes from the shard's columns.

`plan_image` / `plan_text` / `plan_hook` check a spec's input forms against the model and
the input's schema before any work (one-line SpecError each); `decode_shard` runs in the
prepare stage and turns a shard into arrays plus bad rows with their reasons.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from batch_infer.data.decode.hooks import check_array, load_hook, run_hook, split_result
from batch_infer.data.decode.images import (
    ImageDecode,
    decode_images,
    describe_size,
    item_shape,
    warm_up_images,
)
from batch_infer.data.decode.text import (
    TextEncode,
    encode,
    load_tokenizer,
    pad_token,
    tokenizers_version,
)
from batch_infer.errors import HookError, InputError, SpecError, one_line
from batch_infer.location import absolute, open_location
from batch_infer.model import TensorInfo

log = logging.getLogger("batch_infer")


@dataclass(frozen=True)
class FromHook:
    """A model input the preprocess hook returns."""

    function: str

    def config(self) -> dict[str, Any]:
        return {"preprocess": self.function}


@dataclass(frozen=True)
class DecodedInput:
    """One model input made by a decoder, a tokenizer or the preprocess hook."""

    tensor: TensorInfo
    source: ImageDecode | TextEncode | FromHook

    @property
    def columns(self) -> tuple[str, ...]:
        return () if isinstance(self.source, FromHook) else (self.source.column,)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _column_type(schema: pa.Schema, column: str, tensor: TensorInfo, where: str) -> pa.DataType:
    if column not in schema.names:
        raise SpecError(
            f"{where}: column {column!r} (for model input {tensor.name!r}) is not in the input; "
            f"columns are: {', '.join(schema.names)}"
        )
    return schema.field(column).type


def _shape(tensor: TensorInfo) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in tensor.shape) + "]"


def plan_image(tensor: TensorInfo, form: Any, schema: pa.Schema, where: str) -> DecodedInput:
    """Check an image input (column type, size, layout, dtype) against the model's input."""
    t = _column_type(schema, form.column, tensor, where)
    if not (_is_binary(t) or _is_string(t)):
        raise SpecError(
            f"{where}: column {form.column!r} is {t}; an image column holds encoded bytes "
            "(binary, large_binary) or file paths/URIs (string)"
        )
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise SpecError(
            f"{where}: decoding images needs Pillow: pip install 'batch-infer[images]'"
        ) from None
    d = ImageDecode(
        column=form.column,
        height=form.size[0],
        width=form.size[1],
        resize=form.resize,
        layout=form.layout,
        channels=form.channels,
        device=form.device,
        from_paths=_is_string(t),
    )
    need = f"model input {tensor.name!r} takes {tensor.dtype} of shape {_shape(tensor)}"
    if tensor.dtype != np.dtype(form.dtype):
        raise SpecError(f"{where}: dtype {form.dtype}, but {need}")
    item = item_shape(d)
    if len(tensor.item_shape) != 3 or any(
        m > 0 and m != s for m, s in zip(tensor.item_shape, item, strict=True)
    ):
        raise SpecError(
            f"{where}: size {list(form.size)}, {form.layout}, {form.channels} makes "
            f"{describe_size(d)}, but {need}"
        )
    return DecodedInput(tensor, d)


def _read_text(path: str, key: str) -> tuple[str, str]:
    """(resolved path, the file's text) for a file a spec names (local or URI)."""
    shown = absolute(path)
    where = open_location(shown, key, SpecError)
    try:
        with where.filesystem.open_input_stream(where.root) as f:
            data = f.read()
    except FileNotFoundError:
        raise SpecError(f"{key}: {shown}: no such file") from None
    except (OSError, pa.ArrowException) as exc:
        raise SpecError(f"{key}: {shown}: cannot read it ({exc})") from None
    try:
        return shown, data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{key}: {shown}: not UTF-8 text") from None


def plan_text(tensor: TensorInfo, form: Any, schema: pa.Schema, where: str) -> DecodedInput:
    """Check a text input: a text column, a tokenizer that loads, an integer [N, L] input
    whose L agrees with max_length and padding."""
    t = _column_type(schema, form.column, tensor, where)
    if not _is_string(t):
        raise SpecError(f"{where}: column {form.column!r} is {t}; a text column holds strings")
    field = form.field or tensor.name
    if field not in ("input_ids", "attention_mask", "token_type_ids"):
        raise SpecError(
            f"{where}: model input {tensor.name!r} is not an encoding field; name one with "
            "field: input_ids | attention_mask | token_type_ids"
        )
    need = f"model input {tensor.name!r} takes {tensor.dtype} of shape {_shape(tensor)}"
    if tensor.dtype.kind not in "iu" or len(tensor.item_shape) != 1:
        raise SpecError(f"{where}: tokens are integers [N, length], but {need}")
    length = tensor.item_shape[0]
    if length > 0 and (form.padding != "max_length" or form.max_length != length):
        raise SpecError(
            f"{where}: {need}: set max_length: {length} and padding: max_length "
            f"(got max_length {form.max_length}, padding {form.padding})"
        )
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise SpecError(
            f"{where}: tokenizing needs tokenizers: pip install 'batch-infer[text]'"
        ) from None
    path, text = _read_text(form.tokenizer, f"{where}.tokenizer")
    try:
        tokenizer = load_tokenizer(text)
    except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
        raise SpecError(
            f"{where}.tokenizer: {path}: not a tokenizer.json ({one_line(exc)})"
        ) from None
    pad = pad_token(tokenizer)
    if pad is None:
        raise SpecError(
            f"{where}.tokenizer: {path}: sets no padding and has no pad token "
            "([PAD], <pad>) to pad with"
        )
    source = TextEncode(
        column=form.column,
        tokenizer_json=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        max_length=form.max_length,
        padding=form.padding,
        truncation=form.truncation,
        field=field,
        pad_id=pad[0],
        pad_token=pad[1],
    )
    return DecodedInput(tensor, source)


def plan_hook(name: str, tensors: list[TensorInfo]) -> list[DecodedInput]:
    """The model inputs no column feeds come from the preprocess hook; it must import."""
    load_hook(name, "model.preprocess")
    return [DecodedInput(t, FromHook(name)) for t in tensors]


def read_labels(path: str) -> tuple[str, ...]:
    """Labels from a text file, one per line (blank lines dropped at the end only: a
    class's index is its line's)."""
    _, text = _read_text(path, "model.postprocess.labels")
    labels = text.splitlines()
    while labels and not labels[-1].strip():
        labels.pop()
    if not labels:
        raise SpecError(f"model.postprocess.labels: {path}: holds no labels")
    return tuple(labels)


class InputsWarmUp:
    """This process's image decoders and tokenizers made ready on a thread of their own once
    `start` is called (a local run's own process: from when the plan is made, beside the
    device's start and the model's load), since the first shards wait on them. A failure is
    left to the shards to report. Leaving the `with` block waits for it."""

    def __init__(self, decoded: tuple[DecodedInput, ...]) -> None:
        self.decoded = decoded
        self.ready_at: float | None = None  # epoch seconds: each input readied (or failed)
        self._started = False
        self._stop, self._done = threading.Event(), threading.Event()

    def start(self) -> None:
        """Start (once), if there is anything to ready."""
        if self.decoded and not self._started and not self._stop.is_set():
            threading.Thread(target=self._main, name="batch-infer-inputs", daemon=True).start()
            self._started = True

    def times(self) -> dict[str, float | None]:
        """For the run record's stats of this process's lane."""
        return {"inputs_ready_at": self.ready_at} if self._started else {}

    def _main(self) -> None:
        try:
            self._ready()
        finally:
            self._done.set()

    def _ready(self) -> None:
        for d in self.decoded:
            with _logged_failure():
                if isinstance(d.source, ImageDecode):
                    warm_up_images(d.source)
                elif isinstance(d.source, TextEncode):
                    encode(pa.array(["warm up"]), d.source)
        self.ready_at = time.time()

    def close(self) -> None:
        """Start no warm-up from now on, and wait for one under way: a process that exits
        while CUDA starts may abort. (An Event, as `job._Lane.done`, not Thread.join.)"""
        self._stop.set()
        while self._started and not self._done.wait(0.5):
            pass

    def __enter__(self) -> InputsWarmUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _logged_failure() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        log.info("input warm-up skipped (%s: %s)", type(exc).__name__, exc)


def decode_shard(
    decoded: tuple[DecodedInput, ...],
    table: pa.Table,
    dataset: Any,
    file_path: str,
    where: str,
    row_start: int,
) -> tuple[dict[str, np.ndarray], dict[int, str], str]:
    """({input: [rows, ...] array}, {row: reason}, how it was decoded) for one shard.

    Arrays have a row for every row of `table`; rows with a reason hold filler. Relative
    image paths are looked up beside `file_path` on the input's filesystem. `where` names
    the shard in a hook's error, and `row_start` is its first row in the file."""
    feeds: dict[str, np.ndarray] = {}
    reasons: dict[int, str] = {}
    used: list[str] = []
    encodings: dict[tuple, dict[str, np.ndarray]] = {}
    hook_inputs = [d for d in decoded if isinstance(d.source, FromHook)]
    for d in decoded:
        src = d.source
        if isinstance(src, ImageDecode):
            column = table.column(src.column).combine_chunks()
            try:
                pixels, bad, how = decode_images(
                    column, src, dataset.filesystem, posixpath.dirname(file_path)
                )
            except InputError as exc:  # a store that cannot be read: which shard waits on it
                raise InputError(f"{where}: {exc}") from None
            feeds[d.tensor.name] = pixels.astype(d.tensor.dtype, copy=False)
            used.append(f"{d.tensor.name}: {how}")
        elif isinstance(src, TextEncode):
            if src.key not in encodings:
                column = table.column(src.column).combine_chunks()
                encodings[src.key], bad = encode(column, src)
                used.append(f"{src.column}: tokenizers {tokenizers_version()}")
            else:
                bad = {}
            feeds[d.tensor.name] = encodings[src.key][src.field].astype(d.tensor.dtype)
        else:
            continue
        for i, why in bad.items():
            reasons.setdefault(i, why)
    if hook_inputs:
        name = hook_inputs[0].source.function  # type: ignore[union-attr]
        fn = load_hook(name, "model.preprocess")
        rows = table.num_rows
        result = run_hook(
            fn,
            name,
            "preprocess",
            where,
            table,
            rows,
            lambda k: table.slice(0, k),
            lambda i: row_start + i,
        )
        what = f"preprocess hook {name} on {where}"
        arrays, bad = split_result(result, rows, what)
        wanted = {d.tensor.name: d.tensor for d in hook_inputs}
        extra = sorted(set(arrays) - set(wanted))
        missing = sorted(set(wanted) - set(arrays))
        if extra or missing:
            fed = ", ".join(sorted(wanted))
            problem = f"returned {extra[0]!r}" if extra else f"did not return {missing[0]!r}"
            raise HookError(f"{what}: {problem}; it feeds the model inputs no column feeds: {fed}")
        for key, tensor in wanted.items():
            feeds[key] = check_array(
                arrays[key], rows, tensor.dtype, tensor.item_shape, f"{what}: {key!r}"
            )
        for i, why in bad.items():
            reasons.setdefault(i, f"preprocess: {why}")
        used.append(f"preprocess: {name}")
    return feeds, reasons, "; ".join(used)
