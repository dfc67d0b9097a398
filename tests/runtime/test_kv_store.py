"""The two-tier KV store's sizes, and the host-memory check that runs before any work."""

from __future__ import annotations

import numpy as np
import pytest

from videoxl.cli import main
from videoxl.runtime import kv_store
from videoxl.runtime.kv_store import HostMemoryError, TwoTierKVStore, check_host_memory, sparse_tier_tokens
from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.video import open_video


@pytest.fixture(scope="module")
def pipeline(tiny_onnx, tiny_tokenizer):
    return Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)


@pytest.mark.parametrize("groups,block_groups", [(1, 1), (7, 2), (10, 4)])
def test_sparse_tier_rows_match_the_store(pipeline, make_layout, groups, block_groups):
    layout = make_layout(groups)
    store = TwoTierKVStore(pipeline.backend, pipeline.config, layout, block_groups=block_groups)
    assert sparse_tier_tokens(layout, pipeline.config.kv_pool_stride) == store.sparse_rows == store.cache.sparse_rows
    assert store.cache.rows.keys[0].shape[0] == store.sparse_rows + layout.suffix_start


@pytest.mark.parametrize("dense_blocks", [1, "all"])
def test_estimate_covers_what_a_run_allocates(pipeline, make_layout, dense_blocks):
    cfg = pipeline.config
    layout = make_layout(12, "Which colour comes last?")
    options = InferenceOptions(dense_blocks=dense_blocks, chunk_groups=2, window_chunks=1, block_groups=2)
    estimate = pipeline.check_host_memory(layout, options)
    visual = np.random.default_rng(0).standard_normal((12, cfg.tokens_per_group, cfg.hidden_size)).astype(np.float32)
    store = pipeline.prefill(layout, visual, options)
    chosen, _ = pipeline.choose_dense_blocks(store, layout, options)
    cache, _ = store.build_decode_cache(chosen, extra_capacity=320)
    allocated = sum(a.nbytes for rows in (store.cache.rows, cache.rows) for tier in (rows.keys, rows.values) for a in tier)
    assert allocated <= estimate <= 3 * allocated


def test_over_the_free_memory_names_a_frame_count_that_fits(pipeline, make_layout):
    cfg = pipeline.config
    layout = make_layout(40)
    need = check_host_memory(cfg, layout, block_groups=2, dense_blocks=2, itemsize=4, available_bytes=1 << 40)
    with pytest.raises(HostMemoryError, match=r"160 frames need about .* Lower --max-frames to (\d+)$") as err:
        check_host_memory(cfg, layout, block_groups=2, dense_blocks=2, itemsize=4, available_bytes=need // 3)
    suggested = int(str(err.value).rsplit(" ", 1)[1])
    assert 0 < suggested < 160 and suggested % 4 == 0
    smaller = make_layout(suggested // 4)
    check_host_memory(cfg, smaller, block_groups=2, dense_blocks=2, itemsize=4, available_bytes=need // 3)  # fits


def test_prepare_refuses_before_decoding_any_frame(pipeline, synthetic_video, monkeypatch):
    monkeypatch.setattr(kv_store, "available_host_bytes", lambda: 1 << 10)
    calls = []
    monkeypatch.setattr(pipeline.backend, "encode_frames", lambda pixels: calls.append(pixels))
    video = open_video(synthetic_video, image_size=pipeline.config.image_size, max_frames=40)
    with pytest.raises(HostMemoryError, match="40 frames need about"):
        pipeline.prepare(video, options=InferenceOptions(dense_blocks=1))
    assert calls == []


def test_cli_prints_the_memory_error_on_one_line(tiny_onnx, synthetic_video, capsys, monkeypatch):
    monkeypatch.setattr(kv_store, "available_host_bytes", lambda: 1 << 10)
    assert main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("videoxl run: error: ") and "of host memory for the KV cache" in err and err.count("\n") == 1


def test_available_host_bytes_reads_this_machine():
    available = kv_store.available_host_bytes()
    assert available is None or available > 0

