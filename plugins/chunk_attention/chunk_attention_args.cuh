// The arguments of one ChunkSparseAttention launch, shared by its two kernels (SIMT and mma)
// and the dispatching C launcher in chunk_attention.cu. Private to this folder.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../common/videoxl_kernels.h"

namespace videoxl {

struct ChunkAttentionArgs {
    const void* query;  // (Q, Hq, D)
    const void* key;  // (Q, Hkv, D) the chunk's own keys
    const void* value;
    const void* past_key;  // (P, Hkv, D) row j = position j
    const void* past_value;
    const int64_t* past_len;  // one device int64
    const int64_t* visible_past_index;  // (V,)
    int64_t num_visible;
    const int64_t* timestamp_query_index;  // (Tq,)
    int64_t num_timestamp_queries;
    void* output;  // (Q, Hq, D)
    void* workspace;
    size_t workspace_bytes;
    int64_t num_queries;
    int64_t past_capacity;  // P
    int32_t num_q_heads;
    int32_t num_kv_heads;
    int32_t head_dim;
    float scale;
    VideoxlDType dtype;
    cudaStream_t stream;
};

// SIMT kernel, every dtype and head_dim 16/32/64/128, no workspace (chunk_attention.cu).
int chunk_attention_simt(const ChunkAttentionArgs& args);

// Tensor-core kernel, fp16/bf16, head_dim 64/128, sm_80+ (chunk_attention_mma.cu).
// Returns VIDEOXL_STATUS_UNSUPPORTED for anything else.
int chunk_attention_mma(const ChunkAttentionArgs& args);

// Bytes of workspace chunk_attention_mma needs for these shapes (0: none); depends on shapes
// only, never on past_len (a device value), so a plugin can size it at build time.
size_t chunk_attention_mma_workspace_bytes(int64_t num_queries, int64_t past_capacity, int64_t num_visible,
                                           int64_t num_timestamp_queries, int32_t num_q_heads,
                                           int32_t num_kv_heads, int32_t head_dim);

// Whether the mma kernel handles this dtype and head_dim (the device is checked at launch).
inline bool chunk_attention_mma_supports(VideoxlDType dtype, int32_t head_dim) {
    return (dtype == VIDEOXL_DTYPE_FLOAT16 || dtype == VIDEOXL_DTYPE_BFLOAT16) && (head_dim == 64 || head_dim == 128);
}

}  // namespace videoxl
