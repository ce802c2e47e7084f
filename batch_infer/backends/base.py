"""The one interface every backend implements (after Polygraphy's runners), and the options
a backend takes from the spec.

Lifecycle: a backend is made once per actor (that loads the model), then `run` is called
once per shard with that shard's micro-batches, then `close` once (safe to repeat, and
after an error). It is a context manager. `concurrency` says how many threads may call
`run` at once: GPU backends take two shards together so the device never drains between
them; the inference actor is made with that many threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from batch_infer.errors import BackendError
from batch_infer.model import TensorInfo

if TYPE_CHECKING:
    from batch_infer.backends.tensorrt_build import EngineRecipe

Feeds = dict[str, np.ndarray]

# Threads a GPU backend serves at once (see the module docstring).
GPU_CONCURRENCY = 2


@dataclass(frozen=True)
class BackendOptions:
    """What a backend needs from the spec: built and checked in planning, before any work."""

    requested: str = "auto"  # auto | onnxruntime | tensorrt | tensorrt-rtx
    batch_size: int = 512
    slots: int = 2  # batches in flight on a GPU
    engine: EngineRecipe | None = None  # TensorRT's planned profiles, precision, target
    engine_problem: str | None = None  # why no engine can be planned (auto skips TensorRT)


class Backend(ABC):
    """Runs one model. Outputs come back in the order the batches went in."""

    name: str
    concurrency: ClassVar[int] = 1
    # Pad a short batch up to the full batch size: backends that tune kernels per input
    # shape (cuDNN's algorithm search in ONNX Runtime CUDA) then see one shape.
    pads_batches: ClassVar[bool] = False
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

    @abstractmethod
    def warm_up(self, rows: int) -> None:
        """Pay the first run's costs (allocations, kernel set-up) on zeros of `rows` rows
        before the first shard arrives: while the shards are planned, or while an actor
        waits for its first one. Not counted as busy time."""

    def zeros(self, rows: int) -> Feeds | None:
        """Zeros of `rows` rows for every input; None when a row dimension is dynamic."""
        shapes = {t.name: (rows, *t.item_shape) for t in self.inputs}
        if any(d < 0 for shape in shapes.values() for d in shape):
            return None
        return {t.name: np.zeros(shapes[t.name], t.dtype) for t in self.inputs}

    @abstractmethod
    def busy_seconds(self) -> float:
        """Seconds the device has spent computing so far (overlaps counted once)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds (sessions, device memory, streams); idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checked(self, batches: Iterable[Feeds]) -> Iterator[Feeds]:
        """The batches, each checked against the model's inputs: one clear error for a
        missing or unknown input, a wrong dtype or shape, or inputs of unequal batch."""
        names = [t.name for t in self.inputs]
        for feeds in batches:
            if sorted(feeds) != sorted(names):
                raise BackendError(
                    f"{self.name}: the batch has inputs {sorted(feeds)}; the model takes {names}"
                )
            rows = {feeds[n].shape[0] if feeds[n].ndim else None for n in names}
            if len(rows) != 1 or None in rows:
                raise BackendError(f"{self.name}: inputs {names} must share one batch dimension")
            for t in self.inputs:
                array = feeds[t.name]
                if array.dtype != t.dtype:
                    raise BackendError(
                        f"{self.name}: input {t.name!r} is {array.dtype}; the model takes {t.dtype}"
                    )
                if len(array.shape) != len(t.shape) or any(
                    d > 0 and d != got for d, got in zip(t.shape[1:], array.shape[1:], strict=True)
                ):
                    raise BackendError(
                        f"{self.name}: input {t.name!r} has shape {list(array.shape)}; the model "
                        f"takes {['N' if d < 0 else d for d in t.shape]}"
                    )
            yield feeds
