"""DTS compressor: shapes, the raw reshape, and the relative-position quirk checked by hand."""

from __future__ import annotations

import torch

from videoxl.export.vision import TemporalAttention, group_frames, pad_to_groups, pool_tokens, resize_grid


def test_encode_frames_shapes_and_padding(tiny_model):
    cfg = tiny_model.cfg
    pixels = torch.randn(5, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = tiny_model.encode_frames(pixels)
        # 5 frames pad to 8 by repeating the last frame: same as passing it explicitly
        padded = tiny_model.encode_frames(torch.cat([pixels, pixels[-1:].expand(3, -1, -1, -1)]))
    assert tokens.shape == (2, cfg.tokens_per_group, cfg.hidden_size)
    assert torch.allclose(tokens, padded, atol=1e-5)


def test_raw_reshape_is_not_a_transpose():
    maps = torch.arange(8 * 3 * 2 * 2, dtype=torch.float32).reshape(8, 3, 2, 2)
    grouped = group_frames(maps, 4)
    assert grouped.shape == (2, 3, 4, 2, 2)
    # memory order kept: element [g, c, t] is frame-major flat index (g*4*3 + c*4 + t) of (C*T) slots
    assert torch.equal(grouped.reshape(-1), maps.reshape(-1))
    assert not torch.equal(grouped[0, :, 1], maps[1])  # a transpose would give frame 1 here


def test_pad_resize_pool_shapes():
    feats = torch.randn(6, 27 * 27, 8)
    maps = resize_grid(feats, 27, 24)
    assert maps.shape == (6, 8, 24, 24)
    padded = pad_to_groups(maps, 4)
    assert padded.shape[0] == 8 and torch.equal(padded[6], maps[5]) and torch.equal(padded[7], maps[5])
    pooled = pool_tokens(torch.arange(2 * 16 * 1, dtype=torch.float32).reshape(2, 16, 1), 4, 2)
    assert pooled.shape == (2, 4, 1)
    assert pooled[0, 0, 0] == (0 + 1 + 4 + 5) / 4  # 2x2 window on the raster


def _hand_temporal_attention(block: TemporalAttention, x: torch.Tensor) -> torch.Tensor:
    """Loops over DESIGN §1 step 3, element by element, for one spatial position."""
    c, t = x.shape
    h = block.norm(x[None])[0]
    qkv = block.qkv.weight[:, :, 0] @ h + block.qkv.bias[:, None]
    q, k, v = qkv[:c] * c**-0.25, qkv[c : 2 * c] * c**-0.25, qkv[2 * c :]
    tk, tv = block.relative_position_k.embeddings_table, block.relative_position_v.embeddings_table
    m = block.relative_position_k.max_relative_position
    clamp = lambda d: max(-m, min(m, d)) + m  # noqa: E731
    logits = torch.zeros(t, t)
    for i in range(t):
        for j in range(t):
            logits[i, j] = (q[:, i] * k[:, j]).sum() + (q[:, j] * tk[clamp(i - j)]).sum()
    w = torch.softmax(logits, dim=-1)
    out = torch.zeros(c, t)
    for i in range(t):
        for j in range(t):
            out[:, i] += w[i, j] * v[:, j] + w[i, j] * tv[clamp(j - i)]
    return x + block.proj_out.weight[:, :, 0] @ out + block.proj_out.bias[:, None]


def test_temporal_attention_relative_quirk_by_hand():
    torch.manual_seed(0)
    block = TemporalAttention(channels=4, groups=2, max_relative_position=1)  # clamp bites at |i-j| = 2, 3
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.7)
    x = torch.randn(1, 4, 4, 1, 1)  # (G, C, T, H, W), one spatial position
    with torch.no_grad():
        ours = block(x)[0, :, :, 0, 0]
        hand = _hand_temporal_attention(block, x[0, :, :, 0, 0])
    assert torch.allclose(ours, hand, atol=1e-5)
    # the quirk matters: the "textbook" relative term q[:, i] . Tk[clamp(j - i)] gives another answer
    with torch.no_grad():
        block.relative_position_k.embeddings_table.copy_(block.relative_position_k.embeddings_table.flip(0))
        flipped = block(x)[0, :, :, 0, 0]
    assert not torch.allclose(flipped, ours, atol=1e-3)
