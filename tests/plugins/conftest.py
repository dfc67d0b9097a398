"""The kernels built for the host: the real .cu files compiled by g++ against a CUDA emulation.

cuda_host/include emulates the few CUDA features the kernels use: each block's threads are
real threads, so the tiling, the query partition, the shuffles, barriers and atomics all run
as written; only the `<<<>>>` launches and `extern __shared__` declarations are rewritten.
The launchers (argument checks, dispatch) are the real ones, so the library has the GPU
library's C interface and takes host pointers. The emulated device reports compute capability
7.5, so the dispatchers take their SIMT paths; the tensor-core attention kernel (inline PTX) is
compiled out under VIDEOXL_HOST_EMULATION and its launcher answers "unsupported". It cannot see GPU-only problems (shared-memory
limits, alignment, speed); the GPU run of test_kernels.py covers those.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from videoxl.plugins import build

EMULATION_INCLUDE = Path(__file__).parent / "cuda_host" / "include"


@pytest.fixture(scope="session")
def emulated_kernels_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libvideoxl_kernels built for the host (host pointers, same C launchers)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no host C++ compiler (g++) to build the kernel emulation")
    return build.build_host_emulation(EMULATION_INCLUDE, tmp_path_factory.mktemp("emulated"))
