"""TensorRT backend: the four engines on one GPU, with explicit CUDA memory.

    engines_dir/manifest.json --check_manifest(this GPU, this TensorRT)--> ok, else BackendUnavailable
    {vision,prefill_chunk,decode,kv_gather}.engine --deserialize--> one execution context each
    (optimization profile 0; device memory supplied by us, shared: they run one at a time)

All device memory is ONE arena (cuda_memory.DeviceArena, ``gpu_memory_budget`` bytes, default
90% of the free memory), carved once at start-up::

    weights       TensorRT's weights, through an IGpuAllocator over the region, then trimmed
    activations   one scratch for all four contexts (they run one after another on one stream)
    io            every other engine input/output at its profile maximum (ids, logits, ...)
    prefill_past  per layer K/V of the prompt so far, pre-RoPE: the prefill engine reads rows
                  [0, P) and writes the chunk's rows [P, P+Q) in place
    kv_source     per layer the gather's source: sparse tier + reloaded dense blocks
    mixed         per layer the mixed decode cache: kv_gather writes rows [0, M), decode reads
                  [0, P) and writes its rows [P, P+T) in place

The three KV regions are sized by the memory planner for the engines' frame limit (the largest
frame count that fits when the budget is smaller, see ``max_frames``); what is left goes to
kv_source and mixed, so more dense blocks fit. Nothing is allocated after start-up. The prefill
past is the *whole* past, not only the visible part (DESIGN §2): the exported prefill graph
rotates its past keys at positions 0..P-1, so it cannot take a gathered past.

The runtime loop hands numpy arrays across the Backend interface. Behind them the backend keeps
device mirrors: past rows it produced itself are not uploaded again (``_Mirror``), so a chunk
or a decode step moves only its new rows to the host. Streams: ``compute`` runs the engines;
``upload`` / ``download`` move gather sources and results. Given every layer at once
(``gather_kv_layers``), upload(l+1) | gather(l) | download(l-1) overlap through double-buffered
pinned memory; ``gather_kv`` (one layer per call, what the KV store calls today) runs the same
path with nothing to overlap.

Decode steps can replay CUDA graphs, see ``DecodeGraphCache`` for the bucketing.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from videoxl.config import VideoXLConfig
from videoxl.engines.profiles import format_bytes
from videoxl.engines.trt_module import trt_logger
from videoxl.layout import ChunkVisibility
from videoxl.runtime.artifacts import ArtifactError
from videoxl.runtime.backend import Backend, DecodeOutput, PrefillOutput
from videoxl.runtime.cuda_memory import (
    ALIGNMENT,
    ArenaOverflowError,
    CudaGraph,
    DeviceArena,
    Event,
    FirstFitAllocator,
    KVSlabs,
    PinnedHostPool,
    Stream,
    align_up,
    check,
    copy_2d_async,
    copy_async,
    cudart,
    host_pointer,
    mem_get_info,
)
from videoxl.runtime.memory_plan import fit_kv_rows

log = logging.getLogger(__name__)

GRAPHS = ("vision", "prefill_chunk", "decode", "kv_gather")
DEFAULT_BUDGET_FRACTION = 0.9  # of the free device memory, when no budget is given
WEIGHTS_SLACK_BYTES = 64 << 20  # at most this much is kept after the weights for allocations TensorRT makes later
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_, "UINT8": np.uint8}
_KV_NAME = re.compile(r"^(past|present)_(key|value)\.(\d+)$")


class BackendUnavailable(RuntimeError):
    """The TensorRT backend cannot run in this process; the message is one line with the fix."""


def one_line(text: str) -> str:
    """Multi-line errors (bullet lists) folded into one line."""
    parts = [line.strip().lstrip("-").strip() for line in str(text).splitlines()]
    return "; ".join(p for p in parts if p).replace(":;", ":")


def unavailable(reason: str) -> BackendUnavailable:
    return BackendUnavailable(one_line(f"TensorRT backend unavailable: {reason}"))


# --- pure bookkeeping (tested on the CPU) ---------------------------------------------------------
def fit_gather_width(
    gather_index: np.ndarray, gather_weight: np.ndarray, low: int, high: int
) -> tuple[np.ndarray, np.ndarray]:
    """(M, S) gather rows made acceptable to an engine built for S in [low, high].

    The runtime loop copies rows with S = 1 (pooling happened when the sparse tier was
    filled); an engine built for S = kv_pool_stride only gets them widened with zero weights:
    the padding repeats the first index with weight 0, which adds exactly nothing.
    """
    rows, given = gather_index.shape
    if given > high:
        raise ValueError(f"gather rows pool {given} source rows; the kv_gather engine takes at most {high}")
    if given >= low:
        return np.ascontiguousarray(gather_index, np.int64), np.ascontiguousarray(gather_weight, np.float32)
    width = low
    index = np.repeat(np.asarray(gather_index[:, :1], np.int64), width, axis=1)
    index[:, :given] = gather_index
    weight = np.zeros((rows, width), np.float32)
    weight[:, :given] = gather_weight
    return index, weight


class DecodeGraphCache:
    """Which decode steps replay a CUDA graph: bookkeeping only, entries are opaque.

    Bucketing: a captured graph bakes its shapes and tensor addresses, so it is valid for one
    key ``(new_tokens, past_tokens)``. The exported decode graph attends to every past row it
    is given (it has no valid-length input), so the past cannot be padded to a coarser bucket
    without changing the result: the bucket is exactly one past length. A key seen ``min_uses``
    times is captured (the step runs plainly once more, which TensorRT needs after a shape change,
    then the capture is recorded); later steps with that key replay it. Each graph owns its own
    execution context, so the shapes it was captured with are never changed under it. At most
    ``max_graphs`` are kept (least recently used evicted). Generation grows the past by one
    token a step, so in the answer loop every key is new and runs plainly; repeats come from
    re-decoding the same past (benchmarks, re-asking at the same cache length).
    """

    def __init__(self, *, max_graphs: int = 4, min_uses: int = 2, remember: int = 256) -> None:
        self.max_graphs, self.min_uses, self.remember = max_graphs, min_uses, remember
        self.graphs: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._uses: OrderedDict[tuple[int, int], int] = OrderedDict()

    def action(self, key: tuple[int, int]) -> str:
        """'replay', 'capture' (run plainly, then record) or 'plain'."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return "replay"
        uses = self._uses.pop(key, 0) + 1
        self._uses[key] = uses
        while len(self._uses) > self.remember:
            self._uses.popitem(last=False)
        return "capture" if self.max_graphs > 0 and uses >= self.min_uses else "plain"

    def add(self, key: tuple[int, int], entry: Any) -> list[Any]:
        """Store a captured entry; returns the evicted entries (the caller frees them)."""
        self.graphs[key] = entry
        self._uses.pop(key, None)
        evicted = []
        while len(self.graphs) > self.max_graphs:
            evicted.append(self.graphs.popitem(last=False)[1])
        return evicted

    def clear(self) -> list[Any]:
        entries = list(self.graphs.values())
        self.graphs.clear()
        self._uses.clear()
        return entries


class _Mirror:
    """Which host KV arrays the device rows [0, valid) stand for.

    ``owner`` are the host arrays' data pointers: the runtime loop passes views of the same
    preallocated buffers each call, growing by the rows this backend returned. Rows the caller
    changes in place behind the backend's back are not detected; anything else (other arrays,
    more rows than mirrored) makes the backend upload the past again.
    """

    def __init__(self) -> None:
        self.owner: tuple[int, ...] | None = None
        self.valid = 0
        self.signature: list[tuple[np.ndarray, ...]] | None = None  # mixed: rows the gather returned

    def covers(self, owner: tuple[int, ...], rows: int) -> bool:
        return self.owner == owner and rows <= self.valid

    def adopt(self, owner: tuple[int, ...] | None, rows: int) -> None:
        self.owner, self.valid = owner, rows


def _owner(keys: list[np.ndarray], values: list[np.ndarray]) -> tuple[int, ...]:
    return tuple(a.__array_interface__["data"][0] for a in (*keys, *values))


def _signature(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    return (k[0].copy(), k[-1].copy(), v[0].copy(), v[-1].copy()) if len(k) else ()


# --- TensorRT plumbing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype
    min: tuple[int, ...]
    max: tuple[int, ...]


def _arena_allocator(trt: ModuleType, base: int, allocator: FirstFitAllocator):
    """An IGpuAllocator that hands TensorRT memory from the weights region, never cudaMalloc."""

    class _ArenaAllocator(trt.IGpuAllocator):
        def __init__(self) -> None:
            trt.IGpuAllocator.__init__(self)

        def allocate(self, size, alignment, flags):
            offset = allocator.allocate(int(size), int(alignment))
            if offset is None:
                log.warning("weights region full: TensorRT asked for %s", format_bytes(int(size)))
                return None
            return base + offset

        def allocate_async(self, size, alignment, flags, stream):
            return self.allocate(size, alignment, flags)

        def reallocate(self, address, alignment, new_size):
            return None  # TensorRT then allocates anew and copies

        def deallocate(self, memory):
            allocator.release(int(memory) - base)
            return True

        def deallocate_async(self, memory, stream):
            return self.deallocate(memory)

    return _ArenaAllocator()


class _Engine:
    """One deserialized engine, its tensors and its main execution context."""

    def __init__(self, trt: ModuleType, runtime, graph: str, path: Path, logger, limits_hint: str) -> None:
        self.trt, self.graph, self.limits_hint = trt, graph, limits_hint
        logger.errors.clear()
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise unavailable(f"{path}: TensorRT could not deserialize the engine ({'; '.join(logger.errors) or 'no error text'})")
        self.logger = logger
        self._runtime_configs: list = []
        self.tensors: dict[str, _Tensor] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype_name = self.engine.get_tensor_dtype(name).name
            if dtype_name not in NUMPY_DTYPES:
                raise unavailable(f"{path.name}: tensor {name!r} is {dtype_name}, which the numpy runtime loop cannot exchange")
            low, high = ((), ())
            if is_input:
                low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
            self.tensors[name] = _Tensor(name, is_input, np.dtype(NUMPY_DTYPES[dtype_name]), low, high)
        self.context = self.new_context()
        self._infer_output_maxima()

    def new_context(self):
        """A context whose device memory we supply (USER_MANAGED).

        TensorRT for RTX compiles shape-specialised kernels in the background by default (LAZY);
        we ask for NONE, so that device memory stays flat while the past grows and a replayed
        CUDA graph runs the same kernels as the plain step it was captured from.
        """
        user_managed = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        specialization = getattr(self.trt, "DynamicShapesKernelSpecializationStrategy", None)
        if specialization is not None and hasattr(self.engine, "create_runtime_config"):
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(user_managed)
            config.dynamic_shapes_kernel_specialization_strategy = specialization.NONE
            context = self.engine.create_execution_context(config)
            self._runtime_configs.append(config)  # kept alive as long as the engine
        else:
            context = self.engine.create_execution_context(user_managed)
        if context is None:
            raise unavailable(f"{self.graph}: TensorRT could not create an execution context ({'; '.join(self.logger.errors)})")
        return context

    def device_memory_bytes(self) -> int:
        if hasattr(self.engine, "get_device_memory_size_for_profile_v2"):
            return int(self.engine.get_device_memory_size_for_profile_v2(0))
        return int(self.engine.device_memory_size_v2)

    def _infer_output_maxima(self) -> None:
        """Output shapes at the profile maxima of every input (what the output buffers must hold)."""
        for tensor in self.inputs():
            self.context.set_input_shape(tensor.name, tensor.max)
        for name, tensor in list(self.tensors.items()):
            if not tensor.is_input:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise unavailable(f"{self.graph}: output {name!r} has no shape at the profile maximum ({shape})")
                self.tensors[name] = _Tensor(name, False, tensor.dtype, shape, shape)

    def inputs(self) -> list[_Tensor]:
        return [t for t in self.tensors.values() if t.is_input]

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """ValueError naming the input, its shape and the profile range, before anything is staged."""
        for name, shape in shapes.items():
            tensor = self.tensors[name]
            if len(shape) != len(tensor.max) or any(s < lo or s > hi for s, lo, hi in zip(shape, tensor.min, tensor.max)):
                raise ValueError(
                    f"{self.graph} engine: input {name!r} of shape {tuple(shape)} is outside its profile "
                    f"{tensor.min}..{tensor.max} ({self.limits_hint})"
                )

    def set_shapes(self, context, shapes: dict[str, tuple[int, ...]]) -> None:
        self.check_shapes(shapes)
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(int(s) for s in shape)):
                raise RuntimeError(f"{self.graph} engine refused shape {tuple(shape)} for {name!r}: {'; '.join(self.logger.errors)}")

    def enqueue(self, context, addresses: dict[str, int], stream: Stream) -> None:
        for name, ptr in addresses.items():
            if not context.set_tensor_address(name, ptr):
                raise RuntimeError(f"{self.graph} engine refused the address of {name!r}")
        self.logger.errors.clear()
        if not context.execute_async_v3(stream.handle):
            raise RuntimeError(f"{self.graph} engine: execute_async_v3 failed ({'; '.join(self.logger.errors) or 'no error text'})")


# --- the backend ------------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    """Runs an engine directory written by `videoxl build`; see the module docstring."""

    name = "tensorrt"

    def __init__(
        self,
        engines_dir: str | Path,
        *,
        gpu_memory_budget: int | None = None,
        plan_dense_blocks: int = 4,
        cuda_graphs: bool = True,
        weights_in_arena: bool = True,
    ) -> None:
        from videoxl.runtime.device import gpu_problem

        self.engines_dir = Path(engines_dir)
        problem = gpu_problem()
        if problem is not None:
            raise unavailable(f"no CUDA device or driver is usable here ({problem}); run with --backend onnxruntime instead")
        self.manifest, self.trt = _checked_manifest(self.engines_dir)
        self.config = VideoXLConfig.load(self.engines_dir / "config.json")
        self.artifact_dir = _tokenizer_dir(self.engines_dir, self.manifest)
        precision = self.manifest["precision"]
        if precision not in ("fp16", "fp32"):
            raise unavailable(f"{precision} engines cannot exchange KV with the numpy runtime loop; build fp16 or fp32 engines")
        self.float_dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
        self.limits: dict[str, int] = dict(self.manifest["limits"])
        self._graphs: DecodeGraphCache | None = None
        self.engines: dict[str, _Engine] = {}
        self._runtime = self._allocator = self.pinned = self.arena = None
        self._streams: list[Stream] = []
        self._events: list[Event] = []
        try:
            self._start(gpu_memory_budget, plan_dense_blocks, cuda_graphs, weights_in_arena)
        except BaseException:
            self.close()
            raise

    # --- start-up -------------------------------------------------------------------------------
    def _start(self, budget: int | None, plan_dense_blocks: int, cuda_graphs: bool, weights_in_arena: bool) -> None:
        trt, cfg = self.trt, self.config
        check(cudart().cudaSetDevice(0), "cudaSetDevice(0)")
        if self.manifest["plugins"]["used"]:
            from videoxl.plugins.trt_plugins import register_plugins

            register_plugins(trt)
        self._streams = [Stream("compute"), Stream("upload"), Stream("download")]
        self.compute, self.upload, self.download = self._streams
        self._events = [Event() for _ in range(6)]
        self._up_done, self._down_done, self._gathered = self._events[0:2], self._events[2:4], self._events[4:6]

        free, total = mem_get_info()
        if budget is None:
            budget = int(free * DEFAULT_BUDGET_FRACTION) // ALIGNMENT * ALIGNMENT
        elif budget > free:
            raise ArenaOverflowError(
                f"--gpu-memory-budget {format_bytes(budget)} is more than the {format_bytes(free)} free on this GPU "
                f"({format_bytes(total)} total)"
            )
        self.arena = DeviceArena(budget)

        # weights: the whole arena is offered, then trimmed to what TensorRT took
        self._logger = trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        weights = self.arena.add("weights", self.arena.layout.free if weights_in_arena else 0)
        self._weights = FirstFitAllocator(weights.nbytes, label="weights region")
        if weights_in_arena:
            self._allocator = _arena_allocator(trt, weights.ptr, self._weights)
            self._runtime.gpu_allocator = self._allocator
        hint = "engines built for " + ", ".join(f"{k} {v}" for k, v in self.limits.items())
        for graph in GRAPHS:
            path = self.engines_dir / self.manifest["engines"][graph]["file"]
            try:
                self.engines[graph] = _Engine(trt, self._runtime, graph, path, self._logger, hint)
            except BackendUnavailable:
                if self._weights.failed_request:
                    raise ArenaOverflowError(
                        f"{path.name}: the weights do not fit the {format_bytes(budget)} arena: TensorRT asked for "
                        f"{format_bytes(self._weights.failed_request)} with {format_bytes(weights.nbytes - self._weights.high_water)} "
                        "left; raise --gpu-memory-budget"
                    ) from None
                raise
        if weights_in_arena:
            slack = min(WEIGHTS_SLACK_BYTES, self._weights.high_water // 8)
            self.arena.shrink_last("weights", min(weights.nbytes, align_up(self._weights.high_water + slack)))
            self._weights.shrink(self.arena.regions["weights"].nbytes)
        log.info("weights: %s in the arena", format_bytes(self._weights.high_water))

        # activations: one scratch shared by the contexts (one stream, one engine at a time)
        activations = self.arena.add("activations", max(e.device_memory_bytes() for e in self.engines.values()))
        self._activations = (activations.ptr, max(activations.nbytes, 1))
        for engine in self.engines.values():
            engine.context.set_device_memory(*self._activations)

        # I/O buffers at their profile maxima; KV tensors live in the KV regions instead
        self._row_bytes = cfg.num_key_value_heads * cfg.head_dim * self.float_dtype.itemsize
        io_tensors = [(g, t) for g, e in self.engines.items() for t in e.tensors.values() if not _is_kv(g, t.name)]
        io = self.arena.add("io", sum(align_up(_max_bytes(t)) for _, t in io_tensors))
        self._io = {(g, t.name): io.carve(f"{g}.{t.name}", _max_bytes(t)) for g, t in io_tensors}

        # KV regions, sized by the planner for as many frames as fit
        self.max_frames, rows = fit_kv_rows(
            cfg, self.limits, available_bytes=self.arena.layout.free, row_bytes=self._row_bytes, dense_blocks=plan_dense_blocks
        )
        layers = cfg.num_hidden_layers
        self._kv = {}
        for name, capacity in (("prefill_past", rows.prefill), ("kv_source", rows.source), ("mixed", rows.mixed)):
            region = self.arena.add(name, KVSlabs.nbytes(layers, capacity, self._row_bytes))
            self._kv[name] = KVSlabs(region.ptr, layers, capacity, self._row_bytes)
        if self.max_frames < self.limits["max_frames"]:
            log.warning(
                "the %s budget holds the KV cache of %d frames; the engines accept %d", format_bytes(budget),
                self.max_frames, self.limits["max_frames"],
            )

        # pinned host memory: staging for every I/O tensor and the KV rows that cross the bus
        chunk_rows = self.engines["prefill_chunk"].tensors["input_ids"].max[0]
        new_rows = self.engines["decode"].tensors["input_ids"].max[0]
        kv_staging = {
            "prefill_out": (2, layers, chunk_rows),
            "decode_out": (2, layers, new_rows),
            "gather_up": (2, 2, rows.source),  # [slot][K/V] rows
            "gather_down": (2, 2, rows.mixed),
        }
        kv_shape = (cfg.num_key_value_heads, cfg.head_dim)
        pinned_bytes = sum(align_up(_max_bytes(t)) for _, t in io_tensors)
        pinned_bytes += sum(align_up(int(np.prod(s)) * self._row_bytes) for s in kv_staging.values())
        self.pinned = PinnedHostPool(pinned_bytes)
        self._host = {(g, t.name): self.pinned.array(f"{g}.{t.name}", (int(np.prod(t.max)),), t.dtype) for g, t in io_tensors}
        self._stage = {name: self.pinned.array(name, shape + kv_shape, self.float_dtype) for name, shape in kv_staging.items()}

        self._prefill_mirror, self._mixed_mirror = _Mirror(), _Mirror()
        self._gather_next = 0
        self._graphs = DecodeGraphCache(max_graphs=4 if cuda_graphs else 0)
        log.info("TensorRT backend ready: %s", "; ".join(self.arena.layout.describe()))

    def close(self) -> None:
        """Free everything, also after a sticky CUDA error; never raises; safe to call twice.

        Queued work is waited for first (pinned buffers and the arena may still be read or written
        by it), then graphs and contexts, engines (their weights live in the arena), pinned memory,
        events, streams and the arena are released in that order. Every release is attempted even
        when an earlier one failed (after a sticky error they all fail: the process must restart to
        get the memory back); each failure is logged once and the handle is dropped, so a second
        call does nothing.
        """

        def attempt(what: str, release) -> None:
            try:
                release()
            except Exception as err:  # noqa: BLE001 - close must reach every resource; the error is logged
                log.warning("closing the TensorRT backend: %s failed: %s", what, err)

        for stream in self._streams:
            attempt(f"waiting for the {stream.name} stream", stream.synchronize)
        graphs = self._graphs.clear() if self._graphs is not None else []
        for _context, graph in graphs:
            attempt(f"destroying CUDA graph {graph.name}", graph.close)
        for engine in self.engines.values():
            engine.context = None
            engine.engine = None
        self.engines = {}
        self._runtime = self._allocator = None
        pinned, self.pinned = self.pinned, None
        if pinned is not None:
            attempt("freeing the pinned host pool", pinned.close)
        events, streams, self._events, self._streams = self._events, self._streams, [], []
        for index, event in enumerate(events):
            attempt(f"destroying event {index}", event.close)
        for stream in streams:
            attempt(f"destroying the {stream.name} stream", stream.close)
        arena, self.arena = self.arena, None
        if arena is not None:
            attempt("freeing the device arena", arena.close)

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- user-facing limits -------------------------------------------------------------------------
    def check_frames(self, frames: int) -> None:
        if frames > self.limits["max_frames"]:
            raise ArtifactError(
                f"{frames} frames requested but {self.engines_dir} was built for at most {self.limits['max_frames']}; "
                f"lower --max-frames or rebuild with `videoxl build ... --max-frames {frames}`"
            )
        if frames > self.max_frames:
            raise ArtifactError(
                f"{frames} frames requested but the {format_bytes(self.arena.budget_bytes)} GPU memory budget holds the KV "
                f"cache of at most {self.max_frames}; lower --max-frames or raise --gpu-memory-budget (`videoxl plan` shows what fits)"
            )

    def memory_report(self) -> dict[str, int]:
        """Bytes per arena region, plus pinned host bytes (benchmarks, logs)."""
        report = {name: region.nbytes for name, region in self.arena.layout.regions.items()}
        report["pinned_host"] = self.pinned.layout.capacity
        return report

    # --- transfers ----------------------------------------------------------------------------------
    def _put(self, graph: str, name: str, array: np.ndarray, stream: Stream) -> int:
        """Stage ``array`` in pinned memory, copy it to its device buffer; returns the device pointer."""
        host, device = self._host[(graph, name)], self._io[(graph, name)]
        flat = host[: array.size]
        np.copyto(flat, np.asarray(array).reshape(-1), casting="same_kind")
        copy_async(device.ptr, host_pointer(host), flat.nbytes, "HostToDevice", stream)
        return device.ptr

    def _fetch(self, graph: str, name: str, count: int, stream: Stream) -> np.ndarray:
        """Queue the copy of an output's first ``count`` elements to pinned memory; read after sync."""
        host, device = self._host[(graph, name)], self._io[(graph, name)]
        copy_async(host_pointer(host), device.ptr, count * host.itemsize, "DeviceToHost", stream)
        return host[:count]

    def _fetch_rows(self, slabs: KVSlabs, first_row: int, rows: int, staging: np.ndarray, stream: Stream) -> None:
        """Rows [first_row, first_row + rows) of every layer's K and V into staging[2, layers, rows_max]."""
        width, host_pitch = rows * slabs.row_bytes, staging.shape[2] * slabs.row_bytes
        for kind, first in enumerate((slabs.key(0, first_row), slabs.value(0, first_row))):
            copy_2d_async(host_pointer(staging[kind]), host_pitch, first, slabs.pitch, width, slabs.layers, "DeviceToHost", stream)

    def _require_rows(self, region: str, rows: int, what: str) -> None:
        slabs = self._kv[region]
        if rows > slabs.capacity:
            missing = KVSlabs.nbytes(slabs.layers, rows, slabs.row_bytes) - KVSlabs.nbytes(slabs.layers, slabs.capacity, slabs.row_bytes)
            raise ArenaOverflowError(
                f"{what} needs {rows} rows of the '{region}' arena region, which holds {slabs.capacity}: {missing} bytes "
                f"({format_bytes(missing)}) missing; lower --dense-blocks or --max-frames, or raise --gpu-memory-budget"
            )

    def _sync_mirror(self, mirror: _Mirror, slabs: KVSlabs, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Make device rows [0, P) equal the host past, uploading only when they are not ours."""
        rows, owner = keys[0].shape[0], _owner(keys, values)
        if rows == 0:
            mirror.adopt(owner, 0)  # a new prompt
            return
        if mirror.covers(owner, rows):
            return
        if mirror.owner is None and mirror.signature is not None and rows == mirror.valid and all(
            len(sig) == 4 and all(np.array_equal(a, b) for a, b in zip(sig, _signature(k, v)))
            for sig, k, v in zip(mirror.signature, keys, values)
        ):
            mirror.adopt(owner, rows)  # the mixed cache the gathers just wrote, copied by the loop
            return
        log.debug("uploading %d past rows x %d layers (not mirrored on the device)", rows, slabs.layers)
        # converted copies are temporaries: all of them must outlive the copies that read them
        staged = [(np.ascontiguousarray(k, self.float_dtype), np.ascontiguousarray(v, self.float_dtype)) for k, v in zip(keys, values)]
        for layer, (k, v) in enumerate(staged):
            copy_async(slabs.key(layer), host_pointer(k), k.nbytes, "HostToDevice", self.compute)
            copy_async(slabs.value(layer), host_pointer(v), v.nbytes, "HostToDevice", self.compute)
        self.compute.synchronize()  # before the temporaries (and the caller's pageable arrays) may go
        mirror.adopt(owner, rows)
        mirror.signature = None

    # --- Backend interface --------------------------------------------------------------------------
    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        cfg, engine = self.config, self.engines["vision"]
        per_group = cfg.frames_per_group
        if pixels.shape[0] % per_group:
            raise ValueError(f"{pixels.shape[0]} frames is not a multiple of {per_group}; pad the last group first")
        batch_frames = engine.tensors["pixel_values"].max[0]
        out = []
        for start in range(0, pixels.shape[0], batch_frames):
            batch = pixels[start : start + batch_frames]
            groups = batch.shape[0] // per_group
            engine.set_shapes(engine.context, {"pixel_values": batch.shape})  # validates before staging
            address = {
                "pixel_values": self._put("vision", "pixel_values", batch, self.compute),
                "visual_embeds": self._io[("vision", "visual_embeds")].ptr,
            }
            engine.enqueue(engine.context, address, self.compute)
            shape = (groups, cfg.tokens_per_group, cfg.hidden_size)
            embeds = self._fetch("vision", "visual_embeds", int(np.prod(shape)), self.compute)
            self.compute.synchronize()
            out.append(embeds.reshape(shape).copy())
        return np.concatenate(out)

    def prefill_chunk(self, input_ids, visual_embeds, vis: ChunkVisibility, past_keys, past_values) -> PrefillOutput:
        engine, slabs = self.engines["prefill_chunk"], self._kv["prefill_past"]
        q, past = len(input_ids), past_keys[0].shape[0]
        if past != vis.start:
            raise ValueError(f"prefill chunk starts at token {vis.start} but {past} past rows were given")
        self._require_rows("prefill_past", past + q, f"a prompt of {past + q} tokens")
        self._gather_next = 0
        self._sync_mirror(self._prefill_mirror, slabs, past_keys, past_values)
        feeds = {
            "input_ids": np.asarray(input_ids, np.int64),
            "visual_embeds": np.asarray(visual_embeds).reshape(-1, self.config.hidden_size),
            "position_ids": np.arange(vis.start, vis.end, dtype=np.int64),
            "timestamp_query_index": vis.timestamp_query_index,
            "prefix_len": np.array([vis.prefix_len], np.int64),
            "window_start": np.array([vis.window_start], np.int64),
            "past_timestamp_index": np.asarray(vis.past_timestamp_index, np.int64),
        }
        unknown = [t.name for t in engine.inputs() if t.name not in feeds and not _is_kv("prefill_chunk", t.name)]
        if unknown:
            raise ValueError(f"prefill_chunk engine wants inputs {unknown} this runtime does not feed; rebuild from a current export")
        shapes = {name: value.shape for name, value in feeds.items()}
        engine.check_shapes(shapes)
        address = {name: self._put("prefill_chunk", name, value, self.compute) for name, value in feeds.items()}
        address["logits"] = self._io[("prefill_chunk", "logits")].ptr
        for layer in range(self.config.num_hidden_layers):
            shapes[f"past_key.{layer}"] = shapes[f"past_value.{layer}"] = (past, *past_keys[0].shape[1:])
            address[f"past_key.{layer}"], address[f"past_value.{layer}"] = slabs.key(layer), slabs.value(layer)
            address[f"present_key.{layer}"], address[f"present_value.{layer}"] = slabs.key(layer, past), slabs.value(layer, past)
        engine.set_shapes(engine.context, shapes)
        engine.enqueue(engine.context, address, self.compute)
        logits = self._fetch("prefill_chunk", "logits", self.config.vocab_size, self.compute)
        staging = self._stage["prefill_out"]
        self._fetch_rows(slabs, past, q, staging, self.compute)
        self.compute.synchronize()
        self._prefill_mirror.valid = past + q
        layers = range(self.config.num_hidden_layers)
        return PrefillOutput(
            logits.reshape(1, -1).copy(), [staging[0, i, :q].copy() for i in layers], [staging[1, i, :q].copy() for i in layers]
        )

    def decode(self, input_ids, past_keys, past_values) -> DecodeOutput:
        slabs, t, past = self._kv["mixed"], len(input_ids), past_keys[0].shape[0]
        self.engines["decode"].check_shapes({"input_ids": (t,), "past_key.0": (past, *past_keys[0].shape[1:])})
        self._require_rows("mixed", past + t, f"a decode cache of {past + t} tokens")
        self._gather_next = 0
        self._sync_mirror(self._mixed_mirror, slabs, past_keys, past_values)
        np.copyto(self._host[("decode", "input_ids")][:t], np.asarray(input_ids, np.int64))
        self._host[("decode", "position_ids")][:t] = np.arange(past, past + t, dtype=np.int64)

        key = (t, past)
        action = self._graphs.action(key)
        if action == "replay":
            _, graph = self._graphs.graphs[key]
            graph.launch(self.compute)
        else:
            engine = self.engines["decode"]
            context = engine.new_context() if action == "capture" else engine.context
            if action == "capture":
                context.set_device_memory(*self._activations)
            self._decode_step(context, t, past)
            if action == "capture":
                self._capture_decode(key, context, t, past)
        self.compute.synchronize()
        self._mixed_mirror.valid = past + t
        staging, layers = self._stage["decode_out"], range(self.config.num_hidden_layers)
        logits = self._host[("decode", "logits")][: self.config.vocab_size]
        mass = self._host[("decode", "attention_mass")][: past + t]
        return DecodeOutput(
            logits.reshape(1, -1).copy(), mass.copy(),
            [staging[0, i, :t].copy() for i in layers], [staging[1, i, :t].copy() for i in layers],
        )

    def _decode_step(self, context, t: int, past: int) -> None:
        """Everything one decode step queues on the compute stream (also what a graph records)."""
        engine, slabs, cfg = self.engines["decode"], self._kv["mixed"], self.config
        shapes = {"input_ids": (t,), "position_ids": (t,)}
        address = {name: self._io[("decode", name)].ptr for name in ("input_ids", "position_ids", "logits", "attention_mass")}
        for layer in range(cfg.num_hidden_layers):
            shapes[f"past_key.{layer}"] = shapes[f"past_value.{layer}"] = (past, cfg.num_key_value_heads, cfg.head_dim)
            address[f"past_key.{layer}"], address[f"past_value.{layer}"] = slabs.key(layer), slabs.value(layer)
            address[f"present_key.{layer}"], address[f"present_value.{layer}"] = slabs.key(layer, past), slabs.value(layer, past)
        for name in ("input_ids", "position_ids"):
            host = self._host[("decode", name)]
            copy_async(self._io[("decode", name)].ptr, host_pointer(host), t * host.itemsize, "HostToDevice", self.compute)
        engine.set_shapes(context, shapes)
        engine.enqueue(context, address, self.compute)
        self._fetch("decode", "logits", cfg.vocab_size, self.compute)
        self._fetch("decode", "attention_mass", past + t, self.compute)
        self._fetch_rows(slabs, past, t, self._stage["decode_out"], self.compute)

    def _capture_decode(self, key: tuple[int, int], context, t: int, past: int) -> None:
        capturable = getattr(context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.compute.handle):
            log.info("decode context is not stream-capturable: CUDA graphs off")
            self._graphs.max_graphs = 0
            return
        self.compute.synchronize()  # the plain run above flushed TensorRT's shape-dependent state
        graph = CudaGraph(f"decode t={t} past={past}")
        with graph.capture(self.compute):
            self._decode_step(context, t, past)
        for _old_context, old_graph in self._graphs.add(key, (context, graph)):
            old_graph.close()

    def gather_kv(self, keys, values, gather_index, gather_weight):
        """One layer of BilevelKVGather; successive calls fill layers 0, 1, ... of the mixed cache."""
        layer = self._gather_next
        self._gather_next = (layer + 1) % self.config.num_hidden_layers
        (k,), (v,) = self._gather([layer], [keys], [values], gather_index, gather_weight)
        return k, v

    def gather_kv_layers(self, keys: list[np.ndarray], values: list[np.ndarray], gather_index, gather_weight):
        """All layers at once, with uploads and downloads overlapping the gathers of other layers."""
        if len(keys) != self.config.num_hidden_layers:
            raise ValueError(f"{len(keys)} layers given, the model has {self.config.num_hidden_layers}")
        self._gather_next = 0
        return self._gather(list(range(len(keys))), keys, values, gather_index, gather_weight)

    def _gather(self, layers: list[int], keys, values, gather_index, gather_weight):
        """upload(j) on `upload` | gather(j) on `compute` | download(j) on `download`, 2 pinned slots each."""
        engine, source, mixed = self.engines["kv_gather"], self._kv["kv_source"], self._kv["mixed"]
        pool = engine.tensors["gather_index"]
        index, weight = fit_gather_width(gather_index, gather_weight, pool.min[1], pool.max[1])
        n, m = keys[0].shape[0], index.shape[0]
        engine.check_shapes({"key": keys[0].shape, "gather_index": index.shape})
        self._require_rows("kv_source", n, f"a gather source of {n} rows (sparse tier + reloaded dense blocks)")
        self._require_rows("mixed", m, f"a mixed cache of {m} rows")
        if layers[0] == 0 or self._mixed_mirror.signature is None:  # a new series of gathers
            self._mixed_mirror.adopt(None, 0)
            self._mixed_mirror.signature = [() for _ in range(self.config.num_hidden_layers)]
        address = {
            "gather_index": self._put("kv_gather", "gather_index", index, self.compute),
            "gather_weight": self._put("kv_gather", "gather_weight", weight, self.compute),
        }
        shapes = {"key": keys[0].shape, "value": keys[0].shape, "gather_index": index.shape, "gather_weight": index.shape}
        engine.set_shapes(engine.context, shapes)
        up, down = self._stage["gather_up"], self._stage["gather_down"]
        out_k: list[np.ndarray | None] = [None] * len(layers)
        out_v: list[np.ndarray | None] = [None] * len(layers)

        def collect(j: int) -> None:
            slot = j % 2
            self._down_done[slot].synchronize()
            out_k[j], out_v[j] = down[slot, 0, :m].copy(), down[slot, 1, :m].copy()

        for j, layer in enumerate(layers):
            slot = j % 2
            if j >= 2:
                self._up_done[slot].synchronize()  # slot's previous upload has left the pinned buffer
            np.copyto(up[slot, 0, :n], keys[j], casting="same_kind")
            np.copyto(up[slot, 1, :n], values[j], casting="same_kind")
            copy_async(source.key(layer), host_pointer(up[slot, 0]), n * source.row_bytes, "HostToDevice", self.upload)
            copy_async(source.value(layer), host_pointer(up[slot, 1]), n * source.row_bytes, "HostToDevice", self.upload)
            self._up_done[slot].record(self.upload)
            self.compute.wait(self._up_done[slot])
            address.update(key=source.key(layer), value=source.value(layer), mixed_key=mixed.key(layer), mixed_value=mixed.value(layer))
            engine.enqueue(engine.context, address, self.compute)
            self._gathered[slot].record(self.compute)
            if j >= 2:
                collect(j - 2)  # frees the slot's download buffer
            self.download.wait(self._gathered[slot])
            copy_async(host_pointer(down[slot, 0]), mixed.key(layer), m * mixed.row_bytes, "DeviceToHost", self.download)
            copy_async(host_pointer(down[slot, 1]), mixed.value(layer), m * mixed.row_bytes, "DeviceToHost", self.download)
            self._down_done[slot].record(self.download)
        for j in range(max(0, len(layers) - 2), len(layers)):
            collect(j)
        for j, layer in enumerate(layers):
            self._mixed_mirror.signature[layer] = _signature(out_k[j], out_v[j])
        if layers[-1] == self.config.num_hidden_layers - 1:
            self._mixed_mirror.valid = m  # every layer holds rows [0, m): adopted by the first decode
        return out_k, out_v


def _is_kv(graph: str, name: str) -> bool:
    if graph == "kv_gather":
        return name in ("key", "value", "mixed_key", "mixed_value")
    return bool(_KV_NAME.match(name))


def _max_bytes(tensor: _Tensor) -> int:
    return max(int(np.prod(tensor.max, dtype=np.int64)), 1) * tensor.dtype.itemsize


def _checked_manifest(engines_dir: Path) -> tuple[dict[str, Any], ModuleType]:
    """The manifest, after check_manifest accepted it for this GPU and this TensorRT; else one line."""
    from videoxl.engines.errors import EngineMismatchError
    from videoxl.engines.manifest import check_manifest, read_manifest
    from videoxl.engines.trt_module import TensorRTUnavailableError, gpu_compute_capability, import_tensorrt

    try:
        manifest = read_manifest(engines_dir)
        trt = import_tensorrt(manifest["tensorrt"]["flavour"])
        gpu = gpu_compute_capability()
        if gpu is None:
            raise unavailable("cannot read this GPU's compute capability; run with --backend onnxruntime instead")
        check_manifest(engines_dir, trt_module=trt, gpu_compute_capability=gpu)
    except (EngineMismatchError, TensorRTUnavailableError) as err:
        raise unavailable(str(err)) from err
    except (KeyError, TypeError) as err:
        raise unavailable(f"{engines_dir}: manifest.json lacks {err}; rebuild the engines with `videoxl build`") from err
    return manifest, trt


def _tokenizer_dir(engines_dir: Path, manifest: dict[str, Any]) -> Path:
    """The engine directory if it has tokenizer.json, else the ONNX directory the engines came from."""
    if (engines_dir / "tokenizer.json").is_file():
        return engines_dir
    onnx_dir = manifest.get("model", {}).get("onnx_dir")
    if onnx_dir and (Path(onnx_dir) / "tokenizer.json").is_file():
        return Path(onnx_dir)
    return engines_dir


def describe_manifest(engines_dir: str | Path) -> str:
    """One line about an engine directory (for logs and the benchmark)."""
    manifest = json.loads((Path(engines_dir) / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    return (
        f"{trt['flavour']} {trt['version']}, {manifest['precision']}, {', '.join(manifest['compute_capabilities'])}, "
        f"max {manifest['limits']['max_frames']} frames, plugins {'on' if manifest['plugins']['used'] else 'off'}"
    )
