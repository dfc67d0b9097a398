"""ONNX Runtime backend: the embedded default (CPU; CUDA execution provider where onnxruntime-gpu is installed).

The KV cache lives in buffers this backend allocates once per video and per question, on the
session's device: numpy arrays on the CPU, ONNX Runtime device tensors on CUDA. Every graph
reads and writes them through I/O binding at row offsets, so no KV is copied between graphs:

    prefill_chunk  past_key.i   <- dense rows [0, start)            (a view, not a copy)
                   present_key.i -> dense rows [start, end)          (written in place)
    kv_gather      key, value   <- [sparse | dense] of layer i
                   mixed_key    -> sparse rows, or decode-cache rows  (written in place)
    decode         past_key.i   <- decode-cache rows [0, length); writes [length, length + T)
    score          past_key.i   <- scoring-cache rows [0, length); the question's query.i, key.i

Sessions: every session holds its own copy of the int4/int8 weights (ONNX Runtime repacks the
fused MatMulNBits weights per session; float weights in external data are memory-mapped), so an
8B int4 export costs ~4.5 GB per LLM session. One LLM session serves everything by default:

- decode runs on the prefill_chunk session (``share_llm_session``, the default): a decode step
  is a chunk that sees every past row, no timestamp queries, no visual rows

      decode(ids) == prefill_chunk(ids, visual_embeds = [], past_len = length,
                                   visible_past_index = 0..length-1, timestamp_query_index = [])

  (a generated <|vision_pad|> gets its own embedding row as its "visual" row, so the splice is
  exact); decode.onnx is then never loaded;
- block scoring runs the question the same way on the scoring cache, keeping its per-layer
  queries and keys (``query.i``, ``present_key.i``) in buffers of its own, and the score graph,
  which holds no weights, sums their attention probabilities.
Sessions load with the backend, so their load time is not counted as vision or prefill time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

import videoxl
from videoxl.backend import Backend, DecodeCache, GatherPlan, VideoCache
from videoxl.embedding import decode_as_chunk, embedding_row
from videoxl.graphs import GRAPHS, kv_names
from videoxl.layout import ChunkVisibility
from videoxl.runtime.artifacts import ArtifactError, OnnxArtifacts, load_onnx_artifacts

log = logging.getLogger(__name__)

NUMPY_FLOAT = {"fp32": np.float32, "fp16": np.float16}
# ONNX Runtime's level for the DequantizeLinear -> MatMul fusion into MatMulNBits: 0/1 float32
# activations; 4 (its default) int8 activations, quantized per block inside the kernel.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class _Rows:
    """Per-layer K and V buffers of `rows` rows on one device, addressed by row (`heads`: Hq for a
    question's queries, held in `keys`, with `values=False`)."""

    def __init__(self, backend: "OnnxRuntimeBackend", rows: int, *, heads: int | None = None, values: bool = True) -> None:
        cfg = backend.config
        self.device, self.dtype = backend.device, backend.float_dtype
        self.shape = (rows, heads or cfg.num_key_value_heads, cfg.head_dim)
        self.row_bytes = self.shape[1] * cfg.head_dim * self.dtype.itemsize
        self.keys = [self._buffer() for _ in range(cfg.num_hidden_layers)]
        self.values = [self._buffer() for _ in range(cfg.num_hidden_layers)] if values else []

    def _buffer(self):
        if self.device == "cpu":
            return np.zeros(self.shape, self.dtype)
        return ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype, "cuda", 0)  # owned by ONNX Runtime, bound by address

    def address(self, buffer, row: int) -> int:
        base = buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()
        return base + row * self.row_bytes

    def bind(self, binding: ort.IOBinding, name: str, buffer, first: int, rows: int, *, output: bool = False) -> None:
        """Bind rows [first, first + rows) of `buffer` as graph tensor `name`, in place."""
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device, 0, self.dtype, (rows, *self.shape[1:]), self.address(buffer, first))

    def host(self, buffer) -> np.ndarray:
        return buffer.copy() if isinstance(buffer, np.ndarray) else buffer.numpy()


class OrtVideoCache(VideoCache):
    def __init__(self, backend: "OnnxRuntimeBackend", dense_rows: int, sparse_rows: int) -> None:
        self.dense_rows, self.sparse_rows = dense_rows, sparse_rows
        self.rows = _Rows(backend, sparse_rows + dense_rows)
        self.positions = self.source_position  # bound to every gather from this cache

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for layer, (k, v) in enumerate(zip(self.rows.keys, self.rows.values)):
            out[f"key.{layer}"], out[f"value.{layer}"] = self.rows.host(k), self.rows.host(v)
        return out

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        for layer, (k, v) in enumerate(zip(self.rows.keys, self.rows.values)):
            for buffer, name in ((k, f"key.{layer}"), (v, f"value.{layer}")):
                source = np.ascontiguousarray(arrays[name], self.rows.dtype)
                if source.shape != self.rows.shape:
                    raise ValueError(f"{name}: shape {source.shape}, this cache holds {self.rows.shape}")
                if isinstance(buffer, np.ndarray):
                    np.copyto(buffer, source)
                else:
                    buffer.update_inplace(source)


@dataclass
class OrtDecodeCache(DecodeCache):
    rows: _Rows
    capacity: int
    length: int = 0


class OnnxRuntimeBackend(Backend):
    """The exported ONNX graphs on ONNX Runtime; KV stays in this backend's buffers (module docstring)."""

    name = "onnxruntime"

    def __init__(
        self, artifacts: OnnxArtifacts | str | Path, *, providers: list[str] | None = None, threads: int = 0,
        matmul_accuracy_level: int | None = None, share_llm_session: bool = True,
    ) -> None:
        """``threads``: intra-op threads per session (0: ONNX Runtime's choice, one per physical core).
        ``matmul_accuracy_level``: MatMulNBits accuracy level of int8/int4 exports (``ACCURACY_LEVELS``;
        None: ONNX Runtime's default 4, int8 activations; 0 keeps them float32, 2.5x slower for int4).
        ``share_llm_session``: decode on the prefill_chunk session (module docstring); False loads
        decode.onnx as well (one more copy of the LLM weights)."""
        self.artifacts = artifacts if isinstance(artifacts, OnnxArtifacts) else load_onnx_artifacts(artifacts)
        self.config = self.artifacts.config
        self.artifact_dir = self.artifacts.root
        self.max_frames = self.artifacts.max_frames
        if self.artifacts.dtype not in NUMPY_FLOAT:
            raise ValueError(f"ONNX Runtime cannot run {self.artifacts.dtype} graphs here; export with --dtype fp32 or fp16")
        if matmul_accuracy_level is not None and matmul_accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"matmul_accuracy_level {matmul_accuracy_level!r} is not one of {ACCURACY_LEVELS}")
        self.float_dtype = np.dtype(NUMPY_FLOAT[self.artifacts.dtype])
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3
        if threads:
            self._options.intra_op_num_threads = threads
        if matmul_accuracy_level is not None:
            self._options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmul_accuracy_level))
        self.providers = providers or default_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._check_io()  # from the small .onnx files: a stale export fails before any weight is read
        self.sessions: dict[str, ort.InferenceSession] = {}
        self._bindings: dict[str, ort.IOBinding] = {}
        self.load_seconds: dict[str, float] = {}  # per graph, as loaded
        self.share_llm_session = share_llm_session
        vision_pad = (self.artifacts.manifest.get("special_tokens") or {}).get("vision_pad")
        if vision_pad is None:  # a question (and, with share_llm_session, a decode step) runs as a chunk
            raise ArtifactError(f"{self.artifact_dir}: the export manifest names no vision_pad token; re-export the directory")
        self._vision_pad = int(vision_pad)
        self._vision_pad_row: np.ndarray | None = None  # its embedding, read from the export on first need
        for name in GRAPHS:
            if not (share_llm_session and name == "decode"):
                self._session(name)
        self._logits_shape = (1, self.config.vocab_size)
        log.info("ONNX Runtime backend on %s, KV on %s", self.providers, self.device)

    def _session(self, name: str) -> ort.InferenceSession:
        """The graph's session, created with the backend (decode's on first use, when not shared)."""
        if name not in self.sessions:
            started = time.perf_counter()
            log.info("loading the %s graph into ONNX Runtime", name)
            self.sessions[name] = ort.InferenceSession(str(self.artifacts.graph_path(name)), self._options, providers=self.providers)
            self._bindings[name] = self.sessions[name].io_binding()
            self.load_seconds[name] = time.perf_counter() - started
        return self.sessions[name]

    def _check_io(self) -> None:
        """Graphs exported by another videoxl version fail here, naming the difference."""
        layers = self.config.num_hidden_layers
        for name, contract in GRAPHS.items():
            path = self.artifacts.graph_path(name)
            try:
                graph = onnx.load(str(path), load_external_data=False).graph
            except DecodeError as err:  # truncated or not a graph (manifests without sizes let one through)
                raise ArtifactError(f"{path}: cannot load a graph ({str(err).splitlines()[0]}); re-export the directory") from err
            constants = {t.name for t in graph.initializer}  # older IRs list initializers as inputs too
            for kind, expected, found in (
                ("inputs", contract.input_names(layers), [i.name for i in graph.input if i.name not in constants]),
                ("outputs", contract.output_names(layers), [o.name for o in graph.output]),
            ):
                if set(found) != set(expected):
                    raise ArtifactError(
                        f"{path}: {kind} differ from what this videoxl {videoxl.__version__} "
                        f"binds (missing {sorted(set(expected) - set(found))}, unexpected {sorted(set(found) - set(expected))}); "
                        "re-export with `videoxl export`"
                    )

    def check_frames(self, frames: int) -> None:
        self.artifacts.check_frames(frames)

    def _run(self, graph: str, small_inputs: dict[str, np.ndarray], output: str, shape: tuple[int, ...]) -> np.ndarray:
        """Run `graph` with its KV already bound; small inputs from the host, one small float32 output back."""
        self._session(graph)
        binding = self._bindings[graph]
        for name, value in small_inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        result = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0)
        binding.bind_ortvalue_output(output, result)
        self.sessions[graph].run_with_iobinding(binding)
        return result.numpy()

    # --- Backend interface --------------------------------------------------------------------
    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        return self._session("vision").run(None, {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def new_video_cache(self, *, dense_rows: int, sparse_rows: int) -> OrtVideoCache:
        return OrtVideoCache(self, dense_rows, sparse_rows)

    def new_decode_cache(self, capacity: int) -> OrtDecodeCache:
        return OrtDecodeCache(_Rows(self, capacity), capacity)

    def prefill_chunk(self, cache: OrtVideoCache, input_ids, visual_embeds, vis: ChunkVisibility) -> np.ndarray:
        binding, rows, count = self._bindings["prefill_chunk"], cache.rows, vis.end - vis.start
        if vis.end > cache.dense_rows:
            raise ValueError(f"chunk rows [{vis.start}, {vis.end}) outside the dense tier of {cache.dense_rows} rows")
        base = cache.sparse_rows  # dense row p is buffer row base + p
        for layer in range(self.config.num_hidden_layers):
            for (past, present), buffer in zip(zip(kv_names("past", layer), kv_names("present", layer)), (rows.keys[layer], rows.values[layer])):
                rows.bind(binding, past, buffer, base, vis.start)
                rows.bind(binding, present, buffer, base + vis.start, count, output=True)
        return self._run("prefill_chunk", {
            "input_ids": np.asarray(input_ids, np.int64),
            "visual_embeds": np.asarray(visual_embeds, self.float_dtype).reshape(-1, self.config.hidden_size),
            "past_len": np.array([vis.start], np.int64),
            "visible_past_index": vis.visible_past_index,
            "timestamp_query_index": vis.timestamp_query_index,
        }, "logits", self._logits_shape)

    def gather(self, cache: OrtVideoCache, plan: GatherPlan, *, into: OrtDecodeCache | None = None) -> None:
        binding, source = self._bindings["kv_gather"], cache.rows
        target = source if into is None else into.rows
        limit = cache.sparse_rows if into is None else into.capacity
        if plan.out_start + plan.rows > limit:
            raise ValueError(f"gather rows [{plan.out_start}, {plan.out_start + plan.rows}) past the destination's {limit} rows")
        for name, value in (("gather_index", plan.gather_index), ("gather_weight", plan.gather_weight),
                            ("source_position", cache.positions), ("target_position", plan.target_position)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for layer in range(self.config.num_hidden_layers):
            for name, out, src, dst in (("key", "mixed_key", source.keys, target.keys), ("value", "mixed_value", source.values, target.values)):
                source.bind(binding, name, src[layer], 0, source.shape[0])
                target.bind(binding, out, dst[layer], plan.out_start, plan.rows, output=True)
            self.sessions["kv_gather"].run_with_iobinding(binding)
        if into is not None:
            into.length = plan.out_start + plan.rows

    def _bind_cache(self, graph: str, cache: OrtDecodeCache, new_tokens: int, *, write: bool) -> ort.IOBinding:
        self._session(graph)
        binding, rows = self._bindings[graph], cache.rows
        if write and cache.length + new_tokens > cache.capacity:
            raise RuntimeError(f"decode cache full: {cache.length} + {new_tokens} > capacity {cache.capacity}")
        for layer in range(self.config.num_hidden_layers):
            for past, present, buffer in zip(kv_names("past", layer), kv_names("present", layer), (rows.keys[layer], rows.values[layer])):
                rows.bind(binding, past, buffer, 0, cache.length)
                if write:
                    rows.bind(binding, present, buffer, cache.length, new_tokens, output=True)
        return binding

    def score(self, cache: OrtDecodeCache, input_ids) -> np.ndarray:
        """The question as a chunk on the prefill_chunk session (its queries and keys into buffers of this
        call, the scoring cache untouched), then the weightless score graph over them."""
        ids, past, layers = np.asarray(input_ids, np.int64), cache.length, self.config.num_hidden_layers
        own = _Rows(self, len(ids))  # the question's K and V
        queries = _Rows(self, len(ids), heads=self.config.num_attention_heads, values=False)
        chunk = self.sessions["prefill_chunk"].io_binding()  # its own: decode's binding must not keep these buffers
        mass = self.sessions["score"].io_binding()
        mass.bind_cpu_input("past_len", np.array([past], np.int64))
        for layer in range(layers):
            for i, (past_name, present_name) in enumerate(zip(kv_names("past", layer), kv_names("present", layer))):
                cache.rows.bind(chunk, past_name, (cache.rows.keys, cache.rows.values)[i][layer], 0, past)
                own.bind(chunk, present_name, (own.keys, own.values)[i][layer], 0, len(ids), output=True)
            queries.bind(chunk, f"query.{layer}", queries.keys[layer], 0, len(ids), output=True)
            queries.bind(mass, f"query.{layer}", queries.keys[layer], 0, len(ids))
            own.bind(mass, f"key.{layer}", own.keys[layer], 0, len(ids))
            cache.rows.bind(mass, kv_names("past", layer)[0], cache.rows.keys[layer], 0, past)
        for name, value in decode_as_chunk(ids, past, self._vision_pad, self._pad_embedding()).items():
            chunk.bind_cpu_input(name, np.ascontiguousarray(value))
        chunk.bind_output("logits", self.device)  # unused: ONNX Runtime allocates it
        self.sessions["prefill_chunk"].run_with_iobinding(chunk)
        result = ort.OrtValue.ortvalue_from_shape_and_type((past,), np.float32, self.device, 0)
        mass.bind_ortvalue_output("attention_mass", result)
        self.sessions["score"].run_with_iobinding(mass)
        return result.numpy()

    def decode(self, cache: OrtDecodeCache, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64)
        if self.share_llm_session:
            self._bind_cache("prefill_chunk", cache, len(ids), write=True)
            feeds = decode_as_chunk(ids, cache.length, self._vision_pad, self._pad_embedding())
            logits = self._run("prefill_chunk", feeds, "logits", self._logits_shape)
        else:
            self._bind_cache("decode", cache, len(ids), write=True)
            logits = self._run("decode", {"input_ids": ids, "past_len": np.array([cache.length], np.int64)}, "logits", self._logits_shape)
        cache.length += len(ids)
        return logits

    def _pad_embedding(self) -> np.ndarray:
        """Row <|vision_pad|> of the embedding table, read from the export (external data: one row's bytes)."""
        if self._vision_pad_row is None:
            row = embedding_row(self.artifacts.graph_path("prefill_chunk"), self._vision_pad)
            self._vision_pad_row = row.astype(self.float_dtype)
        return self._vision_pad_row
