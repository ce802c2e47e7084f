"""The steady-state rate of a finished job, read from its manifest (shared by the benchmarks).

Rows after the first committed shard over the time from the first to the last commit: it
leaves out Ray's start-up, model loading and the first shard's latency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def shard_entries(output: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in Path(output, "_manifest", "shards").glob("*.json")]


def steady_rate(entries: list[dict[str, Any]]) -> float:
    first = min(entries, key=lambda e: e["committed_at"])
    span = max(e["committed_at"] for e in entries) - first["committed_at"]
    return (sum(e["rows"] for e in entries) - first["rows"]) / max(span, 1e-9)
