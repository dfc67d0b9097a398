"""check_manifest: accepts the process an engine directory was built for, and names every mismatch."""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest

from videoxl.engines import manifest as manifest_module
from videoxl.engines.manifest import EngineMismatchError, check_manifest, rebuild_command


@pytest.fixture
def engines(engines_without_plugins: Path, tmp_path: Path) -> Path:
    """A private copy of the plugin-free engine directory."""
    return Path(shutil.copytree(engines_without_plugins, tmp_path / "engines"))


@pytest.fixture
def plugin_engines(engines_with_plugins: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(engines_with_plugins, tmp_path / "plugin_engines"))


def _fake_trt(name: str, version: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__version__ = version
    return module


def _mismatch(engine_dir: Path, trt, gpu="sm_89", onnx_dir=None) -> str:
    with pytest.raises(EngineMismatchError) as caught:
        check_manifest(engine_dir, trt_module=trt, gpu_compute_capability=gpu, onnx_dir=onnx_dir)
    message = str(caught.value)
    assert "rebuild with `videoxl build --onnx " in message and f"--out {engine_dir}" in message
    return message


def test_accepts_the_build_it_describes(engines: Path, onnx_dir: Path, trt) -> None:
    manifest = check_manifest(engines, trt_module=trt, gpu_compute_capability="sm_89", onnx_dir=onnx_dir)
    assert manifest["precision"] == "fp16"
    check_manifest(engines, trt_module=trt, gpu_compute_capability=(8, 9))  # without the ONNX files too


def test_rejects_another_compute_capability(engines: Path, trt) -> None:
    message = _mismatch(engines, trt, gpu="sm_86")
    assert "built for sm_89; this GPU is sm_86" in message


def test_rejects_another_tensorrt(engines: Path, trt) -> None:
    message = _mismatch(engines, _fake_trt("tensorrt_rtx", "1.8.0.1"))
    assert f"built with TensorRT for RTX {trt.__version__}, this process uses TensorRT for RTX 1.8.0.1" in message
    message = _mismatch(engines, _fake_trt("tensorrt", "10.13.0.35"))
    assert "this process uses TensorRT 10.13.0.35" in message


def test_rejects_another_model_config(engines: Path, onnx_copy: Path, trt) -> None:
    raw = json.loads((onnx_copy / "config.json").read_text())
    raw["num_hidden_layers"] = 3
    (onnx_copy / "config.json").write_text(json.dumps(raw))
    message = _mismatch(engines, trt, onnx_dir=onnx_copy)
    assert "model config hash in the ONNX directory is" in message
    shutil.copy(onnx_copy / "config.json", engines / "config.json")
    assert "model config hash in the engine directory is" in _mismatch(engines, trt)


def test_rejects_changed_onnx(engines: Path, onnx_copy: Path, trt) -> None:
    path = onnx_copy / "decode.onnx"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: still fine
    check_manifest(engines, trt_module=trt, gpu_compute_capability="sm_89", onnx_dir=onnx_copy)
    path.write_bytes(path.read_bytes() + b"\0")
    message = _mismatch(engines, trt, onnx_dir=onnx_copy)
    assert "decode.onnx in" in message and "differs from the file the engines were built from (newer than the build)" in message
    (onnx_copy / "vision.onnx").unlink()
    assert "vision.onnx is missing" in _mismatch(engines, trt, onnx_dir=onnx_copy)


def test_rejects_damaged_engine_files(engines: Path, trt) -> None:
    (engines / "kv_gather.engine").write_bytes(b"truncated")
    assert "engine file kv_gather.engine has 9 bytes" in _mismatch(engines, trt)
    (engines / "vision.engine").unlink()
    assert "engine file vision.engine is missing" in _mismatch(engines, trt)


def test_plugin_engines_need_the_kernel_library(plugin_engines: Path, trt, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_module, "kernels_library_info", lambda: None)
    assert "kernel library they call is missing" in _mismatch(plugin_engines, trt)
    monkeypatch.setattr(manifest_module, "kernels_library_info", lambda: {"path": "libvideoxl_kernels.so", "sha256": "0"})
    check_manifest(plugin_engines, trt_module=trt, gpu_compute_capability="sm_89")
    raw = json.loads((plugin_engines / "manifest.json").read_text())
    raw["plugins"]["version"] = "0"
    (plugin_engines / "manifest.json").write_text(json.dumps(raw))
    assert "built with videoxl plugins v0" in _mismatch(plugin_engines, trt)


def test_rejects_engines_of_another_graph_contract(engines: Path, trt) -> None:
    raw = json.loads((engines / "manifest.json").read_text())
    raw["graph_contract"]["version"] = 1
    (engines / "manifest.json").write_text(json.dumps(raw))
    assert "built from graphs of contract v1, this videoxl binds contract v3" in _mismatch(engines, trt)


def test_rejects_an_older_manifest_format(engines: Path, trt) -> None:
    raw = json.loads((engines / "manifest.json").read_text())
    raw["format"] = 1  # written before the score engine and the input locations existed
    (engines / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineMismatchError, match=r"manifest format 1, this videoxl reads format 4; rebuild with `videoxl build"):
        check_manifest(engines, trt_module=trt, gpu_compute_capability="sm_89")


def test_lists_every_problem_at_once(engines: Path) -> None:
    message = _mismatch(engines, _fake_trt("tensorrt", "10.13.0.35"), gpu="sm_90")
    assert "this process uses TensorRT 10.13.0.35" in message and "this GPU is sm_90" in message


def test_missing_or_unreadable_manifest(engines: Path, trt) -> None:
    (engines / "manifest.json").write_text("{ not json")
    with pytest.raises(EngineMismatchError, match="unreadable"):
        check_manifest(engines, trt_module=trt, gpu_compute_capability="sm_89")
    (engines / "manifest.json").unlink()
    with pytest.raises(EngineMismatchError, match="no manifest.json"):
        check_manifest(engines, trt_module=trt, gpu_compute_capability="sm_89")


def test_rebuild_command_repeats_the_limits(engines: Path) -> None:
    manifest = json.loads((engines / "manifest.json").read_text())
    command = rebuild_command(manifest, engines)
    assert "--fp16 --max-frames 64 --chunk-groups 2 --window 1 --target sm_89 --no-plugins" in command
    assert "budget" not in command  # none was given
    manifest["memory"].update(budget_bytes=2**30, gpu_plan={"budget_bytes": 16 * 2**30, "unified_memory": True})
    assert rebuild_command(manifest, engines).endswith(f"--memory-budget {2**30} --gpu-memory-budget {16 * 2**30} --unified-memory")
