"""`videoxl check`: run each engine next to ONNX Runtime on the same inputs and compare (polygraphy).

    engine_dir/{graph}.engine --TrtRunner----\\
                                              Comparator, tolerances per precision -> pass/fail
    onnx_dir/{graph}.onnx -----OnnxrtRunner--/

Inputs: random feeds that respect each graph's semantics (index ranges, position ids, image
placeholders; see :func:`sample_feeds`), plus any recorded feeds ``{graph}*.npz`` found in
``inputs_dir`` (e.g. inputs captured from a tiny-model run). Engines need a GPU to run: without
one this fails at once with :class:`GPUUnavailableError`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from videoxl.config import VideoXLConfig
from videoxl.engines.errors import EngineMismatchError, GPUUnavailableError
from videoxl.engines.manifest import CONFIG_FILE, check_manifest, read_manifest
from videoxl.engines.profiles import GRAPH_FILES, GRAPHS
from videoxl.engines.trt_module import gpu_compute_capability, import_tensorrt, is_rtx

log = logging.getLogger(__name__)

# (rtol, atol) per precision. fp32 allows for TF32 matmuls, which TensorRT enables by default.
TOLERANCES = {"fp32": (5e-3, 5e-3), "fp16": (2e-2, 2e-2), "bf16": (5e-2, 1e-1)}
_DEFAULT_IMAGE_TOKEN = None  # prefill feeds use export_manifest.json's special_tokens.vision_pad


@dataclass(frozen=True)
class GraphCheck:
    graph: str
    passed: bool
    feeds: int
    detail: str


def check_engines(
    engine_dir: str | Path,
    onnx_dir: str | Path,
    *,
    graphs: tuple[str, ...] | None = None,
    samples: int = 2,
    seed: int = 0,
    inputs_dir: str | Path | None = None,
) -> list[GraphCheck]:
    """Compare every engine of ``engine_dir`` with ONNX Runtime on ``onnx_dir``'s graphs."""
    engine_dir, onnx_dir = Path(engine_dir), Path(onnx_dir)
    manifest = read_manifest(engine_dir)
    gpu = gpu_compute_capability()
    if gpu is None:
        raise GPUUnavailableError(
            "`videoxl check` runs the engines and needs an NVIDIA GPU; none was found on this machine "
            "(building needs none: `videoxl build` works here)"
        )
    trt = import_tensorrt(manifest["tensorrt"]["flavour"])
    check_manifest(engine_dir, trt_module=trt, gpu_compute_capability=gpu, onnx_dir=onnx_dir)
    if manifest["plugins"]["used"]:
        from videoxl.plugins.trt_plugins import register_plugins

        register_plugins(trt)
    _select_polygraphy_backend(trt)
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    cfg = VideoXLConfig.load(engine_dir / CONFIG_FILE)
    rtol, atol = TOLERANCES[manifest["precision"]]
    image_token = _image_token(onnx_dir)
    rng = np.random.default_rng(seed)
    results = []
    for graph in graphs or [g for g in GRAPHS if g in manifest["engines"]]:  # built with --decode-on-prefill: no decode
        if graph not in manifest["engines"]:
            raise EngineMismatchError(f"{engine_dir}: no {graph} engine (built with --decode-on-prefill: decode runs on prefill_chunk)")
        entry = manifest["engines"][graph]
        # a graph built in layer ranges: each range engine against its range graph (beside the export)
        parts = entry.get("ranges") or [{**entry, "onnx": GRAPH_FILES[graph]}]
        for part in parts:
            label = graph if "layers" not in part else f"{graph} layers {part['layers'][0]}-{part['layers'][1] - 1}"
            feeds = [sample_feeds(graph, manifest, cfg, rng, image_token=image_token, entry=part) for _ in range(samples)]
            feeds += _recorded_feeds(inputs_dir, graph) if len(parts) == 1 else []
            engine = EngineFromBytes((engine_dir / part["file"]).read_bytes())
            session = SessionFromOnnx(str(onnx_dir / part["onnx"]), providers=_ort_providers())
            runs = Comparator.run(
                [TrtRunner(engine, name=f"trt:{label}"), OnnxrtRunner(session, name=f"onnxrt:{label}")], data_loader=feeds
            )
            accuracy = Comparator.compare_accuracy(runs, compare_func=CompareFunc.simple(rtol=rtol, atol=atol))
            passed = bool(accuracy)
            results.append(GraphCheck(label, passed, len(feeds), f"rtol={rtol} atol={atol}"))
            log.info("%s: %s on %d feeds", label, "PASS" if passed else "FAIL", len(feeds))
    return results


def _select_polygraphy_backend(trt: ModuleType) -> None:
    """polygraphy picks tensorrt or tensorrt_rtx when its TensorRT backend is first imported."""
    wanted = "1" if is_rtx(trt) else "0"
    if "polygraphy.backend.trt" in sys.modules and os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX", "0") != wanted:
        raise RuntimeError(
            "polygraphy's TensorRT backend was imported for the other TensorRT flavour in this process; "
            "run `videoxl check` in a fresh process"
        )
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = wanted
    if "polygraphy.config" in sys.modules:
        sys.modules["polygraphy.config"].USE_TENSORRT_RTX = wanted == "1"


def _ort_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _image_token(onnx_dir: Path) -> int | None:
    path = onnx_dir / "export_manifest.json"
    if not path.is_file():
        return _DEFAULT_IMAGE_TOKEN
    special = json.loads(path.read_text()).get("special_tokens", {})
    return special.get("vision_pad", _DEFAULT_IMAGE_TOKEN)


def _recorded_feeds(inputs_dir: str | Path | None, graph: str) -> list[dict[str, np.ndarray]]:
    if inputs_dir is None:
        return []
    feeds = []
    for path in sorted(Path(inputs_dir).glob(f"{graph}*.npz")):
        with np.load(path) as data:
            feeds.append({name: data[name] for name in data.files})
    return feeds


# --- random feeds with the graphs' semantics --------------------------------------------------------
def _pick(ranges: dict[str, list[int]], name: str, wish: int) -> int:
    low, _, high = ranges[name]
    return int(min(max(wish, low), high))


def _pick_value(inputs: dict[str, Any], name: str, wish: int, *, low: int = 0, high: int) -> int:
    """A value in [low, high], and inside the engine's value range when ``name`` is a shape input."""
    value = min(max(wish, low), high)
    shape_input = inputs.get(name, {}).get("shape_input")
    if shape_input is not None:
        (lowest,), _, (highest,) = shape_input
        value = min(max(value, lowest, low), highest, high)
    return int(value)


def sample_feeds(
    graph: str, manifest: dict[str, Any], cfg: VideoXLConfig, rng: np.random.Generator, *, image_token: int | None = None,
    entry: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """One feed for ``graph`` with sizes inside the engine's profile and valid indices/positions.

    ``entry``: the manifest entry of the engine to feed (default the graph's; a layer range's takes its
    boundary tensors too, fed as random hidden states / partial sums)."""
    ranges = manifest["dimensions"][graph]
    inputs = (entry or manifest["engines"][graph])["inputs"]
    float_dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}[manifest["precision"]]
    sizes: dict[str, int] = {}
    values: dict[str, np.ndarray] = {}

    def sorted_subset(population: int, count: int) -> np.ndarray:
        return np.sort(rng.choice(population, min(count, population), replace=False)).astype(np.int64)

    if graph == "vision":
        sizes["groups"] = _pick(ranges, "groups", 2)
    elif graph == "prefill_chunk":
        chunk = sizes["chunk_tokens"] = _pick(ranges, "chunk_tokens", 24)
        past = sizes["past_tokens"] = _pick(ranges, "past_tokens", 40)
        visual = sizes["visual_tokens"] = _pick(ranges, "visual_tokens", chunk // 2 if image_token is not None else 0)
        # the chunk starts at position past_len; the bound dense tier may hold more rows than are valid
        past_len = _pick_value(inputs, "past_len", past - 3, high=past)
        visible = sizes["visible_past"] = min(_pick(ranges, "visible_past", 12), past_len)
        ts_queries = sizes["timestamp_queries"] = min(_pick(ranges, "timestamp_queries", max(1, chunk // 6)), chunk)
        ids = rng.integers(0, cfg.vocab_size, size=chunk)
        if image_token is not None:
            ids[ids == image_token] = (image_token + 1) % cfg.vocab_size
            ids[chunk - visual:] = image_token  # the chunk's visual placeholders
        values.update(
            input_ids=ids.astype(np.int64),
            past_len=np.array([past_len], np.int64),
            visible_past_index=sorted_subset(past_len, visible),  # ascending rows < past_len (op contract)
            timestamp_query_index=sorted_subset(chunk, ts_queries),
        )
    elif graph in ("decode", "score"):
        new = sizes["new_tokens"] = _pick(ranges, "new_tokens", 3)
        capacity = sizes["past_tokens"] = _pick(ranges, "past_tokens", 48)
        # a capacity buffer with unused rows at its end: they must not change the result
        past_len = _pick_value(inputs, "past_len", capacity - 5, high=capacity)
        values["past_len"] = np.array([past_len], np.int64)
        if graph == "decode":  # score's queries and keys are random floats, like every KV input
            values["input_ids"] = rng.integers(0, cfg.vocab_size, size=new).astype(np.int64)
    elif graph == "kv_gather":
        source = sizes["source_tokens"] = _pick(ranges, "source_tokens", 64)
        gathered = sizes["gathered_tokens"] = _pick(ranges, "gathered_tokens", 20)
        pool = sizes["pool"] = _pick(ranges, "pool", cfg.kv_pool_stride)
        weight = np.full((gathered, pool), 1.0 / pool, np.float32)
        copies = rng.random(gathered) < 0.5  # dense rows copy one token: weights (1, 0, ...)
        weight[copies] = 0.0
        weight[copies, 0] = 1.0
        sparse = source // 3  # [sparse tier (kept before RoPE: position 0) | dense tier (rotated at its position)]
        values.update(
            gather_index=rng.integers(0, source, size=(gathered, pool)).astype(np.int64),
            gather_weight=weight,
            source_position=np.concatenate([np.zeros(sparse, np.int64), np.arange(source - sparse, dtype=np.int64)]),
            target_position=np.arange(gathered, dtype=np.int64),  # a decode cache: compacted positions 0..M-1
        )

    feed = {}
    for name, spec in inputs.items():
        if name in values:
            feed[name] = values[name]
            continue
        shape = tuple(_concrete(axis, name, spec, graph, sizes) for axis in range(len(spec["dims"])))
        if spec["dtype"] in ("FLOAT", "HALF", "BF16"):
            dtype = np.float32 if spec["dtype"] == "FLOAT" else float_dtype
            feed[name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
        elif spec["dtype"] == "BOOL":
            feed[name] = np.zeros(shape, bool)
        else:
            log.warning("%s: no generator for integer input %r; feeding zeros", graph, name)
            feed[name] = np.zeros(shape, np.int64 if spec["dtype"] == "INT64" else np.int32)
    return feed


def _concrete(axis: int, name: str, spec: dict[str, Any], graph: str, sizes: dict[str, int]) -> int:
    """Size of one axis from its ONNX dimension (fixed, ``name`` or ``k*name``) and the chosen sizes."""
    dim = spec["dims"][axis]
    if isinstance(dim, int) and dim > 0:
        return dim
    factor, _, dim_name = str(dim).rpartition("*")
    if dim_name in sizes:
        return sizes[dim_name] * (int(factor) if factor else 1)
    raise ValueError(f"{graph}: input {name!r} axis {axis} ({dim!r}) has no chosen size")
