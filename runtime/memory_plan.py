"""What lives where for one request: weights, activations, the two KV regions, the dense tier.

Plain arithmetic from the model config (no GPU, no TensorRT), so that `videoxl plan` answers
"does N frames fit in this GPU?" on any machine, and so that the answer can be tested.

Weights are counted as the TensorRT backend holds them (``engine_weight_bytes``): one engine (or
one chain of layer-range engines) per graph, each with its own copy, so the LLM's weights are on
the device twice (prefill_chunk, decode). The score engine holds none (graph contract v3: the
question runs as a chunk on prefill_chunk, and the score graph reads its queries and keys)::

    weights = vision + prefill_chunk + decode
            = 0.95 + 14.19 + 14.19 = 29.32 GiB    (Video-XL-2 8B, fp16; int8 16.14, int4 10.24)

Engines built with ``--decode-on-prefill`` have no decode engine (decode runs on prefill_chunk):
one LLM copy (``decode_on_prefill``: 15.13 GiB at fp16, 5.58 GiB int4), and the prefill_chunk
engine's activations are taken at its widened profile (the question's tokens over the decode capacity).

KV arithmetic (DESIGN §3), per token over all layers (``videoxl.graphs.kv_bytes``)::

    kv_bytes_per_token = layers x 2 (K, V) x kv_heads x head_dim x dtype_bytes
                       = 28 x 2 x 4 x 128 x 2 = 57,344 B = 56 KiB    (Video-XL-2 8B, fp16)

Token arithmetic, G = ceil(frames / 4) groups, ts = timestamp tokens per group::

    group_tokens   = 144 visual + ts                  (~150)
    dense tier     = prefix + G x group_tokens         every prompt row before the question, rotated
    sparse tier    = G x (ts + 144 / 4)                timestamps kept, visual rows pooled x4 (~42)
    video blocks   = ceil(G / S); dense = first + last + top-k (block 0, the prefix, always)
    decode cache   = prefix + dense groups x group_tokens + sparse groups x (ts + 36) + suffix + answer
    scoring cache  = prefix + G x (ts + 36)            every block sparse (<= the decode cache)

The two KV regions (graph contract v2: keys are rotated once, when written, and read in place)::

    video region   per layer [sparse tier | dense tier]; the prefill writes each chunk's rows into
                   the dense tier and reads its past there in place; BilevelKVGather pools finished
                   blocks into the sparse tier and reads both tiers as one source
    decode region  the question's scoring cache, then (in the same rows) its decode cache

With the dense tier on the device (``dense_tier="device"``) nothing is reloaded or concatenated
per question. With it in pinned host memory (``"host"``, DESIGN §4; ``runtime/dense_tier.py``)::

    video region   per layer [sparse tier | resident dense rows | staging]: the device keeps the
                   prefix, every timestamp row and the window's chunks (what later chunks read under
                   the streaming rule) plus as many chunks of slack, and stages the chosen blocks
    dense tier     in pinned host memory, row = position: each chunk's rows are copied out once,
                   the chosen blocks' rows copied back per question (first block + top-k staged at
                   once; the last block is normally still resident; more takes several passes)

    resident       = prefix + G x ts + 2 (P + 1) chunks of C groups       (window + chunk, + slack)
    staging        = (1 + top-k) blocks of S groups

The evaluation rule's timestamp queries read the whole dense past every chunk, so the host tier
goes with the streaming rule only (the prefill activations then hold no whole-past read).
"auto" keeps the dense tier on the device when everything fits there, else moves it to the host.
On unified memory (Jetson) host and device are the same memory and share one budget.

The TensorRT backend sizes its KV regions with the same arithmetic (``kv_rows_for``,
``fit_kv_rows``: the most frames whose regions fit what the arena has left).

Activations are what TensorRT reports for an engine at given shapes: one layer's working set
(reused by every layer), the larger of its attention and its MLP (``*_activation_bytes``)::

    mlp               = tokens x (3 x intermediate + 3 x hidden) x b   gate, up, their product; residual,
                                                                       normed input, output
    fused attention   = 2 x keys x kv_row x b + queries x keys x b     K, V at the KV heads (not expanded);
                        + queries x q_width x (2b + 4)                 the mask as a bias; q, fp32 rope, output
    written-out attn  = 2 x heads x queries x keys x 4                 fp32 scores and probabilities
                        + keys x kv_row x (b + 4)                      the values, cast to fp32

    prefill, plugins  = mlp(chunk)                  ChunkSparseAttention reads the past in place
    prefill, inlined  = max(mlp(chunk), fused(chunk, visible + chunk),
                            written-out(timestamp queries, whole past + chunk))
    decode            = max(mlp(new), fused(new, capacity + new))       (no custom op: same either way)
    score graph       = 2 x heads x new x keys x 4 + keys x kv_row x b    one layer's fp32 scores and
                        (keys = scoring + new; no weights, no MLP)        probabilities, its keys concatenated

The prefill_chunk engine runs the question too (contract v3), new tokens over the all-sparse
scoring cache with every row visible, and with ``--decode-on-prefill`` decode: TensorRT sizes one
scratch for its whole profile, so its prefill formula is taken at max(chunk, new) tokens, past and
visible past up to the scoring cache (the decode capacity with --decode-on-prefill). The phases::

    prefill chunk     = prefill_chunk engine + logits + query io
    question scoring  = max(prefill_chunk engine, score graph) + query io + attention mass
    query io          = layers x max(chunk, new) x heads x head_dim x b   prefill_chunk's query.{layer}
                        outputs, io at the profile maximum, read in place by the score engine

Checked against the real-size builds (bench/RESULTS.md, "Real size"): at the profile maxima of
``--max-frames 1024`` each phase is within 3 % of TensorRT's report (the score graph's within 4 %
at 256 to 4,096 frames).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from videoxl import graphs
from videoxl.config import ConfigError, VideoXLConfig
from videoxl.engines.profiles import format_bytes, parse_bytes
from videoxl.runtime.cuda_memory import ArenaOverflowError, KVSlabs
from videoxl.weight_format import FORMATS, WeightFormat, weight_bytes

KV_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
PIXEL_BYTES = 4  # frames enter the vision graph as float32


def kv_bytes_per_token(config: VideoXLConfig, dtype_bytes: int) -> int:
    return graphs.kv_bytes(config, 1, dtype_bytes)


def estimate_params(config: VideoXLConfig) -> dict[str, int]:
    """Parameter counts of the modules inference uses (unused SigLIP layer and heads excluded)."""
    c, iv, p = config.vision_hidden_size, config.vision_intermediate_size, config.patch_size
    siglip_layer = 4 * (c * c + c) + (c * iv + iv) + (iv * c + c) + 2 * 2 * c  # attention, MLP, 2 LayerNorms
    vision = 3 * p * p * c + c + config.vision_grid**2 * c + config.vision_layers_used * siglip_layer

    tables = 2 * (2 * config.compressor_max_relative_position + 1) * c  # relative positions K and V
    attn3d = 2 * c + 4 * (c * c + c)  # GroupNorm, q/k/v/proj_out 1x1x1 convs
    temporal = 2 * c + (3 * c * c + 3 * c) + tables + (c * c + c)  # GroupNorm, qkv, tables, proj_out
    conv3d = 27 * c * c + c  # 3x3x3 kernel
    compressor = config.frames_per_group * c + 2 * (attn3d + temporal + conv3d)

    h = config.hidden_size
    projector = (c * h + h) + (h * h + h)

    kv = config.num_key_value_heads * config.head_dim
    llm_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * config.intermediate_size + 2 * h
    llm = 2 * config.vocab_size * h + config.num_hidden_layers * llm_layer + h  # embeddings, lm_head, final norm
    return {"vision": vision, "compressor": compressor, "projector": projector, "llm": llm}


def engine_weight_bytes(
    config: VideoXLConfig, fmt: WeightFormat, float_bytes: float, params: dict[str, int], *, decode_on_prefill: bool = False,
) -> dict[str, int]:
    """Weight bytes of each engine the TensorRT backend loads (score and kv_gather have none).

    prefill_chunk and decode are separate engines (or chains of layer-range engines), each with its
    own copy of the LLM. score holds no weights (graph contract v3): the question runs as a chunk on
    prefill_chunk, whose queries and keys the score graph reads. ``decode_on_prefill``: engines
    built with --decode-on-prefill, no decode engine (decode runs on prefill_chunk).
    """
    if float_bytes in (1, 2, 4):
        modules = weight_bytes(config, fmt, int(float_bytes), params)
    else:  # a fractional width (what-if plans): every parameter at it
        modules = {name: math.ceil(n * float_bytes) for name, n in params.items()}
    engines = {
        "vision": modules["vision"] + modules["compressor"] + modules["projector"],
        "prefill_chunk": modules["llm"],
        "decode": modules["llm"],
    }
    if decode_on_prefill:
        del engines["decode"]
    return engines


# --- activations: what TensorRT reports for one engine at given shapes (module docstring) ---------
def _mlp_bytes(cfg: VideoXLConfig, tokens: int, b: int) -> int:
    """One layer's MLP: gate, up and their gated product; the residual stream, its normed copy, the output."""
    return tokens * (3 * cfg.intermediate_size + 3 * cfg.hidden_size) * b


def _fused_attention_bytes(cfg: VideoXLConfig, queries: int, keys: int, b: int) -> int:
    """The standard Attention op, fused by TensorRT: K and V stay at the KV heads (decode's 115 MB
    could not hold them expanded to the query heads), the boolean mask becomes a bias in the compute
    dtype, the queries pass through RoPE in fp32."""
    kv_row, q_width = cfg.num_key_value_heads * cfg.head_dim, cfg.num_attention_heads * cfg.head_dim
    return 2 * keys * kv_row * b + queries * keys * b + queries * q_width * (2 * b + 4)


def _written_out_attention_bytes(cfg: VideoXLConfig, queries: int, keys: int, b: int) -> int:
    """MatMul, Softmax, MatMul in fp32 (the inlined prefill body's timestamp queries): the
    scores and the probabilities [heads, queries, keys] both live, with the values cast to fp32."""
    kv_row = cfg.num_key_value_heads * cfg.head_dim
    return 2 * cfg.num_attention_heads * queries * keys * 4 + keys * kv_row * (b + 4)


def prefill_activation_bytes(
    cfg: VideoXLConfig, *, chunk_tokens: int, past_tokens: int, visible_past: int, timestamp_queries: int,
    dtype_bytes: int, plugins: bool,
) -> int:
    """prefill_chunk: with the plugin, ChunkSparseAttention reads the past in place and the MLP is the
    largest (its split-K workspace, 26 MB at the 1024-frame profile, stays below); inlined, the body
    gathers the visible past for the chunk and the whole past for its timestamp queries."""
    b = dtype_bytes
    mlp = _mlp_bytes(cfg, chunk_tokens, b)
    if plugins:
        return mlp
    return max(
        mlp,
        _fused_attention_bytes(cfg, chunk_tokens, visible_past + chunk_tokens, b),
        _written_out_attention_bytes(cfg, timestamp_queries, past_tokens + chunk_tokens, b) if timestamp_queries else 0,
    )


def decode_activation_bytes(cfg: VideoXLConfig, *, new_tokens: int, past_tokens: int, dtype_bytes: int) -> int:
    """decode: one layer's capacity buffer concatenated with the new keys, into fused attention."""
    b = dtype_bytes
    return max(_mlp_bytes(cfg, new_tokens, b), _fused_attention_bytes(cfg, new_tokens, past_tokens + new_tokens, b))


def score_activation_bytes(cfg: VideoXLConfig, *, new_tokens: int, past_tokens: int, dtype_bytes: int) -> int:
    """score, the weightless graph (contract v3): one layer's past keys concatenated with the question's
    keys, and its fp32 scores and probabilities [heads, queries, keys]; the layers run in order (the
    graph makes layer i read layer i-1's running mass), so one layer's working set serves all."""
    keys = past_tokens + new_tokens
    return 2 * cfg.num_attention_heads * new_tokens * keys * 4 + keys * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def query_io_bytes(cfg: VideoXLConfig, *, chunk_tokens: int, dtype_bytes: int) -> int:
    """prefill_chunk's query.{layer} outputs (contract v3), io buffers at the profile maximum: every
    layer's rotated queries of a chunk, which the score engine reads in place for the question."""
    return cfg.num_hidden_layers * chunk_tokens * cfg.num_attention_heads * cfg.head_dim * dtype_bytes


def vision_activation_bytes(cfg: VideoXLConfig, *, frames: int, dtype_bytes: int) -> int:
    """vision: fused attention everywhere (TensorRT's Myelin fuses SigLIP's and the DTS's attention,
    no probabilities materialised): one SigLIP layer's residual, hidden and MLP; the DTS's q, k, v
    and output; the projector's output before the 2x2 pool."""
    b, c = dtype_bytes, cfg.vision_hidden_size
    groups = math.ceil(frames / cfg.frames_per_group)
    positions = cfg.compressor_grid**2
    return (
        frames * cfg.vision_grid**2 * (2 * c + cfg.vision_intermediate_size) * b
        + groups * cfg.frames_per_group * positions * 4 * c * b
        + groups * positions * cfg.hidden_size * 2 * b
    )


@dataclass(frozen=True)
class PlanItem:
    name: str
    where: str  # "device" or "host" (pinned; on unified memory the device is the host)
    nbytes: int
    tokens: int | None = None  # KV rows, where the item is a KV region
    detail: str = ""


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan depends on besides the config (re-planning changes one of these)."""

    frames: int
    budget_bytes: int
    chunk_groups: int
    window_chunks: int
    block_groups: int
    dense_blocks: int
    dtype_bytes: int
    weight_dtype_bytes: float
    weights_bytes: int | None
    weights: WeightFormat | None  # int8/int4 linears counted at their real bytes (None: weight_dtype_bytes for all)
    unified_memory: bool
    max_new_tokens: int
    timestamp_tokens_per_group: int
    prefix_tokens: int
    suffix_tokens: int
    vision_batch_frames: int
    dense_tier: str = "device"  # "device" or "host" (resolved: plan_memory turns "auto" into one of them)
    host_budget_bytes: int | None = None  # pinned host memory the plan may take (None: not checked)
    plugins: bool = True  # engines built with the videoxl plugins (videoxl build's default) or inlined bodies
    decode_on_prefill: bool = False  # engines built with --decode-on-prefill: no decode engine, a wider prefill profile


DENSE_TIERS = ("auto", "device", "host")


@dataclass(frozen=True)
class KVTokens:
    """Rows of the KV tiers and caches of one request (see the module docstring)."""

    groups: int
    dense: int  # dense tier
    sparse: int  # sparse tier
    num_blocks: int  # video blocks (block 0, the prefix, not counted)
    dense_video_blocks: int
    decode: int  # the decode cache, suffix and answer included
    scoring: int  # the all-sparse scoring cache, before the suffix
    resident: int = 0  # dense rows the device keeps when the dense tier is in host memory
    staging: int = 0  # dense rows staged for the chosen blocks when the dense tier is in host memory

    @property
    def offloaded_video(self) -> int:
        """Rows of the video region with the dense tier in host memory: [sparse | resident | staging]."""
        return self.sparse + self.resident + self.staging

    @property
    def video(self) -> int:
        """Rows of the video region: [sparse tier | dense tier]."""
        return self.sparse + self.dense

    @property
    def decode_region(self) -> int:
        """Rows of the decode region: the scoring cache and then the decode cache use the same rows."""
        return max(self.decode, self.scoring)


def kv_tokens(
    cfg: VideoXLConfig, *, frames: int, block_groups: int, dense_blocks: int, timestamp_tokens_per_group: int,
    prefix_tokens: int, suffix_tokens: int, max_new_tokens: int, chunk_groups: int | None = None,
    window_chunks: int | None = None,
) -> KVTokens:
    """The token arithmetic of the module docstring (dense blocks: first + last + top-k, whole blocks)."""
    ts, tpg = timestamp_tokens_per_group, cfg.tokens_per_group
    group_tokens, sparse_group_tokens = tpg + ts, ts + tpg // cfg.kv_pool_stride
    groups = math.ceil(frames / cfg.frames_per_group)
    num_blocks = math.ceil(groups / block_groups)
    dense_video_blocks = min(num_blocks, min(num_blocks, 2) + dense_blocks)  # first and last always dense
    dense_groups = min(groups, dense_video_blocks * block_groups)  # upper bound: full blocks
    dense = prefix_tokens + groups * group_tokens
    chunk = cfg.chunk_groups if chunk_groups is None else chunk_groups
    window = cfg.window_chunks if window_chunks is None else window_chunks
    resident_groups = min(groups, 2 * (window + 1) * chunk)  # window + the chunk, and as much slack
    resident = min(dense, prefix_tokens + groups * ts + resident_groups * tpg)
    staging = (1 + min(dense_blocks, num_blocks)) * block_groups * group_tokens  # first block + top-k
    staging = min(staging, max(dense - resident, group_tokens))  # resident + staging: no more than the dense tier
    return KVTokens(
        groups=groups,
        dense=dense,
        sparse=groups * sparse_group_tokens,
        num_blocks=num_blocks,
        dense_video_blocks=dense_video_blocks,
        decode=prefix_tokens + dense_groups * group_tokens + (groups - dense_groups) * sparse_group_tokens
        + suffix_tokens + max_new_tokens,
        scoring=prefix_tokens + groups * sparse_group_tokens,
        resident=resident,
        staging=staging,
    )


@dataclass(frozen=True)
class MemoryPlan:
    config: VideoXLConfig
    inputs: PlanInputs
    items: tuple[PlanItem, ...]
    tokens: KVTokens
    prompt_tokens: int
    kv_bytes_per_token: int
    device_bytes: int  # what the GPU budget must hold
    fits: bool
    advice: tuple[str, ...] = ()
    max_frames_that_fit: int | None = None  # set when the plan does not fit and some count does
    host_bytes: int = 0  # pinned host memory (the dense tier when it lives there)
    frames_fit: tuple[tuple[str, int], ...] = ()  # (dense tier, most frames that fit this budget), as planned

    @property
    def budget_bytes(self) -> int:
        return self.inputs.budget_bytes

    @property
    def groups(self) -> int:
        return self.tokens.groups

    @property
    def num_blocks(self) -> int:
        return self.tokens.num_blocks

    @property
    def dense_video_blocks(self) -> int:
        return self.tokens.dense_video_blocks

    def item(self, name: str) -> PlanItem:
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(f"no plan item {name!r}; items: {', '.join(i.name for i in self.items)}")

    def table(self) -> str:
        """The plan as a fixed-width table, as `videoxl plan` prints it."""
        i = self.inputs
        kv_name = {2: "fp16", 4: "fp32"}.get(i.dtype_bytes, f"{i.dtype_bytes} B")
        memory = "unified memory (host and device share the budget)" if i.unified_memory else "discrete GPU"
        lines = [
            f"{i.frames} frames -> {self.groups} groups, {self.prompt_tokens:,} prompt tokens; "
            f"KV {self.kv_bytes_per_token / 1024:.1f} KiB/token ({kv_name})",
            f"{self.num_blocks} video blocks of {i.block_groups} groups, {self.dense_video_blocks} dense "
            f"({'all' if self.dense_video_blocks == self.num_blocks else f'first, last, top-{i.dense_blocks}'}); "
            f"chunks of {i.chunk_groups} groups, window {i.window_chunks}",
            f"budget {format_bytes(i.budget_bytes)} on a {memory}",
            "dense tier: " + ("on the device" if i.dense_tier == "device" else
                              "in pinned host memory (--dense-tier host; with --prefill-rule streaming only)"),
            "",
            f"  {'item':<22} {'where':<7} {'bytes':>12} {'tokens':>10}  detail",
        ]
        for item in self.items:
            tokens = f"{item.tokens:,}" if item.tokens is not None else ""
            lines.append(f"  {item.name:<22} {item.where:<7} {format_bytes(item.nbytes):>12} {tokens:>10}  {item.detail}")
        lines += ["", f"  {'device total':<30} {format_bytes(self.device_bytes):>12}  of {format_bytes(i.budget_bytes)}"]
        if self.host_bytes:
            of = f"  of {format_bytes(i.host_budget_bytes)} free" if i.host_budget_bytes is not None else ""
            lines.append(f"  {'host total (pinned)':<30} {format_bytes(self.host_bytes):>12}{of}")
        lines.append(f"fits: {'yes' if self.fits else 'NO'}")
        if self.frames_fit:
            lines.append("frames that fit this budget: " + ", ".join(
                f"{frames:,} with the dense tier {'on the device' if tier == 'device' else 'in pinned host memory'}"
                for tier, frames in self.frames_fit))
        lines += [f"  - {line}" for line in self.advice]
        return "\n".join(lines)


def plan_memory(
    config: VideoXLConfig,
    *,
    frames: int,
    budget_bytes: int,
    chunk_groups: int | None = None,
    window_chunks: int | None = None,
    block_groups: int | None = None,
    dense_blocks: int = 4,
    dtype_bytes: int = 2,
    unified_memory: bool = False,
    weights_bytes: int | None = None,
    weight_dtype_bytes: float | None = None,
    weights: WeightFormat | str | None = None,
    max_new_tokens: int = 256,
    timestamp_tokens_per_group: int = 6,
    prefix_tokens: int = 64,
    suffix_tokens: int = 64,
    vision_batch_frames: int = 32,
    dense_tier: str = "device",
    host_budget_bytes: int | None = None,
    plugins: bool = True,
    decode_on_prefill: bool = False,
) -> MemoryPlan:
    """Plan one request of ``frames`` frames against ``budget_bytes`` of GPU memory.

    ``dense_blocks`` is the task-aware top-k (first, last and prefix blocks come on top);
    ``weights_bytes`` overrides the estimate from the config's parameter counts, which uses
    ``weight_dtype_bytes`` (default ``dtype_bytes``) for every parameter, or, given ``weights``
    ("fp", "int8", "int4" or a ``WeightFormat``), the bytes an export in that format holds: its
    int8/int4 linears with their scales, everything else at ``weight_dtype_bytes``
    (``videoxl.weight_format.weight_bytes``).
    ``dense_tier`` "device" keeps both KV tiers on the device, "host" keeps the dense tier in
    pinned host memory (checked against ``host_budget_bytes`` when given), "auto" the device when
    everything fits there, else the host when that fits. ``frames_fit`` lists the most frames that
    fit with either. ``plugins`` says whether the engines use the videoxl plugins (``videoxl build``'s
    default) or the inlined ONNX bodies (``--no-plugins``, a larger prefill working set).
    ``decode_on_prefill``: engines built with ``--decode-on-prefill`` (no decode engine's weights;
    decode runs on the prefill_chunk engine, whose activations are taken at its widened profile).
    When the plan does not fit, ``advice`` lists changes that do, each checked by re-planning.
    """
    if dense_tier not in DENSE_TIERS:
        raise ValueError(f"dense tier {dense_tier!r} not in {DENSE_TIERS}")
    inputs = PlanInputs(
        frames=frames, budget_bytes=budget_bytes,
        chunk_groups=config.chunk_groups if chunk_groups is None else chunk_groups,
        window_chunks=config.window_chunks if window_chunks is None else window_chunks,
        block_groups=config.block_groups if block_groups is None else block_groups,
        dense_blocks=dense_blocks, dtype_bytes=dtype_bytes,
        weight_dtype_bytes=dtype_bytes if weight_dtype_bytes is None else weight_dtype_bytes,
        weights_bytes=weights_bytes, weights=WeightFormat.parse(weights) if isinstance(weights, str) else weights,
        unified_memory=unified_memory, max_new_tokens=max_new_tokens,
        timestamp_tokens_per_group=timestamp_tokens_per_group, prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens, vision_batch_frames=vision_batch_frames,
        dense_tier="host" if dense_tier == "host" else "device", host_budget_bytes=host_budget_bytes,
        plugins=plugins, decode_on_prefill=decode_on_prefill,
    )
    _check_inputs(inputs)
    plan = _plan(config, inputs)
    if not plan.fits and dense_tier == "auto":
        on_host = _plan(config, dataclasses.replace(inputs, dense_tier="host"))
        plan = on_host if on_host.fits else plan
    frames_fit = tuple((tier, max_frames_that_fit(config, dataclasses.replace(inputs, frames=1 << 22), dense_tier=tier))
                       for tier in ("device", "host"))
    plan = dataclasses.replace(plan, frames_fit=frames_fit)
    if plan.fits:
        return plan
    advice, max_frames = _advise(config, plan)
    return dataclasses.replace(plan, advice=tuple(advice), max_frames_that_fit=max_frames)


def _check_inputs(i: PlanInputs) -> None:
    problems = []
    for name in ("frames", "budget_bytes", "chunk_groups", "block_groups", "dtype_bytes", "vision_batch_frames"):
        if getattr(i, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(i, name)}")
    for name in ("window_chunks", "dense_blocks", "max_new_tokens", "timestamp_tokens_per_group", "prefix_tokens", "suffix_tokens"):
        if getattr(i, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(i, name)}")
    if i.weight_dtype_bytes <= 0:
        problems.append(f"weight_dtype_bytes must be > 0, got {i.weight_dtype_bytes}")
    if i.host_budget_bytes is not None and i.host_budget_bytes < 0:
        problems.append(f"host_budget_bytes must be >= 0, got {i.host_budget_bytes}")
    if problems:
        raise ValueError("invalid memory plan request: " + "; ".join(problems))


def _plan(cfg: VideoXLConfig, i: PlanInputs) -> MemoryPlan:
    kvpt = kv_bytes_per_token(cfg, i.dtype_bytes)
    b = i.dtype_bytes
    ts = i.timestamp_tokens_per_group
    group_tokens = cfg.tokens_per_group + ts
    t = kv_tokens(
        cfg, frames=i.frames, block_groups=i.block_groups, dense_blocks=i.dense_blocks, timestamp_tokens_per_group=ts,
        prefix_tokens=i.prefix_tokens, suffix_tokens=i.suffix_tokens, max_new_tokens=i.max_new_tokens,
        chunk_groups=i.chunk_groups, window_chunks=i.window_chunks,
    )
    groups = t.groups
    on_host = i.dense_tier == "host"

    # --- prefill: the last chunk reads the most (in place, from the dense tier) ------------------
    chunks = math.ceil(groups / i.chunk_groups)
    last = chunks - 1
    chunk_tokens = max(min(i.chunk_groups, groups) * group_tokens, i.prefix_tokens)
    window_groups = min(last, i.window_chunks) * i.chunk_groups
    past_tokens = i.prefix_tokens + last * i.chunk_groups * group_tokens  # the last chunk's past_len
    visible_past = i.prefix_tokens + (last * i.chunk_groups - window_groups) * ts + window_groups * group_tokens

    # --- weights: what the TensorRT backend holds on the device ------------------------------------
    params = estimate_params(cfg)
    if i.weights_bytes is not None:
        weights, weights_detail = i.weights_bytes, "given"
    else:
        fmt = i.weights if i.weights is not None else WeightFormat()
        if i.weights is not None and i.weight_dtype_bytes not in (1, 2, 4):
            raise ValueError(f"with --weights the float parts need a float width of 2 or 4 bytes, got {i.weight_dtype_bytes}")
        engines = engine_weight_bytes(cfg, fmt, i.weight_dtype_bytes, params, decode_on_prefill=i.decode_on_prefill)
        weights = sum(engines.values())
        what = f"{fmt} linears, the rest {i.weight_dtype_bytes:g} B/param" if i.weights is not None else (
            f"{sum(params.values()) / 1e9:.2f} B params x {i.weight_dtype_bytes:g} B")
        weights_detail = (
            f"{what}; per engine, each its own copy on the device (the TensorRT backend deserialises one engine, "
            "or one chain of layer-range engines, per graph): " + ", ".join(f"{name} {format_bytes(n)}" for name, n in engines.items())
            + " (score holds none: the question runs on prefill_chunk)"
            + ("; decode runs on prefill_chunk (--decode-on-prefill)" if i.decode_on_prefill else "")
        )

    # --- activations: the largest of the phases (they never overlap), with each engine's I/O --------
    timestamp_queries = 0 if on_host else min(i.chunk_groups, groups) * ts  # the streaming rule has none
    # The prefill_chunk engine also runs the question (new tokens: the suffix) on the all-sparse scoring
    # cache, every row visible; with --decode-on-prefill it decodes over the decode region too. TensorRT
    # sizes one scratch for its whole profile, widened to cover those (module docstring).
    widest_past = t.decode_region if i.decode_on_prefill else t.scoring
    chunk_tokens, past_tokens = max(chunk_tokens, i.suffix_tokens), max(past_tokens, widest_past)
    visible_past = max(visible_past, widest_past)
    prefill_engine_act = prefill_activation_bytes(
        cfg, chunk_tokens=chunk_tokens, past_tokens=past_tokens, visible_past=visible_past,
        timestamp_queries=timestamp_queries, dtype_bytes=b, plugins=i.plugins,
    ) + cfg.vocab_size * 4  # last-position logits (the chunk's KV is written into the dense tier in place)
    query_io = query_io_bytes(cfg, chunk_tokens=chunk_tokens, dtype_bytes=b)  # written by prefill_chunk, read by score
    prefill_act = prefill_engine_act + query_io
    vision_frames = min(i.vision_batch_frames, groups * cfg.frames_per_group)
    vision_act = vision_activation_bytes(cfg, frames=vision_frames, dtype_bytes=b) + (
        vision_frames * 3 * cfg.image_size**2 * PIXEL_BYTES)  # the pixel input buffer
    # question scoring: the question as a chunk on prefill_chunk, then the weightless score graph on its
    # queries (query io) and keys (in the decode region, after the scoring cache); one scratch for both
    score_graph_act = score_activation_bytes(cfg, new_tokens=i.suffix_tokens, past_tokens=t.scoring, dtype_bytes=b)
    score_act = max(prefill_engine_act, score_graph_act) + query_io + t.scoring * 4  # + the attention mass
    decode_act = decode_activation_bytes(cfg, new_tokens=i.suffix_tokens, past_tokens=t.decode_region, dtype_bytes=b) + (
        cfg.vocab_size * 4)  # logits
    phases = {"prefill chunk": prefill_act, "vision batch": vision_act, "question scoring": score_act, "suffix decode": decode_act}
    if i.decode_on_prefill:  # decode runs on the prefill engine: its activations are the prefill's
        del phases["suffix decode"]
        phases["prefill chunk and decode"] = phases.pop("prefill chunk")
    largest = max(phases, key=phases.get)

    if on_host:
        video = PlanItem("video KV region", "device", t.offloaded_video * kvpt, t.offloaded_video,
                         f"per layer [sparse tier {t.sparse:,} | resident dense {t.resident:,} | staging {t.staging:,}] rows; "
                         "the prefill reads its past in the resident rows, questions stage their blocks")
    else:
        video = PlanItem("video KV region", "device", t.video * kvpt, t.video,
                         f"per layer [sparse tier {t.sparse:,} | dense tier {t.dense:,}] rows; "
                         f"the prefill reads its past there in place")
    items = (
        PlanItem("weights", "device", weights, None, weights_detail),
        PlanItem("activations", "device", phases[largest], None,
                 f"largest phase: {largest} ({', '.join(f'{k} {format_bytes(v)}' for k, v in phases.items())}); "
                 f"prefill chunk and question scoring with prefill_chunk's query outputs ({format_bytes(query_io)} of io, "
                 f"{chunk_tokens:,} tokens x {cfg.num_hidden_layers} layers), which score reads in place"),
        video,
        PlanItem("decode KV region", "device", t.decode_region * kvpt, t.decode_region,
                 f"scoring cache ({t.scoring:,} rows), then in the same rows the decode cache: "
                 f"{t.dense_video_blocks} dense blocks + the rest sparse + {i.suffix_tokens + i.max_new_tokens} suffix/answer"),
    )
    if on_host:
        items += (PlanItem("dense KV tier", "host", t.dense * kvpt, t.dense,
                           "pinned; each chunk's rows copied out once, the chosen blocks' rows copied back per question"),)
    host = sum(x.nbytes for x in items if x.where == "host")
    device = sum(x.nbytes for x in items if x.where == "device") + (host if i.unified_memory else 0)
    host_fits = i.host_budget_bytes is None or i.unified_memory or host <= i.host_budget_bytes
    return MemoryPlan(
        config=cfg, inputs=i, items=items, tokens=t, prompt_tokens=t.dense + i.suffix_tokens,
        kv_bytes_per_token=kvpt, device_bytes=device, fits=device <= i.budget_bytes and host_fits, host_bytes=host,
    )


# --- advice: every suggestion is checked by planning again ---------------------------------------
def _fits(cfg: VideoXLConfig, inputs: PlanInputs, **changes) -> bool:
    return _plan(cfg, dataclasses.replace(inputs, **changes)).fits


def max_frames_that_fit(cfg: VideoXLConfig, inputs: PlanInputs, **changes) -> int:
    """The largest multiple of 4 frames, at most ``inputs.frames``, that fits (0 if none)."""
    per_group = cfg.frames_per_group
    low, high = 0, math.ceil(inputs.frames / per_group)  # in groups; plans grow with the group count
    while low < high:
        mid = (low + high + 1) // 2
        if _fits(cfg, inputs, frames=mid * per_group, **changes):
            low = mid
        else:
            high = mid - 1
    return min(low * per_group, inputs.frames)


def _advise(cfg: VideoXLConfig, plan: MemoryPlan) -> tuple[list[str], int | None]:
    i = plan.inputs
    over = plan.device_bytes - i.budget_bytes
    where = "device + host" if i.unified_memory else "the device"
    advice = []
    if over > 0:
        advice.append(f"{where} need{'s' if not i.unified_memory else ''} {format_bytes(plan.device_bytes)}, {format_bytes(over)} over the budget")
    if i.host_budget_bytes is not None and not i.unified_memory and plan.host_bytes > i.host_budget_bytes:
        advice.append(f"the pinned dense tier needs {format_bytes(plan.host_bytes)} of host memory, "
                      f"{format_bytes(plan.host_bytes - i.host_budget_bytes)} more than the {format_bytes(i.host_budget_bytes)} free")

    weights = plan.item("weights").nbytes
    if weights >= i.budget_bytes:
        advice.append(f"the weights alone need {format_bytes(weights)}: no frame count fits")
    best = max_frames_that_fit(cfg, i)
    if best > 0:
        advice.append(f"lower --max-frames to {best} (the most that fits with these settings)")
    top = min(i.dense_blocks, plan.num_blocks)  # more than every block changes nothing
    if i.dense_tier == "device" and not i.unified_memory:
        host = _plan(cfg, dataclasses.replace(i, dense_tier="host"))
        flag = "--dense-tier host (with --prefill-rule streaming)"
        if host.fits:
            advice.append(f"keep the dense tier in pinned host memory, {flag}: all {i.frames} frames fit, "
                          f"{format_bytes(host.host_bytes)} pinned")
        elif (n := max_frames_that_fit(cfg, i, dense_tier="host")) > best:
            advice.append(f"keep the dense tier in pinned host memory, {flag}: {n} frames fit")
    if top > 0 and _fits(cfg, i, dense_blocks=0):
        low, high = 0, top - 1  # the largest k that fits; plans grow with k
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if _fits(cfg, i, dense_blocks=mid) else (low, mid - 1)
        advice.append(f"lower --dense-blocks to {low}: all {i.frames} frames fit")
    if i.dtype_bytes > 2:
        if _fits(cfg, i, dtype_bytes=2):
            advice.append(f"use fp16 KV (--kv-dtype fp16): all {i.frames} frames fit")
        elif (n := max_frames_that_fit(cfg, i, dtype_bytes=2)) > best:
            advice.append(f"use fp16 KV (--kv-dtype fp16): {n} frames fit")
    if i.weights_bytes is None:
        order = list(FORMATS)
        current = order.index(i.weights.name) if i.weights is not None else 0
        for name in order[current + 1 :]:
            fmt = WeightFormat.parse(name)
            if _fits(cfg, i, weights=fmt, weight_dtype_bytes=min(i.weight_dtype_bytes, 2)):
                advice.append(f"{fmt} weights (--weights {name}; export with `videoxl export --weights {name}`) fit all {i.frames} frames")
                break
            if (n := max_frames_that_fit(cfg, i, weights=fmt, weight_dtype_bytes=min(i.weight_dtype_bytes, 2))) > best:
                advice.append(f"{fmt} weights (--weights {name}) fit {n} frames")
    return advice, (best if best > 0 else None)


# --- KV regions of the TensorRT backend -----------------------------------------------------------
@dataclass(frozen=True)
class KVRows:
    """Row capacities of the two KV regions, per layer, and what they were sized for.

    With the dense tier in host memory (``host`` > 0) the video region is [sparse | resident |
    staging] and ``host`` dense rows live in pinned host memory.
    """

    video: int  # [sparse tier | dense tier] of a video of `frames` frames (or [sparse | resident | staging])
    decode: int  # the scoring cache, then the decode cache, in the same rows
    frames: int
    dense_blocks: int  # task-aware top-k the decode region was sized for (first and last blocks on top)
    sparse: int = 0  # with the dense tier in host memory: the sparse tier's rows in the video region
    resident: int = 0  # ... the resident dense rows after them
    staging: int = 0  # ... the staging rows after those
    host: int = 0  # dense rows in pinned host memory (0: the dense tier is on the device)

    def nbytes(self, layers: int, row_bytes: int) -> int:
        """Device bytes of the two regions."""
        return sum(KVSlabs.nbytes(layers, rows, row_bytes) for rows in (self.video, self.decode))

    def host_nbytes(self, layers: int, row_bytes: int) -> int:
        """Pinned host bytes of the dense tier (0 when it is on the device)."""
        return KVSlabs.nbytes(layers, self.host, row_bytes) if self.host else 0


def kv_rows_for(config: VideoXLConfig, limits: dict[str, int], frames: int, *, dense_blocks: int, dense_tier: str = "device") -> KVRows:
    """KV rows one request of ``frames`` frames needs, from the memory planner's token arithmetic.

    ``limits`` are the engines' build limits (manifest): timestamp, prefix, suffix and answer
    tokens, chunk and window are the upper bounds the engines were built for.
    """
    t = kv_tokens(
        config, frames=frames, block_groups=config.block_groups, dense_blocks=dense_blocks,
        timestamp_tokens_per_group=limits["timestamp_tokens"], prefix_tokens=limits["prefix_tokens"],
        suffix_tokens=limits["suffix_tokens"], max_new_tokens=limits["answer_tokens"],
        chunk_groups=limits.get("chunk_groups"), window_chunks=limits.get("window_chunks"),
    )
    if dense_tier == "host":
        return KVRows(video=t.offloaded_video, decode=t.decode_region, frames=frames, dense_blocks=dense_blocks,
                      sparse=t.sparse, resident=t.resident, staging=t.staging, host=t.dense)
    return KVRows(video=t.video, decode=t.decode_region, frames=frames, dense_blocks=dense_blocks)


def fit_kv_rows(
    config: VideoXLConfig, limits: dict[str, int], *, available_bytes: int, row_bytes: int, dense_blocks: int,
    dense_tier: str = "device", host_bytes: int | None = None,
) -> tuple[int, KVRows]:
    """The most frames (<= the engines' limit) whose KV regions fit, and the rows to allocate.

    The video region is fixed by the frame count; bytes left beyond that request go to the decode
    region (more dense blocks fit), up to what an all-dense request at the frame limit would use.
    With ``dense_tier="host"`` the dense tier must also fit ``host_bytes`` of pinned host memory.
    """
    layers, per_group = config.num_hidden_layers, config.frames_per_group

    def rows_for(frames: int, top_k: int = dense_blocks) -> KVRows:
        return kv_rows_for(config, limits, frames, dense_blocks=top_k, dense_tier=dense_tier)

    def need(frames: int) -> int:
        return rows_for(frames).nbytes(layers, row_bytes)

    def fits(frames: int) -> bool:
        host_ok = host_bytes is None or rows_for(frames).host_nbytes(layers, row_bytes) <= host_bytes
        return need(frames) <= available_bytes and host_ok

    low, high = 0, math.ceil(limits["max_frames"] / per_group)
    while low < high:  # in groups; the rows grow with the group count
        mid = (low + high + 1) // 2
        if fits(mid * per_group):
            low = mid
        else:
            high = mid - 1
    frames = min(low * per_group, limits["max_frames"])
    if frames == 0:
        missing = need(per_group) - available_bytes
        if missing <= 0:
            pinned = rows_for(per_group).host_nbytes(layers, row_bytes)
            raise ArenaOverflowError(
                f"the dense KV tier of even one group of {per_group} frames needs {format_bytes(pinned)} of pinned host "
                f"memory, {format_bytes(host_bytes or 0)} is free; free host memory or use --dense-tier device"
            )
        raise ArenaOverflowError(
            f"the KV regions for even one group of {per_group} frames need {format_bytes(need(per_group))} but the arena "
            f"has {format_bytes(available_bytes)} left after weights, activations and I/O: {missing} bytes "
            f"({format_bytes(missing)}) missing; raise --gpu-memory-budget"
        )
    rows = rows_for(frames)
    ceiling = rows_for(limits["max_frames"], 10**9)
    spare = available_bytes - rows.nbytes(layers, row_bytes)
    extra = max(0, spare // (2 * layers * row_bytes) - 1)  # rows of K and V in every layer, minus alignment
    return frames, dataclasses.replace(rows, decode=min(rows.decode + extra, max(ceiling.decode, rows.decode)))


# --- CLI -----------------------------------------------------------------------------------------
def load_plan_config(source: str) -> VideoXLConfig:
    """'real' (the released 8B), a checkpoint directory, or an ONNX/engine directory."""
    if source == "real":
        return VideoXLConfig()
    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{source}: no config.json (give a checkpoint, ONNX or engine directory, or 'real')")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if isinstance(raw, dict) and "model_type" in raw:  # a Hugging Face checkpoint's config.json
        return VideoXLConfig.from_hf_dict(raw, source=str(path))
    try:
        return VideoXLConfig.from_dict(raw)
    except TypeError as err:
        raise ConfigError(f"{path}: neither a checkpoint config nor a videoxl config ({err})") from err


def _dense_blocks_arg(value: str) -> int:
    return 10**9 if value == "all" else int(value)


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="does a video of N frames fit in this much GPU memory? (no GPU needed)",
        description="Plan weights, activations, the two KV regions (video: sparse + dense tier; decode) and, when it "
                    "must leave the device, the pinned dense tier of one request against a memory budget.",
    )
    p.add_argument("--config", required=True, metavar="DIR|real", help="checkpoint, ONNX or engine directory, or 'real' (Video-XL-2 8B)")
    p.add_argument("--frames", required=True, type=int, metavar="N")
    p.add_argument("--gpu-memory-budget", required=True, type=parse_bytes, metavar="BYTES", help="e.g. 80GiB, 24GB")
    p.add_argument("--unified-memory", action="store_true", help="host and device share the budget (Jetson)")
    p.add_argument("--dense-blocks", type=_dense_blocks_arg, default=4, metavar="K|all", help="task-aware top-K dense blocks (default 4)")
    p.add_argument("--kv-dtype", choices=tuple(KV_DTYPE_BYTES), default="fp16")
    p.add_argument("--weights", default=None, metavar="fp|int8|int4",
                   help="weight format of the export (videoxl export --weights): int8/int4 linears at their real bytes "
                        "with scales, embeddings and vision in the KV dtype (default: every weight in the KV dtype)")
    p.add_argument("--block-size", type=int, default=None, metavar="N", help="int4 block size (default 128)")
    p.add_argument("--weights-bytes", type=parse_bytes, metavar="BYTES", help="measured weight size (overrides the estimate)")
    p.add_argument("--chunk-groups", type=int, metavar="C")
    p.add_argument("--window", type=int, dest="window_chunks", metavar="P")
    p.add_argument("--block-groups", type=int, metavar="S")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--timestamp-tokens", type=int, default=6, help="tokens of 'Time 12.5s:' per group")
    p.add_argument("--dense-tier", choices=DENSE_TIERS, default="auto",
                   help="where the dense KV tier lives: device, host (pinned; needs --prefill-rule streaming), or auto: "
                        "the device when everything fits there, else the host (default: %(default)s)")
    p.add_argument("--host-memory", type=parse_bytes, default=None, metavar="BYTES",
                   help="host memory the pinned dense tier may take (default: what this machine has free)")
    p.add_argument("--plugins", action=argparse.BooleanOptionalAction, default=True,
                   help="the engines use the videoxl plugins (videoxl build's default); --no-plugins: the inlined "
                        "ONNX bodies, whose prefill holds one layer's timestamp-query attention over the whole past")
    p.add_argument("--decode-on-prefill", action="store_true",
                   help="engines built with `videoxl build --decode-on-prefill`: no decode engine (one LLM weight copy "
                        "fewer), decode runs on the prefill_chunk engine at its widened profile")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    from videoxl.runtime.kv_store import available_host_bytes

    plan = plan_memory(
        load_plan_config(args.config), frames=args.frames, budget_bytes=args.gpu_memory_budget,
        chunk_groups=args.chunk_groups, window_chunks=args.window_chunks, block_groups=args.block_groups,
        dense_blocks=args.dense_blocks, dtype_bytes=KV_DTYPE_BYTES[args.kv_dtype],
        unified_memory=args.unified_memory, weights_bytes=args.weights_bytes,
        weights=None if args.weights is None else WeightFormat.parse(args.weights, args.block_size),
        max_new_tokens=args.max_new_tokens, timestamp_tokens_per_group=args.timestamp_tokens,
        dense_tier=args.dense_tier, plugins=args.plugins, decode_on_prefill=args.decode_on_prefill,
        host_budget_bytes=args.host_memory if args.host_memory is not None else available_host_bytes(),
    )
    print(plan.table())
    return 0 if plan.fits else 1
