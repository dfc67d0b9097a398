"""The exporter's tiny graphs (tests/conftest.py `tiny_onnx`, fp32) through the engine builder."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from videoxl.config import VideoXLConfig
from videoxl.engines.build import build_engines
from videoxl.engines.errors import EngineBuildError
from videoxl.engines.profiles import GRAPH_FILES, GRAPHS, BuildLimits, dimension_ranges, input_profile

pytest.importorskip("torch", reason="the exporter needs torch (pip install videoxl[export])")

LIMITS = {"max_frames": 32, "chunk_groups": 2, "window_chunks": 1}


def _inputs(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return {
        vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in graph.input
        if vi.name not in initializers
    }


def test_every_exported_dimension_has_a_range(tiny_onnx: Path) -> None:
    """The dimension names the exporter writes are the ones the builder knows (the artifact contract)."""
    cfg = VideoXLConfig.load(tiny_onnx / "config.json")
    ranges = dimension_ranges(cfg, BuildLimits(**LIMITS))
    for graph in GRAPHS:
        shapes = input_profile(graph, _inputs(tiny_onnx / GRAPH_FILES[graph]), ranges[graph])
        assert shapes, graph
        for low, opt, high in shapes.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high))


@pytest.mark.parametrize(
    "use_plugins",
    [
        True,
        False,
    ],
    ids=["plugins", "inlined"],
)
def test_tiny_export_builds(trt, tiny_onnx: Path, tmp_path: Path, use_plugins: bool) -> None:
    out = build_engines(tiny_onnx, tmp_path / "engines", precision="fp32", use_plugins=use_plugins, **LIMITS)
    manifest = json.loads((out / "manifest.json").read_text())
    layers = VideoXLConfig.load(tiny_onnx / "config.json").num_hidden_layers
    engines = manifest["engines"]
    assert manifest["plugins"]["used"] == use_plugins
    assert len(engines["prefill_chunk"]["plugin_layers"]) == (layers if use_plugins else 0)
    if not use_plugins:  # the route for stock TensorRT: fused attention, past_len read on the host
        assert manifest["plugins"]["engines"] == []
        assert engines["prefill_chunk"]["native_attention_layers"] == engines["decode"]["native_attention_layers"] == layers
        assert engines["prefill_chunk"]["host_inputs"] == ["past_len"]
        assert all(engines[g]["host_inputs"] == [] for g in ("vision", "decode", "score", "kv_gather"))
