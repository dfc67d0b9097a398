// ChunkSparseAttention (op contract v2), SIMT kernel: online softmax over the keys a chunk
// query may see, float32 accumulation, no tensor cores. It serves fp32, sm_75 and the host
// emulation of the tests; chunk_attention_mma.cu is the tensor-core kernel for fp16/bf16 on
// sm_80+. The C launchers at the end of this file choose between them.
//
// Grid: x = query head, y = query tile of 32 queries. Tiles hold one kind of query, so that
// the rare timestamp queries (which see the whole past) never drag the others through it:
//
//   y:  [ timestamp tiles ][ other tiles ............................... ]
//        past rows [0, past_len)     past rows visible_past_index
//        + chunk keys [0, last]      + chunk keys [0, last]
//
// The past is read in place: row r of past_key/past_value is the key of position r, already
// rotated. Timestamp tiles come first so that their long sweeps start first. Inside a tile
// each warp owns 8 queries; a K/V tile of 32 keys is staged in shared memory (one key per
// lane for the scores, one head_dim slice per lane for P.V); chunk keys beyond a query are
// masked (causal inside the chunk).

#include "../common/common.cuh"
#include "chunk_attention.h"
#include "chunk_attention_args.cuh"

namespace videoxl {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kQueriesPerWarp = 8;
constexpr int kBlockQ = kWarps * kQueriesPerWarp;  // queries per tile
constexpr int kBlockK = 32;  // keys per K/V tile: one per lane
static_assert(kBlockQ == 32, "the tile scan hands one query slot to each lane of warp 0");

template <int D>
struct SharedTile {
    __align__(16) float q[kBlockQ][D];  // queries, pre-scaled by scale * log2(e)
    __align__(16) float k[kBlockK][D + 4];  // +4: float4 row reads are conflict-free
    __align__(16) float v[kBlockK][D];
    __align__(16) float p[kWarps][kBlockK][kQueriesPerWarp];  // probabilities for P.V
    int query_index[kBlockQ];  // chunk query of each slot, -1 when empty
    int last_query;  // largest query index in the tile, -1 if none
};

// One key range of a tile's sweep: entries [begin, end) of either a row range itself or,
// when `index` is set, of an index list; rows outside [0, limit) are skipped. A row's
// absolute position is position_base + row (the causal test).
template <typename T>
struct KeySegment {
    int64_t begin;
    int64_t end;
    const int64_t* index;
    int64_t limit;
    const T* key;
    const T* value;
    int64_t position_base;
};

template <typename T>
__device__ __forceinline__ int64_t segment_row(const KeySegment<T>& seg, int64_t t) {
    if (t >= seg.end) return -1;
    const int64_t row = seg.index == nullptr ? t : seg.index[t];
    return (row >= 0 && row < seg.limit) ? row : -1;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) chunk_attention_kernel(
    const T* __restrict__ query, const T* __restrict__ key, const T* __restrict__ value,
    const T* __restrict__ past_key, const T* __restrict__ past_value, const int64_t* __restrict__ past_len_ptr,
    const int64_t* __restrict__ visible_past_index, int64_t num_visible,
    const int64_t* __restrict__ timestamp_query_index, int num_timestamp_queries, T* __restrict__ output,
    int num_queries, int64_t past_capacity, int num_q_heads, int num_kv_heads, float scale_log2) {
    extern __shared__ __align__(16) unsigned char shared_raw[];
    SharedTile<D>& s = *reinterpret_cast<SharedTile<D>*>(shared_raw);

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int head = blockIdx.x;
    const int kv_head = head / (num_q_heads / num_kv_heads);
    const int64_t past = min(max(*past_len_ptr, int64_t{0}), past_capacity);  // valid past rows

    // --- which queries this tile holds -----------------------------------------------------
    // Timestamp tiles take 32 consecutive entries of the (ascending) timestamp list; the other
    // tiles take the queries of rank [rank_begin, rank_begin + 32) among the non-timestamps:
    // the r-th query not in the sorted list is r plus the list entries at or below it.
    const int num_other = num_queries - num_timestamp_queries;
    const int ts_tiles = (num_timestamp_queries + kBlockQ - 1) / kBlockQ;
    const bool ts_tile = static_cast<int>(blockIdx.y) < ts_tiles;
    const int rank_begin = (ts_tile ? static_cast<int>(blockIdx.y) : static_cast<int>(blockIdx.y) - ts_tiles) * kBlockQ;
    if (warp == 0) {
        const int rank = rank_begin + lane;
        int qi = -1;
        if (ts_tile && rank < num_timestamp_queries) {
            const int64_t listed = timestamp_query_index[rank];
            qi = (listed >= 0 && listed < num_queries) ? static_cast<int>(listed) : -1;
        } else if (!ts_tile && rank < num_other) {
            qi = rank;
            for (int t = 0; t < num_timestamp_queries && timestamp_query_index[t] <= qi; ++t) ++qi;
        }
        s.query_index[lane] = qi;
        int last = qi;
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, offset));
        if (lane == 0) s.last_query = last;
    }
    __syncthreads();
    if (s.last_query < 0) return;  // nothing valid in this tile (block-uniform)

    for (int e = tid; e < kBlockQ * D; e += kThreads) {
        const int slot = e / D;
        const int d = e % D;
        const int qi = s.query_index[slot];
        s.q[slot][d] = qi >= 0 ? to_float(query[(static_cast<int64_t>(qi) * num_q_heads + head) * D + d]) * scale_log2 : 0.0f;
    }

    // --- the key ranges this tile sweeps: the past (all of it, or through the list), then the
    // chunk's own keys up to the tile's last query --------------------------------------------
    const int num_segments = 2;

    constexpr int kSlices = D >= 32 ? D / 32 : 1;  // head_dim elements per lane in P.V
    int64_t position[kQueriesPerWarp];
    float row_max[kQueriesPerWarp];
    float row_sum[kQueriesPerWarp];  // per-lane partial sums; reduced once at the end
    float acc[kQueriesPerWarp][kSlices];
#pragma unroll
    for (int j = 0; j < kQueriesPerWarp; ++j) {
        const int qi = s.query_index[warp * kQueriesPerWarp + j];
        position[j] = qi >= 0 ? past + qi : -1;  // -1 masks every key of an empty slot
        row_max[j] = -INFINITY;
        row_sum[j] = 0.0f;
#pragma unroll
        for (int c = 0; c < kSlices; ++c) acc[j][c] = 0.0f;
    }
    bool warp_live = false;
#pragma unroll
    for (int j = 0; j < kQueriesPerWarp; ++j) warp_live |= position[j] >= 0;

    for (int seg_i = 0; seg_i < num_segments; ++seg_i) {
        KeySegment<T> seg;
        if (seg_i == 1) {
            seg = {0, s.last_query + 1, nullptr, num_queries, key, value, past};
        } else if (ts_tile) {
            seg = {0, past, nullptr, past, past_key, past_value, 0};  // timestamp queries: the whole past
        } else {
            seg = {0, num_visible, visible_past_index, past, past_key, past_value, 0};
        }
        for (int64_t t0 = seg.begin; t0 < seg.end; t0 += kBlockK) {
            __syncthreads();  // the previous tile is consumed (and s.q is written)
            for (int e = tid; e < kBlockK * D; e += kThreads) {
                const int slot = e / D;
                const int d = e % D;
                const int64_t row = segment_row(seg, t0 + slot);
                float kx = 0.0f, vx = 0.0f;
                if (row >= 0) {
                    const int64_t offset = (row * num_kv_heads + kv_head) * D + d;
                    kx = to_float(seg.key[offset]);
                    vx = to_float(seg.value[offset]);
                }
                s.k[slot][d] = kx;
                s.v[slot][d] = vx;
            }
            __syncthreads();
            if (!warp_live) continue;

            // scores: lane = key, 8 queries at once
            const int64_t my_row = segment_row(seg, t0 + lane);
            const int64_t my_key = my_row >= 0 ? seg.position_base + my_row : -1;  // absolute position
            float score[kQueriesPerWarp];
#pragma unroll
            for (int j = 0; j < kQueriesPerWarp; ++j) score[j] = 0.0f;
#pragma unroll 4
            for (int d = 0; d < D; d += 4) {
                const float4 k4 = *reinterpret_cast<const float4*>(&s.k[lane][d]);
#pragma unroll
                for (int j = 0; j < kQueriesPerWarp; ++j) {
                    const float4 q4 = *reinterpret_cast<const float4*>(&s.q[warp * kQueriesPerWarp + j][d]);
                    score[j] += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
                }
            }

            // online softmax (base 2: the queries carry log2(e))
#pragma unroll
            for (int j = 0; j < kQueriesPerWarp; ++j) {
                const float sj = (my_key >= 0 && my_key <= position[j]) ? score[j] : -INFINITY;
                const float new_max = fmaxf(row_max[j], warp_max(sj));
                const float alpha = new_max == -INFINITY ? 1.0f : exp2f(row_max[j] - new_max);
                const float pj = sj == -INFINITY ? 0.0f : exp2f(sj - new_max);
                row_max[j] = new_max;
                row_sum[j] = row_sum[j] * alpha + pj;
#pragma unroll
                for (int c = 0; c < kSlices; ++c) acc[j][c] *= alpha;
                s.p[warp][lane][j] = pj;
            }
            __syncwarp();

            // P.V: lane = head_dim slice
#pragma unroll 4
            for (int kk = 0; kk < kBlockK; ++kk) {
                const float4 pa = *reinterpret_cast<const float4*>(&s.p[warp][kk][0]);
                const float4 pb = *reinterpret_cast<const float4*>(&s.p[warp][kk][4]);
                const float pk[kQueriesPerWarp] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
#pragma unroll
                for (int c = 0; c < kSlices; ++c) {
                    const int d = lane + 32 * c;
                    if (d < D) {
                        const float vx = s.v[kk][d];
#pragma unroll
                        for (int j = 0; j < kQueriesPerWarp; ++j) acc[j][c] += pk[j] * vx;
                    }
                }
            }
            __syncwarp();
        }
    }

#pragma unroll
    for (int j = 0; j < kQueriesPerWarp; ++j) {
        if (position[j] < 0) continue;  // warp-uniform
        const float inv_sum = 1.0f / warp_sum(row_sum[j]);
        const int64_t qi = position[j] - past;
#pragma unroll
        for (int c = 0; c < kSlices; ++c) {
            const int d = lane + 32 * c;
            if (d < D) output[(qi * num_q_heads + head) * D + d] = from_float<T>(acc[j][c] * inv_sum);
        }
    }
}

template <typename T, int D>
int launch(const ChunkAttentionArgs& a) {
    auto kernel = chunk_attention_kernel<T, D>;
    const int shared_bytes = static_cast<int>(sizeof(SharedTile<D>));
    if (shared_bytes > 48 * 1024) {
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    const int64_t tiles = (a.num_timestamp_queries + kBlockQ - 1) / kBlockQ +
                          (a.num_queries - a.num_timestamp_queries + kBlockQ - 1) / kBlockQ;
    const dim3 grid(static_cast<unsigned int>(a.num_q_heads), static_cast<unsigned int>(tiles));
    const float log2e = 1.4426950408889634f;
    kernel<<<grid, kThreads, shared_bytes, a.stream>>>(
        static_cast<const T*>(a.query), static_cast<const T*>(a.key), static_cast<const T*>(a.value),
        static_cast<const T*>(a.past_key), static_cast<const T*>(a.past_value), a.past_len,
        a.visible_past_index, a.num_visible, a.timestamp_query_index, static_cast<int>(a.num_timestamp_queries),
        static_cast<T*>(a.output), static_cast<int>(a.num_queries), a.past_capacity, a.num_q_heads,
        a.num_kv_heads, a.scale * log2e);
    return launch_status();
}

template <typename T>
int dispatch_head_dim(const ChunkAttentionArgs& a) {
    switch (a.head_dim) {
        case 16: return launch<T, 16>(a);
        case 32: return launch<T, 32>(a);
        case 64: return launch<T, 64>(a);
        case 128: return launch<T, 128>(a);
        default: return VIDEOXL_STATUS_UNSUPPORTED_HEAD_DIM;
    }
}

// Size and pointer checks every kernel shares; VIDEOXL_STATUS_OK when the launch may go on.
int check_args(const ChunkAttentionArgs& a) {
    if (a.num_queries < 0 || a.num_queries > int64_t{kBlockQ} * 65534 || a.past_capacity < 0 ||
        a.num_q_heads <= 0 || a.num_kv_heads <= 0 || a.num_q_heads % a.num_kv_heads != 0 ||
        a.num_q_heads > 65535 || a.num_visible < 0 || a.num_visible > a.past_capacity ||
        a.num_timestamp_queries < 0 || a.num_timestamp_queries > a.num_queries) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    if (a.num_queries == 0) return VIDEOXL_STATUS_OK;
    if (!a.query || !a.key || !a.value || !a.past_len || !a.output ||
        (a.past_capacity > 0 && (!a.past_key || !a.past_value)) || (a.num_visible > 0 && !a.visible_past_index) ||
        (a.num_timestamp_queries > 0 && !a.timestamp_query_index)) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    return VIDEOXL_STATUS_OK;
}

}  // namespace

int chunk_attention_simt(const ChunkAttentionArgs& a) {
    VIDEOXL_DISPATCH_DTYPE(a.dtype, { return dispatch_head_dim<scalar_t>(a); })
    return VIDEOXL_STATUS_INVALID_ARGUMENT;
}

}  // namespace videoxl

namespace {

videoxl::ChunkAttentionArgs make_args(
    const void* query, const void* key, const void* value, const void* past_key, const void* past_value,
    const int64_t* past_len, const int64_t* visible_past_index, int64_t num_visible,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries, void* output, void* workspace,
    size_t workspace_bytes, int64_t num_queries, int64_t past_capacity, int32_t num_q_heads, int32_t num_kv_heads,
    int32_t head_dim, float scale, VideoxlDType dtype, cudaStream_t stream) {
    return {query, key, value, past_key, past_value, past_len, visible_past_index, num_visible,
            timestamp_query_index, num_timestamp_queries, output, workspace, workspace_bytes, num_queries,
            past_capacity, num_q_heads, num_kv_heads, head_dim, scale, dtype, stream};
}

enum class Variant { kAuto, kSimt, kMma };

int run(const videoxl::ChunkAttentionArgs& a, Variant variant) {
    using namespace videoxl;
    const int checked = check_args(a);
    if (checked != VIDEOXL_STATUS_OK || a.num_queries == 0) return checked;
    if (a.dtype != VIDEOXL_DTYPE_FLOAT32 && a.dtype != VIDEOXL_DTYPE_FLOAT16 && a.dtype != VIDEOXL_DTYPE_BFLOAT16) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    const bool mma_shape = chunk_attention_mma_supports(a.dtype, a.head_dim);
    if (variant == Variant::kMma || (variant == Variant::kAuto && mma_shape && current_device_major() >= 8)) {
        return chunk_attention_mma(a);
    }
    return chunk_attention_simt(a);
}

}  // namespace

#define VIDEOXL_CHUNK_ATTENTION_ARGS                                                                          \
    make_args(query, key, value, past_key, past_value, past_len, visible_past_index, num_visible,             \
              timestamp_query_index, num_timestamp_queries, output, workspace, workspace_bytes, num_queries,  \
              past_capacity, num_q_heads, num_kv_heads, head_dim, scale, dtype, stream)

VIDEOXL_API int videoxl_chunk_attention(
    const void* query, const void* key, const void* value,
    const void* past_key, const void* past_value, const int64_t* past_len,
    const int64_t* visible_past_index, int64_t num_visible,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries,
    void* output, void* workspace, size_t workspace_bytes,
    int64_t num_queries, int64_t past_capacity,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream) {
    return run(VIDEOXL_CHUNK_ATTENTION_ARGS, Variant::kAuto);
}

VIDEOXL_API int videoxl_chunk_attention_simt(
    const void* query, const void* key, const void* value,
    const void* past_key, const void* past_value, const int64_t* past_len,
    const int64_t* visible_past_index, int64_t num_visible,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries,
    void* output, void* workspace, size_t workspace_bytes,
    int64_t num_queries, int64_t past_capacity,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream) {
    return run(VIDEOXL_CHUNK_ATTENTION_ARGS, Variant::kSimt);
}

VIDEOXL_API int videoxl_chunk_attention_mma(
    const void* query, const void* key, const void* value,
    const void* past_key, const void* past_value, const int64_t* past_len,
    const int64_t* visible_past_index, int64_t num_visible,
    const int64_t* timestamp_query_index, int64_t num_timestamp_queries,
    void* output, void* workspace, size_t workspace_bytes,
    int64_t num_queries, int64_t past_capacity,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float scale, VideoxlDType dtype, cudaStream_t stream) {
    return run(VIDEOXL_CHUNK_ATTENTION_ARGS, Variant::kMma);
}

#undef VIDEOXL_CHUNK_ATTENTION_ARGS

VIDEOXL_API int64_t videoxl_chunk_attention_workspace_bytes(
    int64_t num_queries, int64_t past_capacity, int64_t num_visible, int64_t num_timestamp_queries,
    int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, VideoxlDType dtype) {
    using namespace videoxl;
    if (num_queries < 0 || past_capacity < 0 || num_visible < 0 || num_timestamp_queries < 0 ||
        num_timestamp_queries > num_queries || num_q_heads <= 0 || num_kv_heads <= 0) {
        return VIDEOXL_STATUS_INVALID_ARGUMENT;
    }
    if (!chunk_attention_mma_supports(dtype, head_dim)) return 0;  // the SIMT kernel needs none
    return static_cast<int64_t>(chunk_attention_mma_workspace_bytes(
        num_queries, past_capacity, num_visible, num_timestamp_queries, num_q_heads, num_kv_heads, head_dim));
}
