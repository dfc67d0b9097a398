// Host emulation of the few CUDA features the videoxl kernels use, for checking the kernels'
// logic on a machine without a GPU (tests/plugins/conftest.py, tests/plugins/test_kernels.py).
//
// A launch runs the grid's blocks one after another; a block's threads are real POSIX threads,
// so __syncthreads, warp shuffles and ballots are real barriers and data exchanges, and a
// missing or divergent barrier deadlocks here as it would misbehave on a GPU. __shared__
// variables become statics (blocks never overlap); dynamic shared memory is a buffer of the
// launch's size. What this cannot check: GPU memory limits, alignment faults, warp-synchronous
// code without syncs, timing. float16 uses the compiler's _Float16, bfloat16 rounds to nearest even.
#pragma once

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include <barrier>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorLaunchOutOfResources = 701,
} cudaError_t;
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75,
                      cudaDevAttrComputeCapabilityMinor = 76 };

struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned int x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

// --- fp16 / bf16 ---------------------------------------------------------------------------
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) {
    _Float16 f;
    memcpy(&f, &h.bits, 2);
    return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
    const _Float16 f = static_cast<_Float16>(x);
    __half h;
    memcpy(&h.bits, &f, 2);
    return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}

// --- integer min/max as CUDA declares them ---------------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }

namespace emu {

struct Block {
    explicit Block(unsigned int threads, size_t shared_bytes)
        : sync(threads), shared(new float4[shared_bytes / sizeof(float4) + 1]) {
        for (unsigned int w = 0; w < (threads + 31) / 32; ++w) {
            const unsigned int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
            warps.emplace_back(new std::barrier<>(lanes));
        }
        exchange.resize(warps.size() * 32);
    }
    std::barrier<> sync;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> exchange;  // one slot per thread for shuffles and ballots
    std::unique_ptr<float4[]> shared;
};

inline thread_local Block* current = nullptr;
inline std::mutex atomic_mutex;

inline std::barrier<>& warp_barrier() { return *current->warps[threadIdx.x / 32]; }
inline uint64_t* warp_slots() { return &current->exchange[(threadIdx.x / 32) * 32]; }
inline void* dynamic_shared() { return current->shared.get(); }

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, Args... args) {
    if (block.y != 1 || block.z != 1) throw std::runtime_error("emulation: 1-D blocks only");
    gridDim = grid;
    blockDim = block;
    struct Ctx {
        std::function<void()> body;
    };
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                Block state(block.x, shared_bytes);
                std::vector<pthread_t> threads(block.x);
                std::vector<Ctx> ctx(block.x);
                for (unsigned int t = 0; t < block.x; ++t) {
                    ctx[t].body = [&, t, x, y, z] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        current = &state;
                        kernel(static_cast<KernelArgs>(args)...);
                    };
                    pthread_attr_t attr;
                    pthread_attr_init(&attr);
                    pthread_attr_setstacksize(&attr, 1 << 20);
                    pthread_create(&threads[t], &attr, [](void* p) -> void* {
                        static_cast<Ctx*>(p)->body();
                        return nullptr;
                    }, &ctx[t]);
                    pthread_attr_destroy(&attr);
                }
                for (pthread_t& thread : threads) pthread_join(thread, nullptr);
            }
}

}  // namespace emu

// --- device intrinsics -------------------------------------------------------------------------
inline void __syncthreads() { emu::current->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { emu::warp_barrier().arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned int, T value, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "emulated shuffle of a small type");
    const unsigned int lane = threadIdx.x % 32;
    uint64_t* slots = emu::warp_slots();
    memcpy(&slots[lane], &value, sizeof(T));
    emu::warp_barrier().arrive_and_wait();
    T result;
    memcpy(&result, &slots[lane ^ static_cast<unsigned int>(lane_mask)], sizeof(T));
    emu::warp_barrier().arrive_and_wait();
    return result;
}

inline unsigned int __ballot_sync(unsigned int, int predicate) {
    const unsigned int lane = threadIdx.x % 32;
    uint64_t* slots = emu::warp_slots();
    slots[lane] = predicate ? 1 : 0;
    emu::warp_barrier().arrive_and_wait();
    unsigned int bits = 0;
    for (unsigned int l = 0; l < 32; ++l) bits |= static_cast<unsigned int>(slots[l]) << l;
    emu::warp_barrier().arrive_and_wait();
    return bits;
}

inline int __popc(unsigned int x) { return __builtin_popcount(x); }

inline float atomicAdd(float* address, float value) {
    std::lock_guard<std::mutex> lock(emu::atomic_mutex);
    const float old = *address;
    *address = old + value;
    return old;
}

// --- runtime API -----------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "emulated error"; }
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int bytes) {
    return bytes <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;  // sm_90's opt-in limit
}
// The emulated device reports compute capability 7.5 (no tensor-core kernels: the launchers
// pick their SIMT paths, as on a Turing GPU) and 4 multiprocessors.
inline cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    *value = attr == cudaDevAttrComputeCapabilityMajor ? 7 : attr == cudaDevAttrComputeCapabilityMinor ? 5 : 4;
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
    memset(ptr, value, count);
    return cudaSuccess;
}
