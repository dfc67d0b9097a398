"""TensorRT backend: one-line failures without a GPU, its bookkeeping, a simulated device, and (GPU) the real thing.

CPU: the BackendUnavailable line (and the CLI printing exactly it), the manifest check folded
into one line, gather widening, the decode-graph policy, and
the whole backend driven by the runtime loop on a simulated device (fake cuda runtime on host
memory, fake engines running the exported graphs in ONNX Runtime): same tokens as ONNX Runtime,
no past re-uploaded, graph replay equal to the plain step.

GPU (marker ``gpu``): the tiny model's engines built for the GPU present; skipped, with the reason,
when there is no GPU or no TensorRT that can build for it (TensorRT for RTX runs on RTX-class GPUs).
"""

from __future__ import annotations

import ctypes
import json
import types

import numpy as np
import pytest

from videoxl.config import VideoXLConfig
from videoxl.runtime.cuda_memory import ALIGNMENT
from videoxl.runtime.device import gpu_problem, gpu_usable
from videoxl.runtime.trt_backend import (
    BackendUnavailable,
    DecodeGraphCache,
    TensorRTBackend,
    _checked_manifest,
    _Mirror,
    fit_gather_width,
    one_line,
)

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
# A fake cuda runtime whose "device" memory is host memory (copies are memmoves, streams run in
# program order, graphs record and replay), and a fake TensorRT whose engines run the exported
# ONNX graphs with ONNX Runtime. Everything between them is the real backend: arena, regions,
# pinned staging, 2-D copies, mirrors, the pipelined gather and the decode graph cache.
FAKE_LIMITS = dict(max_frames=64, chunk_groups=2, window_chunks=1)
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 9: "BOOL"}


def _view(ptr: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class FakeCudart:
    """The cuda.bindings.runtime calls the backend makes, on host memory."""

    cudaStreamNonBlocking, cudaEventDefault, cudaEventDisableTiming = 1, 0, 2
    cudaMemcpyKind = types.SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.capturing: dict[int, list] = {}
        self.bytes_to_device = 0
        self._handles = 100

    def _handle(self) -> tuple[int, int]:
        self._handles += 1
        return 0, self._handles

    def _submit(self, stream: int, op) -> tuple[int]:
        if stream in self.capturing:
            self.capturing[stream].append(op)
        else:
            op()
        return (0,)

    def cudaSetDevice(self, device): return (0,)  # noqa: E301, E704
    def cudaMemGetInfo(self): return 0, 1 << 30, 2 << 30  # noqa: E301, E704

    def cudaMalloc(self, nbytes):
        buffer = np.zeros(nbytes, np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        return 0, buffer.ctypes.data

    cudaMallocHost = cudaMalloc

    def cudaFree(self, ptr):
        self.buffers.pop(ptr)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags): return self._handle()  # noqa: E301, E704
    def cudaEventCreateWithFlags(self, flags): return self._handle()  # noqa: E301, E704
    def cudaStreamDestroy(self, stream): return (0,)  # noqa: E301, E704
    def cudaEventDestroy(self, event): return (0,)  # noqa: E301, E704
    def cudaStreamSynchronize(self, stream): return (0,)  # noqa: E301, E704
    def cudaEventSynchronize(self, event): return (0,)  # noqa: E301, E704
    def cudaEventRecord(self, event, stream): return (0,)  # noqa: E301, E704
    def cudaStreamWaitEvent(self, stream, event, flags): return (0,)  # noqa: E301, E704

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        def op():
            self.bytes_to_device += nbytes if kind == 1 else 0
            ctypes.memmove(dst, src, nbytes)
        return self._submit(stream, op)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        def op():
            for row in range(height):
                ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return self._submit(stream, op)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[stream] = []
        return (0,)

    def cudaStreamEndCapture(self, stream): return 0, self.capturing.pop(stream)  # noqa: E301, E704
    def cudaGraphInstantiate(self, graph, flags): return 0, list(graph)  # noqa: E301, E704
    def cudaGraphDestroy(self, graph): return (0,)  # noqa: E301, E704
    def cudaGraphExecDestroy(self, graph): return (0,)  # noqa: E301, E704

    def cudaGraphLaunch(self, graph, stream):
        for op in graph:
            op()
        return (0,)


class FakeContext:
    def __init__(self, engine) -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_device_memory(self, ptr, nbytes): pass  # noqa: E301, E704
    def is_stream_capturable(self, stream): return True  # noqa: E301, E704

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        return self.engine.output_shape(name, self.shapes)

    def execute_async_v3(self, stream):
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # what a capture bakes in
        self.engine.cudart._submit(stream, lambda: self.engine.run(shapes, addresses))
        return True


class FakeEngine:
    """A 'deserialized engine' that runs one exported ONNX graph with ONNX Runtime."""

    def __init__(self, spec: dict, cudart: FakeCudart) -> None:
        import onnx
        import onnxruntime as ort

        from videoxl.engines.profiles import BuildLimits, dimension_ranges, input_profile

        self.graph, self.cudart, self.cfg = spec["graph"], cudart, VideoXLConfig.load(spec["config"])
        model = onnx.load(spec["onnx"], load_external_data=False)
        initializers = {t.name for t in model.graph.initializer}
        dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
                for vi in model.graph.input if vi.name not in initializers}
        ranges = dimension_ranges(self.cfg, BuildLimits(**FAKE_LIMITS))[self.graph]
        self.profile = input_profile(self.graph, dims, ranges)
        self.types = {vi.name: ONNX_TYPES[vi.type.tensor_type.elem_type] for vi in (*model.graph.input, *model.graph.output)}
        self.inputs = list(dims)
        self.outputs = [vi.name for vi in model.graph.output]
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])

    num_io_tensors = property(lambda self: len(self.inputs) + len(self.outputs))

    def get_tensor_name(self, i): return (self.inputs + self.outputs)[i]  # noqa: E301, E704
    def get_tensor_mode(self, name): return "in" if name in self.inputs else "out"  # noqa: E301, E704
    def get_tensor_dtype(self, name): return types.SimpleNamespace(name=self.types[name])  # noqa: E301, E704
    def get_tensor_profile_shape(self, name, profile): return self.profile[name]  # noqa: E301, E704
    def get_device_memory_size_for_profile_v2(self, profile): return 1 << 20  # noqa: E301, E704
    def create_execution_context(self, strategy): return FakeContext(self)  # noqa: E301, E704

    def output_shape(self, name, shapes):
        cfg = self.cfg
        if self.graph == "vision":
            return (shapes["pixel_values"][0] // 4, cfg.tokens_per_group, cfg.hidden_size)
        if name == "logits":
            return (1, cfg.vocab_size)
        if self.graph == "kv_gather":
            return (shapes["gather_index"][0], cfg.num_key_value_heads, cfg.head_dim)
        new = shapes["input_ids"][0]
        if name == "attention_mass":
            return (shapes["past_key.0"][0] + new,)
        return (new, cfg.num_key_value_heads, cfg.head_dim)

    def run(self, shapes, addresses):
        dtypes = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "BOOL": np.bool_}
        feed = {n: _view(addresses[n], shapes[n], dtypes[self.types[n]]).copy() for n in self.inputs}
        for name, value in zip(self.outputs, self.session.run(None, feed)):
            expected = self.output_shape(name, shapes)
            assert value.shape == expected, (self.graph, name, value.shape, expected)
            _view(addresses[name], value.shape, value.dtype)[...] = value


def fake_trt(cudart: FakeCudart):
    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None:
            pass

    class IGpuAllocator:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger) -> None:
            self.gpu_allocator = None

        def deserialize_cuda_engine(self, data: bytes):
            engine = FakeEngine(json.loads(data), cudart)
            if self.gpu_allocator is not None:  # the weights, from the arena
                assert self.gpu_allocator.allocate_async(300_000, 256, 0, 0) is not None
            return engine

    return types.SimpleNamespace(
        __name__="tensorrt", ILogger=ILogger, IGpuAllocator=IGpuAllocator, Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED=2),
    )


@pytest.fixture
def simulated(tiny_onnx, tmp_path, monkeypatch):
    """TensorRTBackend over fake engines (ONNX Runtime inside) on a fake device (host memory)."""
    import shutil

    from videoxl.engines.profiles import BuildLimits
    from videoxl.runtime import cuda_memory, device, trt_backend

    cudart = FakeCudart()
    trt = fake_trt(cudart)
    engines = tmp_path / "engines"
    engines.mkdir()
    shutil.copy(tiny_onnx / "config.json", engines / "config.json")
    for graph in ("vision", "prefill_chunk", "decode", "kv_gather"):
        spec = {"graph": graph, "onnx": str(tiny_onnx / f"{graph}.onnx"), "config": str(engines / "config.json")}
        (engines / f"{graph}.engine").write_text(json.dumps(spec))
    manifest = {
        "precision": "fp32", "limits": BuildLimits(**FAKE_LIMITS).to_dict(), "plugins": {"used": False},
        "engines": {g: {"file": f"{g}.engine"} for g in ("vision", "prefill_chunk", "decode", "kv_gather")},
        "model": {"onnx_dir": str(tiny_onnx)},
    }
    monkeypatch.setattr(device, "gpu_problem", lambda: None)
    monkeypatch.setattr(trt_backend, "_checked_manifest", lambda path: (manifest, trt))
    monkeypatch.setattr(cuda_memory, "cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "cudart", lambda: cudart)
    backend = TensorRTBackend(engines, gpu_memory_budget=256 << 20)
    yield backend, cudart
    backend.close()
    assert not cudart.buffers  # the arena and the pinned pool were freed


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
