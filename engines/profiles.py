"""Optimization profiles from the user's units: frames, chunk groups, window chunks (STYLE 5).

The graph contract (``videoxl.graphs``) names every graph and every dynamic dimension of its
inputs (``chunk_tokens``, ``past_tokens``, ...). This module is the one place that says how far
each name may range for a given frame budget and chunk geometry, and which values the inputs
TensorRT reads on the host (shape tensors) may take; the engine builder turns the ranges into
TensorRT profiles and the manifest stores both the limits and the resulting ranges.

Token arithmetic (per sequence)::

    group_tokens   = tokens_per_group (144) + timestamp_tokens ("Time 12.5s:", <= 16)
    video_tokens   = ceil(max_frames / 4) * group_tokens
    context_tokens = prefix_tokens + video_tokens                  the dense tier: prefill past + chunk
    sparse_tokens  = groups * (timestamp_tokens + 144 / stride)    the sparse tier (visual rows pooled)
    scoring_tokens = prefix_tokens + sparse_tokens                 the all-sparse cache a question is scored on
    total_tokens   = context_tokens + suffix_tokens + answer_tokens  what the decode cache may hold
    visible_past   = prefix + earlier timestamps + window_chunks * chunk_groups * group_tokens

Block scoring runs the question on the prefill_chunk engine as a chunk that sees every row of the
scoring cache (its queries and keys go to the weightless score engine), and with
``decode_on_prefill`` (``videoxl build --decode-on-prefill``: no decode engine) every decode step
does the same over the decode cache, so the prefill_chunk profile widens to cover them::

    chunk_tokens   up to max(chunk, suffix_tokens)       the question goes in at once
    past_tokens    up to max(context, scoring_tokens)    (decode_on_prefill: total_tokens, the decode capacity)
    visible_past   up to max(visible_past, scoring_tokens)  (decode_on_prefill: total_tokens)
    visual_tokens  from 0, chunk_tokens from 1            (already: the prefix chunk has no visual rows)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from videoxl import graphs
from videoxl.config import VideoXLConfig
from videoxl.engines.errors import EngineBuildError

GRAPHS: tuple[str, ...] = tuple(graphs.GRAPHS)  # vision, prefill_chunk, decode, score, kv_gather
GRAPH_FILES: dict[str, str] = {name: g.file for name, g in graphs.GRAPHS.items()}
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# An LLM graph with more weights than this is built in layer ranges, each within it: TensorRT for
# RTX's compiler copies the weights and peaks at ~2.5x a graph's weight bytes (the whole 14.2 GiB
# LLM of the 8B model does not build in 20 GiB; ranges of at most 3.6 GiB do, see bench/RESULTS.md).
DEFAULT_MAX_ENGINE_WEIGHTS = 4 * 2**30

ShapeValues = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) values of a shape tensor


class ProfileError(EngineBuildError):
    """A graph's dynamic dimensions cannot be given ranges, or the limits are invalid."""


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def scaled(self, factor: int) -> "DimRange":
        return DimRange(self.min * factor, self.opt * factor, self.max * factor)


@dataclass(frozen=True)
class BuildLimits:
    """What the engines must accept, in the user's units. The defaults cover a chat prompt."""

    max_frames: int
    chunk_groups: int
    window_chunks: int
    timestamp_tokens: int = 16  # per group: the tokens of "Time {t}s:"
    prefix_tokens: int = 64  # system prompt and user header before the video
    suffix_tokens: int = 256  # question + assistant header, run at once (as a chunk for block scoring, then decoded)
    answer_tokens: int = 256  # generated tokens the decode cache must still hold
    vision_batch_frames: int = 32  # frames per vision engine call

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_frames", "chunk_groups", "prefix_tokens", "suffix_tokens", "answer_tokens", "vision_batch_frames"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window_chunks", "timestamp_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ProfileError("invalid build limits: " + "; ".join(problems))

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenBudget:
    """Token counts derived from the limits and the model config (see the module docstring)."""

    groups: int
    group_tokens: int
    chunk_tokens: int
    visual_chunk_tokens: int
    context_tokens: int
    sparse_tokens: int
    scoring_tokens: int
    total_tokens: int
    visible_past_tokens: int
    vision_groups: int

    @classmethod
    def of(cls, cfg: VideoXLConfig, limits: BuildLimits) -> "TokenBudget":
        groups = math.ceil(limits.max_frames / cfg.frames_per_group)
        group_tokens = cfg.tokens_per_group + limits.timestamp_tokens
        context = limits.prefix_tokens + groups * group_tokens
        sparse = groups * (limits.timestamp_tokens + cfg.tokens_per_group // cfg.kv_pool_stride)
        window = min(limits.window_chunks * limits.chunk_groups, groups) * group_tokens
        return cls(
            groups=groups,
            group_tokens=group_tokens,
            chunk_tokens=max(limits.chunk_groups * group_tokens, limits.prefix_tokens),
            visual_chunk_tokens=limits.chunk_groups * cfg.tokens_per_group,
            context_tokens=context,
            sparse_tokens=sparse,
            scoring_tokens=limits.prefix_tokens + sparse,
            total_tokens=context + limits.suffix_tokens + limits.answer_tokens,
            visible_past_tokens=limits.prefix_tokens + groups * limits.timestamp_tokens + window,
            vision_groups=max(1, min(limits.vision_batch_frames, groups * cfg.frames_per_group) // cfg.frames_per_group),
        )


def dimension_ranges(cfg: VideoXLConfig, limits: BuildLimits, *, decode_on_prefill: bool = False) -> dict[str, dict[str, DimRange]]:
    """For each graph of the contract, the range of each free dimension name its inputs use.

    prefill_chunk's profile also takes the question as a chunk over the whole scoring cache (block
    scoring); ``decode_on_prefill``: decode runs on the prefill_chunk engine (module docstring): its
    profile widens to the decode capacity, and there is no decode entry."""
    t = TokenBudget.of(cfg, limits)
    stamps_per_chunk = limits.chunk_groups * limits.timestamp_tokens
    groups = DimRange(1, t.vision_groups, t.vision_groups)
    ranges = {
        # torch.export names the frame axis "4*groups"; the contract calls it "frames" (4 per group)
        "vision": {"groups": groups, "frames": groups.scaled(cfg.frames_per_group)},
        "prefill_chunk": {
            "chunk_tokens": DimRange(1, min(limits.chunk_groups * t.group_tokens, t.chunk_tokens), t.chunk_tokens),
            "visual_tokens": DimRange(0, t.visual_chunk_tokens, t.visual_chunk_tokens),
            # the dense tier before the chunk, bound in place: none for the prefix, all but the last chunk at most
            "past_tokens": DimRange(0, t.context_tokens, t.context_tokens),
            "visible_past": DimRange(0, t.visible_past_tokens, t.visible_past_tokens),
            "timestamp_queries": DimRange(0, stamps_per_chunk, stamps_per_chunk),  # 0 under the streaming rule
        },
        "decode": {
            "new_tokens": DimRange(1, 1, limits.suffix_tokens),
            # a capacity buffer (valid rows in past_len): one profile serves every capacity bucket
            "past_tokens": DimRange(1, t.total_tokens, t.total_tokens),
        },
        "score": {
            "new_tokens": DimRange(1, limits.suffix_tokens, limits.suffix_tokens),  # the question, at once
            "past_tokens": DimRange(1, t.scoring_tokens, t.scoring_tokens),  # prefix dense + every block sparse
        },
        "kv_gather": {
            "source_tokens": DimRange(1, t.sparse_tokens + t.context_tokens, t.sparse_tokens + t.context_tokens),  # [sparse | dense]
            "gathered_tokens": DimRange(1, t.context_tokens, t.context_tokens),  # a block's sparse rows .. an all-dense decode cache
            "pool": DimRange(1, cfg.kv_pool_stride, cfg.kv_pool_stride),  # 1: copies (the decode cache); stride: pooling
        },
    }
    # a question runs on prefill_chunk as a chunk that sees every row of the scoring cache (its queries
    # and keys feed score); with decode_on_prefill every decode step does, up to the decode capacity
    prefill = ranges["prefill_chunk"]
    widened = lambda r, high: DimRange(r.min, r.opt, max(r.max, high))  # noqa: E731
    sees_all = t.total_tokens if decode_on_prefill else t.scoring_tokens
    prefill["chunk_tokens"] = widened(prefill["chunk_tokens"], limits.suffix_tokens)
    prefill["past_tokens"] = widened(prefill["past_tokens"], sees_all)
    prefill["visible_past"] = widened(prefill["visible_past"], sees_all)
    if decode_on_prefill:
        del ranges["decode"]
    return ranges


def shape_input_values(cfg: VideoXLConfig, limits: BuildLimits, *, decode_on_prefill: bool = False) -> dict[str, dict[str, ShapeValues]]:
    """For each graph, the value range of every scalar input that TensorRT may read on the host.

    The contract makes none of them a shape by design, but TensorRT decides: the plugin-free
    prefill body builds ``Range(0, past_len * min(Tq, 1))`` for the timestamp queries, which makes
    ``past_len`` a shape tensor of that engine. The builder gives these ranges to any input the
    network reports as a shape tensor, and the manifest records where each input must live.
    """
    t = TokenBudget.of(cfg, limits)

    def values(high: int) -> ShapeValues:
        return (0,), (high,), (high,)

    return {
        "vision": {},
        # a decode step on the prefill engine starts at most one row before the decode capacity; a question, after the scoring cache
        "prefill_chunk": {"past_len": values(max(t.context_tokens, t.scoring_tokens, t.total_tokens - 1 if decode_on_prefill else 0))},
        "decode": {"past_len": values(t.total_tokens - 1)},
        "score": {"past_len": values(t.scoring_tokens)},
        "kv_gather": {},
    }


_SCALED = re.compile(r"^\s*(\d+)\s*\*\s*([A-Za-z_]\w*)\s*$")  # "4*groups", as torch.export writes it


def resolve_dim(graph: str, tensor: str, axis: int, dim: int | str, ranges: dict[str, DimRange]) -> DimRange:
    """The range of one dimension: a fixed size, a known name, or ``k*name``."""
    if isinstance(dim, int) and dim > 0:
        return DimRange(dim, dim, dim)
    name = str(dim) if dim else ""
    scaled = _SCALED.match(name)
    if scaled and scaled.group(2) in ranges:
        return ranges[scaled.group(2)].scaled(int(scaled.group(1)))
    if name in ranges:
        return ranges[name]
    known = ", ".join(sorted(ranges)) or "(none: all its dimensions must be fixed)"
    what = f"dynamic dimension {name!r}" if name else "an unnamed dynamic dimension"
    raise ProfileError(
        f"{GRAPH_FILES.get(graph, graph)}: input {tensor!r} axis {axis} has {what}; "
        f"the engine builder knows these names for this graph: {known}"
    )


def input_profile(
    graph: str, inputs: dict[str, list[int | str]], ranges: dict[str, DimRange]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input: (min_shape, opt_shape, max_shape)}`` for a graph's inputs (ONNX dims)."""
    shapes = {}
    for tensor, dims in inputs.items():
        resolved = [resolve_dim(graph, tensor, axis, dim, ranges) for axis, dim in enumerate(dims)]
        shapes[tensor] = (
            tuple(r.min for r in resolved),
            tuple(r.opt for r in resolved),
            tuple(r.max for r in resolved),
        )
    return shapes


def kv_cache_bytes(cfg: VideoXLConfig, limits: BuildLimits, precision: str) -> int:
    """KV bytes of the largest profile, all layers: the video region and a full decode region.

    video region  = [sparse tier | dense tier] of every layer (one BilevelKVGather source)
    decode region = the decode cache at its largest (every block dense + suffix + answer)
    """
    t = TokenBudget.of(cfg, limits)
    return graphs.kv_bytes(cfg, t.sparse_tokens + t.context_tokens + t.total_tokens, PRECISION_BYTES[precision])


def parse_bytes(text: str | int) -> int:
    """``16GiB``, ``1.5 GB``, ``512MiB``, ``1000000`` -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"cannot read a byte size from {text!r}; write e.g. 16GiB, 8GB or 1073741824")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def format_bytes(value: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"
