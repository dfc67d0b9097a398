"""Reference inference in PyTorch: dense or chunked prefill, dense or bi-level decoding.

Everything later (ONNX graphs, kernels, engines, the runtime loop) is checked against this.

    prefill (prefix + video)  -> DenseCache: per layer, keys before RoPE, rotated keys, values
    bi-level rebuild          -> MixedCache: chosen blocks dense, others pooled x4, rotated 0..M-1
    suffix + greedy decoding  -> tokens, streamed

Chunked prefill never builds an L x L mask: each chunk attends to a gathered past (prefix,
earlier timestamp tokens, the window of P previous chunks) plus itself, causally; only its
few timestamp queries attend to the whole history (DESIGN §2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from videoxl.config import VideoXLConfig
from videoxl.export.llm import apply_rope
from videoxl.export.model import VideoXLModel
from videoxl.layout import (
    ChunkVisibility,
    TokenLayout,
    all_blocks,
    block_ranges,
    chunk_visibility,
    explicit_dense_blocks,
    groups_in,
    num_chunks,
    prefix_visibility,
    select_dense_blocks,
)
from videoxl.sampling import GenerationConfig, next_token


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (Q, Hq, D), key/value (K, Hkv, D), visible (Q, K) bool -> out (Q, Hq, D), probs (Hq, Q, K)."""
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), k) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype), probs


def causal(num_queries: int, num_keys: int) -> torch.Tensor:
    """Queries are the last `num_queries` of `num_keys` positions."""
    past = num_keys - num_queries
    return torch.arange(num_keys)[None, :] <= (past + torch.arange(num_queries))[:, None]


@dataclass
class DenseCache:
    """Prefill output, token-major per layer: (L, Hkv, D)."""

    keys: list[torch.Tensor]  # before RoPE
    keys_rotated: list[torch.Tensor]  # at their original positions 0..L-1
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, cfg: VideoXLConfig, dtype: torch.dtype) -> "DenseCache":
        shape = (0, cfg.num_key_value_heads, cfg.head_dim)
        make = lambda: [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]  # noqa: E731
        return cls(make(), make(), make())

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[0])

    def append(self, layer: int, key: torch.Tensor, key_rotated: torch.Tensor, value: torch.Tensor) -> None:
        self.keys[layer] = torch.cat([self.keys[layer], key])
        self.keys_rotated[layer] = torch.cat([self.keys_rotated[layer], key_rotated])
        self.values[layer] = torch.cat([self.values[layer], value])


@dataclass
class MixedCache:
    """Decode cache: keys rotated at compacted positions 0..M-1, grown by decoded tokens."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_bounds: list[tuple[int, int]] = field(default_factory=list)
    dense_blocks: frozenset[int] = frozenset()

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[0])


class ChunkedAttention:
    """Attention for one prefill chunk with the visibility of DESIGN §2."""

    def __init__(self, cache: DenseCache, vis: ChunkVisibility, scale: float) -> None:
        self.cache, self.vis, self.scale = cache, vis, scale
        past = vis.start
        self.gathered = torch.from_numpy(
            np.concatenate(
                [np.arange(vis.prefix_len), vis.past_timestamp_index, np.arange(vis.window_start, past)]
            ).astype(np.int64)
        )
        self.is_timestamp = torch.from_numpy(vis.query_is_timestamp)

    def __call__(self, layer: int, query, key, value, key_rotated) -> torch.Tensor:
        cache, past, q_len = self.cache, self.vis.start, query.shape[0]
        past_k, past_v = cache.keys_rotated[layer], cache.values[layer]
        # Visual queries: gathered past (all visible) + own chunk (causal).
        k_vis = torch.cat([past_k[self.gathered], key_rotated])
        v_vis = torch.cat([past_v[self.gathered], value])
        visible = causal(q_len, q_len)
        visible = torch.cat([torch.ones(q_len, len(self.gathered), dtype=torch.bool), visible], dim=1)
        out, _ = attend(query, k_vis, v_vis, visible, self.scale)
        # Timestamp queries: the whole history.
        if bool(self.is_timestamp.any()):
            rows = self.is_timestamp.nonzero().flatten()
            k_all, v_all = torch.cat([past_k, key_rotated]), torch.cat([past_v, value])
            visible_all = causal(q_len, past + q_len)[rows]
            out_ts, _ = attend(query[rows], k_all, v_all, visible_all, self.scale)
            out = out.clone()
            out[rows] = out_ts
        cache.append(layer, key, key_rotated, value)
        return out


class DenseCausalAttention:
    """Plain causal attention against everything in the dense cache."""

    def __init__(self, cache: DenseCache, scale: float) -> None:
        self.cache, self.scale = cache, scale

    def __call__(self, layer: int, query, key, value, key_rotated) -> torch.Tensor:
        k = torch.cat([self.cache.keys_rotated[layer], key_rotated])
        v = torch.cat([self.cache.values[layer], value])
        out, _ = attend(query, k, v, causal(query.shape[0], k.shape[0]), self.scale)
        self.cache.append(layer, key, key_rotated, value)
        return out


class MixedCacheAttention:
    """Decode-time attention against the mixed cache; optionally sums attention mass per key."""

    def __init__(self, cache: MixedCache, scale: float, *, grow: bool, collect_mass: bool = False) -> None:
        self.cache, self.scale, self.grow = cache, scale, grow
        self.mass: torch.Tensor | None = None
        self.collect_mass = collect_mass

    def __call__(self, layer: int, query, key, value, key_rotated) -> torch.Tensor:
        k = torch.cat([self.cache.keys[layer], key_rotated])
        v = torch.cat([self.cache.values[layer], value])
        out, probs = attend(query, k, v, causal(query.shape[0], k.shape[0]), self.scale)
        if self.collect_mass:
            layer_mass = probs.sum(dim=(0, 1)).double()
            self.mass = layer_mass if self.mass is None else self.mass + layer_mass
        if self.grow:
            self.cache.keys[layer], self.cache.values[layer] = k, v
        return out


class ReferenceInference:
    """Drives a VideoXLModel through the three modes of the paper."""

    def __init__(self, model: VideoXLModel) -> None:
        self.model = model
        self.cfg = model.cfg
        self.scale = self.cfg.head_dim**-0.5

    # --- prefill --------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        layout: TokenLayout,
        visual_embeds: torch.Tensor,
        *,
        mode: str = "chunked",
        chunk_groups: int | None = None,
        window_chunks: int | None = None,
        rule: str = "evaluation",
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> DenseCache:
        """Prefix + video tokens -> DenseCache (the suffix is run later against the mixed cache).

        `rule`: who the timestamp queries of a chunk see (`videoxl.layout.PREFILL_RULES`).
        """
        cfg = self.cfg
        chunk_groups = chunk_groups or cfg.chunk_groups
        window_chunks = cfg.window_chunks if window_chunks is None else window_chunks
        image_token_id = int(layout.input_ids[layout.visual_positions[0]]) if layout.is_visual.any() else -1
        embeds = self.model.embed(torch.from_numpy(layout.input_ids[: layout.suffix_start]), visual_embeds, image_token_id=image_token_id)
        cache = DenseCache.empty(cfg, self.model.dtype)
        if mode == "dense":
            positions = torch.arange(layout.suffix_start)
            self.model.forward_hidden(embeds, positions, DenseCausalAttention(cache, self.scale))
            return cache
        if mode != "chunked":
            raise ValueError(f"prefill mode {mode!r} not in ('chunked', 'dense')")
        pieces = [prefix_visibility(layout)] + [
            chunk_visibility(layout, k, chunk_groups=chunk_groups, window_chunks=window_chunks, rule=rule)
            for k in range(num_chunks(layout, chunk_groups))
        ]
        for index, vis in enumerate(pieces):
            positions = torch.arange(vis.start, vis.end)
            self.model.forward_hidden(embeds[vis.start : vis.end], positions, ChunkedAttention(cache, vis, self.scale))
            if on_chunk:
                on_chunk(index, len(pieces))
        return cache

    # --- bi-level cache -------------------------------------------------------------------
    def mixed_cache(
        self, dense: DenseCache, layout: TokenLayout, *, block_groups: int, dense_blocks: set[int]
    ) -> MixedCache:
        """Dense blocks copied; other blocks keep timestamp KV and x4-pool visual KV (before RoPE)."""
        stride = self.cfg.kv_pool_stride
        # The block structure is the same in every layer: (token slice, pooled?) pieces, once.
        pieces: list[tuple[slice, bool]] = []
        bounds, cursor = [], 0
        for block, (start, end) in enumerate(block_ranges(layout, block_groups)):
            begin = cursor
            if block in dense_blocks:
                pieces.append((slice(start, end), False))
                cursor += end - start
            else:
                for ts_start, visual_start, group_end in groups_in(layout, start, end):
                    pieces += [(slice(ts_start, visual_start), False), (slice(visual_start, group_end), True)]
                    cursor += (visual_start - ts_start) + (group_end - visual_start) // stride
            bounds.append((begin, cursor))

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([_pool(tensor[s], stride) if pooled else tensor[s] for s, pooled in pieces])

        keys, values = [], []
        for layer in range(self.cfg.num_hidden_layers):
            k = gather(dense.keys[layer])
            keys.append(apply_rope(k, torch.arange(k.shape[0]), self.cfg.rope_theta))
            values.append(gather(dense.values[layer]))
        return MixedCache(keys, values, bounds, frozenset(dense_blocks))

    @torch.no_grad()
    def score_blocks(self, dense: DenseCache, layout: TokenLayout, *, block_groups: int) -> np.ndarray:
        """Task-aware block scores: attention mass of the suffix queries on each block's sparse KV.

        The scoring cache keeps only the prefix dense; every video block is pooled. The mass is
        summed over layers, heads and suffix queries.
        """
        scoring = self.mixed_cache(dense, layout, block_groups=block_groups, dense_blocks={0})
        attention = MixedCacheAttention(scoring, self.scale, grow=False, collect_mass=True)
        self._run_text(layout.input_ids[layout.suffix_start :], scoring.length, attention)
        mass = attention.mass.numpy()
        return np.array([mass[s:e].sum() for s, e in scoring.block_bounds])

    def choose_dense_blocks(
        self,
        dense: DenseCache,
        layout: TokenLayout,
        *,
        block_groups: int,
        selection: int | list[int] | str,
    ) -> tuple[set[int], np.ndarray | None]:
        """selection: top-k (int, task-aware), an explicit block list, or 'all'."""
        num_blocks = len(block_ranges(layout, block_groups))
        if selection == "all":
            return all_blocks(layout, block_groups), None
        if isinstance(selection, (list, tuple, set)):
            return explicit_dense_blocks(selection, num_blocks), None
        scores = self.score_blocks(dense, layout, block_groups=block_groups)
        return select_dense_blocks(scores, num_blocks=num_blocks, top_k=int(selection)), scores

    # --- decoding -------------------------------------------------------------------------
    def _run_text(self, ids: np.ndarray, start: int, attention) -> torch.Tensor:
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        embeds = self.model.model.embed_tokens(ids_t)
        positions = torch.arange(start, start + len(ids_t))
        return self.model.logits(self.model.forward_hidden(embeds, positions, attention)[-1])

    @torch.no_grad()
    def decode(
        self,
        cache: MixedCache,
        suffix_ids: np.ndarray,
        gen: GenerationConfig,
        *,
        stop_ids: frozenset[int],
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Run the suffix against the mixed cache, then decode one token at a time."""
        rng = np.random.default_rng(gen.seed)
        attention = MixedCacheAttention(cache, self.scale, grow=True)
        logits = self._run_text(suffix_ids, cache.length, attention)
        tokens: list[int] = []
        while True:
            token = next_token(logits.numpy(), gen, rng)
            if gen.stop_at_eos and token in stop_ids:
                break
            tokens.append(token)
            if on_token:
                on_token(token)
            if len(tokens) >= gen.max_new_tokens:
                break
            logits = self._run_text(np.array([token]), cache.length, attention)
        return tokens

    # --- everything -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        layout: TokenLayout,
        visual_embeds: torch.Tensor,
        gen: GenerationConfig,
        *,
        stop_ids: frozenset[int],
        prefill: str = "chunked",
        decode: str = "bilevel",
        dense_blocks: int | list[int] | str = 4,
        chunk_groups: int | None = None,
        window_chunks: int | None = None,
        block_groups: int | None = None,
        rule: str = "evaluation",
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[list[int], set[int], np.ndarray | None, dict[str, float]]:
        block_groups = block_groups or self.cfg.block_groups
        started = time.perf_counter()
        dense = self.prefill(layout, visual_embeds, mode=prefill, chunk_groups=chunk_groups, window_chunks=window_chunks, rule=rule)
        prefill_s = time.perf_counter() - started
        if decode == "dense":
            chosen, scores = all_blocks(layout, block_groups), None
        elif decode == "bilevel":
            chosen, scores = self.choose_dense_blocks(dense, layout, block_groups=block_groups, selection=dense_blocks)
        else:
            raise ValueError(f"decode mode {decode!r} not in ('bilevel', 'dense')")
        mixed = self.mixed_cache(dense, layout, block_groups=block_groups, dense_blocks=chosen)
        mixed_tokens = mixed.length
        started = time.perf_counter()
        tokens = self.decode(mixed, layout.input_ids[layout.suffix_start :], gen, stop_ids=stop_ids, on_token=on_token)
        decode_s = time.perf_counter() - started
        stats = {
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "dense_kv_tokens": float(dense.length),
            "mixed_kv_tokens": float(mixed_tokens),
        }
        return tokens, chosen, scores, stats


def _pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(n*stride, H, D) -> (n, H, D): average pool along tokens, kernel = stride."""
    tokens, heads, dim = x.shape
    pooled = F.avg_pool1d(x.float().reshape(tokens, heads * dim).T[None], stride, stride)[0].T
    return pooled.reshape(tokens // stride, heads, dim).to(x.dtype)
