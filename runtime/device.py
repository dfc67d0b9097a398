"""Is an NVIDIA GPU usable from here? (import-safe with no driver, no CUDA, no cuda-python)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def gpu_usable() -> bool:
    return gpu_problem() is None


@functools.lru_cache(maxsize=1)
def gpu_problem() -> str | None:
    """None when a CUDA device is usable, else one line saying why not."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return "cuda-python is not installed (pip install 'videoxl[tensorrt]')"
    try:
        (err,) = driver.cuInit(0)
    except Exception as exc:  # the driver library itself is missing
        return f"no CUDA driver on this machine ({exc.__class__.__name__}: {exc})"
    if err != driver.CUresult.CUDA_SUCCESS:
        return f"no usable CUDA driver or GPU (cuInit: {err.name})"
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return "no CUDA device found"
    return None
