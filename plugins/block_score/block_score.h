/* Block scoring for the bi-level reload (DESIGN §3): how much attention the question's
 * queries pay to each block of the cache, and the top-k blocks to reload dense.
 */
#ifndef VIDEOXL_BLOCK_SCORE_H_
#define VIDEOXL_BLOCK_SCORE_H_

#include "../common/videoxl_kernels.h"

/* Largest num_blocks videoxl_block_scores accepts (a float per block in shared memory). */
#define VIDEOXL_MAX_SCORE_BLOCKS 8192

/* One layer's contribution to the block scores, ADDED to `scores` (zero it once, then call
 * once per layer):
 *     prob[h, q, :] = softmax_j(scale * query[q, h] . key[j, h / (Hq / Hkv)])  over j < visible(q)
 *     scores[b]    += sum_{h, q} sum_{j in [block_bounds[b, 0], block_bounds[b, 1]), j < visible(q)} prob[h, q, j]
 *   query         (num_queries, num_q_heads, head_dim), RoPE applied
 *   key           (num_keys, num_kv_heads, head_dim), RoPE applied
 *   causal_tail   0: every key is in the queries' past, visible(q) = num_keys;
 *                 num_queries: the last num_queries keys are the queries' own, in order, and query q
 *                 sees the past and its own keys 0..q: visible(q) = num_keys - num_queries + q + 1
 *                 (one launch scores a whole question causally); any other value is rejected
 *   block_bounds  (num_blocks, 2) int64 [start, end) into the key axis
 *   scores        (num_blocks,) float32, accumulated with atomics (order not deterministic)
 * Returns 0, a VideoxlStatus (< 0) or a cudaError_t (> 0). */
VIDEOXL_API int videoxl_block_scores(
    const void* query, const void* key, const int64_t* block_bounds, float* scores,
    int64_t num_queries, int64_t num_keys, int64_t causal_tail, int32_t num_blocks,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream);

/* The k best blocks outside the always-dense ones, best first; ties go to the earlier block
 * (videoxl.layout.select_dense_blocks); NaN ranks as -inf.
 *   scores        (num_blocks,) float32
 *   always_dense  (num_blocks,) bool, one byte each: excluded from the ranking
 *   top_blocks    (k,) int64 output: block indices, -1 past the number of candidates
 * Returns 0, a VideoxlStatus (< 0) or a cudaError_t (> 0). */
VIDEOXL_API int videoxl_top_k_blocks(
    const float* scores, const uint8_t* always_dense, int64_t* top_blocks,
    int32_t num_blocks, int32_t k, cudaStream_t stream);

#endif /* VIDEOXL_BLOCK_SCORE_H_ */
