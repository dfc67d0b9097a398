"""TensorRT backend: one-line failures without a GPU, its bookkeeping, a simulated device, and (GPU) the real thing.

CPU: the BackendUnavailable line (and the CLI printing exactly it), the manifest check folded
into one line, gather widening, the decode-graph policy, and
the whole backend driven by the runtime loop on a simulated device (fake_cuda.py: host memory,
one thread per stream with random delays, events that order them; fake engines running the
exported graphs in ONNX Runtime): same tokens as ONNX Runtime, no past re-uploaded, graph replay
equal to the plain step, every synchronisation needed (the table below), close() after CUDA errors.

GPU (marker ``gpu``): the tiny model's engines built for the GPU present; skipped, with the reason,
when there is no GPU or no TensorRT that can build for it (TensorRT for RTX runs on RTX-class GPUs).
"""

from __future__ import annotations

# Which test fails when one synchronisation of the backend is removed (each removed alone, the
# simulated tests run). Each catching test was run 5 times with the sync in place (all green) and
# 5 times with it removed (all failed; gather_...[download] catches the two compute-side gather
# events 3 times in 5, the other two lags 5 in 5).
#
#   removed from runtime/trt_backend.py               caught by test_simulated_...
#   S1 _sync_mirror      compute.synchronize()        decode_uploads_a_past_given_in_another_dtype
#   S2 encode_frames     compute.synchronize()        backend_gives_the_onnxruntime_tokens_..., answers_follow_up_questions
#   S3 prefill_chunk     compute.synchronize()        backend_gives_the_onnxruntime_tokens_..., answers_follow_up_questions,
#                                                     decode_graph_replays_the_plain_step
#   S4 decode            compute.synchronize()        the same three, and decode_uploads_a_past_given_in_another_dtype
#   S5 _capture_decode   compute.synchronize()        none, and none can: it orders nothing that is read (the capture
#                                                     only records; decode() waits for the plain run before reading
#                                                     its outputs). Harmless, once per captured key; could go
#   _gather  up_done[slot].synchronize()  (slot reuse)  gather_is_right_whichever_stream_lags[upload|compute|download]
#   _gather  compute.wait(up_done[slot])                gather_is_right_...[upload|download], gather_layers_equals_layer_by_layer
#   _gather  download.wait(gathered[slot])              gather_is_right_...[upload|compute|download]
#   _gather  down_done[slot].synchronize() (collect)    gather_is_right_...[upload|compute|download]
#   _gather  up_done[slot].record(upload)               gather_is_right_...[all three], answers_follow_up_questions
#   _gather  gathered[slot].record(compute)             gather_is_right_...[all three], gather_layers_equals_layer_by_layer
#   _gather  down_done[slot].record(download)           gather_is_right_...[upload|compute|download]

import dataclasses
import json

import numpy as np
import pytest

from videoxl.config import VideoXLConfig
from videoxl.runtime.cuda_memory import ALIGNMENT
from videoxl.runtime.device import gpu_problem, gpu_usable
from videoxl.runtime.trt_backend import (
    GRAPHS,
    BackendUnavailable,
    DecodeGraphCache,
    TensorRTBackend,
    _checked_manifest,
    _Mirror,
    fit_gather_width,
    one_line,
)

from fake_cuda import FakeCudart, FakeEngine, TensorSpec, fake_tensorrt

no_gpu = pytest.mark.skipif(gpu_usable(), reason="checks the behaviour on a machine without a usable GPU")
needs_gpu = pytest.mark.skipif(not gpu_usable(), reason=f"needs an NVIDIA GPU: {gpu_problem()}")


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


# --- the backend's orchestration on a simulated device (CPU) ----------------------------------------------
# The fake device (fake_cuda.py) runs every stream on its own thread with random delays, so the
# streams and the host really race; its fake TensorRT engines run the exported ONNX graphs with
# ONNX Runtime on the bytes in fake device memory. Everything between them is the real backend:
# arena, regions, pinned staging, 2-D copies, mirrors, the pipelined gather and the decode graphs.
FAKE_LIMITS = dict(max_frames=64, chunk_groups=2, window_chunks=1)
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 9: "BOOL"}


def onnx_engine(device: FakeCudart, data: bytes) -> FakeEngine:
    """A fake engine for one exported graph: ONNX Runtime computes it, the profile is the build's."""
    import onnx
    import onnxruntime as ort

    from videoxl.engines.profiles import BuildLimits, dimension_ranges, input_profile

    spec = json.loads(data)
    graph, cfg = spec["graph"], VideoXLConfig.load(spec["config"])
    model = onnx.load(spec["onnx"], load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.input if vi.name not in initializers}
    profile = input_profile(graph, dims, dimension_ranges(cfg, BuildLimits(**FAKE_LIMITS))[graph])
    dtype = {vi.name: ONNX_TYPES[vi.type.tensor_type.elem_type] for vi in (*model.graph.input, *model.graph.output)}
    outputs = [vi.name for vi in model.graph.output]
    tensors = [TensorSpec(n, dtype[n], profile=profile[n]) for n in dims] + [TensorSpec(n, dtype[n], is_input=False) for n in outputs]
    session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])

    def output_shape(name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        if graph == "vision":
            return (shapes["pixel_values"][0] // cfg.frames_per_group, cfg.tokens_per_group, cfg.hidden_size)
        if name == "logits":
            return (1, cfg.vocab_size)
        if graph == "kv_gather":
            return (shapes["gather_index"][0], cfg.num_key_value_heads, cfg.head_dim)
        new = shapes["input_ids"][0]
        if name == "attention_mass":
            return (shapes["past_key.0"][0] + new,)
        return (new, cfg.num_key_value_heads, cfg.head_dim)

    return FakeEngine(
        device, tensors, name=graph, weights_bytes=300_000,
        output_shapes=lambda shapes: {name: output_shape(name, shapes) for name in outputs},
        compute=lambda inputs: dict(zip(outputs, session.run(None, inputs))),
    )


@pytest.fixture
def make_simulated(tiny_onnx, tmp_path, monkeypatch):
    """make_simulated(device, layers=None) -> TensorRTBackend over ONNX Runtime engines on ``device``.

    ``layers`` overrides the config's layer count (the per-layer gather engine does not depend on
    it), so the pipelined gather can be run over more layers than the tiny model has. Teardown
    closes every backend and checks that everything was freed, no fault happened and every
    stream thread stopped.
    """
    import shutil

    from videoxl.engines.profiles import BuildLimits
    from videoxl.runtime import cuda_memory, device as device_module, trt_backend

    made = []

    def make(device: FakeCudart, *, layers: int | None = None) -> TensorRTBackend:
        engines = tmp_path / f"engines{len(made)}"
        engines.mkdir()
        config = VideoXLConfig.load(tiny_onnx / "config.json")
        if layers is not None:
            config = dataclasses.replace(config, num_hidden_layers=layers)
        config.save(engines / "config.json")
        for graph in GRAPHS:
            spec = {"graph": graph, "onnx": str(tiny_onnx / f"{graph}.onnx"), "config": str(engines / "config.json")}
            (engines / f"{graph}.engine").write_text(json.dumps(spec))
        manifest = {
            "precision": "fp32", "limits": BuildLimits(**FAKE_LIMITS).to_dict(), "plugins": {"used": False},
            "engines": {g: {"file": f"{g}.engine"} for g in GRAPHS},
            "model": {"onnx_dir": str(tiny_onnx)},
        }
        trt = fake_tensorrt(device, lambda data: onnx_engine(device, data))
        monkeypatch.setattr(device_module, "gpu_problem", lambda: None)
        monkeypatch.setattr(trt_backend, "_checked_manifest", lambda path: (manifest, trt))
        monkeypatch.setattr(cuda_memory, "cudart", lambda: device)
        monkeypatch.setattr(trt_backend, "cudart", lambda: device)
        backend = TensorRTBackend(engines, gpu_memory_budget=256 << 20)
        made.append((backend, device))
        return backend

    yield make
    for backend, device in made:
        backend.close()
        if device.fault_injected:  # nothing can be freed any more; every release must have been tried
            assert device.unreleased() == []
        else:
            assert device.fault is None, f"the simulated device faulted: {device.fault!r}"
            assert device.live_resources() == dict.fromkeys(device.live_resources(), 0)  # everything freed
        assert device.shutdown() == []  # every stream thread stopped


@pytest.fixture
def simulated(make_simulated):
    """A backend on a device whose streams each delay every item by 0-2 ms at random."""
    device = FakeCudart(delay_ms=(0.0, 2.0), seed=0)
    return make_simulated(device), device


GEOMETRY_SIM = dict(chunk_groups=2, window_chunks=1, block_groups=2)


def test_simulated_backend_places_everything_in_one_arena(simulated, tiny_onnx):
    backend, cudart = simulated
    regions = backend.arena.layout.regions
    assert list(regions) == ["weights", "activations", "io", "prefill_past", "kv_source", "mixed"]
    assert all(r.offset % ALIGNMENT == 0 for r in regions.values())
    assert regions["weights"].nbytes >= 4 * 300_000  # four engines' weights, then trimmed
    assert regions["weights"].nbytes < 8 * 300_000
    assert backend.max_frames == 64 and backend.artifact_dir == tiny_onnx
    assert len(cudart.buffers) == 2  # one device arena, one pinned pool


def test_simulated_backend_gives_the_onnxruntime_tokens_without_reuploading_the_past(simulated, tiny_onnx, tiny_tokenizer, make_layout, caplog):
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    backend, cudart = simulated
    layout = make_layout(10, "Which colour comes last?")
    rng = np.random.default_rng(11)
    visual = rng.standard_normal((10, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    gen = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    reference = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)
    ours = Pipeline(backend, tiny_tokenizer)
    for dense_blocks in (1, (3,)):
        options = InferenceOptions(dense_blocks=dense_blocks, **GEOMETRY_SIM)
        with caplog.at_level("DEBUG", logger="videoxl.runtime.trt_backend"):
            answer = ours.answer_tokens(layout, visual, options=options, gen=gen)
        expected = reference.answer_tokens(layout, visual, options=options, gen=gen)
        assert answer.token_ids == expected.token_ids
        assert answer.report.dense_blocks == expected.report.dense_blocks
        assert not [r for r in caplog.records if "uploading" in r.getMessage()]  # mirrors always matched

    pixels = rng.uniform(-1, 1, (12, 3, 384, 384)).astype(np.float32)  # 12 frames: batches of the engine's max
    np.testing.assert_allclose(backend.encode_frames(pixels), reference.backend.encode_frames(pixels), rtol=1e-5, atol=1e-5)


def test_simulated_backend_answers_follow_up_questions(simulated, tiny_onnx, tiny_tokenizer, synthetic_video):
    """prepare once, ask three times: each answer equals ONNX Runtime's (device mixed cache rebuilt per question)."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig
    from videoxl.video import open_video

    backend, _ = simulated
    video = open_video(synthetic_video, image_size=backend.config.image_size, max_frames=40)
    options = InferenceOptions(dense_blocks=1, **GEOMETRY_SIM)
    gen = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    ours, reference = Pipeline(backend, tiny_tokenizer), Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)
    prepared, reference_prepared = ours.prepare(video, options=options), reference.prepare(video, options=options)
    for question in ("What moves?", "Which colour comes last?", "What moves?"):
        answer, expected = ours.ask(prepared, question, gen=gen), reference.ask(reference_prepared, question, gen=gen)
        assert answer.token_ids == expected.token_ids
        assert answer.report.dense_blocks == expected.report.dense_blocks


def test_simulated_decode_graph_replays_the_plain_step(simulated, tiny_tokenizer, make_layout):
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline

    backend, cudart = simulated
    layout = make_layout(6)
    visual = np.random.default_rng(2).standard_normal((6, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    pipeline = Pipeline(backend, tiny_tokenizer)
    options = InferenceOptions(dense_blocks=1, **GEOMETRY_SIM)
    store = pipeline.prefill(layout, visual, options)
    mixed = store.build_mixed(backend, {0, 1}, extra_capacity=8)
    keys, values = mixed.views()
    suffix = layout.input_ids[layout.suffix_start :]
    plain = backend.decode(suffix, keys, values)
    backend.decode(suffix, keys, values)  # captured
    assert (len(suffix), len(keys[0])) in backend._graphs.graphs
    uploaded = cudart.bytes_to_device
    replayed = backend.decode(suffix, keys, values)
    assert cudart.bytes_to_device - uploaded == 2 * len(suffix) * 8  # only ids and positions cross the bus
    np.testing.assert_array_equal(replayed.logits, plain.logits)
    np.testing.assert_array_equal(replayed.attention_mass, plain.attention_mass)
    for a, b in zip(replayed.keys + replayed.values, plain.keys + plain.values):
        np.testing.assert_array_equal(a, b)


def test_simulated_gather_layers_equals_layer_by_layer(simulated):
    backend, _ = simulated
    cfg, rng = backend.config, np.random.default_rng(5)
    shape = (40, cfg.num_key_value_heads, cfg.head_dim)
    keys = [rng.standard_normal(shape).astype(np.float32) for _ in range(cfg.num_hidden_layers)]
    values = [rng.standard_normal(shape).astype(np.float32) for _ in range(cfg.num_hidden_layers)]
    index, weight = rng.integers(0, 40, size=(30, 1)), np.ones((30, 1), np.float32)
    together = backend.gather_kv_layers(keys, values, index, weight)
    for layer in range(cfg.num_hidden_layers):
        k, v = backend.gather_kv(keys[layer], values[layer], index, weight)
        np.testing.assert_array_equal(together[0][layer], k)
        np.testing.assert_array_equal(together[1][layer], v)


def test_simulated_requests_beyond_the_regions_fail_with_the_bytes_missing(simulated):
    backend, _ = simulated
    cfg = backend.config
    rows = backend._kv["mixed"].capacity + 1
    past = [np.zeros((rows, cfg.num_key_value_heads, cfg.head_dim), np.float32)] * cfg.num_hidden_layers
    with pytest.raises(ValueError, match="outside its profile|'mixed' arena region"):
        backend.decode(np.array([1], np.int64), past, past)
    with pytest.raises(Exception, match="built for at most 64"):
        backend.check_frames(68)


# --- ordering: each test below fails when one synchronisation of the backend is missing ---------------
@pytest.mark.parametrize("lagging", ["upload", "compute", "download"])
def test_simulated_gather_is_right_whichever_stream_lags(make_simulated, tiny_onnx, lagging):
    """The pipelined gather over 4 layers (both pinned slots reused) with one stream 4 ms behind the
    others: a missing event wait or record lets the next stage read what is not there yet, a missing
    host wait lets the host overwrite an upload slot or read a download slot too early."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend

    reference = OnnxRuntimeBackend(tiny_onnx)
    device = FakeCudart(delay_ms=(0.0, 0.3), seed=3)
    backend = make_simulated(device, layers=4)
    device.set_delay(getattr(backend, lagging).handle, 4.0)
    cfg, rng = backend.config, np.random.default_rng(7)
    shape = (40, cfg.num_key_value_heads, cfg.head_dim)
    for _ in range(2):  # the second call finds the first call's rows on the device: stale reads still differ
        keys = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
        values = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
        index, weight = rng.integers(0, 40, size=(30, 1)), rng.uniform(0.5, 1.5, size=(30, 1)).astype(np.float32)
        got_k, got_v = backend.gather_kv_layers(keys, values, index, weight)
        for layer in range(4):
            want_k, want_v = reference.gather_kv(keys[layer], values[layer], index, weight)
            np.testing.assert_array_equal(got_k[layer], want_k, err_msg=f"key, layer {layer}")
            np.testing.assert_array_equal(got_v[layer], want_v, err_msg=f"value, layer {layer}")


def test_simulated_decode_uploads_a_past_given_in_another_dtype(make_simulated, tiny_onnx):
    """A past the backend did not produce, in float64: converted to float32 temporaries and uploaded
    on a slow compute stream. The temporaries die when the upload function returns, so the upload
    must have run by then."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend

    device = FakeCudart(delay_ms=(0.0, 0.3), seed=4)
    backend = make_simulated(device)
    device.set_delay(backend.compute.handle, 3.0)
    cfg, rng = backend.config, np.random.default_rng(8)
    shape = (48, cfg.num_key_value_heads, cfg.head_dim)
    keys = [rng.standard_normal(shape) for _ in range(cfg.num_hidden_layers)]
    values = [rng.standard_normal(shape) for _ in range(cfg.num_hidden_layers)]
    ids = np.array([65, 66], np.int64)
    got = backend.decode(ids, keys, values)
    want = OnnxRuntimeBackend(tiny_onnx).decode(ids, [k.astype(np.float32) for k in keys], [v.astype(np.float32) for v in values])
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.attention_mass, want.attention_mass, rtol=1e-5, atol=1e-6)


# --- close() after CUDA errors ----------------------------------------------------------------------------
def _capture_a_decode_graph(backend) -> None:
    """Two decodes of the same key: the second captures a graph, so close() has one to destroy."""
    cfg, rng = backend.config, np.random.default_rng(9)
    past = [rng.standard_normal((8, cfg.num_key_value_heads, cfg.head_dim)).astype(np.float32) for _ in range(cfg.num_hidden_layers)]
    for _ in range(2):
        backend.decode(np.array([65], np.int64), past, past)
    assert len(backend._graphs.graphs) == 1


def test_simulated_close_after_a_sticky_error_tries_every_release_once(make_simulated, caplog):
    device = FakeCudart(delay_ms=(0.0, 0.3), seed=5)
    backend = make_simulated(device)
    _capture_a_decode_graph(backend)
    device.inject_sticky_error()
    before = len(device.history)
    with caplog.at_level("WARNING", logger="videoxl.runtime.trt_backend"):
        backend.close()  # must not raise
    assert device.unreleased() == []  # arena, pinned pool, 3 streams, 6 events, the graph: all tried
    assert sorted(name for name, _ in device.release_attempts) == sorted(
        ["cudaFree", "cudaFreeHost", "cudaGraphExecDestroy"] + ["cudaStreamDestroy"] * 3 + ["cudaEventDestroy"] * 6
    )
    closing = device.history[before:]
    assert closing[:3] == ["cudaStreamSynchronize"] * 3  # waited for (tried to) every stream before freeing anything
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == len(set(failures)) == 3 + 12  # three waits, twelve releases: each logged once
    assert all("cudaErrorIllegalAddress" in message for message in failures)
    calls = len(device.history)
    backend.close()  # idempotent: nothing is tried twice
    assert len(device.history) == calls


def test_simulated_close_goes_on_after_a_failed_free(make_simulated, caplog):
    device = FakeCudart(delay_ms=(0.0, 0.3), seed=6)
    backend = make_simulated(device)
    device.fail_next("cudaFreeHost")
    pinned = next(iter(device.pinned))
    with caplog.at_level("WARNING", logger="videoxl.runtime.trt_backend"):
        backend.close()
    assert [r.getMessage() for r in caplog.records] == [
        "closing the TensorRT backend: freeing the pinned host pool failed: cudaFreeHost(pinned pool) failed: cudaErrorInvalidValue (1)"
    ]
    assert list(device.buffers) == [pinned]  # only the pool whose free failed is left; the arena went after it
    assert device.live_resources()["streams"] == device.live_resources()["events"] == 0
    assert device.cudaFreeHost(pinned) == (0,)  # freed here, so the fixture finds nothing left
