"""The PyTorch backend (`--backend torch`): plain torch, our kernels, decode steps that replay.

* CPU, plain torch: decode steps recorded by a stand-in graph (it keeps the step's callable
  and calls it again on replay, with whatever its static buffers hold) give the tokens of plain
  steps, and replay on every step after the first of each capacity bucket.
* CPU, kernels: the same kernels built for the host emulation (`tests/plugins/conftest.py`
  explains it): the SIMT kernel in fp32 gives ONNX Runtime's tokens through the runtime loop;
  the tensor-core (mma) kernel in fp16 gives the plain path's logits; block scoring equals the
  score graph's mass. Kept small: emulated launches take seconds.
* GPU (`gpu` marker): ONNX Runtime's tokens with the real kernels, real CUDA graph replays, and
  no device allocation on a replayed step over 100 decode steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from videoxl.backend import GatherPlan
from videoxl.config import VideoXLConfig
from videoxl.export import torch_backend
from videoxl.export.model import VideoXLModel
from videoxl.export.reference import ReferenceInference
from videoxl.export.torch_backend import TorchBackend
from videoxl.layout import ChunkVisibility
from videoxl.plugins import build, kernels
from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.sampling import GenerationConfig
from videoxl.text import SpecialTokens
from videoxl.tiny import tiny_tokenizer

EMULATION_INCLUDE = Path(__file__).resolve().parents[1] / "plugins" / "cuda_host" / "include"
NO_GPU = "needs an NVIDIA GPU with torch.cuda (none visible)"
GEOMETRY = dict(chunk_groups=2, window_chunks=1, block_groups=2)


class RecordedGraph:
    """CPU stand-in for torch.cuda.CUDAGraph: replay calls the captured step again.

    Like a real graph it can only see what the step reads from its buffers when it runs, so a
    step that forgot to refresh a buffer (the valid length, the ids) replays stale values here too.
    """

    def capture(self, run):
        self.run = run
        self.output = run()
        return self.output

    def replay(self) -> None:
        self.output.copy_(self.run())  # a graph rewrites the output buffer it captured


def expected_bucket(rows: int, capacity: int, granule: int) -> int:
    """Written out independently of `capacity_bucket`: granule * 2^k >= rows, at most the capacity."""
    return min(capacity, granule * 2 ** max(0, math.ceil(math.log2(rows / granule))))


@pytest.fixture(scope="module")
def case(tiny_model, make_layout):
    layout = make_layout(10, "Which colour comes last?")
    visual = torch.randn(10, tiny_model.cfg.tokens_per_group, tiny_model.cfg.hidden_size, generator=torch.Generator().manual_seed(11))
    return layout, visual.numpy()


def record_steps(backend: TorchBackend) -> list[tuple[int, int, int]]:
    """(length before, new tokens, capacity) of every decode call on `backend`."""
    steps: list[tuple[int, int, int]] = []
    decode = backend.decode

    def recorded(cache, ids):
        steps.append((cache.length, len(ids), cache.capacity))
        return decode(cache, ids)

    backend.decode = recorded
    return steps


def test_decode_graphs_replay_after_the_first_step_of_each_bucket(tiny_checkpoint, tiny_model, tiny_tokenizer, case, monkeypatch):
    layout, visual = case
    gen = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    options = InferenceOptions(dense_blocks=1, **GEOMETRY)
    plain_backend = TorchBackend(tiny_checkpoint, model=tiny_model)
    plain_steps = record_steps(plain_backend)
    plain = Pipeline(plain_backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert plain_backend.decode_counts["replayed"] == 0
    stop = SpecialTokens.from_tokenizer(tiny_tokenizer).stop_ids
    reference, _, _, _ = ReferenceInference(tiny_model).generate(
        layout, torch.from_numpy(visual), gen, stop_ids=stop, prefill="chunked", decode="bilevel", dense_blocks=1, **GEOMETRY)
    assert plain.token_ids == reference  # the step code itself, before any graph

    # a bucket boundary 8 steps into the answer: buckets `granule` and the cache's capacity
    granule = plain_steps[0][0] + plain_steps[0][1] + 8
    monkeypatch.setattr(torch_backend, "DECODE_BUCKET_ROWS", granule)
    backend = TorchBackend(tiny_checkpoint, model=tiny_model)
    backend.graph_factory = RecordedGraph
    steps = record_steps(backend)
    answer = Pipeline(backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert answer.token_ids == plain.token_ids

    single = [expected_bucket(length + t, capacity, granule) for length, t, capacity in steps if t == 1]
    assert len(single) == 23 and len(set(single)) == 2, single
    assert backend.decode_counts == {
        "plain": 1 + 2,  # the question's tokens, then the first step of each bucket
        "captured": 2,
        "replayed": 23 - 2,
    }


def test_decode_refuses_a_full_cache(tiny_checkpoint, tiny_model):
    backend = TorchBackend(tiny_checkpoint, model=tiny_model)
    cache = backend.new_decode_cache(4)
    backend.decode(cache, np.array([5, 6, 7], np.int64))
    with pytest.raises(RuntimeError, match="decode cache full: 3 \\+ 2 > capacity 4"):
        backend.decode(cache, np.array([8, 9], np.int64))


# --- kernels in the host emulation -------------------------------------------------------------
@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory: pytest.TempPathFactory):
    """Launch through the kernels built for the host (CPU tensors) for this module's tests."""
    library = build.build_host_emulation(EMULATION_INCLUDE, tmp_path_factory.mktemp("emulated"))
    kernels.use_library(library, host_memory=True)
    yield kernels
    kernels.use_library(None)


def test_kernels_off_unless_asked_on_the_cpu(tiny_checkpoint, tiny_model):
    assert TorchBackend(tiny_checkpoint, model=tiny_model).kernels is None
    assert TorchBackend(tiny_checkpoint, model=tiny_model, kernels=False).kernels is None


@pytest.mark.slow
def test_emulated_simt_kernels_give_onnxruntime_tokens(tiny_checkpoint, tiny_model, tiny_tokenizer, tiny_onnx, make_layout, emulated_kernels):
    # 3 groups, one block each: blocks 0 (prefix), 1, 2, 3; block 2 stays sparse, so the decode
    # cache is built from dense and pooled rows by the gather kernel; explicit blocks skip scoring
    # (its kernel has its own test: every emulated launch costs seconds).
    layout = make_layout(3, "Last?")
    visual = np.random.default_rng(3).standard_normal((3, tiny_model.cfg.tokens_per_group, tiny_model.cfg.hidden_size)).astype(np.float32)
    options = InferenceOptions(dense_blocks=(1,), chunk_groups=1, window_chunks=1, block_groups=1)
    gen = GenerationConfig(max_new_tokens=3, stop_at_eos=False)
    backend = TorchBackend(tiny_checkpoint, model=tiny_model, kernels=True, attention_kernel="simt")
    ours = Pipeline(backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    reference = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert ours.report.dense_blocks == reference.report.dense_blocks == [0, 1, 3]
    assert ours.token_ids == reference.token_ids


def test_emulated_block_scores_equal_the_score_graph_mass(tiny_checkpoint, tiny_model, emulated_kernels, monkeypatch):
    """Per-row mass from the block-score kernel (one causal launch per layer) vs plain torch."""
    launches = []

    def counted(*args, **kwargs):
        launches.append(kwargs.get("causal_tail"))
        return block_scores_torch(*args, **kwargs)

    block_scores_torch = kernels.block_scores_torch
    monkeypatch.setattr(kernels, "block_scores_torch", counted)
    plain = TorchBackend(tiny_checkpoint, model=tiny_model)
    video = plain.new_video_cache(dense_rows=20, sparse_rows=0)
    ids = np.arange(40, 60, dtype=np.int64)
    plain.prefill_chunk(video, ids, np.zeros((0, tiny_model.cfg.hidden_size), np.float32), _causal(0, 20))
    decode = plain.new_decode_cache(20)
    plain.gather(video, _copy_plan(20), into=decode)
    question = np.array([70, 71, 72], np.int64)
    expected = plain.score(decode, question)
    got = TorchBackend(tiny_checkpoint, model=tiny_model, kernels=True).score(decode, question)
    assert launches == [len(question)] * tiny_model.cfg.num_hidden_layers  # the question's keys as the causal tail
    # float32 softmax and atomics in the kernel vs float64 sums: ~1e-7 relative per row
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert abs(expected.sum() - 3 * 2 * 4) > 1e-3  # the question's own keys take part of the mass


def _causal(start: int, end: int, **kw) -> ChunkVisibility:
    return ChunkVisibility(start=start, end=end, prefix_len=kw.get("prefix_len", 0), window_start=kw.get("window_start", 0),
                           past_timestamp_index=np.asarray(kw.get("past_ts", []), np.int64),
                           query_is_timestamp=np.asarray(kw.get("ts", np.zeros(end - start, bool))))


def _copy_plan(rows: int) -> GatherPlan:
    return GatherPlan(np.arange(rows, dtype=np.int64)[:, None], np.ones((rows, 1), np.float32), np.arange(rows, dtype=np.int64), 0)


def small_head_dim_64_model(dtype: torch.dtype) -> VideoXLModel:
    """One LLM layer with head_dim 64 (the tensor-core kernel's smallest), 2:1 GQA; vision unused."""
    cfg = VideoXLConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        vocab_size=320, vision_hidden_size=64, vision_intermediate_size=64, vision_num_heads=2, vision_num_layers=2)
    torch.manual_seed(0)
    return VideoXLModel(cfg).to(dtype).eval()


@pytest.mark.parametrize("variant", ["mma", "simt"])
def test_emulated_kernels_in_fp16_follow_the_plain_path(variant, emulated_kernels):
    """A prefill chunk with a sparse past and a timestamp query, a pooled decode cache, decode steps."""
    model = small_head_dim_64_model(torch.float16)
    tokenizer = tiny_tokenizer()
    logits = {}
    for name, use in (("plain", False), ("kernel", True)):
        backend = TorchBackend(model=model, tokenizer=tokenizer, kernels=use, attention_kernel=variant)
        video = backend.new_video_cache(dense_rows=40, sparse_rows=4)
        ids = np.arange(60, 100, dtype=np.int64)
        no_visual = np.zeros((0, 128), np.float32)
        out = [backend.prefill_chunk(video, ids[:24], no_visual, _causal(0, 24))]
        ts = np.zeros(16, bool)
        ts[[0, 9]] = True  # these two see every past row; the others rows 0..5 and the window 16..23
        out.append(backend.prefill_chunk(video, ids[24:], no_visual, _causal(24, 40, prefix_len=6, window_start=16, ts=ts)))
        pool = GatherPlan(4 + np.arange(6, 22, dtype=np.int64).reshape(4, 4), np.full((4, 4), 0.25, np.float32), np.zeros(4, np.int64), 0)
        backend.gather(video, pool)  # rows 6..21 pooled x4 into the sparse tier
        decode = backend.new_decode_cache(40)
        keep = np.concatenate([4 + np.arange(6), np.arange(4), 4 + np.arange(22, 40)])  # prefix, pooled, last rows
        backend.gather(video, GatherPlan(keep[:, None], np.ones((len(keep), 1), np.float32), np.arange(len(keep)), 0), into=decode)
        out.append(backend.decode(decode, np.array([7, 8, 9], np.int64)))
        for token in (11, 12, 13):
            out.append(backend.decode(decode, np.array([token], np.int64)))
        logits[name] = np.concatenate(out)
    # fp16 inputs: both paths softmax in fp32 but round q/k/v/outputs to fp16 (eps 2^-11) at
    # different points; through one layer and the head, logits of O(1) agree to ~1e-2
    np.testing.assert_allclose(logits["kernel"], logits["plain"], atol=2e-2, rtol=2e-2)
    assert (logits["kernel"].argmax(-1) == logits["plain"].argmax(-1)).all()


# --- GPU -------------------------------------------------------------------------------------------
def _need_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    kernels.use_library(None)  # the real library (built for this GPU on first use)


@pytest.mark.gpu
def test_gpu_kernels_give_onnxruntime_tokens(tiny_checkpoint, tiny_tokenizer, tiny_onnx, case):
    _need_gpu()
    layout, visual = case
    options = InferenceOptions(dense_blocks=1, **GEOMETRY)
    gen = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    backend = TorchBackend(tiny_checkpoint, device="cuda", kernels=True)
    ours = Pipeline(backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    reference = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen)
    assert ours.report.dense_blocks == reference.report.dense_blocks
    assert ours.token_ids == reference.token_ids
    assert backend.decode_counts["replayed"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "plain"])
def test_gpu_graphs_replay_with_flat_memory(tiny_checkpoint, tiny_tokenizer, case, monkeypatch, use_kernels):
    _need_gpu()
    granule = 64
    monkeypatch.setattr(torch_backend, "DECODE_BUCKET_ROWS", granule)
    layout, visual = case
    options = InferenceOptions(dense_blocks=1, **GEOMETRY)
    gen = GenerationConfig(max_new_tokens=100, stop_at_eos=False)
    eager = TorchBackend(tiny_checkpoint, device="cuda", kernels=use_kernels, cuda_graphs=False)
    expected = Pipeline(eager, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen).token_ids

    backend = TorchBackend(tiny_checkpoint, device="cuda", kernels=use_kernels)
    steps = record_steps(backend)
    memory: list[tuple[int, int]] = []
    decode = backend.decode

    def measured(cache, ids):
        before = torch.cuda.memory_allocated()
        logits = decode(cache, ids)
        memory.append((before, torch.cuda.memory_allocated()))
        return logits

    backend.decode = measured
    tokens = Pipeline(backend, tiny_tokenizer).answer_tokens(layout, visual, options=options, gen=gen).token_ids
    assert tokens == expected
    buckets = [expected_bucket(length + t, capacity, granule) if t == 1 else None for length, t, capacity in steps]
    single = [b for b in buckets if b is not None]
    assert len(single) == 99
    assert backend.decode_counts["replayed"] == len(single) - len(set(single))
    seen: set[int] = set()
    for bucket, (before, after) in zip(buckets, memory):
        if bucket in seen:  # a replayed step allocates nothing
            assert after == before, (bucket, before, after)
        if bucket is not None:
            seen.add(bucket)
