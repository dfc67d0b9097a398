/* Bi-level KV cache kernels (videoxl.ops.BILEVEL_KV_GATHER and the sparse tier).
 *
 * Layouts are token-major and contiguous: (tokens, num_heads, head_dim).
 */
#ifndef VIDEOXL_BILEVEL_KV_H_
#define VIDEOXL_BILEVEL_KV_H_

#include "../common/videoxl_kernels.h"

/* BilevelKVGather (op contract v2): for m in [0, M), with i = gather_index[m, s]
 *     mixed_value[m] = sum_s gather_weight[m, s] * value[i]
 *     mixed_key[m]   = RoPE(sum_s gather_weight[m, s] * RoPE(key[i], -source_position[i]),
 *                           target_position[m])
 * with float32 accumulation (s = 0, 1, ... in order). RoPE is rotate-half over pairs
 * (j, j + D/2), angle float(position) * inv_freq[j], inv_freq[j] = 1 / rope_theta ** (float(2j) / D)
 * in float32 (Hugging Face's formula); position 0 is the identity.
 *   key, value          (num_source, num_kv_heads, head_dim), key row n rotated at source_position[n]
 *   gather_index        (num_mixed, gather_width) int64 in [0, num_source)
 *   gather_weight       (num_mixed, gather_width) float32
 *   source_position     (num_source,) int64 (0: the key is stored before RoPE)
 *   target_position     (num_mixed,) int64 (0: the pooled key stays before RoPE)
 *   mixed_key/value     (num_mixed, num_kv_heads, head_dim)
 *   head_dim            even, at most 1024
 * Out-of-range indices contribute nothing. Returns 0, a VideoxlStatus (< 0) or a
 * cudaError_t (> 0). */
VIDEOXL_API int videoxl_bilevel_kv_gather(
    const void* key, const void* value,
    const int64_t* gather_index, const float* gather_weight,
    const int64_t* source_position, const int64_t* target_position,
    void* mixed_key, void* mixed_value,
    int64_t num_source, int64_t num_mixed, int32_t gather_width,
    int32_t num_kv_heads, int32_t head_dim,
    float rope_theta, VideoxlDType dtype, cudaStream_t stream);

/* Average pool along tokens with kernel = stride (the sparse tier of a block's visual KV):
 *     output[n] = (sum_{s < stride} input[n * stride + s]) / stride,   n in [0, num_output)
 *   input   (num_output * stride, num_heads, head_dim)
 *   output  (num_output, num_heads, head_dim)
 * float32 accumulation. Call once for keys (before RoPE) and once for values. */
VIDEOXL_API int videoxl_pool_kv(
    const void* input, void* output,
    int64_t num_output, int32_t stride, int32_t num_heads, int32_t head_dim,
    VideoxlDType dtype, cudaStream_t stream);

#endif /* VIDEOXL_BILEVEL_KV_H_ */
