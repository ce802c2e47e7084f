"""CUDA streams, pinned staging buffers and in-flight slots, shared by every GPU backend.

After TensorRT's `common_runtime.py`: every CUDA call is checked and a failure names the
call; one object (`SlotRing`) owns all device and pinned memory and frees it on close.

Each of K slots has its own non-blocking stream, pinned host buffers, device buffers and a
completion event. While slot i computes, the CPU fills slot i+1's pinned buffers and queues
its host-to-device copy, and slot i-1's results come back device-to-host: the copy engines
and the compute engine work on different slots at once. Only a slot's own event is ever
waited on; nothing in the loop synchronizes the whole device.

The model's runs themselves go one after another, in the order they were launched (each
stream waits on the previous launch's end event on the device, not on the host). Left to
run side by side, two full batches share the GPU, end together, and the GPU idles while
the host refills both: a batch of 256 images takes every SM anyway, so nothing is gained by
overlapping them, while in order one slot is refilled as the other computes.

Two timing events per slot bracket the model's launch, so the ring knows when the device
was computing (`busy_seconds`): the run's timeline shows it per actor.

`StreamBackend` is what ONNX Runtime CUDA and TensorRT share: they load the model and
implement `enqueue` (launch on a slot's stream); copies, waits and cleanup live here.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batch_infer.backends.base import GPU_CONCURRENCY, Backend, Feeds
from batch_infer.errors import BackendError, CudaError
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


def start_context(device: int) -> None:
    """Create this process's CUDA context on `device` now (cudaFree(0)): a few tenths of a
    second that a run spends while it plans, rather than when it loads the model."""
    check(cudart.cudaSetDevice(device), "cudaSetDevice")
    check(cudart.cudaFree(0), "cudaFree")


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
    """One batch in flight: its stream, its buffers and the event that says it is done.
    The model runs on `compute`: the slot's own stream, or one the ring's slots share."""

    index: int
    stream: Any
    done: Any
    began: Any  # timing events around the launch: when the device computed this batch
    ended: Any
    compute: Any = None
    copied: Any = None  # with a shared compute stream: the slot's inputs are on the device
    host_in: dict[str, PinnedBuffer] = field(default_factory=dict)
    dev_in: dict[str, DeviceBuffer] = field(default_factory=dict)
    host_out: dict[str, PinnedBuffer] = field(default_factory=dict)
    dev_out: dict[str, DeviceBuffer] = field(default_factory=dict)
    rows: int = 0
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def compute_handle(self) -> int:
        return int(self.compute)


# enqueue(slot, input shapes) launches the model on slot.compute, reading slot.dev_in and
# writing slot.dev_out (or its own device memory), and returns {output: (shape, device ptr)}.
Enqueue = Callable[[Slot, dict[str, tuple[int, ...]]], dict[str, tuple[tuple[int, ...], int]]]


class SlotRing:
    """K slots on one device. Owns every stream, event and buffer; `close()` frees them.

    `shared_compute`: the model runs on one stream for every slot (a backend with one copy
    of the model, such as one ONNX Runtime session), each slot's copies on its own stream:
    one slot's copies still overlap the other's compute."""

    def __init__(
        self,
        inputs: tuple[TensorInfo, ...],
        outputs: tuple[TensorInfo, ...],
        slots: int = 2,
        device: int = 0,
        shared_compute: bool = False,
    ) -> None:
        check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.inputs, self.outputs, self.device = inputs, outputs, device
        self.slots: list[Slot] = []
        self.compute: Any = None  # the shared compute stream, if any
        self._free: queue.Queue[Slot] = queue.Queue()
        self._busy: list[tuple[float, float]] = []  # (start, end) ms after `_origin`
        self._busy_lock = threading.Lock()
        self._order = threading.Lock()  # held from a launch's wait to its end event
        self._last_end: Any = None  # the end event of the latest launch: the next waits on it
        self._origin: Any = None
        try:
            self._origin = _event(timing=True)
            check(cudart.cudaEventRecord(self._origin, 0), "cudaEventRecord")
            if shared_compute:
                self.compute = _stream()
            for i in range(slots):
                stream = _stream()
                slot = Slot(i, stream, _event(timing=False), _event(timing=True), _event(True))
                slot.compute = self.compute or stream
                if shared_compute:
                    slot.copied = _event(timing=False)
                self.slots.append(slot)
                self._free.put(slot)
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

    def acquire(self) -> Slot:
        """A free slot (waits for one); hand it back with `release`."""
        return self._free.get()

    def release(self, slot: Slot) -> None:
        self._free.put(slot)

    def stage(self, slot: Slot, feeds: Feeds) -> dict[str, tuple[int, ...]]:
        """Queue the copy of `feeds` into the slot's device buffers; return their shapes."""
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
        return shapes

    def launch(self, slot: Slot, shapes: dict[str, tuple[int, ...]], enqueue: Enqueue) -> Any:
        """Enqueue the model on the slot's compute stream between its two timing events,
        after the slot's copies in and before its copies out."""
        shared = slot.copied is not None
        if shared:
            check(cudart.cudaEventRecord(slot.copied, slot.stream), "cudaEventRecord")
            check(cudart.cudaStreamWaitEvent(slot.compute, slot.copied, 0), "cudaStreamWaitEvent")
        check(cudart.cudaEventRecord(slot.began, slot.compute), "cudaEventRecord")
        produced = enqueue(slot, shapes)
        check(cudart.cudaEventRecord(slot.ended, slot.compute), "cudaEventRecord")
        if shared:
            check(cudart.cudaStreamWaitEvent(slot.stream, slot.ended, 0), "cudaStreamWaitEvent")
        return produced

    def launch_in_order(
        self, slot: Slot, shapes: dict[str, tuple[int, ...]], enqueue: Enqueue
    ) -> Any:
        """`launch`, to start on the device once the previous launch (any slot) has ended
        (on a shared compute stream they are in order already)."""
        with self._order:
            if self._last_end is not None and self.compute is None:
                check(
                    cudart.cudaStreamWaitEvent(slot.compute, self._last_end, 0),
                    "cudaStreamWaitEvent",
                )
            produced = self.launch(slot, shapes, enqueue)
            self._last_end = slot.ended
        return produced

    def _submit(self, slot: Slot, feeds: Feeds, enqueue: Enqueue) -> None:
        copy = cudart.cudaMemcpyKind
        produced = self.launch_in_order(slot, self.stage(slot, feeds), enqueue)
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
        start = check(cudart.cudaEventElapsedTime(self._origin, slot.began), "cudaEventElapsedTime")
        end = check(cudart.cudaEventElapsedTime(self._origin, slot.ended), "cudaEventElapsedTime")
        with self._busy_lock:
            self._busy.append((float(start), float(end)))
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

        def collect_oldest() -> Feeds:
            """The oldest batch's outputs (copies), its slot already handed back: no slot is
            held across a `yield`, so a consumer that stops early loses none."""
            oldest = mine.popleft()
            try:
                return self._collect(oldest)
            finally:
                self._free.put(oldest)

        try:
            for feeds in batches:  # converting the next batch overlaps with the GPU's work
                try:
                    slot = self._free.get_nowait()
                except queue.Empty:
                    if mine:
                        yield collect_oldest()
                    slot = self.acquire()
                mine.append(slot)
                self._submit(slot, feeds, enqueue)
            while mine:
                yield collect_oldest()
        finally:  # a failed batch: wait for this thread's slots, then hand them back
            for slot in mine:
                cudart.cudaEventSynchronize(slot.done)
                self._free.put(slot)

    def busy_seconds(self) -> float:
        """Seconds the device spent computing this ring's batches, overlaps counted once."""
        with self._busy_lock:
            spans = sorted(self._busy)
        total, reach = 0.0, float("-inf")
        for start, end in spans:
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total / 1000

    def close(self) -> None:
        """Free every buffer, event and stream; safe to call twice and after an error."""
        for slot in self.slots:
            if slot.stream is not None:
                cudart.cudaStreamSynchronize(slot.stream)
            for pool in (slot.host_in, slot.dev_in, slot.host_out, slot.dev_out):
                for buf in pool.values():
                    buf.free()
                pool.clear()
            for name in ("done", "began", "ended", "copied"):
                if getattr(slot, name) is not None:
                    cudart.cudaEventDestroy(getattr(slot, name))
                    setattr(slot, name, None)
            if slot.stream is not None:
                cudart.cudaStreamDestroy(slot.stream)
                slot.stream = slot.compute = None
        self.slots = []
        self._last_end = None
        if self.compute is not None:
            cudart.cudaStreamSynchronize(self.compute)
            cudart.cudaStreamDestroy(self.compute)
            self.compute = None
        if self._origin is not None:
            cudart.cudaEventDestroy(self._origin)
            self._origin = None


def _stream() -> Any:
    return check(
        cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
    )


def _event(timing: bool) -> Any:
    flags = cudart.cudaEventDefault if timing else cudart.cudaEventDisableTiming
    return check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")


class ResidentBatch:
    """One batch held on the device: `launch` runs the model on it with no copy at all, so
    benchmarks measure the backend's own compute rate. Holds one slot until closed."""

    def __init__(self, backend: StreamBackend, feeds: Feeds) -> None:
        self.backend = backend
        self.rows = next(iter(feeds.values())).shape[0]
        self.slot = backend.ring.acquire()
        self.shapes = backend.ring.stage(self.slot, next(backend.checked([feeds])))
        check(cudart.cudaStreamSynchronize(self.slot.stream), "cudaStreamSynchronize")

    def launch(self, times: int = 1) -> None:
        for _ in range(times):
            self.backend.enqueue(self.slot, self.shapes)

    def wait(self) -> None:
        check(cudart.cudaStreamSynchronize(self.slot.compute), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.slot is not None:
            self.wait()
            self.backend.ring.release(self.slot)
            self.slot = None

    def __enter__(self) -> ResidentBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamBackend(Backend):
    """A GPU backend that launches batches on a `SlotRing` (ONNX Runtime CUDA, TensorRT).

    Subclasses make `self.ring`, load the model, implement `enqueue` and `release`."""

    concurrency = GPU_CONCURRENCY
    ring: SlotRing | None = None

    @abstractmethod
    def enqueue(
        self, slot: Slot, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[tuple[int, ...], int]]:
        """Launch the model on `slot.stream` reading `slot.dev_in`; {output: (shape, ptr)}."""

    @abstractmethod
    def release(self) -> None:
        """Drop the model (sessions, contexts, engine) once the streams are idle."""

    def _ring(self) -> SlotRing:
        if self.ring is None:
            raise BackendError(f"{self.name}: used after close")
        return self.ring

    def run(self, batches: Iterable[Feeds]) -> Iterator[Feeds]:
        def contiguous() -> Iterator[Feeds]:
            for feeds in self.checked(batches):
                yield {k: np.ascontiguousarray(v) for k, v in feeds.items()}

        yield from self._ring().run(contiguous(), self.enqueue)

    def warm_up(self, rows: int) -> None:
        """Run every slot once on zeros of `rows` rows. A session's first run sets up its
        libraries and kernels (1.5 s for ResNet-50 fp16 on an H100 with ONNX Runtime CUDA,
        docs/gpu.md); done here it overlaps with planning instead of delaying the first
        shards. Skipped for inputs with a dynamic row dimension (no shape to warm)."""
        ring, feeds = self._ring(), self.zeros(rows)
        if feeds is None:
            return
        slots = [ring.acquire() for _ in ring.slots]

        def first_run(slot: Slot) -> None:
            check(cudart.cudaSetDevice(ring.device), "cudaSetDevice")
            ring.launch(slot, ring.stage(slot, feeds), self.enqueue)

        # Side by side: most of a first run is the host's setup (ResNet-50 fp16's load and
        # warm-up on an H100, then a session per slot: 1.71 s with the first runs one after the
        # other, 0.75 s side by side; docs/gpu.md).
        try:
            with ThreadPoolExecutor(len(slots), "batch-infer-warm-up") as pool:
                for launched in [pool.submit(first_run, slot) for slot in slots]:
                    launched.result()
        finally:  # also after a failed launch: no slot goes back with work in flight
            synced = [cudart.cudaStreamSynchronize(slot.stream) for slot in slots]
            for slot in slots:
                ring.release(slot)
        for result in synced:
            check(result, "cudaStreamSynchronize")

    def resident(self, feeds: Feeds) -> ResidentBatch:
        """`feeds` copied to the device once, for launches without copies (benchmarks)."""
        self._ring()
        return ResidentBatch(self, feeds)

    def busy_seconds(self) -> float:
        return self.ring.busy_seconds() if self.ring is not None else 0.0

    def close(self) -> None:
        """Wait for the streams, free every buffer, then drop the model; idempotent."""
        ring, self.ring = self.ring, None
        if ring is not None:
            ring.close()
        self.release()
