"""The writer actor: turns a shard's predictions into committed Parquet files."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch_infer.manifest import ERRORS, SHARDS, STAGING, Output


class ShardWriter:
    """Writes one shard at a time: stage the files, write the entry (commit), move into place."""

    def __init__(self, output_path: str, row_group_rows: int) -> None:
        self.out = Output.at(output_path)
        self.row_group_rows = row_group_rows

    def _write(self, table: pa.Table, rel: str) -> None:
        self.out.filesystem.create_dir(self.out.path(rel.rsplit("/", 1)[0]), recursive=True)
        with self.out.filesystem.open_output_stream(self.out.path(rel)) as f:
            pq.write_table(table, f, row_group_size=self.row_group_rows, compression="zstd")

    def commit(
        self, entry: dict[str, Any], predictions: pa.Table, errors: pa.Table | None
    ) -> dict[str, Any]:
        shard = entry["shard"]
        stage = f"{STAGING}/{shard}-{uuid.uuid4().hex[:8]}"
        staged: dict[str, str] = {}
        for table, final in (
            (predictions, f"part-{shard}.parquet"),
            (errors, f"{ERRORS}/part-{shard}.parquet"),
        ):
            if table is not None and table.num_rows:
                tmp = f"{stage}/{final.replace('/', '_')}"
                self._write(table, tmp)
                staged[final] = tmp
        entry = {**entry, "files": sorted(staged), "staged": staged, "committed_at": time.time()}
        self.out.write_json(f"{SHARDS}/{shard}.json", entry)  # the commit point
        for final, tmp in staged.items():
            self.out.filesystem.create_dir(
                self.out.path(final.rsplit("/", 1)[0]) if "/" in final else self.out.root,
                recursive=True,
            )
            self.out.filesystem.move(self.out.path(tmp), self.out.path(final))
        self.out.delete(stage)
        return entry
