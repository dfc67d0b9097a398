"""int8/int4 exports build into TensorRT for RTX engines (sm_89, strongly typed, on the CPU); the manifest says how."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from videoxl.engines.build import EngineBuildError, build_engines
from videoxl.weight_format import quantized_linears

LIMITS = dict(max_frames=64, chunk_groups=2, window_chunks=1)


@pytest.fixture(scope="module")
def fp32_engines(trt, tiny_onnx, tmp_path_factory) -> Path:
    return build_engines(tiny_onnx, tmp_path_factory.mktemp("engines") / "fp32", targets=["sm_89"], use_plugins=False, **LIMITS)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_engines_build_and_record_the_weight_format(trt, tiny_onnx_quantized, tiny_model, fp32_engines, tmp_path, name):
    engines = build_engines(tiny_onnx_quantized(name), tmp_path / name, targets=["sm_89"], use_plugins=False, **LIMITS)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["weights"]["format"] == name and manifest["weights"].get("block_size") == (32 if name == "int4" else None)
    assert manifest["precision"] == "fp32" and manifest["compute_capabilities"] == ["sm_89"]
    export = json.loads((engines / "export_manifest.json").read_text())
    assert export["weights"] == manifest["weights"]
    # TensorRT keeps the weights quantized (a weight-only GEMM), it does not fold them back to float:
    # the decode engine shrinks by at least half of its fp32 linear weights' bytes
    fp32_linear_bytes = 4 * sum(lin.in_features * lin.out_features for lin in quantized_linears(tiny_model.cfg)
                                if not lin.name.startswith("model.mm_projector"))
    saved = (fp32_engines / "decode.engine").stat().st_size - (engines / "decode.engine").stat().st_size
    assert saved >= fp32_linear_bytes / 2, (saved, fp32_linear_bytes)


def test_a_manifest_that_disagrees_with_the_graphs_is_refused(trt, tiny_onnx_quantized, tmp_path):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_quantized("int4"), onnx_dir)
    manifest = json.loads((onnx_dir / "export_manifest.json").read_text())
    manifest["weights"] = {"format": "int8"}
    (onnx_dir / "export_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineBuildError, match="the graphs hold int4 .block 32. weights but export_manifest.json says int8"):
        build_engines(onnx_dir, tmp_path / "engines", targets=["sm_89"], use_plugins=False, **LIMITS)
