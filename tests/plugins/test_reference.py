"""The numpy kernel reference against brute force built from videoxl.layout (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from videoxl.layout import (
    ChunkVisibility,
    TokenLayout,
    always_dense_blocks,
    bilevel_plan,
    block_ranges,
    build_layout,
    chunk_visibility,
    num_chunks,
    prefix_visibility,
    select_dense_blocks,
    visible_key_index,
)
from videoxl.plugins import reference as ref

IMAGE_TOKEN = 151654
POOL_STRIDE = 4


def make_layout(rng: np.random.Generator, *, groups: int = 7, tokens_per_group: int = 12) -> TokenLayout:
    """Odd sizes: a 5-token prefix, 1-4 timestamp tokens per group, a 3-token suffix."""
    stamps = [list(rng.integers(10, 100, size=int(rng.integers(1, 5)))) for _ in range(groups)]
    return build_layout(
        [1, 2, 3, 4, 5], stamps, [7, 8, 9], image_token_id=IMAGE_TOKEN, tokens_per_group=tokens_per_group
    )


def brute_force_attention(
    vis: ChunkVisibility, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float
) -> np.ndarray:
    """Loop over queries and heads; keys from visible_key_index; float64."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        keys = visible_key_index(vis, i)
        for h in range(num_q_heads):
            kv = h // (num_q_heads // num_kv_heads)
            logits = k[keys, kv] @ q[i, h] * scale
            weights = np.exp(logits - logits.max())
            out[i, h] = (weights / weights.sum()) @ v[keys, kv]
    return out


def visible_index(vis: ChunkVisibility) -> np.ndarray:
    return ref.visible_past_index(vis.prefix_len, vis.past_timestamp_index, vis.window_start, vis.start)


def run_reference(vis: ChunkVisibility, q_all, k_all, v_all, scale, *, spare_rows: int = 3, **kwargs):
    """The op on a chunk: the past is a buffer with `spare_rows` garbage rows past past_len."""
    past_key = np.concatenate([k_all[: vis.start], np.full((spare_rows, *k_all.shape[1:]), np.nan, k_all.dtype)])
    past_value = np.concatenate([v_all[: vis.start], np.full((spare_rows, *v_all.shape[1:]), np.nan, v_all.dtype)])
    return ref.chunk_sparse_attention(
        q_all[vis.start : vis.end], k_all[vis.start : vis.end], v_all[vis.start : vis.end], past_key, past_value,
        vis.start, visible_index(vis), vis.timestamp_query_index, scale, **kwargs,
    )


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Plain causal attention of the last Q positions over all K keys (float64)."""
    num_queries, num_keys = q.shape[0], k.shape[0]
    all_ts = ChunkVisibility(
        start=num_keys - num_queries, end=num_keys, prefix_len=0, window_start=0,
        past_timestamp_index=np.zeros(0, np.int64), query_is_timestamp=np.ones(num_queries, bool),
    )
    return brute_force_attention(all_ts, q, k[:num_keys], v[:num_keys], scale)


# --- chunk attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("window_chunks", [1, 2])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (3, 3)])
def test_chunk_attention_matches_visible_key_index(window_chunks: int, heads: tuple[int, int]) -> None:
    rng = np.random.default_rng(window_chunks * 10 + heads[0])
    layout = make_layout(rng)
    num_q_heads, num_kv_heads = heads
    head_dim = 6
    q_all = rng.standard_normal((layout.num_tokens, num_q_heads, head_dim))
    k_all = rng.standard_normal((layout.num_tokens, num_kv_heads, head_dim))
    v_all = rng.standard_normal((layout.num_tokens, num_kv_heads, head_dim))
    scale = head_dim**-0.5
    chunk_groups = 2
    assert num_chunks(layout, chunk_groups) == 4  # the last chunk holds one group
    for chunk in range(num_chunks(layout, chunk_groups)):
        vis = chunk_visibility(layout, chunk, chunk_groups=chunk_groups, window_chunks=window_chunks)
        got = run_reference(vis, q_all, k_all, v_all, scale)
        want = brute_force_attention(vis, q_all[vis.start : vis.end], k_all, v_all, scale)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"chunk {chunk}")
        if chunk >= window_chunks + 1:  # the sparse past really is sparse here
            assert vis.visible_past < vis.start


def test_prefix_chunk_is_causal() -> None:
    rng = np.random.default_rng(1)
    layout = make_layout(rng)
    vis = prefix_visibility(layout)
    q, k, v = (rng.standard_normal((layout.num_tokens, 2, 8)) for _ in range(3))
    got = run_reference(vis, q, k, v, 0.3)
    np.testing.assert_allclose(got, causal_attention(q[: vis.end], k[: vis.end], v[: vis.end], 0.3), rtol=1e-12)


def test_window_covering_all_past_is_causal() -> None:
    rng = np.random.default_rng(2)
    layout = make_layout(rng)
    q, k, v = (rng.standard_normal((layout.num_tokens, 2, 8)) for _ in range(3))
    for chunk in range(num_chunks(layout, 2)):
        vis = chunk_visibility(layout, chunk, chunk_groups=2, window_chunks=99)
        assert vis.window_start == layout.prefix_len and vis.past_timestamp_index.size == 0
        got = run_reference(vis, q, k, v, 0.25)
        want = causal_attention(q[vis.start : vis.end], k[: vis.end], v[: vis.end], 0.25)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_no_past_timestamps_and_empty_prefix() -> None:
    rng = np.random.default_rng(3)
    num_queries, past = 9, 14
    q = rng.standard_normal((num_queries, 4, 6))
    k, v = (rng.standard_normal((past + num_queries, 2, 6)) for _ in range(2))
    vis = ChunkVisibility(
        start=past, end=past + num_queries, prefix_len=0, window_start=10,
        past_timestamp_index=np.zeros(0, np.int64), query_is_timestamp=rng.random(num_queries) < 0.3,
    )
    got = ref.chunk_sparse_attention(
        q, k[past:], v[past:], k[:past], v[:past], past, np.arange(10, past), vis.timestamp_query_index, 0.5
    )
    np.testing.assert_allclose(got, brute_force_attention(vis, q, k, v, 0.5), rtol=1e-12, atol=1e-12)


def test_all_queries_timestamps_is_causal() -> None:
    rng = np.random.default_rng(4)
    num_queries, past = 7, 23
    q = rng.standard_normal((num_queries, 4, 6))
    k, v = (rng.standard_normal((past + num_queries, 2, 6)) for _ in range(2))
    visible = ref.visible_past_index(3, np.array([5, 11, 12]), 19, past)
    got = ref.chunk_sparse_attention(q, k[past:], v[past:], k[:past], v[:past], past, visible, np.arange(num_queries), 0.4)
    np.testing.assert_allclose(got, causal_attention(q, k, v, 0.4), rtol=1e-12, atol=1e-12)


def test_chunk_attention_float32_and_float16_inputs() -> None:
    rng = np.random.default_rng(5)
    layout = make_layout(rng)
    q, k, v = (rng.standard_normal((layout.num_tokens, 2, 16)) for _ in range(3))
    vis = chunk_visibility(layout, 3, chunk_groups=2, window_chunks=1)
    exact = run_reference(vis, q, k, v, 0.25)
    single = run_reference(vis, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), 0.25)
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, exact, rtol=1e-5, atol=1e-6)
    half = [x.astype(np.float16) for x in (q, k, v)]
    from_half = run_reference(vis, *half, 0.25)
    assert from_half.dtype == np.float32
    want = run_reference(vis, *(x.astype(np.float64) for x in half), 0.25)
    np.testing.assert_allclose(from_half, want, rtol=1e-5, atol=1e-6)


def test_chunk_attention_never_reads_past_rows_beyond_past_len() -> None:
    """Rows >= past_len of the buffer (NaN here) and past rows outside the list do not leak."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((5, 4, 6))
    k, v = (rng.standard_normal((5, 2, 6)) for _ in range(2))
    past_key, past_value = (rng.standard_normal((30, 2, 6)) for _ in range(2))
    past_key[17:] = np.nan
    visible = np.array([0, 1, 4, 15, 16])
    got = ref.chunk_sparse_attention(q, k, v, past_key, past_value, 17, visible, np.array([2]), 0.5)
    assert np.isfinite(got).all()
    poked = past_key.copy()
    poked[7] += 100.0  # not visible to queries 0, 1, 3, 4; visible to timestamp query 2
    again = ref.chunk_sparse_attention(q, k, v, poked, past_value, 17, visible, np.array([2]), 0.5)
    np.testing.assert_array_equal(again[[0, 1, 3, 4]], got[[0, 1, 3, 4]])
    assert not np.allclose(again[2], got[2])


@pytest.mark.parametrize(
    ("past_len", "visible", "ts_queries", "match"),
    [
        (21, [], [0], "past buffer"),  # a timestamp query reads all past_len rows: more than the buffer holds
        (21, [20], [], "visible_past_index"),  # a compact view (no timestamp queries) is read only within the buffer
        (8, [3, 8], [], "visible_past_index"),  # row 8 is not in the past
        (8, [4, 4], [], "visible_past_index"),  # duplicates
        (8, [5, 2], [], "visible_past_index"),  # not ascending
        (8, [-1], [], "visible_past_index"),
        (8, [], [3, 1], "ascending"),
        (8, [], [0, 5], "ascending"),  # query 5 of 5
        (8, [], np.ones(5, bool), "integer"),  # a mask is not an index list
    ],
)
def test_chunk_attention_rejects_contract_violations(past_len, visible, ts_queries, match) -> None:
    q = np.zeros((5, 2, 4))
    k = np.zeros((5, 1, 4))
    past = np.zeros((20, 1, 4))
    with pytest.raises(ValueError, match=match):
        ref.chunk_sparse_attention(q, k, k, past, past, past_len, np.array(visible, np.int64), np.asarray(ts_queries), 1.0)


def test_chunk_attention_rejects_mismatched_chunk_keys() -> None:
    with pytest.raises(ValueError, match="key"):
        ref.chunk_sparse_attention(
            np.zeros((5, 2, 4)), np.zeros((6, 1, 4)), np.zeros((6, 1, 4)), np.zeros((9, 1, 4)), np.zeros((9, 1, 4)),
            3, np.arange(3), np.zeros(0, np.int64), 1.0,
        )


# --- RoPE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("theta", [10_000.0, 1_000_000.0])
def test_inv_freq_matches_hugging_face_and_the_kernel_formula(head_dim: int, theta: float) -> None:
    inv_freq = ref.rope_inv_freq(head_dim, theta)
    assert inv_freq.dtype == np.float32
    # The CUDA kernels evaluate the power in double and round once (common/common.cuh).
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    kernel = np.float32(1.0) / np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(inv_freq, kernel)
    # torch's vectorised CPU pow is not always correctly rounded: HF's own table can differ by
    # one ulp (e.g. pair 37 of head_dim 128 at theta 1e6), an angle error below 2e-6 rad at
    # position 40k. The reference and the kernels use the correctly rounded power.
    torch = pytest.importorskip("torch")
    hf = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    np.testing.assert_array_max_ulp(inv_freq, hf.numpy(), maxulp=1)


def rotate_as_complex(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """RoPE as complex multiplication of the pairs (i, i + D/2), float64, angle as HF's float32."""
    half = x.shape[-1] // 2
    exponent = np.arange(0, x.shape[-1], 2).astype(np.float32) / np.float32(x.shape[-1])
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)
    angle = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # (N, D/2)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[:, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def test_apply_rope_is_rotate_half() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((37, 3, 16))
    positions = np.arange(37) * 1013  # large angles too
    np.testing.assert_allclose(ref.apply_rope(x, positions, 1e6), rotate_as_complex(x, positions, 1e6), atol=1e-12)


def test_apply_rope_matches_transformers_qwen2() -> None:
    torch = pytest.importorskip("torch")
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    rotary = qwen2.Qwen2RotaryEmbedding(config=config)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((29, 4, 16)).astype(np.float32)
    positions = np.arange(29) * 211
    xt = torch.from_numpy(x).permute(1, 0, 2)[None]  # (1, H, N, D)
    cos, sin = rotary(xt, torch.from_numpy(positions)[None])
    rotated, _ = qwen2.apply_rotary_pos_emb(xt, xt, cos, sin)
    want = rotated[0].permute(1, 0, 2).numpy()
    np.testing.assert_allclose(ref.apply_rope(x, positions, 1e6), want, rtol=1e-5, atol=1e-5)


# --- bi-level gather and pooling -----------------------------------------------------------------


def direct_mixed_cache(layout: TokenLayout, source: np.ndarray, block_groups: int, dense: set[int]) -> np.ndarray:
    """Copy dense blocks; in the others keep timestamp rows and average visual rows by 4."""
    rows = []
    for block, (start, end) in enumerate(block_ranges(layout, block_groups)):
        if block in dense:
            rows.append(source[start:end])
            continue
        for g in range(layout.num_groups):
            if not start <= layout.group_starts[g] < end:
                continue
            rows.append(source[layout.group_starts[g] : layout.group_visual_starts[g]])
            visual = source[layout.group_visual_starts[g] : layout.group_ends[g]]
            rows.append(visual.reshape(-1, POOL_STRIDE, *visual.shape[1:]).mean(axis=1))
    return np.concatenate(rows)


@pytest.mark.parametrize("top_k", [0, 1, 99])
def test_bilevel_gather_matches_direct_construction(top_k: int) -> None:
    rng = np.random.default_rng(8 + top_k)
    layout = make_layout(rng, groups=9)
    block_groups = 2
    num_blocks = len(block_ranges(layout, block_groups))
    dense = select_dense_blocks(rng.random(num_blocks), num_blocks=num_blocks, top_k=top_k)
    plan = bilevel_plan(layout, block_groups=block_groups, dense_blocks=dense, pool_stride=POOL_STRIDE)
    key = rng.standard_normal((layout.num_tokens, 3, 10))
    value = rng.standard_normal((layout.num_tokens, 3, 10))

    positions = np.arange(layout.num_tokens)
    mixed_key, mixed_value = ref.bilevel_kv_gather(
        key, value, plan.gather_index, plan.gather_weight, np.zeros_like(positions), np.arange(plan.length), 1e6
    )
    # The rotated store (key of token n rotated at n) gives the same cache: un-rotate, pool, rotate.
    from_rotated = ref.bilevel_kv_gather(
        ref.apply_rope(key, positions, 1e6), value, plan.gather_index, plan.gather_weight, positions,
        np.arange(plan.length), 1e6,
    )

    want_value = direct_mixed_cache(layout, value, block_groups, dense)
    want_key = rotate_as_complex(
        direct_mixed_cache(layout, key, block_groups, dense), np.arange(plan.length), 1e6
    )
    assert mixed_key.shape == (plan.length, 3, 10)
    np.testing.assert_allclose(mixed_value, want_value, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mixed_key, want_key, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(from_rotated[0], want_key, rtol=1e-11, atol=1e-11)
    np.testing.assert_array_equal(from_rotated[1], mixed_value)
    if top_k == 99:  # everything dense: the gather is a copy re-rotated at 0..L-1
        np.testing.assert_array_equal(mixed_value, value[: layout.suffix_start])


def test_bilevel_gather_float32_is_close() -> None:
    rng = np.random.default_rng(9)
    layout = make_layout(rng)
    plan = bilevel_plan(layout, block_groups=3, dense_blocks=always_dense_blocks(4), pool_stride=POOL_STRIDE)
    key, value = (rng.standard_normal((layout.num_tokens, 2, 16)) for _ in range(2))
    source, target = np.arange(layout.num_tokens), np.arange(plan.length)
    exact = ref.bilevel_kv_gather(key, value, plan.gather_index, plan.gather_weight, source, target, 1e4)
    single = ref.bilevel_kv_gather(
        key.astype(np.float32), value.astype(np.float32), plan.gather_index, plan.gather_weight, source, target, 1e4
    )
    for got, want in zip(single, exact):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bilevel_gather_target_position_zero_keeps_keys_unrotated() -> None:
    """The sparse tier: un-rotate rotated keys and pool them, left before RoPE (target 0)."""
    rng = np.random.default_rng(11)
    key = rng.standard_normal((12, 2, 8))
    positions = np.arange(100, 112)
    index = np.arange(12).reshape(3, 4)
    weight = np.full((3, 4), 0.25, np.float32)
    mixed_key, _ = ref.bilevel_kv_gather(
        ref.apply_rope(key, positions, 1e6), key, index, weight, positions, np.zeros(3, np.int64), 1e6
    )
    np.testing.assert_allclose(mixed_key, ref.pool_visual_kv(key, 4), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="source_position"):
        ref.bilevel_kv_gather(key, key, index, weight, positions[:5], np.zeros(3, np.int64), 1e6)


def test_pool_visual_kv() -> None:
    rng = np.random.default_rng(10)
    kv = rng.standard_normal((7 * POOL_STRIDE, 3, 10))
    got = ref.pool_visual_kv(kv, POOL_STRIDE)
    want = np.stack([kv[n * POOL_STRIDE : (n + 1) * POOL_STRIDE].mean(axis=0) for n in range(7)])
    np.testing.assert_allclose(got, want, rtol=1e-14)
    with pytest.raises(ValueError, match="multiple"):
        ref.pool_visual_kv(kv[:-1], POOL_STRIDE)


# --- block scores and top-k ------------------------------------------------------------------------


def brute_force_block_scores(q, k, bounds, scale) -> np.ndarray:
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    scores = np.zeros(len(bounds))
    for h in range(num_q_heads):
        for i in range(q.shape[0]):
            logits = k[:, h // (num_q_heads // num_kv_heads)] @ q[i, h] * scale
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            for b, (start, end) in enumerate(bounds):
                for j in range(start, min(end, len(probs))):  # keys past the ones given are not seen
                    scores[b] += probs[j]
    return scores


def test_block_scores_match_brute_force() -> None:
    rng = np.random.default_rng(11)
    layout = make_layout(rng, groups=9)
    plan = bilevel_plan(layout, block_groups=2, dense_blocks=always_dense_blocks(6), pool_stride=POOL_STRIDE)
    keys = rng.standard_normal((plan.length, 2, 12))
    queries = rng.standard_normal((5, 6, 12))
    got = ref.block_scores(queries, keys, plan.block_bounds, 12**-0.5)
    want = brute_force_block_scores(queries, keys, plan.block_bounds, 12**-0.5)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the blocks tile the cache: total mass = heads x queries
    np.testing.assert_allclose(got.sum(), 6 * 5, rtol=1e-12)
    single = ref.block_scores(queries.astype(np.float32), keys.astype(np.float32), plan.block_bounds, 12**-0.5)
    np.testing.assert_allclose(single, want, rtol=1e-5)


def brute_force_causal_block_scores(q, past_k, own_k, bounds, scale) -> np.ndarray:
    """Query i attends to the past and the question's own keys 0..i, one query at a time."""
    scores = np.zeros(len(bounds))
    for i in range(q.shape[0]):
        scores += brute_force_block_scores(q[i : i + 1], np.concatenate([past_k, own_k[: i + 1]]), bounds, scale)
    return scores


@pytest.mark.parametrize("past", [0, 1, 9])
def test_block_scores_with_a_causal_tail_match_brute_force(past: int) -> None:
    rng = np.random.default_rng(13 + past)
    num_queries = 4
    past_k, own_k = rng.standard_normal((past, 2, 12)), rng.standard_normal((num_queries, 2, 12))
    queries = rng.standard_normal((num_queries, 6, 12))
    keys = np.concatenate([past_k, own_k])
    n = len(keys)
    # blocks inside the past, straddling the tail, inside it, the last key alone, all keys, empty
    bounds = np.array([(0, max(1, past // 2)), (max(0, past - 1), past + 2), (past + 1, n), (n - 1, n), (0, n), (2, 2)])
    got = ref.block_scores(queries, keys, bounds, 12**-0.5, causal_tail=num_queries)
    want = brute_force_causal_block_scores(queries, past_k, own_k, bounds, 12**-0.5)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got[4], 6 * num_queries, rtol=1e-12)  # each (head, query) softmax sums to 1
    assert got[3] < 6  # the last key is seen by the last query only
    assert not np.allclose(got, ref.block_scores(queries, keys, bounds, 12**-0.5))  # the tail matters
    for wrong in (1, num_queries + 1, -1):
        with pytest.raises(ValueError, match="causal_tail"):
            ref.block_scores(queries, keys, bounds, 12**-0.5, causal_tail=wrong)


@pytest.mark.parametrize("k", [0, 1, 3, 7, 50])
def test_top_k_blocks_matches_select_dense_blocks(k: int) -> None:
    rng = np.random.default_rng(12 + k)
    for num_blocks in (1, 2, 4, 13):
        scores = rng.integers(0, 4, size=num_blocks).astype(np.float32)  # many ties
        dense = always_dense_blocks(num_blocks)
        top = ref.top_k_blocks(scores, k, dense)
        assert top.dtype == np.int64
        assert set(top.tolist()) | dense == select_dense_blocks(scores, num_blocks=num_blocks, top_k=k)
        assert len(top) == min(k, num_blocks - len(dense))
        ranked = [(-scores[b], b) for b in top]
        assert ranked == sorted(ranked)  # best first, ties to the earlier block


def test_top_k_blocks_ranks_nan_last() -> None:
    scores = np.array([1.0, np.nan, 0.5, np.nan, 2.0])
    assert ref.top_k_blocks(scores, 5, {0}).tolist() == [4, 2, 1, 3]
