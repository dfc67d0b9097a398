"""A simulated CUDA device for CPU tests: cuda-python's runtime calls and TensorRT's execution
contexts, with streams that really run asynchronously.

    host thread                          one worker thread per stream
    cudaMemcpyAsync(dst, src, n, s1) --> s1: [copy] [copy] [wait e0@s2:1] [kernel] ...
    cudaEventRecord(e0, s2)          --> s2: [copy] | e0 = "s2 has run 1 item"
    cudaStreamSynchronize(s1)        <-- the host blocks until s1 has run all it had queued

What makes it honest, i.e. able to fail code that misses a synchronisation:

- each stream is a worker thread that runs its queue in order, each item after a random delay
  (seeded, configurable per stream with ``set_delay``), so streams overtake each other and the
  host keeps running ahead of them;
- copies and kernels read their sources when the stream reaches them, not when they are queued:
  a host buffer overwritten before its upload runs uploads the new bytes, and a download read
  before a synchronisation is stale. This is stricter than CUDA for pageable host memory (the
  driver may stage it at call time); code that relies on that is flagged as well;
- an event records a point in a stream; ``cudaStreamWaitEvent`` holds the waiting stream until
  that point has run; ``cudaEventSynchronize``, ``cudaStreamSynchronize`` and
  ``cudaDeviceSynchronize`` hold the host; ``cudaFree`` / ``cudaFreeHost`` synchronise the
  device first, as CUDA's do;
- stream capture records the stream's work instead of running it; ``cudaGraphLaunch`` replays
  it on a stream; synchronising a capturing stream invalidates the capture, as in CUDA;
- a copy must name memory of the right kind (device pointers inside a ``cudaMalloc``, host
  pointers outside), and a captured copy must use pinned host memory;
- an exception inside queued work is a sticky fault, like a crashed kernel: every later call
  returns ``cudaErrorLaunchFailure`` (the exception is kept in ``fault``);
  ``inject_sticky_error`` does the same on demand, ``fail_next`` fails one named call.

"Device" memory is host memory (numpy buffers), so pointers are plain addresses and the fake
engines compute with numpy on views of those bytes. Nothing here knows the backend under test:
it simulates ``cuda.bindings.runtime`` and the TensorRT runtime/engine/context calls.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import functools
import logging
import random
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's spelling
    """The error codes the fake returns (values as in CUDA's driver_types.h)."""

    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchTimeout = 702
    cudaErrorLaunchFailure = 719
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


OK = cudaError_t.cudaSuccess
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE, DEFAULT = 1, 2, 3, 4


def view(ptr: int, shape, dtype) -> np.ndarray:
    """A numpy array over ``prod(shape)`` elements at address ``ptr`` (no copy)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def _api(values: int = 0):
    """Wrap a cudart call: count it, honour a sticky fault or an injected failure, shape the result.

    cuda-python returns ``(err,)`` or ``(err, value, ...)``; a failed call keeps the arity with
    ``None`` values, which is what ``check`` unpacks.
    """

    def wrap(method):
        @functools.wraps(method)
        def call(self: "FakeCudart", *args):
            name = method.__name__
            with self._cv:
                self.calls[name] += 1
                self.history.append(name)
                injected = self._fail_next.pop(name, None)
            error = injected or self.fault_code
            if error is not None and name in _RELEASES:
                self.release_attempts.append((name, int(args[0])))  # a failed release still counts as tried
            if error is not None:
                return (error, *([None] * values))
            result = method(self, *args)
            return result if isinstance(result, tuple) else (result,)

        return call

    return wrap


_RELEASES = {"cudaFree", "cudaFreeHost", "cudaStreamDestroy", "cudaEventDestroy", "cudaGraphDestroy", "cudaGraphExecDestroy"}


@dataclass
class _Item:
    label: str
    run: Callable[[], None] | None = None  # a copy or a kernel
    wait: tuple["_Stream", int] | None = None  # cudaStreamWaitEvent: (stream, point)


class _Stream:
    """A queue of work and the thread that runs it; ``completed`` counts the items run so far."""

    def __init__(self, device: "FakeCudart", handle: int, seed: int) -> None:
        self.device, self.handle = device, handle
        self.rng = random.Random(seed)
        self.queue: collections.deque[_Item] = collections.deque()
        self.submitted = self.completed = 0
        self.capture: list[_Item] | None = None
        self.capture_invalidated = False
        self.closed = False
        self.finished_at: dict[int, float] = {}  # point -> time, for points an event recorded
        self.thread = threading.Thread(target=self._work, name=f"fake-cuda-stream-{handle}", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        device = self.device
        while True:
            with device._cv:
                device._cv.wait_for(lambda: self.queue or self.closed)
                if not self.queue:
                    return  # destroyed and drained
                item = self.queue[0]
                low, high = device.delay_for(self.handle)
            if high > 0:
                time.sleep(self.rng.uniform(low, high) / 1000)  # the simulated device's latency
            if item.wait is not None:
                other, point = item.wait
                with device._cv:
                    if not device._cv.wait_for(lambda: other.completed >= point or device.fault_code, device.timeout_s):
                        device._set_fault(TimeoutError(f"waited {device.timeout_s} s for stream {other.handle}"), item.label)
            elif device.fault_code is None:  # a faulted device runs nothing more
                try:
                    item.run()
                except BaseException as exc:  # noqa: BLE001 - becomes the sticky fault every later call reports
                    device._set_fault(exc, item.label)
            with device._cv:
                self.queue.popleft()
                self.completed += 1
                if self.completed in self.finished_at:
                    self.finished_at[self.completed] = time.perf_counter()
                device._cv.notify_all()


class _Event:
    def __init__(self) -> None:
        self.stream: _Stream | None = None  # never recorded: complete
        self.point = 0


class FakeCudart:
    """The ``cuda.bindings.runtime`` calls a backend makes, on host memory and worker threads.

    ``delay_ms`` is the default (low, high) range of each item's random delay; ``set_delay``
    overrides it per stream (e.g. a slow copy stream, to make a race certain). ``seed`` seeds
    every stream's delays. Host waits give up after ``timeout_s`` with a fault, so a missing
    record shows up as a failure, not a hung test.
    """

    cudaStreamNonBlocking, cudaStreamDefault = 1, 0
    cudaEventDefault, cudaEventDisableTiming = 0, 2
    cudaMemcpyKind = types.SimpleNamespace(
        cudaMemcpyHostToHost=0, cudaMemcpyHostToDevice=HOST_TO_DEVICE, cudaMemcpyDeviceToHost=DEVICE_TO_HOST,
        cudaMemcpyDeviceToDevice=DEVICE_TO_DEVICE, cudaMemcpyDefault=DEFAULT,
    )
    cudaStreamCaptureMode = types.SimpleNamespace(
        cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1, cudaStreamCaptureModeRelaxed=2
    )
    cudaError_t = cudaError_t

    def __init__(
        self, *, delay_ms: tuple[float, float] = (0.0, 2.0), seed: int = 0, total_bytes: int = 2 << 30, timeout_s: float = 30.0
    ) -> None:
        self.default_delay_ms, self.seed, self.total_bytes, self.timeout_s = delay_ms, seed, total_bytes, timeout_s
        self._cv = threading.Condition()
        self._next_handle = 0x1000
        self.buffers: dict[int, np.ndarray] = {}  # device and pinned allocations by address
        self.pinned: set[int] = set()  # which of them came from cudaMallocHost
        self.streams: dict[int, _Stream] = {}
        self.events: dict[int, _Event] = {}
        self.graphs: dict[int, list[_Item]] = {}
        self.graph_execs: dict[int, list[_Item]] = {}
        self._delays: dict[int, tuple[float, float]] = {}
        self._all_streams: list[_Stream] = []
        self._fail_next: dict[str, cudaError_t] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.history: list[str] = []  # every call's name, in order
        self.release_attempts: list[tuple[str, int]] = []  # (call, handle) of releases that failed
        self.fault_code: cudaError_t | None = None
        self.fault: BaseException | None = None
        self.fault_injected = False
        self.bytes_to_device = self.bytes_to_host = self.graph_launches = 0
        self.host_bytes: collections.Counter[tuple[str, int]] = collections.Counter()  # ("to_device"|"to_host", host allocation) -> bytes

    # --- the simulation's own controls (not CUDA calls) --------------------------------------------
    def set_delay(self, stream: int | None, low_ms: float, high_ms: float | None = None) -> None:
        """Random delay range before each item of ``stream`` (None: the default for all streams)."""
        value = (low_ms, low_ms if high_ms is None else high_ms)
        with self._cv:
            if stream is None:
                self.default_delay_ms = value
            else:
                self._delays[int(stream)] = value

    def delay_for(self, stream: int) -> tuple[float, float]:
        return self._delays.get(stream, self.default_delay_ms)

    def inject_sticky_error(self, code: cudaError_t = cudaError_t.cudaErrorIllegalAddress) -> None:
        """From now on every call returns ``code`` and no queued work runs (a corrupted context)."""
        self.fault_injected = True
        self._set_fault(RuntimeError(f"injected {code.name}"), "inject_sticky_error", code)

    def fail_next(self, call: str, code: cudaError_t = cudaError_t.cudaErrorInvalidValue) -> None:
        """The next call of ``call`` (e.g. 'cudaFreeHost') returns ``code`` and does nothing."""
        with self._cv:
            self._fail_next[call] = code

    def launch(self, stream: int, run: Callable[[], None], label: str = "kernel") -> cudaError_t:
        """Queue a 'kernel' (a Python callable on device memory) on ``stream``; fake engines use it."""
        if self.fault_code is not None:
            return self.fault_code
        return self._submit(stream, _Item(label, run=run))

    def shutdown(self) -> list[str]:
        """Stop every worker (destroyed or not); returns the names of threads that did not stop."""
        with self._cv:
            for stream in self._all_streams:
                stream.closed = True
            self._cv.notify_all()
        for stream in self._all_streams:
            stream.thread.join(timeout=5)
        return [s.thread.name for s in self._all_streams if s.thread.is_alive()]

    def unreleased(self) -> list[str]:
        """Resources still held whose release was never even attempted (a failed release counts as tried)."""
        tried = {handle for _, handle in self.release_attempts}
        held = [("pinned buffer" if p in self.pinned else "device buffer", p) for p in self.buffers]
        held += [("stream", h) for h in self.streams if h != 0] + [("event", h) for h in self.events]
        held += [("graph", h) for h in self.graphs] + [("graph exec", h) for h in self.graph_execs]
        return [f"{kind} 0x{handle:x}" for kind, handle in held if handle not in tried]

    def live_resources(self) -> dict[str, int]:
        """How many allocations, streams, events, graphs and graph executables are still held."""
        return {
            "device buffers": len(self.buffers) - len(self.pinned), "pinned buffers": len(self.pinned),
            "streams": len(self.streams), "events": len(self.events),
            "graphs": len(self.graphs), "graph execs": len(self.graph_execs),
        }

    # --- internals ---------------------------------------------------------------------------------
    def _set_fault(self, exc: BaseException, where: str, code: cudaError_t = cudaError_t.cudaErrorLaunchFailure) -> None:
        with self._cv:
            if self.fault_code is None:
                self.fault, self.fault_code = exc, code
                log.error("simulated device fault in %s: %r", where, exc)
            self._cv.notify_all()

    def _handle(self) -> int:
        with self._cv:
            self._next_handle += 1
            return self._next_handle

    def _stream(self, handle: int) -> _Stream | None:
        handle = int(handle)
        if handle == 0 and 0 not in self.streams:  # the default stream, created on first use
            self.streams[0] = _Stream(self, 0, self.seed)
            self._all_streams.append(self.streams[0])
        return self.streams.get(handle)

    def _submit(self, stream_handle: int, item: _Item) -> cudaError_t:
        stream = self._stream(stream_handle)
        if stream is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        with self._cv:
            if stream.capture is not None:
                stream.capture.append(item)
            else:
                stream.queue.append(item)
                stream.submitted += 1
                self._cv.notify_all()
        return OK

    def _wait(self, done: Callable[[], bool], what: str) -> cudaError_t:
        with self._cv:
            if not self._cv.wait_for(lambda: done() or self.fault_code is not None, self.timeout_s):
                self._set_fault(TimeoutError(f"{what} waited more than {self.timeout_s} s"), what, cudaError_t.cudaErrorLaunchTimeout)
            return self.fault_code or OK

    def _owner(self, ptr: int, nbytes: int) -> str:
        """'device', 'pinned' or 'pageable' for the range; ValueError if it straddles an allocation."""
        for base, buffer in self.buffers.items():
            if base <= ptr < base + buffer.nbytes or base < ptr + nbytes <= base + buffer.nbytes:
                if not (base <= ptr and ptr + nbytes <= base + buffer.nbytes):
                    raise ValueError(f"[0x{ptr:x}, +{nbytes}) runs past its allocation at 0x{base:x} (+{buffer.nbytes})")
                return "pinned" if base in self.pinned else "device"
        return "pageable"

    def _check_copy(self, stream_handle: int, dst: int, dst_span: int, src: int, src_span: int, kind: int) -> cudaError_t:
        try:
            dst_kind, src_kind = self._owner(dst, dst_span), self._owner(src, src_span)
        except ValueError as err:
            log.error("cudaMemcpy: %s", err)
            return cudaError_t.cudaErrorInvalidValue
        if kind == DEFAULT:
            kind = {(True, False): HOST_TO_DEVICE, (False, True): DEVICE_TO_HOST, (True, True): DEVICE_TO_DEVICE}.get(
                (dst_kind == "device", src_kind == "device"), 0
            )
        expected = {HOST_TO_DEVICE: ("device", False), DEVICE_TO_HOST: (False, "device"), DEVICE_TO_DEVICE: ("device", "device")}
        want_dst, want_src = expected.get(kind, (None, None))
        if want_dst is None or (dst_kind == "device") != bool(want_dst) or (src_kind == "device") != bool(want_src):
            log.error("cudaMemcpy kind %s with destination in %s memory and source in %s memory", kind, dst_kind, src_kind)
            return cudaError_t.cudaErrorInvalidValue
        stream = self._stream(stream_handle)
        if stream is not None and stream.capture is not None and "pageable" in (dst_kind, src_kind):
            stream.capture_invalidated = True  # a graph cannot copy pageable host memory
            return cudaError_t.cudaErrorStreamCaptureUnsupported
        return OK

    def _base(self, ptr: int) -> int:
        """The allocation holding ``ptr`` (0 for pageable memory)."""
        for base, buffer in self.buffers.items():
            if base <= ptr < base + buffer.nbytes:
                return base
        return 0

    def _count(self, kind: int, nbytes: int, host: int = 0) -> None:
        """Bytes across the bus, in total and per host allocation (``host`` is its base, 0: pageable)."""
        with self._cv:
            if kind == HOST_TO_DEVICE:
                self.bytes_to_device += nbytes
                self.host_bytes[("to_device", host)] += nbytes
            elif kind == DEVICE_TO_HOST:
                self.bytes_to_host += nbytes
                self.host_bytes[("to_host", host)] += nbytes

    def bytes_with(self, allocation: int) -> dict[str, int]:
        """Bytes copied from (to_device) and into (to_host) the host allocation at ``allocation``."""
        return {direction: self.host_bytes[(direction, allocation)] for direction in ("to_device", "to_host")}

    # --- device, memory ----------------------------------------------------------------------------
    @_api()
    def cudaSetDevice(self, device):  # noqa: N802
        return OK

    @_api(values=2)
    def cudaMemGetInfo(self):  # noqa: N802
        used = sum(b.nbytes for p, b in self.buffers.items() if p not in self.pinned)
        return OK, self.total_bytes - used, self.total_bytes

    def _allocate(self, nbytes: int, pinned: bool):
        buffer = np.zeros(max(int(nbytes), 1), np.uint8)
        ptr = buffer.ctypes.data
        with self._cv:
            self.buffers[ptr] = buffer
            if pinned:
                self.pinned.add(ptr)
        return OK, ptr

    def _free(self, ptr: int, pinned: bool) -> cudaError_t:
        if ptr == 0:
            return OK
        error = self._wait(lambda: all(s.completed >= s.submitted for s in self._all_streams), "cudaFree")
        if error:
            return error
        with self._cv:
            if ptr not in self.buffers or (ptr in self.pinned) != pinned:
                return cudaError_t.cudaErrorInvalidValue
            del self.buffers[ptr]
            self.pinned.discard(ptr)
        return OK

    @_api(values=1)
    def cudaMalloc(self, nbytes):  # noqa: N802
        return self._allocate(nbytes, pinned=False)

    @_api(values=1)
    def cudaMallocHost(self, nbytes):  # noqa: N802
        return self._allocate(nbytes, pinned=True)

    @_api()
    def cudaFree(self, ptr):  # noqa: N802
        return self._free(int(ptr), pinned=False)

    @_api()
    def cudaFreeHost(self, ptr):  # noqa: N802
        return self._free(int(ptr), pinned=True)

    # --- copies ------------------------------------------------------------------------------------
    @_api()
    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        dst, src, nbytes, kind = int(dst), int(src), int(nbytes), int(kind)
        error = self._check_copy(stream, dst, nbytes, src, nbytes, kind)
        if error:
            return error

        host = self._base(src if kind == HOST_TO_DEVICE else dst)

        def copy() -> None:  # reads the source now, when the stream reaches it
            ctypes.memmove(dst, src, nbytes)
            self._count(kind, nbytes, host)

        return self._submit(stream, _Item(f"cudaMemcpyAsync({nbytes} B, kind {kind})", run=copy))

    @_api()
    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        dst, dpitch, src, spitch, width, height, kind = (int(x) for x in (dst, dpitch, src, spitch, width, height, kind))
        if width > min(dpitch, spitch):
            return cudaError_t.cudaErrorInvalidValue
        span = lambda pitch: (height - 1) * pitch + width if height else 0  # noqa: E731
        error = self._check_copy(stream, dst, span(dpitch), src, span(spitch), kind)
        if error:
            return error

        host = self._base(src if kind == HOST_TO_DEVICE else dst)

        def copy() -> None:
            for row in range(height):
                ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
            self._count(kind, width * height, host)

        return self._submit(stream, _Item(f"cudaMemcpy2DAsync({height} x {width} B, kind {kind})", run=copy))

    @_api()
    def cudaMemsetAsync(self, ptr, value, nbytes, stream):  # noqa: N802
        ptr, value, nbytes = int(ptr), int(value), int(nbytes)
        if self._owner(ptr, nbytes) != "device":
            return cudaError_t.cudaErrorInvalidValue
        return self._submit(stream, _Item(f"cudaMemsetAsync({nbytes} B)", run=lambda: ctypes.memset(ptr, value, nbytes)))

    # --- streams -----------------------------------------------------------------------------------
    def _new_stream(self):
        handle = self._handle()
        stream = _Stream(self, handle, self.seed * 1_000_003 + handle)
        with self._cv:
            self.streams[handle] = stream
            self._all_streams.append(stream)
        return OK, handle

    @_api(values=1)
    def cudaStreamCreate(self):  # noqa: N802
        return self._new_stream()

    @_api(values=1)
    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        return self._new_stream()  # streams never synchronise implicitly with the default stream here

    @_api()
    def cudaStreamDestroy(self, stream):  # noqa: N802
        with self._cv:
            found = self.streams.pop(int(stream), None)
            if found is None:
                return cudaError_t.cudaErrorInvalidResourceHandle
            found.closed = True  # like CUDA: queued work still runs, then the stream goes
            self._cv.notify_all()
        return OK

    @_api()
    def cudaStreamSynchronize(self, stream):  # noqa: N802
        found = self._stream(stream)
        if found is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if found.capture is not None:
            found.capture_invalidated = True
            return cudaError_t.cudaErrorStreamCaptureUnsupported
        point = found.submitted
        return self._wait(lambda: found.completed >= point, f"cudaStreamSynchronize({int(stream)})")

    @_api()
    def cudaDeviceSynchronize(self):  # noqa: N802
        with self._cv:
            points = [(s, s.submitted) for s in self.streams.values()]
        return self._wait(lambda: all(s.completed >= p for s, p in points), "cudaDeviceSynchronize")

    @_api()
    def cudaStreamWaitEvent(self, stream, event, flags=0):  # noqa: N802
        found, recorded = self._stream(stream), self.events.get(int(event))
        if found is None or recorded is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if recorded.stream is None:
            return OK  # an event never recorded has happened
        return self._submit(stream, _Item(f"wait for event {int(event)}", wait=(recorded.stream, recorded.point)))

    # --- events ------------------------------------------------------------------------------------
    def _new_event(self):
        handle = self._handle()
        with self._cv:
            self.events[handle] = _Event()
        return OK, handle

    @_api(values=1)
    def cudaEventCreate(self):  # noqa: N802
        return self._new_event()

    @_api(values=1)
    def cudaEventCreateWithFlags(self, flags):  # noqa: N802
        return self._new_event()  # timing is always on here

    @_api()
    def cudaEventDestroy(self, event):  # noqa: N802
        with self._cv:
            return OK if self.events.pop(int(event), None) is not None else cudaError_t.cudaErrorInvalidResourceHandle

    @_api()
    def cudaEventRecord(self, event, stream):  # noqa: N802
        recorded, found = self.events.get(int(event)), self._stream(stream)
        if recorded is None or found is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if found.capture is not None:
            found.capture_invalidated = True  # cross-stream capture is not simulated
            return cudaError_t.cudaErrorStreamCaptureUnsupported
        with self._cv:
            recorded.stream, recorded.point = found, found.submitted
            if found.completed >= found.submitted:
                found.finished_at[found.submitted] = time.perf_counter()
            else:
                found.finished_at.setdefault(found.submitted, 0.0)
        return OK

    @_api()
    def cudaEventSynchronize(self, event):  # noqa: N802
        recorded = self.events.get(int(event))
        if recorded is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        stream, point = recorded.stream, recorded.point
        return self._wait(lambda: stream is None or stream.completed >= point, f"cudaEventSynchronize({int(event)})")

    @_api()
    def cudaEventQuery(self, event):  # noqa: N802
        recorded = self.events.get(int(event))
        if recorded is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        done = recorded.stream is None or recorded.stream.completed >= recorded.point
        return OK if done else cudaError_t.cudaErrorNotReady

    @_api(values=1)
    def cudaEventElapsedTime(self, start, end):  # noqa: N802
        times = []
        for handle in (start, end):
            recorded = self.events.get(int(handle))
            if recorded is None or recorded.stream is None or not recorded.stream.finished_at.get(recorded.point):
                return cudaError_t.cudaErrorNotReady, None
            times.append(recorded.stream.finished_at[recorded.point])
        return OK, (times[1] - times[0]) * 1000.0

    # --- graphs ------------------------------------------------------------------------------------
    @_api()
    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        found = self._stream(stream)
        if found is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if found.capture is not None:
            return cudaError_t.cudaErrorStreamCaptureUnsupported
        found.capture, found.capture_invalidated = [], False
        return OK

    @_api(values=1)
    def cudaStreamEndCapture(self, stream):  # noqa: N802
        found = self._stream(stream)
        if found is None or found.capture is None:
            return cudaError_t.cudaErrorInvalidValue, None
        items, invalidated = found.capture, found.capture_invalidated
        found.capture = None
        if invalidated:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        handle = self._handle()
        self.graphs[handle] = items
        return OK, handle

    @_api(values=1)
    def cudaGraphInstantiate(self, graph, flags=0):  # noqa: N802
        if int(graph) not in self.graphs:
            return cudaError_t.cudaErrorInvalidResourceHandle, None
        handle = self._handle()
        self.graph_execs[handle] = list(self.graphs[int(graph)])
        return OK, handle

    @_api()
    def cudaGraphDestroy(self, graph):  # noqa: N802
        return OK if self.graphs.pop(int(graph), None) is not None else cudaError_t.cudaErrorInvalidResourceHandle

    @_api()
    def cudaGraphExecDestroy(self, graph_exec):  # noqa: N802
        return OK if self.graph_execs.pop(int(graph_exec), None) is not None else cudaError_t.cudaErrorInvalidResourceHandle

    @_api()
    def cudaGraphLaunch(self, graph_exec, stream):  # noqa: N802
        items = self.graph_execs.get(int(graph_exec))
        if items is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        with self._cv:
            self.graph_launches += 1
        for item in items:  # replayed in capture order, each read when the stream reaches it
            error = self._submit(stream, item)
            if error:
                return error
        return OK


# --- TensorRT ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor. ``dtype`` is TensorRT's name (FLOAT, HALF, INT64, INT32, BOOL, UINT8);
    inputs carry their profile (min, opt, max); ``on_host`` tensors (shape tensors) are read from
    host memory when the engine is enqueued, the rest from device memory when it runs."""

    name: str
    dtype: str
    is_input: bool = True
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    on_host: bool = False


NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_, "UINT8": np.uint8}


class FakeEngine:
    """A 'deserialized engine': its tensors, a rule for output shapes, and a numpy computation.

    ``output_shapes(input_shapes) -> {output: shape}``; ``compute(inputs) -> {output: array}``
    runs on the stream's worker thread with the inputs read from (fake) device memory at that
    moment. ``weights_bytes`` are taken through the runtime's gpu_allocator when one is set.
    """

    def __init__(
        self, device: FakeCudart, tensors: list[TensorSpec], *,
        output_shapes: Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]],
        compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        name: str = "engine", weights_bytes: int = 0, device_memory_bytes: int = 1 << 20,
    ) -> None:
        self.device, self.name = device, name
        self.tensors = {t.name: t for t in tensors}
        self.output_shapes, self.compute = output_shapes, compute
        self.weights_bytes, self.device_memory_size_v2 = weights_bytes, device_memory_bytes
        self.executions = 0
        self.trt = None  # the fake module, set by its Runtime

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str):
        return self.trt.TensorIOMode.INPUT if self.tensors[name].is_input else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return types.SimpleNamespace(name=self.tensors[name].dtype)

    def get_tensor_location(self, name: str):
        return self.trt.TensorLocation.HOST if self.tensors[name].on_host else self.trt.TensorLocation.DEVICE

    def is_shape_inference_io(self, name: str) -> bool:  # TensorRT's word for a shape tensor, read on the host
        return self.tensors[name].on_host

    def get_tensor_profile_shape(self, name: str, profile: int):
        return self.tensors[name].profile

    def get_device_memory_size_for_profile_v2(self, profile: int) -> int:
        return self.device_memory_size_v2

    def create_execution_context(self, strategy=None) -> "FakeContext":
        return FakeContext(self, user_managed=strategy == self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)


class FakeContext:
    """An execution context: shapes, addresses, and ``execute_async_v3`` queueing the engine as a kernel."""

    def __init__(self, engine: FakeEngine, *, user_managed: bool) -> None:
        self.engine, self.user_managed = engine, user_managed
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory: tuple[int, int] | None = None

    def _error(self, message: str) -> bool:
        self.engine.trt.report_error(f"{self.engine.name}: {message}")
        return False

    def set_device_memory(self, ptr: int, nbytes: int) -> None:
        self.device_memory = (int(ptr), int(nbytes))

    def is_stream_capturable(self, stream: int) -> bool:
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape, low, high = tuple(int(s) for s in shape), self.engine.tensors[name].profile[0], self.engine.tensors[name].profile[2]
        if len(shape) != len(high) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            return self._error(f"shape {shape} of {name!r} outside the profile {low}..{high}")
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        tensor = self.engine.tensors[name]
        if tensor.is_input:
            return self.shapes.get(name, tuple(-1 for _ in tensor.profile[2]))
        return tuple(self.engine.output_shapes(dict(self.shapes))[name])

    def execute_async_v3(self, stream: int) -> bool:
        engine, device = self.engine, self.engine.device
        if self.user_managed and self.device_memory is None:
            return self._error("no device memory set on a USER_MANAGED context")
        missing = [n for n, t in engine.tensors.items() if n not in self.addresses or (t.is_input and n not in self.shapes)]
        if missing:
            return self._error(f"tensors without an address or a shape: {missing}")
        shapes = dict(self.shapes)  # what a capture bakes in
        shapes.update(engine.output_shapes(shapes))
        addresses = dict(self.addresses)
        for name, tensor in engine.tensors.items():
            where = device._owner(addresses[name], int(np.prod(shapes[name])) * np.dtype(NUMPY[tensor.dtype]).itemsize)
            if (where == "device") == tensor.on_host:
                return self._error(f"{name!r} must be in {'host' if tensor.on_host else 'device'} memory, got {where}")
        host_inputs = {  # shape tensors: TensorRT reads them from the host at enqueue time
            n: view(addresses[n], shapes[n], NUMPY[t.dtype]).copy() for n, t in engine.tensors.items() if t.on_host and t.is_input
        }

        def run() -> None:
            inputs = dict(host_inputs)
            for name, tensor in engine.tensors.items():
                if tensor.is_input and not tensor.on_host:
                    inputs[name] = view(addresses[name], shapes[name], NUMPY[tensor.dtype]).copy()
            outputs = engine.compute(inputs)
            for name, value in outputs.items():
                if value.shape != tuple(shapes[name]):
                    raise AssertionError(f"{engine.name}: output {name!r} has shape {value.shape}, expected {shapes[name]}")
                view(addresses[name], value.shape, NUMPY[engine.tensors[name].dtype])[...] = value
            engine.executions += 1

        return device.launch(stream, run, f"{engine.name} execute_async_v3") == OK


def fake_tensorrt(device: FakeCudart, load: Callable[[bytes], FakeEngine], *, name: str = "tensorrt") -> types.SimpleNamespace:
    """A module-like namespace with the TensorRT runtime API a backend uses; ``load`` turns the
    bytes of an engine file into a FakeEngine."""
    trt = types.SimpleNamespace(__name__=name, __version__="10.0.0.0-fake")
    loggers: list = []  # the loggers runtimes were created with: errors go to the latest

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None:
            pass

    class IGpuAllocator:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger, self.gpu_allocator = logger, None
            loggers.append(logger)

        def deserialize_cuda_engine(self, data: bytes):
            engine = load(data)
            engine.trt = trt
            if self.gpu_allocator is not None and engine.weights_bytes:
                if self.gpu_allocator.allocate_async(engine.weights_bytes, 256, 0, 0) is None:
                    trt.report_error(f"{engine.name}: could not allocate {engine.weights_bytes} bytes of weights")
                    return None
            return engine

    def report_error(message: str) -> None:
        """What TensorRT does with an error: hand it to the logger (the caller sees a False or a None)."""
        for logger in loggers[-1:]:
            logger.log(ILogger.Severity.ERROR, message)

    trt.ILogger, trt.IGpuAllocator, trt.Runtime, trt.report_error = ILogger, IGpuAllocator, Runtime, report_error
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2)
    return trt
