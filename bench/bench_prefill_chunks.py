"""Does a prefill chunk cost what it must read? Time per visible query-key pair, late vs early.

    .venv/bin/python bench/bench_prefill_chunks.py                    # 256 and 2,048 frames, both rules
    .venv/bin/python bench/bench_prefill_chunks.py --frames 256,512,2048 --onnx DIR

For each video length it runs the whole chunked prefill on ONNX Runtime (tiny random model,
random visual embeddings: the vision tower is not what is measured), times every chunk call, and
counts the chunk's visible query-key pairs from its visibility: a visual query sees
prefix + earlier timestamps + window + its own chunk causally; a timestamp query, under the
evaluation rule, the whole history. The figure of merit is the time per visible pair of the
last chunks of the video: if a chunk's cost follows only what it must read, a chunk at the end
of 2,048 frames costs about as much per pair as one at the end of 256 frames.

Times are the calling thread's CPU time with ONNX Runtime on one intra-op thread, so other jobs
on a shared machine do not inflate them. Tiny model, CPU: read the ratios.
"""

from __future__ import annotations

import argparse
import inspect
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from videoxl.layout import ChunkVisibility, chunk_visibility
from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.text import build_prompt, load_tokenizer

LAST_CHUNKS = 8  # the figure averages the last chunks of the video
RULES_SUPPORTED = "rule" in inspect.signature(chunk_visibility).parameters


def visible_pairs(vis: ChunkVisibility) -> int:
    """Query-key pairs the chunk's attention must read (causal inside the chunk)."""
    queries = vis.end - vis.start
    own = np.arange(1, queries + 1)
    pairs = np.where(vis.query_is_timestamp, vis.start + own, vis.visible_past + own)
    return int(pairs.sum())


class ChunkTimer:
    """Wraps backend.prefill_chunk: (CPU seconds, visible pairs) per chunk call."""

    def __init__(self, backend) -> None:
        self.inner, self.calls = backend.prefill_chunk, []
        backend.prefill_chunk = self

    def __call__(self, *args):
        vis = next(a for a in args if isinstance(a, ChunkVisibility))
        started = time.thread_time()
        out = self.inner(*args)
        self.calls.append((time.thread_time() - started, visible_pairs(vis)))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="256,2048", help="comma-separated frame counts (default 256,2048)")
    parser.add_argument("--onnx", type=Path, help="an exported tiny model (default: written and exported here)")
    parser.add_argument("--chunk-groups", type=int, default=4)
    parser.add_argument("--window", type=int, default=3)
    args = parser.parse_args()
    frames_list = [int(f) for f in args.frames.split(",")]
    work = Path(tempfile.mkdtemp(prefix="videoxl-bench-"))
    if args.onnx is None:
        from videoxl.export.onnx_export import export_onnx
        from videoxl.tiny import write_tiny_checkpoint

        args.onnx = export_onnx(write_tiny_checkpoint(work / "ckpt"), work / "onnx", max_frames=max(frames_list))
    backend = OnnxRuntimeBackend(args.onnx, threads=1)
    tokenizer = load_tokenizer(args.onnx)
    pipeline = Pipeline(backend, tokenizer)
    timer = ChunkTimer(backend)
    cfg = backend.config
    rng = np.random.default_rng(0)
    rules = ("evaluation", "streaming") if RULES_SUPPORTED else ("evaluation",)
    print(f"# chunk cost per visible pair ({platform.processor() or platform.machine()}, ONNX Runtime, 1 thread, tiny model)")
    print("| rule | frames | prefill CPU s | last-chunk pairs | ns / visible pair (last chunks) | timestamp share of pairs |")
    print("|---|---:|---:|---:|---:|---:|")
    per_pair: dict[tuple[str, int], float] = {}
    for rule in rules:
        for frames in frames_list:
            groups = frames // cfg.frames_per_group
            layout, _ = build_prompt(tokenizer, "What happens?", [4.0 * g for g in range(groups)], tokens_per_group=cfg.tokens_per_group)
            embeds = rng.standard_normal((groups, cfg.tokens_per_group, cfg.hidden_size)).astype(backend.float_dtype)
            extra = {"prefill_rule": rule} if RULES_SUPPORTED else {}
            options = InferenceOptions(chunk_groups=args.chunk_groups, window_chunks=args.window, **extra)
            timer.calls.clear()
            pipeline.prefill(layout, embeds, options)
            last = timer.calls[-LAST_CHUNKS:]
            seconds = sum(s for s, _ in timer.calls)
            per_pair[(rule, frames)] = 1e9 * sum(s for s, _ in last) / sum(p for _, p in last)
            ts_pairs = 0
            for k in range(len(timer.calls) - 1):
                vis = chunk_visibility(layout, k, chunk_groups=args.chunk_groups, window_chunks=args.window, **({"rule": rule} if RULES_SUPPORTED else {}))
                ts_pairs += int((vis.start + np.flatnonzero(vis.query_is_timestamp) + 1).sum())
            share = ts_pairs / sum(p for _, p in timer.calls)
            print(f"| {rule} | {frames} | {seconds:.2f} | {last[-1][1]:,} | {per_pair[(rule, frames)]:.2f} | {share:.0%} |")
    for rule in rules:
        low, high = per_pair[(rule, min(frames_list))], per_pair[(rule, max(frames_list))]
        print(f"{rule}: per-pair cost at {max(frames_list)} frames / at {min(frames_list)} frames = {high / low:.2f}x")


if __name__ == "__main__":
    main()
