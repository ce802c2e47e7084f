"""The one interface every backend implements (after Polygraphy's runners).

A backend is loaded once per actor and then fed micro-batches as a stream, so a GPU backend
can keep several batches in flight while a CPU backend simply runs them one by one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

import numpy as np

from batch_infer.model import TensorInfo

Feeds = dict[str, np.ndarray]


class Backend(ABC):
    """Runs one model. Outputs come back in the order the batches went in."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @abstractmethod
    def run(self, batches: Iterable[Feeds]) -> Iterator[Feeds]:
        """Run every batch; yield each batch's outputs (host arrays) in order."""

    def infer(self, feeds: Feeds) -> Feeds:
        """Run a single batch."""
        return next(iter(self.run([feeds])))

    def describe(self) -> str:
        """One line for logs and the run summary."""
        return self.name

    def close(self) -> None:  # noqa: B027 - backends without resources need no close
        """Release what the backend holds (sessions, device memory, streams)."""
