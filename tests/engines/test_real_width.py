"""The released model's widths on every commit: export -> engine build -> ONNX Runtime.

A full-width, shallow model from ``videoxl.synthetic`` (the same writer as the full-size run of
bench/bench_real_size.py): LLM hidden 3584, 28 query / 4 KV heads of 128, SigLIP width 1152
with its real MLP 4304 and 16 heads, the DTS compressor and projector at full size; one LLM
layer, one SigLIP layer used, a 4096-row vocabulary and a 1024-wide LLM MLP keep it ~0.7 GB in
fp32. Shapes that only show up at the real width (head_dim 128 in the fused attention, the
1152-channel GroupNorm(32), 3584-wide projector) are built and run here, not only at width 64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from videoxl.config import VideoXLConfig
from videoxl.engines.build import build_engines
from videoxl.export.onnx_export import GRAPH_FILES, export_onnx
from videoxl.synthetic import write_synthetic_checkpoint

SHALLOW = {"num_hidden_layers": 1, "vocab_size": 4096, "intermediate_size": 1024, "vision_config": {"num_hidden_layers": 2}}
LIMITS = {"max_frames": 8, "chunk_groups": 1, "window_chunks": 1}


@pytest.fixture(scope="module")
def real_width(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, fp32 ONNX export) of the shallow full-width model."""
    root = tmp_path_factory.mktemp("real_width")
    checkpoint = write_synthetic_checkpoint(root / "checkpoint", shard_bytes=128 * 2**20, **SHALLOW)
    return checkpoint, export_onnx(checkpoint, root / "onnx", opset=23, max_frames=LIMITS["max_frames"])


def test_real_width_exports_builds_and_runs(trt, real_width: tuple[Path, Path], tmp_path: Path) -> None:
    from videoxl.export.model import VideoXLModel
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend

    checkpoint, onnx_dir = real_width
    cfg = VideoXLConfig.load(onnx_dir / "config.json")
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (3584, 128, 28, 4)
    assert (cfg.vision_hidden_size, cfg.vision_intermediate_size, cfg.vision_num_heads) == (1152, 4304, 16)
    shards = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) >= 3  # sharded like the release, loaded through the index
    for file in GRAPH_FILES.values():
        onnx.checker.check_model(str(onnx_dir / file))

    # ONNX Runtime against the PyTorch model loaded the way a real checkpoint is
    model = VideoXLModel.from_pretrained(checkpoint, llm_weights=False)  # the visual modules, as the exporter loads them
    backend = OnnxRuntimeBackend(onnx_dir)
    pixels = np.random.default_rng(0).standard_normal((4, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    with torch.no_grad():
        reference = model.encode_frames(torch.from_numpy(pixels)).numpy()
    visual = backend.encode_frames(pixels)
    assert visual.shape == (1, cfg.tokens_per_group, 3584)
    assert np.isfinite(visual).all()
    assert np.abs(visual - reference).max() <= 1e-3 * max(1.0, float(np.abs(reference).max()))
    ids = np.array([1, 2, 3, 260], dtype=np.int64)
    logits = backend.decode(backend.new_decode_cache(8), ids)
    assert logits.shape[-1] == 4096 and np.isfinite(logits).all()

    del backend, model  # the build below holds its own copy of the weights: keep the test's peak down

    # TensorRT for RTX: every graph at full width, plugin-free (fused attention at head_dim 128)
    out = build_engines(onnx_dir, tmp_path / "engines", precision="fp32", targets=["sm_89"], flavour="tensorrt_rtx",
                        use_plugins=False, **LIMITS)
    engines = json.loads((out / "manifest.json").read_text())["engines"]
    assert set(engines) == set(GRAPH_FILES)
    llm_weight_bytes = 4 * (2 * 4096 * 3584 + 3584 * (3584 + 2 * 512) + 3584 * 3584 + 3 * 3584 * 1024)
    assert engines["decode"]["bytes"] > 0.9 * llm_weight_bytes  # the weights are in the engine, at full width
    assert engines["decode"]["native_attention_layers"] == 1
