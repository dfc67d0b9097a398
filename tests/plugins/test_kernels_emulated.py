"""The CUDA kernels' logic against the numpy reference, run on the CPU (no GPU needed).

The kernel sources are compiled by the host C++ compiler against a small emulation of the
CUDA features they use (cuda_host/include): each block's threads are real threads, so the
tiling, the query partition, the shuffles, barriers and atomics all run as written; only the
`<<<>>>` launches and `extern __shared__` declarations are rewritten. The real launchers
(argument checks, dispatch) are exercised through the same ctypes signatures as the GPU
library. It cannot see GPU-only problems (shared-memory limits, alignment, speed): the GPU
tests (test_kernels_gpu.py) cover those.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

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
from videoxl.plugins import build, kernels
from videoxl.plugins import reference as ref

EMULATION_INCLUDE = Path(__file__).parent / "cuda_host" / "include"
LAUNCH = re.compile(r"(\w+(?:<[\w, ]+>)?)<<<([^;]*?)>>>\(")
DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}
DTYPE_CODE = {"fp32": kernels.DType.FLOAT32, "fp16": kernels.DType.FLOAT16, "bf16": kernels.DType.BFLOAT16}


def translate(source: str) -> str:
    source = LAUNCH.sub(lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, ", source)
    return DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_shared());", source)


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build the kernel emulation")
    work = tmp_path_factory.mktemp("emulated")
    units = []
    for path in build.kernel_sources() + build.kernel_headers():
        target = work / path.relative_to(build.PLUGIN_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text()
        if path.suffix == ".cu":
            target = target.with_suffix(".cpp")
            text = translate(text)
            units.append(str(target))
        target.write_text(text)
    library = work / "libvideoxl_kernels_emulated.so"
    command = [
        compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing",
        "-Wno-unknown-pragmas", "-I", str(EMULATION_INCLUDE), *units, "-o", str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    handle = ctypes.CDLL(str(library))
    for name, argtypes in kernels.SIGNATURES.items():
        getattr(handle, name).argtypes = argtypes
        getattr(handle, name).restype = ctypes.c_int
    return handle


# --- host buffers in the kernels' dtypes ---------------------------------------------------------


def to_device_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the kernel's storage (fp32, fp16, or bf16 bits as uint16)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "fp32":
        return values
    if dtype == "fp16":
        return values.astype(np.float16)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype(np.uint16)


def to_float64(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


def random(rng: np.random.Generator, shape, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    stored = to_device_dtype(rng.standard_normal(shape), dtype)
    return stored, to_float64(stored, dtype)


def poisoned(shape, dtype: str) -> np.ndarray:
    return to_device_dtype(np.full(shape, np.nan, np.float32), dtype)


def ptr(array: np.ndarray) -> int:
    assert array.flags.c_contiguous
    return array.ctypes.data


def assert_close(stored: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    got = to_float64(stored, dtype)
    assert not np.isnan(got).any(), f"{what}: NaN left in the output"
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


def make_layout(groups: int, tokens_per_group: int, stamp_len: int):
    stamps = [[100 + g] * (stamp_len + g % 2) for g in range(groups)]
    return build_layout(list(range(1, 8)), stamps, [200, 201], image_token_id=151654, tokens_per_group=tokens_per_group)


def run_attention(lib, q, k, v, vis, scale, dtype, num_q_heads, num_kv_heads, head_dim) -> np.ndarray:
    num_queries, num_keys = q.shape[0], k.shape[0]
    out = poisoned(q.shape, dtype)
    prefix = np.array([vis.prefix_len], np.int64)
    window = np.array([vis.window_start], np.int64)
    timestamps = np.ascontiguousarray(vis.past_timestamp_index, np.int64)
    ts_queries = np.ascontiguousarray(vis.timestamp_query_index, np.int64)
    status = lib.videoxl_chunk_attention(
        ptr(q), ptr(k), ptr(v), ptr(prefix), ptr(window), ptr(timestamps) if timestamps.size else None,
        timestamps.size, ptr(ts_queries) if ts_queries.size else None, ts_queries.size, ptr(out), num_queries, num_keys, num_q_heads, num_kv_heads, head_dim,
        scale, DTYPE_CODE[dtype], None,
    )
    assert status == 0
    return out


# --- chunk attention -------------------------------------------------------------------------------


# (q heads, kv heads, head_dim, groups, tokens per group, timestamp tokens, chunk groups, window)
ATTENTION_CASES = [
    (4, 2, 16, 7, 12, 3, 2, 1),  # the tiny model's heads
    (7, 1, 128, 4, 16, 5, 2, 1),  # GQA 7:1 at the real head_dim
    (6, 3, 32, 6, 20, 2, 3, 1),
    (2, 2, 64, 8, 8, 1, 2, 2),
]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"h{c[0]}x{c[1]}d{c[2]}")
def test_chunk_attention(lib, case, dtype) -> None:
    num_q_heads, num_kv_heads, head_dim, groups, per_group, stamp, chunk_groups, window = case
    layout = make_layout(groups, per_group, stamp)
    rng = np.random.default_rng(sum(case))
    q, q64 = random(rng, (layout.num_tokens, num_q_heads, head_dim), dtype)
    k, k64 = random(rng, (layout.num_tokens, num_kv_heads, head_dim), dtype)
    v, v64 = random(rng, (layout.num_tokens, num_kv_heads, head_dim), dtype)
    scale = head_dim**-0.5
    last = num_chunks(layout, chunk_groups) - 1
    for vis in (prefix_visibility(layout), chunk_visibility(layout, last, chunk_groups=chunk_groups, window_chunks=window)):
        want = ref.chunk_sparse_attention(
            q64[vis.start : vis.end], k64[: vis.end], v64[: vis.end], vis.prefix_len, vis.window_start,
            vis.past_timestamp_index, vis.timestamp_query_index, scale,
        )
        out = run_attention(
            lib, np.ascontiguousarray(q[vis.start : vis.end]), np.ascontiguousarray(k[: vis.end]),
            np.ascontiguousarray(v[: vis.end]), vis, scale, dtype, num_q_heads, num_kv_heads, head_dim,
        )
        assert_close(out, want, dtype, f"chunk [{vis.start}, {vis.end})")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("num_queries", [1, 33, 70])
@pytest.mark.parametrize("timestamp_share", [0.0, 0.2, 1.0])
def test_chunk_attention_query_kinds(lib, num_queries, timestamp_share, dtype) -> None:
    """Tile edges with no, some, and only timestamp queries."""
    from videoxl.layout import ChunkVisibility

    rng = np.random.default_rng(num_queries)
    past, head_dim = 45, 16
    q, q64 = random(rng, (num_queries, 2, head_dim), dtype)
    k, k64 = random(rng, (past + num_queries, 1, head_dim), dtype)
    v, v64 = random(rng, (past + num_queries, 1, head_dim), dtype)
    vis = ChunkVisibility(
        start=past, end=past + num_queries, prefix_len=3, window_start=30,
        past_timestamp_index=np.array([4, 5, 17, 29], np.int64),
        query_is_timestamp=rng.random(num_queries) < timestamp_share,
    )
    want = ref.chunk_sparse_attention(q64, k64, v64, 3, 30, vis.past_timestamp_index, vis.timestamp_query_index, 0.3)
    out = run_attention(lib, q, k, v, vis, 0.3, dtype, 2, 1, head_dim)
    assert_close(out, want, dtype, f"{num_queries} queries, timestamp share {timestamp_share}")


# --- bi-level gather, pool -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_bilevel_kv_gather(lib, dtype) -> None:
    layout = make_layout(9, 12, 3)
    num_blocks = len(block_ranges(layout, 2))
    dense = select_dense_blocks(np.arange(num_blocks) % 3, num_blocks=num_blocks, top_k=1)
    plan = bilevel_plan(layout, block_groups=2, dense_blocks=dense, pool_stride=4)
    rng = np.random.default_rng(3)
    key, key64 = random(rng, (layout.num_tokens, 2, 16), dtype)
    value, value64 = random(rng, (layout.num_tokens, 2, 16), dtype)
    index = np.ascontiguousarray(plan.gather_index, np.int64)
    weight = np.ascontiguousarray(plan.gather_weight, np.float32)
    mixed_key, mixed_value = poisoned((plan.length, 2, 16), dtype), poisoned((plan.length, 2, 16), dtype)
    status = lib.videoxl_bilevel_kv_gather(
        ptr(key), ptr(value), ptr(index), ptr(weight), ptr(mixed_key), ptr(mixed_value),
        layout.num_tokens, plan.length, 4, 2, 16, 1e6, DTYPE_CODE[dtype], None,
    )
    assert status == 0
    want_key, want_value = ref.bilevel_kv_gather(key64, value64, index, weight, 1e6)
    assert_close(mixed_key, want_key, dtype, "mixed_key")
    assert_close(mixed_value, want_value, dtype, "mixed_value")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pool_kv(lib, dtype) -> None:
    rng = np.random.default_rng(5)
    kv, kv64 = random(rng, (9 * 4, 3, 24), dtype)
    out = poisoned((9, 3, 24), dtype)
    assert lib.videoxl_pool_kv(ptr(kv), ptr(out), 9, 4, 3, 24, DTYPE_CODE[dtype], None) == 0
    assert_close(out, ref.pool_visual_kv(kv64, 4), dtype, "pool")


# --- block scores, top-k ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("heads", [(4, 2, 16), (7, 1, 128)])
def test_block_scores_accumulate(lib, heads, dtype) -> None:
    num_q_heads, num_kv_heads, head_dim = heads
    layout = make_layout(7, 12, 2)
    plan = bilevel_plan(layout, block_groups=2, dense_blocks={0, 2}, pool_stride=4)
    bounds = np.ascontiguousarray(plan.block_bounds, np.int64)
    rng = np.random.default_rng(6)
    scores = np.zeros(len(bounds), np.float32)
    want = np.zeros(len(bounds))
    for _layer in range(2):
        q, q64 = random(rng, (3, num_q_heads, head_dim), dtype)
        k, k64 = random(rng, (plan.length, num_kv_heads, head_dim), dtype)
        status = lib.videoxl_block_scores(
            ptr(q), ptr(k), ptr(bounds), ptr(scores), 3, plan.length, len(bounds), num_q_heads, num_kv_heads,
            head_dim, head_dim**-0.5, DTYPE_CODE[dtype], None,
        )
        assert status == 0
        want += ref.block_scores(q64, k64, plan.block_bounds, head_dim**-0.5)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-6 * want.sum())


@pytest.mark.parametrize("num_blocks", [1, 2, 6, 45])
def test_top_k_blocks(lib, num_blocks) -> None:
    rng = np.random.default_rng(num_blocks)
    scores = rng.integers(0, 4, size=num_blocks).astype(np.float32)
    scores[rng.random(num_blocks) < 0.1] = np.nan
    dense = always_dense_blocks(num_blocks)
    mask = np.zeros(num_blocks, np.uint8)
    mask[list(dense)] = 1
    for k in (0, 1, 3, num_blocks):
        top = np.full(max(k, 1), 1234, np.int64)
        assert lib.videoxl_top_k_blocks(ptr(scores), ptr(mask), ptr(top), num_blocks, k, None) == 0
        want = np.full(k, -1, np.int64)
        ranked = ref.top_k_blocks(scores, k, dense)
        want[: len(ranked)] = ranked
        np.testing.assert_array_equal(top[:k], want, err_msg=f"k={k}")
