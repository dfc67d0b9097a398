"""Chunk-by-chunk prefill equals a dense masked reference at every position (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from videoxl.export.reference import DenseCache, ReferenceInference, attend


def dense_mask(layout, chunk_groups: int, window_chunks: int, rule: str = "evaluation") -> torch.Tensor:
    """The L x L mask of DESIGN §2, written straight from the rules (test only).

    streaming: a timestamp token of a chunk sees what the chunk's visual tokens see (the released
    model's `forward_streaming`), not the whole history.
    """
    n = layout.suffix_start
    group_of = np.full(n, -1)
    for g in range(layout.num_groups):
        group_of[layout.group_starts[g] : layout.group_ends[g]] = g
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(i + 1):
            if group_of[i] < 0 or (layout.is_timestamp[i] and rule == "evaluation"):
                mask[i, j] = True  # prefix and timestamp tokens: whole history
                continue
            chunk = group_of[i] // chunk_groups
            first_visible_chunk = max(0, chunk - window_chunks)
            mask[i, j] = (
                group_of[j] < 0  # prefix
                or layout.is_timestamp[j]  # every earlier timestamp token
                or group_of[j] // chunk_groups >= first_visible_chunk  # window + own chunk (causal)
            )
    return torch.from_numpy(mask)


class MaskedAttention:
    def __init__(self, cache: DenseCache, mask: torch.Tensor, scale: float) -> None:
        self.cache, self.mask, self.scale = cache, mask, scale

    def __call__(self, layer, query, key, value, key_rotated):
        out, _ = attend(query, key_rotated, value, self.mask, self.scale)
        self.cache.append(layer, key, key_rotated, value)
        return out


@pytest.mark.parametrize("rule", ["evaluation", "streaming"])
@pytest.mark.parametrize("groups,chunk_groups,window", [(9, 2, 1), (7, 3, 0), (6, 1, 2), (5, 4, 3)])
def test_chunked_equals_dense_masked(tiny_model, make_layout, groups, chunk_groups, window, rule):
    cfg = tiny_model.cfg
    layout = make_layout(groups)
    visual = torch.randn(groups, cfg.tokens_per_group, cfg.hidden_size, generator=torch.Generator().manual_seed(groups))
    ref = ReferenceInference(tiny_model)
    chunked = ref.prefill(layout, visual, mode="chunked", chunk_groups=chunk_groups, window_chunks=window, rule=rule)

    masked = DenseCache.empty(cfg, torch.float32)
    with torch.no_grad():
        embeds = tiny_model.embed(torch.from_numpy(layout.input_ids[: layout.suffix_start]), visual, image_token_id=int(layout.input_ids[layout.visual_positions[0]]))
        hidden = tiny_model.forward_hidden(
            embeds, torch.arange(layout.suffix_start), MaskedAttention(masked, dense_mask(layout, chunk_groups, window, rule), ref.scale)
        )
    assert chunked.length == masked.length == layout.suffix_start
    for layer in range(cfg.num_hidden_layers):  # KV of layer l+1 depends on every position's output of layer l
        assert (chunked.keys[layer] - masked.keys[layer]).abs().max() <= 1e-4
        assert (chunked.values[layer] - masked.values[layer]).abs().max() <= 1e-4
    assert hidden.shape[0] == layout.suffix_start

    # and the sparsity is real: with a window that does not cover everything it differs from dense
    dense = ref.prefill(layout, visual, mode="dense")
    differs = (dense.values[-1] - chunked.values[-1]).abs().max() > 1e-3
    covers_all = window * chunk_groups >= groups - chunk_groups
    assert differs != covers_all
