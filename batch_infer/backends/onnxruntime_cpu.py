"""ONNX Runtime on the CPU: the backend every machine can run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import onnxruntime as ort

from batch_infer.backends.base import Backend, Feeds
from batch_infer.errors import BackendError
from batch_infer.model import ModelSignature


class OnnxRuntimeCPU(Backend):
    name = "onnxruntime"

    def __init__(self, signature: ModelSignature, threads: int = 1) -> None:
        options = ort.SessionOptions()
        # One actor per core: ORT's own thread pool would fight the other actors for cores.
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                signature.path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot load {signature.path}: {exc}") from None
        self.inputs = signature.inputs
        self.outputs = signature.outputs
        self._output_names = [t.name for t in signature.outputs]
        self.threads = threads
        # Seconds with at least one run in progress: two shards' runs overlap on one actor.
        self._busy, self._active, self._since, self._lock = 0.0, 0, 0.0, threading.Lock()

    def run(self, batches: Iterable[Feeds]) -> Iterator[Feeds]:
        for feeds in self.checked(batches):
            if self._session is None:
                raise BackendError(f"{self.name}: run after close")
            with self._lock:
                if self._active == 0:
                    self._since = time.perf_counter()
                self._active += 1
            try:
                values = self._session.run(self._output_names, feeds)
            finally:
                with self._lock:
                    self._active -= 1
                    if self._active == 0:
                        self._busy += time.perf_counter() - self._since
            yield dict(zip(self._output_names, values, strict=True))

    def warm_up(self, rows: int) -> None:
        feeds = self.zeros(rows)
        if feeds is not None and self._session is not None:
            self._session.run(self._output_names, feeds)

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} CPU ({self.threads} thread(s))"

    def busy_seconds(self) -> float:
        return self._busy

    def close(self) -> None:
        self._session = None
