// Library-wide entry points: version and status text.
#include <cuda_runtime.h>

#include "videoxl_kernels.h"

VIDEOXL_API int videoxl_kernels_version(void) { return VIDEOXL_KERNELS_VERSION; }

VIDEOXL_API const char* videoxl_kernels_status_string(int status) {
    switch (status) {
        case VIDEOXL_STATUS_OK: return "ok";
        case VIDEOXL_STATUS_INVALID_ARGUMENT: return "invalid argument (size, pointer or dtype out of range)";
        case VIDEOXL_STATUS_UNSUPPORTED_HEAD_DIM: return "head_dim not compiled (supported: 16, 32, 64, 128)";
        case VIDEOXL_STATUS_TOO_MANY_BLOCKS: return "num_blocks above the block-score kernel's limit";
        case VIDEOXL_STATUS_UNSUPPORTED:
            return "kernel variant unsupported here (tensor-core attention: fp16/bf16, head_dim 64/128, sm_80+)";
        case VIDEOXL_STATUS_WORKSPACE_TOO_SMALL: return "workspace smaller than videoxl_chunk_attention_workspace_bytes";
        default: break;
    }
    if (status > 0) return cudaGetErrorString(static_cast<cudaError_t>(status));
    return "unknown videoxl status";
}
