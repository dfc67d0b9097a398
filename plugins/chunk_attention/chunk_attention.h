/* ChunkSparseAttention (videoxl.ops.CHUNK_SPARSE_ATTENTION): one prefill chunk's queries
 * against the gathered past and the chunk itself, visibility given by index ranges.
 *
 * Layouts are token-major and contiguous: query/output (Q, Hq, D), key/value (K, Hkv, D) with
 * K = past + Q (the chunk's own keys are the last Q rows). Query i sits at position
 * p = K - Q + i. A timestamp query (i in timestamp_query_index) sees keys [0, p]; any other
 * query sees
 * [0, prefix_len) U past_timestamp_index U [window_start, p]. Query head h reads KV head
 * h / (Hq / Hkv). Softmax and accumulation in float32; output in the input dtype.
 */
#ifndef VIDEOXL_CHUNK_ATTENTION_H_
#define VIDEOXL_CHUNK_ATTENTION_H_

#include "../common/videoxl_kernels.h"

/* All pointers are device pointers.
 *   prefix_len, window_start    one int64 each, on the device (read by the kernel, so the
 *                               launch never waits on the host)
 *   past_timestamp_index        (num_past_timestamps,) int64 in [prefix_len, window_start);
 *                               may be NULL when num_past_timestamps == 0
 *   timestamp_query_index       (num_timestamp_queries,) int64, ascending chunk query indices
 *                               in [0, num_queries); may be NULL when num_timestamp_queries == 0
 *   head_dim                    16, 32, 64 or 128
 * No workspace. Returns 0, a VideoxlStatus (< 0) or a cudaError_t (> 0). */
VIDEOXL_API int videoxl_chunk_attention(
    const void* query, const void* key, const void* value,
    const int64_t* prefix_len, const int64_t* window_start,
    const int64_t* past_timestamp_index, int64_t num_past_timestamps,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries,
    void* output,
    int64_t num_queries, int64_t num_keys,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream);

#endif /* VIDEOXL_CHUNK_ATTENTION_H_ */
