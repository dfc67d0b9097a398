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

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from videoxl.plugins import build

EMULATION_INCLUDE = Path(__file__).parent / "cuda_host" / "include"
LAUNCH = re.compile(r"(\w+(?:<[\w, ]+>)?)<<<([^;]*?)>>>\(")
DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")


def translate(source: str) -> str:
    """CUDA launch and dynamic-shared syntax -> calls into the emulation."""
    source = LAUNCH.sub(lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, ", source)
    return DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_shared());", source)


@pytest.fixture(scope="session")
def emulated_kernels_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libvideoxl_kernels built for the host (host pointers, same C launchers)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build the kernel emulation")
    work = tmp_path_factory.mktemp("emulated")
    units = []
    for path in build.kernel_sources() + build.kernel_headers():
        target = work / path.relative_to(build.PLUGIN_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text()
        if path.suffix == ".cu":
            target = target.with_suffix(".cpp")
            text = translate(text)
            units.append(str(target))
        target.write_text(text)
    library = work / "libvideoxl_kernels_emulated.so"
    command = [
        compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing",
        "-Wno-unknown-pragmas", "-DVIDEOXL_HOST_EMULATION", "-I", str(EMULATION_INCLUDE), *units, "-o", str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return library
