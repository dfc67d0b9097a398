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
inline float to_float_emulated(__half h) { return __half2float(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float x);
inline float to_float_emulated(__nv_bfloat16 b);
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}

inline float to_float_emulated(__nv_bfloat16 b) { return __bfloat162float(b); }

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

struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

inline int atomicMax(int* address, int value) {
    std::lock_guard<std::mutex> lock(emu::atomic_mutex);
    const int old = *address;
    if (value > old) *address = value;
    return old;
}

// --- warp-level matrix instructions (sm_80 PTX), emulated lane by lane ---------------------------
// Fragment layouts as the PTX ISA describes them for ldmatrix.m8n8.x4(.trans).b16 and
// mma.sync.m16n8k16.row.col.f32.{f16,bf16}: g = lane / 4, t = lane % 4.
namespace emu {

// Every lane's 64-bit value, gathered through the warp's exchange slots.
inline void warp_all_gather(uint64_t mine, uint64_t (&all)[32]) {
    uint64_t* slots = warp_slots();
    slots[threadIdx.x % 32] = mine;
    warp_barrier().arrive_and_wait();
    for (int l = 0; l < 32; ++l) all[l] = slots[l];
    warp_barrier().arrive_and_wait();
}

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i. Without .trans lane L gets,
// of each matrix, the 2 elements (row g, cols 2t, 2t+1); with .trans (rows 2t, 2t+1, col g).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* address, bool trans) {
    uint64_t rows[32];
    warp_all_gather(reinterpret_cast<uint64_t>(address), rows);
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* row = reinterpret_cast<const uint16_t*>(rows[8 * i + g]);
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {
            lo = reinterpret_cast<const uint16_t*>(rows[8 * i + 2 * t])[g];
            hi = reinterpret_cast<const uint16_t*>(rows[8 * i + 2 * t + 1])[g];
        }
        r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
}

// mma.m16n8k16, row-major A (16x16), column-major B (16x8), float accumulators. Lane L holds
// a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..2t+1][g], b1 = B[2t+8..][g]; c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1].
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    uint64_t a01[32], a23[32], b[32];
    warp_all_gather(a[0] | (static_cast<uint64_t>(a[1]) << 32), a01);
    warp_all_gather(a[2] | (static_cast<uint64_t>(a[3]) << 32), a23);
    warp_all_gather(b0 | (static_cast<uint64_t>(b1) << 32), b);
    auto element = [](uint32_t word, int which) {
        T x;
        const uint16_t bits = static_cast<uint16_t>(which ? word >> 16 : word & 0xffffu);
        memcpy(&x, &bits, 2);
        return to_float_emulated(x);
    };
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const uint32_t regs[4] = {static_cast<uint32_t>(a01[l]), static_cast<uint32_t>(a01[l] >> 32),
                                  static_cast<uint32_t>(a23[l]), static_cast<uint32_t>(a23[l] >> 32)};
        for (int e = 0; e < 2; ++e) {
            A[g][2 * t + e] = element(regs[0], e);
            A[g + 8][2 * t + e] = element(regs[1], e);
            A[g][2 * t + 8 + e] = element(regs[2], e);
            A[g + 8][2 * t + 8 + e] = element(regs[3], e);
            B[2 * t + e][g] = element(static_cast<uint32_t>(b[l]), e);
            B[2 * t + 8 + e][g] = element(static_cast<uint32_t>(b[l] >> 32), e);
        }
    }
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
        float sum = c[e];
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        c[e] = sum;
    }
}

}  // namespace emu

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
// The emulated device reports compute capability 8.0 (its tensor-core instructions are the
// emulated ones below) and 4 multiprocessors.
inline cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    *value = attr == cudaDevAttrComputeCapabilityMajor ? 8 : attr == cudaDevAttrComputeCapabilityMinor ? 0 : 4;
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
    memset(ptr, value, count);
    return cudaSuccess;
}
