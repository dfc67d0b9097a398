// ChunkSparseAttention (op contract v2) on tensor cores: fp16/bf16 in, fp32 accumulation,
// sm_80 and newer. FlashAttention-2 structure: Q stays in registers, K/V tiles stream through
// shared memory (cp.async, double-buffered), S = Q K^T and O += P V with mma.sync m16n8k16,
// online softmax in base 2.
//
// Rows of the M dimension are (query, head) pairs of ONE KV head: the Hq / Hkv query heads
// that share a KV head read every K/V tile once (GQA 7:1 in Video-XL-2 packs ~9 queries x 7
// heads into a 64-row tile). Queries come in two kinds, never mixed in one tile:
//
//   kind 0 (timestamp queries)  keys = past rows [0, past_len)        ++ chunk keys [0, last]
//   kind 1 (every other query)  keys = past rows visible_past_index   ++ chunk keys [0, last]
//
// Each kind's key sequence may be cut into S splits (grid z); a split writes its partial
// softmax state (unnormalised acc, running max m, running sum l, fp32) into the workspace and
// a second kernel merges the S states of each row. S comes from the shapes only (past
// capacity, list length, tile count), the split boundaries from the device value past_len, so
// one launch plan serves a captured CUDA graph whatever the past holds. S = 1 writes the
// output directly. No allocation, no host synchronisation.

#include <limits.h>

#include <algorithm>

#include "../common/common.cuh"
#include "chunk_attention.h"
#include "chunk_attention_args.cuh"

namespace videoxl {
namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kTileRows = 16 * kMmaWarps;  // (query, head) rows per CTA: 16 per warp
constexpr int kTileKeys = 64;  // keys per K/V tile
constexpr int kPad = 8;  // halves of padding per shared row: ldmatrix rows hit distinct banks
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 512;
// Splits aim at this many CTAs per kind (about two waves on a 132-SM H100). A shape-only
// constant, so the workspace size never depends on the GPU a plan was made on.
constexpr int64_t kTargetCtas = 264;
constexpr int kKindTimestamp = 0;
constexpr int kKindOther = 1;

struct MmaPlan {
    int64_t rows[2];  // (query, head) rows of each kind: queries of the kind x Hq
    int64_t tiles[2];  // row tiles per KV head
    int splits[2];
    int64_t workspace_offset[2];  // bytes
    int64_t workspace_bytes;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

MmaPlan make_plan(int64_t num_queries, int64_t past_capacity, int64_t num_visible, int64_t num_timestamp_queries,
                  int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim) {
    MmaPlan plan{};
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t kind_queries[2] = {num_timestamp_queries, num_queries - num_timestamp_queries};
    const int64_t kind_keys[2] = {past_capacity + num_queries, num_visible + num_queries};  // upper bounds
    int64_t offset = 0;
    for (int kind = 0; kind < 2; ++kind) {
        plan.rows[kind] = kind_queries[kind] * num_q_heads;
        plan.tiles[kind] = ceil_div(kind_queries[kind] * group, kTileRows);
        const int64_t ctas = plan.tiles[kind] * num_kv_heads;
        int64_t splits = 1;
        if (ctas > 0) {
            splits = std::min(ceil_div(kind_keys[kind], kMinKeysPerSplit), ceil_div(kTargetCtas, ctas));
            splits = std::max<int64_t>(1, std::min<int64_t>(splits, kMaxSplits));
        }
        plan.splits[kind] = static_cast<int>(splits);
        plan.workspace_offset[kind] = offset;
        if (splits > 1) {
            offset += splits * plan.rows[kind] * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
            offset = ceil_div(offset, 256) * 256;
        }
    }
    plan.workspace_bytes = offset;
    return plan;
}

}  // namespace

size_t chunk_attention_mma_workspace_bytes(int64_t num_queries, int64_t past_capacity, int64_t num_visible,
                                           int64_t num_timestamp_queries, int32_t num_q_heads,
                                           int32_t num_kv_heads, int32_t head_dim) {
    return static_cast<size_t>(make_plan(num_queries, past_capacity, num_visible, num_timestamp_queries,
                                         num_q_heads, num_kv_heads, head_dim).workspace_bytes);
}

#ifndef VIDEOXL_HOST_EMULATION
namespace {

// The chunk query of rank `rank` within a kind: the rank-th timestamp query, or the rank-th
// query not in the (ascending) timestamp list. -1 past the kind's end.
__device__ __forceinline__ int kind_query(int kind, int64_t rank, const int64_t* ts, int num_ts, int num_queries) {
    if (kind == kKindTimestamp) {
        if (rank >= num_ts) return -1;
        const int64_t listed = ts[rank];
        return (listed >= 0 && listed < num_queries) ? static_cast<int>(listed) : -1;
    }
    if (rank >= num_queries - num_ts) return -1;
    int qi = static_cast<int>(rank);
    for (int t = 0; t < num_ts && ts[t] <= qi; ++t) ++qi;
    return qi;
}

// --- PTX wrappers ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; src_bytes 0 fills the destination with zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
    // c += a (16x16, row) * b (16x8, col), fp32 accumulators
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
};

template <>
struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
};

// --- the attention kernel ------------------------------------------------------------------------

template <typename T, int D>
struct MmaShared {
    T q[kTileRows][D + kPad];
    T k[2][kTileKeys][D + kPad];
    T v[2][kTileKeys][D + kPad];
    int key_limit[2][kTileKeys];  // smallest chunk query that sees the key; INT_MAX: no one
    int row_query[kTileRows];  // chunk query of each row, -1 when empty
    int row_head[kTileRows];
    int last_query;
};

struct MmaParams {
    const void* query;
    const void* key;
    const void* value;
    const void* past_key;
    const void* past_value;
    const int64_t* past_len;
    const int64_t* visible;
    int64_t num_visible;
    const int64_t* ts;
    int num_ts;
    void* output;
    float* partial;  // this kind's workspace: acc (S, R, D), then m (S, R), then l (S, R)
    int num_queries;
    int64_t past_capacity;
    int num_q_heads;
    int num_kv_heads;
    int64_t kind_rows;  // R: rows of this kind over all heads
    int kind;
    int splits;
    float scale_log2;
};

template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) chunk_attention_mma_kernel(const MmaParams p) {
    extern __shared__ __align__(16) unsigned char shared_raw[];
    MmaShared<T, D>& s = *reinterpret_cast<MmaShared<T, D>*>(shared_raw);
    constexpr int kChunksPerRow = D / 8;  // 16-byte pieces of one row

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int kv_head = blockIdx.y;
    const int split = blockIdx.z;
    const int group = p.num_q_heads / p.num_kv_heads;
    const T* query = static_cast<const T*>(p.query);

    // --- rows of this tile: pair index r -> (query of rank r / group, head kv_head * group + r % group)
    if (tid < kTileRows) {
        const int64_t pair = static_cast<int64_t>(blockIdx.x) * kTileRows + tid;
        const int qi = kind_query(p.kind, pair / group, p.ts, p.num_ts, p.num_queries);
        s.row_query[tid] = qi;
        s.row_head[tid] = kv_head * group + static_cast<int>(pair % group);
    }
    if (tid == 0) s.last_query = -1;
    __syncthreads();
    if (tid < kTileRows) atomicMax(&s.last_query, s.row_query[tid]);
    // Q rows -> shared (zeros for empty rows)
    for (int c = tid; c < kTileRows * kChunksPerRow; c += kMmaThreads) {
        const int row = c / kChunksPerRow;
        const int col = (c % kChunksPerRow) * 8;
        const int qi = s.row_query[row];
        const T* src = qi >= 0 ? query + (static_cast<int64_t>(qi) * p.num_q_heads + s.row_head[row]) * D + col : query;
        cp_async_16(&s.q[row][col], src, qi >= 0 ? 16 : 0);
    }
    cp_async_commit();
    __syncthreads();
    const int last_query = s.last_query;
    if (last_query < 0) return;  // block-uniform: an empty tile

    // --- this split's part of the key sequence [past keys][chunk keys 0..last_query]
    const int64_t past_len = min(max(*p.past_len, int64_t{0}), p.past_capacity);
    const int64_t num_past = p.kind == kKindTimestamp ? past_len : p.num_visible;
    const int64_t num_keys = num_past + last_query + 1;
    const int64_t key_begin = num_keys * split / p.splits;
    const int64_t key_end = num_keys * (split + 1) / p.splits;
    const T* past_key = static_cast<const T*>(p.past_key);
    const T* past_value = static_cast<const T*>(p.past_value);
    const T* chunk_key = static_cast<const T*>(p.key);
    const T* chunk_value = static_cast<const T*>(p.value);

    // Issues the loads of the key tile starting at sequence position t0 into buffer `buf`.
    auto load_tile = [&](int64_t t0, int buf) {
        for (int c = tid; c < kTileKeys * kChunksPerRow; c += kMmaThreads) {
            const int slot = c / kChunksPerRow;
            const int col = (c % kChunksPerRow) * 8;
            const int64_t j = t0 + slot;
            const T* k_src = chunk_key;
            const T* v_src = chunk_value;
            int limit = INT_MAX;
            if (j < key_end) {
                if (j < num_past) {
                    const int64_t row = p.kind == kKindTimestamp ? j : p.visible[j];
                    if (row >= 0 && row < past_len) {
                        const int64_t offset = (row * p.num_kv_heads + kv_head) * D + col;
                        k_src = past_key + offset;
                        v_src = past_value + offset;
                        limit = 0;  // the past: every query sees it
                    }
                } else {
                    const int64_t chunk = j - num_past;  // causal: queries >= chunk see it
                    const int64_t offset = (chunk * p.num_kv_heads + kv_head) * D + col;
                    k_src = chunk_key + offset;
                    v_src = chunk_value + offset;
                    limit = static_cast<int>(chunk);
                }
            }
            const int bytes = limit == INT_MAX ? 0 : 16;
            cp_async_16(&s.k[buf][slot][col], k_src, bytes);
            cp_async_16(&s.v[buf][slot][col], v_src, bytes);
            if (col == 0) s.key_limit[buf][slot] = limit;
        }
    };

    // Per thread: rows lane/4 and lane/4 + 8 of the warp's 16; O fragments over D / 8 n-blocks.
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    const int warp_row = warp * 16;
    const int my_rows[2] = {warp_row + lane / 4, warp_row + lane / 4 + 8};
    const int my_query[2] = {s.row_query[my_rows[0]], s.row_query[my_rows[1]]};

    if (key_begin < key_end) load_tile(key_begin, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // Q fragments (A operand) for the whole head_dim, kept in registers.
    uint32_t q_frag[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(q_frag[kk], &s.q[warp_row + (lane % 16)][kk * 16 + (lane / 16) * 8]);
    }

    int buf = 0;
    for (int64_t t0 = key_begin; t0 < key_end; t0 += kTileKeys, buf ^= 1) {
        if (t0 + kTileKeys < key_end) load_tile(t0 + kTileKeys, buf ^ 1);  // overlaps this tile's math
        cp_async_commit();

        // S = Q K^T: 16 rows x 64 keys per warp, 8 n-blocks of 8 keys
        float score[kTileKeys / 8][4];
#pragma unroll
        for (int n = 0; n < kTileKeys / 8; ++n) score[n][0] = score[n][1] = score[n][2] = score[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int n = 0; n < kTileKeys / 8; n += 2) {
                uint32_t b[4];  // keys n*8.. (d kk*16 +0/+8), keys (n+1)*8.. (d +0/+8)
                ldmatrix_x4(b, &s.k[buf][n * 8 + (lane / 16) * 8 + (lane % 8)][kk * 16 + ((lane / 8) % 2) * 8]);
                Mma<T>::run(score[n], q_frag[kk], b[0], b[1]);
                Mma<T>::run(score[n + 1], q_frag[kk], b[2], b[3]);
            }
        }

        // mask + online softmax (base 2); a row's 4 owners are the 4 lanes of a quad
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < kTileKeys / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key_slot = n * 8 + (lane % 4) * 2 + (e % 2);
                const int half = e / 2;
                const bool visible = my_query[half] >= 0 && my_query[half] >= s.key_limit[buf][key_slot];
                score[n][e] = visible ? score[n][e] * p.scale_log2 : -INFINITY;
                tile_max[half] = fmaxf(tile_max[half], score[n][e]);
            }
        }
        float alpha[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float m = tile_max[half];
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            const float new_max = fmaxf(row_max[half], m);
            alpha[half] = new_max == -INFINITY ? 1.0f : exp2f(row_max[half] - new_max);
            row_max[half] = new_max;
            row_sum[half] *= alpha[half];
        }
        const float base[2] = {row_max[0] == -INFINITY ? 0.0f : row_max[0], row_max[1] == -INFINITY ? 0.0f : row_max[1]};
#pragma unroll
        for (int n = 0; n < kTileKeys / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pe = exp2f(score[n][e] - base[e / 2]);  // exp2(-inf) = 0
                score[n][e] = pe;
                row_sum[e / 2] += pe;  // per-lane partial; the quad is summed at the end
            }
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= alpha[0];
            acc[n][1] *= alpha[0];
            acc[n][2] *= alpha[1];
            acc[n][3] *= alpha[1];
        }

        // O += P V: P (16 x 64) as A fragments straight from the score registers
#pragma unroll
        for (int kk = 0; kk < kTileKeys / 16; ++kk) {
            uint32_t a[4];
            a[0] = Mma<T>::pack(score[2 * kk][0], score[2 * kk][1]);
            a[1] = Mma<T>::pack(score[2 * kk][2], score[2 * kk][3]);
            a[2] = Mma<T>::pack(score[2 * kk + 1][0], score[2 * kk + 1][1]);
            a[3] = Mma<T>::pack(score[2 * kk + 1][2], score[2 * kk + 1][3]);
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                uint32_t b[4];  // keys kk*16 + 0..15, d n*8.. and (n+1)*8..
                ldmatrix_x4_trans(b, &s.v[buf][kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8][n * 8 + (lane / 16) * 8]);
                Mma<T>::run(acc[n], a, b[0], b[1]);
                Mma<T>::run(acc[n + 1], a, b[2], b[3]);
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // the next tile has landed and everyone is done with this one
    }

    // --- epilogue: the quad's row sums, then the output or this split's partial state
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
        row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = my_rows[half];
        const int qi = my_query[half];
        if (qi < 0) continue;
        const int head = s.row_head[row];
        const int col0 = (lane % 4) * 2;
        if (p.splits == 1) {
            const float inv = row_sum[half] > 0.0f ? 1.0f / row_sum[half] : 0.0f;
            T* out = static_cast<T*>(p.output) + (static_cast<int64_t>(qi) * p.num_q_heads + head) * D;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                out[n * 8 + col0] = from_float<T>(acc[n][2 * half] * inv);
                out[n * 8 + col0 + 1] = from_float<T>(acc[n][2 * half + 1] * inv);
            }
        } else {
            // partial row index within the kind: rank * Hq + head
            const int64_t pair = static_cast<int64_t>(blockIdx.x) * kTileRows + row;
            const int64_t r = (pair / group) * p.num_q_heads + head;
            float* acc_out = p.partial + (static_cast<int64_t>(split) * p.kind_rows + r) * D;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                *reinterpret_cast<float2*>(&acc_out[n * 8 + col0]) = make_float2(acc[n][2 * half], acc[n][2 * half + 1]);
            }
            if (lane % 4 == 0) {
                float* m_out = p.partial + static_cast<int64_t>(p.splits) * p.kind_rows * D;
                float* l_out = m_out + static_cast<int64_t>(p.splits) * p.kind_rows;
                m_out[static_cast<int64_t>(split) * p.kind_rows + r] = row_max[half];
                l_out[static_cast<int64_t>(split) * p.kind_rows + r] = row_sum[half];
            }
        }
    }
}

// One warp per (rank, head) row of a kind: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
template <typename T, int D>
__global__ void __launch_bounds__(128) merge_splits_kernel(const MmaParams p) {
    const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (r >= p.kind_rows) return;  // warp-uniform
    const int64_t rank = r / p.num_q_heads;
    const int head = static_cast<int>(r % p.num_q_heads);
    const int qi = kind_query(p.kind, rank, p.ts, p.num_ts, p.num_queries);
    if (qi < 0) return;
    const float* m_in = p.partial + static_cast<int64_t>(p.splits) * p.kind_rows * D;
    const float* l_in = m_in + static_cast<int64_t>(p.splits) * p.kind_rows;
    float m_all = -INFINITY;
    for (int sp = 0; sp < p.splits; ++sp) m_all = fmaxf(m_all, m_in[sp * p.kind_rows + r]);
    const float base = m_all == -INFINITY ? 0.0f : m_all;
    float denom = 0.0f;
    float out[D / 32];
#pragma unroll
    for (int c = 0; c < D / 32; ++c) out[c] = 0.0f;
    for (int sp = 0; sp < p.splits; ++sp) {
        const float w = exp2f(m_in[sp * p.kind_rows + r] - base);  // empty split: m = -inf, w = 0
        denom += w * l_in[sp * p.kind_rows + r];
        const float* acc = p.partial + (static_cast<int64_t>(sp) * p.kind_rows + r) * D;
#pragma unroll
        for (int c = 0; c < D / 32; ++c) out[c] += w * acc[lane + 32 * c];
    }
    const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
    T* dst = static_cast<T*>(p.output) + (static_cast<int64_t>(qi) * p.num_q_heads + head) * D;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) dst[lane + 32 * c] = from_float<T>(out[c] * inv);
}

template <typename T, int D>
int launch_mma(const ChunkAttentionArgs& a, const MmaPlan& plan) {
    auto kernel = chunk_attention_mma_kernel<T, D>;
    const int shared_bytes = static_cast<int>(sizeof(MmaShared<T, D>));
    const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
    if (attr != cudaSuccess) return static_cast<int>(attr);
    for (int kind = 0; kind < 2; ++kind) {  // timestamp tiles first: their sweeps are the long ones
        if (plan.tiles[kind] == 0) continue;
        MmaParams p{};
        p.query = a.query;
        p.key = a.key;
        p.value = a.value;
        p.past_key = a.past_key;
        p.past_value = a.past_value;
        p.past_len = a.past_len;
        p.visible = a.visible_past_index;
        p.num_visible = a.num_visible;
        p.ts = a.timestamp_query_index;
        p.num_ts = static_cast<int>(a.num_timestamp_queries);
        p.output = a.output;
        p.partial = reinterpret_cast<float*>(static_cast<unsigned char*>(a.workspace) + plan.workspace_offset[kind]);
        p.num_queries = static_cast<int>(a.num_queries);
        p.past_capacity = a.past_capacity;
        p.num_q_heads = a.num_q_heads;
        p.num_kv_heads = a.num_kv_heads;
        p.kind_rows = plan.rows[kind];
        p.kind = kind;
        p.splits = plan.splits[kind];
        p.scale_log2 = a.scale * 1.4426950408889634f;
        const dim3 grid(static_cast<unsigned int>(plan.tiles[kind]), static_cast<unsigned int>(a.num_kv_heads),
                        static_cast<unsigned int>(plan.splits[kind]));
        kernel<<<grid, kMmaThreads, shared_bytes, a.stream>>>(p);
        if (plan.splits[kind] > 1) {
            const int64_t threads = plan.rows[kind] * 32;
            merge_splits_kernel<T, D><<<static_cast<unsigned int>(ceil_div(threads, 128)), 128, 0, a.stream>>>(p);
        }
        const int status = launch_status();
        if (status != VIDEOXL_STATUS_OK) return status;
    }
    return VIDEOXL_STATUS_OK;
}

template <typename T>
int dispatch_mma_head_dim(const ChunkAttentionArgs& a, const MmaPlan& plan) {
    switch (a.head_dim) {
        case 64: return launch_mma<T, 64>(a, plan);
        case 128: return launch_mma<T, 128>(a, plan);
        default: return VIDEOXL_STATUS_UNSUPPORTED;
    }
}

}  // namespace
#endif  // VIDEOXL_HOST_EMULATION

int chunk_attention_mma(const ChunkAttentionArgs& a) {
    if (!chunk_attention_mma_supports(a.dtype, a.head_dim)) return VIDEOXL_STATUS_UNSUPPORTED;
    if (a.num_queries > (int64_t{1} << 30) / a.num_q_heads) return VIDEOXL_STATUS_INVALID_ARGUMENT;
    const MmaPlan plan = make_plan(a.num_queries, a.past_capacity, a.num_visible, a.num_timestamp_queries,
                                   a.num_q_heads, a.num_kv_heads, a.head_dim);
    if (a.workspace_bytes < static_cast<size_t>(plan.workspace_bytes) || (plan.workspace_bytes > 0 && !a.workspace)) {
        return VIDEOXL_STATUS_WORKSPACE_TOO_SMALL;
    }
#ifdef VIDEOXL_HOST_EMULATION
    return VIDEOXL_STATUS_UNSUPPORTED;  // inline PTX: GPU only
#else
    if (current_device_major() < 8) return VIDEOXL_STATUS_UNSUPPORTED;
    if (a.dtype == VIDEOXL_DTYPE_FLOAT16) return dispatch_mma_head_dim<__half>(a, plan);
    return dispatch_mma_head_dim<__nv_bfloat16>(a, plan);
#endif
}

}  // namespace videoxl
