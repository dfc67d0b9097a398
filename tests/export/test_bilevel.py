"""The bi-level cache equals a direct construction from the dense cache; block choice modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from videoxl.export.llm import apply_rope
from videoxl.export.reference import ReferenceInference
from videoxl.layout import always_dense_blocks, bilevel_plan, block_ranges


@pytest.fixture(scope="module")
def prefilled(tiny_model, make_layout):
    layout = make_layout(10)
    visual = torch.randn(10, tiny_model.cfg.tokens_per_group, tiny_model.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    ref = ReferenceInference(tiny_model)
    return ref, layout, ref.prefill(layout, visual, chunk_groups=2, window_chunks=1)


def test_mixed_cache_equals_gather_plan(prefilled):
    ref, layout, dense = prefilled
    chosen = {0, 1, 3, 5}  # block 5 is the last (10 groups / 2 per block -> blocks 1..5)
    mixed = ref.mixed_cache(dense, layout, block_groups=2, dense_blocks=chosen)
    plan = bilevel_plan(layout, block_groups=2, dense_blocks=chosen, pool_stride=4)
    assert mixed.block_bounds == plan.block_bounds and mixed.length == plan.length
    weight = torch.from_numpy(plan.gather_weight)[..., None, None]
    for layer in range(ref.cfg.num_hidden_layers):
        index = torch.from_numpy(plan.gather_index)
        keys = (dense.keys[layer][index] * weight).sum(1)
        values = (dense.values[layer][index] * weight).sum(1)
        direct_keys = apply_rope(keys, torch.arange(plan.length), ref.cfg.rope_theta)
        assert torch.allclose(mixed.keys[layer], direct_keys, atol=1e-5)
        assert torch.allclose(mixed.values[layer], values, atol=1e-6)


def test_sparse_block_sizes(prefilled):
    ref, layout, dense = prefilled
    mixed = ref.mixed_cache(dense, layout, block_groups=2, dense_blocks={0, 1, 5})
    for block, ((start, end), (m_start, m_end)) in enumerate(zip(block_ranges(layout, 2), mixed.block_bounds)):
        if block in (0, 1, 5):
            assert m_end - m_start == end - start
        else:
            groups = np.flatnonzero((layout.group_starts >= start) & (layout.group_starts < end))
            stamps = sum(int(layout.group_visual_starts[g] - layout.group_starts[g]) for g in groups)
            assert m_end - m_start == stamps + len(groups) * ref.cfg.tokens_per_group // 4  # 144 -> 36


def test_all_dense_mixed_cache_is_the_dense_cache(prefilled):
    ref, layout, dense = prefilled
    blocks = set(range(len(block_ranges(layout, 2))))
    mixed = ref.mixed_cache(dense, layout, block_groups=2, dense_blocks=blocks)
    for layer in range(ref.cfg.num_hidden_layers):
        assert torch.allclose(mixed.keys[layer], dense.keys_rotated[layer], atol=1e-5)


def test_block_choice_modes(prefilled):
    ref, layout, dense = prefilled
    num_blocks = len(block_ranges(layout, 2))
    chosen, scores = ref.choose_dense_blocks(dense, layout, block_groups=2, selection=1)
    assert scores.shape == (num_blocks,) and np.all(scores > 0)
    free = [b for b in range(num_blocks) if b not in always_dense_blocks(num_blocks)]
    best = max(free, key=lambda b: (scores[b], -b))
    assert chosen == always_dense_blocks(num_blocks) | {best}
    explicit, none = ref.choose_dense_blocks(dense, layout, block_groups=2, selection=[3])
    assert explicit == {0, 1, 3, num_blocks - 1} and none is None
    everything, _ = ref.choose_dense_blocks(dense, layout, block_groups=2, selection="all")
    assert everything == set(range(num_blocks))
    with pytest.raises(ValueError, match="out of range"):
        ref.choose_dense_blocks(dense, layout, block_groups=2, selection=[99])
