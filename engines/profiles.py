"""Optimization profiles from the user's units: frames, chunk groups, window chunks (STYLE 5).

The exporter names every dynamic dimension of the four graphs (``chunk_tokens``,
``past_tokens``, ...). This module is the one place that says how far each name may range for a
given frame budget and chunk geometry; the engine builder turns the ranges into TensorRT
profiles and the manifest stores both the limits and the resulting ranges.

Token arithmetic (per sequence)::

    group_tokens   = tokens_per_group (144) + timestamp_tokens ("Time 12.5s:", <= 16)
    video_tokens   = ceil(max_frames / 4) * group_tokens
    context_tokens = prefix_tokens + video_tokens                  prefill past + chunk
    total_tokens   = context_tokens + suffix_tokens + answer_tokens  what decode's cache may hold
    visible_past   = prefix + earlier timestamps + window_chunks * chunk_groups * group_tokens
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from videoxl.config import VideoXLConfig
from videoxl.engines.errors import EngineBuildError

GRAPHS = ("vision", "prefill_chunk", "decode", "kv_gather")
GRAPH_FILES = {name: f"{name}.onnx" for name in GRAPHS}
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


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
    suffix_tokens: int = 256  # question + assistant header, run through decode at once
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
    total_tokens: int
    visible_past_tokens: int
    vision_groups: int

    @classmethod
    def of(cls, cfg: VideoXLConfig, limits: BuildLimits) -> "TokenBudget":
        groups = math.ceil(limits.max_frames / cfg.frames_per_group)
        group_tokens = cfg.tokens_per_group + limits.timestamp_tokens
        context = limits.prefix_tokens + groups * group_tokens
        window = min(limits.window_chunks * limits.chunk_groups, groups) * group_tokens
        return cls(
            groups=groups,
            group_tokens=group_tokens,
            chunk_tokens=max(limits.chunk_groups * group_tokens, limits.prefix_tokens),
            visual_chunk_tokens=limits.chunk_groups * cfg.tokens_per_group,
            context_tokens=context,
            total_tokens=context + limits.suffix_tokens + limits.answer_tokens,
            visible_past_tokens=limits.prefix_tokens + groups * limits.timestamp_tokens + window,
            vision_groups=max(1, min(limits.vision_batch_frames, groups * cfg.frames_per_group) // cfg.frames_per_group),
        )


def dimension_ranges(cfg: VideoXLConfig, limits: BuildLimits) -> dict[str, dict[str, DimRange]]:
    """For each graph, the range of each dimension name the exporter uses."""
    t = TokenBudget.of(cfg, limits)
    pool = cfg.kv_pool_stride
    return {
        "vision": {"groups": DimRange(1, t.vision_groups, t.vision_groups)},
        "prefill_chunk": {
            "chunk_tokens": DimRange(1, min(limits.chunk_groups * t.group_tokens, t.chunk_tokens), t.chunk_tokens),
            "visual_tokens": DimRange(0, t.visual_chunk_tokens, t.visual_chunk_tokens),
            "past_timestamps": DimRange(0, t.groups * limits.timestamp_tokens, t.groups * limits.timestamp_tokens),
            "timestamp_queries": DimRange(
                0, limits.chunk_groups * limits.timestamp_tokens, limits.chunk_groups * limits.timestamp_tokens
            ),
            "past_tokens": DimRange(0, t.context_tokens, t.context_tokens),
        },
        "decode": {
            "new_tokens": DimRange(1, 1, limits.suffix_tokens),
            "past_tokens": DimRange(1, t.total_tokens, t.total_tokens),
        },
        "kv_gather": {
            # the runtime's source is the sparse tier (< context) plus the reloaded dense rows (<= context)
            "source_tokens": DimRange(1, t.context_tokens, 2 * t.context_tokens),
            "mixed_tokens": DimRange(1, t.context_tokens, t.context_tokens),
            # 1: the runtime gathers from the already-pooled sparse tier; `pool`: straight from dense KV
            "pool": DimRange(1, pool, pool),
        },
    }


def shape_input_values(cfg: VideoXLConfig, limits: BuildLimits) -> dict[str, tuple[tuple[int], tuple[int], tuple[int]]]:
    """Value ranges of the scalar inputs TensorRT treats as shape tensors.

    Only the plugin-free (inlined) prefill engine has them: its ChunkSparseAttention body builds
    Range(0, prefix_len) and Range(window_start, K), so TensorRT needs these two on the host.
    """
    t = TokenBudget.of(cfg, limits)
    return {
        "prefix_len": ((0,), (min(limits.prefix_tokens, 32),), (limits.prefix_tokens,)),
        "window_start": ((0,), (t.context_tokens // 2,), (t.context_tokens,)),
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
    """Dense KV bytes of the largest profile: tokens x layers x 2 x kv_heads x head_dim x dtype."""
    tokens = TokenBudget.of(cfg, limits).total_tokens
    return tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * PRECISION_BYTES[precision]


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
