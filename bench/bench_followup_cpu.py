"""CPU benchmark: a follow-up question on a prepared video vs a fresh run, end to end from a file.

    .venv/bin/python bench/bench_followup_cpu.py [--frames 64 256 1024] [--new-tokens 16]

The question sits after the video in the prompt and runs through decode, so vision and
prefill are done once per video (`Pipeline.prepare`) and every later question pays only
block selection and decoding (`Pipeline.ask`). Each row: a synthetic video of N sampled
frames (1 fps, 160x120 MPEG-4) with the random tiny checkpoint on ONNX Runtime (fp32); the
fresh run is `Pipeline.answer` (decode the file, vision, prefill, selection, decoding), the
follow-up is `Pipeline.ask` on the prepared video with another question, with its time to the
first answer token (block choice and the question's decode pass). Wall times, best of
--repeats; read the ratio, not the absolute times (tiny model, shared CPU). Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from videoxl.export.onnx_export import export_onnx
from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.sampling import GenerationConfig
from videoxl.text import load_tokenizer
from videoxl.tiny import write_tiny_checkpoint
from videoxl.video import open_video, write_synthetic_video

FIRST, FOLLOW_UP = "What happens in this video?", "Which colour does the square have at the end?"


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = write_tiny_checkpoint(work / "checkpoint")
        onnx_dir = export_onnx(checkpoint, work / "onnx", max_frames=max(args.frames))
        backend = OnnxRuntimeBackend(onnx_dir)
        pipeline = Pipeline(backend, load_tokenizer(onnx_dir))
        gen = GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
        options = InferenceOptions(dense_blocks=4)
        rows = []
        for frames in args.frames:
            path = write_synthetic_video(work / f"video_{frames}.mp4", seconds=frames, fps=8)
            video = open_video(path, image_size=backend.config.image_size, fps=1.0, max_fps=1.0, max_frames=frames)
            fresh_s, fresh = best_of(args.repeats, lambda: pipeline.answer(video, FIRST, options=options, gen=gen))
            prepared = pipeline.prepare(video, options=options)
            pipeline.ask(prepared, FIRST, gen=gen)
            follow_s, follow = best_of(args.repeats, lambda: pipeline.ask(prepared, FOLLOW_UP, gen=gen))
            rows.append((video.num_frames, fresh.report.prompt_tokens, fresh_s, follow_s, follow.report.first_token_s))
            print(f"{video.num_frames} frames: fresh {fresh_s:.2f} s, follow-up {follow_s:.3f} s", file=sys.stderr)

    print(f"tiny checkpoint, ONNX Runtime fp32, {args.new_tokens} greedy tokens, best of {args.repeats}\n")
    print("| frames | prompt tokens | fresh run s (file -> answer) | follow-up s (ask) | fresh / follow-up "
          "| follow-up first token s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for frames, tokens, fresh_s, follow_s, first_token_s in rows:
        print(f"| {frames} | {tokens} | {fresh_s:.2f} | {follow_s:.3f} | {fresh_s / follow_s:.0f}x | {first_token_s:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
