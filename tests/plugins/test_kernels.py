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

# The attention kernels: "simt" (every dtype and head_dim), "mma" (tensor cores: fp16/bf16 at
# head_dim 64/128, sm_80+) and "auto", the dispatching launcher. The emulated device is an
# sm_80 one whose ldmatrix / mma.sync are emulated lane by lane from the PTX ISA's fragment
# layouts (cuda_host/include), so both kernels' logic runs here; only the GPU checks that the
# hardware agrees with those layouts. The mma kernel rounds the probabilities P to the input
# dtype before P.V (as FlashAttention does): its error is about one unit roundoff u of the
# dtype times a convex combination of |V|, which TOLERANCE (fp16 2e-3 ~ 4u, u = 2^-11; bf16
# 2e-2 ~ 5u, u = 2^-8) covers together with the output rounding (u/2 relative).
VARIANTS = ["simt", "mma", "auto"]
MMA_HEAD_DIMS = (64, 128)


def skip_unless_runnable(target: Target, variant: str, dtype: torch.dtype, head_dim: int) -> None:
    if variant == "mma" and (dtype == torch.float32 or head_dim not in MMA_HEAD_DIMS):
        pytest.skip(f"the tensor-core kernel takes fp16/bf16 at head_dim {MMA_HEAD_DIMS} (test_mma_kernel_refuses_other_shapes)")


def past_buffer(rows: torch.Tensor, spare_rows: int) -> torch.Tensor:
    """A past buffer holding `rows` then `spare_rows` NaN rows the kernel must never read."""
    spare = torch.full((spare_rows, *rows.shape[1:]), float("nan"), dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, spare]).contiguous()


def visible_index(vis) -> np.ndarray:
    return ref.visible_past_index(vis.prefix_len, vis.past_timestamp_index, vis.window_start, vis.start)


# (q heads, kv heads, head_dim, groups, tokens per group, timestamp tokens, chunk groups, window)
ATTENTION_CASES = [
    (4, 2, 16, 9, 12, 3, 2, 1),  # the tiny model's heads
    (7, 1, 128, 4, 16, 5, 2, 1),  # GQA 7:1 at the real head_dim, small history
    (6, 3, 32, 6, 20, 2, 3, 1),
    (2, 2, 64, 8, 8, 1, 2, 2),
]
ATTENTION_CASES_GPU = [(28, 4, 128, 10, 144, 5, 4, 1), (14, 2, 64, 7, 37, 3, 2, 1)]
if FULL:
    ATTENTION_CASES_GPU += [
        (4, 2, 16, 31, 36, 4, 4, 3),
        (8, 8, 64, 13, 40, 3, 2, 2),
        (28, 4, 128, 24, 144, 5, 4, 3),
        (14, 2, 128, 40, 60, 6, 4, 11),
    ]


@pytest.mark.parametrize("variant", VARIANTS)
@dtypes
@targets_with(ATTENTION_CASES, ATTENTION_CASES_GPU)
def test_chunk_attention(target, case, dtype, variant) -> None:
    num_q_heads, num_kv_heads, head_dim, groups, per_group, stamp, chunk_groups, window = case
    skip_unless_runnable(target, variant, dtype, head_dim)
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
        visible = visible_index(vis)
        chunk = slice(vis.start, vis.end)
        want = ref.chunk_sparse_attention(
            q64[chunk], k64[chunk], v64[chunk], k64[: vis.start], v64[: vis.start], vis.start, visible,
            vis.timestamp_query_index, scale,
        )
        out = poisoned(q[chunk].shape, dtype, target)
        kernel_module.chunk_attention_torch(
            q[chunk].contiguous(), k[chunk].contiguous(), v[chunk].contiguous(),
            past_buffer(k[: vis.start], 5), past_buffer(v[: vis.start], 5),
            past_len=vis.start, visible_past_index=visible, timestamp_query_index=vis.timestamp_query_index,
            scale=scale, out=out, variant=variant,
        )
        target.synchronize()
        assert_close(out, want, dtype, f"{variant}: chunk [{vis.start}, {vis.end}) window_start {vis.window_start}")


QUERY_KINDS = [(n, share) for n in (1, 31, 33, 70) for share in (0.0, 0.2, 1.0)]  # (queries, timestamp share)
QUERY_KINDS_EMULATED = [(1, 0.2), (33, 0.0), (33, 1.0), (70, 0.2)]


@pytest.mark.parametrize("variant", VARIANTS)
@dtypes
@targets_with(QUERY_KINDS_EMULATED, [kind for kind in QUERY_KINDS if kind not in QUERY_KINDS_EMULATED])
def test_chunk_attention_query_kinds(target, case, dtype, variant) -> None:
    """Tile edges (1, 31, 33, 70 queries) with no, some, and only timestamp queries."""
    num_queries, timestamp_share = case
    skip_unless_runnable(target, variant, dtype, 64)
    gen = torch.Generator().manual_seed(num_queries)
    past_len = 101
    q, q64 = random((num_queries, 4, 64), dtype, gen, target)
    k, k64 = random((num_queries, 2, 64), dtype, gen, target)
    v, v64 = random((num_queries, 2, 64), dtype, gen, target)
    past_k, past_k64 = random((past_len + 6, 2, 64), dtype, gen, target)  # 6 rows beyond past_len
    past_v, past_v64 = random((past_len + 6, 2, 64), dtype, gen, target)
    visible = ref.visible_past_index(7, np.array([9, 10, 30, 31, 32, 63]), 64, past_len)
    is_ts = np.random.default_rng(num_queries).random(num_queries) < timestamp_share
    ts_queries = np.flatnonzero(is_ts)
    want = ref.chunk_sparse_attention(q64, k64, v64, past_k64, past_v64, past_len, visible, ts_queries, 0.125)
    out = poisoned(q.shape, dtype, target)
    kernel_module.chunk_attention_torch(
        q, k, v, past_k, past_v, past_len=past_len, visible_past_index=visible,
        timestamp_query_index=ts_queries, scale=0.125, out=out, variant=variant,
    )
    target.synchronize()
    assert_close(out, want, dtype, f"{variant}: {num_queries} queries, timestamp share {timestamp_share}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@targets_with([(101, 33), (700, 9)])
def test_chunk_attention_reads_a_compact_past(target, case, dtype, variant) -> None:
    """The streaming rule's compact view (dense tier on the host): the kept rows, in position
    order, in a buffer shorter than past_len. The output equals the full buffer's, because the
    kernel reads past rows only through visible_past_index."""
    past_len, num_queries = case
    gen = torch.Generator().manual_seed(past_len)
    q, q64 = random((num_queries, 14, 64), dtype, gen, target)
    k, k64 = random((num_queries, 2, 64), dtype, gen, target)
    v, v64 = random((num_queries, 2, 64), dtype, gen, target)
    past_k, past_k64 = random((past_len, 2, 64), dtype, gen, target)
    past_v, past_v64 = random((past_len, 2, 64), dtype, gen, target)
    visible = ref.visible_past_index(7, np.array([9, 10, 30, 31, 32, 63]), past_len - 20, past_len)
    no_ts = np.zeros(0, np.int64)
    want = ref.chunk_sparse_attention(q64, k64, v64, past_k64, past_v64, past_len, visible, no_ts, 0.125)
    kept = torch.as_tensor(visible, device=q.device)
    out = poisoned(q.shape, dtype, target)
    kernel_module.chunk_attention_torch(  # kept rows only, then NaN rows the kernel must not read
        q, k, v, past_buffer(past_k[kept], 2), past_buffer(past_v[kept], 2), past_len=past_len,
        visible_past_index=np.arange(len(visible)), timestamp_query_index=no_ts, scale=0.125, out=out, variant=variant,
    )
    target.synchronize()
    assert_close(out, want, dtype, f"{variant}: compact past of {len(visible)} rows at past_len {past_len}")


@pytest.mark.parametrize("target", ["emulated"], indirect=True)
def test_mma_kernel_refuses_other_shapes(target) -> None:
    """fp32 and head_dim 32 are the SIMT kernel's: the tensor-core launcher says so, auto falls back."""
    for dtype, head_dim in ((torch.float32, 64), (torch.bfloat16, 32)):
        q = torch.zeros(3, 2, head_dim, dtype=dtype)
        k = torch.zeros(3, 1, head_dim, dtype=dtype)
        with pytest.raises(kernel_module.KernelError, match="unsupported"):
            kernel_module.chunk_attention_torch(
                q, k, k, k, k, past_len=0, visible_past_index=[], timestamp_query_index=[], variant="mma"
            )
        out = kernel_module.chunk_attention_torch(q, k, k, k, k, past_len=0, visible_past_index=[], timestamp_query_index=[])
        assert torch.equal(out, torch.zeros_like(q))


# (past_len, queries, timestamp queries): pasts long enough for the mma kernel to split the
# sweep (partial states merged by the second kernel), with the list and the whole past
SPLIT_CASES = [(1500, 20, 3), (1100, 9, 0)]


@pytest.mark.parametrize("variant", ["mma", "simt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@targets_with(SPLIT_CASES)
def test_chunk_attention_split_sweeps(target, case, dtype, variant) -> None:
    past_len, num_queries, num_ts = case
    rng = np.random.default_rng(past_len)
    gen = torch.Generator().manual_seed(past_len)
    q, q64 = random((num_queries, 14, 64), dtype, gen, target)
    k, k64 = random((num_queries, 2, 64), dtype, gen, target)
    v, v64 = random((num_queries, 2, 64), dtype, gen, target)
    past_k, past_k64 = random((past_len + 3, 2, 64), dtype, gen, target)
    past_v, past_v64 = random((past_len + 3, 2, 64), dtype, gen, target)
    visible = np.sort(rng.choice(past_len, size=past_len * 2 // 3, replace=False)).astype(np.int64)
    ts_queries = np.sort(rng.choice(num_queries, size=num_ts, replace=False)).astype(np.int64)
    size = kernel_module.chunk_attention_workspace_bytes(
        num_queries=num_queries, past_capacity=past_len + 3, num_visible=len(visible), num_timestamp_queries=num_ts,
        num_q_heads=14, num_kv_heads=2, head_dim=64, dtype="bf16",
    )
    assert size > 0, "this case is meant to split the sweep"
    want = ref.chunk_sparse_attention(q64, k64, v64, past_k64, past_v64, past_len, visible, ts_queries, 0.125)
    out = poisoned(q.shape, dtype, target)
    kernel_module.chunk_attention_torch(
        q, k, v, past_k, past_v, past_len=past_len, visible_past_index=visible, timestamp_query_index=ts_queries,
        scale=0.125, out=out, variant=variant,
    )
    target.synchronize()
    assert_close(out, want, dtype, f"{variant}: split sweep {case}")


# Video-XL-2 at scale (GPU only): 28/4 heads, head_dim 128, pasts of 2k / 20k / 80k keys, chunks
# of odd sizes, with the ~24 timestamp queries a chunk holds and without (the streaming rule).
# (past_len, chunk queries, timestamp queries)
REAL_CASES = [(2_000, 611, 24), (20_000, 611, 24), (20_000, 611, 0), (80_000, 596, 24), (80_000, 611, 0)]
CHECKED_ROWS = 96  # queries compared per case: every timestamp query + a random sample


def real_chunk(past_len: int, num_queries: int, num_ts: int, rng: np.random.Generator):
    """Index lists of a chunk at the end of a `past_len` history (149-token groups, window 3 chunks)."""
    group, prefix, window = 149, 14, 3 * 596
    window_start = max(prefix, past_len - window)
    stamps = [t for g in range((window_start - prefix) // group) for t in range(prefix + g * group, prefix + g * group + 5)]
    visible = ref.visible_past_index(prefix, np.array(stamps, dtype=np.int64), window_start, past_len)
    ts_queries = np.sort(rng.choice(num_queries, size=num_ts, replace=False)).astype(np.int64)
    return visible, ts_queries


def reference_rows_torch(q, k, v, past_k, past_v, past_len, visible, ts_queries, scale, rows, *, rows_per_step=16):
    """chunk_sparse_attention in float64 with torch (on the GPU there) for the chunk queries
    `rows` only: the numpy reference at 80k keys would take minutes. Checked against the numpy
    one in test_reference_rows_torch_matches_numpy."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    keys = torch.cat([past_k[:past_len], k]).double()  # (past_len + Q, Hkv, D)
    values = torch.cat([past_v[:past_len], v]).double()
    is_visible = torch.zeros(past_len, dtype=torch.bool, device=q.device)
    is_visible[torch.as_tensor(np.asarray(visible, dtype=np.int64), device=q.device)] = True
    is_ts = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    is_ts[torch.as_tensor(np.asarray(ts_queries, dtype=np.int64), device=q.device)] = True
    chunk_pos = torch.arange(q.shape[0], device=q.device)
    rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=q.device)
    outs = []
    for part in rows.split(rows_per_step):
        past_mask = is_ts[part, None] | is_visible[None, :]  # (R, past_len)
        mask = torch.cat([past_mask, chunk_pos[None, :] <= part[:, None]], dim=1)  # (R, K)
        qr = q[part].double().reshape(len(part), num_kv_heads, group, -1)
        logits = torch.einsum("rhgd,khd->rhgk", qr, keys) * scale
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.einsum("rhgk,khd->rhgd", torch.softmax(logits, dim=-1), values)
        outs.append(out.reshape(len(part), num_q_heads, -1))
    return torch.cat(outs)


@pytest.mark.parametrize("target", ["emulated"], indirect=True)
def test_reference_rows_torch_matches_numpy(target) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (torch.randn(9, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    past_k, past_v = torch.randn(30, 2, 8, dtype=torch.float64), torch.randn(30, 2, 8, dtype=torch.float64)
    visible, ts = np.array([0, 3, 4, 20]), np.array([2, 7])
    want = ref.chunk_sparse_attention(q.numpy(), k.numpy(), v.numpy(), past_k.numpy(), past_v.numpy(), 25, visible, ts, 0.3)
    rows = rng.choice(9, size=5, replace=False)
    got = reference_rows_torch(q, k, v, past_k, past_v, 25, visible, ts, 0.3, rows)
    np.testing.assert_allclose(got.numpy(), want[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: f"past{c[0]}-q{c[1]}-ts{c[2]}")
def test_chunk_attention_real_shapes(case, dtype) -> None:
    """mma, auto (= mma here) and, up to 20k keys, simt against one float64 reference."""
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    past_len, num_queries, num_ts = case
    kernel_module.use_library(None)
    target = Target("gpu", "cuda")
    rng = np.random.default_rng(past_len + num_queries + num_ts)
    gen = torch.Generator().manual_seed(past_len + num_ts)
    q, _ = random((num_queries, 28, 128), dtype, gen, target)
    k, _ = random((num_queries, 4, 128), dtype, gen, target)
    v, _ = random((num_queries, 4, 128), dtype, gen, target)
    past_k = past_buffer(random((past_len, 4, 128), dtype, gen, target)[0], 37)
    past_v = past_buffer(random((past_len, 4, 128), dtype, gen, target)[0], 37)
    visible, ts_queries = real_chunk(past_len, num_queries, num_ts, rng)
    others = np.setdiff1d(np.arange(num_queries), ts_queries)
    rows = np.unique(np.concatenate([ts_queries, rng.choice(others, CHECKED_ROWS - num_ts, replace=False),
                                     [others[0], others[-1]]]))
    want = reference_rows_torch(q, k, v, past_k, past_v, past_len, visible, ts_queries, 128**-0.5, rows)
    want = want.cpu().numpy()
    for variant in ["mma", "auto"] + (["simt"] if past_len <= 20_000 else []):
        out = poisoned(q.shape, dtype, target)
        kernel_module.chunk_attention_torch(
            q, k, v, past_k, past_v, past_len=past_len, visible_past_index=visible,
            timestamp_query_index=ts_queries, scale=128**-0.5, out=out, variant=variant,
        )
        target.synchronize()
        assert not torch.isnan(out).any(), f"{variant}: NaN left in the output (a row was never written)"
        assert_close(out[torch.as_tensor(rows, device="cuda")], want, dtype, f"{variant} {case}")


@pytest.mark.gpu
def test_mma_kernel_replays_in_a_cuda_graph_with_a_new_past_len() -> None:
    """One captured launch (workspace given, past_len a device tensor) serves a growing past."""
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    kernel_module.use_library(None)
    target = Target("gpu", "cuda")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (random((149, h, 128), torch.bfloat16, gen, target)[0] for h in (28, 4, 4))
    past_k, past_v = (random((8000, 4, 128), torch.bfloat16, gen, target)[0] for _ in range(2))
    visible = torch.arange(0, 5000, 3, device="cuda")
    ts = torch.tensor([0, 50, 148], device="cuda")
    past_len = torch.tensor([5000], dtype=torch.int64, device="cuda")
    size = kernel_module.chunk_attention_workspace_bytes(
        num_queries=149, past_capacity=8000, num_visible=visible.numel(), num_timestamp_queries=3,
        num_q_heads=28, num_kv_heads=4, head_dim=128, dtype="bf16",
    )
    workspace = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(q)

    def launch():
        kernel_module.chunk_attention_torch(
            q, k, v, past_k, past_v, past_len=past_len, visible_past_index=visible, timestamp_query_index=ts,
            out=out, workspace=workspace, variant="mma",
        )

    launch()  # warm-up outside the capture (kernel attributes are set once)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for length in (5000, 7999):
        past_len.fill_(length)
        graph.replay()
        torch.cuda.synchronize()
        vis = visible.cpu().numpy()
        want = reference_rows_torch(q, k, v, past_k, past_v, length, vis, ts.cpu().numpy(), 128**-0.5, np.array([0, 1, 50, 148]))
        assert_close(out[[0, 1, 50, 148]], want.cpu().numpy(), torch.bfloat16, f"replay at past_len {length}")


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
    # keys stored rotated at their absolute positions; the mixed cache rotated at 0..M-1
    source = np.arange(layout.num_tokens, dtype=np.int64)
    target_position = np.arange(plan.length, dtype=np.int64)
    want_key, want_value = ref.bilevel_kv_gather(
        key64, value64, plan.gather_index, plan.gather_weight, source, target_position, 1e6
    )
    mixed = (poisoned((plan.length, num_kv_heads, head_dim), dtype, target),
             poisoned((plan.length, num_kv_heads, head_dim), dtype, target))
    kernel_module.bilevel_kv_gather_torch(
        key, value, plan.gather_index, plan.gather_weight, source, target_position, rope_theta=1e6, out=mixed
    )
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


# (q heads, kv heads, head_dim, queries, past keys): a past of 0 or 1 key, so most of the mass
# sits in the causal tail
CAUSAL_CASES = [(4, 2, 16, 5, 1), (2, 1, 32, 3, 0), (3, 3, 64, 4, 6)]
CAUSAL_CASES_GPU = [(28, 4, 128, 41, 300), (4, 2, 16, 9, 0)]
if FULL:
    CAUSAL_CASES_GPU += [(28, 4, 128, 41, 20_000)]


@dtypes
@targets_with(CAUSAL_CASES, CAUSAL_CASES_GPU)
def test_block_scores_with_a_causal_tail(target, case, dtype) -> None:
    """One launch scores a question causally: query q sees the past and its own keys 0..q."""
    num_q_heads, num_kv_heads, head_dim, num_queries, past = case
    num_keys = past + num_queries
    gen = torch.Generator().manual_seed(sum(case))
    q, q64 = random((num_queries, num_q_heads, head_dim), dtype, gen, target)
    k, k64 = random((num_keys, num_kv_heads, head_dim), dtype, gen, target)
    # one row per key (what the torch backend asks for), then blocks that straddle the tail's
    # start, lie inside it, hold its last key alone, cover everything, or are empty
    rows = [(j, j + 1) for j in range(num_keys)]
    bounds = np.array([*rows, (0, past + 2), (max(0, past - 1), past + 1), (past + 1, num_keys),
                       (num_keys - 1, num_keys), (0, num_keys), (past, past)], dtype=np.int64)
    scores = kernel_module.block_scores_torch(q, k, bounds, scale=head_dim**-0.5, causal_tail=num_queries)
    target.synchronize()
    want = ref.block_scores(q64, k64, bounds, head_dim**-0.5, causal_tail=num_queries)
    got = scores.double().cpu().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * num_q_heads * num_queries)
    np.testing.assert_allclose(got[-2], num_q_heads * num_queries, rtol=1e-5)  # every softmax sums to 1
    with pytest.raises(ValueError, match="causal_tail"):
        kernel_module.block_scores_torch(q, k, bounds, causal_tail=num_queries - 1)


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
