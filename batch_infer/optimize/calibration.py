"""Rows for calibration and for the accuracy gate, drawn from the job's own input.

They are read exactly as a run reads them (the job's shards, `prepare_shard`: the same bad-row
checks, decoders and tensor conversion), never made up: quantization ranges from random data
fit no real input. The draw is seeded and spread over the whole input: pieces of the input
(a Parquet row group within a shard, or a whole CSV/IPC file) are visited in a seeded,
evenly spaced order, a few rows are kept from each, and the rows are then split at random
into calibration rows and held-out gate rows, which never overlap.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from batch_infer.actor import prepare_shard
from batch_infer.backends.base import Feeds
from batch_infer.data.sharding import Shard, plan_shards
from batch_infer.errors import InputError
from batch_infer.planning import JobPlan

PIECES_PER_ROUND = 16  # pieces of the input read per round, spread over all of it


@dataclass(frozen=True)
class Sample:
    """Calibration and gate rows as model feeds, with where they came from."""

    calibration: Feeds
    gate: Feeds
    seed: int
    sources: list[dict] = field(default_factory=list)  # file, row range, rows taken

    @property
    def calibration_rows(self) -> int:
        return len(next(iter(self.calibration.values())))

    @property
    def gate_rows(self) -> int:
        return len(next(iter(self.gate.values())))

    def fingerprint(self) -> str:
        """sha256 of the rows themselves (names, dtypes, shapes, bytes) and their split."""
        digest = hashlib.sha256(f"seed={self.seed}".encode())
        for part, feeds in (("calibration", self.calibration), ("gate", self.gate)):
            for name in sorted(feeds):
                array = np.ascontiguousarray(feeds[name])
                digest.update(f"{part}:{name}:{array.dtype.str}:{array.shape}".encode())
                digest.update(array.data)
        return digest.hexdigest()

    def describe(self) -> dict:
        return {
            "calibration_rows": self.calibration_rows,
            "gate_rows": self.gate_rows,
            "seed": self.seed,
            "fingerprint": self.fingerprint(),
            "sources": self.sources,
        }


def _pieces(shards: list[Shard]) -> list[Shard]:
    """The shards cut at row-group boundaries (Parquet), so a piece reads one row group;
    CSV and IPC shards are whole files and stay as they are."""
    out = []
    for shard in shards:
        if not shard.row_groups or shard.row_stop is None:
            out.append(shard)
            continue
        start = shard.first_row
        for group, rows in zip(shard.row_groups, shard.group_rows, strict=True):
            lo, hi = max(start, shard.row_start), min(start + rows, shard.row_stop)
            if hi > lo:
                piece = Shard(f"{shard.id}:{group}", shard.file, lo, hi, (group,), start, (rows,))
                out.append(piece)
            start += rows
    return out


def _order(count: int, rng: np.random.Generator) -> list[int]:
    """Piece indices, round after round: each round takes up to PIECES_PER_ROUND of the
    pieces not yet taken, evenly spaced over them with a seeded offset."""
    left, order = list(range(count)), []
    while left:
        k = min(PIECES_PER_ROUND, len(left))
        offset = rng.random()
        picks = sorted({int((i + offset) * len(left) / k) for i in range(k)})
        order += [left[p] for p in picks]
        left = [x for i, x in enumerate(left) if i not in set(picks)]
    return order


def draw_sample(plan: JobPlan, calibration_rows: int, gate_rows: int, seed: int) -> Sample:
    """`calibration_rows` + `gate_rows` good rows from the job's input (see the module doc).
    InputError when the input has fewer good rows than that."""
    need = calibration_rows + gate_rows
    rng = np.random.default_rng(seed)
    pieces = _pieces(plan_shards(plan.dataset, plan.spec.shard_rows))
    order = _order(len(pieces), rng)
    quota = max(1, math.ceil(2 * need / min(PIECES_PER_ROUND, len(order))))
    parts: list[Feeds] = []
    sources: list[dict] = []
    have = 0
    for index in order:
        piece = pieces[index]
        _, _, feeds, _ = prepare_shard(plan, piece, "optimize", 0)
        rows = len(next(iter(feeds.values())))
        take = np.sort(rng.choice(rows, min(rows, quota), replace=False))
        if not len(take):
            continue
        parts.append({k: v[take] for k, v in feeds.items()})
        stop = piece.row_stop if piece.row_stop is not None else "end"
        sources.append({"file": piece.file.relpath, "rows": [piece.row_start, stop],
                        "taken": len(take)})  # fmt: skip
        have += len(take)
        if have >= 2 * need:
            break
    if have < need:
        raise InputError(
            f"model.optimize: the input has {have} good rows; calibration_rows "
            f"({calibration_rows}) and gate.rows ({gate_rows}) need {need}; lower them"
        )
    pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    chosen = rng.permutation(have)[:need]
    cal, gate = np.sort(chosen[:calibration_rows]), np.sort(chosen[calibration_rows:])
    return Sample(
        calibration={k: np.ascontiguousarray(v[cal]) for k, v in pool.items()},
        gate={k: np.ascontiguousarray(v[gate]) for k, v in pool.items()},
        seed=seed,
        sources=sources,
    )
