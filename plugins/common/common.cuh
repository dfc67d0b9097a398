// Device helpers shared by the videoxl kernels: element conversion, warp reductions and the
// dtype dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "videoxl_kernels.h"

namespace videoxl {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// RoPE inverse frequency of pair i exactly as Hugging Face computes it in float32:
// 1 / theta ** (float(2i) / float(D)). The power is evaluated in double and rounded once,
// which gives the correctly rounded float32 power (what the host libm returns).
__device__ __forceinline__ float rope_inv_freq(int pair, int head_dim, float theta) {
    const float exponent = static_cast<float>(2 * pair) / static_cast<float>(head_dim);
    const float power = static_cast<float>(pow(static_cast<double>(theta), static_cast<double>(exponent)));
    return 1.0f / power;
}

// Number of blocks for a grid-stride loop over `n` items, capped to keep the grid small.
inline unsigned int grid_size(int64_t n, int threads, unsigned int cap = 65535u) {
    const int64_t blocks = (n + threads - 1) / threads;
    return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Compute capability major of the current device, cached per device (0 when unknown). Not a
// stream operation, so launchers may call it during CUDA graph capture.
inline int current_device_major() {
    static int cached[64] = {0};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 0;
    if (device < 64 && cached[device] != 0) return cached[device];
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
    if (device < 64) cached[device] = major;
    return major;
}

inline int launch_status() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? VIDEOXL_STATUS_OK : static_cast<int>(err);
}

}  // namespace videoxl

// Calls BODY with `scalar_t` bound to the C++ type of `dtype`; returns INVALID_ARGUMENT for
// an unknown dtype.
#define VIDEOXL_DISPATCH_DTYPE(dtype, ...)                                                   \
    switch (dtype) {                                                                         \
        case VIDEOXL_DTYPE_FLOAT32: { using scalar_t = float; __VA_ARGS__ } break;           \
        case VIDEOXL_DTYPE_FLOAT16: { using scalar_t = __half; __VA_ARGS__ } break;          \
        case VIDEOXL_DTYPE_BFLOAT16: { using scalar_t = __nv_bfloat16; __VA_ARGS__ } break;  \
        default: return VIDEOXL_STATUS_INVALID_ARGUMENT;                                     \
    }
