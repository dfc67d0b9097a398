"""ctypes bindings of libvideoxl_kernels.so: the launchers a TensorRT plugin's enqueue calls.

Two layers:

* raw launchers (`chunk_attention` with its `variant` and `chunk_attention_workspace_bytes`,
  `bilevel_kv_gather`, `pool_kv`, `block_scores`, `top_k_blocks`): device pointers as ints, sizes, a stream handle (int, 0 = legacy default
  stream). They mirror the C declarations in ``*/*.h`` argument for argument and raise
  `KernelError` on a non-zero status. No torch.
* torch wrappers (`*_torch`): take CUDA tensors, check shapes, allocate outputs and launch on
  the current torch stream. torch is imported inside them only. After
  `use_library(..., host_memory=True)` (a host build of the kernels, as the tests make) they
  take CPU tensors instead.

Nothing is loaded at import: the library is opened (and built, if missing or stale, for the
GPU in use) on the first launch, so this module imports on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from videoxl.plugins import build

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LIBRARY_ENV = "VIDEOXL_KERNELS_LIBRARY"  # explicit path to a prebuilt library
KERNELS_VERSION = 3  # VIDEOXL_KERNELS_VERSION these bindings are written for


class DType(enum.IntEnum):
    """VideoxlDType in common/videoxl_kernels.h."""

    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2

    @classmethod
    def of(cls, value: DType | int | str) -> DType:
        """A DType from itself, its code, or a name ("fp16", "float16", "bf16", "bfloat16", ...)."""
        if isinstance(value, str):
            if value.lower() not in _DTYPE_NAMES:
                raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(_DTYPE_NAMES)}")
            return _DTYPE_NAMES[value.lower()]
        return cls(value)


DTypeLike = DType | int | str
_DTYPE_NAMES = {
    "fp32": DType.FLOAT32, "float32": DType.FLOAT32, "float": DType.FLOAT32,
    "fp16": DType.FLOAT16, "float16": DType.FLOAT16, "half": DType.FLOAT16,
    "bf16": DType.BFLOAT16, "bfloat16": DType.BFLOAT16,
}


class KernelError(RuntimeError):
    """A launcher returned a non-zero status."""


_p = ctypes.c_void_p
_i32 = ctypes.c_int32
_i64 = ctypes.c_int64
_f32 = ctypes.c_float
_size = ctypes.c_size_t

# Attention kernel choice -> C launcher: "auto" lets the library pick (tensor cores for
# fp16/bf16 at head_dim 64/128 on sm_80+, else SIMT); the others force one kernel.
ATTENTION_LAUNCHERS = {
    "auto": "videoxl_chunk_attention",
    "simt": "videoxl_chunk_attention_simt",
    "mma": "videoxl_chunk_attention_mma",
}

# C signature of every launcher (argument types in declaration order); return type is int.
SIGNATURES: dict[str, list[Any]] = {
    **{
        name: [
            _p, _p, _p,  # query, key, value (the chunk)
            _p, _p, _p,  # past_key, past_value, past_len (device int64)
            _p, _i64,  # visible_past_index, num_visible
            _p, _i64,  # timestamp_query_index, num_timestamp_queries
            _p, _p, _size,  # output, workspace, workspace_bytes
            _i64, _i64,  # num_queries, past_capacity
            _i32, _i32, _i32,  # num_q_heads, num_kv_heads, head_dim
            _f32, ctypes.c_int, _p,  # scale, dtype, stream
        ]
        for name in ATTENTION_LAUNCHERS.values()
    },
    "videoxl_bilevel_kv_gather": [
        _p, _p,  # key, value
        _p, _p,  # gather_index, gather_weight
        _p, _p,  # source_position, target_position
        _p, _p,  # mixed_key, mixed_value
        _i64, _i64, _i32,  # num_source, num_mixed, gather_width
        _i32, _i32,  # num_kv_heads, head_dim
        _f32, ctypes.c_int, _p,  # rope_theta, dtype, stream
    ],
    "videoxl_pool_kv": [
        _p, _p,  # input, output
        _i64, _i32, _i32, _i32,  # num_output, stride, num_heads, head_dim
        ctypes.c_int, _p,  # dtype, stream
    ],
    "videoxl_block_scores": [
        _p, _p, _p, _p,  # query, key, block_bounds, scores
        _i64, _i64, _i64, _i32,  # num_queries, num_keys, causal_tail, num_blocks
        _i32, _i32, _i32,  # num_q_heads, num_kv_heads, head_dim
        _f32, ctypes.c_int, _p,  # scale, dtype, stream
    ],
    "videoxl_top_k_blocks": [
        _p, _p, _p,  # scores, always_dense, top_blocks
        _i32, _i32, _p,  # num_blocks, k, stream
    ],
}
LAUNCHERS = (*SIGNATURES, "videoxl_chunk_attention_workspace_bytes")
WORKSPACE_SIGNATURE = [_i64, _i64, _i64, _i64, _i32, _i32, _i32, ctypes.c_int]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_host_memory = False  # the loaded library is a host build: launchers take host pointers


# --- loading ---------------------------------------------------------------------------------


def device_arch() -> str | None:
    """sm_XY of CUDA device 0, or None when no GPU (or no way to ask) is present."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    if cudart is not None:
        attr = cudart.cudaDeviceAttr
        err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, 0)
        if err == cudart.cudaError_t.cudaSuccess:
            _, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, 0)
            return f"sm_{major}{minor}"
        return None
    torch = sys.modules.get("torch")  # only if the caller already uses torch
    if torch is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return f"sm_{major}{minor}"
    return None


def library_path() -> Path:
    """Where the library is loaded from: $VIDEOXL_KERNELS_LIBRARY or the default build."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        return Path(explicit)
    return build.default_output_dir() / build.LIBRARY_NAME


def _needs_build(path: Path, arch: str | None) -> str | None:
    """Why the default library must be (re)built, or None."""
    if not path.is_file():
        return "missing"
    info = build.read_buildinfo(path)
    if info is None:
        return None  # built elsewhere (e.g. CMake): trust it
    if info.source_hash != build.source_hash():
        return "sources changed"
    if arch is not None and not info.covers(arch):
        return f"built for {info.archs}, not {arch}"
    return None


def load_library(*, build_if_needed: bool = True) -> ctypes.CDLL:
    """Open the kernel library once, building it first when missing or stale."""
    with _lock:
        if _library is not None:
            return _library
        path = library_path()
        if LIBRARY_ENV not in os.environ and build_if_needed:
            arch = device_arch()
            reason = _needs_build(path, arch)
            if reason is not None:
                info = build.read_buildinfo(path) if path.is_file() else None
                archs = sorted(set(info.archs if info else []) | ({arch} if arch else set())) or None
                log.info("building %s (%s) for %s", path, reason, archs or "every supported GPU")
                path = build.build_library(archs=archs, out_dir=path.parent)
        return _open(path, host_memory=False)


def use_library(path: Path | str | None, *, host_memory: bool = False) -> ctypes.CDLL | None:
    """Launch through the library at `path` from now on (None: back to `load_library`'s default).

    host_memory=True is for a host build of the kernels (the CPU emulation of CUDA in the
    tests): its launchers take host pointers, so the torch wrappers take CPU tensors.
    """
    global _library, _host_memory
    with _lock:
        _library, _host_memory = None, False
        return None if path is None else _open(Path(path), host_memory=host_memory)


def _open(path: Path, *, host_memory: bool) -> ctypes.CDLL:
    """dlopen `path`, type every launcher, check the kernels version (caller holds _lock)."""
    global _library, _host_memory
    if not path.is_file():
        raise build.BuildError(f"kernel library {path} not found; build it with `python -m videoxl.plugins.build`")
    library = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    library.videoxl_chunk_attention_workspace_bytes.argtypes = WORKSPACE_SIGNATURE
    library.videoxl_chunk_attention_workspace_bytes.restype = ctypes.c_int64
    library.videoxl_kernels_status_string.argtypes = [ctypes.c_int]
    library.videoxl_kernels_status_string.restype = ctypes.c_char_p
    library.videoxl_kernels_version.restype = ctypes.c_int
    if library.videoxl_kernels_version() != KERNELS_VERSION:
        raise build.BuildError(
            f"{path} implements kernels version {library.videoxl_kernels_version()}, these bindings expect "
            f"{KERNELS_VERSION}; rebuild it with `python -m videoxl.plugins.build --force`"
        )
    _library, _host_memory = library, host_memory
    log.debug("loaded %s (kernels version %d)", path, library.videoxl_kernels_version())
    return library


def _call(name: str, *args: Any) -> None:
    library = load_library()
    status = getattr(library, name)(*args)
    if status != 0:
        text = library.videoxl_kernels_status_string(status).decode()
        hint = ""
        if status == 209:  # cudaErrorNoKernelImageForDevice
            hint = f" (rebuild with `python -m videoxl.plugins.build --arch {device_arch() or 'sm_XY'}`)"
        raise KernelError(f"{name} failed: {text} (status {status}){hint}")


# --- raw launchers (device pointers as ints) -------------------------------------------------


def chunk_attention(
    *, query: int, key: int, value: int, past_key: int, past_value: int, past_len: int,
    visible_past_index: int, num_visible: int, timestamp_query_index: int, num_timestamp_queries: int,
    output: int, workspace: int, workspace_bytes: int, num_queries: int, past_capacity: int,
    num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: DTypeLike, stream: int = 0,
    variant: str = "auto",
) -> None:
    """videoxl_chunk_attention (or its _simt / _mma form); past_len points to one device int64."""
    if variant not in ATTENTION_LAUNCHERS:
        raise ValueError(f"unknown attention kernel {variant!r}; expected one of {sorted(ATTENTION_LAUNCHERS)}")
    _call(
        ATTENTION_LAUNCHERS[variant], query, key, value, past_key, past_value, past_len, visible_past_index,
        num_visible, timestamp_query_index, num_timestamp_queries, output, workspace, workspace_bytes,
        num_queries, past_capacity, num_q_heads, num_kv_heads, head_dim, scale, DType.of(dtype), stream,
    )


def chunk_attention_workspace_bytes(
    *, num_queries: int, past_capacity: int, num_visible: int, num_timestamp_queries: int,
    num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: DTypeLike,
) -> int:
    """Workspace bytes a chunk_attention launch with these shapes needs (shapes only, no GPU)."""
    library = load_library()
    size = library.videoxl_chunk_attention_workspace_bytes(
        num_queries, past_capacity, num_visible, num_timestamp_queries, num_q_heads, num_kv_heads, head_dim,
        DType.of(dtype),
    )
    if size < 0:
        raise KernelError(f"videoxl_chunk_attention_workspace_bytes: {library.videoxl_kernels_status_string(size).decode()}")
    return int(size)


def bilevel_kv_gather(
    *, key: int, value: int, gather_index: int, gather_weight: int, source_position: int, target_position: int,
    mixed_key: int, mixed_value: int, num_source: int, num_mixed: int, gather_width: int, num_kv_heads: int,
    head_dim: int, rope_theta: float, dtype: DTypeLike, stream: int = 0,
) -> None:
    """videoxl_bilevel_kv_gather."""
    _call(
        "videoxl_bilevel_kv_gather", key, value, gather_index, gather_weight, source_position, target_position,
        mixed_key, mixed_value, num_source, num_mixed, gather_width, num_kv_heads, head_dim, rope_theta,
        DType.of(dtype), stream,
    )


def pool_kv(
    *, input: int, output: int, num_output: int, stride: int, num_heads: int, head_dim: int,
    dtype: DTypeLike, stream: int = 0,
) -> None:
    """videoxl_pool_kv."""
    _call("videoxl_pool_kv", input, output, num_output, stride, num_heads, head_dim, DType.of(dtype), stream)


def block_scores(
    *, query: int, key: int, block_bounds: int, scores: int, num_queries: int, num_keys: int,
    causal_tail: int = 0, num_blocks: int, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float,
    dtype: DTypeLike, stream: int = 0,
) -> None:
    """videoxl_block_scores (adds one layer's mass into `scores`)."""
    _call(
        "videoxl_block_scores", query, key, block_bounds, scores, num_queries, num_keys, causal_tail, num_blocks,
        num_q_heads, num_kv_heads, head_dim, scale, DType.of(dtype), stream,
    )


def top_k_blocks(*, scores: int, always_dense: int, top_blocks: int, num_blocks: int, k: int, stream: int = 0) -> None:
    """videoxl_top_k_blocks."""
    _call("videoxl_top_k_blocks", scores, always_dense, top_blocks, num_blocks, k, stream)


# --- torch wrappers (tests, benchmarks) ------------------------------------------------------


def _torch_dtype(tensor: torch.Tensor) -> DType:
    import torch

    mapping = {torch.float32: DType.FLOAT32, torch.float16: DType.FLOAT16, torch.bfloat16: DType.BFLOAT16}
    if tensor.dtype not in mapping:
        raise TypeError(f"unsupported dtype {tensor.dtype}; expected float32, float16 or bfloat16")
    return mapping[tensor.dtype]


def _stream() -> int:
    import torch

    return 0 if _host_memory else torch.cuda.current_stream().cuda_stream


def _device_tensor(value: Any, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch

    return torch.as_tensor(value, dtype=dtype, device=like.device).contiguous()


def _check_device(**tensors: torch.Tensor) -> None:
    """Contiguous CUDA tensors (CPU tensors for a host build of the kernels)."""
    load_library()
    where = "CPU" if _host_memory else "CUDA"
    for name, tensor in tensors.items():
        if tensor.is_cuda == _host_memory or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {where} tensor (got device {tensor.device})")


def chunk_attention_torch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    *, past_len: int | torch.Tensor, visible_past_index: Any, timestamp_query_index: Any,
    scale: float | None = None, out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
    variant: str = "auto",
) -> torch.Tensor:
    """Per ops.CHUNK_SPARSE_ATTENTION: query (Q, Hq, D), key/value (Q, Hkv, D) the chunk,
    past_key/past_value (P, Hkv, D) the past buffer -> (Q, Hq, D). A missing workspace is
    allocated here (at its queried size); pass one to launch without allocating."""
    import torch

    _check_device(query=query, key=key, value=value, past_key=past_key, past_value=past_value)
    num_queries, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    length = _device_tensor(past_len, query, torch.int64).reshape(1)
    visible = _device_tensor(visible_past_index, query, torch.int64).reshape(-1)
    ts_queries = _device_tensor(timestamp_query_index, query, torch.int64).reshape(-1)
    dtype = _torch_dtype(query)
    needed = chunk_attention_workspace_bytes(
        num_queries=num_queries, past_capacity=past_key.shape[0], num_visible=visible.numel(),
        num_timestamp_queries=ts_queries.numel(), num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=dtype,
    )
    if workspace is None:
        workspace = torch.empty(max(needed, 1), dtype=torch.uint8, device=query.device)
    out = torch.empty_like(query) if out is None else out
    _check_device(out=out, workspace=workspace)
    chunk_attention(
        query=query.data_ptr(), key=key.data_ptr(), value=value.data_ptr(), past_key=past_key.data_ptr(),
        past_value=past_value.data_ptr(), past_len=length.data_ptr(),
        visible_past_index=visible.data_ptr() if visible.numel() else 0, num_visible=visible.numel(),
        timestamp_query_index=ts_queries.data_ptr() if ts_queries.numel() else 0,
        num_timestamp_queries=ts_queries.numel(), output=out.data_ptr(), workspace=workspace.data_ptr(),
        workspace_bytes=workspace.numel() * workspace.element_size(), num_queries=num_queries,
        past_capacity=past_key.shape[0], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scale=head_dim**-0.5 if scale is None else scale, dtype=dtype, stream=_stream(), variant=variant,
    )
    return out


def bilevel_kv_gather_torch(
    key: torch.Tensor, value: torch.Tensor, gather_index: Any, gather_weight: Any, source_position: Any,
    target_position: Any, *, rope_theta: float, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """key/value (N, Hkv, D), key n rotated at source_position[n] -> mixed_key (rotated at
    target_position), mixed_value (M, Hkv, D)."""
    import torch

    _check_device(key=key, value=value)
    index = _device_tensor(gather_index, key, torch.int64)
    weight = _device_tensor(gather_weight, key, torch.float32)
    source = _device_tensor(source_position, key, torch.int64).reshape(-1)
    target = _device_tensor(target_position, key, torch.int64).reshape(-1)
    num_mixed, width = index.shape
    if source.numel() != key.shape[0] or target.numel() != num_mixed:
        raise ValueError(f"source_position ({source.numel()}) must have {key.shape[0]} entries, "
                         f"target_position ({target.numel()}) {num_mixed}")
    if out is None:
        out = (key.new_empty((num_mixed, *key.shape[1:])), value.new_empty((num_mixed, *value.shape[1:])))
    mixed_key, mixed_value = out
    _check_device(mixed_key=mixed_key, mixed_value=mixed_value)
    bilevel_kv_gather(
        key=key.data_ptr(), value=value.data_ptr(), gather_index=index.data_ptr(), gather_weight=weight.data_ptr(),
        source_position=source.data_ptr(), target_position=target.data_ptr(),
        mixed_key=mixed_key.data_ptr(), mixed_value=mixed_value.data_ptr(), num_source=key.shape[0],
        num_mixed=num_mixed, gather_width=width, num_kv_heads=key.shape[1], head_dim=key.shape[2],
        rope_theta=rope_theta, dtype=_torch_dtype(key), stream=_stream(),
    )
    return mixed_key, mixed_value


def pool_kv_torch(kv: torch.Tensor, stride: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n * stride, H, D) -> (n, H, D) average over each run of `stride` tokens."""
    _check_device(kv=kv)
    if kv.shape[0] % stride:
        raise ValueError(f"{kv.shape[0]} tokens are not a multiple of stride {stride}")
    num_output = kv.shape[0] // stride
    out = kv.new_empty((num_output, *kv.shape[1:])) if out is None else out
    _check_device(out=out)
    pool_kv(
        input=kv.data_ptr(), output=out.data_ptr(), num_output=num_output, stride=stride, num_heads=kv.shape[1],
        head_dim=kv.shape[2], dtype=_torch_dtype(kv), stream=_stream(),
    )
    return out


def block_scores_torch(
    query: torch.Tensor, key: torch.Tensor, block_bounds: Any, *, scale: float | None = None,
    scores: torch.Tensor | None = None, causal_tail: int = 0,
) -> torch.Tensor:
    """Adds one layer's block mass into `scores` ((num_blocks,) float32, zeros if None).

    causal_tail = len(query): the last len(query) keys are the queries' own and query q sees
    the keys before them plus its own 0..q (a whole question in one launch); 0: all keys.
    """
    import torch

    _check_device(query=query, key=key)
    if causal_tail not in (0, query.shape[0]) or causal_tail > key.shape[0]:
        raise ValueError(f"causal_tail must be 0 or the {query.shape[0]} queries (of {key.shape[0]} keys); got {causal_tail}")
    bounds = _device_tensor(block_bounds, query, torch.int64).reshape(-1, 2)
    num_blocks = bounds.shape[0]
    scores = torch.zeros(num_blocks, dtype=torch.float32, device=query.device) if scores is None else scores
    _check_device(scores=scores)
    block_scores(
        query=query.data_ptr(), key=key.data_ptr(), block_bounds=bounds.data_ptr(), scores=scores.data_ptr(),
        num_queries=query.shape[0], num_keys=key.shape[0], causal_tail=causal_tail, num_blocks=num_blocks,
        num_q_heads=query.shape[1], num_kv_heads=key.shape[1], head_dim=query.shape[2],
        scale=query.shape[2] ** -0.5 if scale is None else scale, dtype=_torch_dtype(query), stream=_stream(),
    )
    return scores


def top_k_blocks_torch(scores: torch.Tensor, k: int, always_dense: Any) -> torch.Tensor:
    """(k,) int64 best blocks outside `always_dense` (indices or a bool mask), -1 padded."""
    import torch

    _check_device(scores=scores)
    num_blocks = scores.shape[0]
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=scores.device)
    dense = torch.as_tensor(always_dense, device=scores.device)
    if dense.dtype == torch.bool:
        mask |= dense
    elif dense.numel():
        mask[dense.long()] = True
    values = scores.float().contiguous()
    top = torch.empty(k, dtype=torch.int64, device=scores.device)
    top_k_blocks(
        scores=values.data_ptr(), always_dense=mask.data_ptr(), top_blocks=top.data_ptr(),
        num_blocks=num_blocks, k=k, stream=_stream(),
    )
    return top
