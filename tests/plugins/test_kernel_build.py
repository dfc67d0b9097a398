"""The kernel library compiles (one arch) and exports exactly the launchers the headers declare (CPU)."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from videoxl.plugins import build, kernels

ARCH = "sm_89"
DECLARATION = re.compile(r"VIDEOXL_API\s+[\w\s\*]+?\b(videoxl_\w+)\s*\(([^)]*)\)\s*;", re.S)


def declared_functions() -> dict[str, int]:
    """Every VIDEOXL_API function in the headers -> its number of parameters."""
    found: dict[str, int] = {}
    for header in build.kernel_headers():
        for name, params in DECLARATION.findall(header.read_text()):
            params = re.sub(r"/\*.*?\*/", "", params, flags=re.S).strip()
            found[name] = 0 if params in ("", "void") else params.count(",") + 1
    return found


def _nvcc_or_skip() -> Path:
    try:
        return build.find_nvcc()
    except build.NvccNotFoundError as err:
        pytest.skip(f"no CUDA compiler: {err}")


@pytest.fixture(scope="module")
def one_arch_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    _nvcc_or_skip()
    lines: list[str] = []
    out = tmp_path_factory.mktemp("kernels")
    library = build.build_library(archs=[ARCH], out_dir=out, ptx=False, progress=lines.append)
    return library, lines


def test_headers_declare_every_launcher() -> None:
    declared = declared_functions()
    assert set(kernels.LAUNCHERS) | {"videoxl_kernels_version", "videoxl_kernels_status_string"} == set(declared)
    for name, argtypes in kernels.SIGNATURES.items():
        assert len(argtypes) == declared[name], f"{name}: ctypes binding and header disagree"
    assert len(kernels.WORKSPACE_SIGNATURE) == declared["videoxl_chunk_attention_workspace_bytes"]


def test_library_builds_and_exports_every_launcher(one_arch_library) -> None:
    library, lines = one_arch_library
    assert library.is_file() and library.name == build.LIBRARY_NAME
    info = build.read_buildinfo(library)
    assert info is not None and info.archs == [ARCH] and info.ptx_arch is None
    assert info.source_hash == build.source_hash()
    assert info.covers(ARCH) and not info.covers("sm_90")
    assert any("[1/" in line for line in lines), lines  # progress is reported

    lib = ctypes.CDLL(str(library))  # static CUDA runtime: loads with no GPU and no driver
    for name in declared_functions():
        assert hasattr(lib, name), f"{name} is declared but not exported"
    nm = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True)
    if nm.returncode == 0:
        exported = set(re.findall(r"\bT (videoxl_\w+)", nm.stdout))
        assert exported == set(declared_functions()), "only the declared launchers are exported"


def test_launchers_validate_arguments_without_a_gpu(one_arch_library) -> None:
    """Argument checks run before any CUDA call, so they are testable on the CPU."""
    library, _ = one_arch_library
    lib = ctypes.CDLL(str(library))
    for name, argtypes in kernels.SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    lib.videoxl_kernels_status_string.restype = ctypes.c_char_p
    lib.videoxl_kernels_status_string.argtypes = [ctypes.c_int]
    assert lib.videoxl_kernels_version() == kernels.KERNELS_VERSION
    assert b"head_dim" in lib.videoxl_kernels_status_string(-2)

    fake = 0x1000  # never dereferenced: every call below is rejected or has nothing to do
    workspace_bytes = lib.videoxl_chunk_attention_workspace_bytes
    workspace_bytes.argtypes = kernels.WORKSPACE_SIGNATURE
    workspace_bytes.restype = ctypes.c_int64

    def attention(name="videoxl_chunk_attention", *, q=4, past=10, visible=(fake, 3), ts=(None, 0), heads=(4, 2),
                  head_dim=64, dtype=0, workspace=(None, 0), past_len=fake):
        return getattr(lib, name)(fake, fake, fake, fake, fake, past_len, *visible, *ts, fake, *workspace, q, past,
                                  *heads, head_dim, 1.0, dtype, None)

    assert attention(heads=(3, 2)) == -1  # 3 query heads over 2 KV heads
    assert attention(head_dim=48) == -2  # not compiled
    assert attention(visible=(fake, 11)) == -1  # a longer list than the past buffer
    assert attention(visible=(None, 3)) == -1  # a missing list
    assert attention(ts=(fake, 5)) == -1  # more timestamp queries than queries
    assert attention(ts=(None, 2)) == -1
    assert attention(past_len=None) == -1
    assert attention(dtype=7) == -1  # unknown dtype
    assert attention(q=0, visible=(None, 0)) == 0  # no queries: nothing to launch
    for name in ("videoxl_chunk_attention_simt", "videoxl_chunk_attention_mma"):
        assert attention(name, heads=(3, 2)) == -1
    # the tensor-core kernel: fp16/bf16 at head_dim 64/128 only, and its workspace must fit
    assert attention("videoxl_chunk_attention_mma", dtype=0) == -4
    assert attention("videoxl_chunk_attention_mma", dtype=2, head_dim=32) == -4
    big = dict(q=611, past=80_000, visible=(fake, 2_000), ts=(fake, 24), heads=(28, 4), head_dim=128, dtype=2)
    needed = workspace_bytes(611, 80_000, 2_000, 24, 28, 4, 128, 2)
    assert needed > 0, "24 timestamp queries over 80k keys are split"
    assert attention("videoxl_chunk_attention_mma", **big, workspace=(fake, needed - 1)) == -5
    assert workspace_bytes(611, 80_000, 2_000, 24, 28, 4, 128, 0) == 0  # fp32: the SIMT kernel, none
    assert workspace_bytes(611, 80_000, 2_000, 0, 28, 4, 128, 2) < needed  # no sweep of the whole past
    assert workspace_bytes(-1, 10, 0, 0, 4, 2, 64, 2) == -1
    # odd head_dim cannot be rotated
    assert lib.videoxl_bilevel_kv_gather(fake, fake, fake, fake, fake, fake, fake, fake, 8, 4, 4, 2, 15, 1e6, 0, None) == -1
    # missing positions
    assert lib.videoxl_bilevel_kv_gather(fake, fake, fake, fake, None, fake, fake, fake, 8, 4, 4, 2, 16, 1e6, 0, None) == -1
    assert lib.videoxl_pool_kv(fake, fake, 4, 0, 2, 16, 0, None) == -1
    def block_scores(num_queries=3, num_keys=9, causal_tail=0, num_blocks=5):
        return lib.videoxl_block_scores(fake, fake, fake, fake, num_queries, num_keys, causal_tail, num_blocks,
                                        4, 2, 16, 1.0, 0, None)

    assert block_scores(num_blocks=9000) == -3
    for tail in (1, 4, -1):  # the causal tail is none or exactly the queries' own keys
        assert block_scores(causal_tail=tail) == -1, tail
    assert block_scores(num_keys=2, causal_tail=3) == -1  # more own keys than keys
    assert lib.videoxl_top_k_blocks(fake, fake, fake, 8, -1, None) == -1


MMA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")


def test_tensor_core_attention_compiles_for_every_target(tmp_path: Path) -> None:
    """chunk_attention_mma.cu (inline PTX mma.sync, ldmatrix, cp.async) for sm_80 to sm_120,
    with no register spills (a spill would cost the kernel its speed silently)."""
    nvcc = _nvcc_or_skip()
    available = build.supported_archs(nvcc)
    archs = [a for a in MMA_ARCHS if a in available]
    assert {"sm_80", "sm_90"} <= set(archs), f"nvcc supports only {sorted(available)}"
    source = build.PLUGIN_DIR / "chunk_attention" / "chunk_attention_mma.cu"
    result = subprocess.run(
        [str(nvcc), "-c", str(source), "-o", str(tmp_path / "mma.o"), *build.COMPILE_FLAGS,
         *build.gencode_flags(archs, None), "-Xptxas", "-v", "--threads", "2"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
    assert spills and all(n == "0" for n in spills), result.stderr[-4000:]
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", result.stderr)
    assert {arch for _, arch in entries} == set(archs)


def test_up_to_date_build_is_reused(one_arch_library) -> None:
    library, _ = one_arch_library
    lines: list[str] = []
    started = time.monotonic()
    again = build.build_library(archs=[ARCH], out_dir=library.parent, ptx=False, progress=lines.append)
    assert again == library
    assert time.monotonic() - started < 5.0
    assert any("up to date" in line for line in lines), lines


def test_default_archs_follow_nvcc() -> None:
    nvcc = _nvcc_or_skip()
    available = build.supported_archs(nvcc)
    archs = build.resolve_archs(None, available)
    assert "sm_89" in archs and "sm_90" in archs
    assert ("sm_110" in archs) == ("sm_110" in available)
    assert build.resolve_archs(None, available - {"sm_110"}).count("sm_110") == 0
    with pytest.raises(build.BuildError, match="cannot compile"):
        build.resolve_archs(["sm_12"], available)
    flags = build.gencode_flags(["sm_80", "sm_120"], "sm_120")
    assert flags[-1] == "arch=compute_120,code=compute_120"


def test_missing_nvcc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(build, "_wheel_nvcc_candidates", lambda: [])
    with pytest.raises(build.NvccNotFoundError, match=r"videoxl\[cuda\]"):
        build.find_nvcc()


def test_kernels_module_is_lazy() -> None:
    """Importing the bindings neither opens the library nor imports torch."""
    code = (
        "import sys; from videoxl.plugins import kernels; "
        "assert kernels._library is None; assert 'torch' not in sys.modules; "
        "assert kernels.DType.of('bf16') == kernels.DType.BFLOAT16"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_launch_without_a_driver_returns_a_cuda_error(one_arch_library) -> None:
    """With no GPU driver a launch reports the CUDA error (static runtime), it never crashes."""
    if Path("/dev/nvidiactl").exists() or kernels.device_arch() is not None:
        pytest.skip("a GPU driver is present: this checks the driver-less path only")
    library, _ = one_arch_library
    lib = ctypes.CDLL(str(library))
    lib.videoxl_pool_kv.argtypes = kernels.SIGNATURES["videoxl_pool_kv"]
    lib.videoxl_kernels_status_string.restype = ctypes.c_char_p
    status = lib.videoxl_pool_kv(0x1000, 0x1000, 4, 4, 2, 16, 0, None)
    assert status > 0, "expected a cudaError_t"
    assert lib.videoxl_kernels_status_string(status)
