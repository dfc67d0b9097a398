// Block scoring: attention mass per cache block from the question's queries, and a top-k of
// the blocks on the device. Called once per question, so the kernels favour simplicity.

#include "../common/common.cuh"
#include "block_score.h"

namespace videoxl {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTopKThreads = 1024;

// Scaled logit (base 2) of one key for the query slice this lane holds; every lane gets it.
template <typename T, int D>
__device__ __forceinline__ float key_logit(const float (&q)[D >= 32 ? D / 32 : 1], const T* __restrict__ key_row,
                                           int lane) {
    constexpr int kSlices = D >= 32 ? D / 32 : 1;
    float partial = 0.0f;
#pragma unroll
    for (int c = 0; c < kSlices; ++c) {
        const int d = lane + 32 * c;
        if (d < D) partial += q[c] * to_float(key_row[d]);
    }
    return warp_sum(partial);
}

// One thread block per (query head, query): a two-pass softmax over the keys this query sees
// (pass 1: max and sum, pass 2: probabilities summed per block in shared memory), then one
// atomicAdd per block. With a causal tail query qi sees keys [0, num_keys - num_queries + qi + 1).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) block_scores_kernel(
    const T* __restrict__ query, const T* __restrict__ key, const int64_t* __restrict__ block_bounds,
    float* __restrict__ scores, int64_t num_keys, int64_t causal_tail, int num_blocks, int num_q_heads,
    int num_kv_heads, float scale_log2) {
    extern __shared__ float block_mass[];  // (num_blocks,)
    __shared__ float warp_max_s[kWarps];
    __shared__ float warp_sum_s[kWarps];
    constexpr int kSlices = D >= 32 ? D / 32 : 1;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int head = blockIdx.x;
    const int64_t qi = blockIdx.y;
    const int kv_head = head / (num_q_heads / num_kv_heads);
    const int64_t key_stride = static_cast<int64_t>(num_kv_heads) * D;
    const T* key_head = key + static_cast<int64_t>(kv_head) * D;
    // causal_tail is 0 or num_queries (checked by the launcher): the tail's key qi is this query's own
    const int64_t visible_keys = num_keys - causal_tail + (causal_tail > 0 ? qi + 1 : 0);

    float q[kSlices];
#pragma unroll
    for (int c = 0; c < kSlices; ++c) {
        const int d = lane + 32 * c;
        q[c] = d < D ? to_float(query[(qi * num_q_heads + head) * D + d]) * scale_log2 : 0.0f;
    }
    for (int b = threadIdx.x; b < num_blocks; b += kThreads) block_mass[b] = 0.0f;

    // pass 1: running max and sum of exp2 per warp (values are warp-uniform)
    float row_max = -INFINITY, row_sum = 0.0f;
    for (int64_t j = warp; j < visible_keys; j += kWarps) {
        const float s = key_logit<T, D>(q, key_head + j * key_stride, lane);
        const float new_max = fmaxf(row_max, s);
        row_sum = row_sum * exp2f(row_max - new_max) + exp2f(s - new_max);
        row_max = new_max;
    }
    if (lane == 0) {
        warp_max_s[warp] = row_max;
        warp_sum_s[warp] = row_sum;
    }
    __syncthreads();
    float total_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, warp_max_s[w]);
    float total_sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
        if (warp_sum_s[w] > 0.0f) total_sum += warp_sum_s[w] * exp2f(warp_max_s[w] - total_max);
    }

    // pass 2: unnormalised probabilities summed per block
    for (int b = 0; b < num_blocks; ++b) {
        const int64_t begin = max(block_bounds[2 * b], int64_t{0});
        const int64_t end = min(block_bounds[2 * b + 1], visible_keys);
        float mass = 0.0f;
        for (int64_t j = begin + warp; j < end; j += kWarps) {
            mass += exp2f(key_logit<T, D>(q, key_head + j * key_stride, lane) - total_max);
        }
        if (lane == 0 && mass != 0.0f) atomicAdd(&block_mass[b], mass);
    }
    __syncthreads();
    const float inv_sum = 1.0f / total_sum;
    for (int b = threadIdx.x; b < num_blocks; b += kThreads) {
        if (block_mass[b] != 0.0f) atomicAdd(&scores[b], block_mass[b] * inv_sum);
    }
}

// Rank of every candidate = number of candidates strictly better (higher score, or equal
// score and lower index); rank < k lands in top_blocks[rank]. One block, scores in shared.
__global__ void __launch_bounds__(kTopKThreads) top_k_blocks_kernel(
    const float* __restrict__ scores, const uint8_t* __restrict__ always_dense, int64_t* __restrict__ top_blocks,
    int num_blocks, int k) {
    extern __shared__ float value[];  // (num_blocks,) then (num_blocks,) exclusion flags
    uint8_t* excluded = reinterpret_cast<uint8_t*>(value + num_blocks);
    for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
        const float v = scores[b];
        value[b] = isnan(v) ? -INFINITY : v;
        excluded[b] = always_dense[b] != 0;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
        if (excluded[b]) continue;
        const float mine = value[b];
        int rank = 0;
        for (int c = 0; c < num_blocks; ++c) {
            rank += !excluded[c] && (value[c] > mine || (value[c] == mine && c < b));
        }
        if (rank < k) top_blocks[rank] = b;
    }
}

template <typename T>
int launch_block_scores(const void* query, const void* key, const int64_t* block_bounds, float* scores,
                        int64_t num_queries, int64_t num_keys, int64_t causal_tail, int32_t num_blocks,
                        int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, float scale,
                        cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned int>(num_q_heads), static_cast<unsigned int>(num_queries));
    const size_t shared_bytes = static_cast<size_t>(num_blocks) * sizeof(float);
    const float scale_log2 = scale * 1.4426950408889634f;
#define VIDEOXL_BLOCK_SCORES_CASE(DIM)                                                                      \
    case DIM:                                                                                               \
        block_scores_kernel<T, DIM><<<grid, kThreads, shared_bytes, stream>>>(                              \
            static_cast<const T*>(query), static_cast<const T*>(key), block_bounds, scores, num_keys,       \
            causal_tail, num_blocks, num_q_heads, num_kv_heads, scale_log2);                                \
        break;
    switch (head_dim) {
        VIDEOXL_BLOCK_SCORES_CASE(16)
        VIDEOXL_BLOCK_SCORES_CASE(32)
        VIDEOXL_BLOCK_SCORES_CASE(64)
        VIDEOXL_BLOCK_SCORES_CASE(128)
        default: return VIDEOXL_STATUS_UNSUPPORTED_HEAD_DIM;
    }
#undef VIDEOXL_BLOCK_SCORES_CASE
    return launch_status();
}

}  // namespace
}  // namespace videoxl

VIDEOXL_API int videoxl_block_scores(
    const void* query, const void* key, const int64_t* block_bounds, float* scores,
    int64_t num_queries, int64_t num_keys, int64_t causal_tail, int32_t num_blocks,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream) {
    using namespace videoxl;
    if (num_queries < 0 || num_queries > 65535 || num_keys < 0 || num_blocks < 0 || num_q_heads <= 0 ||
        num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || num_q_heads > 65535) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    // a tail is the queries' own keys, one per query: anything else has no causal meaning
    if ((causal_tail != 0 && causal_tail != num_queries) || causal_tail > num_keys) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    if (num_blocks > VIDEOXL_MAX_SCORE_BLOCKS) return VIDEOXL_STATUS_TOO_MANY_BLOCKS;
    if (num_queries == 0 || num_keys == 0 || num_blocks == 0) return VIDEOXL_STATUS_OK;
    if (!query || !key || !block_bounds || !scores) return VIDEOXL_STATUS_INVALID_ARGUMENT;
    VIDEOXL_DISPATCH_DTYPE(dtype, {
        return launch_block_scores<scalar_t>(query, key, block_bounds, scores, num_queries, num_keys, causal_tail,
                                             num_blocks, num_q_heads, num_kv_heads, head_dim, scale, stream);
    })
    return VIDEOXL_STATUS_INVALID_ARGUMENT;
}

VIDEOXL_API int videoxl_top_k_blocks(
    const float* scores, const uint8_t* always_dense, int64_t* top_blocks,
    int32_t num_blocks, int32_t k, cudaStream_t stream) {
    using namespace videoxl;
    if (num_blocks < 0 || k < 0) return VIDEOXL_STATUS_INVALID_ARGUMENT;
    if (num_blocks > VIDEOXL_MAX_SCORE_BLOCKS) return VIDEOXL_STATUS_TOO_MANY_BLOCKS;
    if (k == 0) return VIDEOXL_STATUS_OK;
    if (!top_blocks || (num_blocks > 0 && (!scores || !always_dense))) return VIDEOXL_STATUS_INVALID_ARGUMENT;
    // -1 (all bits set) in every slot the ranking does not fill
    const cudaError_t err = cudaMemsetAsync(top_blocks, 0xff, static_cast<size_t>(k) * sizeof(int64_t), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
    if (num_blocks == 0) return VIDEOXL_STATUS_OK;
    const size_t shared_bytes = static_cast<size_t>(num_blocks) * (sizeof(float) + sizeof(uint8_t));
    top_k_blocks_kernel<<<1, kTopKThreads, shared_bytes, stream>>>(scores, always_dense, top_blocks, num_blocks, k);
    return launch_status();
}
