"""Numpy reference of every CUDA kernel in this folder: the numerics the kernels must match.

Each function states its semantics in the shape of the op contract (`videoxl.ops`), in
plain numpy, so that a reader can check a kernel against a dozen lines. Precision rule:
float64 inputs are computed in float64 (the exact semantics, used to test this module
against brute force); anything else (float32, float16, bfloat16-as-float32) is computed in
float32, the accumulation precision of the kernels. Pass ``dtype=np.float64`` to compute
in float64 whatever the inputs.

RoPE follows Hugging Face Qwen2 exactly: ``inv_freq`` in float32, the angle
``position * inv_freq`` as a float32 product, rotate-half pairing (i, i + D/2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from videoxl.ops import BILEVEL_KV_GATHER, CHUNK_SPARSE_ATTENTION

__all__ = [
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "chunk_visibility_mask",
    "chunk_sparse_attention",
    "bilevel_kv_gather",
    "pool_visual_kv",
    "block_scores",
    "top_k_blocks",
]


def _compute_dtype(*arrays: np.ndarray, dtype: type | None = None) -> type:
    if dtype is not None:
        return np.dtype(dtype).type
    return np.float64 if all(np.asarray(a).dtype == np.float64 for a in arrays) else np.float32


def _softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    weights = np.exp(shifted)
    return weights / np.sum(weights, axis=axis, keepdims=True)


# --- RoPE ----------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """(D/2,) float32: 1 / theta ** (arange(0, D, 2) / D), all in float32 as in Hugging Face.

    The float32 power is the correctly rounded one (numpy, glibc, and the kernels' double
    power rounded once). torch's vectorised CPU pow may differ from it by one ulp for a few
    pairs; the angle error that causes is below 2e-6 rad at position 40k.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def rope_cos_sin(
    positions: np.ndarray, head_dim: int, theta: float, *, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (N, D) for integer positions (N,).

    The angle is the float32 product position * inv_freq (exactly Hugging Face's); only
    cos/sin themselves are evaluated in `dtype`.
    """
    freqs = np.asarray(positions).astype(np.float32)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1).astype(dtype)
    return np.cos(emb), np.sin(emb)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, positions: np.ndarray, theta: float, *, dtype: type | None = None) -> np.ndarray:
    """x (N, H, D) rotated at positions (N,): x * cos + rotate_half(x) * sin."""
    compute = _compute_dtype(x, dtype=dtype)
    x = np.asarray(x, dtype=compute)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, dtype=compute)
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


# --- ChunkSparseAttention --------------------------------------------------------------------


def chunk_visibility_mask(
    num_queries: int,
    num_keys: int,
    prefix_len: int,
    window_start: int,
    past_timestamp_index: np.ndarray,
    timestamp_query_index: np.ndarray,
) -> np.ndarray:
    """(Q, K) bool: which keys each chunk query sees (the chunk's mask, never L x L)."""
    past = num_keys - num_queries
    query_pos = past + np.arange(num_queries)[:, None]  # (Q, 1) absolute positions
    key_pos = np.arange(num_keys)[None, :]  # (1, K)
    causal = key_pos <= query_pos
    sparse_past = key_pos < prefix_len
    sparse_past = sparse_past | (key_pos >= window_start)
    timestamp_keys = np.zeros(num_keys, dtype=bool)
    timestamp_keys[np.asarray(past_timestamp_index, dtype=np.int64)] = True
    sparse_past = sparse_past | timestamp_keys[None, :]
    is_ts = np.zeros(num_queries, dtype=bool)
    is_ts[np.asarray(timestamp_query_index, dtype=np.int64)] = True
    return causal & (is_ts[:, None] | sparse_past)


def _check_chunk_inputs(
    query: np.ndarray, key: np.ndarray, value: np.ndarray, prefix_len: int, window_start: int,
    past_timestamp_index: np.ndarray, timestamp_query_index: np.ndarray,
) -> None:
    num_queries, num_q_heads, head_dim = query.shape
    num_keys, num_kv_heads, key_dim = key.shape
    past = num_keys - num_queries
    if key.shape != value.shape or key_dim != head_dim:
        raise ValueError(f"key {key.shape} / value {value.shape} do not match query {query.shape}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads not a multiple of {num_kv_heads} KV heads")
    if past < 0:
        raise ValueError(f"{num_keys} keys < {num_queries} queries: keys must be past + chunk")
    if not 0 <= prefix_len <= window_start <= past:
        raise ValueError(f"need 0 <= prefix_len ({prefix_len}) <= window_start ({window_start}) <= past ({past})")
    ts = np.asarray(past_timestamp_index, dtype=np.int64)
    if ts.size and (ts.min() < prefix_len or ts.max() >= window_start):
        raise ValueError(f"past_timestamp_index must lie in [prefix_len, window_start) = [{prefix_len}, {window_start})")
    if ts.size != np.unique(ts).size:
        raise ValueError("past_timestamp_index has duplicates")
    tq = np.asarray(timestamp_query_index)
    if tq.ndim != 1 or (tq.size and not np.issubdtype(tq.dtype, np.integer)):
        raise ValueError(f"timestamp_query_index must be a 1-D integer list, got {tq.dtype} {tq.shape}")
    if tq.size and (tq.min() < 0 or tq.max() >= num_queries or np.any(np.diff(tq) <= 0)):
        raise ValueError(f"timestamp_query_index must be ascending, unique, in [0, {num_queries})")


def chunk_sparse_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    prefix_len: int,
    window_start: int,
    past_timestamp_index: np.ndarray,
    timestamp_query_index: np.ndarray,
    scale: float,
    *,
    dtype: type | None = None,
) -> np.ndarray:
    """ChunkSparseAttention: (Q, Hq, D) queries over (K, Hkv, D) keys -> (Q, Hq, D).

    Query i sits at position p = (K - Q) + i; a timestamp query (i in the ascending list
    timestamp_query_index) sees keys [0, p], any other
    [0, prefix_len) U past_timestamp_index U [window_start, p]. Query head h reads KV head
    h // (Hq / Hkv).
    """
    _check_chunk_inputs(query, key, value, prefix_len, window_start, past_timestamp_index, timestamp_query_index)
    compute = _compute_dtype(query, key, value, dtype=dtype)
    q = np.asarray(query, dtype=compute)
    k = np.asarray(key, dtype=compute)
    v = np.asarray(value, dtype=compute)
    num_queries, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (K, Hq, D)
    v = np.repeat(v, group, axis=1)
    mask = chunk_visibility_mask(
        num_queries, k.shape[0], prefix_len, window_start, past_timestamp_index, timestamp_query_index
    )
    logits = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * compute(scale)  # (Hq, Q, K)
    logits = np.where(mask[None], logits, compute(-np.inf))
    weights = _softmax(logits, axis=-1)
    return (weights @ v.transpose(1, 0, 2)).transpose(1, 0, 2).astype(compute)  # (Q, Hq, D)


# --- BilevelKVGather and the sparse tier ------------------------------------------------------


def bilevel_kv_gather(
    key: np.ndarray,
    value: np.ndarray,
    gather_index: np.ndarray,
    gather_weight: np.ndarray,
    rope_theta: float,
    *,
    dtype: type | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BilevelKVGather: mixed[m] = sum_s w[m, s] * source[index[m, s]]; keys rotated at m.

    key/value (N, Hkv, D) before RoPE; gather_index (M, S) int64; gather_weight (M, S)
    float32. Returns mixed_key, mixed_value (M, Hkv, D).
    """
    index = np.asarray(gather_index, dtype=np.int64)
    if index.ndim != 2 or np.shape(gather_weight) != index.shape:
        raise ValueError(f"gather_index {index.shape} and gather_weight {np.shape(gather_weight)} must be (M, S)")
    if index.size and (index.min() < 0 or index.max() >= key.shape[0]):
        raise ValueError(f"gather_index outside [0, {key.shape[0]})")
    compute = _compute_dtype(key, value, dtype=dtype)
    weight = np.asarray(gather_weight, dtype=np.float32).astype(compute)[:, :, None, None]
    k = np.asarray(key, dtype=compute)
    v = np.asarray(value, dtype=compute)
    # Sequential sum over s (s = 0, 1, ...), the order the kernel accumulates in.
    mixed_key = np.zeros((index.shape[0],) + k.shape[1:], dtype=compute)
    mixed_value = np.zeros_like(mixed_key)
    for s in range(index.shape[1]):
        mixed_key += weight[:, s] * k[index[:, s]]
        mixed_value += weight[:, s] * v[index[:, s]]
    positions = np.arange(index.shape[0], dtype=np.int64)
    return apply_rope(mixed_key, positions, rope_theta, dtype=compute), mixed_value


def pool_visual_kv(kv: np.ndarray, stride: int, *, dtype: type | None = None) -> np.ndarray:
    """Average pool along tokens with kernel = stride: (n * stride, H, D) -> (n, H, D)."""
    if stride < 1 or kv.shape[0] % stride:
        raise ValueError(f"{kv.shape[0]} tokens are not a multiple of stride {stride}")
    compute = _compute_dtype(kv, dtype=dtype)
    x = np.asarray(kv, dtype=compute)
    total = x.reshape(kv.shape[0] // stride, stride, *kv.shape[1:]).sum(axis=1)
    return total / compute(stride)


# --- block scoring for the bi-level reload ---------------------------------------------------


def block_scores(
    query: np.ndarray,
    key: np.ndarray,
    block_bounds: Sequence[tuple[int, int]] | np.ndarray,
    scale: float,
    *,
    dtype: type | None = None,
) -> np.ndarray:
    """Attention mass each block receives from the queries of one layer -> (num_blocks,).

    query (Q, Hq, D) and key (N, Hkv, D) both rotated. Per (head, query) a softmax over all
    N keys (they are all in the queries' past); the probabilities are summed over heads and
    queries, then over each block's key range [start, end).
    """
    compute = _compute_dtype(query, key, dtype=dtype)
    q = np.asarray(query, dtype=compute)
    k = np.asarray(key, dtype=compute)
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    logits = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * compute(scale)  # (Hq, Q, N)
    mass = _softmax(logits, axis=-1).sum(axis=(0, 1))  # (N,)
    bounds = np.asarray(block_bounds, dtype=np.int64).reshape(-1, 2)
    return np.array([mass[start:end].sum() for start, end in bounds], dtype=compute)


def top_k_blocks(scores: np.ndarray, k: int, always_dense: Iterable[int]) -> np.ndarray:
    """The k best blocks outside `always_dense`, best first; ties go to the earlier block.

    Returns (min(k, candidates),) int64. NaN scores rank as -inf. Together with
    `always_dense` this is `videoxl.layout.select_dense_blocks`.
    """
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isnan(values), -np.inf, values)
    excluded = set(int(b) for b in always_dense)
    candidates = [b for b in range(values.shape[0]) if b not in excluded]
    ranked = sorted(candidates, key=lambda b: (-values[b], b))
    return np.asarray(ranked[: max(0, k)], dtype=np.int64)


# The contracts these functions implement, for readers jumping from the op definitions.
CONTRACTS = {
    CHUNK_SPARSE_ATTENTION.name: chunk_sparse_attention,
    BILEVEL_KV_GATHER.name: bilevel_kv_gather,
}
