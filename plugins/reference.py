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
    "visible_past_index",
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

    The float32 power is the correctly rounded one (the double power rounded once, as the
    kernels compute it). torch's vectorised CPU pow may differ from it by one ulp for a few
    pairs; the angle error that causes is below 2e-6 rad at position 40k.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # The power in float64, rounded once: numpy's float32 power is not correctly rounded on
    # every build (it differed by one ulp here), the double one rounded once is.
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


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


def visible_past_index(prefix_len: int, past_timestamp_index: np.ndarray, window_start: int, past_len: int) -> np.ndarray:
    """(V,) int64 ascending: [0, prefix_len) U past_timestamp_index U [window_start, past_len).

    The index list a chunk of the evaluation rule reads its past through (DESIGN §2); the
    timestamp list must lie in [prefix_len, window_start), so the three parts never overlap.
    """
    return np.concatenate(
        [
            np.arange(prefix_len, dtype=np.int64),
            np.asarray(past_timestamp_index, dtype=np.int64).reshape(-1),
            np.arange(window_start, past_len, dtype=np.int64),
        ]
    )


def chunk_visibility_mask(
    num_queries: int,
    past_len: int,
    visible_past_index: np.ndarray,
    timestamp_query_index: np.ndarray,
) -> np.ndarray:
    """(Q, past_len + Q) bool over [past rows 0..past_len) ++ [chunk keys]: what each query sees.

    The chunk's mask (never L x L): a timestamp query sees every past row, any other query the
    rows in visible_past_index; every query sees chunk keys 0..i.
    """
    visible = np.zeros(past_len, dtype=bool)
    visible[np.asarray(visible_past_index, dtype=np.int64)] = True
    is_ts = np.zeros(num_queries, dtype=bool)
    is_ts[np.asarray(timestamp_query_index, dtype=np.int64)] = True
    past = is_ts[:, None] | visible[None, :]  # (Q, past_len)
    causal = np.tril(np.ones((num_queries, num_queries), dtype=bool))  # (Q, Q)
    return np.concatenate([past, causal], axis=1)


def _check_chunk_inputs(
    query: np.ndarray, key: np.ndarray, value: np.ndarray, past_key: np.ndarray, past_value: np.ndarray,
    past_len: int, visible: np.ndarray, timestamp_query_index: np.ndarray,
) -> None:
    num_queries, num_q_heads, head_dim = query.shape
    if key.shape != value.shape or key.shape[0] != num_queries or key.shape[2] != head_dim:
        raise ValueError(f"key {key.shape} / value {value.shape} must be (Q, Hkv, D) for query {query.shape}")
    num_kv_heads = key.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads not a multiple of {num_kv_heads} KV heads")
    if past_key.shape != past_value.shape or past_key.shape[1:] != key.shape[1:]:
        raise ValueError(f"past_key {past_key.shape} / past_value {past_value.shape} must be (P, Hkv, D) like key {key.shape}")
    tq = np.asarray(timestamp_query_index)
    if tq.ndim != 1 or (tq.size and not np.issubdtype(tq.dtype, np.integer)):
        raise ValueError(f"timestamp_query_index must be a 1-D integer list, got {tq.dtype} {tq.shape}")
    # a compact view (fewer rows than past_len) is read only through the index list: no timestamp queries
    if past_len < 0 or (tq.size and past_len > past_key.shape[0]):
        raise ValueError(f"past_len {past_len} outside the past buffer [0, {past_key.shape[0]}] (timestamp queries read all of it)")
    rows = min(past_len, past_key.shape[0])
    if visible.ndim != 1 or (visible.size and (visible.min() < 0 or visible.max() >= rows or np.any(np.diff(visible) <= 0))):
        raise ValueError(f"visible_past_index must be ascending, unique, in [0, {rows}) (past_len {past_len}, buffer rows {past_key.shape[0]})")
    if tq.size and (tq.min() < 0 or tq.max() >= num_queries or np.any(np.diff(tq) <= 0)):
        raise ValueError(f"timestamp_query_index must be ascending, unique, in [0, {num_queries})")


def chunk_sparse_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    past_key: np.ndarray,
    past_value: np.ndarray,
    past_len: int,
    visible_past_index: np.ndarray,
    timestamp_query_index: np.ndarray,
    scale: float,
    *,
    dtype: type | None = None,
) -> np.ndarray:
    """ChunkSparseAttention (contract v2): (Q, Hq, D) chunk queries -> (Q, Hq, D).

    Query i sits at position past_len + i. It sees the past rows visible_past_index (every
    row [0, past_len) when i is in timestamp_query_index) and chunk keys 0..i. Past rows
    >= past_len are never read. Query head h reads KV head h // (Hq / Hkv). With no timestamp
    queries the buffer may be a compact view with fewer rows than past_len (videoxl.ops): the
    keys are already rotated, so only the rows read matter, not where they sit.
    """
    past_len = int(np.asarray(past_len).reshape(-1)[0])
    visible = np.asarray(visible_past_index, dtype=np.int64).reshape(-1)
    _check_chunk_inputs(query, key, value, past_key, past_value, past_len, visible, timestamp_query_index)
    past_len = min(past_len, past_key.shape[0])
    compute = _compute_dtype(query, key, value, past_key[:past_len], past_value[:past_len], dtype=dtype)
    q = np.asarray(query, dtype=compute)
    k = np.concatenate([np.asarray(past_key[:past_len], dtype=compute), np.asarray(key, dtype=compute)])
    v = np.concatenate([np.asarray(past_value[:past_len], dtype=compute), np.asarray(value, dtype=compute)])
    num_queries, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (past_len + Q, Hq, D)
    v = np.repeat(v, group, axis=1)
    mask = chunk_visibility_mask(num_queries, past_len, visible, timestamp_query_index)
    logits = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * compute(scale)  # (Hq, Q, past_len + Q)
    logits = np.where(mask[None], logits, compute(-np.inf))
    weights = _softmax(logits, axis=-1)
    return (weights @ v.transpose(1, 0, 2)).transpose(1, 0, 2).astype(compute)  # (Q, Hq, D)


# --- BilevelKVGather and the sparse tier ------------------------------------------------------


def bilevel_kv_gather(
    key: np.ndarray,
    value: np.ndarray,
    gather_index: np.ndarray,
    gather_weight: np.ndarray,
    source_position: np.ndarray,
    target_position: np.ndarray,
    rope_theta: float,
    *,
    dtype: type | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BilevelKVGather (contract v2): un-rotate, pool, re-rotate.

    key/value (N, Hkv, D), key row n rotated at source_position[n] (0: not rotated);
    gather_index (M, S) int64; gather_weight (M, S) float32; target_position (M,) int64.
        mixed_key[m]   = rope(sum_s w[m, s] * rope(key[i], -source_position[i]), target_position[m])
        mixed_value[m] = sum_s w[m, s] * value[i],   i = gather_index[m, s]
    Returns mixed_key, mixed_value (M, Hkv, D).
    """
    index = np.asarray(gather_index, dtype=np.int64)
    if index.ndim != 2 or np.shape(gather_weight) != index.shape:
        raise ValueError(f"gather_index {index.shape} and gather_weight {np.shape(gather_weight)} must be (M, S)")
    if index.size and (index.min() < 0 or index.max() >= key.shape[0]):
        raise ValueError(f"gather_index outside [0, {key.shape[0]})")
    source_position = np.asarray(source_position, dtype=np.int64).reshape(-1)
    target_position = np.asarray(target_position, dtype=np.int64).reshape(-1)
    if source_position.shape != (key.shape[0],) or target_position.shape != (index.shape[0],):
        raise ValueError(
            f"source_position {source_position.shape} must be ({key.shape[0]},) and target_position "
            f"{target_position.shape} ({index.shape[0]},)"
        )
    compute = _compute_dtype(key, value, dtype=dtype)
    weight = np.asarray(gather_weight, dtype=np.float32).astype(compute)[:, :, None, None]
    k = apply_rope(np.asarray(key, dtype=compute), -source_position, rope_theta, dtype=compute)  # un-rotated
    v = np.asarray(value, dtype=compute)
    # Sequential sum over s (s = 0, 1, ...), the order the kernel accumulates in.
    mixed_key = np.zeros((index.shape[0],) + k.shape[1:], dtype=compute)
    mixed_value = np.zeros_like(mixed_key)
    for s in range(index.shape[1]):
        mixed_key += weight[:, s] * k[index[:, s]]
        mixed_value += weight[:, s] * v[index[:, s]]
    return apply_rope(mixed_key, target_position, rope_theta, dtype=compute), mixed_value


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
    causal_tail: int = 0,
    dtype: type | None = None,
) -> np.ndarray:
    """Attention mass each block receives from the queries of one layer -> (num_blocks,).

    query (Q, Hq, D) and key (N, Hkv, D) both rotated. Per (head, query) a softmax over the
    keys the query sees; the probabilities are summed over heads and queries, then over each
    block's key range [start, end). causal_tail = 0: every key is in the queries' past.
    causal_tail = Q: the last Q keys are the queries' own, in order, and query q sees keys
    [0, N - Q + q + 1) (the past and its own keys 0..q).
    """
    num_queries, num_keys = query.shape[0], key.shape[0]
    if causal_tail not in (0, num_queries) or causal_tail > num_keys:
        raise ValueError(f"causal_tail must be 0 or the {num_queries} queries (of {num_keys} keys); got {causal_tail}")
    compute = _compute_dtype(query, key, dtype=dtype)
    q = np.asarray(query, dtype=compute)
    k = np.asarray(key, dtype=compute)
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    logits = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * compute(scale)  # (Hq, Q, N)
    if causal_tail:
        visible_keys = num_keys - causal_tail + np.arange(num_queries) + 1  # (Q,)
        logits = np.where(np.arange(num_keys)[None, :] < visible_keys[:, None], logits, -np.inf)
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
