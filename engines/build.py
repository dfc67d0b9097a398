"""`videoxl build`: the exporter's ONNX directory -> a checked engine directory.

    onnx_dir/{vision,prefill_chunk,decode,score,kv_gather}.onnx + config.json   (videoxl.graphs)
      -> check contract I/O, precision, targets, memory budgets, dimension names   (before any TensorRT work)
      -> per graph: parse (plugins or inlined function bodies), one optimization profile from
         the frame budget (profiles.py) with value ranges for shape tensors, strongly typed build
      -> out_dir/{graph}.engine + config.json + manifest.json
         (per engine: plugin layers, fused attention layers, host/device location of each input)

An LLM graph whose weights exceed ``max_engine_weights`` (default 4 GiB: the 8B model's 14.2 GiB
LLM then builds as 4 engines of ~3.6 GiB, each within ~10 GiB of build memory, where one engine
does not fit 20 GiB) is cut into layer ranges (``ranges.py``): their small .onnx files are written
beside the export, over its external data, and each range is built as its own engine,
``{graph}.layers_AA-BB.engine``. Its manifest entry lists the ranges in order with the boundary
tensors each takes in and gives out; the TensorRT backend runs them as one chain.

With plugins, the two videoxl custom ops become our IPluginV3 plugins; without (--no-plugins)
their function bodies are inlined, attention is the standard ONNX Attention op that TensorRT
maps to its fused attention layers, and the engines load with stock TensorRT and no plugin
library (the route for C++ products).

Everything is written into a hidden sibling directory and renamed to ``out_dir`` only when all
engines are built: a failed build leaves no partial engine directory, and an existing one
is replaced only by a complete new one.

The score engine holds no weights: a question runs on the prefill_chunk engine as a chunk over the
scoring cache, and score sums the attention of its queries and keys. With ``--decode-on-prefill``
the decode engine is not built either: the runtime decodes on the prefill_chunk engine, whose
profile widens to the decode capacity (``profiles.py``), so the LLM's weights are on the GPU once.
A question or a decode step run as a chunk gives each <|vision_pad|> token its own embedding as its
visual row: that one row is read from the export and written beside the engines
(``manifest.VISION_PAD_FILE``, with its sha256 in the manifest).

TensorRT for RTX builds with no GPU for the compute capabilities it is given (default sm_89);
standard TensorRT builds for the GPU it runs on.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

import videoxl
from videoxl.config import ConfigError, VideoXLConfig
from videoxl.embedding import embedding_row
from videoxl.engines import manifest as manifest_io
from videoxl.engines.errors import EngineBuildError
from videoxl.engines.profiles import (
    DEFAULT_MAX_ENGINE_WEIGHTS,
    GRAPH_FILES,
    GRAPHS,
    PRECISION_BYTES,
    BuildLimits,
    TokenBudget,
    dimension_ranges,
    format_bytes,
    input_profile,
    ShapeValues,
    kv_cache_bytes,
    shape_input_values,
)
from videoxl.engines.ranges import RANGED_GRAPHS, RangeGraph, split_layers, write_range
from videoxl.engines.trt_install import install_fix_applied
from videoxl.outdir import OutputDirError, check_out_dir, describe_os_error, is_filesystem_error, staged
from videoxl.engines.trt_module import (
    describe,
    flavour_of,
    gpu_compute_capability,
    import_tensorrt,
    is_rtx,
    normalize_target,
    rtx_compute_capability,
    target_version,
    trt_logger,
)
from videoxl import graphs as graph_contract
from videoxl.ops import ALL_OPS, DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION
from videoxl.runtime.memory_plan import MemoryPlan, plan_memory
from videoxl.weight_format import WeightFormat

log = logging.getLogger(__name__)

PRECISIONS = tuple(PRECISION_BYTES)
DEFAULT_RTX_TARGETS = ("sm_89",)
BF16_MIN_TARGET = (8, 0)
# Graphs with this many bytes of weights are built for weight streaming and serialised to their
# file as they are built (the 8B LLM graphs): the device need not hold all of them, nor the build
# process a second in-memory copy of the plan.
STREAM_WEIGHTS_BYTES = 2**31
_ONNX_PRECISIONS = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}

__all__ = ["EngineBuildError", "build_engines", "PRECISIONS", "DEFAULT_RTX_TARGETS"]


@dataclass(frozen=True)
class _Graph:
    name: str
    path: Path
    inputs: dict[str, list[int | str]]  # ONNX graph inputs (initializers excluded) -> dims
    precision: str | None
    external_files: tuple[str, ...]
    custom_nodes: tuple[str, ...]  # names of the videoxl-domain nodes (each a plugin when plugins are used)
    weights: WeightFormat | None = None  # from its DequantizeLinear weights; None: a graph without linears
    part: RangeGraph | None = None  # a layer range of graph `name` (ranges.py); None: the whole graph

    @property
    def engine_file(self) -> str:
        return self.part.layers.file(self.name, "engine") if self.part else f"{self.name}.engine"

    @property
    def label(self) -> str:
        return f"{self.name} {self.part.layers}" if self.part else self.name


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    precision: str | None = None,
    max_frames: int | None = None,
    chunk_groups: int | None = None,
    window_chunks: int | None = None,
    timing_cache: str | Path | None = None,
    targets: tuple[str, ...] | list[str] | None = None,
    flavour: str | None = None,
    use_plugins: bool = True,
    memory_budget_bytes: int | None = None,
    gpu_memory_budget_bytes: int | None = None,
    unified_memory: bool = False,
    progress: bool = False,
    stream_weights: bool | None = None,
    max_engine_weights: int | None = DEFAULT_MAX_ENGINE_WEIGHTS,
    layers_per_engine: int | None = None,
    decode_on_prefill: bool = False,
) -> Path:
    """Build one engine per graph of the contract from ``onnx_dir`` into ``out_dir``, with their manifest.

    ``precision`` (fp16, bf16, fp32) defaults to the export's: the networks are strongly typed,
    so a given one must match it. ``max_frames``, ``chunk_groups`` and ``window_chunks`` default to the model config's
    inference defaults. ``targets`` are compute capabilities like ``"sm_89"`` (TensorRT for RTX;
    default sm_89); standard TensorRT builds for the GPU present. ``memory_budget_bytes`` bounds
    the KV cache alone of the largest profile (``kv_cache_bytes``); ``gpu_memory_budget_bytes``
    bounds everything one request at the profile maxima holds on the GPU, as the memory planner
    counts it (``plan_for_build``: weights, activations, KV regions; ``unified_memory``: host and
    device share that budget, as on Jetson, so a pinned dense tier saves nothing). ``stream_weights`` builds
    weight-streaming engines, serialised straight to their files (default: for graphs of 2 GiB of
    weights or more, the 8B LLM); their manifest entry's ``weights`` says what the loader sets.
    ``max_engine_weights`` (bytes; None: no limit) cuts an LLM graph with more weights into layer
    ranges, one engine each; ``layers_per_engine`` cuts every LLM graph into ranges of that many
    layers. ``decode_on_prefill`` builds no decode engine: the runtime decodes on the prefill_chunk
    engine, built with the wider profile that needs (module docstring). Returns ``out_dir``.
    """
    started = time.perf_counter()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if precision is not None and precision not in PRECISIONS:
        raise EngineBuildError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    trt = import_tensorrt(flavour)
    cfg = _load_config(onnx_dir)
    limits = BuildLimits(
        max_frames=max_frames if max_frames is not None else cfg.max_frames,
        chunk_groups=chunk_groups if chunk_groups is not None else cfg.chunk_groups,
        window_chunks=window_chunks if window_chunks is not None else cfg.window_chunks,
    )
    graphs = [_read_graph(onnx_dir, name, cfg) for name in GRAPHS if not (decode_on_prefill and name == "decode")]
    if precision is None:
        precision = _export_precision(graphs, onnx_dir)
    _check_precision(graphs, precision, onnx_dir)
    weights = _export_weights(graphs, onnx_dir)
    targets = _resolve_targets(trt, targets)
    _check_precision_targets(precision, targets)
    kv_bytes = kv_cache_bytes(cfg, limits, precision)
    _check_memory_budget(cfg, limits, precision, kv_bytes, memory_budget_bytes)
    gpu_plan = _check_gpu_memory(
        cfg, limits, precision=precision, weights=weights, use_plugins=use_plugins,
        decode_on_prefill=decode_on_prefill, budget_bytes=gpu_memory_budget_bytes, unified_memory=unified_memory,
    )
    vision_pad = _vision_pad_embedding(onnx_dir, graphs)
    ranges = dimension_ranges(cfg, limits, decode_on_prefill=decode_on_prefill)
    profiles = {g.name: input_profile(g.name, g.inputs, ranges[g.name]) for g in graphs}
    shape_values = shape_input_values(cfg, limits, decode_on_prefill=decode_on_prefill)
    _prepare_plugins(trt, use_plugins)
    out_dir = _check_out_dir(out_dir, onnx_dir)
    # after every check: this writes the range graphs beside the export
    builds = _cut_into_ranges(graphs, cfg, max_engine_weights=max_engine_weights, layers_per_engine=layers_per_engine)

    logger = trt_logger(trt)
    if timing_cache is not None and is_rtx(trt):
        log.warning("%s makes timing-cache calls no-ops: ignoring --timing-cache %s", describe(trt), timing_cache)
        timing_cache = None
    cache_bytes = _read_timing_cache(timing_cache)
    try:
        with staged(out_dir) as staging:
            timing = None
            engines: dict[str, dict[str, Any]] = {}
            for name, parts in builds.items():
                entries = []
                for graph in parts:
                    profile = profiles[name] if graph.part is None else input_profile(name, graph.inputs, ranges[name])
                    entry, timing = _build_one(
                        trt, logger, graph, profile, staging,
                        shape_values=shape_values[name], targets=targets, use_plugins=use_plugins, precision=precision,
                        use_timing_cache=timing_cache is not None, cache_bytes=cache_bytes, timing=timing,
                        progress=progress,
                        stream_weights=(graph_weight_bytes(graph.path) >= STREAM_WEIGHTS_BYTES) if stream_weights is None else stream_weights,
                    )
                    entries.append(entry if graph.part is None else _range_entry(graph, entry))
                engines[name] = entries[0] if parts[0].part is None else _ranged_entry(entries)
            for name in (manifest_io.CONFIG_FILE, *manifest_io.COPIED_FILES):
                if (onnx_dir / name).is_file():
                    shutil.copy2(onnx_dir / name, staging / name)
            token, row = vision_pad
            np.save(staging / manifest_io.VISION_PAD_FILE, row, allow_pickle=False)
            vision_pad_entry = {"token": token, "file": manifest_io.VISION_PAD_FILE,
                                **manifest_io.file_fingerprint(staging / manifest_io.VISION_PAD_FILE)}
            manifest = _manifest(
                trt, cfg, onnx_dir, out_dir, graphs + [g for parts in builds.values() for g in parts if g.part], engines, targets=targets, precision=precision, weights=weights, limits=limits,
                ranges=ranges, use_plugins=use_plugins, kv_bytes=kv_bytes,
                layer_ranges={"max_engine_weights": max_engine_weights, "layers_per_engine": layers_per_engine},
                memory_budget_bytes=memory_budget_bytes, gpu_plan=gpu_plan, seconds=time.perf_counter() - started, decode_on_prefill=decode_on_prefill,
                vision_pad=vision_pad_entry,
            )
            manifest_io.write_manifest(staging, manifest)
            if timing_cache is not None and timing is not None:
                _write_timing_cache(Path(timing_cache), timing)
    except OutputDirError as err:
        raise EngineBuildError(str(err)) from err
    except OSError as err:
        if not is_filesystem_error(err):
            raise
        raise EngineBuildError(f"writing {out_dir} failed, nothing was changed: {describe_os_error(err)}") from err
    log.info("built %d engines into %s in %.1f s", sum(map(len, builds.values())), out_dir, time.perf_counter() - started)
    return out_dir


# --- checks before any TensorRT work --------------------------------------------------------------
def _load_config(onnx_dir: Path) -> VideoXLConfig:
    path = onnx_dir / manifest_io.CONFIG_FILE
    if not onnx_dir.is_dir():
        raise EngineBuildError(f"{onnx_dir}: no such directory (expected the output of `videoxl export`)")
    if not path.is_file():
        raise EngineBuildError(f"{onnx_dir}: no {manifest_io.CONFIG_FILE} (expected the output of `videoxl export`)")
    try:
        return VideoXLConfig.load(path)
    except (ConfigError, ValueError, TypeError) as err:
        raise EngineBuildError(f"{path}: not a videoxl model config ({err})") from err


def _read_graph(onnx_dir: Path, name: str, cfg: VideoXLConfig) -> _Graph:
    path = onnx_dir / GRAPH_FILES[name]
    if not path.is_file():
        present = sorted(p.name for p in onnx_dir.glob("*.onnx"))
        raise EngineBuildError(
            f"{onnx_dir}: {path.name} is missing (found: {', '.join(present) or 'no .onnx files'}); "
            f"the engine directory needs {', '.join(GRAPH_FILES.values())}"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises its own DecodeError, or anything for a truncated file
        raise EngineBuildError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    inputs, external, custom = _model_io(model)
    _check_contract_io(path, graph_contract.GRAPHS[name], cfg, inputs, [o.name for o in model.graph.output])
    return _Graph(name, path, inputs, _graph_precision(model), external, custom, _graph_weights(model))


def _model_io(model: onnx.ModelProto) -> tuple[dict[str, list], tuple[str, ...], tuple[str, ...]]:
    """A model's graph inputs (name -> dims, initializers excluded), external data files and custom nodes."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = {
        vi.name: [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in model.graph.input
        if vi.name not in initializers
    }
    external = sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    custom = tuple(node.name or node.op_type for node in model.graph.node if node.domain == DOMAIN)
    return inputs, tuple(external), custom


def _cut_into_ranges(
    graphs: list[_Graph], cfg: VideoXLConfig, *, max_engine_weights: int | None, layers_per_engine: int | None
) -> dict[str, list[_Graph]]:
    """{graph: what to build}: the graph itself, or its layer ranges (written beside it, ranges.py)."""
    builds: dict[str, list[_Graph]] = {}
    for graph in graphs:
        weight_bytes = graph_weight_bytes(graph.path)
        cut = graph.name in RANGED_GRAPHS and (
            layers_per_engine is not None or (max_engine_weights is not None and weight_bytes > max_engine_weights)
        )
        if not cut:
            builds[graph.name] = [graph]
            continue
        model = onnx.load(str(graph.path), load_external_data=False)
        parts = split_layers(
            model, graph_contract.GRAPHS[graph.name], cfg,
            max_weight_bytes=max_engine_weights, layers_per_engine=layers_per_engine,
        )
        del model
        try:
            paths = [write_range(part, graph.path.parent) for part in parts]
        except OSError as err:
            raise EngineBuildError(
                f"{graph.path.parent}: cannot write the layer-range graphs beside the export ({describe_os_error(err)}); "
                "they must sit next to its external data: make the directory writable"
            ) from err
        builds[graph.name] = [_range_graph(graph, part, path) for part, path in zip(parts, paths)]
        log.info(
            "%s: %s of weights, built as %d layer ranges: %s", graph.name, format_bytes(weight_bytes), len(parts),
            ", ".join(f"{p.layers} ({format_bytes(p.weight_bytes)})" for p in parts),
        )
    return builds


def _range_graph(graph: _Graph, part: RangeGraph, path: Path) -> _Graph:
    inputs, external, custom = _model_io(part.model)
    return dataclasses.replace(graph, path=path, inputs=inputs, external_files=external, custom_nodes=custom, part=part)


def _graph_weights(model: onnx.ModelProto) -> WeightFormat | None:
    """The weight format a graph's linears are stored in, read from the graph itself.

    Weight-only quantized linears are DequantizeLinear(int4|int8 initializer, scale) -> MatMul
    (``videoxl.weight_format``): any int4 weight makes the graph int4 (its lm_head is int8), int8
    weights alone make it int8; a graph with float MatMul weights only is fp; none at all, None.
    """
    elem = {t.name: t.data_type for t in model.graph.initializer}
    int4_blocks = {
        next((a.i for a in node.attribute if a.name == "block_size"), 0)
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and elem.get(node.input[0]) == onnx.TensorProto.INT4
    }
    if int4_blocks:
        if len(int4_blocks) > 1:
            raise EngineBuildError(f"{model.graph.name}: int4 weights with several block sizes {sorted(int4_blocks)}; re-export")
        return WeightFormat("int4", int4_blocks.pop())
    if any(node.op_type == "DequantizeLinear" and elem.get(node.input[0]) == onnx.TensorProto.INT8 for node in model.graph.node):
        return WeightFormat("int8")
    if any(node.op_type == "MatMul" and node.input[1] in elem for node in model.graph.node):
        return WeightFormat()
    return None


def _export_weights(graphs: list[_Graph], onnx_dir: Path) -> WeightFormat:
    """The one weight format of the export's graphs (what the engines will hold), checked against its manifest."""
    found = {g.weights for g in graphs if g.weights is not None} or {WeightFormat()}  # no linears at all: nothing quantized
    if len(found) != 1:
        listing = ", ".join(f"{g.path.name}: {g.weights}" for g in graphs if g.weights is not None)
        raise EngineBuildError(f"{onnx_dir}: graphs with different weight formats ({listing}); re-export with `videoxl export --weights ...`")
    weights = found.pop()
    export_manifest = onnx_dir / "export_manifest.json"
    if export_manifest.is_file():
        try:
            recorded = WeightFormat.from_manifest(json.loads(export_manifest.read_text()).get("weights"))
        except (ValueError, KeyError, TypeError) as err:
            raise EngineBuildError(f"{export_manifest}: unreadable weights entry ({err})") from err
        if recorded != weights:
            raise EngineBuildError(f"{onnx_dir}: the graphs hold {weights} weights but export_manifest.json says {recorded}; re-export")
    return weights


def _check_contract_io(
    path: Path, contract: graph_contract.GraphContract, cfg: VideoXLConfig, inputs: dict, outputs: list[str]
) -> None:
    """The graph's inputs and outputs are the contract's: the runtime binds engines by these names."""
    layers = cfg.num_hidden_layers
    problems = []
    for kind, found, expected in (("inputs", list(inputs), contract.input_names(layers)), ("outputs", outputs, contract.output_names(layers))):
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            problems.append(f"{kind} missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    if problems:
        raise EngineBuildError(
            f"{path}: not a graph of contract v{graph_contract.CONTRACT_VERSION} ({'; '.join(problems)}); "
            "re-export it with this videoxl (`videoxl export`)"
        )


def _graph_precision(model: onnx.ModelProto) -> str | None:
    """The float dtype the exporter wrote: fp16/bf16 if any weight or input has it, else fp32."""
    types = {t.data_type for t in model.graph.initializer}
    types |= {vi.type.tensor_type.elem_type for vi in model.graph.input}
    low = {_ONNX_PRECISIONS[t] for t in types if t in _ONNX_PRECISIONS}
    if len(low) > 1:
        return "+".join(sorted(low))
    if low:
        return low.pop()
    return "fp32" if onnx.TensorProto.FLOAT in types else None


def _export_precision(graphs: list[_Graph], onnx_dir: Path) -> str:
    """The one precision every graph was exported in (what a build without --fp16/--bf16/--fp32 uses)."""
    found = {g.precision for g in graphs if g.precision is not None}
    if len(found) != 1 or not found <= set(PRECISIONS):
        listing = ", ".join(f"{g.path.name}: {g.precision}" for g in graphs)
        raise EngineBuildError(f"{onnx_dir}: cannot tell the export's precision ({listing}); re-export with `videoxl export --dtype ...`")
    return found.pop()


def _check_precision(graphs: list[_Graph], precision: str, onnx_dir: Path) -> None:
    found = {g.path.name: g.precision for g in graphs if g.precision is not None}
    wrong = {name: p for name, p in found.items() if p != precision}
    if wrong:
        listing = ", ".join(f"{name}: {p}" for name, p in found.items())
        exported = sorted(set(found.values()))
        hint = f"build with --{exported[0]}" if len(exported) == 1 and exported[0] in PRECISIONS else "re-export"
        raise EngineBuildError(
            f"{onnx_dir} holds an export in {'/'.join(exported)} ({listing}) but --{precision} was asked for; "
            f"the engines are strongly typed, so the precision comes from the export: {hint}, or export "
            f"again with `videoxl export --dtype {precision}`"
        )


def _resolve_targets(trt: ModuleType, targets) -> tuple[str, ...]:
    if is_rtx(trt):
        chosen = tuple(normalize_target(t) for t in (targets or DEFAULT_RTX_TARGETS))
        for target in chosen:
            try:
                rtx_compute_capability(trt, target)
            except ValueError as err:
                raise EngineBuildError(str(err)) from err
        return tuple(dict.fromkeys(chosen))
    gpu = gpu_compute_capability()
    if gpu is None:
        raise EngineBuildError(
            f"{describe(trt)} builds for the GPU it runs on and this machine has none; build on the target "
            "GPU, or use TensorRT for RTX (--flavour tensorrt_rtx --target sm_89), which builds without one"
        )
    asked = {normalize_target(t) for t in targets or ()}
    if asked - {gpu}:
        raise EngineBuildError(
            f"{describe(trt)} builds only for the GPU present ({gpu}); --target {' '.join(sorted(asked))} "
            "needs a build on such a GPU (or TensorRT for RTX)"
        )
    return (gpu,)


def _check_precision_targets(precision: str, targets: tuple[str, ...]) -> None:
    if precision != "bf16":
        return
    old = [t for t in targets if target_version(t) < BF16_MIN_TARGET]
    if old:
        raise EngineBuildError(
            f"bf16 needs compute capability {BF16_MIN_TARGET[0]}.{BF16_MIN_TARGET[1]} or newer; "
            f"{', '.join(old)} cannot run bf16 engines: build an fp16 export for {', '.join(old)} "
            "or drop that --target"
        )


def _check_memory_budget(
    cfg: VideoXLConfig, limits: BuildLimits, precision: str, kv_bytes: int, budget: int | None
) -> None:
    if budget is None or kv_bytes <= budget:
        return
    t = TokenBudget.of(cfg, limits)
    fitting_frames = max_frames_for_budget(cfg, limits, precision, budget)
    raise EngineBuildError(
        f"the largest profile ({limits.max_frames} frames) needs {format_bytes(kv_bytes)} of KV cache: a video "
        f"region of {t.sparse_tokens + t.context_tokens} rows (sparse + dense tier) and a decode region of "
        f"{t.total_tokens} rows, at {cfg.num_hidden_layers} layers x 2 x {cfg.num_key_value_heads} KV heads x "
        f"{cfg.head_dim} x {PRECISION_BYTES[precision]} bytes per row; that is more than the memory budget of "
        f"{format_bytes(budget)} (--memory-budget counts the KV cache only): use --max-frames {fitting_frames} "
        "or less, or raise --memory-budget; --gpu-memory-budget checks weights and activations too"
    )


def plan_for_build(
    cfg: VideoXLConfig, limits: BuildLimits, *, precision: str, weights: WeightFormat, use_plugins: bool,
    decode_on_prefill: bool, budget_bytes: int, unified_memory: bool = False,
) -> MemoryPlan:
    """The memory planner's plan (runtime/memory_plan.py) of one request at these engines' profile maxima.

    The planner's inputs are the build's: KV and float weights in the engines' precision, the
    export's weight format, the engines that will exist (no decode engine with
    ``decode_on_prefill``), plugins or inlined bodies, the token limits the profiles are sized for,
    and the dense tier where the runtime's ``auto`` puts it.
    """
    return plan_memory(
        cfg, frames=limits.max_frames, budget_bytes=budget_bytes,
        chunk_groups=limits.chunk_groups, window_chunks=limits.window_chunks,
        dtype_bytes=PRECISION_BYTES[precision], weights=weights,
        timestamp_tokens_per_group=limits.timestamp_tokens, prefix_tokens=limits.prefix_tokens,
        suffix_tokens=limits.suffix_tokens, max_new_tokens=limits.answer_tokens,
        vision_batch_frames=limits.vision_batch_frames, dense_tier="auto",
        plugins=use_plugins, decode_on_prefill=decode_on_prefill, unified_memory=unified_memory,
    )


def _check_gpu_memory(
    cfg: VideoXLConfig, limits: BuildLimits, *, precision: str, weights: WeightFormat, use_plugins: bool,
    decode_on_prefill: bool, budget_bytes: int | None, unified_memory: bool = False,
) -> MemoryPlan | None:
    """The plan of ``plan_for_build`` when it fits ``budget_bytes`` (None: no budget given); else refuse."""
    if budget_bytes is None:
        return None
    plan = plan_for_build(
        cfg, limits, precision=precision, weights=weights, use_plugins=use_plugins,
        decode_on_prefill=decode_on_prefill, budget_bytes=budget_bytes, unified_memory=unified_memory,
    )
    if plan.fits:
        if plan.inputs.dense_tier == "host":
            log.info("at %d frames the dense KV tier fits only in pinned host memory: run with --dense-tier auto or "
                     "host and --prefill-rule streaming", limits.max_frames)
        return plan
    parts = ", ".join(f"{item.name} {format_bytes(item.nbytes)}" for item in plan.items if item.where == "device")
    # the profile maxima, not `videoxl plan`'s typical request: the longest question and timestamps the engines take
    head = (f"the engines need {format_bytes(plan.device_bytes)} of GPU memory for one request at their profile maxima "
            f"({limits.max_frames} frames, a {limits.suffix_tokens}-token question; {parts}), more than "
            f"--gpu-memory-budget {format_bytes(budget_bytes)}")
    fewer_copies = "" if decode_on_prefill else ", build with --decode-on-prefill (one LLM weight copy fewer)"
    weights_bytes = plan.item("weights").nbytes
    if weights_bytes >= budget_bytes:
        copies = "each LLM engine its own copy" + (", no decode engine" if decode_on_prefill else "")
        raise EngineBuildError(f"{head}: the weights alone ({copies}) need {format_bytes(weights_bytes)}, no frame "
                               f"count fits; raise --gpu-memory-budget{fewer_copies} or export smaller weights "
                               "(`videoxl export --weights int4`)")
    tier, frames = max(plan.frames_fit, key=lambda fit: fit[1])  # auto: whichever dense tier fits more
    if frames == 0:
        raise EngineBuildError(f"{head}: not even {cfg.frames_per_group} frames fit; raise --gpu-memory-budget{fewer_copies}")
    where = "on the device" if tier == "device" else "in pinned host memory, --prefill-rule streaming at run time"
    raise EngineBuildError(f"{head}: use --max-frames {frames} or less (the most that fits, dense KV tier {where}), "
                           f"raise --gpu-memory-budget{fewer_copies}")


def _vision_pad_embedding(onnx_dir: Path, graphs: list[_Graph]) -> tuple[int, np.ndarray]:
    """(<|vision_pad|>'s id, its embedding row) from the export: what a question or decode step on the prefill engine splices in."""
    path = onnx_dir / "export_manifest.json"
    try:
        token = int(json.loads(path.read_text())["special_tokens"]["vision_pad"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EngineBuildError(
            f"{path}: no special_tokens.vision_pad ({type(err).__name__}: {err}), which a question run on prefill_chunk "
            "needs; re-export the directory with `videoxl export`"
        ) from err
    prefill = next(g for g in graphs if g.name == "prefill_chunk")
    try:
        return token, embedding_row(prefill.path, token)
    except (OSError, ValueError) as err:
        raise EngineBuildError(f"a question run on prefill_chunk needs the embedding of <|vision_pad|>: {err}") from err


def _prepare_plugins(trt: ModuleType, use_plugins: bool) -> None:
    from videoxl.plugins.trt_plugins import register_plugins, unregister_plugins

    if not use_plugins:
        unregister_plugins(trt)  # so that every custom node inlines its function body
        return
    if is_rtx(trt) and not install_fix_applied():
        raise EngineBuildError(
            "TensorRT for RTX lacks libtensorrt_rtx.so, which its ONNX parser loads for plugin nodes "
            "(the process would abort): run `python -m videoxl.engines.trt_install` once, or build with --no-plugins"
        )
    register_plugins(trt)


def _previous_build_problem(out_dir: Path) -> str | None:
    if not (out_dir / manifest_io.MANIFEST_FILE).is_file():
        return f"has no {manifest_io.MANIFEST_FILE} (not written by `videoxl build`)"
    return None


def _check_out_dir(out_dir: Path, onnx_dir: Path) -> Path:
    """The resolved --out, refused when replacing it could lose files (see videoxl.outdir)."""
    try:
        return check_out_dir(out_dir, is_previous=_previous_build_problem, protected=[("--onnx", onnx_dir)])
    except OutputDirError as err:
        raise EngineBuildError(str(err)) from err


# --- one engine ------------------------------------------------------------------------------------
def _build_one(
    trt: ModuleType,
    logger,
    graph: _Graph,
    shapes: dict[str, tuple[tuple[int, ...], ...]],
    staging: Path,
    *,
    shape_values: dict[str, ShapeValues],
    targets: tuple[str, ...],
    use_plugins: bool,
    precision: str,
    use_timing_cache: bool,
    cache_bytes: bytes | None,
    timing,
    progress: bool,
    stream_weights: bool = False,
):
    started = time.perf_counter()
    logger.errors.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if use_plugins:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    weight_maps = _load_external_weights(parser, graph) if graph.external_files else []
    parsed = parser.parse_model_proto() if weight_maps else parser.parse_from_file(str(graph.path))
    if not parsed:
        errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)] or list(logger.errors)
        raise EngineBuildError(
            f"{graph.path}: the {describe(trt)} ONNX parser failed with {len(errors)} error(s):\n  - " + "\n  - ".join(errors)
        )
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugin_layers = [layer.name for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]
    if use_plugins and len(plugin_layers) < len(graph.custom_nodes):
        # The parser inlines a custom node's function body when no creator matches the node's
        # (op_type, plugin_version attribute or "1"): the engine would silently run without our plugins.
        raise EngineBuildError(
            f"{graph.path.name}: {len(graph.custom_nodes) - len(plugin_layers)} of its {len(graph.custom_nodes)} "
            f"{DOMAIN} nodes were not mapped to the videoxl v{PLUGIN_VERSION} plugins (the ONNX parser looks a plugin "
            f"up by the node's plugin_version attribute, \"1\" when absent); re-export with an exporter that writes "
            f"plugin_version=\"{PLUGIN_VERSION}\" on {DOMAIN} nodes, or build with --no-plugins"
        )
    # TensorRT's fused attention: one ATTENTION_INPUT/ATTENTION_OUTPUT pair per ONNX Attention node it took
    attention_type = getattr(trt.LayerType, "ATTENTION_OUTPUT", None)
    attention_layers = [layer for layer in layers if attention_type is not None and layer.type == attention_type]
    if precision == "fp32":
        # TensorRT has no fused fp32 attention kernel and refuses the build unless the attention may be
        # decomposed into plain layers; fp32 engines are the parity baseline, where that costs nothing.
        for layer in attention_layers:
            layer.__class__ = trt.IAttentionOutputLayer  # the bindings' downcast
            layer.attention.decomposable = True

    config = builder.create_builder_config()
    if is_rtx(trt):
        config.num_compute_capabilities = len(targets)
        for index, target in enumerate(targets):
            if not config.set_compute_capability(rtx_compute_capability(trt, target), index):
                raise EngineBuildError(f"{describe(trt)} refused compute capability {target}")
    if not _strongly_typed_available(trt):
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 engines are the parity baseline: no TF32 matmuls
    if stream_weights:
        # Weight streaming: the engine keeps its weights in host memory and the loader chooses how
        # many bytes stay resident on the device (the rest is streamed per layer). STRIP_PLAN and
        # REFIT would keep them out of the plan, but TensorRT for RTX 1.7 cannot build a refittable
        # engine without a GPU (its JIT fails with a CUDA error), so they are not used here.
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    monitor = _progress_monitor(trt, graph.label, progress)
    config.progress_monitor = monitor
    if use_timing_cache:
        if timing is None:  # one cache object shared by all the builds, saved at the end
            timing = config.create_timing_cache(cache_bytes or b"")
        if not config.set_timing_cache(timing, False):
            raise EngineBuildError(f"the timing cache does not match {describe(trt)} (written by another version?); delete it")

    profile = builder.create_optimization_profile()
    io: dict[str, dict[str, Any]] = {"inputs": {}, "outputs": {}}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in shapes:
            raise EngineBuildError(f"{graph.path.name}: network input {tensor.name!r} is not an input of the ONNX graph")
        low, opt, high = shapes[tensor.name]
        profile.set_shape(tensor.name, low, opt, high)
        io["inputs"][tensor.name] = {
            "dtype": tensor.dtype.name, "dims": graph.inputs[tensor.name], "min": list(low), "opt": list(opt), "max": list(high),
        }
        if tensor.is_shape_tensor:  # e.g. past_len of a plugin-free prefill: its body builds Range(0, past_len * ..)
            if tensor.name not in shape_values:
                known = ", ".join(sorted(shape_values)) or "none"
                raise EngineBuildError(
                    f"{graph.path.name}: TensorRT uses input {tensor.name!r} as a shape tensor and the builder has no "
                    f"value range for it (value ranges known for this graph: {known}); add one in "
                    "videoxl.engines.profiles.shape_input_values"
                )
            profile.set_shape_input(tensor.name, *shape_values[tensor.name])
            io["inputs"][tensor.name]["shape_input"] = [list(v) for v in shape_values[tensor.name]]
    config.add_optimization_profile(profile)
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        io["outputs"][tensor.name] = {"dtype": tensor.dtype.name, "shape": list(tensor.shape)}

    path = staging / graph.engine_file
    if stream_weights:
        # Written to the file as TensorRT serialises it: a 15 GB plan never sits in one host buffer.
        with open(path, "wb") as f:
            built = builder.build_serialized_network_to_stream(network, config, _FileWriter(trt, f))
        serialized = None
    else:
        serialized = builder.build_serialized_network(network, config)
        built = serialized is not None
    weight_maps.clear()  # the parser (and its network) no longer needs the mapped weights
    if not built:
        errors = list(logger.errors) or ["(TensorRT reported no error text; rerun with VIDEOXL_LOG_LEVEL=debug)"]
        raise EngineBuildError(
            f"{graph.path.name}: {describe(trt)} could not build the engine for {', '.join(targets)}:\n  - "
            + "\n  - ".join(errors)
        )
    if serialized is not None:
        locations, located_by = _input_locations(trt, logger, serialized, network)
        with open(path, "wb") as f:
            f.write(memoryview(serialized))
        del serialized
    else:  # reading a 15 GB plan back only to ask it would double the build's memory: ask the network
        tensors = [network.get_input(i) for i in range(network.num_inputs)]
        locations, located_by = {t.name: "host" if t.is_shape_tensor else "device" for t in tensors}, "network"
    for name, location in locations.items():
        io["inputs"][name]["location"] = location
    seconds = time.perf_counter() - started
    log.info("built %s (%s) in %.1f s", path.name, format_bytes(path.stat().st_size), seconds)
    entry = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": manifest_io.file_sha256(path),
        "build_seconds": round(seconds, 2),
        "plugin_layers": plugin_layers,
        "needs_plugins": bool(plugin_layers),
        "native_attention_layers": len(attention_layers),
        "host_inputs": sorted(n for n, where in locations.items() if where == "host"),
        "weights": _weights_entry(graph, stream_weights),
        "locations_from": located_by,
        **io,
    }
    return entry, timing


def _range_entry(graph: _Graph, entry: dict[str, Any]) -> dict[str, Any]:
    """One range's manifest entry: the engine's, plus where it sits in the chain."""
    part = graph.part
    return {
        "layers": [part.layers.start, part.layers.stop],
        "onnx": graph.path.name,
        "weight_bytes": part.weight_bytes,
        "boundary_in": list(part.boundary_in),
        "boundary_out": list(part.boundary_out),
        **entry,
    }


def _ranged_entry(ranges: list[dict[str, Any]]) -> dict[str, Any]:
    """A graph built in layer ranges: the ranges in order, and the graph's own I/O over all of them."""
    crossing = {name for r in ranges for name in r["boundary_in"]}

    def merged(kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in ranges:
            out |= {name: spec for name, spec in r[kind].items() if name not in crossing and name not in out}
        return out

    return {
        "loader": (
            "run the ranges in layer order on one stream; a range's boundary_out tensors are the next range's "
            "boundary_in (one device buffer each, at the profile maximum); the ranges share one activations scratch"
        ),
        "ranges": ranges,
        "bytes": sum(r["bytes"] for r in ranges),
        "sha256": hashlib.sha256("".join(r["sha256"] for r in ranges).encode()).hexdigest(),  # of the chain
        "build_seconds": round(sum(r["build_seconds"] for r in ranges), 2),
        "plugin_layers": [name for r in ranges for name in r["plugin_layers"]],
        "needs_plugins": any(r["needs_plugins"] for r in ranges),
        "native_attention_layers": sum(r["native_attention_layers"] for r in ranges),
        "host_inputs": sorted({n for r in ranges for n in r["host_inputs"]} - crossing),
        "locations_from": ranges[0]["locations_from"],
        "inputs": merged("inputs"),
        "outputs": merged("outputs"),
    }


def _load_external_weights(parser, graph: _Graph) -> list:
    """Hand the parser every external initializer as a pointer into a read-only memory map of its
    .data file; returns the views, which must outlive the build.

    ``parse_from_file`` would copy an 8B model's 15 GB of weights into the parser's own heap: mapped,
    they are clean file pages the kernel can drop and re-read under memory pressure, so the build
    fits a machine with less RAM than the weights.
    """
    import numpy as np

    model = onnx.load(str(graph.path), load_external_data=False)
    if not parser.load_model_proto(model.SerializeToString(), str(graph.path)):
        raise EngineBuildError(f"{graph.path}: the ONNX parser refused the model proto ({parser.get_error(0).desc()})")
    del model.graph.node[:]  # only the initializers' names and locations are needed below
    spans: dict[str, list[tuple[str, int, int | None]]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        length = int(info["length"]) if "length" in info else None
        spans.setdefault(info["location"], []).append((tensor.name, int(info.get("offset", 0)), length))
    views = []
    for location, tensors in spans.items():
        path = graph.path.parent / location
        # only the byte span this graph reads is mapped: a layer range of the 8B model maps its ~3.6 GB,
        # not the whole 15 GB file (mapped bytes count against an address-space limit like any other)
        first = min(offset for _, offset, _ in tensors)
        end = max(offset + length if length is not None else path.stat().st_size for _, offset, length in tensors)
        mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=first, shape=(end - first,))
        for name, offset, length in tensors:
            length = end - offset if length is None else length
            view = mapped[offset - first : offset - first + length]
            if not parser.load_initializer(name, view.ctypes.data, length):
                raise EngineBuildError(f"{graph.path}: the ONNX parser refused initializer {name!r} ({length} bytes from {location})")
            views.append(view)
    return views


def _weights_entry(graph: _Graph, stream_weights: bool) -> dict[str, Any]:
    """What the loader must do about the engine's weights."""
    if not stream_weights:
        return {"streamable": False}
    return {
        "streamable": True,
        # ICudaEngine.weight_streaming_budget_v2 = the device bytes the weights may keep resident
        # (streamable_weights_size = all of them), set before the first execution context
        "loader": "set weight_streaming_budget_v2 before creating an execution context",
    }


class _FileWriter:
    """IStreamWriter over an open file (the bindings' base class is looked up at call time)."""

    def __new__(cls, trt: ModuleType, file):
        class Writer(trt.IStreamWriter):
            def __init__(self) -> None:
                trt.IStreamWriter.__init__(self)

            def write(self, data) -> int:
                return file.write(memoryview(data))

        return Writer()


def graph_weight_bytes(graph_path: Path) -> int:
    """Bytes of a graph's initializers (external data included) from its proto, without reading the data."""
    model = onnx.load(str(graph_path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        else:
            total += len(tensor.raw_data)
    return total


def _input_locations(trt: ModuleType, logger, serialized, network) -> tuple[dict[str, str], str]:
    """``{input: "host" | "device"}`` and where the answer came from ("engine" or "network").

    A shape-inference input (``is_shape_inference_io``) must be given in host memory. The built
    engine answers when this process can deserialize it; TensorRT for RTX deserializes only on a
    GPU it supports, so a build without one asks the network, whose shape tensors are exactly the
    inputs the engine will read on the host.
    """
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is not None:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        return {n: "host" if engine.is_shape_inference_io(n) else "device" for n in inputs}, "engine"
    logger.errors.clear()  # the failed deserialization is expected here, not a build error
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    return {t.name: "host" if t.is_shape_tensor else "device" for t in tensors}, "network"


def _network_flags(trt: ModuleType) -> int:
    if _strongly_typed_available(trt):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _strongly_typed_available(trt: ModuleType) -> bool:
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def _parser_error_text(error) -> str:
    where = f"node {error.node()}" if error.node() >= 0 else "graph"
    if error.node_name() or error.node_operator():
        where += f" ({error.node_operator()} {error.node_name()!r})".replace(" ''", "")
    return f"{where}: {error.code().name}: {error.desc()}"


# --- TensorRT callbacks ----------------------------------------------------------------------------
def _progress_monitor(trt: ModuleType, label: str, show_bars: bool):
    """tqdm bars per builder phase when asked (a terminal), else log lines per top-level phase."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._started: dict[str, float] = {}
            self._depth: dict[str, int] = {}
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name], self._started[phase_name] = depth, time.perf_counter()
                if show_bars:
                    from tqdm import tqdm

                    self._bars[phase_name] = tqdm(
                        total=num_steps, desc=f"{label}: {phase_name}", position=depth, leave=False, file=sys.stderr
                    )
                elif depth == 0:
                    log.info("%s: %s (%d steps)", label, phase_name, num_steps)

        def step_complete(self, phase_name, step) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # never cancel

        def phase_finish(self, phase_name) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()
                seconds = time.perf_counter() - self._started.pop(phase_name, time.perf_counter())
                if self._depth.pop(phase_name, 1) == 0:
                    log.info("%s: %s done in %.1f s", label, phase_name, seconds)

    return _Monitor()


# --- files ----------------------------------------------------------------------------------------
def _read_timing_cache(path: str | Path | None) -> bytes | None:
    if path is None or not Path(path).is_file():
        return None
    data = Path(path).read_bytes()
    log.info("loaded timing cache %s (%s)", path, format_bytes(len(data)))
    return data


def _write_timing_cache(path: Path, timing) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    with open(partial, "wb") as f:
        f.write(memoryview(timing.serialize()))
    os.replace(partial, path)
    log.info("saved timing cache %s", path)


# --- the manifest ---------------------------------------------------------------------------------
def _manifest(
    trt: ModuleType,
    cfg: VideoXLConfig,
    onnx_dir: Path,
    out_dir: Path,
    graphs: list[_Graph],
    engines: dict[str, dict[str, Any]],
    *,
    targets: tuple[str, ...],
    precision: str,
    weights: WeightFormat,
    limits: BuildLimits,
    ranges: dict,
    use_plugins: bool,
    kv_bytes: int,
    memory_budget_bytes: int | None,
    seconds: float,
    gpu_plan: MemoryPlan | None = None,
    layer_ranges: dict[str, int | None],
    decode_on_prefill: bool = False,
    vision_pad: dict[str, Any] | None = None,
) -> dict[str, Any]:
    onnx_files: dict[str, dict[str, Any]] = {}
    for graph in graphs:
        onnx_files[graph.path.name] = manifest_io.file_fingerprint(graph.path)
        for name in graph.external_files:
            onnx_files[name] = manifest_io.file_fingerprint(onnx_dir / name)
    tokens = TokenBudget.of(cfg, limits)
    manifest: dict[str, Any] = {
        "format": manifest_io.MANIFEST_FORMAT,
        "videoxl_version": videoxl.__version__,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 2),
        "tensorrt": {"flavour": flavour_of(trt), "version": trt.__version__},
        "compute_capabilities": list(targets),
        "precision": precision,
        # weight-only int8/int4 linears (DequantizeLinear -> MatMul, TensorRT's weight-only GEMMs); activations in `precision`
        "weights": weights.manifest_entry(),
        "limits": limits.to_dict(),
        "tokens": {
            "per_group": tokens.group_tokens,
            "chunk": tokens.chunk_tokens,
            "context": tokens.context_tokens,
            "sparse": tokens.sparse_tokens,
            "scoring": tokens.scoring_tokens,
            "total": tokens.total_tokens,
            "visible_past": tokens.visible_past_tokens,
        },
        "dimensions": {g: {d: [r.min, r.opt, r.max] for d, r in dims.items()} for g, dims in ranges.items()},
        # budget_bytes: --memory-budget (KV only); gpu_plan: --gpu-memory-budget and the planner's device total
        # for one request at the profile maxima, and where the dense tier fits (None: no such budget given)
        "memory": {
            "kv_cache_bytes_max_profile": kv_bytes,
            "budget_bytes": memory_budget_bytes,
            "gpu_plan": None if gpu_plan is None else {
                "budget_bytes": gpu_plan.budget_bytes,
                "device_bytes": gpu_plan.device_bytes,
                "dense_tier": gpu_plan.inputs.dense_tier,
                "unified_memory": gpu_plan.inputs.unified_memory,
            },
        },
        "model": {"config_hash": cfg.model_hash(), "onnx_dir": str(onnx_dir.resolve())},
        "onnx": onnx_files,
        "graph_contract": {"version": graph_contract.CONTRACT_VERSION, "graphs": list(graph_contract.GRAPHS)},
        "plugins": {
            "requested": use_plugins,
            # a plugin-free directory loads with stock TensorRT and no videoxl library (C++ products)
            "used": any(e["needs_plugins"] for e in engines.values()),
            "engines": sorted(name for name, e in engines.items() if e["needs_plugins"]),
            "namespace": PLUGIN_NAMESPACE,
            "version": PLUGIN_VERSION,
            "ops": [op.name for op in ALL_OPS],
            "kernels_library": manifest_io.kernels_library_info() if use_plugins else None,
        },
        "layer_ranges": layer_ranges,  # how the LLM graphs were cut (ranges.py); engines[graph]["ranges"] where they were
        "decode_on_prefill": decode_on_prefill,  # decode runs on the prefill_chunk engine (no decode engine)
        # <|vision_pad|>'s id and its embedding row's file: the visual row of that token in a question or decode step run as a chunk
        "vision_pad": vision_pad,
        "engines": engines,
    }
    if use_plugins and not manifest["plugins"]["used"]:
        log.warning("plugins were enabled but no graph has a %s custom op: the engines use none", DOMAIN)
    manifest["build_command"] = manifest_io.rebuild_command(manifest, out_dir.resolve())
    return manifest


def max_frames_for_budget(cfg: VideoXLConfig, limits: BuildLimits, precision: str, budget_bytes: int) -> int:
    """The largest frame count (multiple of 4, at most the limits') whose KV (kv_cache_bytes) fits ``budget_bytes``."""
    per_group = cfg.frames_per_group

    def fits(groups: int) -> bool:
        return kv_cache_bytes(cfg, dataclasses.replace(limits, max_frames=groups * per_group), precision) <= budget_bytes

    low, high = 0, math.ceil(limits.max_frames / per_group)  # in groups; the bytes grow with the group count
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low * per_group
