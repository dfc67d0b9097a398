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


def test_tiny_export_builds_in_layer_ranges(trt, tiny_onnx: Path, tmp_path: Path) -> None:
    """--layers-per-engine 1: each LLM graph becomes one engine per layer, a chain the manifest describes
    and check_manifest keeps strict; the range graphs sit beside the export."""
    import shutil

    from videoxl.engines.manifest import check_manifest, rebuild_command
    from videoxl.engines.errors import EngineMismatchError

    onnx_dir = Path(shutil.copytree(tiny_onnx, tmp_path / "onnx"))  # the build writes the range graphs here
    out = build_engines(onnx_dir, tmp_path / "engines", precision="fp32", use_plugins=False, layers_per_engine=1, **LIMITS)
    manifest = json.loads((out / "manifest.json").read_text())
    layers = VideoXLConfig.load(onnx_dir / "config.json").num_hidden_layers
    for graph in ("prefill_chunk", "decode"):
        entry = manifest["engines"][graph]
        ranges = entry["ranges"]
        assert [r["layers"] for r in ranges] == [[i, i + 1] for i in range(layers)]
        assert [r["file"] for r in ranges] == [f"{graph}.layers_{i:02d}-{i:02d}.engine" for i in range(layers)]
        assert all((out / r["file"]).is_file() and (onnx_dir / r["onnx"]).is_file() for r in ranges)
        assert ranges[0]["boundary_in"] == [] and ranges[-1]["boundary_out"] == []
        assert ranges[1]["boundary_in"] == ranges[0]["boundary_out"] == ["hidden.1"]
        assert entry["bytes"] == sum(r["bytes"] for r in ranges)
        assert "hidden.1" not in entry["inputs"] and "past_key.1" in entry["inputs"]  # the graph's own I/O
        assert manifest["onnx"][ranges[0]["onnx"]]["bytes"] > 0  # fingerprinted like the graphs
    assert manifest["engines"]["score"]["file"] == "score.engine"  # no weights: one engine
    assert "ranges" not in manifest["engines"]["vision"] and manifest["engines"]["kv_gather"]["file"] == "kv_gather.engine"
    assert "--layers-per-engine 1" in rebuild_command(manifest)
    check_manifest(out, trt_module=trt, gpu_compute_capability="sm_89", onnx_dir=onnx_dir)

    raw = json.loads((out / "manifest.json").read_text())
    ranges = raw["engines"]["decode"]["ranges"]
    ranges[0], ranges[1] = ranges[1], ranges[0]  # a chain in the wrong order is refused before loading
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineMismatchError, match="layer ranges .* do not cover layers 0-1 in order"):
        check_manifest(out, trt_module=trt, gpu_compute_capability="sm_89")
    ranges[0], ranges[1] = ranges[1], ranges[0]
    ranges[1]["boundary_in"] = []  # a range that drops the hidden state the one before gives out
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineMismatchError, match="do not chain"):
        check_manifest(out, trt_module=trt, gpu_compute_capability="sm_89")


@pytest.mark.parametrize("use_plugins", [True, False], ids=["plugins", "inlined"])
def test_tiny_export_builds_with_decode_on_prefill(trt, tiny_onnx: Path, tmp_path: Path, use_plugins: bool) -> None:
    """--decode-on-prefill: no decode engine; the prefill_chunk profile reaches the decode capacity and the
    question; <|vision_pad|>'s embedding row is stored beside the engines with its sha, checked on load."""
    import numpy as np

    from videoxl.embedding import embedding_row
    from videoxl.engines.errors import EngineMismatchError
    from videoxl.engines.manifest import VISION_PAD_FILE, check_manifest, rebuild_command
    from videoxl.files import file_sha256

    out = build_engines(tiny_onnx, tmp_path / "engines", precision="fp32", use_plugins=use_plugins, decode_on_prefill=True, **LIMITS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "decode" not in manifest["engines"] and not list(out.glob("decode*.engine"))
    assert sorted(manifest["engines"]) == sorted(g for g in GRAPHS if g != "decode")
    assert "decode" not in manifest["dimensions"] and "decode.onnx" not in manifest["onnx"]
    tokens, prefill = manifest["tokens"], manifest["engines"]["prefill_chunk"]["inputs"]
    assert prefill["past_key.0"]["max"][0] == prefill["visible_past_index"]["max"][0] == tokens["total"]  # the decode capacity
    assert prefill["input_ids"]["min"] == [1] and prefill["input_ids"]["max"][0] >= 256  # a step; the question at once
    assert prefill["visual_embeds"]["min"][0] == 0
    assert manifest["decode_on_prefill"] is True
    entry = manifest["vision_pad"]
    pad = json.loads((tiny_onnx / "export_manifest.json").read_text())["special_tokens"]["vision_pad"]
    assert entry == {"token": pad, "file": VISION_PAD_FILE, **{k: entry[k] for k in ("sha256", "bytes", "mtime_ns")}}
    assert entry["sha256"] == file_sha256(out / VISION_PAD_FILE)
    np.testing.assert_array_equal(np.load(out / VISION_PAD_FILE), embedding_row(tiny_onnx / "prefill_chunk.onnx", pad))
    assert "--decode-on-prefill" in rebuild_command(manifest)
    check_manifest(out, trt_module=trt, gpu_compute_capability="sm_89", onnx_dir=tiny_onnx)

    np.save(out / VISION_PAD_FILE, np.zeros_like(np.load(out / VISION_PAD_FILE)))  # not the row the build wrote
    with pytest.raises(EngineMismatchError, match="vision_pad_embedding.npy differs from the file the build wrote"):
        check_manifest(out, trt_module=trt, gpu_compute_capability="sm_89")
