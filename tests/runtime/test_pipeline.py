"""The runtime loop on ONNX Runtime vs the PyTorch reference: same tokens, same block choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from videoxl.export.reference import ReferenceInference
from videoxl.export.torch_backend import TorchBackend
from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.sampling import GenerationConfig
from videoxl.text import SpecialTokens
from videoxl.video import open_video

STEPS = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
GEOMETRY = dict(chunk_groups=2, window_chunks=1, block_groups=2)


@pytest.fixture(scope="module")
def ort_pipeline(tiny_onnx, tiny_tokenizer):
    return Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer)


@pytest.fixture(scope="module")
def case(tiny_model, make_layout):
    layout = make_layout(10, "Which colour comes last?")
    visual = torch.randn(10, tiny_model.cfg.tokens_per_group, tiny_model.cfg.hidden_size, generator=torch.Generator().manual_seed(11))
    return layout, visual


MODES = [
    ("dense", "dense", "all", "evaluation"),
    ("chunked", "dense", "all", "evaluation"),
    ("chunked", "bilevel", 1, "evaluation"),  # task-aware top-1
    ("chunked", "bilevel", (3,), "evaluation"),  # explicit
    ("dense", "bilevel", 2, "evaluation"),
    ("chunked", "bilevel", 1, "streaming"),  # timestamp tokens see only their chunk's window
]


@pytest.mark.parametrize("prefill,decode,dense_blocks,rule", MODES)
def test_onnxruntime_tokens_equal_reference(tiny_model, tiny_tokenizer, ort_pipeline, case, prefill, decode, dense_blocks, rule):
    layout, visual = case
    stop = SpecialTokens.from_tokenizer(tiny_tokenizer).stop_ids
    tokens, chosen, scores, _ = ReferenceInference(tiny_model).generate(
        layout, visual, STEPS, stop_ids=stop, prefill=prefill, decode=decode,
        dense_blocks=list(dense_blocks) if isinstance(dense_blocks, tuple) else dense_blocks, rule=rule, **GEOMETRY,
    )
    options = InferenceOptions(prefill=prefill, decode=decode, dense_blocks=dense_blocks, prefill_rule=rule, **GEOMETRY)
    answer = ort_pipeline.answer_tokens(layout, visual.numpy(), options=options, gen=STEPS)
    assert len(answer.token_ids) == 16
    assert answer.token_ids == tokens
    assert answer.report.dense_blocks == sorted(chosen)
    if scores is not None:
        np.testing.assert_allclose(answer.report.block_scores, scores, rtol=1e-4)
    if decode == "bilevel" and dense_blocks != "all":
        assert answer.report.mixed_kv_bytes < answer.report.dense_kv_bytes


def test_modes_really_differ(ort_pipeline, case):
    """Guard against a vacuous comparison: sparse prefill and bi-level decoding change the logits."""
    layout, visual = case
    backend = ort_pipeline.backend
    logits = []
    for options in (InferenceOptions(prefill="dense", decode="dense", **GEOMETRY), InferenceOptions(prefill="chunked", decode="bilevel", dense_blocks=1, **GEOMETRY)):
        store = ort_pipeline.prefill(layout, visual.numpy(), options)
        chosen, _ = ort_pipeline.choose_dense_blocks(store, layout, options)
        cache, _ = store.build_decode_cache(chosen, extra_capacity=64)
        logits.append(backend.decode(cache, layout.input_ids[layout.suffix_start :]))
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_torch_backend_through_the_same_loop(tiny_checkpoint, tiny_model, tiny_tokenizer, ort_pipeline, case):
    layout, visual = case
    options = InferenceOptions(dense_blocks=1, **GEOMETRY)
    torch_answer = Pipeline(TorchBackend(tiny_checkpoint, model=tiny_model), tiny_tokenizer).answer_tokens(layout, visual.numpy(), options=options, gen=STEPS)
    ort_answer = ort_pipeline.answer_tokens(layout, visual.numpy(), options=options, gen=STEPS)
    assert torch_answer.token_ids == ort_answer.token_ids
    assert torch_answer.report.dense_blocks == ort_answer.report.dense_blocks


def test_video_end_to_end_streams(tiny_model, tiny_tokenizer, ort_pipeline, synthetic_video):
    cfg = tiny_model.cfg
    video = open_video(synthetic_video, image_size=cfg.image_size, max_frames=40)  # 10 s at 4 fps: 40 frames
    pieces: list[str] = []
    options = InferenceOptions(dense_blocks=1, **GEOMETRY)
    gen = GenerationConfig(max_new_tokens=20)
    answer = ort_pipeline.answer(video, "What moves?", options=options, gen=gen, on_text=pieces.append)
    assert answer.report.frames == video.num_frames == 40 and answer.report.groups == 10
    assert "".join(pieces) == answer.text and 0 < len(answer.token_ids) <= 20
    assert answer.report.prefill_s > 0 and answer.report.decode_tokens_per_s > 0

    # the reference on the same frames gives the same tokens
    pixels = np.concatenate([b.pixels for b in video.iter_batches(40)])
    with torch.no_grad():
        visual = tiny_model.encode_frames(torch.from_numpy(pixels))
    layout = ort_pipeline.layout("What moves?", video.plan.timestamps)
    tokens, chosen, _, _ = ReferenceInference(tiny_model).generate(
        layout, visual, gen, stop_ids=ort_pipeline.special.stop_ids, dense_blocks=1, **GEOMETRY
    )
    assert answer.token_ids == tokens and answer.report.dense_blocks == sorted(chosen)


def test_sampling_is_seeded(ort_pipeline, case):
    layout, visual = case
    options = InferenceOptions(decode="dense", **GEOMETRY)
    sample = lambda seed: ort_pipeline.answer_tokens(  # noqa: E731
        layout, visual.numpy(), options=options, gen=GenerationConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=seed, stop_at_eos=False)
    ).token_ids
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_follow_up_questions_reuse_the_prefill(tiny_onnx, tiny_tokenizer, synthetic_video, monkeypatch):
    """prepare once, ask many: no vision or prefill per question, answers as from a fresh run."""
    backend = OnnxRuntimeBackend(tiny_onnx)
    pipeline = Pipeline(backend, tiny_tokenizer)
    video = open_video(synthetic_video, image_size=backend.config.image_size, max_frames=40)
    options = InferenceOptions(dense_blocks=1, **GEOMETRY)
    gen = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    questions = ["What moves?", "Which colour comes last?"]
    fresh = {q: pipeline.answer(video, q, options=options, gen=gen) for q in questions}
    assert fresh[questions[0]].report.block_scores != fresh[questions[1]].report.block_scores  # the question matters

    calls: dict[str, int] = {}
    for name in ("encode_frames", "prefill_chunk"):
        def counted(*args, _name=name, _original=getattr(backend, name)):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args)
        monkeypatch.setattr(backend, name, counted)
    prepared = pipeline.prepare(video, options=options)
    after_prepare = dict(calls)
    answers = [pipeline.ask(prepared, q, gen=gen) for q in (*questions, questions[0])]

    assert after_prepare["encode_frames"] > 0 and after_prepare["prefill_chunk"] > 0
    assert calls == after_prepare, "a question re-ran vision or prefill"
    for answer, question in zip(answers, (*questions, questions[0])):
        assert answer.token_ids == fresh[question].token_ids
        assert answer.report.dense_blocks == fresh[question].report.dense_blocks
        np.testing.assert_allclose(answer.report.block_scores, fresh[question].report.block_scores, rtol=1e-6)
    assert [a.report.reused_prefill for a in answers] == [False, True, True]
    for answer in answers:  # latency from the question: block choice, then the question's decode pass
        assert answer.report.select_s < answer.report.first_token_s <= answer.report.select_s + answer.report.decode_s
        assert f"first token       {answer.report.first_token_s:.3f} s after the question" in answer.report.lines()


def test_chunks_are_prefilled_while_later_frames_are_still_read(tiny_onnx, tiny_tokenizer, synthetic_video, monkeypatch):
    """prepare interleaves: chunk k runs as soon as its groups are encoded, before the last frames are
    read; what is left after the last frame is one chunk's work, not the video's."""
    backend = OnnxRuntimeBackend(tiny_onnx)
    pipeline = Pipeline(backend, tiny_tokenizer)
    video = open_video(synthetic_video, image_size=backend.config.image_size, max_frames=40)
    events: list[str] = []
    batches, prefill = video.iter_batches, backend.prefill_chunk

    def logged_batches(size):
        for batch in batches(size):
            events.append("frames")
            yield batch

    def logged_prefill(cache, ids, visual, vis):
        events.append("chunk")
        return prefill(cache, ids, visual, vis)

    monkeypatch.setattr(video, "iter_batches", logged_batches)
    monkeypatch.setattr(backend, "prefill_chunk", logged_prefill)
    options = InferenceOptions(dense_blocks=1, frame_batch=8, **GEOMETRY)  # 2 groups per batch and per chunk
    prepared = pipeline.prepare(video, options=options)
    video_chunks = events.count("chunk") - 1  # the first call is the prefix
    assert video_chunks == prepared.report.chunks == 5 and events.count("frames") == 5
    last_frames = len(events) - 1 - events[::-1].index("frames")
    # the reader runs up to two batches ahead of the encoder (one queued, one being decoded), so at
    # most three chunks (of 5) are left when the last frames have been read; encoding everything
    # first would leave all five and the prefix
    before_last = events[:last_frames].count("chunk") - 1
    assert before_last >= 2 and video_chunks - before_last <= 3
    report = prepared.report
    assert 0 < report.ready_after_last_frame_s < report.vision_s + report.prefill_s
    assert any(line.startswith("video ready") for line in report.lines())
    fresh = Pipeline(OnnxRuntimeBackend(tiny_onnx), tiny_tokenizer).answer(video, "What moves?", options=options)
    assert pipeline.ask(prepared, "What moves?").token_ids == fresh.token_ids
