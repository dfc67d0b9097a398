"""Where every token of a Video-XL-2 prompt sits, and who may see whom (DESIGN §1-§3).

Pure numpy bookkeeping shared by the PyTorch reference and the runtime. It never builds an
L x L mask: visibility is described by index ranges, exactly as the custom attention op and
its CUDA kernel take it.

Token stream::

    [ prefix ............ ][ g0: "Time 0.0s:" + 144 visual ][ g1: ... ] ... [ suffix ]
    0                prefix_len                                        suffix_start      L
                          |<-------- chunk 0 (C groups) ------->|<-- chunk 1 --> ...
                          |<-------- block 1 (S groups) ------->|<-- block 2 --> ...
    block 0 = the prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLayout:
    input_ids: np.ndarray  # (L,) int64; visual tokens hold the image placeholder id
    prefix_len: int  # tokens before the first group
    suffix_start: int  # first token after the last group
    group_starts: np.ndarray  # (G,) first token (its timestamp text) of each group
    group_visual_starts: np.ndarray  # (G,) first of the group's visual tokens
    group_ends: np.ndarray  # (G,) one past the group's last visual token
    is_timestamp: np.ndarray  # (L,) bool: non-visual tokens inside the video span
    is_visual: np.ndarray  # (L,) bool

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_starts.shape[0])

    @property
    def visual_positions(self) -> np.ndarray:
        return np.flatnonzero(self.is_visual)


def build_layout(
    prefix_ids: list[int],
    group_timestamp_ids: list[list[int]],
    suffix_ids: list[int],
    *,
    image_token_id: int,
    tokens_per_group: int,
) -> TokenLayout:
    """Splice per-group timestamp text and visual placeholders between prefix and suffix."""
    ids: list[int] = list(prefix_ids)
    starts, visual_starts, ends = [], [], []
    for stamp in group_timestamp_ids:
        starts.append(len(ids))
        ids.extend(stamp)
        visual_starts.append(len(ids))
        ids.extend([image_token_id] * tokens_per_group)
        ends.append(len(ids))
    suffix_start = len(ids)
    ids.extend(suffix_ids)

    length = len(ids)
    is_visual = np.zeros(length, dtype=bool)
    in_video = np.zeros(length, dtype=bool)
    for start, visual_start, end in zip(starts, visual_starts, ends):
        is_visual[visual_start:end] = True
        in_video[start:end] = True
    return TokenLayout(
        input_ids=np.asarray(ids, dtype=np.int64),
        prefix_len=len(prefix_ids),
        suffix_start=suffix_start,
        group_starts=np.asarray(starts, dtype=np.int64),
        group_visual_starts=np.asarray(visual_starts, dtype=np.int64),
        group_ends=np.asarray(ends, dtype=np.int64),
        is_timestamp=in_video & ~is_visual,
        is_visual=is_visual,
    )


# --- chunk-based pre-filling (DESIGN §2) ---------------------------------------------------


@dataclass(frozen=True)
class ChunkVisibility:
    """What the queries of one prefill chunk may see, as index ranges.

    A query at absolute position p = start + i sees
      - if it is a timestamp token: every key j <= p;
      - otherwise: [0, prefix_len) U past_timestamp_index U [window_start, p].
    past_timestamp_index lists the timestamp tokens in [prefix_len, window_start) only, so the
    three sets never overlap.
    """

    start: int  # first token of the chunk (= past length)
    end: int
    prefix_len: int
    window_start: int
    past_timestamp_index: np.ndarray  # (T,) int64
    query_is_timestamp: np.ndarray  # (end - start,) bool

    @property
    def timestamp_query_index(self) -> np.ndarray:
        """Chunk-relative indices of the timestamp queries (the op's input form)."""
        return np.flatnonzero(self.query_is_timestamp).astype(np.int64)

    @property
    def visible_past(self) -> int:
        """Past keys a visual query sees (the saving over dense: this vs. `start`)."""
        return self.prefix_len + len(self.past_timestamp_index) + (self.start - self.window_start)

    @property
    def visible_past_index(self) -> np.ndarray:
        """(V,) int64: the past rows every query of the chunk sees (the op's `visible_past_index`)."""
        return np.concatenate(
            [
                np.arange(self.prefix_len, dtype=np.int64),
                self.past_timestamp_index,
                np.arange(self.window_start, self.start, dtype=np.int64),
            ]
        )


PREFILL_RULES = ("evaluation", "streaming")
"""Who a timestamp query of a chunk sees. evaluation: the whole history before it (the official
eval code's mask, what the paper's numbers used; the default). streaming: the same as any other
query of its chunk (the released model's Hugging Face `forward_streaming`), which makes the
prefill linear in frames."""


def num_chunks(layout: TokenLayout, chunk_groups: int) -> int:
    return -(-layout.num_groups // chunk_groups)


def chunk_visibility(
    layout: TokenLayout, chunk: int, *, chunk_groups: int, window_chunks: int, rule: str = "evaluation"
) -> ChunkVisibility:
    """What the queries of prefill chunk `chunk` see; `rule` is one of PREFILL_RULES."""
    if rule not in PREFILL_RULES:
        raise ValueError(f"prefill rule {rule!r} not in {PREFILL_RULES}")
    first_group = chunk * chunk_groups
    last_group = min(first_group + chunk_groups, layout.num_groups) - 1
    if not 0 <= first_group <= last_group:
        raise IndexError(f"chunk {chunk} out of range for {layout.num_groups} groups")
    start = int(layout.group_starts[first_group])
    end = int(layout.group_ends[last_group])
    window_group = max(0, chunk - window_chunks) * chunk_groups
    window_start = int(layout.group_starts[window_group])
    past_ts = np.flatnonzero(layout.is_timestamp[layout.prefix_len : window_start]) + layout.prefix_len
    return ChunkVisibility(
        start=start,
        end=end,
        prefix_len=layout.prefix_len,
        window_start=window_start,
        past_timestamp_index=past_ts.astype(np.int64),
        # under the streaming rule no query sweeps the whole history
        query_is_timestamp=layout.is_timestamp[start:end].copy() if rule == "evaluation" else np.zeros(end - start, bool),
    )


def prefix_visibility(layout: TokenLayout) -> ChunkVisibility:
    """The prefix runs as a plain causal chunk with no past."""
    return ChunkVisibility(
        start=0,
        end=layout.prefix_len,
        prefix_len=0,
        window_start=0,
        past_timestamp_index=np.zeros(0, dtype=np.int64),
        query_is_timestamp=np.zeros(layout.prefix_len, dtype=bool),
    )


def visible_key_index(vis: ChunkVisibility, query: int) -> np.ndarray:
    """Absolute key positions that chunk query `query` (0-based in the chunk) sees, sorted."""
    position = vis.start + query
    if vis.query_is_timestamp[query]:
        return np.arange(position + 1, dtype=np.int64)
    return np.concatenate(
        [
            np.arange(vis.prefix_len, dtype=np.int64),
            vis.past_timestamp_index,
            np.arange(vis.window_start, position + 1, dtype=np.int64),
        ]
    )


# --- bi-level KV decoding (DESIGN §3) -------------------------------------------------------


def block_ranges(layout: TokenLayout, block_groups: int) -> list[tuple[int, int]]:
    """Token ranges of the blocks: block 0 is the prefix, block b >= 1 holds S groups."""
    blocks = [(0, layout.prefix_len)]
    for first in range(0, layout.num_groups, block_groups):
        last = min(first + block_groups, layout.num_groups) - 1
        blocks.append((int(layout.group_starts[first]), int(layout.group_ends[last])))
    return blocks


def groups_in(layout: TokenLayout, start: int, end: int) -> list[tuple[int, int, int]]:
    """(timestamp_start, visual_start, end) of each group that begins in tokens [start, end)."""
    inside = np.flatnonzero((layout.group_starts >= start) & (layout.group_starts < end))
    return [
        (int(layout.group_starts[g]), int(layout.group_visual_starts[g]), int(layout.group_ends[g])) for g in inside
    ]


def always_dense_blocks(num_blocks: int) -> set[int]:
    """Block 0 (prefix), the first and the last video block always keep dense KV."""
    return {0, 1, num_blocks - 1} if num_blocks > 1 else {0}


@dataclass(frozen=True)
class BilevelPlan:
    """How to build the mixed cache from the dense (pre-RoPE) cache.

    mixed[m] = sum_s gather_weight[m, s] * dense[gather_index[m, s]], rotated at position m.
    Dense tokens use weights (1, 0, 0, 0); a pooled visual token averages `stride` neighbours.
    """

    gather_index: np.ndarray  # (M, stride) int64 into the dense cache
    gather_weight: np.ndarray  # (M, stride) float32
    block_bounds: list[tuple[int, int]]  # each block's range in the mixed cache
    dense_blocks: frozenset[int]

    @property
    def length(self) -> int:
        return int(self.gather_index.shape[0])


def bilevel_plan(
    layout: TokenLayout, *, block_groups: int, dense_blocks: set[int], pool_stride: int
) -> BilevelPlan:
    """Dense blocks are copied; other blocks keep timestamp tokens and pool visual KV."""
    rows: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    bounds: list[tuple[int, int]] = []
    cursor = 0

    def copy(positions: np.ndarray) -> None:
        rows.append(np.repeat(positions[:, None], pool_stride, axis=1))
        w = np.zeros((len(positions), pool_stride), dtype=np.float32)
        w[:, 0] = 1.0
        weights.append(w)

    for block, (start, end) in enumerate(block_ranges(layout, block_groups)):
        block_start = cursor
        positions = np.arange(start, end, dtype=np.int64)
        if block in dense_blocks:
            copy(positions)
        else:
            for ts_start, visual_start, group_end in groups_in(layout, start, end):
                copy(np.arange(ts_start, visual_start, dtype=np.int64))
                visual = np.arange(visual_start, group_end, dtype=np.int64)
                rows.append(visual.reshape(-1, pool_stride))
                weights.append(np.full((len(visual) // pool_stride, pool_stride), 1.0 / pool_stride, np.float32))
        cursor = sum(len(r) for r in rows)
        bounds.append((block_start, cursor))
    return BilevelPlan(
        gather_index=np.concatenate(rows).astype(np.int64),
        gather_weight=np.concatenate(weights),
        block_bounds=bounds,
        dense_blocks=frozenset(dense_blocks),
    )


def all_blocks(layout: TokenLayout, block_groups: int) -> set[int]:
    return set(range(len(block_ranges(layout, block_groups))))


def explicit_dense_blocks(blocks, num_blocks: int) -> set[int]:
    """A user's block list (to reproduce published runs) plus the always-dense blocks."""
    chosen = {int(b) for b in blocks}
    bad = sorted(b for b in chosen if not 0 <= b < num_blocks)
    if bad:
        raise ValueError(f"dense blocks {bad} out of range: this video has blocks 0..{num_blocks - 1}")
    return chosen | always_dense_blocks(num_blocks)


def select_dense_blocks(block_scores: np.ndarray, *, num_blocks: int, top_k: int) -> set[int]:
    """Always-dense blocks plus the top-k scoring others (ties go to the earlier block)."""
    chosen = always_dense_blocks(num_blocks)
    candidates = [b for b in range(num_blocks) if b not in chosen]
    ranked = sorted(candidates, key=lambda b: (-float(block_scores[b]), b))
    return chosen | set(ranked[: max(0, top_k)])


# --- published selections (the official evaluation's dense-block choice) --------------------

UNIT_FRAMES = 8  # the official relevance oracle scores the video in units of 8 frames (2 groups)


def num_blocks_for(num_groups: int, block_groups: int) -> int:
    """Blocks of a video of `num_groups` groups: block 0 (prefix) plus ceil(G / S) video blocks."""
    return 1 + -(-num_groups // block_groups)


def unit_block(unit: int, block_groups: int) -> int:
    """Decoding block of 8-frame unit `unit`, as the official rule ``u // (S / 2) + 1``.

    S / 2 is the number of 8-frame units in a block of S groups. The official code divides by
    the float S / 2; for an odd S that floors u / 2.5 etc., which is the integer (2u) // S.
    """
    return (2 * unit) // block_groups + 1


def unit_dense_blocks(units, *, num_groups: int, block_groups: int) -> set[int]:
    """Dense blocks from a published selection of 8-frame units (e.g. ``selected_unit_indices``).

    As the official evaluation: an empty selection keeps every block dense; otherwise the
    units' blocks plus the always-dense ones. Units whose block does not exist in this video
    (the selection was made on another frame count) are dropped with a warning -- officially
    they are ignored silently; a selection whose units are all dropped keeps only the
    always-dense blocks, as officially (the list was not empty).
    """
    chosen = [_unit_id(u) for u in units]
    num_blocks = num_blocks_for(num_groups, block_groups)
    if not chosen:
        return set(range(num_blocks))
    blocks = {unit_block(u, block_groups) for u in chosen if u >= 0}
    dropped = sorted(u for u in chosen if u < 0 or unit_block(u, block_groups) >= num_blocks)
    if dropped:
        last_unit = ((num_blocks - 1) * block_groups - 1) // 2  # units of the last block end here
        log.warning(
            "dense units %s are outside this video (%d groups: units 0..%d at %d groups per block); dropped",
            dropped, num_groups, last_unit, block_groups,
        )
    return {b for b in blocks if b < num_blocks} | always_dense_blocks(num_blocks)


def _unit_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"unit ids must be integers, got {value!r}")
    return int(value)
