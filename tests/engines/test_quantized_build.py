"""int8/int4 exports build into TensorRT for RTX engines (sm_89, strongly typed, on the CPU); the manifest says how."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from videoxl.config import VideoXLConfig
from videoxl.engines.build import EngineBuildError, build_engines
from videoxl.engines.profiles import BuildLimits, format_bytes
from videoxl.runtime.memory_plan import plan_memory
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


def test_gpu_memory_budget_counts_the_exports_weight_format(trt, tiny_onnx_quantized, tmp_path):
    """The plan behind --gpu-memory-budget holds the int8 weights the export has, not float ones."""
    onnx_dir = tiny_onnx_quantized("int8")
    cfg, limits = VideoXLConfig.load(onnx_dir / "config.json"), BuildLimits(**LIMITS)

    def plan(weights: str):
        return plan_memory(
            cfg, frames=limits.max_frames, budget_bytes=2**40, chunk_groups=limits.chunk_groups, window_chunks=limits.window_chunks,
            dtype_bytes=4, weights=weights, timestamp_tokens_per_group=limits.timestamp_tokens, prefix_tokens=limits.prefix_tokens,
            suffix_tokens=limits.suffix_tokens, max_new_tokens=limits.answer_tokens, vision_batch_frames=limits.vision_batch_frames,
            dense_tier="auto", plugins=False,
        )

    int8_weights, fp_weights = plan("int8").item("weights").nbytes, plan("fp").item("weights").nbytes
    assert int8_weights < fp_weights
    with pytest.raises(EngineBuildError, match="more than --gpu-memory-budget") as caught:
        build_engines(onnx_dir, tmp_path / "engines", targets=["sm_89"], use_plugins=False,
                      gpu_memory_budget_bytes=plan("int8").device_bytes - 1, **LIMITS)
    assert f"weights {format_bytes(int8_weights)}," in str(caught.value)
    assert not (tmp_path / "engines").exists()
