"""Layer ranges (videoxl.engines.ranges): the exported LLM graphs cut at their named boundaries.

Chained on ONNX Runtime (CPU, no graph optimisations, so both sides run the same ops), the range
graphs of the tiny export give exactly the full graph's outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from videoxl.config import VideoXLConfig
from videoxl.engines.errors import EngineBuildError
from videoxl.engines.ranges import LayerRange, extract_range, split_layers, write_range
from videoxl.graphs import GRAPHS, LLM_WEIGHTS

pytest.importorskip("torch", reason="the exporter needs torch (pip install videoxl[export])")

RANGED = ("prefill_chunk", "decode")  # score holds no weights: never cut


@pytest.fixture(scope="module")
def external_onnx(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export's decode and prefill graphs with their weights in an external llm_weights.onnx.data,
    as the 8B export writes them (one file shared by the graphs)."""
    out = tmp_path_factory.mktemp("ranges")
    shutil.copy2(tiny_onnx / "config.json", out / "config.json")
    model = onnx.load(str(tiny_onnx / "decode.onnx"))
    onnx.save_model(model, str(out / "decode.onnx"), save_as_external_data=True, location=LLM_WEIGHTS, size_threshold=1024)
    return out


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(graph: str, cfg: VideoXLConfig, image_id: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the full graph: 6 new tokens (2 of them visual) after 7 valid rows of a 10-row past."""
    tokens, past_rows, past_len = 6, 10, 7
    ids = rng.integers(0, cfg.vocab_size, tokens)
    feeds = {"input_ids": ids, "past_len": np.array([past_len])}
    if graph == "prefill_chunk":
        ids[[2, 3]] = image_id
        feeds["visual_embeds"] = rng.standard_normal((2, cfg.hidden_size), np.float32)
        feeds["visible_past_index"] = np.array([0, 1, 2, 5, 6])
        feeds["timestamp_query_index"] = np.array([0])
    for layer in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{layer}"] = rng.standard_normal((past_rows, cfg.num_key_value_heads, cfg.head_dim), np.float32)
    return feeds


def _chain(paths: list[Path], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the range graphs in order, each reading the inputs it names and the previous range's boundary."""
    values, outputs = dict(feeds), {}
    for path in paths:
        session = _session(path)
        names = [o.name for o in session.get_outputs()]
        result = dict(zip(names, session.run(names, {i.name: values[i.name] for i in session.get_inputs()})))
        values |= result
        outputs |= result
    return outputs


@pytest.mark.parametrize("graph", RANGED)
def test_chained_ranges_equal_the_full_graph(tiny_onnx: Path, tmp_path: Path, graph: str) -> None:
    cfg = VideoXLConfig.load(tiny_onnx / "config.json")
    image_id = json.loads((tiny_onnx / "export_manifest.json").read_text())["special_tokens"]["vision_pad"]
    feeds = _feeds(graph, cfg, image_id, np.random.default_rng(3))
    full = _session(tiny_onnx / f"{graph}.onnx")
    expected = dict(zip([o.name for o in full.get_outputs()], full.run(None, feeds)))

    model = onnx.load(str(tiny_onnx / f"{graph}.onnx"))
    parts = split_layers(model, GRAPHS[graph], cfg, layers_per_engine=1)
    assert [p.layers for p in parts] == [LayerRange(i, i + 1) for i in range(cfg.num_hidden_layers)]
    paths = []
    for part in parts:
        paths.append(tmp_path / part.layers.file(graph))
        paths[-1].write_bytes(part.model.SerializeToString())
        onnx.checker.check_model(str(paths[-1]))
    assert parts[0].boundary_in == () and parts[-1].boundary_out == ()
    assert "input_ids" in parts[-1].inputs  # later ranges recompute positions from it
    last = cfg.num_hidden_layers - 1  # and read only their own layers' KV (the mask's capacity from past_key.{first})
    assert {n for n in parts[-1].inputs if n.startswith(("past_key", "past_value"))} <= {f"past_key.{last}", f"past_value.{last}"}
    got = _chain(paths, feeds)
    assert set(got) >= set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{graph}: {name}")


def test_ranges_reference_the_same_external_data(external_onnx: Path) -> None:
    """Range files are small, sit beside the export, and point into llm_weights.onnx.data: no weight is copied."""
    cfg = VideoXLConfig.load(external_onnx / "config.json")
    full = onnx.load(str(external_onnx / "decode.onnx"), load_external_data=False)
    entries = {t.name: list(t.external_data) for t in full.graph.initializer if t.external_data}
    parts = split_layers(full, GRAPHS["decode"], cfg, layers_per_engine=1)
    data_bytes = (external_onnx / LLM_WEIGHTS).stat().st_size
    for part in parts:
        path = write_range(part, external_onnx)
        assert path.parent == external_onnx and path.stat().st_size < 64 * 1024 < data_bytes
        external = [t for t in part.model.graph.initializer if t.external_data]
        assert external and all(list(t.external_data) == entries[t.name] for t in external)
    first, last = (set(t.name for t in p.model.graph.initializer) for p in parts)
    assert "model.embed_tokens.weight" in first and "lm_head.weight.T" not in first
    assert "lm_head.weight.T" in last and "model.embed_tokens.weight" not in last
    assert "rope_inv_freq" in first & last  # small shared tables go into every range
    assert sum(p.weight_bytes for p in parts) > data_bytes // 2


def test_split_by_weight_bytes(external_onnx: Path) -> None:
    cfg = VideoXLConfig.load(external_onnx / "config.json")
    model = onnx.load(str(external_onnx / "decode.onnx"), load_external_data=False)
    whole = split_layers(model, GRAPHS["decode"], cfg, max_weight_bytes=10**9)
    assert [p.layers for p in whole] == [LayerRange(0, cfg.num_hidden_layers)]
    one = extract_range(model, GRAPHS["decode"], cfg, LayerRange(0, 1)).weight_bytes
    parts = split_layers(model, GRAPHS["decode"], cfg, max_weight_bytes=one + 1024)
    assert len(parts) == cfg.num_hidden_layers and all(p.weight_bytes <= one + 1024 for p in parts)
    with pytest.raises(EngineBuildError, match="alone holds"):
        split_layers(model, GRAPHS["decode"], cfg, max_weight_bytes=one // 2)


def test_a_graph_without_boundaries_is_refused(tiny_onnx: Path) -> None:
    cfg = VideoXLConfig.load(tiny_onnx / "config.json")
    model = onnx.load(str(tiny_onnx / "decode.onnx"))
    for node in model.graph.node:  # an export from before the boundary names
        node.output[:] = [name.replace("hidden.", "h") for name in node.output]
        node.input[:] = [name.replace("hidden.", "h") for name in node.input]
    with pytest.raises(EngineBuildError, match="re-export"):
        split_layers(model, GRAPHS["decode"], cfg, layers_per_engine=1)
