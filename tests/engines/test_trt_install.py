"""The TensorRT for RTX install fix: idempotent, and really what stands between a plugin node and an abort."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from videoxl.engines.trt_install import UNVERSIONED, apply_install_fix, install_fix_applied, rtx_libs_dir


def _fake_libs(tmp_path: Path, *, files: tuple[str, ...] = ("libtensorrt_rtx.so.1",)) -> Path:
    libs = tmp_path / "tensorrt_rtx_libs"
    libs.mkdir()
    for name in files:
        (libs / name).write_bytes(b"")
    return libs


def test_creates_link_once(tmp_path: Path) -> None:
    libs = _fake_libs(tmp_path)
    assert not install_fix_applied(libs)
    assert "created" in apply_install_fix(libs)
    assert os.readlink(libs / UNVERSIONED) == "libtensorrt_rtx.so.1"
    assert install_fix_applied(libs)
    assert "nothing to do" in apply_install_fix(libs)


def test_replaces_dangling_link(tmp_path: Path) -> None:
    libs = _fake_libs(tmp_path, files=("libtensorrt_rtx.so.2",))
    (libs / UNVERSIONED).symlink_to("libtensorrt_rtx.so.1")  # left over from an older wheel
    assert not install_fix_applied(libs)
    assert "created" in apply_install_fix(libs)
    assert os.readlink(libs / UNVERSIONED) == "libtensorrt_rtx.so.2"


def test_not_installed_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("videoxl.engines.trt_install.rtx_libs_dir", lambda: None)
    assert "not installed" in apply_install_fix()
    assert install_fix_applied()


def test_module_entry_point_prints_what_it_did() -> None:
    result = subprocess.run([sys.executable, "-m", "videoxl.engines.trt_install"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout or "created" in result.stdout


_PARSE_PLUGIN_NODE = textwrap.dedent(
    """
    import sys
    import tensorrt_rtx as trt
    from videoxl.plugins.trt_plugins import register_plugins
    sys.path.insert(0, {tests!r})
    from engine_fixtures import kv_gather_model, tiny_config
    from onnx import TensorProto
    register_plugins(trt)
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    ok = parser.parse(kv_gather_model(tiny_config(), TensorProto.FLOAT16).SerializeToString())
    print("parsed", ok, network.get_layer(0).type)
    """
)


@pytest.mark.parametrize("fixed", [False, True], ids=["without-fix", "with-fix"])
def test_plugin_node_aborts_without_the_fix(fixed: bool, tmp_path: Path, trt) -> None:
    """A private copy of the libs package (links to the real libraries) with and without the link."""
    real = rtx_libs_dir()
    fake = tmp_path / "site" / "tensorrt_rtx_libs"
    fake.mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != UNVERSIONED and (entry.suffix == ".py" or ".so." in entry.name):
            (fake / entry.name).symlink_to(entry.resolve())
    if fixed:
        apply_install_fix(fake)
    script = _PARSE_PLUGIN_NODE.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    if fixed:
        assert result.returncode == 0, result.stderr
        assert "parsed True LayerType.PLUGIN_V3" in result.stdout
    else:
        assert result.returncode < 0, (result.returncode, result.stdout, result.stderr)  # killed by SIGABRT
        assert "parsed" not in result.stdout
