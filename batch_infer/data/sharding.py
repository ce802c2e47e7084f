"""Planning shards from file metadata alone.

A shard is a row range of one file: Parquet row groups grouped to a target size (a row
group larger than the target is split into row ranges), or a whole CSV/IPC file. Its id
hashes the file's path relative to the dataset base and the range, so the same input and
`shard_rows` always give the same plan, which is what lets a rerun skip committed shards.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from batch_infer.data.reading import Dataset, InputFile
from batch_infer.errors import InputError

# When shard_rows is unset: about this many uncompressed input bytes per shard, but at least
# MIN_SHARD_ROWS rows so a GPU gets several batches per shard. Derived from the data alone,
# so a rerun plans the same shards whatever the cluster or batch size.
TARGET_SHARD_BYTES = 128 << 20
MIN_SHARD_ROWS = 1024
MAX_SHARD_ROWS = 1 << 20
# The first shard of the input is split into pieces growing to full size, so the first
# device starts computing soon after its model is loaded; the last shard into pieces
# shrinking to nothing, so the actors finish together. Only worth it for large shards;
# decided from metadata alone, so reruns plan the same pieces.
TAPER = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
TAPER_MIN_BYTES = 16 << 20
FileCheck = Callable[[str, pa.Schema], None]  # raises for a file that does not fit the job


@dataclass(frozen=True)
class Shard:
    id: str
    file: InputFile
    row_start: int = 0
    row_stop: int | None = None  # None: to the end of the file (CSV/IPC: rows unknown ahead)
    row_groups: tuple[int, ...] = ()
    first_row: int = 0  # file row index of the first row of row_groups[0]
    group_rows: tuple[int, ...] = ()  # rows of each of row_groups
    nbytes: int = 0  # uncompressed input bytes, estimated from the Parquet footer

    @property
    def rows(self) -> int | None:
        return None if self.row_stop is None else self.row_stop - self.row_start

    @property
    def fingerprint(self) -> str:
        return self.file.fingerprint


def _shard_id(file: InputFile, start: int, stop: int | None) -> str:
    key = f"{file.relpath}\0{start}\0{stop}".encode()
    return hashlib.sha256(key).hexdigest()[:16]


def _parquet_shards(
    dataset: Dataset, file: InputFile, shard_rows: int | None, check: FileCheck | None
) -> list[Shard]:
    try:
        with dataset.filesystem.open_input_file(file.path) as f:
            meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file.path}: not a readable Parquet file ({exc})") from None
    if check is not None:
        check(file.path, schema)
    groups = [
        (meta.row_group(i).num_rows, meta.row_group(i).total_byte_size)
        for i in range(meta.num_row_groups)
    ]
    total_rows = sum(r for r, _ in groups)
    total_bytes = sum(b for _, b in groups)
    per_row = max(1, total_bytes // max(1, total_rows))
    if shard_rows is None:
        shard_rows = min(MAX_SHARD_ROWS, max(MIN_SHARD_ROWS, TARGET_SHARD_BYTES // per_row))
    shards: list[Shard] = []
    start, first, pending = 0, 0, []
    row = 0

    def shard(lo: int, hi: int, groups: tuple[int, ...], first_row: int) -> Shard:
        sizes = tuple(meta.row_group(g).num_rows for g in groups)
        nbytes = (hi - lo) * per_row
        return Shard(_shard_id(file, lo, hi), file, lo, hi, groups, first_row, sizes, nbytes)

    def flush(stop: int) -> None:
        nonlocal start, pending
        if pending:
            shards.append(shard(start, stop, tuple(pending), first))
        start, pending = stop, []

    for i, (rows, _) in enumerate(groups):
        if rows == 0:
            continue
        if rows > shard_rows:  # split a large row group into row ranges
            flush(row)
            pieces = -(-rows // shard_rows)
            bounds = [row + rows * k // pieces for k in range(pieces + 1)]
            for lo, hi in itertools.pairwise(bounds):
                shards.append(shard(lo, hi, (i,), row))
            row += rows
            start = row
            continue
        if pending and (row + rows - start) > shard_rows:
            flush(row)
        if not pending:
            first, start = row, row
        pending.append(i)
        row += rows
    flush(row)
    return shards


def _pieces(shard: Shard, fractions: tuple[float, ...]) -> list[Shard]:
    """`shard` split into consecutive row ranges of the given fractions (summing to 1), each
    reading only the row groups it overlaps."""
    assert shard.row_stop is not None
    rows = shard.row_stop - shard.row_start
    bounds = [shard.row_start + round(rows * sum(fractions[:k])) for k in range(len(fractions))]
    starts = list(itertools.accumulate(shard.group_rows, initial=shard.first_row))
    out = []
    for lo, hi in itertools.pairwise([*bounds, shard.row_stop]):
        if hi <= lo:
            continue
        keep = [k for k in range(len(shard.row_groups)) if starts[k] < hi and starts[k + 1] > lo]
        out.append(
            Shard(
                _shard_id(shard.file, lo, hi), shard.file, lo, hi,
                tuple(shard.row_groups[k] for k in keep), starts[keep[0]],
                tuple(shard.group_rows[k] for k in keep), shard.nbytes * (hi - lo) // rows,
            )
        )  # fmt: skip
    return out


def _taper(shards: list[Shard]) -> list[Shard]:
    """Split the first shard into growing pieces and the last into shrinking ones (TAPER)."""
    if shards and shards[0].nbytes >= TAPER_MIN_BYTES:
        shards = _pieces(shards[0], TAPER) + shards[1:]
    if len(shards) > len(TAPER) and shards[-1].nbytes >= TAPER_MIN_BYTES:
        shards = shards[:-1] + _pieces(shards[-1], TAPER[::-1])
    return shards


def plan_shards(
    dataset: Dataset, shard_rows: int | None, check: FileCheck | None = None
) -> list[Shard]:
    """Every row of the input in exactly one shard, in file order. `check(path, schema)` is
    given each Parquet file's schema, read with its footer (`JobPlan.check_file`)."""
    if dataset.format != "parquet":
        return [Shard(_shard_id(f, 0, None), f) for f in dataset.files]
    with ThreadPoolExecutor(max_workers=16) as pool:
        per_file = pool.map(lambda f: _parquet_shards(dataset, f, shard_rows, check), dataset.files)
        return _taper([s for shards in per_file for s in shards])
