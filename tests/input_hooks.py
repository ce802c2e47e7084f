"""Preprocess and postprocess hooks the tests name in specs (`tests.input_hooks:...`),
imported by the prepare tasks and actors as a user's module would be."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def seq_feat(table: pa.Table) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """The two_io model's inputs from the shard's columns, with a bad-row reason for rows
    whose `b` is negative (a rule only the user's code knows)."""
    seq = np.stack(table.column("seq").to_numpy(zero_copy_only=False)).astype(np.float32)
    feat = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in "abc"])
    b = table.column("b").to_numpy()
    reasons = [f"b is {v} (negative)" if v < 0 else None for v in b]
    return {"seq": seq, "feat": feat}, reasons


def fails_on_id_13(table: pa.Table) -> dict[str, np.ndarray]:
    """Like `seq_feat` without reasons, but raises when the shard holds id 13."""
    ids = table.column("id").to_pylist()
    if 13 in ids:
        raise ValueError(f"cannot handle id {13} (at index {ids.index(13)})")
    return seq_feat(table)[0]


def emb_norm(outputs: dict[str, np.ndarray]) -> dict[str, object]:
    """Columns from the model's outputs: the norm of `emb` and the sign of `score`."""
    return {
        "emb_norm": np.linalg.norm(outputs["emb"], axis=1),
        "positive": outputs["score"][:, 0] > 0,
    }


def fails_on_large_score(outputs: dict[str, np.ndarray]) -> dict[str, object]:
    """Raises when any score is above 5."""
    if (outputs["score"] > 5).any():
        raise RuntimeError("score above 5")
    return emb_norm(outputs)


def python_objects(outputs: dict[str, np.ndarray]) -> dict[str, object]:
    """A column of values Arrow has no type for."""
    return {"thing": [object() for _ in outputs["score"]]}


def ragged(outputs: dict[str, np.ndarray]) -> dict[str, object]:
    """A list of a different length per row: an Arrow list column."""
    return {"ks": [list(range(i % 3)) for i in range(len(outputs["score"]))]}
