"""The ONNX Runtime backend's session handling: which graphs load when, and its MatMulNBits options."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from videoxl.runtime.ort_backend import LAZY_GRAPHS, OnnxRuntimeBackend

IDS = np.array([5, 17, 42, 99, 7, 64, 120, 33], dtype=np.int64)


def test_score_loads_on_first_use(tiny_onnx):
    """An 8B int4 LLM session holds ~3.8 GB of repacked weights: the score graph, which only a
    video with more blocks than top-k + the always-dense ones runs, is not loaded up front."""
    backend = OnnxRuntimeBackend(tiny_onnx)
    assert LAZY_GRAPHS == ("score",)
    assert sorted(backend.sessions) == ["decode", "kv_gather", "prefill_chunk", "vision"]
    assert sorted(backend.load_seconds) == sorted(backend.sessions)
    cache = backend.new_decode_cache(16)
    backend.decode(cache, IDS[:4])
    mass = backend.score(cache, IDS[4:])
    assert "score" in backend.sessions and backend.load_seconds["score"] > 0
    assert mass.shape == (4,) and np.all(mass > 0)


def test_stale_graphs_fail_before_any_session_loads(tiny_onnx, tmp_path, monkeypatch):
    """The input/output check reads the small .onnx files only, so it runs before the weights load."""
    import shutil

    from videoxl.runtime.artifacts import ArtifactError

    old = shutil.copytree(tiny_onnx, tmp_path / "old")
    model = onnx.load(str(old / "score.onnx"))
    model.graph.output[0].name = "mass"
    onnx.save(model, str(old / "score.onnx"))
    created = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: created.append(a))
    from videoxl.runtime.artifacts import load_onnx_artifacts

    with pytest.raises(ArtifactError, match=r"score.onnx: outputs differ .*missing \['attention_mass'\], unexpected \['mass'\]"):
        OnnxRuntimeBackend(load_onnx_artifacts(old, verify=False))
    assert created == []


def test_matmul_accuracy_level(tiny_onnx, tiny_onnx_quantized):
    """Level 4 (ONNX Runtime's default) quantizes activations to int8 inside MatMulNBits; level 0
    keeps them float32. On the tiny int8 export against fp32 the logits error of one 8-token decode
    is 0.0149 of max |logit| at level 4 and 0.0129 at level 0 (over 17 steps, worst: 0.024 and 0.015,
    bench/RESULTS.md); int4's weight error dominates either way."""
    with pytest.raises(ValueError, match="matmul_accuracy_level 5 is not one of"):
        OnnxRuntimeBackend(tiny_onnx, matmul_accuracy_level=5)

    def logits(root, level=None):
        backend = OnnxRuntimeBackend(root, matmul_accuracy_level=level)
        return backend.decode(backend.new_decode_cache(16), IDS)[0]

    reference = logits(tiny_onnx)
    error = {level: np.abs(logits(tiny_onnx_quantized("int8"), level) - reference).max() / np.abs(reference).max()
             for level in (None, 4, 0)}
    assert error[None] == error[4]  # None is ONNX Runtime's default: level 4
    assert error[0] < error[4] < 0.02  # the option reaches ONNX Runtime, and float activations are closer
