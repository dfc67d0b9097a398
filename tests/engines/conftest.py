"""Fixtures for the engine tests: TensorRT for RTX, the fixture ONNX directory, engines built once.

Engines are built for sm_89 on the CPU (TensorRT for RTX needs no GPU to build); each build of
the fixture graphs takes about a second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine_fixtures import write_artifacts

BUILD_LIMITS = {"max_frames": 64, "chunk_groups": 2, "window_chunks": 1}


@pytest.fixture(scope="session")
def trt():
    """The TensorRT for RTX module (builds engines on the CPU), with the install fix applied."""
    from videoxl.engines.trt_install import install_fix_applied
    from videoxl.engines.trt_module import TensorRTUnavailableError, import_tensorrt

    try:
        module = import_tensorrt("tensorrt_rtx")
    except TensorRTUnavailableError as err:
        pytest.skip(f"TensorRT for RTX is not installed: {err}")
    if not install_fix_applied():
        pytest.fail("libtensorrt_rtx.so is missing: run `python -m videoxl.engines.trt_install` (make test does)")
    return module


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture graphs in fp16 (read-only for tests: copy before changing anything)."""
    return write_artifacts(tmp_path_factory.mktemp("onnx") / "fp16", precision="fp16")


@pytest.fixture(scope="session")
def engines_with_plugins(trt, onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from videoxl.engines.build import build_engines

    out = tmp_path_factory.mktemp("engines") / "with_plugins"
    return build_engines(onnx_dir, out, precision="fp16", targets=["sm_89"], flavour="tensorrt_rtx", **BUILD_LIMITS)


@pytest.fixture(scope="session")
def engines_without_plugins(trt, onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from videoxl.engines.build import build_engines

    out = tmp_path_factory.mktemp("engines") / "without_plugins"
    return build_engines(
        onnx_dir, out, precision="fp16", targets=["sm_89"], flavour="tensorrt_rtx", use_plugins=False, **BUILD_LIMITS
    )


@pytest.fixture
def onnx_copy(onnx_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture ONNX directory that a test may damage."""
    return Path(shutil.copytree(onnx_dir, tmp_path / "onnx"))
