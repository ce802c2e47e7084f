"""The writer actor: commits shards through the job's `OutputSink`, off the driver.

Writers hold no state besides the sink: a writer that dies loses nothing committed, and
the driver retries its shard on a new one.
"""

from __future__ import annotations

import pyarrow as pa

from batch_infer.sink.manifest import OutputSink, ShardEntry


class ShardWriter:
    """One Ray actor: commits one shard at a time (stage, entry, move into place)."""

    def __init__(self, sink: OutputSink) -> None:
        self.sink = sink

    def commit(
        self, entry: ShardEntry, predictions: pa.Table, errors: pa.Table | None
    ) -> ShardEntry:
        return self.sink.write(entry, predictions, errors)
