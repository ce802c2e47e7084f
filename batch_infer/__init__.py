"""batch-infer: offline batch inference on Ray, exactly once, resumable."""

from batch_infer.errors import UserError
from batch_infer.job import RunSummary, run
from batch_infer.query import query
from batch_infer.spec import JobSpec, load_spec

__all__ = ["JobSpec", "RunSummary", "UserError", "load_spec", "query", "run"]
__version__ = "0.1.0"
