"""A text column -> token tensors, with Hugging Face `tokenizers` (Rust, batch encode).

The tokenizer's JSON travels in the plan, so workers need no access to the file; each
process builds it once. A shard's texts are encoded once per (column, tokenizer, settings),
and each model input takes the field of the encoding it names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>")


@dataclass(frozen=True)
class TextEncode:
    """How one model input is made from a text column (planned once, sent to workers)."""

    column: str
    tokenizer_json: str
    sha256: str
    max_length: int
    padding: str  # max_length | longest
    truncation: bool
    field: str  # input_ids | attention_mask | token_type_ids
    pad_id: int
    pad_token: str

    @property
    def key(self) -> tuple:
        """Inputs with the same key share one encoding of the shard."""
        return (self.column, self.sha256, self.max_length, self.padding, self.truncation)

    def config(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "tokenizer_sha256": self.sha256,
            "max_length": self.max_length,
            "padding": self.padding,
            "truncation": self.truncation,
            "field": self.field,
        }


def load_tokenizer(text: str) -> Any:
    """A `tokenizers.Tokenizer` from its JSON; raises what `tokenizers` raises."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def pad_token(tokenizer: Any) -> tuple[int, str] | None:
    """(id, token) the tokenizer pads with: its own padding settings, else a usual name."""
    if tokenizer.padding:
        return tokenizer.padding["pad_id"], tokenizer.padding["pad_token"]
    for token in PAD_TOKENS:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return tid, token
    return None


_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def _tokenizer(t: TextEncode) -> Any:
    """This process's tokenizer for `t`'s settings, built once."""
    with _cache_lock:
        tok = _cache.get(t.key)
        if tok is None:
            tok = load_tokenizer(t.tokenizer_json)
            tok.no_truncation()
            if t.truncation:
                tok.enable_truncation(t.max_length)
            length = t.max_length if t.padding == "max_length" else None
            tok.enable_padding(pad_id=t.pad_id, pad_token=t.pad_token, length=length)
            _cache[t.key] = tok
        return tok


# One batch encode at a time in a process: tokenizers spreads each over every core already,
# so shards encoded one after another finish in order (the first soonest) at the same rate.
_encoding = threading.Lock()


def encode(column: pa.Array, t: TextEncode) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """A shard's texts -> ({field: [rows, length] int64}, {row: reason}).

    Null texts are bad rows; without truncation, so is a text longer than max_length.
    Rows with a reason hold padding."""
    n = len(column)
    null = column.is_null().to_numpy(zero_copy_only=False)
    texts = pc.fill_null(column.cast(pa.large_string()), "").to_pylist()
    tokenizer = _tokenizer(t)
    with _encoding:  # without offsets, which nothing here uses (tokenizers >= 0.20.2)
        encodings = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)(texts)
    reasons = {int(i): f"{t.column}: null" for i in np.flatnonzero(null)}
    if not t.truncation:
        lengths = np.fromiter((sum(e.attention_mask) for e in encodings), np.int64, n)
        for i in np.flatnonzero((lengths > t.max_length) & ~null):
            reasons[int(i)] = (
                f"{t.column}: {lengths[i]} tokens, more than max_length {t.max_length}"
            )
    bad = np.zeros(n, bool)
    bad[list(reasons)] = True
    width = t.max_length
    if t.padding == "longest":  # the longest good row (padding went to the longest of all)
        good = [sum(e.attention_mask) for e, b in zip(encodings, bad, strict=True) if not b]
        width = max(good, default=0)
    equal = t.truncation and t.padding == "max_length"  # every row is `width` long already
    fields = {}
    for name, attr, pad in (
        ("input_ids", "ids", t.pad_id),
        ("attention_mask", "attention_mask", 0),
        ("token_type_ids", "type_ids", 0),
    ):
        rows = [getattr(e, attr) if equal else getattr(e, attr)[:width] for e in encodings]
        array = np.array(rows, np.int64).reshape(n, width)
        array[bad] = pad
        fields[name] = array
    return fields, reasons
