/* Shared declarations of the videoxl kernel library (libvideoxl_kernels.so).
 *
 * Every launcher is a plain C function: raw device pointers, sizes, a cudaStream_t, and the
 * element type of the float tensors. It only enqueues work on the stream (no allocation, no
 * synchronisation), so a TensorRT plugin's enqueue can call it inside a CUDA graph.
 * A launcher returns 0 on success, a VideoxlStatus (< 0) for a rejected argument, or the
 * cudaError_t (> 0) of a failed launch.
 */
#ifndef VIDEOXL_KERNELS_H_
#define VIDEOXL_KERNELS_H_

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
#define VIDEOXL_EXTERN_C extern "C"
#else
#define VIDEOXL_EXTERN_C
#endif
#define VIDEOXL_API VIDEOXL_EXTERN_C __attribute__((visibility("default")))

/* Bumped whenever a launcher's signature or numerics change. */
#define VIDEOXL_KERNELS_VERSION 3  /* 2: op contract v2; 3: videoxl_block_scores takes causal_tail */

/* Element type of the model's float tensors (indices and weights have fixed types). */
typedef enum VideoxlDType {
    VIDEOXL_DTYPE_FLOAT32 = 0,
    VIDEOXL_DTYPE_FLOAT16 = 1,
    VIDEOXL_DTYPE_BFLOAT16 = 2,
} VideoxlDType;

typedef enum VideoxlStatus {
    VIDEOXL_STATUS_OK = 0,
    VIDEOXL_STATUS_INVALID_ARGUMENT = -1, /* a size, pointer or dtype out of range */
    VIDEOXL_STATUS_UNSUPPORTED_HEAD_DIM = -2, /* head_dim outside the compiled set */
    VIDEOXL_STATUS_TOO_MANY_BLOCKS = -3, /* num_blocks above the block-score limit */
    VIDEOXL_STATUS_UNSUPPORTED = -4, /* this kernel variant cannot run this dtype/head_dim/device */
    VIDEOXL_STATUS_WORKSPACE_TOO_SMALL = -5, /* workspace smaller than the *_workspace_bytes query */
} VideoxlStatus;

/* VIDEOXL_KERNELS_VERSION of the library actually loaded. */
VIDEOXL_API int videoxl_kernels_version(void);

/* Human-readable text for any launcher return value (static storage). */
VIDEOXL_API const char* videoxl_kernels_status_string(int status);

#endif /* VIDEOXL_KERNELS_H_ */
