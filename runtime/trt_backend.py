"""TensorRT backend: the five engines on one GPU, with explicit CUDA memory; the KV stays there
unless the budget sends the dense tier to pinned host memory (``dense_tier``).

    engines_dir/manifest.json --check_manifest(this GPU, this TensorRT)--> ok, else BackendUnavailable
    {vision,prefill_chunk,decode,score,kv_gather}.engine --deserialize--> one execution context each
    (optimization profile 0; device memory supplied by us, shared: they run one at a time)
    an LLM graph built in layer ranges loads as one EngineChain (runtime/engine_chain.py)

All device memory is ONE arena (cuda_memory.DeviceArena, ``gpu_memory_budget`` bytes, default
90% of the free memory), carved once at start-up::

    weights       TensorRT's weights, through an IGpuAllocator over the region, then trimmed
    activations   one scratch for all five contexts (one stream, one engine at a time)
    io            every non-KV engine input/output at its profile maximum (ids, index lists, logits, ...)
    video         per layer [sparse tier | dense tier] of the prepared video: a prefill chunk reads
                  dense rows [0, P) and writes its rows [P, P+Q) in place; kv_gather pools finished
                  blocks into the sparse tier (device to device)
    decode        per layer the question's decode cache: kv_gather builds it from the video region
                  (first the all-sparse scoring cache, then the chosen blocks), decode appends to it

The two KV regions are sized by the memory planner for the engines' frame limit (the largest
frame count that fits when the budget is smaller, see ``max_frames``). Nothing is allocated after
start-up. The runtime loop hands this backend index plans (its small inputs are staged in pinned
memory and copied up), and gets logits and attention mass back.

Where the dense tier lives (``dense_tier``: "device", "host", or "auto": the device when the budget
holds both tiers at the engines' frame limit, else the host when that holds more frames):

    device   the video region holds [sparse | dense] whole; no KV row crosses the bus (the evaluation
             rule's timestamp queries read the whole dense past every chunk: only this serves them)
    host     the video region holds [sparse | resident dense rows | staging]; the dense tier is one
             pinned host allocation (row = position, slabs like the device's, so a run of rows of
             every layer is one 2-D copy). Streaming rule only (``check_prefill`` refuses the other):

      compute  [compact when full] [chunk: past = resident rows, present -> their end] (chunk_written) [pool] ...
      copy                          wait chunk_written, the chunk's rows -> host tier  (copied_out)
      compute  compaction waits copied_out (it overwrites rows that may still be on their way out)
      copy     question: the chosen rows not resident -> staging, one copy per run   (staged)
      compute  wait staged, kv_gather over [sparse | resident | staging] -> decode region

             The resident rows (``runtime/dense_tier.py``) stay in position order, so the remapped
             visible_past_index is below past_len as the kernels need; past_len stays the absolute
             position. Each chunk's rows cross the bus once; a question brings back only its chosen
             blocks' rows that are no longer resident (the prefix and the last window stay).

One stream (``compute``) runs everything in order (plus ``copy`` for the host tier); a public call
returns after synchronising ``compute``, so its pinned staging may be rewritten by the next call.
Decode steps replay CUDA graphs: the decode engine reads a capacity bucket of the cache plus a
valid length (``past_len``), so one graph per (new tokens, bucket) serves every step of that
bucket, see ``DecodeGraphCache``.

Engines built with ``--decode-on-prefill`` (manifest ``decode_on_prefill``) have no decode engine,
so the LLM's weights are on the GPU once fewer: a decode step runs on the prefill_chunk engine (or
chain) as a chunk that sees every past row, as the ONNX Runtime backend does by default::

    decode(ids) == prefill_chunk(ids, visual_embeds = the vision_pad row per generated <|vision_pad|>,
                                 past_len = length, visible_past_index = 0..length-1,
                                 timestamp_query_index = [])     past: decode rows [0, length),
                                                                 present: rows [length, length + T) in place

A one-token step replays a CUDA graph per (pads, bucket) like the decode engine's: the token is a
timestamp query instead (it sees every row below ``past_len``, a device value the graph reads when
it runs; no index list that grows every step), the engine reads decode rows [0, bucket), and its
new KV goes to fixed staging, copied to its row after the replay. Longer steps (the question) run
plainly, in place, and so does every step of engines that read ``past_len`` on the host (the
plugin-free prefill body makes it a shape tensor, which a captured graph would bake in).

Block scoring runs the question the same way, on the prefill_chunk engine over the all-sparse
scoring cache (its KV goes to the decode rows right after it, which the decode cache's gather
rewrites next), and the score engine, which holds no weights, reads that run's per-layer queries
(prefill_chunk's ``query.i`` io buffers) and keys (those decode rows) where they are::

    compute  [question as a chunk: past = decode rows [0, length), present -> [length, length + T), query.i -> io]
             [score: query.i, key.i = rows [length, length + T), past_key.i = rows [0, length)] [mass down]
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from videoxl.backend import Backend, DecodeCache, GatherPlan, VideoCache
from videoxl.config import VideoXLConfig
from videoxl.engines.profiles import format_bytes
from videoxl.engines.trt_module import trt_logger
from videoxl.embedding import decode_as_chunk
from videoxl.files import confined_path
from videoxl.graphs import GRAPHS, kv_names
from videoxl.layout import ChunkVisibility
from videoxl.runtime.artifacts import ArtifactError
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
from videoxl.runtime.dense_tier import ResidentRows, runs, split_gather
from videoxl.runtime.engine_chain import EngineChain
from videoxl.runtime.kv_store import available_host_bytes
from videoxl.runtime.memory_plan import DENSE_TIERS, KVRows, fit_kv_rows

log = logging.getLogger(__name__)

DECODE_BUCKET_ROWS = 256  # smallest decode-cache bucket; buckets double up to the region's capacity
DEFAULT_BUDGET_FRACTION = 0.9  # of the free device memory, when no budget is given
WEIGHTS_SLACK_BYTES = 64 << 20  # at most this much is kept after the weights for allocations TensorRT makes later
HOST_TIER_FRACTION = 0.8  # of the host memory available at start-up, at most, for the pinned dense tier
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_, "UINT8": np.uint8}
_KV_NAME = re.compile(r"^(past|present)_(key|value)\.(\d+)$")
_QUESTION_TENSOR = re.compile(r"^(query|key)\.(\d+)$")  # score's inputs, bound where prefill_chunk left them


class BackendUnavailable(RuntimeError):
    """The TensorRT backend cannot run in this process; the message is one line with the fix."""


def one_line(text: str) -> str:
    """Multi-line errors (bullet lists) folded into one line."""
    parts = [line.strip().lstrip("-").strip() for line in str(text).splitlines()]
    return "; ".join(p for p in parts if p).replace(":;", ":")


def unavailable(reason: str) -> BackendUnavailable:
    return BackendUnavailable(one_line(f"TensorRT backend unavailable: {reason}"))


# --- pure bookkeeping (tested on the CPU) ---------------------------------------------------------
def capacity_bucket(rows: int, *, granule: int, capacity: int) -> int:
    """The decode-cache rows a step binds: `rows` rounded up to a power-of-two multiple of `granule`,
    at most the region's `capacity`. Few buckets, so few CUDA graphs, each replayed over many steps."""
    if rows > capacity:
        raise ValueError(f"{rows} rows exceed the decode region's {capacity}")
    bucket = granule
    while bucket < rows:
        bucket *= 2
    return min(bucket, capacity)


class DecodeGraphCache:
    """Which decode steps replay a CUDA graph: bookkeeping only, entries are opaque.

    A captured graph bakes its shapes and tensor addresses, so it is valid for one key
    ``(new_tokens, bucket_rows)``: the decode engine reads a bucket of the cache and masks rows
    at or past its ``past_len`` input (a device tensor the graph reads when it runs), so every
    step whose cache fits the bucket replays the same graph. The first use of a key runs plainly
    (TensorRT needs a plain run after a shape change) and then records the capture; later uses
    replay it. Each graph owns its own execution context, so the shapes it was captured with are
    never changed under it. At most ``max_graphs`` are kept (least recently used evicted).
    ``replays`` counts the replayed steps (tests and benchmarks read it).
    """

    def __init__(self, *, max_graphs: int = 8, min_uses: int = 1, remember: int = 256) -> None:
        self.max_graphs, self.min_uses, self.remember = max_graphs, min_uses, remember
        self.graphs: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._uses: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.replays = 0

    def action(self, key: tuple[int, int]) -> str:
        """'replay', 'capture' (run plainly, then record) or 'plain'."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            self.replays += 1
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


class TrtVideoCache(VideoCache):
    """A handle on the backend's video region; only the newest one is live (one region)."""

    def __init__(self, backend: "TensorRTBackend", dense_rows: int, sparse_rows: int, generation: int) -> None:
        self.backend, self.dense_rows, self.sparse_rows, self.generation = backend, dense_rows, sparse_rows, generation

    @property
    def live(self) -> bool:
        return self.backend._video is self

    def arrays(self) -> dict[str, np.ndarray]:
        return self.backend._download_video(self)

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.backend._upload_video(self, arrays)


@dataclass
class TrtDecodeCache(DecodeCache):
    """A handle on the backend's decode region; only the newest one is live."""

    capacity: int
    generation: int
    length: int = 0


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
        # shape tensors (a plugin-free body may use a length input in Range) must be given in host memory
        shape_io = getattr(self.engine, "is_shape_inference_io", lambda name: False)
        self.host_inputs = frozenset(n for n, t in self.tensors.items() if t.is_input and shape_io(n))
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
        dense_tier: str = "auto",
    ) -> None:
        from videoxl.runtime.device import gpu_problem

        if dense_tier not in DENSE_TIERS:
            raise ValueError(f"dense tier {dense_tier!r} not in {DENSE_TIERS}")
        self.engines_dir = Path(engines_dir)
        problem = gpu_problem()
        if problem is not None:
            raise unavailable(f"no CUDA device or driver is usable here ({problem}); run with --backend onnxruntime instead")
        self.manifest, self.trt = _checked_manifest(self.engines_dir)
        self.config = VideoXLConfig.load(self.engines_dir / "config.json")
        self.artifact_dir = _tokenizer_dir(self.engines_dir, self.manifest)
        precision = self.manifest["precision"]
        if precision not in ("fp16", "fp32"):
            raise unavailable(f"{precision} engines are not supported by this backend yet; build fp16 or fp32 engines")
        self.float_dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
        self.limits: dict[str, int] = dict(self.manifest["limits"])
        self._graphs: DecodeGraphCache | None = None
        self.engines: dict[str, _Engine] = {}
        self._runtime = self._allocator = self.pinned = self.arena = self.dense_tier_pool = None
        self._streams: list[Stream] = []
        self._events: dict[str, Event] = {}
        self.dense_on_host = False
        self._video: TrtVideoCache | None = None
        self._decode_cache: TrtDecodeCache | None = None
        self._generation = 0
        # decode on the prefill_chunk engine (module docstring)
        self.decode_on_prefill = bool(self.manifest.get("decode_on_prefill"))
        self._vision_pad: tuple[int, np.ndarray] | None = None  # <|vision_pad|>'s id and embedding row
        try:
            self._start(gpu_memory_budget, plan_dense_blocks, cuda_graphs, weights_in_arena, dense_tier)
        except BaseException:
            self.close()
            raise

    # --- start-up -------------------------------------------------------------------------------
    def _start(self, budget: int | None, plan_dense_blocks: int, cuda_graphs: bool, weights_in_arena: bool, dense_tier: str) -> None:
        trt, cfg = self.trt, self.config
        check(cudart().cudaSetDevice(0), "cudaSetDevice(0)")
        if self.manifest["plugins"]["used"]:
            from videoxl.plugins.trt_plugins import register_plugins

            register_plugins(trt)
        self._streams = [Stream("compute")]
        self.compute = self._streams[0]

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

        def load(graph: str, file: str) -> _Engine:
            path = self.engines_dir / file
            try:
                return _Engine(trt, self._runtime, graph, path, self._logger, hint)
            except BackendUnavailable:
                if self._weights.failed_request:
                    raise ArenaOverflowError(
                        f"{path.name}: the weights do not fit the {format_bytes(budget)} arena: TensorRT asked for "
                        f"{format_bytes(self._weights.failed_request)} with {format_bytes(weights.nbytes - self._weights.high_water)} "
                        "left; raise --gpu-memory-budget"
                    ) from None
                raise

        self._vision_pad = self._read_vision_pad()
        for graph in GRAPHS:
            if graph == "decode" and self.decode_on_prefill:
                continue  # decode runs on the prefill_chunk engine
            entry = self.manifest["engines"][graph]
            if "ranges" in entry:  # built in layer ranges (videoxl.engines.ranges): run as one chain
                parts = [load(graph, r["file"]) for r in entry["ranges"]]
                self.engines[graph] = EngineChain(
                    graph, parts, [(r["boundary_in"], r["boundary_out"]) for r in entry["ranges"]],
                    declared_inputs=GRAPHS[graph].input_names(cfg.num_hidden_layers),
                )
            else:
                self.engines[graph] = load(graph, entry["file"])
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
        io_tensors = [(g, t) for g, e in self.engines.items() for t in e.tensors.values() if not (_is_kv(g, t.name) or _borrowed(g, t.name))]
        boundary = [(g, t) for g, e in self.engines.items() if isinstance(e, EngineChain) for t in e.boundary.values()]
        # decode on prefill_chunk: one-token steps replay a graph when the engine reads past_len on the device
        # (with the plugins; the inlined body makes it a host shape input), their new KV in fixed staging
        prefill = self.engines["prefill_chunk"]
        self._prefill_steps_replay = self.decode_on_prefill and "past_len" not in prefill.host_inputs
        step_present = self._present_names if self._prefill_steps_replay else []
        io = self.arena.add("io", sum(align_up(_max_bytes(t)) for _, t in io_tensors + boundary)
                            + len(step_present) * align_up(self._row_bytes))
        self._io = {(g, t.name): io.carve(f"{g}.{t.name}", _max_bytes(t)) for g, t in io_tensors + boundary}
        self._step_present = {name: io.carve(f"step.{name}", self._row_bytes).ptr for name in step_present}
        for g, engine in self.engines.items():
            if isinstance(engine, EngineChain):  # hidden states between layer ranges: device only, never staged
                engine.bind_boundary({name: self._io[(g, name)].ptr for name in engine.boundary})

        # KV regions, sized by the planner for as many frames as fit; the dense tier maybe in pinned host memory
        self.max_frames, rows = self._plan_kv(dense_tier, plan_dense_blocks)
        self._rows = rows
        self._kv = {}
        for name, capacity in (("video", rows.video), ("decode", rows.decode)):
            region = self.arena.add(name, KVSlabs.nbytes(cfg.num_hidden_layers, capacity, self._row_bytes))
            self._kv[name] = KVSlabs(region.ptr, cfg.num_hidden_layers, capacity, self._row_bytes)
        if self.max_frames < self.limits["max_frames"]:
            log.warning(
                "the %s budget holds the KV cache of %d frames; the engines accept %d", format_bytes(budget),
                self.max_frames, self.limits["max_frames"],
            )
        if self.dense_on_host:
            self.copy = Stream("copy")
            self._streams.append(self.copy)
            self._events = {name: Event() for name in ("chunk_written", "copied_out", "staged")}
            self.dense_tier_pool = PinnedHostPool(rows.host_nbytes(cfg.num_hidden_layers, self._row_bytes))
            self._host_tier = KVSlabs(self.dense_tier_pool.ptr, cfg.num_hidden_layers, rows.host, self._row_bytes)
            self._resident = ResidentRows(rows.resident)
            log.info(
                "dense KV tier in pinned host memory: %s (%d rows); the device keeps %d resident rows and stages %d",
                format_bytes(self.dense_tier_pool.layout.capacity), rows.host, rows.resident, rows.staging,
            )

        # pinned host memory: staging for every non-KV I/O tensor (the only bytes that cross the bus)
        staged = [(g, t) for g, t in io_tensors if not _device_only(g, t.name)]
        self.pinned = PinnedHostPool(sum(align_up(_max_bytes(t)) for _, t in staged))
        self._host = {(g, t.name): self.pinned.array(f"{g}.{t.name}", (int(np.prod(t.max)),), t.dtype) for g, t in staged}
        self._graphs = DecodeGraphCache(max_graphs=8 if cuda_graphs else 0)
        log.info("TensorRT backend ready: %s", "; ".join(self.arena.layout.describe()))

    def _read_vision_pad(self) -> tuple[int, np.ndarray]:
        """<|vision_pad|>'s id and embedding row, as `videoxl build` stored them (sha checked with the manifest),
        in the engines' float type: that token's visual row in a question or decode step run as a chunk."""
        entry = self.manifest["vision_pad"]
        path = confined_path(self.engines_dir, entry["file"], what="vision_pad embedding")
        row = np.load(path, allow_pickle=False)
        if row.shape != (self.config.hidden_size,):
            raise unavailable(f"{path}: a row of shape {row.shape}, the model's hidden size is {self.config.hidden_size}; rebuild the engines")
        return int(entry["token"]), row.astype(self.float_dtype)

    def _plan_kv(self, dense_tier: str, dense_blocks: int) -> tuple[int, KVRows]:
        """Frames and KV rows for what the arena has left: both tiers on the device, or the dense tier
        in pinned host memory ("host"; "auto" when the device does not hold the engines' frame limit
        and the host tier holds more frames). Sets ``dense_on_host`` and ``device_max_frames``."""
        fit = dict(available_bytes=self.arena.layout.free, row_bytes=self._row_bytes, dense_blocks=dense_blocks)
        try:
            self.device_max_frames, rows = fit_kv_rows(self.config, self.limits, **fit)
        except ArenaOverflowError:
            if dense_tier == "device":
                raise
            self.device_max_frames, rows = 0, None
        if dense_tier == "device" or (dense_tier == "auto" and self.device_max_frames >= self.limits["max_frames"]):
            return self.device_max_frames, rows
        host = available_host_bytes()
        host = None if host is None else int(host * HOST_TIER_FRACTION)
        try:
            frames, host_rows = fit_kv_rows(self.config, self.limits, dense_tier="host", host_bytes=host, **fit)
        except ArenaOverflowError:
            if dense_tier == "host" or rows is None:
                raise
            return self.device_max_frames, rows
        if dense_tier == "auto" and frames <= self.device_max_frames:
            return self.device_max_frames, rows
        self.dense_on_host = True
        return frames, host_rows

    def close(self) -> None:
        """Free everything, also after a sticky CUDA error; never raises; safe to call twice.

        Queued work is waited for first (pinned buffers and the arena may still be read or written
        by it), then graphs and contexts, engines (their weights live in the arena), pinned memory,
        the stream and the arena are released in that order. Every release is attempted even
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
        tier, self.dense_tier_pool = self.dense_tier_pool, None
        if tier is not None:
            attempt("freeing the pinned dense tier", tier.close)
        streams, self._streams = self._streams, []
        for stream in streams:
            attempt(f"destroying the {stream.name} stream", stream.close)
        events, self._events = self._events, {}
        for name, event in events.items():
            attempt(f"destroying the {name} event", event.close)
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
            where = "with the dense tier in pinned host memory " if self.dense_on_host else ""
            raise ArtifactError(
                f"{frames} frames requested but the {format_bytes(self.arena.budget_bytes)} GPU memory budget holds the KV "
                f"cache of at most {self.max_frames} {where}; lower --max-frames or raise --gpu-memory-budget"
                f"{'' if self.dense_on_host else ' or use --dense-tier host'} (`videoxl plan` shows what fits)"
            )

    def check_prefill(self, *, rule: str, chunk_groups: int, window_chunks: int) -> None:
        """With the dense tier in host memory only the streaming rule runs (see ``_evaluation_refused``)."""
        if self.dense_on_host and rule != "streaming":
            raise self._evaluation_refused()

    def _evaluation_refused(self) -> ValueError:
        fits = f"--max-frames {self.device_max_frames} keeps it on the device" if self.device_max_frames else "fewer frames"
        return ValueError(
            "the dense KV tier is in pinned host memory (the device does not hold it), and under --prefill-rule evaluation "
            "every chunk's timestamp tokens read the whole dense past, which would cross the bus again for every chunk: "
            f"use --prefill-rule streaming, or {fits}"
        )

    def memory_report(self) -> dict[str, int]:
        """Bytes per arena region, plus pinned host bytes (benchmarks, logs)."""
        report = {name: region.nbytes for name, region in self.arena.layout.regions.items()}
        report["pinned_host"] = self.pinned.layout.capacity
        if self.dense_tier_pool is not None:
            report["pinned_dense_tier"] = self.dense_tier_pool.layout.capacity
        return report

    # --- transfers ----------------------------------------------------------------------------------
    def _put(self, graph: str, name: str, array: np.ndarray) -> int:
        """Stage ``array`` in pinned memory and queue its copy to the device; returns the address to bind.

        A shape tensor stays in host memory (TensorRT reads it there): its pinned address is returned.
        """
        host, device = self._host[(graph, name)], self._io[(graph, name)]
        flat = host[: array.size]
        np.copyto(flat, np.asarray(array).reshape(-1), casting="same_kind")
        if name in self.engines[graph].host_inputs:
            return host_pointer(host)
        copy_async(device.ptr, host_pointer(host), flat.nbytes, "HostToDevice", self.compute)
        return device.ptr

    def _fetch(self, graph: str, name: str, count: int) -> np.ndarray:
        """Queue the copy of an output's first ``count`` elements to pinned memory; read after sync."""
        host, device = self._host[(graph, name)], self._io[(graph, name)]
        copy_async(host_pointer(host), device.ptr, count * host.itemsize, "DeviceToHost", self.compute)
        return host[:count]

    def _require_rows(self, region: str, rows: int, what: str) -> None:
        slabs = self._kv[region]
        if rows > slabs.capacity:
            missing = KVSlabs.nbytes(slabs.layers, rows, slabs.row_bytes) - KVSlabs.nbytes(slabs.layers, slabs.capacity, slabs.row_bytes)
            raise ArenaOverflowError(
                f"{what} needs {rows} rows of the '{region}' arena region, which holds {slabs.capacity}: {missing} bytes "
                f"({format_bytes(missing)}) missing; lower --dense-blocks or --max-frames, or raise --gpu-memory-budget"
            )

    def _live(self, cache) -> None:
        """Only the newest video (and decode) cache owns its region; an older handle is refused."""
        live = self._video if isinstance(cache, TrtVideoCache) else self._decode_cache
        if cache is not live:
            kind = "video" if isinstance(cache, TrtVideoCache) else "decode"
            raise RuntimeError(
                f"this {kind} cache's GPU memory now holds a newer one (the TensorRT backend keeps one prepared "
                "video on the device); prepare the video again"
            )

    def _bind_rows(self, shapes: dict, address: dict, prefix: str, slabs: KVSlabs, first_row: int, rows: int) -> None:
        """Bind every layer's K/V rows [first_row, first_row + rows) of `slabs` as `{prefix}_key.i` / `{prefix}_value.i`."""
        cfg = self.config
        for layer in range(cfg.num_hidden_layers):
            key, value = kv_names(prefix, layer)
            shapes[key] = shapes[value] = (rows, cfg.num_key_value_heads, cfg.head_dim)
            address[key], address[value] = slabs.key(layer, first_row), slabs.value(layer, first_row)

    def _download_video(self, cache: TrtVideoCache) -> dict[str, np.ndarray]:
        """Host copies of both tiers (a prepared video saved to disk); the one synchronous D2H path."""
        self._live(cache)
        slabs, rows, cfg = self._kv["video"], cache.sparse_rows + cache.dense_rows, self.config
        if self.dense_on_host:
            return self._download_split(cache)
        shape = (rows, cfg.num_key_value_heads, cfg.head_dim)
        out = {}
        for layer in range(cfg.num_hidden_layers):
            for name, ptr in ((f"key.{layer}", slabs.key(layer)), (f"value.{layer}", slabs.value(layer))):
                out[name] = np.empty(shape, self.float_dtype)
                copy_async(host_pointer(out[name]), ptr, out[name].nbytes, "DeviceToHost", self.compute)
        self.compute.synchronize()
        return out

    def _upload_video(self, cache: TrtVideoCache, arrays: dict[str, np.ndarray]) -> None:
        self._live(cache)
        if self.dense_on_host:
            return self._upload_split(cache, arrays)
        slabs, staged = self._kv["video"], []
        for layer in range(self.config.num_hidden_layers):
            for name, ptr in ((f"key.{layer}", slabs.key(layer)), (f"value.{layer}", slabs.value(layer))):
                staged.append(np.ascontiguousarray(arrays[name], self.float_dtype))  # alive until the copies ran
                copy_async(ptr, host_pointer(staged[-1]), staged[-1].nbytes, "HostToDevice", self.compute)
        self.compute.synchronize()

    def _download_split(self, cache: TrtVideoCache) -> dict[str, np.ndarray]:
        """The sparse tier from the device, the dense tier from pinned host memory once its copies landed."""
        slabs, cfg, sparse = self._kv["video"], self.config, cache.sparse_rows
        out = {}
        for layer in range(cfg.num_hidden_layers):
            for name, ptr in ((f"key.{layer}", slabs.key(layer)), (f"value.{layer}", slabs.value(layer))):
                out[name] = np.empty((sparse + cache.dense_rows, *self._kv_shape), self.float_dtype)
                copy_async(host_pointer(out[name]), ptr, sparse * self._row_bytes, "DeviceToHost", self.compute)
        self.compute.synchronize()
        self.copy.synchronize()  # every chunk's rows are in the host tier
        for layer in range(cfg.num_hidden_layers):
            for name, tier in ((f"key.{layer}", self._host_tier.key(layer)), (f"value.{layer}", self._host_tier.value(layer))):
                out[name][sparse:] = _host_rows(tier, cache.dense_rows, self._kv_shape, self.float_dtype)
        return out

    def _upload_split(self, cache: TrtVideoCache, arrays: dict[str, np.ndarray]) -> None:
        """The sparse tier to the device, the dense tier into pinned host memory; nothing is resident then."""
        slabs, staged, sparse = self._kv["video"], [], cache.sparse_rows
        for layer in range(self.config.num_hidden_layers):
            for name, ptr, tier in (
                (f"key.{layer}", slabs.key(layer), self._host_tier.key(layer)),
                (f"value.{layer}", slabs.value(layer), self._host_tier.value(layer)),
            ):
                array = np.asarray(arrays[name])
                staged.append(np.ascontiguousarray(array[:sparse], self.float_dtype))  # alive until the copies ran
                copy_async(ptr, host_pointer(staged[-1]), staged[-1].nbytes, "HostToDevice", self.compute)
                _host_rows(tier, cache.dense_rows, self._kv_shape, self.float_dtype)[...] = array[sparse:]
        self._resident.clear()
        self.compute.synchronize()

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
            address = {"pixel_values": self._put("vision", "pixel_values", batch), "visual_embeds": self._io[("vision", "visual_embeds")].ptr}
            engine.enqueue(engine.context, address, self.compute)
            shape = (groups, cfg.tokens_per_group, cfg.hidden_size)
            embeds = self._fetch("vision", "visual_embeds", int(np.prod(shape)))
            self.compute.synchronize()
            out.append(embeds.reshape(shape).copy())
        return np.concatenate(out)

    def new_video_cache(self, *, dense_rows: int, sparse_rows: int) -> TrtVideoCache:
        what = f"a video of {dense_rows} prompt rows and {sparse_rows} sparse rows"
        if self.dense_on_host:
            if sparse_rows > self._rows.sparse or dense_rows > self._rows.host:
                raise ArenaOverflowError(
                    f"{what} does not fit the {self._rows.sparse} sparse rows on the device and the {self._rows.host} dense "
                    f"rows in pinned host memory; lower --max-frames (at most {self.max_frames})"
                )
            # the previous video's copies out may still be running: they write the host tier and read
            # the resident rows this video is about to reuse
            self.copy.synchronize()
            self._resident.clear()
        else:
            self._require_rows("video", dense_rows + sparse_rows, what)
        self._generation += 1
        self._video = TrtVideoCache(self, dense_rows, sparse_rows, self._generation)
        if not self.dense_on_host:
            # the gathers' source positions: sparse rows were pooled before RoPE (0), dense row p sits at p
            positions = self._video.source_position
            self._positions = (self._put("kv_gather", "source_position", positions), len(positions))
        return self._video

    def new_decode_cache(self, capacity: int) -> TrtDecodeCache:
        self._require_rows("decode", capacity, f"a decode cache of {capacity} rows")
        self._generation += 1
        self._decode_cache = TrtDecodeCache(capacity, self._generation)
        return self._decode_cache

    def prefill_chunk(self, cache: TrtVideoCache, input_ids, visual_embeds, vis: ChunkVisibility) -> np.ndarray:
        self._live(cache)
        if self.dense_on_host:
            return self._prefill_chunk_resident(input_ids, visual_embeds, vis)
        staged = self._stage_chunk(input_ids, visual_embeds, vis.start, vis.visible_past_index, vis.timestamp_query_index)
        dense = cache.sparse_rows  # dense row p is region row sparse_rows + p
        self._run_chunk(*staged, self._kv["video"], (dense, vis.start), (dense + vis.start, vis.end - vis.start))
        return self._chunk_logits()

    def _stage_chunk(self, input_ids, visual_embeds, past_len, visible_past_index, timestamp_query_index) -> tuple[dict, dict]:
        """The prefill_chunk engine's small inputs, checked against its profile, then staged: (shapes, addresses)."""
        feeds = {
            "input_ids": np.asarray(input_ids, np.int64),
            "visual_embeds": np.asarray(visual_embeds).reshape(-1, self.config.hidden_size),
            "past_len": np.asarray(past_len, np.int64).reshape(1),  # the absolute position: RoPE of the chunk
            "visible_past_index": visible_past_index,
            "timestamp_query_index": timestamp_query_index,
        }
        shapes = {name: value.shape for name, value in feeds.items()}
        self.engines["prefill_chunk"].check_shapes(shapes)  # before anything is staged
        address = {name: self._put("prefill_chunk", name, value) for name, value in feeds.items()}
        address["logits"] = self._io[("prefill_chunk", "logits")].ptr
        address.update(self._query_io)  # read by score only; every run writes them
        return shapes, address

    def _run_chunk(self, shapes: dict, address: dict, slabs: KVSlabs, past: tuple[int, int], present: tuple[int, int]) -> None:
        """Queue the prefill_chunk engine (or chain) on ``compute``: it reads the (first row, rows) ``past`` of
        ``slabs`` in place and writes its own rows at ``present``."""
        engine = self.engines["prefill_chunk"]
        self._bind_rows(shapes, address, "past", slabs, *past)
        self._bind_rows({}, address, "present", slabs, *present)
        engine.set_shapes(engine.context, shapes)
        engine.enqueue(engine.context, address, self.compute)

    def _chunk_logits(self) -> np.ndarray:
        """The prefill_chunk engine's last-position logits, once ``compute`` has run everything queued."""
        logits = self._fetch("prefill_chunk", "logits", self.config.vocab_size)
        self.compute.synchronize()
        return logits.reshape(1, -1).copy()

    def gather(self, cache: TrtVideoCache, plan: GatherPlan, *, into: TrtDecodeCache | None = None) -> None:
        """kv_gather per layer, region to region on the device: source [sparse | dense] of the video region."""
        self._live(cache)
        if into is not None:
            self._live(into)
        engine, source = self.engines["kv_gather"], self._kv["video"]
        target = source if into is None else self._kv["decode"]
        limit = cache.sparse_rows if into is None else into.capacity
        if plan.out_start + plan.rows > limit:
            raise ValueError(f"gather rows [{plan.out_start}, {plan.out_start + plan.rows}) past the destination's {limit} rows")
        if self.dense_on_host:
            self._gather_staged(cache, plan, target)
            if into is not None:
                into.length = plan.out_start + plan.rows
            return
        n = cache.sparse_rows + cache.dense_rows
        feeds = {"gather_index": plan.gather_index, "gather_weight": plan.gather_weight, "target_position": plan.target_position}
        shapes = {name: value.shape for name, value in feeds.items()}
        shapes["source_position"] = (n,)
        engine.check_shapes(shapes)
        address = {name: self._put("kv_gather", name, np.ascontiguousarray(value)) for name, value in feeds.items()}
        address["source_position"] = self._positions[0]
        kv = (n, self.config.num_key_value_heads, self.config.head_dim)
        shapes.update(key=kv, value=kv)
        engine.set_shapes(engine.context, shapes)
        for layer in range(self.config.num_hidden_layers):
            address.update(
                key=source.key(layer), value=source.value(layer),
                mixed_key=target.key(layer, plan.out_start), mixed_value=target.value(layer, plan.out_start),
            )
            engine.enqueue(engine.context, address, self.compute)
        self.compute.synchronize()
        if into is not None:
            into.length = plan.out_start + plan.rows

    # --- the dense tier in pinned host memory (module docstring; runtime/dense_tier.py) ----------
    def _copy_rows(self, dst: KVSlabs, dst_row: int, src: KVSlabs, src_row: int, rows: int, kind: str, stream: Stream) -> None:
        """Rows [src_row, src_row + rows) of every layer's K and V to dst_row..: one 2-D copy (the slabs
        K0 V0 K1 V1 .. of a KVSlabs are evenly spaced, in device and in host memory alike)."""
        pitch = lambda slabs: KVSlabs.slab_bytes(slabs.capacity, slabs.row_bytes)  # noqa: E731
        copy_2d_async(
            dst.key(0, dst_row), pitch(dst), src.key(0, src_row), pitch(src), rows * self._row_bytes,
            2 * self.config.num_hidden_layers, kind, stream,
        )

    def _prefill_chunk_resident(self, input_ids, visual_embeds, vis: ChunkVisibility) -> np.ndarray:
        """A chunk against the resident rows; its own rows then leave for the host tier on the copy stream.

            compute: [compact if full] [inputs up] [engine: past = resident rows, present -> resident end] (chunk_written)
            copy:                                   wait chunk_written, rows -> host tier (copied_out)
        The copy out overlaps the next chunk; compaction, which overwrites rows, waits for it.
        """
        if len(vis.timestamp_query_index):
            raise self._evaluation_refused()
        slabs, resident, base = self._kv["video"], self._resident, self._rows.sparse
        visible = vis.visible_past_index
        resident.keep_only(visible)  # rows no later chunk reads become holes
        rows = vis.end - vis.start
        if resident.end + rows > resident.capacity:
            self.compute.wait(self._events["copied_out"])  # the rows moved over may still be on their way out
            for source, target, count in resident.compact():
                self._copy_rows(slabs, base + target, slabs, base + source, count, "DeviceToDevice", self.compute)
            if resident.end + rows > resident.capacity:
                raise ArenaOverflowError(
                    f"the prefill chunk at position {vis.start} reads {resident.end} dense rows and writes {rows}, but the device "
                    f"keeps {resident.capacity} (sized for the engines' window of {self.limits.get('window_chunks')} chunks of "
                    f"{self.limits.get('chunk_groups')} groups); lower --window or --chunk-groups, or use --dense-tier device"
                )
        # visible rows in position order: each row <= its position < past_len
        staged = self._stage_chunk(input_ids, visual_embeds, vis.start, resident.rows_of(visible), vis.timestamp_query_index)
        past_rows = resident.end
        first = resident.append(vis.start, rows)
        self._run_chunk(*staged, slabs, (base, past_rows), (base + first, rows))
        self._events["chunk_written"].record(self.compute)
        self.copy.wait(self._events["chunk_written"])
        self._copy_rows(self._host_tier, vis.start, slabs, base + first, rows, "DeviceToHost", self.copy)
        self._events["copied_out"].record(self.copy)
        return self._chunk_logits()

    def _gather_staged(self, cache: TrtVideoCache, plan: GatherPlan, target: KVSlabs) -> None:
        """kv_gather over [sparse tier | resident rows | staging]: the plan's dense rows are read where
        they are resident, the others uploaded from the host tier first (one copy per run of positions,
        on the copy stream, so after every copy out), in as many passes as the staging area needs."""
        engine, source, rows = self.engines["kv_gather"], self._kv["video"], self._rows
        staging = rows.sparse + rows.resident
        pieces = split_gather(
            plan.gather_index, sparse_rows=cache.sparse_rows, sparse_capacity=rows.sparse, resident=self._resident,
            staging_rows=rows.staging,
        )
        n = source.capacity
        positions = np.zeros(n, np.int64)  # sparse rows were pooled before RoPE (0); dense rows sit at their position
        positions[rows.sparse : staging] = np.maximum(self._resident.positions, 0)
        kv = (n, self.config.num_key_value_heads, self.config.head_dim)
        for piece in pieces:
            if len(piece.staged):
                for position, at, count in runs(piece.staged):
                    self._copy_rows(source, staging + at, self._host_tier, position, count, "HostToDevice", self.copy)
                self._events["staged"].record(self.copy)
                self.compute.wait(self._events["staged"])
                positions[staging : staging + len(piece.staged)] = piece.staged
            feeds = {
                "gather_index": piece.gather_index,
                "gather_weight": np.ascontiguousarray(plan.gather_weight[piece.first : piece.last]),
                "target_position": np.ascontiguousarray(plan.target_position[piece.first : piece.last]),
                "source_position": positions,
            }
            shapes = {name: value.shape for name, value in feeds.items()}
            engine.check_shapes(shapes)
            address = {name: self._put("kv_gather", name, value) for name, value in feeds.items()}
            shapes.update(key=kv, value=kv)
            engine.set_shapes(engine.context, shapes)
            out = plan.out_start + piece.first
            for layer in range(self.config.num_hidden_layers):
                address.update(
                    key=source.key(layer), value=source.value(layer),
                    mixed_key=target.key(layer, out), mixed_value=target.value(layer, out),
                )
                engine.enqueue(engine.context, address, self.compute)
            # the next piece rewrites the staging rows and the pinned inputs: this one must have read them
            self.compute.synchronize()

    def score(self, cache: TrtDecodeCache, input_ids) -> np.ndarray:
        """The question as a chunk on prefill_chunk over the scoring cache, then the weightless score engine
        over its queries and keys where that run left them (module docstring)."""
        self._live(cache)
        ids, past, cfg = np.asarray(input_ids, np.int64), cache.length, self.config
        slabs, t = self._kv["decode"], len(ids)
        self._require_rows("decode", past + t, "the question's keys after the scoring cache")
        engine = self.engines["score"]
        shapes = {"past_len": (1,)}
        for layer in range(cfg.num_hidden_layers):
            shapes[f"query.{layer}"] = (t, cfg.num_attention_heads, cfg.head_dim)
            shapes[f"key.{layer}"] = (t, *self._kv_shape)
            shapes[kv_names("past", layer)[0]] = (past, *self._kv_shape)
        engine.check_shapes(shapes)
        # its KV goes to decode rows [past, past + t): the scoring cache is not read again after this call
        self._run_chunk(*self._stage_chunk(**decode_as_chunk(ids, past, *self._vision_pad)), slabs, (0, past), (past, t))
        address = {"past_len": self._put("score", "past_len", np.array([past], np.int64)), "attention_mass": self._io[("score", "attention_mass")].ptr}
        address.update(self._query_io)
        for layer in range(cfg.num_hidden_layers):
            address[f"key.{layer}"] = slabs.key(layer, past)
            address[kv_names("past", layer)[0]] = slabs.key(layer, 0)
        engine.set_shapes(engine.context, shapes)
        engine.enqueue(engine.context, address, self.compute)
        mass = self._fetch("score", "attention_mass", past)
        self.compute.synchronize()
        return mass.copy()

    def decode(self, cache: TrtDecodeCache, input_ids) -> np.ndarray:
        """One step: replays the captured graph of its (tokens, bucket) after the first use, then moves
        the new rows from the engine's output staging to the cache (their row changes every step).
        Engines built with --decode-on-prefill: a plain step on the prefill_chunk engine instead."""
        self._live(cache)
        if self.decode_on_prefill:
            return self._decode_on_prefill(cache, np.asarray(input_ids, np.int64))
        slabs, t, past = self._kv["decode"], len(input_ids), cache.length
        if past + t > cache.capacity:
            raise RuntimeError(f"decode cache full: {past} + {t} > capacity {cache.capacity}")
        bucket = capacity_bucket(past + t, granule=DECODE_BUCKET_ROWS, capacity=slabs.capacity)
        self.engines["decode"].check_shapes({"input_ids": (t,), "past_key.0": (bucket, *self._kv_shape)})
        np.copyto(self._host[("decode", "input_ids")][:t], np.asarray(input_ids, np.int64))
        self._host[("decode", "past_len")][0] = past
        self._replayed_step("decode", (t, bucket), lambda context: self._decode_step(context, t, bucket))
        self._append_new_rows(slabs, past, t, {name: self._io[("decode", name)].ptr for name in self._present_names})
        self.compute.synchronize()
        cache.length = past + t
        return self._host[("decode", "logits")][: self.config.vocab_size].reshape(1, -1).copy()

    def _replayed_step(self, graph: str, key: tuple, step) -> None:
        """Queue one step of ``graph``'s engine: replay the CUDA graph of ``key``, or run ``step(context)`` plainly
        and, on the step's first use, capture it on a context of its own (``DecodeGraphCache``)."""
        action = self._graphs.action(key)
        if action == "replay":
            self._graphs.graphs[key][1].launch(self.compute)
            return
        engine = self.engines[graph]
        context = engine.new_context() if action == "capture" else engine.context
        if action == "capture":
            context.set_device_memory(*self._activations)
        step(context)
        if action == "capture":
            self._capture(key, context, step)

    def _decode_on_prefill(self, cache: TrtDecodeCache, ids: np.ndarray) -> np.ndarray:
        """A decode step as a chunk on the prefill_chunk engine (module docstring). A one-token step replays a
        CUDA graph per (pads, bucket), as a decode engine's does: it reads decode rows [0, bucket) with the
        token as a timestamp query (every row < past_len, a device value) and writes its KV to fixed staging.
        Longer steps (the question) and engines that read past_len on the host run plainly, in place."""
        past, t = cache.length, len(ids)
        if past + t > cache.capacity:
            raise RuntimeError(f"decode cache full: {past} + {t} > capacity {cache.capacity}")
        slabs, engine = self._kv["decode"], self.engines["prefill_chunk"]
        if t != 1 or not self._prefill_steps_replay:
            self._run_chunk(*self._stage_chunk(**decode_as_chunk(ids, past, *self._vision_pad)), slabs, (0, past), (past, t))
            logits = self._chunk_logits()
            cache.length = past + t
            return logits
        bucket = capacity_bucket(past + t, granule=DECODE_BUCKET_ROWS, capacity=slabs.capacity)
        token, pad_row = self._vision_pad
        pads = int(np.count_nonzero(ids == token))
        shapes = {"input_ids": (t,), "visual_embeds": (pads, self.config.hidden_size), "past_len": (1,),
                  "visible_past_index": (0,), "timestamp_query_index": (t,)}
        engine.check_shapes({**shapes, "past_key.0": (bucket, *self._kv_shape)})
        host = lambda name: self._host[("prefill_chunk", name)]  # noqa: E731
        np.copyto(host("input_ids")[:t], ids)
        host("visual_embeds")[: pads * pad_row.size] = np.tile(pad_row, pads)
        host("past_len")[0] = past
        host("timestamp_query_index")[:t] = np.arange(t)
        self._replayed_step("prefill_chunk", ("prefill_chunk", t, pads, bucket),
                            lambda context: self._prefill_decode_step(context, shapes, bucket))
        self._append_new_rows(slabs, past, t, self._step_present)
        self.compute.synchronize()
        cache.length = past + t
        return host("logits")[: self.config.vocab_size].reshape(1, -1).copy()

    def _prefill_decode_step(self, context, shapes: dict, bucket: int) -> None:
        """One decode step on the prefill_chunk engine with fixed addresses (what a graph records): inputs up
        from their pinned staging, the engine over decode rows [0, bucket), new KV to ``_step_present``."""
        engine = self.engines["prefill_chunk"]
        address = {}
        for name, shape in shapes.items():
            host, device = self._host[("prefill_chunk", name)], self._io[("prefill_chunk", name)]
            count = int(np.prod(shape))
            if count:
                copy_async(device.ptr, host_pointer(host), count * host.itemsize, "HostToDevice", self.compute)
            address[name] = device.ptr
        address["logits"] = self._io[("prefill_chunk", "logits")].ptr
        address.update(self._query_io)
        bound = dict(shapes)
        self._bind_rows(bound, address, "past", self._kv["decode"], 0, bucket)
        address.update(self._step_present)
        engine.set_shapes(context, bound)
        engine.enqueue(context, address, self.compute)
        self._fetch("prefill_chunk", "logits", self.config.vocab_size)

    @property
    def _kv_shape(self) -> tuple[int, int]:
        return (self.config.num_key_value_heads, self.config.head_dim)

    def _decode_step(self, context, t: int, bucket: int) -> None:
        """Everything one decode step queues with fixed addresses (what a graph records): the small
        inputs up, the engine over decode rows [0, bucket), the new KV into staging, the logits down."""
        engine, slabs, cfg = self.engines["decode"], self._kv["decode"], self.config
        shapes = {"input_ids": (t,), "past_len": (1,)}
        address = {}
        for name in ("input_ids", "past_len"):
            host = self._host[("decode", name)]
            if name in engine.host_inputs:
                address[name] = host_pointer(host)
            else:
                copy_async(self._io[("decode", name)].ptr, host_pointer(host), shapes[name][0] * host.itemsize, "HostToDevice", self.compute)
                address[name] = self._io[("decode", name)].ptr
        address["logits"] = self._io[("decode", "logits")].ptr
        self._bind_rows(shapes, address, "past", slabs, 0, bucket)
        for layer in range(cfg.num_hidden_layers):
            for name in kv_names("present", layer):
                address[name] = self._io[("decode", name)].ptr
        engine.set_shapes(context, shapes)
        engine.enqueue(context, address, self.compute)
        self._fetch("decode", "logits", cfg.vocab_size)

    @property
    def _query_io(self) -> dict[str, int]:
        """prefill_chunk's query.i outputs: their io buffers, which score reads in place."""
        return {f"query.{layer}": self._io[("prefill_chunk", f"query.{layer}")].ptr for layer in range(self.config.num_hidden_layers)}

    @property
    def _present_names(self) -> list[str]:
        return [name for layer in range(self.config.num_hidden_layers) for name in kv_names("present", layer)]

    def _append_new_rows(self, slabs: KVSlabs, row: int, t: int, staging: dict[str, int]) -> None:
        """The step's new K/V from the engine's staging outputs (name -> address) to rows [row, row + t) of every layer."""
        for layer in range(self.config.num_hidden_layers):
            for name, dst in zip(kv_names("present", layer), (slabs.key(layer, row), slabs.value(layer, row))):
                copy_async(dst, staging[name], t * slabs.row_bytes, "DeviceToDevice", self.compute)

    def _capture(self, key: tuple, context, step) -> None:
        """Record ``step(context)`` as the CUDA graph of ``key`` (after its plain run)."""
        capturable = getattr(context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.compute.handle):
            log.info("%s context is not stream-capturable: CUDA graphs off", key[0] if isinstance(key[0], str) else "decode")
            self._graphs.max_graphs = 0
            return
        # not for data (the capture only records): TensorRT must have finished the plain run, which
        # settles its shape-dependent state, before its enqueue is recorded
        self.compute.synchronize()
        graph = CudaGraph(f"step {key}")
        with graph.capture(self.compute):
            step(context)
        for _old_context, old_graph in self._graphs.add(key, (context, graph)):
            old_graph.close()


def _host_rows(ptr: int, rows: int, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A numpy view of ``rows`` K or V rows of one layer of the pinned host tier."""
    count = rows * int(np.prod(shape))
    raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(rows, *shape)


def _is_kv(graph: str, name: str) -> bool:
    """KV tensors live in the KV regions (bound in place), except decode's new rows: they go to
    fixed staging buffers, so that a captured graph's addresses stay valid every step."""
    if graph == "kv_gather":
        return name in ("key", "value", "mixed_key", "mixed_value")
    if graph == "decode" and name.startswith("present_"):
        return False
    return bool(_KV_NAME.match(name))


def _borrowed(graph: str, name: str) -> bool:
    """score's question tensors: bound where the prefill_chunk run left them (its query.i io buffers, the
    question's key rows in the decode region), so they get no buffers of their own."""
    return graph == "score" and bool(_QUESTION_TENSOR.match(name))


def _device_only(graph: str, name: str) -> bool:
    """Outputs no host reads (no pinned staging): prefill_chunk's queries, which only score reads."""
    return graph == "prefill_chunk" and name.startswith("query.")


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
