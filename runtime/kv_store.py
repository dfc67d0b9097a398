"""Two-tier KV store for bi-level decoding (DESIGN §3, §4): the plans, not the tensors.

    dense tier   every prompt row before the question,      row = position, key rotated there
    sparse tier  every video block: timestamp rows kept,     pooled keys kept before RoPE
                 visual rows average-pooled x4
    decode cache chosen blocks dense + the rest sparse,      rotated at 0..M-1, grows while decoding

The backend holds the tensors (`videoxl.backend`): one allocation per layer holds
[sparse tier | dense tier], so one BilevelKVGather reads both. This module is pure bookkeeping
(integers and index arrays, tested on the CPU): which rows a block pools into, which rows make a
decode cache, and when a block is complete during the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from videoxl.backend import Backend, DecodeCache, GatherPlan, VideoCache
from videoxl.config import VideoXLConfig
from videoxl.engines.profiles import format_bytes
from videoxl.graphs import kv_bytes
from videoxl.layout import ChunkVisibility, TokenLayout, block_ranges, groups_in

__all__ = ["HostMemoryError", "TwoTierKVStore", "available_host_bytes", "check_host_memory", "kv_bytes", "sparse_tier_tokens"]


class HostMemoryError(MemoryError):
    """A request's KV cache would not fit the host memory; raised before any work."""


def available_host_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max" and available is not None:
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def sparse_tier_tokens(layout: TokenLayout, stride: int) -> int:
    """Rows of the sparse tier: every group's timestamp rows plus its visual rows pooled by `stride`."""
    stamp = layout.group_visual_starts - layout.group_starts
    visual = layout.group_ends - layout.group_visual_starts
    return int((stamp + visual // stride).sum())


def check_host_memory(
    config: VideoXLConfig, layout: TokenLayout, *, block_groups: int, dense_blocks: int | None, itemsize: int,
    answer_tokens: int = 320, available_bytes: int | None = None,
) -> int:
    """Bytes the KV cache of this prompt will take on the host; HostMemoryError if that is over what is free.

    dense tier + sparse tier + twice the decode cache (a question's scoring cache, at most as
    large, may still be alive while its decode cache is built). The decode cache holds the sparse tier plus up to `dense_blocks` task-aware and the
    three always-dense blocks in full (None: every block dense), plus `answer_tokens` rows for
    the question and the answer.
    """
    groups = len(layout.group_starts)
    group_rows = (layout.suffix_start - layout.prefix_len) / max(groups, 1)  # ~150: "Time t s:" + 144 visual
    sparse_rows = sparse_tier_tokens(layout, config.kv_pool_stride) / max(groups, 1)

    def need(g: int) -> tuple[int, int, int, int]:
        """(bytes, dense, sparse, decode rows) for g groups of this layout's shape."""
        dense, sparse = layout.prefix_len + round(g * group_rows), round(g * sparse_rows)
        full_blocks = layout.prefix_len + min(g, (3 + dense_blocks) * block_groups) * group_rows if dense_blocks is not None else dense
        mixed = min(dense, round(sparse + full_blocks)) + answer_tokens
        return kv_bytes(config, dense + sparse + 2 * mixed, itemsize), dense, sparse, mixed

    total, dense, sparse, mixed = need(groups)
    available = available_host_bytes() if available_bytes is None else available_bytes
    if available is not None and total > available:
        fitting = max((g for g in range(groups) if need(g)[0] <= available), default=0)
        raise HostMemoryError(
            f"{groups * config.frames_per_group} frames need about {format_bytes(total)} of host memory for the KV "
            f"cache ({dense:,} dense rows, {sparse:,} sparse rows, a decode cache of up to {mixed:,} rows); "
            f"{format_bytes(available)} is free. "
            + (f"Lower --max-frames to {fitting * config.frames_per_group}" if fitting else
               f"Even no frames fit with room for {answer_tokens:,} question and answer tokens: lower --max-new-tokens")
            + ("" if dense_blocks is not None and dense_blocks <= 4 else " or use fewer --dense-blocks")
        )
    return total


@dataclass
class _SparseRows:
    """One video block's rows in the sparse tier: [start, end), and its groups' row plan."""

    start: int
    end: int
    copies: list[tuple[int, int, int]]  # (dense_start, dense_end, sparse_start): timestamp rows
    pools: list[tuple[int, int, int]]  # (dense_start, dense_end, sparse_start): visual rows, pooled


class TwoTierKVStore:
    """One video's KV: the backend's cache plus the block plan; fills itself during the prefill.

    Questions read it and never change it, so one prepared video answers any number of them.
    """

    def __init__(self, backend: Backend, config: VideoXLConfig, layout: TokenLayout, *, block_groups: int) -> None:
        self.backend, self.config, self.layout = backend, config, layout
        self.stride = config.kv_pool_stride
        self.block_groups = block_groups
        self.blocks = block_ranges(layout, block_groups)
        self.sparse_plan = self._plan_sparse_rows()
        self.sparse_rows = self.sparse_plan[-1].end if self.sparse_plan else 0
        self.cache: VideoCache = backend.new_video_cache(dense_rows=layout.suffix_start, sparse_rows=self.sparse_rows)
        self.filled = 0
        self._pooled_blocks = 0  # video blocks 1..n already in the sparse tier

    def _plan_sparse_rows(self) -> list[_SparseRows]:
        layout, plans, cursor = self.layout, [], 0
        for start, end in self.blocks[1:]:
            block_start, copies, pools = cursor, [], []
            for ts_start, vis_start, g_end in groups_in(layout, start, end):
                copies.append((ts_start, vis_start, cursor))
                cursor += vis_start - ts_start
                pools.append((vis_start, g_end, cursor))
                cursor += (g_end - vis_start) // self.stride
            plans.append(_SparseRows(block_start, cursor, copies, pools))
        return plans

    # --- prefill ----------------------------------------------------------------------------
    def prefill_chunk(self, input_ids: np.ndarray, visual_embeds: np.ndarray, vis: ChunkVisibility) -> np.ndarray:
        """Run one chunk in order; blocks the chunk completes are pooled into the sparse tier."""
        if vis.start != self.filled:
            raise RuntimeError(f"prefill chunk starts at row {vis.start} but {self.filled} rows are filled")
        logits = self.backend.prefill_chunk(self.cache, input_ids, visual_embeds, vis)
        self.filled = vis.end
        while self._pooled_blocks < len(self.sparse_plan) and self.blocks[self._pooled_blocks + 1][1] <= self.filled:
            self.backend.gather(self.cache, self.pool_plan(self._pooled_blocks + 1))
            self._pooled_blocks += 1
        return logits

    def pool_plan(self, block: int) -> GatherPlan:
        """Video block `block` (>= 1) into its sparse rows: timestamp rows copied, visual rows averaged
        over `stride` neighbours; keys un-rotated (target position 0: the official pools before RoPE)."""
        rows = self.sparse_plan[block - 1]
        stride, base = self.stride, self.sparse_rows  # dense row p is source row base + p
        index, weight = [], []
        for start, end, _ in rows.copies:
            index.append(np.repeat(np.arange(start, end, dtype=np.int64)[:, None], stride, axis=1))
            weight.append(np.eye(1, stride, dtype=np.float32).repeat(end - start, axis=0))
        for start, end, _ in rows.pools:
            index.append(np.arange(start, end, dtype=np.int64).reshape(-1, stride))
            weight.append(np.full(((end - start) // stride, stride), 1.0 / stride, np.float32))
        order = np.argsort([at for *_, at in rows.copies + rows.pools], kind="stable")  # sparse-row order
        gather_index = np.concatenate([index[i] for i in order]) + base
        return GatherPlan(gather_index, np.concatenate([weight[i] for i in order]), np.zeros(len(gather_index), np.int64), rows.start)

    # --- bi-level rebuild -------------------------------------------------------------------
    def decode_plan(self, dense_blocks: set[int]) -> tuple[GatherPlan, list[tuple[int, int]]]:
        """Chosen blocks' dense rows and the other blocks' sparse rows, in order, rotated at 0..M-1.

        Returns the plan and each block's row range in the decode cache.
        """
        if self.filled != self.layout.suffix_start:
            raise RuntimeError(f"prefill incomplete: {self.filled} of {self.layout.suffix_start} tokens")
        parts, bounds, cursor = [], [], 0
        for b, (start, end) in enumerate(self.blocks):
            if b in dense_blocks:
                rows = np.arange(self.sparse_rows + start, self.sparse_rows + end, dtype=np.int64)
            else:
                rows = np.arange(self.sparse_plan[b - 1].start, self.sparse_plan[b - 1].end, dtype=np.int64)
            parts.append(rows)
            bounds.append((cursor, cursor + len(rows)))
            cursor += len(rows)
        index = np.concatenate(parts)[:, None]
        return GatherPlan(index, np.ones(index.shape, np.float32), np.arange(len(index), dtype=np.int64), 0), bounds

    def build_decode_cache(self, dense_blocks: set[int], *, extra_capacity: int) -> tuple[DecodeCache, list[tuple[int, int]]]:
        """A decode cache with the chosen blocks dense and room for `extra_capacity` more rows."""
        plan, bounds = self.decode_plan(dense_blocks)
        cache = self.backend.new_decode_cache(plan.rows + extra_capacity)
        self.backend.gather(self.cache, plan, into=cache)
        return cache, bounds

    # --- persistence ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of both tiers, wherever the backend keeps them."""
        return kv_bytes(self.config, self.cache.sparse_rows + self.cache.dense_rows, self.backend.float_dtype.itemsize)

    def state(self) -> dict[str, np.ndarray]:
        """Host copies of both tiers by a stable name ('key.{layer}', 'value.{layer}': [sparse | dense] rows).

        With `from_state` this is the only way a prepared video leaves the process: callers never
        read the tiers themselves, so the store's internals may change under them.
        """
        if self.filled != self.layout.suffix_start:
            raise RuntimeError(f"prefill incomplete: {self.filled} of {self.layout.suffix_start} tokens")
        return self.cache.arrays()

    @classmethod
    def from_state(
        cls, backend: Backend, config: VideoXLConfig, layout: TokenLayout, *, block_groups: int, state: dict[str, np.ndarray]
    ) -> "TwoTierKVStore":
        """A complete store on `backend` from `state()`'s arrays; ValueError on a mismatch."""
        store = cls(backend, config, layout, block_groups=block_groups)
        shape = (store.cache.sparse_rows + store.cache.dense_rows, config.num_key_value_heads, config.head_dim)
        for layer in range(config.num_hidden_layers):
            for name in (f"key.{layer}", f"value.{layer}"):
                array = state.get(name)
                if array is None or array.shape != shape or array.dtype != backend.float_dtype:
                    found = None if array is None else f"{array.dtype}{list(array.shape)}"
                    raise ValueError(f"KV state {name}: expected {backend.float_dtype}{list(shape)}, found {found}")
        store.cache.load(state)
        store.filled = layout.suffix_start
        store._pooled_blocks = len(store.sparse_plan)
        return store
