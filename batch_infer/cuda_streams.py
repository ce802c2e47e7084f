"""CUDA streams, pinned staging buffers and in-flight slots, shared by every GPU backend.

After TensorRT's `common_runtime.py`: every CUDA call is checked and a failure names the
call; one object (`SlotRing`) owns all device and pinned memory and frees it on close.

Each of K slots has its own non-blocking stream, pinned host buffers, device buffers and a
completion event. While slot i computes, the CPU fills slot i+1's pinned buffers and queues
its host-to-device copy, and slot i-1's results come back device-to-host: the copy engines
and the compute engine work on different slots at once. Only a slot's own event is ever
waited on; nothing in the loop synchronizes the whole device.
"""

from __future__ import annotations

import ctypes
import queue
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batch_infer.backends.base import Feeds
from batch_infer.errors import CudaError
from batch_infer.model import TensorInfo

try:  # cuda-python 12.6+ / 13
    from cuda.bindings import runtime as cudart
except ImportError:  # pragma: no cover - older cuda-python
    from cuda import cudart  # type: ignore[no-redef]


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python result tuple, raising CudaError with the call's name on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        _, text = cudart.cudaGetErrorString(err)
        raise CudaError(f"{call} failed: {name.decode()} ({text.decode()})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    try:
        return int(check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except CudaError:
        return 0


def compute_capability(device: int = 0) -> tuple[int, int]:
    props = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return int(props.major), int(props.minor)


class PinnedBuffer:
    """Page-locked host memory (cudaHostAlloc), seen from numpy without a copy."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self.ptr = int(
            check(cudart.cudaHostAlloc(self.nbytes, cudart.cudaHostAllocDefault), "cudaHostAlloc")
        )
        raw = (ctypes.c_ubyte * self.nbytes).from_address(self.ptr)
        self._bytes = np.ctypeslib.as_array(raw)

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        return self._bytes[: count * dtype.itemsize].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            check(cudart.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self.ptr = int(check(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def free(self) -> None:
        if self.ptr:
            check(cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


@dataclass
class Slot:
    """One batch in flight: its stream, its buffers and the event that says it is done."""

    index: int
    stream: Any
    done: Any
    host_in: dict[str, PinnedBuffer] = field(default_factory=dict)
    dev_in: dict[str, DeviceBuffer] = field(default_factory=dict)
    host_out: dict[str, PinnedBuffer] = field(default_factory=dict)
    dev_out: dict[str, DeviceBuffer] = field(default_factory=dict)
    rows: int = 0
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)


# enqueue(slot, input shapes) launches the model on slot.stream, reading slot.dev_in and
# writing slot.dev_out (or its own device memory), and returns {output: (shape, device ptr)}.
Enqueue = Callable[[Slot, dict[str, tuple[int, ...]]], dict[str, tuple[tuple[int, ...], int]]]


class SlotRing:
    """K slots on one device. Owns every stream, event and buffer; `close()` frees them."""

    def __init__(
        self,
        inputs: tuple[TensorInfo, ...],
        outputs: tuple[TensorInfo, ...],
        slots: int = 2,
        device: int = 0,
    ) -> None:
        check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.inputs, self.outputs, self.device = inputs, outputs, device
        self.slots: list[Slot] = []
        self._free: queue.Queue[Slot] = queue.Queue()
        try:
            for i in range(slots):
                stream = check(
                    cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                    "cudaStreamCreateWithFlags",
                )
                done = check(
                    cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming),
                    "cudaEventCreateWithFlags",
                )
                self.slots.append(Slot(i, stream, done))
                self._free.put(self.slots[-1])
        except CudaError:
            self.close()
            raise

    @staticmethod
    def _ensure(pool: dict[str, Any], name: str, nbytes: int, kind: type) -> Any:
        """Allocate once for the largest batch seen; grow only if a larger one comes."""
        buf = pool.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            buf = pool[name] = kind(nbytes)
        return buf

    def reserve(self, rows: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """Size every slot's input buffers for `rows` rows of the given per-row shapes."""
        for slot in self.slots:
            for t in self.inputs:
                nbytes = rows * int(np.prod(shapes[t.name])) * t.dtype.itemsize
                self._ensure(slot.host_in, t.name, nbytes, PinnedBuffer)
                self._ensure(slot.dev_in, t.name, nbytes, DeviceBuffer)

    def output_buffer(self, slot: Slot, t: TensorInfo, shape: tuple[int, ...]) -> int:
        """A device buffer for an output of a known shape; returns its pointer."""
        nbytes = int(np.prod(shape)) * t.dtype.itemsize
        return self._ensure(slot.dev_out, t.name, nbytes, DeviceBuffer).ptr

    def _submit(self, slot: Slot, feeds: Feeds, enqueue: Enqueue) -> None:
        copy = cudart.cudaMemcpyKind
        shapes = {}
        for t in self.inputs:
            array = feeds[t.name]
            shapes[t.name] = array.shape
            self._ensure(slot.host_in, t.name, array.nbytes, PinnedBuffer)
            dev = self._ensure(slot.dev_in, t.name, array.nbytes, DeviceBuffer)
            np.copyto(slot.host_in[t.name].view(t.dtype, array.shape), array, casting="no")
            check(
                cudart.cudaMemcpyAsync(
                    dev.ptr,
                    slot.host_in[t.name].ptr,
                    array.nbytes,
                    copy.cudaMemcpyHostToDevice,
                    slot.stream,
                ),
                "cudaMemcpyAsync(host to device)",
            )
        produced = enqueue(slot, shapes)
        slot.out_shapes = {}
        for t in self.outputs:
            shape, ptr = produced[t.name]
            nbytes = int(np.prod(shape)) * t.dtype.itemsize
            host = self._ensure(slot.host_out, t.name, nbytes, PinnedBuffer)
            if nbytes:
                check(
                    cudart.cudaMemcpyAsync(
                        host.ptr, ptr, nbytes, copy.cudaMemcpyDeviceToHost, slot.stream
                    ),
                    "cudaMemcpyAsync(device to host)",
                )
            slot.out_shapes[t.name] = tuple(shape)
        check(cudart.cudaEventRecord(slot.done, slot.stream), "cudaEventRecord")

    def _collect(self, slot: Slot) -> Feeds:
        check(cudart.cudaEventSynchronize(slot.done), "cudaEventSynchronize")
        return {
            t.name: slot.host_out[t.name].view(t.dtype, slot.out_shapes[t.name]).copy()
            for t in self.outputs
        }

    def run(self, batches: Iterable[Feeds], enqueue: Enqueue) -> Iterator[Feeds]:
        """Keep batches in flight on free slots; yield outputs in submission order.

        Several threads may call this at once (one shard each): they share the slots, so
        one shard's last batches overlap with the next shard's first. A thread waits for
        a slot only when it holds none, so two threads never wait on each other.
        """
        mine: deque[Slot] = deque()
        try:
            for feeds in batches:  # converting the next batch overlaps with the GPU's work
                try:
                    slot = self._free.get_nowait()
                except queue.Empty:
                    if mine:
                        oldest = mine.popleft()
                        yield self._collect(oldest)
                        self._free.put(oldest)
                    slot = self._free.get()
                mine.append(slot)
                self._submit(slot, feeds, enqueue)
            while mine:
                oldest = mine.popleft()
                yield self._collect(oldest)
                self._free.put(oldest)
        finally:  # a failed batch: wait for this thread's slots, then hand them back
            for slot in mine:
                cudart.cudaEventSynchronize(slot.done)
                self._free.put(slot)

    def close(self) -> None:
        """Free every buffer, event and stream; safe to call twice and after an error."""
        for slot in self.slots:
            if slot.stream is not None:
                cudart.cudaStreamSynchronize(slot.stream)
            for pool in (slot.host_in, slot.dev_in, slot.host_out, slot.dev_out):
                for buf in pool.values():
                    buf.free()
                pool.clear()
            if slot.done is not None:
                cudart.cudaEventDestroy(slot.done)
                slot.done = None
            if slot.stream is not None:
                cudart.cudaStreamDestroy(slot.stream)
                slot.stream = None
        self.slots = []
