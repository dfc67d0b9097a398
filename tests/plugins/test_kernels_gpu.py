"""Every CUDA kernel against the numpy reference on fresh random inputs (needs a GPU).

The reference runs in float64 on the very inputs the kernel sees (rounded to the kernel's
dtype first), so the tolerance only covers float32 accumulation and the output rounding.
Outputs are NaN-poisoned before each launch. VIDEOXL_FULL_KERNEL_TESTS=1 runs the big matrix.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from videoxl.layout import (
    always_dense_blocks,
    bilevel_plan,
    block_ranges,
    build_layout,
    chunk_visibility,
    num_chunks,
    prefix_visibility,
    select_dense_blocks,
)
from videoxl.plugins import reference as ref

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
]

FULL = os.environ.get("VIDEOXL_FULL_KERNEL_TESTS") == "1"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOLERANCE)
IMAGE_TOKEN = 151654


@pytest.fixture(scope="module", autouse=True)
def kernels():
    from videoxl.plugins import kernels as module

    module.load_library()  # builds for this GPU if needed
    return module


def random(shape, dtype, generator) -> tuple[torch.Tensor, np.ndarray]:
    """A CUDA tensor of `dtype` and the float64 copy of exactly its values."""
    values = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    return values.cuda(), values.double().numpy()


def assert_close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype, what: str) -> None:
    result = got.double().cpu().numpy()
    assert not np.isnan(result).any(), f"{what}: NaN left in the output (an element was never written)"
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(result, want, rtol=tol, atol=tol, err_msg=what)


def make_layout(groups: int, tokens_per_group: int, stamp_len: int, prefix: int = 14, suffix: int = 9):
    stamps = [[100 + (g + t) % 50 for t in range(stamp_len + g % 2)] for g in range(groups)]
    return build_layout(
        list(range(1, prefix + 1)), stamps, list(range(200, 200 + suffix)),
        image_token_id=IMAGE_TOKEN, tokens_per_group=tokens_per_group,
    )


# (q heads, kv heads, head_dim, groups, tokens per group, timestamp tokens, chunk groups, window)
ATTENTION_CASES = [
    (4, 2, 16, 9, 12, 3, 2, 1),  # the tiny model's heads
    (28, 4, 128, 10, 144, 5, 4, 1),  # Video-XL-2: GQA 7:1, one window chunk of sparse past
]
if FULL:
    ATTENTION_CASES += [
        (4, 2, 16, 31, 36, 4, 4, 3),
        (6, 2, 32, 17, 20, 2, 3, 2),
        (8, 8, 64, 13, 40, 3, 2, 2),
        (28, 4, 128, 24, 144, 5, 4, 3),
        (14, 2, 128, 40, 60, 6, 4, 11),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"h{c[0]}x{c[1]}d{c[2]}g{c[3]}")
def test_chunk_attention(kernels, case, dtype) -> None:
    num_q_heads, num_kv_heads, head_dim, groups, per_group, stamp, chunk_groups, window = case
    layout = make_layout(groups, per_group, stamp)
    gen = torch.Generator().manual_seed(sum(case))
    q, q64 = random((layout.num_tokens, num_q_heads, head_dim), dtype, gen)
    k, k64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen)
    v, v64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen)
    scale = head_dim**-0.5
    chunks = range(num_chunks(layout, chunk_groups)) if FULL else [num_chunks(layout, chunk_groups) - 1, 0]
    visibilities = [prefix_visibility(layout)]
    visibilities += [chunk_visibility(layout, c, chunk_groups=chunk_groups, window_chunks=window) for c in chunks]
    for vis in visibilities:
        want = ref.chunk_sparse_attention(
            q64[vis.start : vis.end], k64[: vis.end], v64[: vis.end], vis.prefix_len, vis.window_start,
            vis.past_timestamp_index, vis.timestamp_query_index, scale,
        )
        out = torch.full_like(q[vis.start : vis.end], float("nan"))
        kernels.chunk_attention_torch(
            q[vis.start : vis.end].contiguous(), k[: vis.end].contiguous(), v[: vis.end].contiguous(),
            prefix_len=vis.prefix_len, window_start=vis.window_start,
            past_timestamp_index=vis.past_timestamp_index, timestamp_query_index=vis.timestamp_query_index,
            scale=scale, out=out,
        )
        torch.cuda.synchronize()
        assert_close(out, want, dtype, f"chunk [{vis.start}, {vis.end}) window_start {vis.window_start}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_queries", [1, 31, 33, 70])
@pytest.mark.parametrize("timestamp_share", [0.0, 0.2, 1.0])
def test_chunk_attention_query_kinds(kernels, num_queries, timestamp_share, dtype) -> None:
    """Tile edges (1, 31, 33, 70 queries) with no, some, and only timestamp queries."""
    gen = torch.Generator().manual_seed(num_queries)
    past, prefix_len, window_start = 101, 7, 64
    q, q64 = random((num_queries, 4, 64), dtype, gen)
    k, k64 = random((past + num_queries, 2, 64), dtype, gen)
    v, v64 = random((past + num_queries, 2, 64), dtype, gen)
    timestamps = np.array([9, 10, 30, 31, 32, 63], dtype=np.int64)
    is_ts = np.random.default_rng(num_queries).random(num_queries) < timestamp_share
    ts_queries = np.flatnonzero(is_ts)
    want = ref.chunk_sparse_attention(q64, k64, v64, prefix_len, window_start, timestamps, ts_queries, 0.125)
    out = torch.full_like(q, float("nan"))
    kernels.chunk_attention_torch(
        q, k, v, prefix_len=prefix_len, window_start=window_start, past_timestamp_index=timestamps,
        timestamp_query_index=ts_queries, scale=0.125, out=out,
    )
    torch.cuda.synchronize()
    assert_close(out, want, dtype, f"{num_queries} queries, timestamp share {timestamp_share}")


# (kv heads, head_dim, groups, per group, S); 300 groups rotate at positions up to ~14k
BILEVEL_CASES = [(2, 16, 9, 12, 2), (4, 128, 12, 144, 4), (4, 128, 300, 144, 4)]
if FULL:
    BILEVEL_CASES += [(4, 128, 1200, 144, 4), (2, 32, 50, 36, 3), (8, 64, 21, 20, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", BILEVEL_CASES, ids=lambda c: f"h{c[0]}d{c[1]}g{c[2]}")
def test_bilevel_kv_gather(kernels, case, dtype) -> None:
    num_kv_heads, head_dim, groups, per_group, block_groups = case
    layout = make_layout(groups, per_group, 4)
    num_blocks = len(block_ranges(layout, block_groups))
    dense = select_dense_blocks(np.arange(num_blocks) % 5, num_blocks=num_blocks, top_k=2)
    plan = bilevel_plan(layout, block_groups=block_groups, dense_blocks=dense, pool_stride=4)
    gen = torch.Generator().manual_seed(sum(case))
    key, key64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen)
    value, value64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen)
    want_key, want_value = ref.bilevel_kv_gather(key64, value64, plan.gather_index, plan.gather_weight, 1e6)
    mixed = (torch.full((plan.length, num_kv_heads, head_dim), float("nan"), dtype=dtype, device="cuda"),
             torch.full((plan.length, num_kv_heads, head_dim), float("nan"), dtype=dtype, device="cuda"))
    kernels.bilevel_kv_gather_torch(key, value, plan.gather_index, plan.gather_weight, rope_theta=1e6, out=mixed)
    torch.cuda.synchronize()
    assert_close(mixed[0], want_key, dtype, "mixed_key")
    assert_close(mixed[1], want_value, dtype, "mixed_value")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(36, 4, 128), (3, 2, 16), (37, 3, 48)] + ([(9000, 4, 128)] if FULL else []))
def test_pool_kv(kernels, shape, dtype) -> None:
    gen = torch.Generator().manual_seed(shape[0])
    num_output, heads, head_dim = shape
    kv, kv64 = random((num_output * 4, heads, head_dim), dtype, gen)
    out = torch.full((num_output, heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    kernels.pool_kv_torch(kv, 4, out=out)
    torch.cuda.synchronize()
    assert_close(out, ref.pool_visual_kv(kv64, 4), dtype, f"pool {shape}")


SCORE_CASES = [(4, 2, 16, 7, 9), (28, 4, 128, 13, 12)]  # (q heads, kv heads, head_dim, queries, groups)
if FULL:
    SCORE_CASES += [(28, 4, 128, 41, 120), (6, 2, 32, 5, 33), (8, 8, 64, 1, 17)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: f"h{c[0]}x{c[1]}d{c[2]}q{c[3]}")
def test_block_scores_accumulate_over_layers(kernels, case, dtype) -> None:
    num_q_heads, num_kv_heads, head_dim, num_queries, groups = case
    layout = make_layout(groups, 36, 3)
    plan = bilevel_plan(layout, block_groups=2, dense_blocks={0}, pool_stride=4)
    gen = torch.Generator().manual_seed(sum(case))
    scores = torch.zeros(len(plan.block_bounds), dtype=torch.float32, device="cuda")
    want = np.zeros(len(plan.block_bounds))
    for _layer in range(2):
        q, q64 = random((num_queries, num_q_heads, head_dim), dtype, gen)
        k, k64 = random((plan.length, num_kv_heads, head_dim), dtype, gen)
        kernels.block_scores_torch(q, k, plan.block_bounds, scale=head_dim**-0.5, scores=scores)
        want += ref.block_scores(q64, k64, plan.block_bounds, head_dim**-0.5)
    torch.cuda.synchronize()
    # inputs are exact in every dtype; only float32 accumulation (atomics, any order) differs
    np.testing.assert_allclose(scores.double().cpu().numpy(), want, rtol=1e-4, atol=1e-6 * want.sum())


@pytest.mark.parametrize("num_blocks", [1, 2, 5, 37, 640] + ([4000, 8192] if FULL else []))
def test_top_k_blocks(kernels, num_blocks) -> None:
    rng = np.random.default_rng(num_blocks)
    scores = rng.integers(0, 7, size=num_blocks).astype(np.float32)  # ties
    scores[rng.random(num_blocks) < 0.05] = np.nan
    dense = always_dense_blocks(num_blocks)
    for k in (0, 1, 3, num_blocks):
        got = kernels.top_k_blocks_torch(torch.from_numpy(scores).cuda(), k, sorted(dense))
        torch.cuda.synchronize()
        want = ref.top_k_blocks(scores, k, dense)
        padded = np.full(k, -1, dtype=np.int64)
        padded[: len(want)] = want
        np.testing.assert_array_equal(got.cpu().numpy(), padded, err_msg=f"k={k}")
