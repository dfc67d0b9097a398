// Bi-level KV cache: the gather + pool + RoPE that builds the mixed cache, and the plain
// average pool that builds a block's sparse tier. Both are memory-bound element-wise kernels.

#include "../common/common.cuh"
#include "bilevel_kv.h"

namespace videoxl {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHeadDim = 1024;

// One thread per (mixed row m, kv head, rotation pair i): it un-rotates elements i and i + D/2
// of each source key by its source position, pools them and the value pair with the weights,
// then rotates the pooled key pair at the target position. Blocks stride over rows; a block
// computes the D/2 inverse frequencies once.
template <typename T>
__global__ void __launch_bounds__(kThreads) bilevel_kv_gather_kernel(
    const T* __restrict__ key, const T* __restrict__ value, const int64_t* __restrict__ gather_index,
    const float* __restrict__ gather_weight, const int64_t* __restrict__ source_position,
    const int64_t* __restrict__ target_position, T* __restrict__ mixed_key, T* __restrict__ mixed_value,
    int64_t num_source, int64_t num_mixed, int gather_width, int num_kv_heads, int head_dim, float rope_theta) {
    __shared__ float inv_freq[kMaxHeadDim / 2];
    const int half = head_dim / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) inv_freq[i] = rope_inv_freq(i, head_dim, rope_theta);
    __syncthreads();

    const int64_t per_row = static_cast<int64_t>(num_kv_heads) * half;
    const int64_t total = num_mixed * per_row;
    for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
         item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t m = item / per_row;
        const int head = static_cast<int>((item % per_row) / half);
        const int i = static_cast<int>(item % half);

        float k_lo = 0.0f, k_hi = 0.0f, v_lo = 0.0f, v_hi = 0.0f;
        for (int s = 0; s < gather_width; ++s) {
            const int64_t src = gather_index[m * gather_width + s];
            if (src < 0 || src >= num_source) continue;
            const float w = gather_weight[m * gather_width + s];
            const int64_t base = (src * num_kv_heads + head) * head_dim;
            const float x_lo = to_float(key[base + i]);
            const float x_hi = to_float(key[base + i + half]);
            // rotate by -angle (the angle the key was stored at): (lo c + hi s, hi c - lo s)
            const float back = static_cast<float>(source_position[src]) * inv_freq[i];
            const float cb = cosf(back);
            const float sb = sinf(back);
            k_lo += w * (x_lo * cb + x_hi * sb);
            k_hi += w * (x_hi * cb - x_lo * sb);
            v_lo += w * to_float(value[base + i]);
            v_hi += w * to_float(value[base + i + half]);
        }
        const float angle = static_cast<float>(target_position[m]) * inv_freq[i];  // float32 product, as in HF
        const float c = cosf(angle);
        const float sn = sinf(angle);
        const int64_t out = (m * num_kv_heads + head) * head_dim;
        // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x_hi, x_lo)
        mixed_key[out + i] = from_float<T>(k_lo * c - k_hi * sn);
        mixed_key[out + i + half] = from_float<T>(k_hi * c + k_lo * sn);
        mixed_value[out + i] = from_float<T>(v_lo);
        mixed_value[out + i + half] = from_float<T>(v_hi);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pool_kv_kernel(
    const T* __restrict__ input, T* __restrict__ output, int64_t num_output, int stride, int64_t row_elems) {
    const int64_t total = num_output * row_elems;
    for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < total;
         item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t n = item / row_elems;
        const int64_t e = item % row_elems;
        const T* src = input + n * stride * row_elems + e;
        float sum = 0.0f;
        for (int s = 0; s < stride; ++s) sum += to_float(src[s * row_elems]);
        output[item] = from_float<T>(sum / static_cast<float>(stride));
    }
}

}  // namespace
}  // namespace videoxl

VIDEOXL_API int videoxl_bilevel_kv_gather(
    const void* key, const void* value,
    const int64_t* gather_index, const float* gather_weight,
    const int64_t* source_position, const int64_t* target_position,
    void* mixed_key, void* mixed_value,
    int64_t num_source, int64_t num_mixed, int32_t gather_width,
    int32_t num_kv_heads, int32_t head_dim,
    float rope_theta, VideoxlDType dtype, cudaStream_t stream) {
    using namespace videoxl;
    if (num_source < 0 || num_mixed < 0 || gather_width <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
        head_dim % 2 != 0 || head_dim > kMaxHeadDim || !(rope_theta > 0.0f)) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    if (num_mixed == 0) return VIDEOXL_STATUS_OK;
    if (!key || !value || !gather_index || !gather_weight || !source_position || !target_position || !mixed_key ||
        !mixed_value) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    const int64_t items = num_mixed * num_kv_heads * (head_dim / 2);
    VIDEOXL_DISPATCH_DTYPE(dtype, {
        bilevel_kv_gather_kernel<scalar_t><<<grid_size(items, kThreads), kThreads, 0, stream>>>(
            static_cast<const scalar_t*>(key), static_cast<const scalar_t*>(value), gather_index, gather_weight,
            source_position, target_position, static_cast<scalar_t*>(mixed_key), static_cast<scalar_t*>(mixed_value), num_source, num_mixed,
            gather_width, num_kv_heads, head_dim, rope_theta);
    })
    return launch_status();
}

VIDEOXL_API int videoxl_pool_kv(
    const void* input, void* output,
    int64_t num_output, int32_t stride, int32_t num_heads, int32_t head_dim,
    VideoxlDType dtype, cudaStream_t stream) {
    using namespace videoxl;
    if (num_output < 0 || stride <= 0 || num_heads <= 0 || head_dim <= 0) return VIDEOXL_STATUS_INVALID_ARGUMENT;
    if (num_output == 0) return VIDEOXL_STATUS_OK;
    if (!input || !output) return VIDEOXL_STATUS_INVALID_ARGUMENT;
    const int64_t row_elems = static_cast<int64_t>(num_heads) * head_dim;
    VIDEOXL_DISPATCH_DTYPE(dtype, {
        pool_kv_kernel<scalar_t><<<grid_size(num_output * row_elems, kThreads), kThreads, 0, stream>>>(
            static_cast<const scalar_t*>(input), static_cast<scalar_t*>(output), num_output, stride, row_elems);
    })
    return launch_status();
}
