/* ChunkSparseAttention (videoxl.ops.CHUNK_SPARSE_ATTENTION, op contract v2): one prefill
 * chunk's queries against the past, read in place through an index list, and the chunk itself.
 *
 * Layouts are token-major and contiguous: query/output (Q, Hq, D); key/value (Q, Hkv, D), the
 * chunk's own keys; past_key/past_value (P, Hkv, D), a buffer whose row j holds position j
 * (keys already rotated), rows >= past_len unused. Query i sits at position past_len + i and
 * sees the past rows visible_past_index (every row [0, past_len) if i is in
 * timestamp_query_index) plus chunk keys 0..i. Query head h reads KV head h / (Hq / Hkv).
 * Softmax and accumulation in float32; output in the input dtype.
 */
#ifndef VIDEOXL_CHUNK_ATTENTION_H_
#define VIDEOXL_CHUNK_ATTENTION_H_

#include <stddef.h>

#include "../common/videoxl_kernels.h"

/* All pointers are device pointers.
 *   past_len                    one int64 on the device (read by the kernel, so the launch
 *                               never waits on the host); clamped to [0, past_capacity]
 *   visible_past_index          (num_visible,) int64, ascending rows in [0, past_len); rows
 *                               outside are skipped; may be NULL when num_visible == 0
 *   timestamp_query_index       (num_timestamp_queries,) int64, ascending chunk query indices
 *                               in [0, num_queries); may be NULL when num_timestamp_queries == 0
 *   workspace                   at least videoxl_chunk_attention_workspace_bytes(...) bytes
 *                               (may be NULL when that is 0); scratch, nothing kept between calls
 *   head_dim                    16, 32, 64 or 128
 * videoxl_chunk_attention picks the kernel: the tensor-core one (fp16/bf16, head_dim 64/128,
 * compute capability 8.0+) or the SIMT one (everything else). The _simt and _mma entry points
 * force one (tests, benchmarks); _mma returns VIDEOXL_STATUS_UNSUPPORTED where it cannot run.
 * Returns 0, a VideoxlStatus (< 0) or a cudaError_t (> 0). */
VIDEOXL_API int videoxl_chunk_attention(
    const void* query, const void* key, const void* value,
    const void* past_key, const void* past_value, const int64_t* past_len,
    const int64_t* visible_past_index, int64_t num_visible,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries,
    void* output, void* workspace, size_t workspace_bytes,
    int64_t num_queries, int64_t past_capacity,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream);

VIDEOXL_API int videoxl_chunk_attention_simt(
    const void* query, const void* key, const void* value,
    const void* past_key, const void* past_value, const int64_t* past_len,
    const int64_t* visible_past_index, int64_t num_visible,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries,
    void* output, void* workspace, size_t workspace_bytes,
    int64_t num_queries, int64_t past_capacity,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream);

VIDEOXL_API int videoxl_chunk_attention_mma(
    const void* query, const void* key, const void* value,
    const void* past_key, const void* past_value, const int64_t* past_len,
    const int64_t* visible_past_index, int64_t num_visible,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries,
    void* output, void* workspace, size_t workspace_bytes,
    int64_t num_queries, int64_t past_capacity,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream);

/* Workspace bytes a launch with these shapes needs (split-KV partial softmax states of the
 * tensor-core kernel; 0 when the SIMT kernel runs). Depends on shapes only, never on the
 * device value past_len, so a plugin sizes it at build time. Negative: invalid sizes. */
VIDEOXL_API int64_t videoxl_chunk_attention_workspace_bytes(
    int64_t num_queries, int64_t past_capacity, int64_t num_visible, int64_t num_timestamp_queries,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, VideoxlDType dtype);

#endif /* VIDEOXL_CHUNK_ATTENTION_H_ */
