"""The runtime loop: video -> visual tokens -> chunked prefill -> block choice -> bi-level decoding.

    frames (batches of 4k) --vision--> (G, 144, H)
    prompt layout (prefix | Time t s: + 144 slots per group | suffix)
    prefix, then chunk 0..n-1 --prefill_chunk--> dense tier; completed blocks --kv_gather--> sparse tier
    suffix vs. all-sparse cache --score--> attention mass per block -> top-k dense blocks
    chosen blocks dense + the rest sparse --kv_gather--> decode cache; suffix, then one token at a time --decode-->

Pure bookkeeping plus a Backend that owns the KV (`videoxl.backend`): the loop hands it index
plans and gets logits back; the same loop drives ONNX Runtime, PyTorch and TensorRT.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from videoxl.backend import Backend, DecodeCache
from videoxl.graphs import kv_bytes
from videoxl.layout import (
    PREFILL_RULES,
    TokenLayout,
    always_dense_blocks,
    block_ranges,
    chunk_visibility,
    explicit_dense_blocks,
    num_chunks,
    prefix_visibility,
    select_dense_blocks,
)
from videoxl.runtime.kv_store import TwoTierKVStore, check_host_memory
from videoxl.sampling import GenerationConfig, next_token
from videoxl.text import SpecialTokens, StreamDetokenizer, build_prompt, group_start_times
from videoxl.video import VideoSource

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFILL_MODES = ("chunked", "dense")
DECODE_MODES = ("bilevel", "dense")
QUESTION_ROWS = 192  # decode-cache rows planned for a question and its template, before the answer


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Produce `items` on a background thread, `depth` ahead (PyAV and ONNX Runtime release the GIL).

    An exception from the producer is re-raised here, in order; leaving the loop early stops it.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((done, None))
        except BaseException as err:  # handed to the consumer, which re-raises it
            slots.put((done, err))

    worker = threading.Thread(target=produce, name="videoxl-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, err = slots.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)


@dataclass(frozen=True)
class InferenceOptions:
    """How to prefill and decode one video; None fields take the checkpoint config's values.

    prefill: "chunked" (the sparse chunk-based prefill) or "dense" (plain causal, chunk by chunk).
    prefill_rule: who a chunk's timestamp tokens see (`videoxl.layout.PREFILL_RULES`).
    decode: "bilevel" (task-aware KV sparsification) or "dense".
    dense_blocks: top-k blocks chosen by the question (int), an explicit block tuple, or "all".
    """

    prefill: str = "chunked"
    prefill_rule: str = "evaluation"
    decode: str = "bilevel"
    dense_blocks: int | tuple[int, ...] | str = 4  # top-k (task-aware), explicit blocks, or "all"
    chunk_groups: int | None = None  # defaults from the config
    window_chunks: int | None = None
    block_groups: int | None = None
    frame_batch: int = 8  # frames per vision call (a multiple of 4)

    def __post_init__(self) -> None:
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill mode {self.prefill!r} not in {PREFILL_MODES}")
        if self.prefill_rule not in PREFILL_RULES:
            raise ValueError(f"prefill rule {self.prefill_rule!r} not in {PREFILL_RULES}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode mode {self.decode!r} not in {DECODE_MODES}")
        if self.frame_batch < 4 or self.frame_batch % 4:
            raise ValueError(f"frame_batch must be a positive multiple of 4, got {self.frame_batch}")
        for name, least in (("chunk_groups", 1), ("window_chunks", 0), ("block_groups", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if isinstance(self.dense_blocks, int) and self.dense_blocks < 0:
            raise ValueError(f"dense_blocks (top-k) must be >= 0, got {self.dense_blocks}")


@dataclass
class RunReport:
    frames: int = 0
    groups: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    select_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float | None = None  # from the question to its first answer token (block choice, question pass)
    ready_after_last_frame_s: float | None = None  # last frame read -> its vision and the last chunks prefilled
    new_tokens: int = 0
    dense_kv_bytes: int = 0
    mixed_kv_bytes: int = 0
    num_blocks: int = 0
    dense_blocks: list[int] = field(default_factory=list)
    block_scores: list[float] | None = None
    reused_prefill: bool = False  # a follow-up question: vision and prefill were done for an earlier one

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def lines(self) -> list[str]:
        mib = 1 / 2**20
        return [
            f"frames            {self.frames} ({self.groups} groups of 4)",
            f"prompt tokens     {self.prompt_tokens} ({self.chunks} prefill chunks)",
            *(["vision, prefill   reused (done once for this video)"] if self.reused_prefill else [
                f"vision            {self.vision_s:.2f} s",
                f"prefill           {self.prefill_s:.2f} s",
                *([f"video ready       {self.ready_after_last_frame_s:.2f} s after its last frame was read"]
                  if self.ready_after_last_frame_s is not None else []),
            ]),
            f"block selection   {self.select_s:.2f} s: dense blocks {self.dense_blocks} of {self.num_blocks}",
            f"decode            {self.new_tokens} tokens, {self.decode_tokens_per_s:.1f} tokens/s",
            *([f"first token       {self.first_token_s:.3f} s after the question"] if self.first_token_s is not None else []),
            f"KV cache          dense {self.dense_kv_bytes * mib:.2f} MiB, bi-level {self.mixed_kv_bytes * mib:.2f} MiB",
        ]


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    report: RunReport


@dataclass
class PreparedVideo:
    """A video encoded and pre-filled once, ready for any number of questions.

    The question sits in the prompt's suffix, after the video, and the suffix runs through
    decode: the prefill (the expensive part on a long video) never sees the question.
    """

    frame_times: np.ndarray  # (N,) seconds of the sampled frames
    layout: TokenLayout  # prefix | groups, with an empty question
    store: TwoTierKVStore  # dense and sparse tiers; questions read it, never change it
    options: InferenceOptions
    report: RunReport  # frames, groups, prompt tokens, vision and prefill times
    questions_answered: int = 0


class Pipeline:
    """The runtime loop over one backend: `prepare` a video once, `ask` it any number of questions."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, *, progress: bool = False) -> None:
        self.backend, self.tokenizer, self.config = backend, tokenizer, backend.config
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.progress = progress

    # --- vision -----------------------------------------------------------------------------
    def layout(self, question: str, frame_times: np.ndarray) -> TokenLayout:
        group_times = group_start_times(frame_times, self.config.frames_per_group)
        layout, _ = build_prompt(self.tokenizer, question, group_times, tokens_per_group=self.config.tokens_per_group)
        return layout

    # --- prefill ----------------------------------------------------------------------------
    def prefill(
        self, layout: TokenLayout, visual_embeds: np.ndarray | Iterable[np.ndarray], options: InferenceOptions,
        *, report: RunReport | None = None,
    ) -> TwoTierKVStore:
        """Prefix, then chunk by chunk; `visual_embeds` (G, 144, H) or batches of groups as they come.

        Given batches, each chunk runs as soon as its groups have arrived, so the prefill of chunk k
        overlaps the decoding (and, on another device, the encoding) of the frames of chunk k+1.
        `report`, when given, gets the prefill seconds (the chunk calls only).
        """
        cfg = self.config
        chunk_groups = options.chunk_groups or cfg.chunk_groups
        window = cfg.window_chunks if options.window_chunks is None else options.window_chunks
        if options.prefill == "dense":
            # plain causal, still computed chunk by chunk (bounded memory): every earlier chunk is in the window
            window = num_chunks(layout, chunk_groups)
        self.backend.check_prefill(rule=options.prefill_rule, chunk_groups=chunk_groups, window_chunks=window)
        store = TwoTierKVStore(self.backend, cfg, layout, block_groups=options.block_groups or cfg.block_groups)
        pieces = [(prefix_visibility(layout), 0)] + [
            (chunk_visibility(layout, k, chunk_groups=chunk_groups, window_chunks=window, rule=options.prefill_rule),
             min((k + 1) * chunk_groups, layout.num_groups))  # groups that must have arrived
            for k in range(num_chunks(layout, chunk_groups))
        ]
        batches = [visual_embeds] if isinstance(visual_embeds, np.ndarray) else visual_embeds
        pending: list[np.ndarray] = []  # visual rows (tokens, H) arrived and not yet prefilled, in order
        groups = 0
        bar = tqdm(total=len(pieces), desc="prefill", unit="chunk", disable=not self.progress)

        def run_ready() -> None:
            while pieces and pieces[0][1] <= groups:
                vis, _ = pieces.pop(0)
                count = int(layout.is_visual[vis.start : vis.end].sum())
                rows = np.concatenate(pending) if len(pending) > 1 else pending[0] if pending else np.zeros((0, cfg.hidden_size))
                pending[:] = [rows[count:]] if len(rows) > count else []  # only what later chunks still need
                started = time.perf_counter()
                store.prefill_chunk(layout.input_ids[vis.start : vis.end], rows[:count], vis)
                if report is not None:
                    report.prefill_s += time.perf_counter() - started
                bar.update()

        run_ready()  # the prefix needs no frame
        for batch in batches:
            pending.append(batch.reshape(-1, batch.shape[-1]))
            groups += batch.shape[0]
            run_ready()
        bar.close()
        if pieces:
            raise ValueError(f"{groups} groups of visual embeddings for a prompt of {layout.num_groups}")
        return store

    # --- block selection ----------------------------------------------------------------------
    def score_blocks(self, store: TwoTierKVStore, layout: TokenLayout) -> np.ndarray:
        """Attention mass of the suffix queries on each block of the all-sparse cache."""
        scoring, bounds = store.build_decode_cache({0}, extra_capacity=0)
        mass = self.backend.score(scoring, layout.input_ids[layout.suffix_start :])
        return np.array([mass[s:e].sum(dtype=np.float64) for s, e in bounds])

    def choose_dense_blocks(self, store: TwoTierKVStore, layout: TokenLayout, options: InferenceOptions) -> tuple[set[int], np.ndarray | None]:
        num_blocks = len(store.blocks)
        if options.decode == "dense" or options.dense_blocks == "all":
            return set(range(num_blocks)), None
        if isinstance(options.dense_blocks, (tuple, list, set)):
            return explicit_dense_blocks(options.dense_blocks, num_blocks), None
        top_k = int(options.dense_blocks)
        if top_k + len(always_dense_blocks(num_blocks)) >= num_blocks:
            return set(range(num_blocks)), None  # every block would be dense anyway
        scores = self.score_blocks(store, layout)
        return select_dense_blocks(scores, num_blocks=num_blocks, top_k=top_k), scores

    # --- decoding ---------------------------------------------------------------------------
    def decode(
        self, cache: DecodeCache, suffix_ids: np.ndarray, gen: GenerationConfig, on_token: Callable[[int], None] | None = None
    ) -> list[int]:
        rng = np.random.default_rng(gen.seed)
        stop = self.special.stop_ids if gen.stop_at_eos else frozenset()
        ids, tokens = suffix_ids, []
        while True:
            logits = self.backend.decode(cache, ids)
            token = next_token(logits[0], gen, rng)
            if token in stop:
                break
            tokens.append(token)
            if on_token:
                on_token(token)
            if len(tokens) >= gen.max_new_tokens:
                break
            ids = np.array([token], dtype=np.int64)
        return tokens

    # --- everything -------------------------------------------------------------------------
    def prepare(
        self, video: VideoSource, *, options: InferenceOptions = InferenceOptions(), max_new_tokens: int | None = None
    ) -> PreparedVideo:
        """Vision and prefill of `video`: the question-independent work, done once.

        Raises before any work: ValueError when an explicit dense-block list names blocks this
        video does not have, HostMemoryError when the KV cache (with room for `max_new_tokens`
        answer tokens) would not fit the free memory.
        """
        layout = self.layout("", video.plan.timestamps)
        if isinstance(options.dense_blocks, (tuple, list, set)):
            num_blocks = len(block_ranges(layout, options.block_groups or self.config.block_groups))
            bad = sorted(b for b in options.dense_blocks if not 0 <= int(b) < num_blocks)
            if bad:
                raise ValueError(f"--dense-blocks {bad} out of range: this video has blocks 0..{num_blocks - 1}")
        self.check_host_memory(layout, options, max_new_tokens=max_new_tokens)
        report, times = RunReport(), []
        store = self.prefill(layout, self._encoded_batches(video, options.frame_batch, report, times), options, report=report)
        report.ready_after_last_frame_s = time.perf_counter() - report.ready_after_last_frame_s
        frame_times = np.concatenate(times)
        report.frames, report.groups, report.prompt_tokens = len(frame_times), layout.num_groups, layout.num_tokens
        report.chunks = num_chunks(layout, options.chunk_groups or self.config.chunk_groups)
        report.dense_kv_bytes = kv_bytes(self.config, store.filled, self.backend.float_dtype.itemsize)
        return PreparedVideo(frame_times, layout, store, options, report)

    def _encoded_batches(self, video: VideoSource, frame_batch: int, report: RunReport, times: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Visual embeddings batch by batch, frames decoded one batch ahead on another thread.

        Sets report.vision_s (encoding only) and stamps report.ready_after_last_frame_s with the
        moment the last frame has been read (prepare turns it into a duration).
        """
        bar = tqdm(total=video.num_frames, unit="frame", desc="vision", disable=not self.progress)
        read = 0
        for batch in prefetch(video.iter_batches(frame_batch)):  # decode batch k+1 while encoding batch k
            read += len(batch.timestamps)
            if read >= video.num_frames:  # the last frame has been read: what follows is what the user waits for
                report.ready_after_last_frame_s = time.perf_counter()
            pixels = batch.pixels
            missing = (-len(pixels)) % self.config.frames_per_group
            if missing:  # repeat the last frame, as the model pads its last group
                pixels = np.concatenate([pixels, np.repeat(pixels[-1:], missing, axis=0)])
            started = time.perf_counter()
            embeds = self.backend.encode_frames(pixels)
            report.vision_s += time.perf_counter() - started
            times.append(batch.timestamps)
            bar.update(len(batch.timestamps))
            yield embeds
        bar.close()

    def check_host_memory(self, layout: TokenLayout, options: InferenceOptions, *, max_new_tokens: int | None = None) -> int:
        """Bytes of host memory the KV cache of `layout` will take (HostMemoryError when over what is free).

        The decode cache holds the question (QUESTION_ROWS rows at most, as planned) and `max_new_tokens` answer rows.
        """
        if options.decode == "dense" or options.dense_blocks == "all":
            dense_blocks = None
        elif isinstance(options.dense_blocks, (tuple, list, set)):
            dense_blocks = len(options.dense_blocks)
        else:
            dense_blocks = int(options.dense_blocks)
        return check_host_memory(
            self.config, layout, block_groups=options.block_groups or self.config.block_groups,
            dense_blocks=dense_blocks, itemsize=self.backend.float_dtype.itemsize,
            **({} if max_new_tokens is None else {"answer_tokens": QUESTION_ROWS + max_new_tokens}),
        )

    def ask(
        self,
        prepared: PreparedVideo,
        question: str,
        *,
        gen: GenerationConfig = GenerationConfig(),
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer `question` from a prepared video: block choice and decoding only."""
        layout = self.layout(question, prepared.frame_times)
        shared = prepared.layout.suffix_start
        if layout.suffix_start != shared or not np.array_equal(layout.input_ids[:shared], prepared.layout.input_ids[:shared]):
            raise RuntimeError("the prompt before the question changed; prepare the video again")
        report = dataclasses.replace(
            prepared.report, prompt_tokens=layout.num_tokens, reused_prefill=prepared.questions_answered > 0
        )
        prepared.questions_answered += 1
        return self._respond(layout, prepared.store, prepared.options, gen, on_text, report)

    def answer(
        self,
        video: VideoSource,
        question: str,
        *,
        options: InferenceOptions = InferenceOptions(),
        gen: GenerationConfig = GenerationConfig(),
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """One question about one video (`prepare` then `ask`)."""
        return self.ask(self.prepare(video, options=options), question, gen=gen, on_text=on_text)

    def answer_tokens(
        self,
        layout: TokenLayout,
        visual_embeds: np.ndarray,
        *,
        options: InferenceOptions = InferenceOptions(),
        gen: GenerationConfig = GenerationConfig(),
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """From a prompt layout and visual embeddings to the streamed answer."""
        report = RunReport()
        store = self._prefill_timed(layout, visual_embeds, options, report)
        return self._respond(layout, store, options, gen, on_text, report)

    def _prefill_timed(self, layout: TokenLayout, visual_embeds: np.ndarray, options: InferenceOptions, report: RunReport) -> TwoTierKVStore:
        store = self.prefill(layout, visual_embeds, options, report=report)
        report.groups, report.prompt_tokens = len(visual_embeds), layout.num_tokens
        report.chunks = num_chunks(layout, options.chunk_groups or self.config.chunk_groups)
        report.dense_kv_bytes = kv_bytes(self.config, store.filled, self.backend.float_dtype.itemsize)
        return store

    def _respond(
        self, layout: TokenLayout, store: TwoTierKVStore, options: InferenceOptions, gen: GenerationConfig,
        on_text: Callable[[str], None] | None, report: RunReport,
    ) -> Answer:
        """Block choice, the mixed cache, then the streamed decode of one question."""
        asked = started = time.perf_counter()
        dense_blocks, scores = self.choose_dense_blocks(store, layout, options)
        suffix = layout.input_ids[layout.suffix_start :]
        cache, _ = store.build_decode_cache(dense_blocks, extra_capacity=len(suffix) + gen.max_new_tokens)
        report.select_s = time.perf_counter() - started
        report.num_blocks = len(store.blocks)
        report.dense_blocks = sorted(dense_blocks)
        report.block_scores = None if scores is None else [float(s) for s in scores]
        report.mixed_kv_bytes = kv_bytes(self.config, cache.length, self.backend.float_dtype.itemsize)

        detok = StreamDetokenizer(self.tokenizer)

        def on_token(token: int) -> None:
            if report.first_token_s is None:
                report.first_token_s = time.perf_counter() - asked
            text = detok.push(token)
            if text and on_text:
                on_text(text)

        started = time.perf_counter()
        tokens = self.decode(cache, suffix, gen, on_token)
        report.decode_s = time.perf_counter() - started
        report.new_tokens = len(tokens)
        tail = detok.flush()
        if tail and on_text:
            on_text(tail)
        return Answer(detok.text, tokens, report)
