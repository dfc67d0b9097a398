"""The exported graph set: validity, per-graph parity with PyTorch, external data, failures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from videoxl.export.llm import apply_rope
from videoxl.export.onnx_export import GRAPH_FILES, export_onnx
from videoxl.files import file_sha256
from videoxl.export.reference import MixedCacheAttention, ReferenceInference
from videoxl.layout import chunk_visibility, prefix_visibility
from videoxl.ops import DOMAIN
from videoxl.runtime.artifacts import ArtifactError, load_onnx_artifacts
from videoxl.runtime.kv_store import TwoTierKVStore
from videoxl.runtime.ort_backend import OnnxRuntimeBackend

TOL = 1e-4


@pytest.fixture(scope="module")
def backend(tiny_onnx):
    return OnnxRuntimeBackend(tiny_onnx)


@pytest.mark.parametrize("graph", sorted(GRAPH_FILES))
def test_graph_is_valid_with_shape_inference(tiny_onnx, graph):
    model = onnx.load(str(tiny_onnx / GRAPH_FILES[graph]))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert len(inferred.graph.output) == len(model.graph.output)


def test_custom_ops_carry_function_bodies(tiny_onnx):
    for graph, op in (("prefill_chunk", "ChunkSparseAttention"), ("kv_gather", "BilevelKVGather")):
        model = onnx.load(str(tiny_onnx / GRAPH_FILES[graph]))
        assert any(n.domain == DOMAIN and n.op_type == op for n in model.graph.node)
        assert any(f.domain == DOMAIN and f.name == op and len(f.node) > 5 for f in model.functions)
    vision = onnx.load(str(tiny_onnx / GRAPH_FILES["vision"]))
    assert all(n.domain in ("", "ai.onnx") for n in vision.graph.node)  # standard ops only


def test_vision_graph_matches_pytorch(tiny_model, backend):
    cfg = tiny_model.cfg
    pixels = torch.randn(8, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = tiny_model.encode_frames(pixels).numpy()
    assert np.abs(backend.encode_frames(pixels.numpy()) - ref).max() <= TOL


@pytest.mark.parametrize("rule", ["evaluation", "streaming"])
def test_prefill_score_decode_gather_match_pytorch(tiny_model, backend, make_layout, rule):
    """Every graph through the backend's own cache against the reference (fp32 rounding: 1e-4 on
    values that went through a few layers, 1e-5 on the rebuilt keys, as the issue asks)."""
    cfg = tiny_model.cfg
    layout = make_layout(7)
    visual = torch.randn(7, cfg.tokens_per_group, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    ref = ReferenceInference(tiny_model)
    dense = ref.prefill(layout, visual, chunk_groups=2, window_chunks=1, rule=rule)

    store = TwoTierKVStore(backend, cfg, layout, block_groups=2)
    flat, seen = visual.reshape(-1, cfg.hidden_size).numpy(), 0
    for vis in [prefix_visibility(layout)] + [chunk_visibility(layout, k, chunk_groups=2, window_chunks=1, rule=rule) for k in range(4)]:
        count = int(layout.is_visual[vis.start : vis.end].sum())
        store.prefill_chunk(layout.input_ids[vis.start : vis.end], flat[seen : seen + count], vis)
        seen += count
    tiers, base = store.cache.arrays(), store.sparse_rows
    positions = torch.arange(layout.suffix_start)
    for layer in range(cfg.num_hidden_layers):  # the dense tier holds keys rotated at their positions
        assert np.abs(tiers[f"key.{layer}"][base:] - apply_rope(dense.keys[layer], positions, cfg.rope_theta).numpy()).max() <= TOL
        assert np.abs(tiers[f"value.{layer}"][base:] - dense.values[layer].numpy()).max() <= TOL

    # the rotated store un-rotates, pools and re-rotates; the official pools pre-RoPE keys, then rotates
    chosen = {0, 1, 2, 4}
    cache, bounds = store.build_decode_cache(chosen, extra_capacity=32)
    mixed = ref.mixed_cache(dense, layout, block_groups=2, dense_blocks=chosen)
    assert cache.length == mixed.length and bounds == mixed.block_bounds
    for layer in range(cfg.num_hidden_layers):
        assert np.abs(cache.rows.keys[layer][: cache.length] - mixed.keys[layer].numpy()).max() <= 1e-5
        assert np.abs(cache.rows.values[layer][: cache.length] - mixed.values[layer].numpy()).max() <= 1e-5

    suffix = layout.input_ids[layout.suffix_start :]
    attention = MixedCacheAttention(mixed, ref.scale, grow=False, collect_mass=True)
    with torch.no_grad():
        logits = ref._run_text(suffix, mixed.length, attention).numpy()
    mass = backend.score(cache, suffix)
    assert cache.length == mixed.length  # scoring leaves the cache as it was
    assert np.abs(mass - attention.mass.numpy()[: mixed.length]).max() <= TOL
    # every (layer, head, query) row sums to one over the past and the suffix itself
    assert mass.sum() < cfg.num_hidden_layers * cfg.num_attention_heads * len(suffix)
    assert np.abs(backend.decode(cache, suffix)[0] - logits).max() <= TOL
    assert cache.length == mixed.length + len(suffix)


def test_external_data_round_trip(tiny_checkpoint, tiny_onnx, tmp_path, backend):
    out = export_onnx(tiny_checkpoint, tmp_path / "external", external_data=True)
    manifest = json.loads((out / "export_manifest.json").read_text())
    graphs = manifest["graphs"]
    assert graphs["vision"]["external_data"] == ["vision.onnx.data"]
    # the LLM weights are written once and shared by the LLM graphs
    assert graphs["prefill_chunk"]["external_data"] == graphs["decode"]["external_data"] == ["llm_weights.onnx.data"]
    assert graphs["score"]["external_data"] == graphs["kv_gather"]["external_data"] == []  # no weights
    llm_bytes = sum(p.numel() * 4 for n, p in backend_model_params(tiny_checkpoint))
    assert 0.9 * llm_bytes <= (out / "llm_weights.onnx.data").stat().st_size < 1.5 * llm_bytes  # once, not twice
    for file in GRAPH_FILES.values():
        onnx.checker.check_model(str(out / file), full_check=True)
    external = OnnxRuntimeBackend(out)
    pixels = np.random.default_rng(0).standard_normal((4, 3, 384, 384)).astype(np.float32)
    assert np.abs(external.encode_frames(pixels) - backend.encode_frames(pixels)).max() <= 1e-6
    ids = np.array([1, 2, 3], dtype=np.int64)
    logits = [b.decode(b.new_decode_cache(8), ids) for b in (external, backend)]
    assert np.abs(logits[0] - logits[1]).max() <= 1e-6
    (out / "llm_weights.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="llm_weights.onnx.data"):
        load_onnx_artifacts(out)


def backend_model_params(checkpoint):
    """(name, parameter) of the LLM part of the tiny model (what the shared weights file holds)."""
    from videoxl.export.model import VideoXLModel

    model = VideoXLModel.from_pretrained(checkpoint)
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(("model.vision_tower", "model.sae", "model.mm_projector"))]


def test_fp16_export_is_valid(tiny_checkpoint, tmp_path):
    out = export_onnx(tiny_checkpoint, tmp_path / "fp16", dtype="fp16")
    model = onnx.load(str(out / "decode.onnx"))
    onnx.checker.check_model(model, full_check=True)
    past_key = next(i for i in model.graph.input if i.name == "past_key.0")
    assert past_key.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_missing_graph_and_stale_manifest(tiny_onnx, tmp_path):
    broken = shutil.copytree(tiny_onnx, tmp_path / "broken")
    (broken / "prefill_chunk.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing graph files prefill_chunk.onnx"):
        load_onnx_artifacts(broken)
    stale = shutil.copytree(tiny_onnx, tmp_path / "stale")
    config = json.loads((stale / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (stale / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="does not match the graphs"):
        load_onnx_artifacts(stale)


def test_frames_over_the_exported_limit(tiny_onnx):
    artifacts = load_onnx_artifacts(tiny_onnx)
    artifacts.check_frames(artifacts.max_frames)
    with pytest.raises(ArtifactError, match=f"at most {artifacts.max_frames}"):
        artifacts.check_frames(artifacts.max_frames + 1)


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="--dtype"):
        export_onnx(tiny_checkpoint, target, dtype="int8")
    with pytest.raises(ValueError, match="--max-frames must be >= 1, got 0"):
        export_onnx(tiny_checkpoint, target, max_frames=0)
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken_ckpt")
    next(broken.glob("model-00002-*.safetensors")).write_bytes(b"junk")
    with pytest.raises(Exception, match="unreadable safetensors"):
        export_onnx(broken, target)
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_graphs_from_another_version_are_refused(tiny_onnx, tmp_path):
    old = shutil.copytree(tiny_onnx, tmp_path / "old")
    model = onnx.load(str(old / "decode.onnx"))
    model.graph.input[1].name = "cache_len"  # as if an older exporter had named it so
    for node in model.graph.node:
        node.input[:] = ["cache_len" if name == "past_len" else name for name in node.input]
    onnx.save(model, str(old / "decode.onnx"))
    manifest = json.loads((old / "export_manifest.json").read_text())  # the older exporter's own inventory
    manifest["files"]["decode.onnx"] = {"bytes": (old / "decode.onnx").stat().st_size, "sha256": file_sha256(old / "decode.onnx")}
    (old / "export_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"decode.onnx: inputs differ .*missing \['past_len'\], unexpected \['cache_len'\]"):
        OnnxRuntimeBackend(old)
