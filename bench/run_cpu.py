"""CPU benchmarks: ONNX Runtime vs eager PyTorch, chunked vs dense prefill, bi-level vs dense decoding.

    .venv/bin/python bench/run_cpu.py                      # full run, ~6-10 min on 2 shared cores
    .venv/bin/python bench/run_cpu.py --quick              # ~2 min smoke run, prints only
    .venv/bin/python bench/run_cpu.py --frames 64,128,256 --out bench/RESULTS.md

Everything runs on random tiny checkpoints written into a temporary directory and exported to
ONNX (fp32), so no download is needed. These are CPU numbers of tiny models: read the ratios,
not the absolute times, and do not carry them over to GPUs or to the 8B model.

    1. backends   ONNX Runtime vs TorchBackend (eager PyTorch), same inputs, same runtime loop
                  (Pipeline.prefill, Pipeline.answer_tokens): vision s, prefill s, decode ms/token;
                  tiny and medium models
    2. prefill    chunked (C=4, P=3) vs dense as frames grow, ONNX Runtime; random visual
                  embeddings (the vision tower is identical in both modes and would dominate);
                  measured ratio next to the attention-work ratio counted from the layouts
    3. decode     bi-level (top-k dense blocks) vs all-dense KV: ms/token and KV bytes
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tokenizers import Tokenizer

from videoxl.config import VideoXLConfig
from videoxl.export.onnx_export import export_onnx
from videoxl.export.torch_backend import TorchBackend
from videoxl.layout import chunk_visibility, num_chunks, prefix_visibility
from videoxl.backend import Backend
from videoxl.graphs import kv_bytes
from videoxl.runtime.kv_store import available_host_bytes
from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.sampling import GenerationConfig
from videoxl.text import build_prompt, load_tokenizer
from videoxl.tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
SECTION = "## CPU benchmarks (ONNX Runtime vs eager PyTorch; chunked vs dense prefill)"
QUESTION = "What happens in this video?"
SECONDS_PER_GROUP = 4.0  # 1 fps sampling, 4 frames per group

# Shapes of the two benchmark models (config.json overrides of videoxl.tiny); the vision
# tower is the tiny one in both (it is not what these benchmarks compare).
MODELS: dict[str, dict[str, int]] = {
    "tiny": {},  # hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128
    "medium": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 2, "intermediate_size": 512},
}

# One thread per backend by default: on a shared machine, multi-threaded OpenMP (PyTorch) collapses
# when other jobs oversubscribe the cores (a 620x64 @ 64x128 linear measured 0.13 ms on one thread,
# 11-16 ms on two under load), which would measure the neighbours, not the backends.
THREADS_NOTE = ("one thread each by default: on a shared machine multi-threaded OpenMP collapses when other "
                "jobs oversubscribe the cores, which would measure the neighbours rather than the backends")

CPU_CLOCK_NOTE = (" (single-threaded, so it leaves out the time other jobs held the core and equals wall time "
                  "on an idle machine)")

# Peak memory of a dense one-pass prefill on ONNX Runtime: the attention body materialises
# (heads, L, L) float32 scores; about six such tensors are alive at the peak (measured: 2.0 GB
# at 128 frames and 9.7 GB at 256 frames with 4 heads).
DENSE_LIVE_SCORE_TENSORS = 6


# --- the runtime pieces under test ---------------------------------------------------------

class Clock:
    """The measurement clock, with wall time kept beside it.

    With one thread it is the process's CPU time: on a shared machine that leaves out the time
    other jobs hold the core, and on an idle machine it equals wall time. With more threads it
    is wall time (CPU time would add the threads up).
    """

    def __init__(self, threads: int) -> None:
        self.cpu = threads == 1
        self.name = "CPU time of the process" if self.cpu else "wall time"
        self.inflation: list[float] = []  # wall / clock of every measured run (how much load slowed it)

    def now(self) -> float:
        return time.process_time() if self.cpu else time.perf_counter()

    def measure(self, run: Callable[[], object]) -> tuple[object, float]:
        """-> (what run returned, seconds on this clock)."""
        wall, started = time.perf_counter(), self.now()
        result = run()
        seconds, wall = self.now() - started, time.perf_counter() - wall
        if seconds > 0.05:
            self.inflation.append(wall / seconds)
        return result, seconds


class TimedBackend:
    """A backend passed through unchanged, recording each decode call's token count and time."""

    def __init__(self, inner: Backend, clock: Clock) -> None:
        self.inner, self.clock = inner, clock
        self.decode_calls: list[tuple[int, float]] = []  # (new tokens, seconds)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def decode(self, cache, input_ids) -> np.ndarray:
        started = self.clock.now()
        logits = self.inner.decode(cache, input_ids)
        self.decode_calls.append((len(input_ids), self.clock.now() - started))
        return logits

    def token_step_ms(self) -> float:
        """Median of the one-token decode steps (the question's pass excluded)."""
        steps = [seconds for tokens, seconds in self.decode_calls if tokens == 1]
        return 1e3 * statistics.median(steps) if steps else float("nan")


@dataclass
class Model:
    name: str
    checkpoint: Path
    onnx: Path
    tokenizer: Tokenizer
    config: VideoXLConfig

    def layout(self, frames: int):
        groups = -(-frames // 4)
        times = [SECONDS_PER_GROUP * g for g in range(groups)]
        layout, _ = build_prompt(self.tokenizer, QUESTION, times, tokens_per_group=self.config.tokens_per_group)
        return layout

    def visual_embeds(self, frames: int) -> np.ndarray:
        """(G, 144, H) random embeddings: the vision tower is skipped in the prefill/decode benchmarks."""
        groups = -(-frames // 4)
        rng = np.random.default_rng(frames)
        return rng.standard_normal((groups, self.config.tokens_per_group, self.config.hidden_size)).astype(np.float32)


def prepare_models(workdir: Path, names: list[str]) -> dict[str, Model]:
    models = {}
    for name in names:
        started = time.perf_counter()
        checkpoint = write_tiny_checkpoint(workdir / f"{name}-checkpoint", **MODELS[name])
        onnx_dir = export_onnx(checkpoint, workdir / f"{name}-onnx", dtype="fp32")
        model = Model(name, checkpoint, onnx_dir, load_tokenizer(checkpoint), VideoXLConfig.from_checkpoint(checkpoint))
        models[name] = model
        say(f"  {name}: {describe_model(model.config)}; written and exported in {time.perf_counter() - started:.0f} s")
    return models


def describe_model(cfg) -> str:
    return (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
            f"({cfg.num_key_value_heads} KV, head_dim {cfg.head_dim}), MLP {cfg.intermediate_size}")


# --- timing helpers ------------------------------------------------------------------------

@dataclass
class Timing:
    runs: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.runs) if self.runs else float("nan")


def best_of_interleaved(cases: dict[str, Callable[[], object]], clock: Clock, *, repeats: int,
                        max_repeat_s: float) -> dict[str, Timing]:
    """Run every case once per round (interleaved, so load from other processes hits all alike).

    A case whose first run took longer than max_repeat_s is not repeated.
    """
    timings = {name: Timing() for name in cases}
    for round_ in range(repeats):
        for name, run in cases.items():
            if round_ and timings[name].runs[0] > max_repeat_s:
                continue
            timings[name].runs.append(clock.measure(run)[1])
    return timings


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- 1. ONNX Runtime vs eager PyTorch --------------------------------------------------------

@dataclass
class BackendRow:
    model: str
    vision_s: dict[str, float]
    prefill_s: dict[str, float]
    decode_ms: dict[str, float]
    same_tokens: bool
    prompt_tokens: int


def bench_backends(models: dict[str, Model], clock: Clock, *, frames: int, vision_frames: int, new_tokens: int,
                   repeats: int, threads: int) -> list[BackendRow]:
    """Vision: encode_frames. Prefill: Pipeline.prefill. Decode: the one-token steps of answer_tokens."""
    rows = []
    gen = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    options = InferenceOptions()
    for model in models.values():
        backends = {
            "onnxruntime": TimedBackend(OnnxRuntimeBackend(model.onnx, threads=threads), clock),
            "torch": TimedBackend(TorchBackend(model.checkpoint), clock),
        }
        layout, embeds = model.layout(frames), model.visual_embeds(frames)
        pixels = np.random.default_rng(0).standard_normal((vision_frames, 3, model.config.image_size, model.config.image_size)).astype(np.float32)
        vision = {name: Timing() for name in backends}
        prefill = {name: Timing() for name in backends}
        decode = {name: Timing() for name in backends}
        tokens: dict[str, list[int]] = {}
        for name, backend in backends.items():  # warm-up: first-run allocations, lazy init
            Pipeline(backend, model.tokenizer).prefill(model.layout(16), model.visual_embeds(16), InferenceOptions())
            backend.encode_frames(pixels[:4])
        for _ in range(repeats):
            for name, backend in backends.items():
                pipeline = Pipeline(backend, model.tokenizer)
                vision[name].runs.append(clock.measure(lambda: backend.encode_frames(pixels))[1])
                prefill[name].runs.append(clock.measure(lambda: pipeline.prefill(layout, embeds, options))[1])
                backend.decode_calls.clear()
                answer = pipeline.answer_tokens(layout, embeds, options=options, gen=gen)
                decode[name].runs.append(backend.token_step_ms())
                tokens[name] = answer.token_ids
        rows.append(BackendRow(
            model=model.name,
            vision_s={n: t.best for n, t in vision.items()},
            prefill_s={n: t.best for n, t in prefill.items()},
            decode_ms={n: t.best for n, t in decode.items()},
            same_tokens=tokens["onnxruntime"] == tokens["torch"],
            prompt_tokens=layout.num_tokens,
        ))
        say(f"  {model.name}: prefill ORT {rows[-1].prefill_s['onnxruntime']:.2f} s, "
            f"PyTorch {rows[-1].prefill_s['torch']:.2f} s")
        del backends
        gc.collect()
    return rows


# --- 2. chunked vs dense prefill -------------------------------------------------------------

MODE_CHUNKED, MODE_DENSE_CHUNKS, MODE_DENSE_ONE_PASS = "chunked", "dense_chunks", "dense_one_pass"


def prefill_options(mode: str, layout, cfg):
    if mode == MODE_CHUNKED:
        return InferenceOptions(prefill="chunked")
    if mode == MODE_DENSE_CHUNKS:  # what prefill="dense" runs: P covers every earlier chunk
        return InferenceOptions(prefill="dense")
    # the whole video as one chunk with no window: plain causal visibility in a single pass
    return InferenceOptions(prefill="chunked", chunk_groups=max(layout.num_groups, 1), window_chunks=0)


def pieces(layout, options, cfg) -> list:
    """The prefill pieces exactly as Pipeline.prefill cuts them."""
    chunk_groups = options.chunk_groups or cfg.chunk_groups
    window = cfg.window_chunks if options.window_chunks is None else options.window_chunks
    if options.prefill == "dense":
        chunk_groups, window = max(layout.num_groups, 1), 0
    return [prefix_visibility(layout)] + [
        chunk_visibility(layout, k, chunk_groups=chunk_groups, window_chunks=window)
        for k in range(num_chunks(layout, chunk_groups))
    ]


def attention_pairs(layout, options, cfg) -> tuple[int, int]:
    """(visible, computed) query-key pairs per head and layer of a prefill.

    visible:  what the mask allows: a visual query sees its visible past plus its own chunk
              causally; a timestamp query sees everything before it.
    computed: what the ChunkSparseAttention body evaluates: every query of a chunk against the
              gathered past plus the whole chunk (the causal part is masked, not skipped), and
              the chunk's timestamp queries again against all keys.
    """
    visible = computed = 0
    for vis in pieces(layout, options, cfg):
        queries = vis.end - vis.start
        causal = np.arange(1, queries + 1, dtype=np.int64)
        is_ts = vis.query_is_timestamp
        visible += int(np.where(is_ts, vis.start + causal, vis.visible_past + causal).sum())
        computed += queries * (vis.visible_past + queries) + int(is_ts.sum()) * vis.end
    return visible, computed


def dense_one_pass_bytes(layout, cfg) -> int:
    tokens = layout.suffix_start
    return DENSE_LIVE_SCORE_TENSORS * cfg.num_attention_heads * tokens * tokens * 4


@dataclass
class PrefillRow:
    frames: int
    tokens: int
    chunks: int
    seconds: dict[str, Timing]
    skipped_dense: str | None
    visible: dict[str, int]
    computed: dict[str, int]


def bench_prefill(model: Model, frame_counts: list[int], clock: Clock, *, repeats: int, max_repeat_s: float,
                  dense_memory_bytes: int, threads: int) -> tuple[list[PrefillRow], float]:
    cfg = model.config
    backend = OnnxRuntimeBackend(model.onnx, threads=threads)
    pipeline = Pipeline(backend, model.tokenizer)
    pipeline.prefill(model.layout(16), model.visual_embeds(16), InferenceOptions())  # warm-up
    check = dense_equivalence_check(model, pipeline, threads=threads)
    rows = []
    for frames in frame_counts:
        layout, embeds = model.layout(frames), model.visual_embeds(frames)
        options = {mode: prefill_options(mode, layout, cfg) for mode in (MODE_CHUNKED, MODE_DENSE_CHUNKS, MODE_DENSE_ONE_PASS)}
        needed = dense_one_pass_bytes(layout, cfg)
        allowed = min(dense_memory_bytes, (available_host_bytes() or 0) // 2)
        skipped = None if needed <= allowed else f"needs ~{needed / 2**30:.0f} GiB"

        def run(pipe, opts) -> Callable[[], object]:
            return lambda: pipe.prefill(layout, embeds, opts)

        cases = {MODE_CHUNKED: run(pipeline, options[MODE_CHUNKED]),
                 MODE_DENSE_CHUNKS: run(pipeline, options[MODE_DENSE_CHUNKS])}
        dense_pipeline = None
        if skipped is None:  # its own session, so that its large arena is freed afterwards
            dense_pipeline = Pipeline(OnnxRuntimeBackend(model.onnx, threads=threads), model.tokenizer)
            cases[MODE_DENSE_ONE_PASS] = run(dense_pipeline, options[MODE_DENSE_ONE_PASS])
        timings = best_of_interleaved(cases, clock, repeats=repeats, max_repeat_s=max_repeat_s)
        del dense_pipeline
        gc.collect()
        pairs = {mode: attention_pairs(layout, opts, cfg) for mode, opts in options.items()}
        rows.append(PrefillRow(
            frames=frames, tokens=layout.suffix_start, chunks=num_chunks(layout, cfg.chunk_groups),
            seconds=timings, skipped_dense=skipped,
            visible={m: p[0] for m, p in pairs.items()}, computed={m: p[1] for m, p in pairs.items()},
        ))
        say(f"  {frames} frames: " + ", ".join(f"{m} {t.best:.2f} s" for m, t in timings.items())
            + (f"; dense one pass skipped ({skipped})" if skipped else ""))
    return rows, check


def dense_equivalence_check(model: Model, pipeline, *, threads: int) -> float:
    """Max |K difference| between dense one-pass and dense chunk-by-chunk prefill (same visibility)."""
    layout, embeds = model.layout(64), model.visual_embeds(64)
    one_pass = Pipeline(OnnxRuntimeBackend(model.onnx, threads=threads), model.tokenizer)
    a = one_pass.prefill(layout, embeds, prefill_options(MODE_DENSE_ONE_PASS, layout, model.config))
    b = pipeline.prefill(layout, embeds, prefill_options(MODE_DENSE_CHUNKS, layout, model.config))
    return max(float(np.abs(x - y).max()) for x, y in zip(a.dense_keys + a.dense_values, b.dense_keys + b.dense_values))


# --- 3. bi-level vs dense decoding -----------------------------------------------------------

@dataclass
class DecodeRow:
    frames: int
    mode: str
    kv_tokens: int
    kv_bytes: int
    dense_blocks: int
    num_blocks: int
    select_s: float
    ms_per_token: float


def bench_decode(model: Model, frame_counts: list[int], clock: Clock, *, dense_blocks: int, new_tokens: int,
                 repeats: int, threads: int) -> list[DecodeRow]:
    """Each run is a whole `answer_tokens` (prefill included); modes interleave round by round."""
    cfg = model.config
    backend = TimedBackend(OnnxRuntimeBackend(model.onnx, threads=threads), clock)
    pipeline = Pipeline(backend, model.tokenizer)
    gen = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    per_token = kv_bytes(cfg, 1, backend.float_dtype.itemsize)
    modes = {"bi-level": InferenceOptions(decode="bilevel", dense_blocks=dense_blocks), "dense": InferenceOptions(decode="dense")}
    rows = []
    for frames in frame_counts:
        layout, embeds = model.layout(frames), model.visual_embeds(frames)
        best: dict[str, DecodeRow] = {}
        for _ in range(repeats):
            for mode, options in modes.items():
                backend.decode_calls.clear()
                report = pipeline.answer_tokens(layout, embeds, options=options, gen=gen).report
                row = DecodeRow(
                    frames=frames, mode=mode, kv_tokens=report.mixed_kv_bytes // per_token, kv_bytes=report.mixed_kv_bytes,
                    dense_blocks=len(report.dense_blocks), num_blocks=report.num_blocks,
                    select_s=report.select_s, ms_per_token=backend.token_step_ms(),
                )
                if mode in best:
                    row.select_s = min(row.select_s, best[mode].select_s)
                    row.ms_per_token = min(row.ms_per_token, best[mode].ms_per_token)
                best[mode] = row
        rows += best.values()
        say(f"  {frames} frames: " + ", ".join(f"{m} {r.ms_per_token:.2f} ms/token ({r.kv_tokens} KV tokens)" for m, r in best.items()))
    return rows


# --- report ----------------------------------------------------------------------------------

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and np.isfinite(a) and np.isfinite(b) else "-"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def environment(args, clock: Clock, load_before: tuple[float, ...]) -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO) if sys.argv[0] else "bench/run_cpu.py"
    load_after = os.getloadavg()
    return [
        f"- command: `python {shlex.join([script, *sys.argv[1:]])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs; {args.threads} thread(s) for ONNX Runtime (intra-op) and "
        f"PyTorch{' (' + THREADS_NOTE + ')' if args.threads == 1 else ''}",
        f"- the machine is shared: load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end. "
        f"Times are {clock.name}{CPU_CLOCK_NOTE if clock.cpu else ''}, best of N runs interleaved across the "
        f"compared cases; other jobs stretched wall time to {inflation(clock)} of that",
        f"- onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), torch {torch.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}",
    ]


def inflation(clock: Clock) -> str:
    if not clock.inflation:
        return "-"
    low, mid, high = np.percentile(clock.inflation, [0, 50, 100])
    return f"{low:.1f}x-{high:.1f}x (median {mid:.1f}x)"


def render(args, clock: Clock, load_before, models, backend_rows, prefill_rows, equivalence, decode_rows) -> str:
    sweep = models[args.sweep_model].config
    out = [SECTION, ""]
    out += [
        "**CPU numbers of tiny random models.** Read the ratios measured within this run, not the "
        "absolute times; they say nothing about GPUs or about the 8B model, whose balance of "
        "attention, matrix products and memory traffic is different.",
        "",
        *environment(args, clock, load_before),
        "- models (random weights, fp32 ONNX): " + "; ".join(f"{m.name}: {describe_model(m.config)}" for m in models.values())
        + "; the vision tower is the tiny SigLIP (64 wide, 2 layers used) in both",
        "",
    ]
    if backend_rows:
        frames = args.compare_frames
        out += [
            f"### ONNX Runtime vs eager PyTorch ({frames} frames)",
            "",
            "Both backends behind the same runtime loop, same prompt layout and random visual embeddings, default "
            "options (chunked prefill C=4, P=3; bi-level decoding with 4 task-aware dense blocks). Prefill = "
            f"`Pipeline.prefill`; decode = median one-token step of `Pipeline.answer_tokens` over {args.new_tokens} "
            f"greedy tokens; vision = `encode_frames` on {args.vision_frames} random frames. Best of {args.repeats}.",
            "",
        ]
        body = []
        for r in backend_rows:
            for stage, values, unit in (("vision", r.vision_s, "s"), ("prefill", r.prefill_s, "s"), ("decode", r.decode_ms, "ms/token")):
                fmt = "{:.3f}" if unit == "s" else "{:.2f}"
                body.append([r.model, f"{stage} ({unit})", fmt.format(values["onnxruntime"]), fmt.format(values["torch"]),
                             ratio(values["onnxruntime"], values["torch"])])
        out += table(["model", "stage", "ONNX Runtime", "PyTorch", "ORT / PyTorch"], body)
        out += ["", "Same answer tokens from both backends: " + ", ".join(
            f"{r.model} {'yes' if r.same_tokens else 'NO'}" for r in backend_rows) + f" ({backend_rows[0].prompt_tokens} prompt tokens).", ""]

    if prefill_rows:
        c, p = sweep.chunk_groups, sweep.window_chunks
        out += [
            f"### Chunked vs dense prefill as frames grow (ONNX Runtime, {args.sweep_model} model)",
            "",
            f"`Pipeline.prefill` on random visual embeddings of shape (G, {sweep.tokens_per_group}, {sweep.hidden_size}), "
            f"G = frames / 4, prompt from `build_prompt` (a group every {SECONDS_PER_GROUP:.0f} s). The vision tower "
            "is skipped: it does the same work in both modes and would dominate the time. Three ways to prefill:",
            "",
            f"- **chunked**: `InferenceOptions(prefill=\"chunked\")`, C={c} groups per chunk, P={p} previous chunks visible;",
            "- **dense, one pass**: `InferenceOptions(prefill=\"chunked\", chunk_groups=G, window_chunks=0)`, the whole video as one chunk with plain causal "
            "visibility. The ONNX attention body materialises (heads, L, L) float32 scores, so its memory grows as L²; "
            f"it is skipped where the estimate exceeds {args.dense_memory_gib:g} GiB or half the free memory;",
            "- **dense, chunk by chunk**: `InferenceOptions(prefill=\"dense\")`, which runs chunked with P covering every earlier chunk: the same causal "
            "visibility as dense, computed C groups at a time (memory linear in L). "
            f"Check: its KV cache equals the one-pass dense cache at 64 frames to {equivalence:.1e} (max abs).",
            "",
            f"Seconds are the best of {args.repeats} interleaved runs"
            + (f" (a case whose first run took over {args.max_repeat_s:g} s ran once: "
               + ", ".join(f"{r.frames} frames {m.replace('_', ' ')}" for r in prefill_rows for m, t in r.seconds.items() if len(t.runs) < args.repeats) + ")"
               if any(len(t.runs) < args.repeats for r in prefill_rows for t in r.seconds.values()) else "")
            + ".",
            "",
        ]
        body = []
        for r in prefill_rows:
            s = {m: r.seconds[m].best if m in r.seconds else float("nan") for m in (MODE_CHUNKED, MODE_DENSE_CHUNKS, MODE_DENSE_ONE_PASS)}
            one_pass = f"{s[MODE_DENSE_ONE_PASS]:.2f}" if MODE_DENSE_ONE_PASS in r.seconds else f"skipped ({r.skipped_dense})"
            body.append([str(r.frames), str(r.tokens), str(r.chunks), f"{s[MODE_CHUNKED]:.2f}", f"{s[MODE_DENSE_CHUNKS]:.2f}", one_pass,
                         ratio(s[MODE_DENSE_CHUNKS], s[MODE_CHUNKED]), ratio(s[MODE_DENSE_ONE_PASS], s[MODE_CHUNKED]),
                         ratio(r.visible[MODE_DENSE_CHUNKS], r.visible[MODE_CHUNKED])])
        out += table(["frames", "prefill tokens", "chunks", "chunked s", "dense, chunk by chunk s", "dense, one pass s",
                      "measured dense/chunked (chunk by chunk)", "measured dense/chunked (one pass)", "visible-pairs ratio dense/chunked"], body)
        out += [
            "",
            "Attention work counted from the layouts (`chunk_visibility`), in query-key pairs per head and layer. "
            "*Visible* = pairs the mask allows (visual query: prefix + earlier timestamps + P-chunk window + own chunk "
            "causally; timestamp query: everything before it). *Computed* = pairs the ONNX attention body evaluates "
            "(each query against the gathered past plus its whole chunk, masked not skipped; timestamp queries again "
            "against all keys). Timestamp share = visible pairs of timestamp queries in chunked mode.",
            "",
        ]
        body = []
        for r in prefill_rows:
            ts_share = timestamp_pairs(models[args.sweep_model], r.frames) / r.visible[MODE_CHUNKED]
            body.append([str(r.frames), f"{r.visible[MODE_CHUNKED] / 1e6:.1f}", f"{r.visible[MODE_DENSE_CHUNKS] / 1e6:.1f}",
                         ratio(r.visible[MODE_DENSE_CHUNKS], r.visible[MODE_CHUNKED]), f"{100 * ts_share:.0f}%",
                         f"{r.computed[MODE_CHUNKED] / 1e6:.1f}", f"{r.computed[MODE_DENSE_CHUNKS] / 1e6:.1f}",
                         f"{r.computed[MODE_DENSE_ONE_PASS] / 1e6:.1f}",
                         ratio(r.computed[MODE_DENSE_CHUNKS], r.computed[MODE_CHUNKED])])
        out += table(["frames", "visible M chunked", "visible M dense", "visible ratio", "timestamp share (chunked)",
                      "computed M chunked", "computed M dense, chunk by chunk", "computed M dense, one pass",
                      "computed ratio (chunk by chunk / chunked)"], body)
        same_up_to = 4 * c * (p + 1)
        out += [
            "",
            "How to read it (structure, not timing):",
            "",
            f"- Up to {same_up_to} frames (C·(P+1) groups) every chunk's window covers all earlier chunks, so chunked "
            "and dense have the same visibility and nothing can be saved; the saving starts above that.",
            "- Chunked prefill is not linear in frames: timestamp queries see the whole history (DESIGN §2), so their "
            "share of the chunked work grows with frames, and re-rotating the past keys in every chunk costs O(L) per chunk.",
            "- Dense in one pass evaluates the whole L x L rectangle (masked, not skipped): about twice the pairs of "
            "dense chunk by chunk, through score tensors far larger than the caches.",
            "",
        ]

    if decode_rows:
        real = VideoXLConfig()
        out += [
            f"### Bi-level vs dense decoding (ONNX Runtime, {args.sweep_model} model)",
            "",
            f"`Pipeline.answer_tokens` after chunked prefill; bi-level = `InferenceOptions(decode=\"bilevel\", "
            f"dense_blocks={args.dense_blocks})` (top-{args.dense_blocks} task-aware blocks plus the prefix, first and "
            f"last video blocks dense, S={sweep.block_groups} groups per block, others pooled x{sweep.kv_pool_stride}); "
            f"dense = `decode=\"dense\"`. ms/token = median one-token step over {args.new_tokens} greedy tokens, best of "
            f"{args.repeats} runs (interleaved). "
            "Selection = block scoring plus building the mixed cache. The 8B column applies the same token counts to "
            "Video-XL-2's KV size (28 layers, 4 KV heads, head_dim 128, fp16: 56 KiB per token): arithmetic, not measured.",
            "",
        ]
        body = []
        for r in decode_rows:
            body.append([str(r.frames), r.mode, f"{r.dense_blocks}/{r.num_blocks}", str(r.kv_tokens),
                         f"{r.kv_bytes / 2**20:.1f}", f"{kv_bytes(real, r.kv_tokens, 2) / 2**30:.2f}",
                         f"{r.select_s:.2f}", f"{r.ms_per_token:.2f}"])
        out += table(["frames", "decode", "dense blocks", "KV tokens", "KV MiB (this model)", "KV GiB (8B, fp16)",
                      "selection s (wall)", "ms/token"], body)
        out.append("")
        by_frames: dict[int, dict[str, DecodeRow]] = {}
        for r in decode_rows:
            by_frames.setdefault(r.frames, {})[r.mode] = r
        out += [
            "Dense / bi-level: " + "; ".join(
                f"{f} frames: KV x{ratio(m['dense'].kv_tokens, m['bi-level'].kv_tokens)}, "
                f"ms/token x{ratio(m['dense'].ms_per_token, m['bi-level'].ms_per_token)}"
                for f, m in by_frames.items() if {"dense", "bi-level"} <= m.keys()) + ".",
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def timestamp_pairs(model: Model, frames: int) -> int:
    layout, cfg = model.layout(frames), model.config
    total = 0
    for vis in pieces(layout, prefill_options(MODE_CHUNKED, layout, cfg), cfg):
        positions = np.arange(vis.start, vis.end, dtype=np.int64)
        total += int((positions[vis.query_is_timestamp] + 1).sum())
    return total


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of the results file (up to the next '## ' heading), or append it."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    lines = text.splitlines()
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before, after = lines[:start], lines[end:]
    else:
        before, after = lines, []
    while before and not before[-1].strip():
        before.pop()
    new = "\n".join(before) + "\n\n" + section
    if after:
        new += "\n" + "\n".join(after).rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


# --- command line ------------------------------------------------------------------------------

def frame_list(value: str) -> list[int]:
    frames = [int(v) for v in value.split(",") if v.strip()]
    if not frames or min(frames) < 4:
        raise argparse.ArgumentTypeError(f"frame counts must be >= 4, got {value!r}")
    return frames


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (~2 min): fewer frame counts, 1 repeat; prints only unless --out")
    p.add_argument("--frames", type=frame_list, default=None, help="prefill sweep frame counts (default 64,128,256,512,1024)")
    p.add_argument("--decode-frames", type=frame_list, default=None, help="bi-level vs dense decoding frame counts (default 512,1024)")
    p.add_argument("--compare-frames", type=int, default=None, help="frames for ONNX Runtime vs PyTorch (default 128)")
    p.add_argument("--vision-frames", type=int, default=16, help="frames for the vision row of the backend comparison")
    p.add_argument("--repeats", type=int, default=None, help="best of N (default 3; 1 with --quick)")
    p.add_argument("--max-repeat-s", type=float, default=60.0, help="do not repeat a case whose first run took longer")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per decode measurement (default 32; 8 with --quick)")
    p.add_argument("--dense-blocks", type=int, default=2, help="task-aware dense blocks for bi-level decoding")
    p.add_argument("--dense-memory-gib", type=float, default=4.0, help="skip dense one-pass prefill above this estimated memory")
    p.add_argument("--sweep-model", choices=sorted(MODELS), default="tiny", help="model of the prefill and decode sweeps")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime (intra-op) and PyTorch threads; with 1 (the default) times are process CPU time")
    p.add_argument("--skip", default="", help="comma list of parts to skip: backends,prefill,decode")
    p.add_argument("--out", type=Path, default=None, help="results file to update (default bench/RESULTS.md; none with --quick)")
    args = p.parse_args(argv)
    quick = args.quick
    args.frames = args.frames or ([64, 128, 256] if quick else [64, 128, 256, 512, 1024])
    args.decode_frames = args.decode_frames or ([256] if quick else [512, 1024])
    args.compare_frames = args.compare_frames or (64 if quick else 128)
    args.repeats = args.repeats or (1 if quick else 3)
    args.new_tokens = args.new_tokens or (8 if quick else 32)
    if args.out is None and not quick:
        args.out = REPO / "bench" / "RESULTS.md"
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - {"backends", "prefill", "decode"}
    if unknown:
        p.error(f"--skip: unknown parts {sorted(unknown)}")
    return args


def quieten() -> None:
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "onnxscript", "onnx_ir", "videoxl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quieten()
    load_before = os.getloadavg()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    clock = Clock(args.threads)
    needed = ["tiny", "medium"] if "backends" not in args.skip else [args.sweep_model]
    with tempfile.TemporaryDirectory(prefix="videoxl-bench-") as tmp:
        say("writing and exporting the benchmark models")
        models = prepare_models(Path(tmp), needed)
        backend_rows, prefill_rows, decode_rows, equivalence = [], [], [], float("nan")
        if "backends" not in args.skip:
            say(f"ONNX Runtime vs PyTorch at {args.compare_frames} frames")
            backend_rows = bench_backends(models, clock, frames=args.compare_frames, vision_frames=args.vision_frames,
                                          new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
        if "prefill" not in args.skip:
            say(f"chunked vs dense prefill, frames {args.frames}")
            prefill_rows, equivalence = bench_prefill(
                models[args.sweep_model], args.frames, clock, repeats=args.repeats, max_repeat_s=args.max_repeat_s,
                dense_memory_bytes=int(args.dense_memory_gib * 2**30), threads=args.threads)
        if "decode" not in args.skip:
            say(f"bi-level vs dense decoding, frames {args.decode_frames}")
            decode_rows = bench_decode(models[args.sweep_model], args.decode_frames, clock, dense_blocks=args.dense_blocks,
                                       new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
        section = render(args, clock, load_before, models, backend_rows, prefill_rows, equivalence, decode_rows)
    print(section)
    if args.out:
        write_section(args.out, section)
        say(f"wrote {os.path.relpath(args.out, Path.cwd())}")
    say(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
