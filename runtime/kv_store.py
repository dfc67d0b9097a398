"""Two-tier KV store for bi-level decoding (DESIGN §3, §4).

    dense tier   every prefill token, keys before RoPE        host memory (pinned on a GPU)
    sparse tier  every video block: timestamp rows kept,      resident (device on a GPU)
                 visual rows average-pooled x4
    mixed cache  chosen blocks reloaded dense + the rest      rotated at 0..M-1, grows while decoding
                 sparse, built by BilevelKVGather

All buffers are allocated once, from the token counts the layout gives; decoding writes into
preallocated capacity and never allocates per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from videoxl.config import VideoXLConfig
from videoxl.engines.profiles import format_bytes
from videoxl.layout import TokenLayout, block_ranges, groups_in
from videoxl.runtime.backend import Backend


def kv_bytes(config: VideoXLConfig, tokens: int, itemsize: int) -> int:
    """Bytes of K and V for `tokens` tokens over all layers."""
    return tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * itemsize


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

    dense tier + sparse tier + twice the decode cache (building it concatenates the source rows
    first). The decode cache holds the sparse tier plus up to `dense_blocks` task-aware and the
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
            f"{format_bytes(available)} is free. Lower --max-frames to {fitting * config.frames_per_group}"
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


class MixedKV:
    """The decode cache: preallocated capacity, `length` rows valid."""

    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], capacity: int, block_bounds, dense_blocks) -> None:
        rows = keys[0].shape[0]
        shape = (capacity,) + keys[0].shape[1:]
        self.keys = [np.empty(shape, keys[0].dtype) for _ in keys]
        self.values = [np.empty(shape, values[0].dtype) for _ in values]
        for layer in range(len(keys)):
            self.keys[layer][:rows], self.values[layer][:rows] = keys[layer], values[layer]
        self.length, self.capacity = rows, capacity
        self.block_bounds, self.dense_blocks = block_bounds, frozenset(dense_blocks)

    def views(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [k[: self.length] for k in self.keys], [v[: self.length] for v in self.values]

    def append(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        count = keys[0].shape[0]
        if self.length + count > self.capacity:
            raise RuntimeError(f"mixed cache full: {self.length} + {count} > capacity {self.capacity}")
        for layer in range(len(keys)):
            self.keys[layer][self.length : self.length + count] = keys[layer]
            self.values[layer][self.length : self.length + count] = values[layer]
        self.length += count


class TwoTierKVStore:
    def __init__(self, config: VideoXLConfig, layout: TokenLayout, *, block_groups: int, dtype: np.dtype) -> None:
        self.config, self.layout, self.dtype = config, layout, np.dtype(dtype)
        self.stride = config.kv_pool_stride
        self.blocks = block_ranges(layout, block_groups)
        tokens = layout.suffix_start
        shape = (tokens, config.num_key_value_heads, config.head_dim)
        layers = config.num_hidden_layers
        self.dense_keys = [np.empty(shape, self.dtype) for _ in range(layers)]
        self.dense_values = [np.empty(shape, self.dtype) for _ in range(layers)]
        self.filled = 0
        self.sparse_rows = self._plan_sparse_rows()
        sparse_tokens = self.sparse_rows[-1].end if self.sparse_rows else 0
        sparse_shape = (sparse_tokens,) + shape[1:]
        self.sparse_keys = [np.empty(sparse_shape, self.dtype) for _ in range(layers)]
        self.sparse_values = [np.empty(sparse_shape, self.dtype) for _ in range(layers)]
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
    def past(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [k[: self.filled] for k in self.dense_keys], [v[: self.filled] for v in self.dense_values]

    def append(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        count = keys[0].shape[0]
        for layer in range(len(keys)):
            self.dense_keys[layer][self.filled : self.filled + count] = keys[layer]
            self.dense_values[layer][self.filled : self.filled + count] = values[layer]
        self.filled += count
        while self._pooled_blocks < len(self.sparse_rows) and self.blocks[self._pooled_blocks + 1][1] <= self.filled:
            self._pool_block(self.sparse_rows[self._pooled_blocks])
            self._pooled_blocks += 1

    def _pool_block(self, rows: _SparseRows) -> None:
        """Timestamp rows copied, visual rows averaged over `stride` neighbours (before RoPE)."""
        for dense, sparse in ((self.dense_keys, self.sparse_keys), (self.dense_values, self.sparse_values)):
            for layer in range(len(dense)):
                for start, end, at in rows.copies:
                    sparse[layer][at : at + end - start] = dense[layer][start:end]
                for start, end, at in rows.pools:
                    visual = dense[layer][start:end].astype(np.float32)
                    pooled = visual.reshape(-1, self.stride, *visual.shape[1:]).sum(axis=1) * (1.0 / self.stride)
                    sparse[layer][at : at + (end - start) // self.stride] = pooled

    # --- bi-level rebuild -------------------------------------------------------------------
    def build_mixed(self, backend: Backend, dense_blocks: set[int], *, extra_capacity: int) -> MixedKV:
        """Reload the chosen blocks' dense rows, gather them with the sparse tier, rotate at 0..M-1.

        Source rows for BilevelKVGather: [sparse tier | reloaded dense rows]; each mixed row takes
        one source row (weight 1): the pooling already happened when the sparse tier was filled.
        """
        if self.filled != self.layout.suffix_start:
            raise RuntimeError(f"prefill incomplete: {self.filled} of {self.layout.suffix_start} tokens")
        reload = [(b, self.blocks[b]) for b in sorted(dense_blocks)]
        sparse_tokens = self.sparse_keys[0].shape[0]
        index_parts, bounds, reload_offsets, cursor = [], [], {}, sparse_tokens
        for b, (start, end) in reload:
            reload_offsets[b] = cursor
            cursor += end - start
        mixed_rows = 0
        for b, (start, end) in enumerate(self.blocks):
            if b in dense_blocks:
                rows = np.arange(reload_offsets[b], reload_offsets[b] + end - start)
            else:
                plan = self.sparse_rows[b - 1]
                rows = np.arange(plan.start, plan.end)
            index_parts.append(rows)
            bounds.append((mixed_rows, mixed_rows + len(rows)))
            mixed_rows += len(rows)
        gather_index = np.concatenate(index_parts).astype(np.int64)[:, None]
        gather_weight = np.ones_like(gather_index, dtype=np.float32)
        layers = range(self.config.num_hidden_layers)
        source_k = [np.concatenate([self.sparse_keys[i]] + [self.dense_keys[i][s:e] for _, (s, e) in reload]) for i in layers]
        source_v = [np.concatenate([self.sparse_values[i]] + [self.dense_values[i][s:e] for _, (s, e) in reload]) for i in layers]
        keys, values = backend.gather_kv_layers(source_k, source_v, gather_index, gather_weight)
        return MixedKV(keys, values, mixed_rows + extra_capacity, bounds, dense_blocks)

    # --- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Every array a question needs from a complete store (the tiers), by a stable name.

        With `from_state` this is the only way a prepared video leaves the process: callers never
        read the tiers' attributes, so the store's internals may change under them.
        """
        if self.filled != self.layout.suffix_start:
            raise RuntimeError(f"prefill incomplete: {self.filled} of {self.layout.suffix_start} tokens")
        arrays: dict[str, np.ndarray] = {}
        for name in ("dense_keys", "dense_values", "sparse_keys", "sparse_values"):
            for layer, array in enumerate(getattr(self, name)):
                arrays[f"{name}.{layer}"] = array
        return arrays

    @classmethod
    def from_state(
        cls, config: VideoXLConfig, layout: TokenLayout, *, block_groups: int, dtype: np.dtype, state: dict[str, np.ndarray]
    ) -> "TwoTierKVStore":
        """A complete store from `state()`'s arrays (used as given, not copied); ValueError on a mismatch."""
        store = cls(config, layout, block_groups=block_groups, dtype=dtype)
        for name in ("dense_keys", "dense_values", "sparse_keys", "sparse_values"):
            planned = getattr(store, name)  # np.empty placeholders: their pages were never touched
            arrays = []
            for layer, empty in enumerate(planned):
                array = state.get(f"{name}.{layer}")
                if array is None or array.shape != empty.shape or array.dtype != store.dtype:
                    found = None if array is None else f"{array.dtype}{list(array.shape)}"
                    raise ValueError(f"KV state {name}.{layer}: expected {store.dtype}{list(empty.shape)}, found {found}")
                arrays.append(array)
            setattr(store, name, arrays)
        store.filled = layout.suffix_start
        store._pooled_blocks = len(store.sparse_rows)
        return store
