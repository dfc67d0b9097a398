"""TensorRT backend: one-line failures without a GPU, its bookkeeping, a simulated device, and (GPU) the real thing.

CPU: the BackendUnavailable line (and the CLI printing exactly it), the manifest check folded
into one line, the decode buckets and graph policy, and the whole backend driven by the runtime
loop on a simulated device (fake cuda runtime on host memory whose streams run on their own
threads with random delays, fake engines running the exported graphs in ONNX Runtime): same
tokens as ONNX Runtime, no KV row crossing the bus, graph replays equal to plain steps, every synchronisation needed
(the table below), close() after CUDA errors.

GPU (marker ``gpu``): the tiny model's engines built for the GPU present; skipped, with the reason,
when there is no GPU or no TensorRT that can build for it (TensorRT for RTX runs on RTX-class GPUs).
"""

from __future__ import annotations

# Which test fails when one synchronisation of the backend is removed (each removed alone, the
# simulated tests run twice; both runs failed for every row but the last). The backend has one
# stream; each public call synchronises it before it returns, so the next call may rewrite the
# pinned staging, and before it reads an output.
#
#   removed from runtime/trt_backend.py   caught by test_simulated_...
#   encode_frames     compute.synchronize()    backend_gives_the_onnxruntime_tokens_..., answers_follow_up_questions
#   _chunk_logits     compute.synchronize()    every test that prefills, and the decode-on-prefill tests (a device
#                                              fault: the next chunk's index list overwrote this one's before its
#                                              copy ran); prefill_chunk, its resident form and decode on prefill
#                                              all return through it
#   gather            compute.synchronize()    backend_gives_the_onnxruntime_tokens_..., chunks_that_finish_two_blocks_each
#   score             compute.synchronize()    backend_gives_the_onnxruntime_tokens_..., answers_follow_up_questions,
#                                              chunks_that_finish_two_blocks_each
#   decode            compute.synchronize()    the same three
#   _decode_on_prefill compute.synchronize()   decode_on_prefill_gives_the_onnxruntime_tokens[whole-graphs], [layer-ranges],
#     (a replayed one-token step)              decode_on_prefill_splices_the_vision_pad_row (logits read before they came down)
#   _download_video   compute.synchronize()    tiers_round_trip_through_the_host (3 of 3 runs; the process crashes)
#   _upload_video     compute.synchronize()    tiers_round_trip_through_the_host (3 of 3 runs)
#   _capture          compute.synchronize()    none, and none can: it orders nothing that is read (the capture
#                                              only records); it is there for TensorRT's state after a plain run
#
# With the dense tier in pinned host memory (--dense-tier host) a copy stream moves each chunk's rows
# out and the chosen blocks' rows back; events order it against the compute stream. Removed one at a
# time, the dense-tier tests ran twice (the _gather_staged synchronize, the _upload_split one and the
# _prefill_chunk_resident one once):
#
#   removed from runtime/trt_backend.py                  caught by test_simulated_dense_tier_...
#   _prefill_chunk_resident  copy.wait(chunk_written)     survives_a_slow_stream[compute], [copy] (a copy out reads the
#                                                         rows before the chunk wrote them)
#   _prefill_chunk_resident  compute.wait(copied_out)     survives_a_slow_stream[copy] (compaction and the next chunk
#                                                         overwrite rows still on their way out; unseen once with the
#                                                         copy stream lagging 20 ms an item, hence 50 ms)
#   (its compute.synchronize() is _chunk_logits's, in the table above: every dense-tier test that prefills fails)
#   _gather_staged           compute.wait(staged)         survives_a_slow_stream[copy] (a pass gathers stale staging rows)
#   _gather_staged           compute.synchronize()        survives_a_slow_stream[compute], [copy] (the next pass rewrites
#                                                         the staging rows and pinned inputs still being read)
#   new_video_cache          copy.synchronize()           survives_a_slow_stream[copy] (the previous video's copies out
#                                                         land over the state just loaded)
#   _download_split          copy.synchronize()           survives_a_slow_stream[copy] (the host tier read before the
#                                                         last copies out landed)
#   _download_split          compute.synchronize()        survives_a_slow_stream[compute]
#   _upload_split            compute.synchronize()        survives_a_slow_stream[compute], [copy] (the caller's arrays
#                                                         reused before their upload ran)

import dataclasses
import json

import numpy as np
import pytest

from videoxl.config import VideoXLConfig
from videoxl.runtime.cuda_memory import ALIGNMENT
from videoxl.runtime.device import gpu_problem, gpu_usable
from videoxl.graphs import GRAPHS
from videoxl.runtime.trt_backend import (
    DECODE_BUCKET_ROWS,
    BackendUnavailable,
    DecodeGraphCache,
    TensorRTBackend,
    _checked_manifest,
    capacity_bucket,
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
        "format": 4, "graph_contract": {"version": 3}, "precision": "fp16",
        "tensorrt": {"flavour": "tensorrt_rtx", "version": trt.__version__},
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
def test_capacity_buckets_double_from_the_granule_up_to_the_region():
    assert [capacity_bucket(r, granule=256, capacity=3000) for r in (1, 256, 257, 1000, 1025, 2049, 3000)] == [
        256, 256, 512, 1024, 2048, 3000, 3000]
    with pytest.raises(ValueError, match="exceed the decode region's 3000"):
        capacity_bucket(3001, granule=256, capacity=3000)
    # a 300-token answer after a 2,000-row cache crosses one bucket boundary: two graphs, not 300
    assert len({capacity_bucket(2000 + t, granule=256, capacity=10**6) for t in range(1, 301)}) == 2


def test_decode_graphs_capture_on_first_use_replay_after_and_evict_the_oldest():
    cache = DecodeGraphCache(max_graphs=2)
    assert cache.action((1, 256)) == "capture"
    assert cache.add((1, 256), "g256") == []
    assert [cache.action((1, 256)) for _ in range(5)] == ["replay"] * 5 and cache.replays == 5
    for rows in (512, 1024):
        assert cache.action((1, rows)) == "capture"
        evicted = cache.add((1, rows), f"g{rows}")
    assert evicted == ["g256"] and list(cache.graphs) == [(1, 512), (1, 1024)]
    assert cache.action((1, 256)) == "capture"  # evicted: captured again
    assert sorted(cache.clear()) == ["g1024", "g512"]
    off = DecodeGraphCache(max_graphs=0)
    assert [off.action((1, 256)) for _ in range(3)] == ["plain"] * 3
    twice = DecodeGraphCache(min_uses=2)
    assert [twice.action((1, 256)) for _ in range(2)] == ["plain", "capture"]


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


def _decode_cache(backend, tokenizer, layout, visual, extra: int, geometry=GEOMETRY):
    """Prefill, block choice and the question's decode cache with room for `extra` more rows."""
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline

    pipeline = Pipeline(backend, tokenizer)
    options = InferenceOptions(dense_blocks=1, **geometry)
    store = pipeline.prefill(layout, visual, options)
    chosen, _ = pipeline.choose_dense_blocks(store, layout, options)
    return pipeline, store.build_decode_cache(chosen, extra_capacity=extra)[0]


@pytest.mark.gpu
@needs_gpu
def test_device_memory_is_flat_over_100_decode_steps(trt_backend, tiny_tokenizer, case):
    from videoxl.runtime.cuda_memory import mem_get_info
    from videoxl.sampling import GenerationConfig

    layout, visual = case
    suffix = layout.input_ids[layout.suffix_start :]
    pipeline, cache = _decode_cache(trt_backend, tiny_tokenizer, layout, visual, extra=len(suffix) + 110)
    pipeline.decode(cache, suffix, GenerationConfig(max_new_tokens=5, stop_at_eos=False))  # warm up
    before = mem_get_info()[0]
    tokens = pipeline.decode(cache, np.array([65], np.int64), GenerationConfig(max_new_tokens=100, stop_at_eos=False))
    after = mem_get_info()[0]
    assert len(tokens) == 100
    assert after == before, f"device memory moved by {before - after} bytes over 100 decode steps"


@pytest.mark.gpu
@needs_gpu
def test_decode_steps_replay_their_bucket_graph_with_the_plain_logits(trt_backend, tiny_tokenizer, case):
    _check_replays_equal_plain_steps(trt_backend, tiny_tokenizer, case)


def _check_replays_equal_plain_steps(backend, tokenizer, case, geometry=GEOMETRY) -> None:
    """Every one-token step after the first of its bucket replays; its logits equal a plain run's."""
    layout, visual = case
    suffix = layout.input_ids[layout.suffix_start :]
    steps = 6
    _, cache = _decode_cache(backend, tokenizer, layout, visual, extra=len(suffix) + steps, geometry=geometry)
    backend.decode(cache, suffix)
    start, replays = cache.length, backend._graphs.replays
    tokens = np.arange(60, 60 + steps, dtype=np.int64)
    graphed = [backend.decode(cache, tokens[i : i + 1]) for i in range(steps)]
    buckets = {capacity_bucket(start + i + 1, granule=DECODE_BUCKET_ROWS, capacity=backend._kv["decode"].capacity) for i in range(steps)}
    assert backend._graphs.replays - replays == steps - len(buckets)  # all but the first step of each bucket
    assert cache.length == start + steps
    max_graphs, backend._graphs.max_graphs = backend._graphs.max_graphs, 0  # the same steps, plainly
    try:
        cache.length = start
        plain = [backend.decode(cache, tokens[i : i + 1]) for i in range(steps)]
    finally:
        backend._graphs.max_graphs = max_graphs
    for a, b in zip(graphed, plain):
        np.testing.assert_array_equal(a, b)


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
    ranges = dimension_ranges(cfg, BuildLimits(**FAKE_LIMITS), decode_on_prefill=spec.get("decode_on_prefill", False))
    profile = input_profile(graph, dims, ranges[graph])
    dtype = {vi.name: ONNX_TYPES[vi.type.tensor_type.elem_type] for vi in (*model.graph.input, *model.graph.output)}
    outputs = [vi.name for vi in model.graph.output]
    on_host = set(spec.get("host_inputs", {}).get(graph, []))  # shape tensors, as the inlined prefill body makes past_len
    tensors = [TensorSpec(n, dtype[n], profile=profile[n], on_host=n in on_host) for n in dims] + [TensorSpec(n, dtype[n], is_input=False) for n in outputs]
    session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])

    def output_shape(name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        if graph == "vision":
            return (shapes["pixel_values"][0] // cfg.frames_per_group, cfg.tokens_per_group, cfg.hidden_size)
        if name == "logits":
            return (1, cfg.vocab_size)
        if graph == "kv_gather":
            return (shapes["gather_index"][0], cfg.num_key_value_heads, cfg.head_dim)
        if name == "attention_mass":  # the score graph: mass on each past row
            return (shapes["past_key.0"][0],)
        new = shapes["input_ids"][0]
        if name.startswith("hidden."):  # a layer range's residual stream, for the next range
            return (new, cfg.hidden_size)
        if name.startswith("query."):  # prefill_chunk's queries, for score
            return (new, cfg.num_attention_heads, cfg.head_dim)
        return (new, cfg.num_key_value_heads, cfg.head_dim)

    return FakeEngine(
        device, tensors, name=graph, weights_bytes=300_000,
        output_shapes=lambda shapes: {name: output_shape(name, shapes) for name in outputs},
        compute=lambda inputs: dict(zip(outputs, session.run(None, inputs))),
    )


def _range_engines(onnx_dir, engines, config, layers_per_engine: int, decode_on_prefill: bool = False) -> dict:
    """Fake range engines of the LLM graphs and their manifest entries (the build's, less what the fakes ignore)."""
    import onnx

    from videoxl.engines.ranges import RANGED_GRAPHS, split_layers

    entries = {}
    for graph in RANGED_GRAPHS:
        model = onnx.load(str(onnx_dir / f"{graph}.onnx"))
        ranges = []
        for part in split_layers(model, GRAPHS[graph], config, layers_per_engine=layers_per_engine):
            path = engines / part.layers.file(graph)
            path.write_bytes(part.model.SerializeToString())
            spec = {"graph": graph, "onnx": str(path), "config": str(engines / "config.json"), "decode_on_prefill": decode_on_prefill}
            (engines / part.layers.file(graph, "engine")).write_text(json.dumps(spec))
            ranges.append({
                "layers": [part.layers.start, part.layers.stop], "file": part.layers.file(graph, "engine"),
                "boundary_in": list(part.boundary_in), "boundary_out": list(part.boundary_out),
            })
        entries[graph] = {"ranges": ranges}
    return entries


@pytest.fixture
def make_simulated(tiny_onnx, tmp_path, monkeypatch):
    """make_simulated(device, layers=None) -> TensorRTBackend over ONNX Runtime engines on ``device``.

    ``layers`` overrides the config's layer count (the per-layer gather engine does not depend on
    it), so the pipelined gather can be run over more layers than the tiny model has. Teardown
    closes every backend and checks that everything was freed, no fault happened and every
    stream thread stopped.
    """
    import shutil

    from videoxl.embedding import embedding_row
    from videoxl.engines.manifest import VISION_PAD_FILE
    from videoxl.engines.profiles import BuildLimits
    from videoxl.runtime import cuda_memory, device as device_module, trt_backend

    made = []

    def make(
        device: FakeCudart, *, layers: int | None = None, layers_per_engine: int | None = None, decode_on_prefill: bool = False,
        host_inputs: dict[str, list[str]] | None = None, **options,
    ) -> TensorRTBackend:
        """``layers_per_engine``: the LLM graphs as layer-range engines (videoxl.engines.ranges), as `videoxl build` cuts them.
        ``decode_on_prefill``: as `videoxl build --decode-on-prefill` writes it: no decode engine, the prefill_chunk
        profile widened, the vision_pad row beside the engines. ``host_inputs``: per graph, the inputs its engine
        reads on the host (shape tensors)."""
        engines = tmp_path / f"engines{len(made)}"
        engines.mkdir()
        config = VideoXLConfig.load(tiny_onnx / "config.json")
        if layers is not None:
            config = dataclasses.replace(config, num_hidden_layers=layers)
        config.save(engines / "config.json")
        entries = {}
        for graph in GRAPHS:
            spec = {"graph": graph, "onnx": str(tiny_onnx / f"{graph}.onnx"), "config": str(engines / "config.json"),
                    "decode_on_prefill": decode_on_prefill, "host_inputs": host_inputs or {}}
            (engines / f"{graph}.engine").write_text(json.dumps(spec))
            entries[graph] = {"file": f"{graph}.engine"}
        if layers_per_engine is not None:
            entries |= _range_engines(tiny_onnx, engines, config, layers_per_engine, decode_on_prefill)
        pad = json.loads((tiny_onnx / "export_manifest.json").read_text())["special_tokens"]["vision_pad"]
        np.save(engines / VISION_PAD_FILE, embedding_row(tiny_onnx / "prefill_chunk.onnx", pad))
        manifest = {
            "precision": "fp32", "limits": BuildLimits(**FAKE_LIMITS).to_dict(), "plugins": {"used": False},
            "engines": entries,
            "model": {"onnx_dir": str(tiny_onnx)},
            "decode_on_prefill": decode_on_prefill,
            "vision_pad": {"token": pad, "file": VISION_PAD_FILE},
        }
        if decode_on_prefill:
            del entries["decode"]
        trt = fake_tensorrt(device, lambda data: onnx_engine(device, data))
        monkeypatch.setattr(device_module, "gpu_problem", lambda: None)
        monkeypatch.setattr(trt_backend, "_checked_manifest", lambda path: (manifest, trt))
        monkeypatch.setattr(cuda_memory, "cudart", lambda: device)
        monkeypatch.setattr(trt_backend, "cudart", lambda: device)
        backend = TensorRTBackend(engines, gpu_memory_budget=256 << 20, **options)
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
    assert list(regions) == ["weights", "activations", "io", "video", "decode"]
    assert all(r.offset % ALIGNMENT == 0 for r in regions.values())
    assert regions["weights"].nbytes >= 5 * 300_000  # five engines' weights, then trimmed
    assert regions["weights"].nbytes < 8 * 300_000
    assert backend.max_frames == 64 and backend.artifact_dir == tiny_onnx
    assert len(cudart.buffers) == 2  # one device arena, one pinned pool


def test_simulated_backend_gives_the_onnxruntime_tokens_and_no_kv_crosses_the_bus(simulated, tiny_onnx, tiny_tokenizer, make_layout):
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    backend, cudart = simulated
    cfg = backend.config
    layout = make_layout(10, "Which colour comes last?")
    rng = np.random.default_rng(11)
    visual = rng.standard_normal((10, cfg.tokens_per_group, cfg.hidden_size)).astype(np.float32)
    gen = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    reference = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)
    ours = Pipeline(backend, tiny_tokenizer)
    for rule in ("evaluation", "streaming"):
        for dense_blocks in (1, (3,)):
            options = InferenceOptions(dense_blocks=dense_blocks, prefill_rule=rule, **GEOMETRY_SIM)
            down = cudart.bytes_to_host
            answer = ours.answer_tokens(layout, visual, options=options, gen=gen)
            expected = reference.answer_tokens(layout, visual, options=options, gen=gen)
            assert answer.token_ids == expected.token_ids
            assert answer.report.dense_blocks == expected.report.dense_blocks
            # what came back: logits per chunk and per decode call, the block scores' mass; never KV rows
            chunks = answer.report.chunks + 1
            calls = chunks + (len(answer.token_ids) + 1)
            assert cudart.bytes_to_host - down <= calls * cfg.vocab_size * 4 + layout.suffix_start * 4

    pixels = rng.uniform(-1, 1, (12, 3, 384, 384)).astype(np.float32)  # 12 frames: batches of the engine's max
    np.testing.assert_allclose(backend.encode_frames(pixels), reference.backend.encode_frames(pixels), rtol=1e-5, atol=1e-5)


def test_simulated_chunks_that_finish_two_blocks_each(simulated, tiny_onnx, tiny_tokenizer, make_layout):
    """A chunk of 2 groups completes two blocks of 1: two pooling gathers back to back, which reuse
    the gather's pinned staging; the answer is still ONNX Runtime's."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    backend, _ = simulated
    layout = make_layout(12, "What moves?")
    visual = np.random.default_rng(12).standard_normal((12, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    options = InferenceOptions(dense_blocks=1, chunk_groups=2, window_chunks=1, block_groups=1)
    gen = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    answer = Pipeline(backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    expected = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert answer.token_ids == expected.token_ids and answer.report.block_scores == pytest.approx(expected.report.block_scores, rel=1e-5)


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


def test_simulated_decode_steps_replay_their_bucket_graph(simulated, tiny_tokenizer, make_layout):
    backend, cudart = simulated
    layout = make_layout(6)
    visual = np.random.default_rng(2).standard_normal((6, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    launches = cudart.graph_launches
    _check_replays_equal_plain_steps(backend, tiny_tokenizer, (layout, visual), GEOMETRY_SIM)
    assert cudart.graph_launches > launches  # the replays really launched captured graphs


def test_simulated_tiers_round_trip_through_the_host(make_simulated, tiny_onnx, tiny_tokenizer, make_layout):
    """A prepared video's tiers as host arrays (the disk cache's path) equal ONNX Runtime's, and load
    back; the compute stream lags 3 ms, so a copy not waited for is still pending when read."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline

    device = FakeCudart(delay_ms=(0.0, 0.3), seed=10)
    backend = make_simulated(device)
    device.set_delay(backend.compute.handle, 3.0)
    layout = make_layout(6)
    visual = np.random.default_rng(4).standard_normal((6, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    options = InferenceOptions(**GEOMETRY_SIM)
    ours = Pipeline(backend, tiny_tokenizer).prefill(layout, visual, options).state()
    theirs = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).prefill(layout, visual, options).state()
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    cache = backend.new_video_cache(dense_rows=layout.suffix_start, sparse_rows=ours["key.0"].shape[0] - layout.suffix_start)
    expected = {name: array.copy() for name, array in ours.items()}
    cache.load(ours)
    for array in ours.values():  # the caller may reuse its arrays once load returns
        array.fill(np.nan)
    for name, array in cache.arrays().items():
        np.testing.assert_array_equal(array, expected[name])


def test_simulated_layer_range_engines_give_the_onnxruntime_tokens(make_simulated, tiny_onnx, tiny_tokenizer, make_layout):
    """The LLM graphs as one engine per layer, chained (runtime/engine_chain.py): the same tokens and
    block choice as ONNX Runtime on the whole graphs; decode steps still replay captured graphs, which
    record every range of the chain."""
    from videoxl.runtime.engine_chain import EngineChain
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    device = FakeCudart(delay_ms=(0.0, 1.0), seed=7)
    backend = make_simulated(device, layers_per_engine=1)
    layers = backend.config.num_hidden_layers
    assert all(isinstance(backend.engines[g], EngineChain) and len(backend.engines[g].parts) == layers
               for g in ("prefill_chunk", "decode"))
    assert not isinstance(backend.engines["score"], EngineChain)  # no weights, nothing to cut
    assert ("decode", "hidden.1") in backend._io and ("prefill_chunk", f"query.{layers - 1}") in backend._io
    assert backend.arena.layout.regions["weights"].nbytes >= (3 + 2 * layers) * 300_000  # every range holds weights
    layout = make_layout(10, "Which colour comes last?")
    visual = np.random.default_rng(11).standard_normal((10, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    options = InferenceOptions(dense_blocks=1, **GEOMETRY_SIM)
    gen = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    decode_parts = [part.engine for part in backend.engines["decode"].parts]
    runs, launches = [e.executions for e in decode_parts], device.graph_launches
    answer = Pipeline(backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    expected = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert answer.token_ids == expected.token_ids
    assert answer.report.dense_blocks == expected.report.dense_blocks
    assert answer.report.block_scores == pytest.approx(expected.report.block_scores, rel=1e-5)
    assert backend._graphs.replays > 0 and device.graph_launches > launches
    steps = [e.executions - r for e, r in zip(decode_parts, runs)]
    assert len(set(steps)) == 1 and steps[0] >= len(answer.token_ids)  # replays ran every range, not just the first


@pytest.mark.parametrize("layers_per_engine", [None, 1], ids=["whole-graphs", "layer-ranges"])
def test_simulated_decode_on_prefill_gives_the_onnxruntime_tokens(make_simulated, tiny_onnx, tiny_tokenizer, make_layout, layers_per_engine):
    """Engines built with --decode-on-prefill: no decode engine (one copy of the LLM weights fewer), every
    decode step a run of the prefill_chunk engine or chain, the one-token steps replayed as CUDA graphs after
    the first of their bucket, and the answers are ONNX Runtime's, token for token, under both prefill rules."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    device = FakeCudart(delay_ms=(0.0, 1.0), seed=5)
    backend = make_simulated(device, decode_on_prefill=True, layers_per_engine=layers_per_engine)
    assert backend.decode_on_prefill and "decode" not in backend.engines
    assert not any(graph == "decode" for graph, _ in backend._io)  # no decode I/O buffers either
    if layers_per_engine is None:  # four engines' weights: vision, prefill_chunk, score, kv_gather
        assert 4 * 300_000 <= backend.arena.layout.regions["weights"].nbytes < 5 * 300_000
    layout = make_layout(10, "Which colour comes last?")
    visual = np.random.default_rng(11).standard_normal((10, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    gen = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    ours, reference = Pipeline(backend, tiny_tokenizer), Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)
    launches = device.graph_launches
    prefill_parts = [getattr(part, "engine", part) for part in getattr(backend.engines["prefill_chunk"], "parts", [backend.engines["prefill_chunk"]])]
    runs = [e.executions for e in prefill_parts]
    for rule in ("evaluation", "streaming"):
        options = InferenceOptions(dense_blocks=1, prefill_rule=rule, **GEOMETRY_SIM)
        answer = ours.answer_tokens(layout, visual, options=options, gen=gen)
        expected = reference.answer_tokens(layout, visual, options=options, gen=gen)
        assert answer.token_ids == expected.token_ids
        assert answer.report.dense_blocks == expected.report.dense_blocks
    assert backend._graphs.replays > 0 and device.graph_launches > launches
    assert all(key[0] == "prefill_chunk" for key in backend._graphs.graphs)  # (graph, tokens, pads, bucket)
    steps = [e.executions - r for e, r in zip(prefill_parts, runs)]
    assert len(set(steps)) == 1  # replays ran every range of the chain, not just the first


def test_simulated_decode_on_prefill_runs_plainly_when_past_len_is_read_on_the_host(make_simulated, tiny_onnx, tiny_tokenizer, make_layout):
    """The plugin-free prefill body makes past_len a shape tensor (read on the host at enqueue): a captured
    graph would bake it, so every step runs plainly, in place, and the tokens are still ONNX Runtime's."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    device = FakeCudart(delay_ms=(0.0, 1.0), seed=8)
    backend = make_simulated(device, decode_on_prefill=True, host_inputs={"prefill_chunk": ["past_len"]})
    assert backend.engines["prefill_chunk"].host_inputs == {"past_len"} and not backend._prefill_steps_replay
    layout = make_layout(10, "Which colour comes last?")
    visual = np.random.default_rng(11).standard_normal((10, backend.config.tokens_per_group, backend.config.hidden_size)).astype(np.float32)
    options, gen = InferenceOptions(dense_blocks=1, **GEOMETRY_SIM), GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    answer = Pipeline(backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    expected = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert answer.token_ids == expected.token_ids
    assert backend._graphs.replays == 0 and not backend._graphs.graphs and device.graph_launches == 0


def test_simulated_decode_on_prefill_splices_the_vision_pad_row(make_simulated, tiny_onnx, tiny_tokenizer):
    """Steps that feed back a generated <|vision_pad|> (alone and twice among other tokens) get its own
    embedding as their visual row: the logits equal the separate decode graph's in ONNX Runtime."""
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.text import SpecialTokens

    pad = SpecialTokens.from_tokenizer(tiny_tokenizer).vision_pad
    backend = make_simulated(FakeCudart(delay_ms=(0.0, 1.0), seed=6), decode_on_prefill=True)
    reference = OnnxRuntimeBackend(tiny_onnx, share_llm_session=False)  # the decode graph itself
    ours, theirs = backend.new_decode_cache(32), reference.new_decode_cache(32)
    for ids in ([5, 17, 42, 99, 7, 64, 120, 33], [pad], [7], [pad, 3, pad], [pad], [8], [pad]):  # one-token steps replay
        got = backend.decode(ours, np.array(ids, np.int64))
        want = reference.decode(theirs, np.array(ids, np.int64))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), ids
    assert ours.length == theirs.length == 16
    assert backend._graphs.replays == 3  # the second [pad], [8] and the third [pad]: their graphs exist by then
    for key in (("prefill_chunk", 1, 1, 256), ("prefill_chunk", 1, 0, 256)):
        assert key in backend._graphs.graphs
    with pytest.raises(RuntimeError, match="decode cache full"):
        backend.decode(ours, np.arange(20, dtype=np.int64))


def test_simulated_requests_beyond_the_regions_fail_with_the_bytes_missing(simulated):
    backend, _ = simulated
    with pytest.raises(ValueError, match="'decode' arena region"):
        backend.new_decode_cache(backend._kv["decode"].capacity + 1)
    with pytest.raises(ValueError, match="'video' arena region"):
        backend.new_video_cache(dense_rows=backend._kv["video"].capacity, sparse_rows=1)
    with pytest.raises(Exception, match="built for at most 64"):
        backend.check_frames(68)


def test_simulated_an_older_cache_handle_is_refused(simulated):
    backend, _ = simulated
    first = backend.new_decode_cache(16)
    backend.new_decode_cache(16)
    with pytest.raises(RuntimeError, match="holds a newer one"):
        backend.decode(first, np.array([1], np.int64))
    video = backend.new_video_cache(dense_rows=40, sparse_rows=10)
    assert video.live  # what the prepared-video cache asks before it hands out a kept video
    backend.new_video_cache(dense_rows=40, sparse_rows=10)
    assert not video.live


# --- close() after CUDA errors ----------------------------------------------------------------------------
def _capture_a_decode_graph(backend) -> None:
    """A decode step captures its bucket's graph, so close() has one to destroy."""
    cache = backend.new_decode_cache(8)
    backend.decode(cache, np.array([65], np.int64))
    assert len(backend._graphs.graphs) == 1


def test_simulated_close_after_a_sticky_error_tries_every_release_once(make_simulated, caplog):
    device = FakeCudart(delay_ms=(0.0, 0.3), seed=5)
    backend = make_simulated(device)
    _capture_a_decode_graph(backend)
    device.inject_sticky_error()
    before = len(device.history)
    with caplog.at_level("WARNING", logger="videoxl.runtime.trt_backend"):
        backend.close()  # must not raise
    assert device.unreleased() == []  # arena, pinned pool, the stream, the graph: all tried
    assert sorted(name for name, _ in device.release_attempts) == sorted(
        ["cudaFree", "cudaFreeHost", "cudaGraphExecDestroy", "cudaStreamDestroy"]
    )
    closing = device.history[before:]
    assert closing[:1] == ["cudaStreamSynchronize"]  # waited for (tried to) the stream before freeing anything
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == len(set(failures)) == 1 + 4  # the wait, four releases: each logged once
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
    assert device.live_resources()["streams"] == 0
    assert device.cudaFreeHost(pinned) == (0,)  # freed here, so the fixture finds nothing left


# --- the dense tier in pinned host memory (--dense-tier host) ---------------------------------------------
# 16 groups in chunks of 2 with a window of 1: the device keeps the prefix, every timestamp row and
# 4 chunks (window + chunk, and as much slack), fewer rows than the dense tier, so the resident rows
# are compacted on the way; questions stage the blocks that left the device.
STREAMING = dict(prefill_rule="streaming", chunk_groups=2, window_chunks=1, block_groups=2)
OFFLOAD_GROUPS = 16


def _offload_case(make_layout, cfg, seed: int = 21):
    layout = make_layout(OFFLOAD_GROUPS, "")
    visual = np.random.default_rng(seed).standard_normal((OFFLOAD_GROUPS, cfg.tokens_per_group, cfg.hidden_size)).astype(np.float32)
    return layout, visual


def _prepared(pipeline, layout, visual, options):
    """A video prefilled once (an empty question), ready for `ask`."""
    from videoxl.runtime.pipeline import PreparedVideo, RunReport

    store = pipeline.prefill(layout, visual, options)
    return PreparedVideo(np.arange(4.0 * layout.num_groups), layout, store, options, RunReport())


def _resident_after_prefill(layout, options) -> set[int]:
    """What the device still holds after the last chunk: what it read (prefix, timestamps, window) and itself."""
    from videoxl.layout import chunk_visibility, num_chunks

    last = num_chunks(layout, options.chunk_groups) - 1
    vis = chunk_visibility(layout, last, chunk_groups=options.chunk_groups, window_chunks=options.window_chunks, rule="streaming")
    return set(vis.visible_past_index.tolist()) | set(range(vis.start, vis.end))


def test_simulated_dense_tier_in_host_memory_gives_the_onnxruntime_tokens(make_simulated, tiny_onnx, tiny_tokenizer, make_layout):
    """Several chunks, a window, several blocks, follow-up questions choosing different blocks (top-k,
    explicit, all: more than the staging area holds, so several passes): ONNX Runtime's tokens. Across
    the bus: each chunk's rows out once, and back only the chosen rows the device no longer holds."""
    from videoxl.layout import block_ranges
    from videoxl.runtime.memory_plan import kv_rows_for
    from videoxl.runtime.cuda_memory import KVSlabs
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig

    device = FakeCudart(delay_ms=(0.0, 2.0), seed=3)
    backend = make_simulated(device, dense_tier="host", plan_dense_blocks=0)
    cfg, rows = backend.config, backend._rows
    assert backend.dense_on_host and len(device.buffers) == 3  # the arena, the pinned staging, the pinned dense tier
    on_device = kv_rows_for(cfg, backend.limits, 64, dense_blocks=0)
    row_bytes = backend._row_bytes
    assert backend.arena.layout.regions["video"].nbytes < KVSlabs.nbytes(cfg.num_hidden_layers, on_device.video, row_bytes)

    layout, visual = _offload_case(make_layout, cfg)
    assert rows.resident < layout.suffix_start  # the resident rows must be compacted on the way
    options = InferenceOptions(dense_blocks=1, **STREAMING)
    gen = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    ours, reference = Pipeline(backend, tiny_tokenizer), Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)
    prepared, reference_prepared = _prepared(ours, layout, visual, options), _prepared(reference, layout, visual, options)
    pool = backend.dense_tier_pool.ptr
    row_set_bytes = 2 * cfg.num_hidden_layers * row_bytes  # one position, K and V of every layer
    resident, blocks = _resident_after_prefill(layout, options), block_ranges(layout, options.block_groups)
    staged, chosen_sets = 0, []
    for question, dense_blocks in (("Which colour comes last?", 1), ("What moves?", (3,)), ("What moves?", (5, 6)),
                                   ("What is shown?", "all"), ("Which colour comes last?", 1)):
        for p in (prepared, reference_prepared):
            p.options = dataclasses.replace(options, dense_blocks=dense_blocks)
        answer, expected = ours.ask(prepared, question, gen=gen), reference.ask(reference_prepared, question, gen=gen)
        assert answer.token_ids == expected.token_ids, (question, dense_blocks)
        assert answer.report.dense_blocks == expected.report.dense_blocks
        chosen = {p for b in answer.report.dense_blocks for p in range(*blocks[b])}
        chosen_sets.append(frozenset(answer.report.dense_blocks))
        staged += len(chosen - resident)
    assert len(set(chosen_sets)) >= 4  # the questions chose different blocks
    backend.copy.synchronize()
    assert device.bytes_with(pool) == {"to_host": layout.suffix_start * row_set_bytes, "to_device": staged * row_set_bytes}


def test_simulated_dense_tier_in_host_memory_refuses_the_evaluation_rule(make_simulated, tiny_tokenizer, make_layout):
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline

    backend = make_simulated(FakeCudart(delay_ms=(0.0, 0.3), seed=4), dense_tier="host", plan_dense_blocks=0)
    layout, visual = _offload_case(make_layout, backend.config)
    options = InferenceOptions(**{**STREAMING, "prefill_rule": "evaluation"})
    with pytest.raises(ValueError) as err:
        Pipeline(backend, tiny_tokenizer).prefill(layout, visual, options)
    message = str(err.value)
    assert "\n" not in message and "--prefill-rule streaming" in message and "pinned host memory" in message
    assert f"--max-frames {backend.device_max_frames}" in message  # what fits with the dense tier on the device
    assert backend.engines["prefill_chunk"].engine.executions == 0  # refused before any work


@pytest.mark.parametrize(("slow", "lag_ms"), [("compute", 3.0), ("copy", 50.0)])
def test_simulated_dense_tier_survives_a_slow_stream(make_simulated, tiny_onnx, tiny_tokenizer, make_layout, slow, lag_ms):
    """One stream lags (the copy stream longer than a chunk's compute, so that copies pile up). The
    tiers read back right after the prefill are ONNX Runtime's (copies out waited for their chunk,
    compaction for the copies out, the download for the host tier); a decode cache with every block
    dense, staged in several passes, gives ONNX Runtime's logits (each pass waited for its uploads, the
    next pass for the previous one); a state loaded while another video is still being copied out is
    the state loaded (a new video waits for the previous one's copies; the upload for its sources)."""
    from videoxl.runtime.kv_store import TwoTierKVStore
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline

    device = FakeCudart(delay_ms=(0.0, 0.3), seed=7)
    backend = make_simulated(device, dense_tier="host", plan_dense_blocks=0)
    device.set_delay(getattr(backend, slow).handle, lag_ms)
    cfg = backend.config
    layout, visual = _offload_case(make_layout, cfg)
    options = InferenceOptions(**STREAMING)
    ours, reference = Pipeline(backend, tiny_tokenizer), Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)
    store = ours.prefill(layout, visual, options)
    got = store.state()  # at once: the last copies out may still be running
    expected_store = reference.prefill(layout, visual, options)
    expected = expected_store.state()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)

    question = make_layout(OFFLOAD_GROUPS, "What moves?")
    suffix = question.input_ids[question.suffix_start :]
    every_block = set(range(len(store.blocks)))
    cache, _ = store.build_decode_cache(every_block, extra_capacity=len(suffix))
    reference_cache, _ = expected_store.build_decode_cache(every_block, extra_capacity=len(suffix))
    np.testing.assert_allclose(backend.decode(cache, suffix), reference.backend.decode(reference_cache, suffix), rtol=1e-4, atol=1e-5)

    # another video is still on its way out when a saved state is loaded into the tiers
    ours.prefill(layout, visual[::-1].copy(), options)
    state = {name: array.copy() for name, array in expected.items()}
    loaded = TwoTierKVStore.from_state(backend, cfg, layout, block_groups=options.block_groups, state=state)
    for array in state.values():  # the caller may reuse its arrays once load returns
        array.fill(np.nan)
    for name, array in loaded.state().items():
        np.testing.assert_array_equal(array, expected[name].astype(array.dtype), err_msg=name)
