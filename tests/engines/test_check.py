"""`videoxl check`: feeds that respect the graphs (checked on ONNX Runtime, CPU) and the GPU comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import BUILD_LIMITS
from engine_fixtures import write_artifacts
from videoxl.config import VideoXLConfig
from videoxl.engines.build import build_engines
from videoxl.engines.check import check_engines, sample_feeds
from videoxl.engines.profiles import GRAPHS
from videoxl.engines.trt_module import gpu_compute_capability


@pytest.fixture(scope="module")
def fp32_build(trt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    onnx_dir = write_artifacts(tmp_path_factory.mktemp("onnx") / "fp32", precision="fp32")
    engines = build_engines(onnx_dir, tmp_path_factory.mktemp("engines") / "fp32", precision="fp32", use_plugins=False, **BUILD_LIMITS)
    return onnx_dir, engines


@pytest.mark.parametrize("graph", GRAPHS)
def test_random_feeds_fit_profile_and_graph(graph: str, fp32_build: tuple[Path, Path]) -> None:
    onnx_dir, engines = fp32_build
    manifest = json.loads((engines / "manifest.json").read_text())
    cfg = VideoXLConfig.load(engines / "config.json")
    feed = sample_feeds(graph, manifest, cfg, np.random.default_rng(0))
    for name, spec in manifest["engines"][graph]["inputs"].items():
        shape = feed[name].shape
        assert all(lo <= n <= hi for lo, n, hi in zip(spec["min"], shape, spec["max"])), (name, shape, spec)
        if "shape_input" in spec:  # a shape tensor's values must lie in its profile's value range too
            low, _, high = spec["shape_input"]
            assert all(lo <= v <= hi for lo, v, hi in zip(low, feed[name].tolist(), high)), (name, feed[name], spec)
    outputs = ort.InferenceSession(str(onnx_dir / f"{graph}.onnx")).run(None, feed)
    assert all(np.isfinite(o).all() for o in outputs)


def test_prefill_feeds_place_image_tokens(fp32_build: tuple[Path, Path]) -> None:
    _, engines = fp32_build
    manifest = json.loads((engines / "manifest.json").read_text())
    feed = sample_feeds("prefill_chunk", manifest, VideoXLConfig.load(engines / "config.json"), np.random.default_rng(1), image_token=7)
    assert (feed["input_ids"] == 7).sum() == feed["visual_embeds"].shape[0] > 0
    past_len, capacity = int(feed["past_len"][0]), feed["past_key.0"].shape[0]
    assert 0 < past_len <= capacity
    visible = feed["visible_past_index"]
    assert visible.dtype == np.int64 and len(visible) > 0
    assert np.all(np.diff(visible) > 0) and visible.min() >= 0 and visible.max() < past_len  # op contract v2
    ts_queries = feed["timestamp_query_index"]
    assert ts_queries.dtype == np.int64 and len(ts_queries) > 0
    assert np.all(np.diff(ts_queries) > 0) and 0 <= ts_queries.min() and ts_queries.max() < len(feed["input_ids"])


@pytest.mark.parametrize("graph", ["decode", "score"])
def test_cache_feeds_leave_unused_capacity(graph: str, fp32_build: tuple[Path, Path]) -> None:
    """A capacity buffer with rows past past_len: the comparison covers rows the graphs must ignore."""
    _, engines = fp32_build
    manifest = json.loads((engines / "manifest.json").read_text())
    feed = sample_feeds(graph, manifest, VideoXLConfig.load(engines / "config.json"), np.random.default_rng(2))
    assert 0 < int(feed["past_len"][0]) < feed["past_key.1"].shape[0]


def test_gather_feeds_follow_the_source_layout(fp32_build: tuple[Path, Path]) -> None:
    _, engines = fp32_build
    manifest = json.loads((engines / "manifest.json").read_text())
    feed = sample_feeds("kv_gather", manifest, VideoXLConfig.load(engines / "config.json"), np.random.default_rng(3))
    source = feed["key"].shape[0]
    assert feed["source_position"].shape == (source,) and feed["gather_index"].max() < source
    assert feed["source_position"][0] == 0 and feed["source_position"][-1] > 0  # [sparse (pre-RoPE) | dense (rotated)]
    assert np.array_equal(feed["target_position"], np.arange(feed["gather_index"].shape[0]))


@pytest.mark.gpu
def test_engines_match_onnxruntime(fp32_build: tuple[Path, Path]) -> None:
    gpu = gpu_compute_capability()
    if gpu is None:
        pytest.skip("needs an NVIDIA GPU to run the engines")
    onnx_dir, engines = fp32_build
    if gpu not in json.loads((engines / "manifest.json").read_text())["compute_capabilities"]:
        pytest.skip(f"the test engines are built for sm_89 (TensorRT for RTX); this GPU is {gpu}")
    results = check_engines(engines, onnx_dir)
    assert all(r.passed for r in results), results
