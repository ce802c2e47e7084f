"""batch-infer: offline batch inference on Ray, exactly once, resumable.

`run` and `query` are loaded on first use, so importing the package (and `batch-infer
--help`) does not pay for Ray, ONNX Runtime or DuckDB.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# CUDA gives a process's streams 8 hardware queues unless told otherwise, and work queued on
# a shared one waits behind whatever is ahead of it there: the hardware JPEG decoder's small
# per-image steps then wait behind whole runs of the model (on an H100, 4,600 images/s beside
# ResNet-50 with 8, 23,900 with 32; docs/inputs.md). 32 is CUDA's most. CUDA reads it when a
# process makes its context, so it is set on the package's import, which comes before any
# CUDA call of a run, a Ray actor or a task. A value the user set is kept.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

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
