"""Every CUDA kernel against the float64 numpy reference, through the torch wrappers.

Each case runs on two targets:

* ``gpu``: the real library on an NVIDIA GPU (skipped without one, with the reason);
* ``emulated``: the same .cu files built for the host against a CUDA emulation
  (conftest.py), launched through the same wrappers with CPU tensors. It checks the kernels'
  logic (tiling, shuffles, barriers, atomics) and this file's own code on every CI run; the
  real model's shapes are too slow for it and run on the GPU only.

The reference runs in float64 on the very inputs the kernel sees (rounded to the kernel's
dtype first), so the tolerance only covers float32 accumulation and the output rounding.
Outputs are NaN-poisoned before each launch. VIDEOXL_FULL_KERNEL_TESTS=1 runs the big matrix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

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
from videoxl.plugins import kernels as kernel_module
from videoxl.plugins import reference as ref

torch = pytest.importorskip("torch")

FULL = os.environ.get("VIDEOXL_FULL_KERNEL_TESTS") == "1"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOLERANCE)
IMAGE_TOKEN = 151654
NO_GPU = "needs an NVIDIA GPU (torch.cuda.is_available() is False); the emulated run covers the small cases on the CPU"


@dataclass(frozen=True)
class Target:
    name: str  # "gpu" or "emulated"
    device: str  # where the tensors live: "cuda" or "cpu"

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The kernel library for the test's target, loaded into the torch wrappers."""
    if request.param == "gpu":
        if not torch.cuda.is_available():
            pytest.skip(NO_GPU)
        kernel_module.use_library(None)
        kernel_module.load_library()  # builds for this GPU if needed
        yield Target("gpu", "cuda")
    else:
        kernel_module.use_library(request.getfixturevalue("emulated_kernels_library"), host_memory=True)
        yield Target("emulated", "cpu")
    kernel_module.use_library(None)


def case_id(case) -> str:
    return "x".join(map(str, case)) if isinstance(case, tuple) else str(case)


def on_targets(cases: list, gpu_only: list = ()) -> list:
    """(target, case) pairs: every case on the GPU, the small ones also on the emulation."""
    gpu = [pytest.param("gpu", c, marks=pytest.mark.gpu, id=f"gpu-{case_id(c)}") for c in [*cases, *gpu_only]]
    return gpu + [pytest.param("emulated", c, id=f"emulated-{case_id(c)}") for c in cases]


def targets_with(cases: list, gpu_only: list = ()):
    return pytest.mark.parametrize(("target", "case"), on_targets(cases, gpu_only), indirect=["target"])


dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def random(shape, dtype, generator, target: Target) -> tuple[torch.Tensor, np.ndarray]:
    """A tensor of `dtype` on the target and the float64 copy of exactly its values."""
    values = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    return values.to(target.device), values.double().numpy()


def poisoned(shape, dtype, target: Target) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=target.device)


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


# --- chunk attention -----------------------------------------------------------------------------

# (q heads, kv heads, head_dim, groups, tokens per group, timestamp tokens, chunk groups, window)
ATTENTION_CASES = [
    (4, 2, 16, 9, 12, 3, 2, 1),  # the tiny model's heads
    (7, 1, 128, 4, 16, 5, 2, 1),  # GQA 7:1 at the real head_dim, small history
    (6, 3, 32, 6, 20, 2, 3, 1),
    (2, 2, 64, 8, 8, 1, 2, 2),
]
ATTENTION_CASES_GPU = [(28, 4, 128, 10, 144, 5, 4, 1)]  # Video-XL-2: one window chunk of sparse past
if FULL:
    ATTENTION_CASES_GPU += [
        (4, 2, 16, 31, 36, 4, 4, 3),
        (8, 8, 64, 13, 40, 3, 2, 2),
        (28, 4, 128, 24, 144, 5, 4, 3),
        (14, 2, 128, 40, 60, 6, 4, 11),
    ]


@dtypes
@targets_with(ATTENTION_CASES, ATTENTION_CASES_GPU)
def test_chunk_attention(target, case, dtype) -> None:
    num_q_heads, num_kv_heads, head_dim, groups, per_group, stamp, chunk_groups, window = case
    layout = make_layout(groups, per_group, stamp)
    gen = torch.Generator().manual_seed(sum(case))
    q, q64 = random((layout.num_tokens, num_q_heads, head_dim), dtype, gen, target)
    k, k64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen, target)
    v, v64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen, target)
    scale = head_dim**-0.5
    chunks = range(num_chunks(layout, chunk_groups)) if FULL else [num_chunks(layout, chunk_groups) - 1, 0]
    visibilities = [prefix_visibility(layout)]
    visibilities += [chunk_visibility(layout, c, chunk_groups=chunk_groups, window_chunks=window) for c in chunks]
    for vis in visibilities:
        want = ref.chunk_sparse_attention(
            q64[vis.start : vis.end], k64[: vis.end], v64[: vis.end], vis.prefix_len, vis.window_start,
            vis.past_timestamp_index, vis.timestamp_query_index, scale,
        )
        out = poisoned(q[vis.start : vis.end].shape, dtype, target)
        kernel_module.chunk_attention_torch(
            q[vis.start : vis.end].contiguous(), k[: vis.end].contiguous(), v[: vis.end].contiguous(),
            prefix_len=vis.prefix_len, window_start=vis.window_start,
            past_timestamp_index=vis.past_timestamp_index, timestamp_query_index=vis.timestamp_query_index,
            scale=scale, out=out,
        )
        target.synchronize()
        assert_close(out, want, dtype, f"chunk [{vis.start}, {vis.end}) window_start {vis.window_start}")


QUERY_KINDS = [(n, share) for n in (1, 31, 33, 70) for share in (0.0, 0.2, 1.0)]  # (queries, timestamp share)
QUERY_KINDS_EMULATED = [(1, 0.2), (33, 0.0), (33, 1.0), (70, 0.2)]


@dtypes
@targets_with(QUERY_KINDS_EMULATED, [kind for kind in QUERY_KINDS if kind not in QUERY_KINDS_EMULATED])
def test_chunk_attention_query_kinds(target, case, dtype) -> None:
    """Tile edges (1, 31, 33, 70 queries) with no, some, and only timestamp queries."""
    num_queries, timestamp_share = case
    gen = torch.Generator().manual_seed(num_queries)
    past, prefix_len, window_start = 101, 7, 64
    q, q64 = random((num_queries, 4, 64), dtype, gen, target)
    k, k64 = random((past + num_queries, 2, 64), dtype, gen, target)
    v, v64 = random((past + num_queries, 2, 64), dtype, gen, target)
    timestamps = np.array([9, 10, 30, 31, 32, 63], dtype=np.int64)
    is_ts = np.random.default_rng(num_queries).random(num_queries) < timestamp_share
    ts_queries = np.flatnonzero(is_ts)
    want = ref.chunk_sparse_attention(q64, k64, v64, prefix_len, window_start, timestamps, ts_queries, 0.125)
    out = poisoned(q.shape, dtype, target)
    kernel_module.chunk_attention_torch(
        q, k, v, prefix_len=prefix_len, window_start=window_start, past_timestamp_index=timestamps,
        timestamp_query_index=ts_queries, scale=0.125, out=out,
    )
    target.synchronize()
    assert_close(out, want, dtype, f"{num_queries} queries, timestamp share {timestamp_share}")


# --- bi-level gather, pool -----------------------------------------------------------------------

# (kv heads, head_dim, groups, per group, S); 300 groups rotate at positions up to ~14k
BILEVEL_CASES = [(2, 16, 9, 12, 2), (2, 128, 5, 16, 2), (2, 32, 11, 36, 3)]
BILEVEL_CASES_GPU = [(4, 128, 12, 144, 4), (4, 128, 300, 144, 4)]
if FULL:
    BILEVEL_CASES_GPU += [(4, 128, 1200, 144, 4), (8, 64, 21, 20, 1)]


@dtypes
@targets_with(BILEVEL_CASES, BILEVEL_CASES_GPU)
def test_bilevel_kv_gather(target, case, dtype) -> None:
    num_kv_heads, head_dim, groups, per_group, block_groups = case
    layout = make_layout(groups, per_group, 4)
    num_blocks = len(block_ranges(layout, block_groups))
    dense = select_dense_blocks(np.arange(num_blocks) % 5, num_blocks=num_blocks, top_k=2)
    plan = bilevel_plan(layout, block_groups=block_groups, dense_blocks=dense, pool_stride=4)
    gen = torch.Generator().manual_seed(sum(case))
    key, key64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen, target)
    value, value64 = random((layout.num_tokens, num_kv_heads, head_dim), dtype, gen, target)
    want_key, want_value = ref.bilevel_kv_gather(key64, value64, plan.gather_index, plan.gather_weight, 1e6)
    mixed = (poisoned((plan.length, num_kv_heads, head_dim), dtype, target),
             poisoned((plan.length, num_kv_heads, head_dim), dtype, target))
    kernel_module.bilevel_kv_gather_torch(key, value, plan.gather_index, plan.gather_weight, rope_theta=1e6, out=mixed)
    target.synchronize()
    assert_close(mixed[0], want_key, dtype, "mixed_key")
    assert_close(mixed[1], want_value, dtype, "mixed_value")


@dtypes
@targets_with([(36, 4, 128), (3, 2, 16), (37, 3, 48), (9, 3, 24)], [(9000, 4, 128)] if FULL else [])
def test_pool_kv(target, case, dtype) -> None:
    num_output, heads, head_dim = case
    gen = torch.Generator().manual_seed(num_output)
    kv, kv64 = random((num_output * 4, heads, head_dim), dtype, gen, target)
    out = poisoned((num_output, heads, head_dim), dtype, target)
    kernel_module.pool_kv_torch(kv, 4, out=out)
    target.synchronize()
    assert_close(out, ref.pool_visual_kv(kv64, 4), dtype, f"pool {case}")


# --- block scores, top-k -------------------------------------------------------------------------

SCORE_CASES = [(4, 2, 16, 3, 5), (7, 1, 128, 2, 4)]  # (q heads, kv heads, head_dim, queries, groups)
SCORE_CASES_GPU = [(4, 2, 16, 7, 9), (28, 4, 128, 13, 12)]
if FULL:
    SCORE_CASES_GPU += [(28, 4, 128, 41, 120), (6, 2, 32, 5, 33), (8, 8, 64, 1, 17)]


@dtypes
@targets_with(SCORE_CASES, SCORE_CASES_GPU)
def test_block_scores_accumulate_over_layers(target, case, dtype) -> None:
    num_q_heads, num_kv_heads, head_dim, num_queries, groups = case
    layout = make_layout(groups, 36, 3)
    plan = bilevel_plan(layout, block_groups=2, dense_blocks={0}, pool_stride=4)
    gen = torch.Generator().manual_seed(sum(case))
    scores = torch.zeros(len(plan.block_bounds), dtype=torch.float32, device=target.device)
    want = np.zeros(len(plan.block_bounds))
    for _layer in range(2):
        q, q64 = random((num_queries, num_q_heads, head_dim), dtype, gen, target)
        k, k64 = random((plan.length, num_kv_heads, head_dim), dtype, gen, target)
        kernel_module.block_scores_torch(q, k, plan.block_bounds, scale=head_dim**-0.5, scores=scores)
        want += ref.block_scores(q64, k64, plan.block_bounds, head_dim**-0.5)
    target.synchronize()
    # inputs are exact in every dtype; only float32 accumulation (atomics, any order) differs
    np.testing.assert_allclose(scores.double().cpu().numpy(), want, rtol=1e-4, atol=1e-6 * want.sum())


@targets_with([1, 2, 5, 37, 640], [4000, 8192] if FULL else [])
def test_top_k_blocks(target, case) -> None:
    num_blocks = case
    rng = np.random.default_rng(num_blocks)
    scores = rng.integers(0, 7, size=num_blocks).astype(np.float32)  # ties
    scores[rng.random(num_blocks) < 0.05] = np.nan
    dense = always_dense_blocks(num_blocks)
    for k in (0, 1, 3, num_blocks):
        got = kernel_module.top_k_blocks_torch(torch.from_numpy(scores).to(target.device), k, sorted(dense))
        target.synchronize()
        want = ref.top_k_blocks(scores, k, dense)
        padded = np.full(k, -1, dtype=np.int64)
        padded[: len(want)] = want
        np.testing.assert_array_equal(got.cpu().numpy(), padded, err_msg=f"k={k}")


@pytest.mark.parametrize("target", ["emulated"], indirect=True)
def test_wrappers_refuse_tensors_on_the_wrong_side(target) -> None:
    """A host build takes contiguous CPU tensors only (the GPU library: contiguous CUDA tensors)."""
    x = torch.zeros(8, 4, 16)
    kernel_module.pool_kv_torch(x, 4)  # CPU tensors are what a host build takes
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            kernel_module.pool_kv_torch(x.cuda(), 4)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        kernel_module.pool_kv_torch(x.transpose(0, 1), 4)
