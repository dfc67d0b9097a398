"""Thin cuda-python helpers: errors, one device arena, one pinned host pool, streams, events, graphs.

    DeviceArena(budget)     ONE cudaMalloc, carved by ArenaLayout into named regions:
                            | weights | activations | io | video | decode |
                            every region starts on a 256-byte boundary
    PinnedHostPool(bytes)   ONE cudaMallocHost; numpy arrays are views carved out of it
    Stream, Event           a compute stream and copy streams, ordered by events
    CudaGraph               capture a stream's work once, replay it with one launch

Everything is allocated before the first request; the decode loop only copies and launches.
``ArenaLayout`` and ``FirstFitAllocator`` are pure Python (offsets, alignment, overflow errors)
and test on the CPU. cuda-python is imported on first use, so this module imports anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from videoxl.engines.profiles import format_bytes

log = logging.getLogger(__name__)

ALIGNMENT = 256  # cudaMalloc's guarantee, and what TensorRT asks of tensor addresses


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and the CUDA error."""


class ArenaOverflowError(ValueError):
    """A region does not fit in what is left of its arena; names the region and the bytes missing."""


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


# --- pure layout: offsets, alignment, overflow --------------------------------------------------
@dataclass(frozen=True)
class Region:
    name: str
    offset: int  # bytes from the start of the arena
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class ArenaLayout:
    """Regions placed one after another in ``capacity`` bytes, each start aligned.

    ``base`` offsets every region (a layout inside a region of a bigger arena uses the region's
    offset). The last region may be shrunk to what it really used (``shrink_last``), which is
    how the weights region gives back what TensorRT did not take.
    """

    def __init__(self, capacity: int, *, alignment: int = ALIGNMENT, base: int = 0, label: str = "arena") -> None:
        if capacity < 0 or alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"{label}: capacity {capacity} must be >= 0 and alignment {alignment} a power of two")
        self.capacity, self.alignment, self.base, self.label = capacity, alignment, base, label
        self.regions: dict[str, Region] = {}
        self._cursor = 0  # relative to base

    @property
    def used(self) -> int:
        return self._cursor

    @property
    def free(self) -> int:
        return max(self.capacity - align_up(self._cursor, self.alignment), 0)

    def add(self, name: str, nbytes: int) -> Region:
        if name in self.regions:
            raise ValueError(f"{self.label}: region {name!r} already placed")
        if nbytes < 0:
            raise ValueError(f"{self.label}: region {name!r} asks for {nbytes} bytes")
        start = align_up(self._cursor, self.alignment)
        if start + nbytes > self.capacity:
            missing = start + nbytes - self.capacity
            placed = ", ".join(f"{r.name} {format_bytes(r.nbytes)}" for r in self.regions.values()) or "nothing"
            raise ArenaOverflowError(
                f"{self.label}: region {name!r} needs {format_bytes(nbytes)} ({nbytes} bytes) but only "
                f"{format_bytes(max(self.capacity - start, 0))} of {format_bytes(self.capacity)} are left "
                f"after {placed}: {missing} bytes ({format_bytes(missing)}) missing"
            )
        region = Region(name, self.base + start, nbytes)
        self.regions[name] = region
        self._cursor = start + nbytes
        return region

    def __getitem__(self, name: str) -> Region:
        try:
            return self.regions[name]
        except KeyError:
            raise KeyError(f"{self.label}: no region {name!r} (placed: {', '.join(self.regions) or 'none'})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.regions

    def shrink_last(self, name: str, nbytes: int) -> Region:
        """Give back the tail of the most recently placed region (it keeps its offset)."""
        last = next(reversed(self.regions), None)
        if last != name:
            raise ValueError(f"{self.label}: only the last region ({last!r}) can shrink, not {name!r}")
        region = self.regions[name]
        if not 0 <= nbytes <= region.nbytes:
            raise ValueError(f"{self.label}: cannot shrink {name!r} from {region.nbytes} to {nbytes} bytes")
        self.regions[name] = Region(name, region.offset, nbytes)
        self._cursor = region.offset - self.base + nbytes
        return self.regions[name]

    def describe(self) -> list[str]:
        return [f"{r.name:<14} {format_bytes(r.nbytes):>12} at +{r.offset}" for r in self.regions.values()]


class FirstFitAllocator:
    """Offsets handed out from ``capacity`` bytes with frees (TensorRT's weight allocations).

    First fit over a sorted free list; neighbouring free blocks merge. ``high_water`` is the
    furthest byte ever used, i.e. how much of the region the allocations really needed.
    """

    def __init__(self, capacity: int, *, alignment: int = ALIGNMENT, label: str = "region") -> None:
        self.capacity, self.alignment, self.label = capacity, alignment, label
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (offset, size), sorted
        self._used: dict[int, int] = {}
        self.high_water = 0
        self.failed_request = 0  # size of the last request that did not fit

    @property
    def used(self) -> int:
        return sum(self._used.values())

    def allocate(self, nbytes: int, alignment: int = 0) -> int | None:
        """Offset of ``nbytes`` bytes, or None when no free block is large enough."""
        align = max(alignment or 1, self.alignment)
        size = align_up(max(nbytes, 1), self.alignment)
        for index, (offset, free) in enumerate(self._free):
            start = align_up(offset, align)
            if start + size <= offset + free:
                pieces = [(offset, start - offset), (start + size, offset + free - start - size)]
                self._free[index : index + 1] = [(o, s) for o, s in pieces if s > 0]
                self._used[start] = size
                self.high_water = max(self.high_water, start + size)
                return start
        self.failed_request = nbytes
        return None

    def shrink(self, capacity: int) -> None:
        """Cut the region to ``capacity`` bytes (at least the high-water mark)."""
        if not self.high_water <= capacity <= self.capacity:
            raise ValueError(f"{self.label}: cannot shrink to {capacity} bytes ({self.high_water} in use, {self.capacity} held)")
        self._free = [(o, min(s, capacity - o)) for o, s in self._free if o < capacity]
        self.capacity = capacity

    def release(self, offset: int) -> None:
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(f"{self.label}: offset {offset} was not allocated here")
        blocks = sorted(self._free + [(offset, size)])
        merged: list[tuple[int, int]] = []
        for start, length in blocks:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged


# --- CUDA calls -----------------------------------------------------------------------------------
def cudart() -> ModuleType:
    """cuda.bindings.runtime (cuda-python >= 12.6), imported on first use."""
    try:
        from cuda.bindings import runtime
    except ImportError as err:
        raise CudaError(f"cuda-python is not installed ({err}); pip install 'videoxl[tensorrt]'") from err
    return runtime


def check(result, what: str = "CUDA call"):
    """Unpack a cuda-python result ``(err, *values)``; raise CudaError naming the error if it failed."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def mem_get_info() -> tuple[int, int]:
    """(free, total) device bytes."""
    free, total = check(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def _kind(name: str):
    return getattr(cudart().cudaMemcpyKind, f"cudaMemcpy{name}")


def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: "Stream") -> None:
    """cudaMemcpyAsync; ``kind`` is HostToDevice, DeviceToHost or DeviceToDevice."""
    if nbytes:
        check(cudart().cudaMemcpyAsync(dst, src, nbytes, _kind(kind), stream.handle), f"cudaMemcpyAsync {kind} {nbytes} B")


def copy_2d_async(
    dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, kind: str, stream: "Stream"
) -> None:
    """``height`` rows of ``width`` bytes at different pitches (e.g. one slice of every layer)."""
    if width and height:
        check(
            cudart().cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, _kind(kind), stream.handle),
            f"cudaMemcpy2DAsync {kind} {height} x {width} B",
        )


def host_pointer(array: np.ndarray) -> int:
    if not array.flags.c_contiguous:
        raise ValueError("host arrays copied to or from the device must be C-contiguous")
    return int(array.ctypes.data)


# --- buffers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceBuffer:
    """A named slice of the arena: a device pointer and its size."""

    name: str
    ptr: int
    nbytes: int

    def at(self, offset: int) -> int:
        if not 0 <= offset <= self.nbytes:
            raise IndexError(f"{self.name}: offset {offset} outside {self.nbytes} bytes")
        return self.ptr + offset


@dataclass(frozen=True)
class KVSlabs:
    """Per-layer K and V buffers of ``capacity`` rows inside one region.

    Layout ``K0 V0 K1 V1 ...``, each slab aligned, so row r of every layer's K is ``pitch``
    bytes from the previous layer's: one 2-D copy moves a row range of all layers.
    """

    ptr: int
    layers: int
    capacity: int  # rows (tokens)
    row_bytes: int  # kv_heads x head_dim x itemsize

    @staticmethod
    def slab_bytes(capacity: int, row_bytes: int) -> int:
        return align_up(capacity * row_bytes, ALIGNMENT)

    @classmethod
    def nbytes(cls, layers: int, capacity: int, row_bytes: int) -> int:
        return 2 * layers * cls.slab_bytes(capacity, row_bytes)

    @property
    def pitch(self) -> int:
        return 2 * self.slab_bytes(self.capacity, self.row_bytes)

    def key(self, layer: int, row: int = 0) -> int:
        return self._at(2 * layer, layer, row)

    def value(self, layer: int, row: int = 0) -> int:
        return self._at(2 * layer + 1, layer, row)

    def _at(self, slab: int, layer: int, row: int) -> int:
        if not (0 <= layer < self.layers and 0 <= row <= self.capacity):
            raise IndexError(f"layer {layer}, row {row} outside {self.layers} layers x {self.capacity} rows")
        return self.ptr + slab * self.slab_bytes(self.capacity, self.row_bytes) + row * self.row_bytes


class DeviceRegion:
    """One region of a DeviceArena; buffers are carved from it in order."""

    def __init__(self, name: str, ptr: int, nbytes: int, *, alignment: int = ALIGNMENT) -> None:
        self.name, self.ptr, self.nbytes = name, ptr, nbytes
        self.layout = ArenaLayout(nbytes, alignment=alignment, label=f"arena region {name!r}")

    def carve(self, label: str, nbytes: int) -> DeviceBuffer:
        region = self.layout.add(label, nbytes)
        return DeviceBuffer(f"{self.name}/{label}", self.ptr + region.offset, nbytes)

    @property
    def buffer(self) -> DeviceBuffer:
        return DeviceBuffer(self.name, self.ptr, self.nbytes)


class DeviceArena:
    """ONE cudaMalloc of ``budget_bytes``; named regions placed by an ArenaLayout."""

    def __init__(self, budget_bytes: int, *, alignment: int = ALIGNMENT) -> None:
        self.layout = ArenaLayout(budget_bytes, alignment=alignment, label=f"device arena ({format_bytes(budget_bytes)})")
        self.ptr = int(check(cudart().cudaMalloc(budget_bytes), f"cudaMalloc({format_bytes(budget_bytes)}) for the arena"))
        self.regions: dict[str, DeviceRegion] = {}
        log.info("device arena: %s at 0x%x", format_bytes(budget_bytes), self.ptr)

    @property
    def budget_bytes(self) -> int:
        return self.layout.capacity

    def add(self, name: str, nbytes: int) -> DeviceRegion:
        region = self.layout.add(name, nbytes)
        self.regions[name] = DeviceRegion(name, self.ptr + region.offset, nbytes, alignment=self.layout.alignment)
        return self.regions[name]

    def shrink_last(self, name: str, nbytes: int) -> DeviceRegion:
        region = self.layout.shrink_last(name, nbytes)
        self.regions[name] = DeviceRegion(name, self.ptr + region.offset, region.nbytes, alignment=self.layout.alignment)
        return self.regions[name]

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree(arena)")
            self.ptr = 0


class PinnedHostPool:
    """ONE cudaMallocHost of ``nbytes``; numpy arrays carved from it stay valid until close()."""

    def __init__(self, nbytes: int, *, alignment: int = ALIGNMENT) -> None:
        self.layout = ArenaLayout(nbytes, alignment=alignment, label=f"pinned host pool ({format_bytes(nbytes)})")
        self.ptr = int(check(cudart().cudaMallocHost(max(nbytes, 1)), f"cudaMallocHost({format_bytes(nbytes)})"))

    def array(self, label: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        region = self.layout.add(label, count * dtype.itemsize)
        if count == 0:
            return np.empty(shape, dtype)
        raw = (ctypes.c_byte * region.nbytes).from_address(self.ptr + region.offset)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost(pinned pool)")
            self.ptr = 0


# --- streams, events, graphs ----------------------------------------------------------------------
class Stream:
    def __init__(self, name: str = "stream") -> None:
        rt = cudart()
        self.name = name
        self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), f"cudaStreamCreate({name})")
        self.handle = int(self._stream)

    def wait(self, event: "Event") -> None:
        """Work queued on this stream after this call starts once ``event`` has happened."""
        check(cudart().cudaStreamWaitEvent(self.handle, event.handle, 0), f"cudaStreamWaitEvent({self.name})")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), f"cudaStreamSynchronize({self.name})")

    def close(self) -> None:
        if self.handle:
            check(cudart().cudaStreamDestroy(self.handle), f"cudaStreamDestroy({self.name})")
            self.handle = 0


class Event:
    def __init__(self, *, timing: bool = False) -> None:
        rt = cudart()
        flags = rt.cudaEventDefault if timing else rt.cudaEventDisableTiming
        self._event = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreate")
        self.handle = int(self._event)

    def record(self, stream: Stream) -> "Event":
        check(cudart().cudaEventRecord(self.handle, stream.handle), f"cudaEventRecord({stream.name})")
        return self

    def synchronize(self) -> None:
        check(cudart().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def elapsed_ms(self, end: "Event") -> float:
        return float(check(cudart().cudaEventElapsedTime(self.handle, end.handle), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.handle:
            check(cudart().cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = 0


class CudaGraph:
    """Work captured from one stream, replayed with a single launch.

    Kernels, copies and TensorRT enqueues issued inside ``capture(stream)`` are recorded, not
    run; ``launch(stream)`` replays them with the same pointers and sizes.
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self._exec = None

    @property
    def captured(self) -> bool:
        return self._exec is not None

    @contextlib.contextmanager
    def capture(self, stream: Stream) -> Iterator[None]:
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), f"cudaStreamBeginCapture({self.name})")
        try:
            yield
        except BaseException:
            graph = rt.cudaStreamEndCapture(stream.handle)  # leave capture mode; the partial graph is dropped
            if int(graph[0]) == 0 and graph[1] is not None:
                rt.cudaGraphDestroy(graph[1])
            raise
        graph = check(rt.cudaStreamEndCapture(stream.handle), f"cudaStreamEndCapture({self.name})")
        try:
            self._exec = check(rt.cudaGraphInstantiate(graph, 0), f"cudaGraphInstantiate({self.name})")
        finally:
            check(rt.cudaGraphDestroy(graph), f"cudaGraphDestroy({self.name})")

    def launch(self, stream: Stream) -> None:
        if self._exec is None:
            raise RuntimeError(f"CUDA graph {self.name} was never captured")
        check(cudart().cudaGraphLaunch(self._exec, stream.handle), f"cudaGraphLaunch({self.name})")

    def close(self) -> None:
        if self._exec is not None:
            check(cudart().cudaGraphExecDestroy(self._exec), f"cudaGraphExecDestroy({self.name})")
            self._exec = None
