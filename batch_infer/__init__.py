"""batch-infer: offline batch inference on Ray, exactly once, resumable.

`run` and `query` are loaded on first use, so importing the package (and `batch-infer
--help`) does not pay for Ray, ONNX Runtime or DuckDB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batch_infer.errors import UserError
from batch_infer.sink.manifest import RunRecord
from batch_infer.spec import JobSpec, resolve_spec

if TYPE_CHECKING:
    from batch_infer.job import run
    from batch_infer.ops.query import query

__all__ = ["JobSpec", "RunRecord", "UserError", "query", "resolve_spec", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "run":
        from batch_infer.job import run

        return run
    if name == "query":
        from batch_infer.ops.query import query

        return query
    raise AttributeError(f"module 'batch_infer' has no attribute {name!r}")
