"""TensorRT backend: one-line failures without a GPU, its pure bookkeeping, and (GPU) parity with ONNX Runtime.

The GPU tests build the tiny model's engines for the GPU present and skip, with the reason, when
there is no GPU or no TensorRT that can build for it (TensorRT for RTX runs on RTX-class GPUs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from videoxl.config import VideoXLConfig
from videoxl.runtime.cuda_memory import ALIGNMENT, ArenaOverflowError
from videoxl.runtime.device import gpu_problem, gpu_usable
from videoxl.runtime.trt_backend import (
    BackendUnavailable,
    DecodeGraphCache,
    KVRows,
    KVSlabs,
    TensorRTBackend,
    _checked_manifest,
    _Mirror,
    fit_gather_width,
    fit_kv_rows,
    kv_rows_for,
    one_line,
)

no_gpu = pytest.mark.skipif(gpu_usable(), reason="checks the behaviour on a machine without a usable GPU")
needs_gpu = pytest.mark.skipif(not gpu_usable(), reason=f"needs an NVIDIA GPU: {gpu_problem()}")
LIMITS = {"max_frames": 64, "chunk_groups": 2, "window_chunks": 1, "timestamp_tokens": 16, "prefix_tokens": 64,
          "suffix_tokens": 256, "answer_tokens": 256, "vision_batch_frames": 32}


# --- without a GPU: one line, and the CLI prints exactly it --------------------------------------------
@no_gpu
def test_construction_without_a_driver_raises_one_line(tmp_path):
    with pytest.raises(BackendUnavailable) as err:
        TensorRTBackend(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "no CUDA device or driver is usable" in message and "--backend onnxruntime" in message
    assert isinstance(err.value, RuntimeError)


@no_gpu
def test_cli_run_with_tensorrt_prints_that_line(capsys, tmp_path):
    from videoxl.cli import main

    with pytest.raises(BackendUnavailable) as expected:
        TensorRTBackend(tmp_path)
    code = main(["run", "--backend", "tensorrt", "--engines", str(tmp_path), "--video", str(tmp_path / "clip.mp4")])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.err == str(expected.value) + "\n"
    assert captured.out == ""


def test_a_directory_without_manifest_is_one_line(tmp_path):
    with pytest.raises(BackendUnavailable) as err:
        _checked_manifest(tmp_path)
    assert "\n" not in str(err.value) and "manifest.json" in str(err.value) and "videoxl build" in str(err.value)


def test_a_manifest_mismatch_is_folded_into_one_line(tmp_path, monkeypatch):
    trt = pytest.importorskip("tensorrt_rtx")
    from videoxl.engines import trt_module

    monkeypatch.setattr(trt_module, "gpu_compute_capability", lambda device=0: "sm_89")
    VideoXLConfig().save(tmp_path / "config.json")
    manifest = {
        "format": 1, "precision": "fp16", "tensorrt": {"flavour": "tensorrt_rtx", "version": trt.__version__},
        "compute_capabilities": ["sm_120"], "limits": {"max_frames": 64},
        "plugins": {"used": False, "requested": False, "version": "1"},
        "engines": {"decode": {"file": "decode.engine", "bytes": 10}},
        "model": {"config_hash": "0" * 16, "onnx_dir": str(tmp_path)},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable) as err:
        _checked_manifest(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "built for sm_120; this GPU is sm_89" in message
    assert "decode.engine is missing" in message and "rebuild with `videoxl build" in message


def test_one_line_folds_bullets():
    text = "dir: the engines do not fit this process:\n  - built for sm_89\n  - file missing\nrebuild with `x`"
    assert one_line(text) == "dir: the engines do not fit this process: built for sm_89; file missing; rebuild with `x`"


# --- pure bookkeeping -----------------------------------------------------------------------------------
def test_kv_slabs_interleave_layers_on_aligned_slabs():
    slabs = KVSlabs(ptr=1 << 20, layers=3, capacity=10, row_bytes=100)  # 1000 B per slab -> 1024
    assert KVSlabs.nbytes(3, 10, 100) == 6 * 1024
    assert slabs.pitch == 2048
    assert slabs.key(0) == 1 << 20 and slabs.value(0) == (1 << 20) + 1024
    assert slabs.key(2, 3) == (1 << 20) + 4 * 1024 + 300
    assert slabs.key(1, 0) - slabs.key(0, 0) == slabs.pitch  # one 2-D copy walks the layers
    assert all(slabs.key(layer) % ALIGNMENT == 0 for layer in range(3))
    assert slabs.value(2, 10) == (1 << 20) + 6 * 1024 - 24  # one past the last row
    with pytest.raises(IndexError):
        slabs.key(3)
    with pytest.raises(IndexError):
        slabs.value(0, 11)


def test_kv_rows_follow_the_planner():
    cfg = VideoXLConfig()
    rows = kv_rows_for(cfg, LIMITS, 64, dense_blocks=4)
    group = 144 + 16
    # 16 groups, chunks of 2: the last chunk has 14 groups of past; 4 blocks of 4 groups, all dense (2 + top-4 >= 4)
    assert rows.prefill == 64 + 14 * group + 2 * group
    assert rows.source == 16 * (16 + 36) + 64 + 16 * group
    assert rows.mixed == 64 + 16 * group + 256 + 256


def test_fit_kv_rows_uses_the_budget_and_never_exceeds_it():
    cfg = VideoXLConfig()
    row = 4 * 128 * 2
    need = kv_rows_for(cfg, LIMITS, 64, dense_blocks=4).nbytes(28, row)
    frames, rows = fit_kv_rows(cfg, LIMITS, available_bytes=need * 3, row_bytes=row, dense_blocks=4)
    assert frames == 64
    ceiling = kv_rows_for(cfg, LIMITS, 64, dense_blocks=10**9)
    assert rows.source == ceiling.source and rows.mixed == ceiling.mixed  # spare bytes, capped at all-dense
    assert rows.nbytes(28, row) <= need * 3

    small_need = kv_rows_for(cfg, LIMITS, 32, dense_blocks=4).nbytes(28, row)
    frames, rows = fit_kv_rows(cfg, LIMITS, available_bytes=small_need + 1000, row_bytes=row, dense_blocks=4)
    assert frames == 32 and rows.nbytes(28, row) <= small_need + 1000
    assert kv_rows_for(cfg, LIMITS, 36, dense_blocks=4).nbytes(28, row) > small_need + 1000

    frames, rows = fit_kv_rows(cfg, LIMITS, available_bytes=small_need + (64 << 20), row_bytes=row, dense_blocks=4)
    assert rows.nbytes(28, row) <= small_need + (64 << 20) and rows.mixed > kv_rows_for(cfg, LIMITS, frames, dense_blocks=4).mixed

    with pytest.raises(ArenaOverflowError, match=r"bytes \(.*\) missing; raise --gpu-memory-budget"):
        fit_kv_rows(cfg, LIMITS, available_bytes=1 << 20, row_bytes=row, dense_blocks=4)
    assert isinstance(KVRows(1, 2, 3).nbytes(2, 128), int)


def _gather(source, index, weight):
    return np.einsum("ms,msd->md", weight, source[index])


def test_gather_rows_are_widened_with_zero_weights():
    rng = np.random.default_rng(0)
    source = rng.standard_normal((20, 8)).astype(np.float32)
    index = rng.integers(0, 20, size=(7, 1))
    weight = np.ones((7, 1), np.float32)
    wide_index, wide_weight = fit_gather_width(index, weight, 4, 4)
    assert wide_index.shape == wide_weight.shape == (7, 4) and wide_index.dtype == np.int64
    np.testing.assert_array_equal(_gather(source, wide_index, wide_weight), _gather(source, index, weight))

    same_index, _ = fit_gather_width(index, weight, 1, 4)  # an engine that takes S = 1 gets the rows as they are
    assert same_index.shape == (7, 1)
    with pytest.raises(ValueError, match="at most 4"):
        fit_gather_width(np.zeros((3, 8), np.int64), np.zeros((3, 8), np.float32), 1, 4)


def test_decode_graphs_capture_on_the_second_use_and_evict_the_oldest():
    cache = DecodeGraphCache(max_graphs=2, min_uses=2)
    assert cache.action((1, 100)) == "plain"
    assert cache.action((1, 100)) == "capture"
    assert cache.add((1, 100), "g100") == []
    assert cache.action((1, 100)) == "replay"
    for past in (101, 102):
        cache.action((1, past))
        assert cache.action((1, past)) == "capture"
        evicted = cache.add((1, past), f"g{past}")
    assert evicted == ["g100"] and list(cache.graphs) == [(1, 101), (1, 102)]
    assert cache.action((1, 100)) == "plain"  # evicted: counted again from the start
    assert sorted(cache.clear()) == ["g101", "g102"]

    growing = DecodeGraphCache(max_graphs=4)
    assert {growing.action((1, past)) for past in range(1000)} == {"plain"}  # the answer loop: every key is new
    off = DecodeGraphCache(max_graphs=0)
    assert [off.action((1, 5)) for _ in range(3)] == ["plain"] * 3


def test_mirror_covers_only_its_own_rows():
    mirror = _Mirror()
    mirror.adopt((1, 2), 10)
    assert mirror.covers((1, 2), 10) and mirror.covers((1, 2), 3)
    assert not mirror.covers((1, 2), 11) and not mirror.covers((1, 3), 5)


# --- on a GPU -------------------------------------------------------------------------------------------
GEOMETRY = dict(chunk_groups=2, window_chunks=1, block_groups=2)


@pytest.fixture(scope="module")
def gpu_engines(tiny_onnx, tmp_path_factory):
    """The tiny model's fp32 engines (standard ops, no plugins) built for the GPU present."""
    from videoxl.engines.build import build_engines
    from videoxl.engines.trt_module import (
        TensorRTUnavailableError, flavour_of, gpu_compute_capability, import_tensorrt, is_rtx, rtx_supported_targets,
    )

    try:
        trt = import_tensorrt()
    except TensorRTUnavailableError as err:
        pytest.skip(f"no TensorRT: {err}")
    gpu = gpu_compute_capability()
    if is_rtx(trt) and gpu not in rtx_supported_targets(trt):
        pytest.skip(f"TensorRT for RTX cannot run on {gpu} (it targets {', '.join(rtx_supported_targets(trt))})")
    out = tmp_path_factory.mktemp("engines") / "tiny"
    return build_engines(
        tiny_onnx, out, precision="fp32", max_frames=64, chunk_groups=2, window_chunks=1,
        targets=[gpu] if is_rtx(trt) else None, flavour=flavour_of(trt), use_plugins=False,
    )


@pytest.fixture(scope="module")
def trt_backend(gpu_engines):
    backend = TensorRTBackend(gpu_engines, gpu_memory_budget=2 << 30)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def case(make_layout, tiny_model):
    layout = make_layout(10, "Which colour comes last?")
    rng = np.random.default_rng(11)
    visual = rng.standard_normal((10, tiny_model.cfg.tokens_per_group, tiny_model.cfg.hidden_size)).astype(np.float32)
    return layout, visual


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dense_blocks", [1, (3,)])
def test_tokens_equal_onnxruntime(trt_backend, tiny_onnx, tiny_tokenizer, case, dense_blocks):
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    layout, visual = case
    options = InferenceOptions(dense_blocks=dense_blocks, **GEOMETRY)
    gen = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    ours = Pipeline(trt_backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    reference = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert ours.token_ids == reference.token_ids
    assert ours.report.dense_blocks == reference.report.dense_blocks


@pytest.mark.gpu
@needs_gpu
def test_vision_matches_onnxruntime(trt_backend, tiny_onnx):
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend

    pixels = np.random.default_rng(3).uniform(-1, 1, (12, 3, 384, 384)).astype(np.float32)
    ours = trt_backend.encode_frames(pixels)
    reference = OnnxRuntimeBackend(tiny_onnx).encode_frames(pixels)
    np.testing.assert_allclose(ours, reference, rtol=5e-3, atol=5e-3)


def _mixed_cache(backend, tokenizer, layout, visual, extra: int):
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline

    pipeline = Pipeline(backend, tokenizer)
    options = InferenceOptions(dense_blocks=1, **GEOMETRY)
    store = pipeline.prefill(layout, visual, options)
    chosen, _ = pipeline.choose_dense_blocks(store, layout, options)
    return pipeline, store.build_mixed(backend, chosen, extra_capacity=extra)


@pytest.mark.gpu
@needs_gpu
def test_device_memory_is_flat_over_100_decode_steps(trt_backend, tiny_tokenizer, case):
    from videoxl.runtime.cuda_memory import mem_get_info
    from videoxl.sampling import GenerationConfig

    layout, visual = case
    suffix = layout.input_ids[layout.suffix_start :]
    pipeline, mixed = _mixed_cache(trt_backend, tiny_tokenizer, layout, visual, extra=len(suffix) + 110)
    pipeline.decode(mixed, suffix, GenerationConfig(max_new_tokens=5, stop_at_eos=False))  # warm up
    before = mem_get_info()[0]
    tokens = pipeline.decode(mixed, np.array([65], np.int64), GenerationConfig(max_new_tokens=100, stop_at_eos=False))
    after = mem_get_info()[0]
    assert len(tokens) == 100
    assert after == before, f"device memory moved by {before - after} bytes over 100 decode steps"


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_replay_gives_the_plain_logits(trt_backend, tiny_tokenizer, case):
    layout, visual = case
    suffix = layout.input_ids[layout.suffix_start :]
    _, mixed = _mixed_cache(trt_backend, tiny_tokenizer, layout, visual, extra=len(suffix) + 4)
    keys, values = mixed.views()
    plain = trt_backend.decode(suffix, keys, values)  # first use: plain
    captured = trt_backend.decode(suffix, keys, values)  # second use: plain run, then captured
    assert (len(suffix), len(keys[0])) in trt_backend._graphs.graphs
    replayed = trt_backend.decode(suffix, keys, values)  # replay
    np.testing.assert_array_equal(captured.logits, plain.logits)
    np.testing.assert_array_equal(replayed.logits, plain.logits)
    np.testing.assert_array_equal(replayed.attention_mass, plain.attention_mass)
    for a, b in zip(replayed.keys, plain.keys):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@needs_gpu
def test_gather_layers_equals_layer_by_layer(trt_backend):
    cfg, rng = trt_backend.config, np.random.default_rng(5)
    layers, shape = cfg.num_hidden_layers, (40, cfg.num_key_value_heads, cfg.head_dim)
    keys = [rng.standard_normal(shape).astype(trt_backend.float_dtype) for _ in range(layers)]
    values = [rng.standard_normal(shape).astype(trt_backend.float_dtype) for _ in range(layers)]
    index = rng.integers(0, 40, size=(30, 1))
    weight = np.ones((30, 1), np.float32)
    together = trt_backend.gather_kv_layers(keys, values, index, weight)
    one_by_one = [trt_backend.gather_kv(k, v, index, weight) for k, v in zip(keys, values)]
    for layer in range(layers):
        np.testing.assert_array_equal(together[0][layer], one_by_one[layer][0])
        np.testing.assert_array_equal(together[1][layer], one_by_one[layer][1])
