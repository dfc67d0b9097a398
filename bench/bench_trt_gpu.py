"""GPU benchmark: the tiny model end to end on TensorRT engines with explicit CUDA memory.

    .venv/bin/python bench/bench_trt_gpu.py [--frames 1000] [--precision fp16] [--budget 4GiB]
                                            [--new-tokens 64] [--plugins] [--engines DIR]

Writes the random tiny checkpoint (`videoxl.tiny`) into a temporary directory, exports it to
ONNX and builds engines for the GPU present (`--engines DIR` reuses a built directory), then runs
`TensorRTBackend` behind the same runtime loop as every backend (`Pipeline`):

    vision     encode_frames over N random frames, batches of the vision engine's maximum
    prefill    Pipeline.prefill on the prompt of N frames (chunked, C and P of the engines)
    decode     Pipeline.decode, one token a step, --new-tokens steps (plain execution: every
               step has a new past length), and the same single step repeated, which replays a
               CUDA graph after its second use (see DecodeGraphCache)
    memory     the peak device bytes in use (cudaMemGetInfo: free before the backend minus the
               lowest free seen; the arena takes the whole budget up front, so this is about the
               budget plus what TensorRT and CUDA hold outside it), the bytes of the arena's
               regions actually carved, and the pinned host bytes

Prefill times are scaled to seconds per 1,000 frames. Tiny-model numbers measure the runtime's
overheads (launches, copies, synchronisation), not the 8B model. Prints a markdown table. Needs
an NVIDIA GPU and a TensorRT that builds for it; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fail(message: str) -> None:
    print(f"bench_trt_gpu: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from videoxl.engines.profiles import parse_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--budget", type=parse_bytes, default=4 << 30, help="--gpu-memory-budget of the backend (default 4GiB)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--plugins", action="store_true", help="build with the videoxl TensorRT plugins")
    p.add_argument("--engines", type=Path, help="an engine directory of the tiny model to reuse")
    return p.parse_args(argv)


def build(workdir: Path, args: argparse.Namespace) -> Path:
    """Tiny checkpoint -> ONNX -> engines for this GPU (the manifest points at the ONNX tokenizer)."""
    from videoxl.engines.build import build_engines
    from videoxl.engines.trt_module import flavour_of, gpu_compute_capability, import_tensorrt, is_rtx, rtx_supported_targets
    from videoxl.export.onnx_export import export_onnx
    from videoxl.tiny import write_tiny_checkpoint

    trt = import_tensorrt()
    gpu = gpu_compute_capability()
    if is_rtx(trt) and gpu not in rtx_supported_targets(trt):
        fail(f"TensorRT for RTX cannot build for this GPU ({gpu}); install standard TensorRT")
    checkpoint = write_tiny_checkpoint(workdir / "checkpoint")
    onnx_dir = export_onnx(checkpoint, workdir / "onnx", dtype=args.precision, max_frames=args.frames)
    return build_engines(
        onnx_dir, workdir / "engines", precision=args.precision, max_frames=args.frames,
        targets=[gpu] if is_rtx(trt) else None, flavour=flavour_of(trt), use_plugins=args.plugins,
    )


def run(engines: Path, args: argparse.Namespace) -> list[str]:
    from videoxl.engines.profiles import format_bytes
    from videoxl.runtime.cuda_memory import mem_get_info
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.runtime.trt_backend import TensorRTBackend, describe_manifest
    from videoxl.sampling import GenerationConfig
    from videoxl.text import build_prompt, load_tokenizer

    free_before, total = mem_get_info()
    lowest_free = [free_before]

    def watch() -> None:
        lowest_free.append(mem_get_info()[0])

    backend = TensorRTBackend(engines, gpu_memory_budget=args.budget)
    watch()
    cfg, rng = backend.config, np.random.default_rng(0)
    tokenizer = load_tokenizer(backend.artifact_dir)
    pipeline = Pipeline(backend, tokenizer)
    frames = args.frames - args.frames % cfg.frames_per_group
    groups = frames // cfg.frames_per_group

    batch = backend.engines["vision"].tensors["pixel_values"].max[0]
    pixels = rng.uniform(-1, 1, (batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    backend.encode_frames(pixels)  # warm up
    started = time.perf_counter()
    embeds = [backend.encode_frames(pixels[: min(batch, frames - done)]) for done in range(0, frames, batch)]
    vision_s = time.perf_counter() - started
    watch()
    visual = np.concatenate(embeds)[:groups]

    def prompt(count: int):
        return build_prompt(tokenizer, "What happens?", [4.0 * g for g in range(count)], tokens_per_group=cfg.tokens_per_group)[0]

    limits = backend.limits  # the chunk geometry the engines were built for
    options = InferenceOptions(dense_blocks=2, chunk_groups=limits["chunk_groups"], window_chunks=limits["window_chunks"])
    pipeline.prefill(prompt(min(groups, 8)), visual[: min(groups, 8)], options)  # warm up: first-use costs
    layout = prompt(groups)
    started = time.perf_counter()
    store = pipeline.prefill(layout, visual, options)
    prefill_s = time.perf_counter() - started
    watch()

    started = time.perf_counter()
    chosen, _ = pipeline.choose_dense_blocks(store, layout, options)
    suffix = layout.input_ids[layout.suffix_start :]
    cache, _ = store.build_decode_cache(chosen, extra_capacity=len(suffix) + args.new_tokens + 1)
    select_s = time.perf_counter() - started
    watch()

    step_ms: list[float] = []
    decode = backend.decode

    def timed_decode(*a):
        t0 = time.perf_counter()
        out = decode(*a)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    backend.decode = timed_decode
    replays = backend._graphs.replays
    pipeline.decode(cache, suffix, GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False))
    backend.decode = decode
    step_ms = step_ms[1:]  # the question's pass is not a token step
    replayed = backend._graphs.replays - replays
    watch()

    report = backend.memory_report()
    peak = free_before - min(lowest_free)
    per_1000 = 1000 / frames
    lines = [
        f"## TensorRT backend, tiny model ({describe_manifest(engines)})",
        "",
        f"{frames} frames -> {groups} groups, {layout.num_tokens} prompt tokens; dense blocks {sorted(chosen)} of "
        f"{len(store.blocks)}; GPU memory {format_bytes(total)}, budget {format_bytes(args.budget)}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| vision, s per 1,000 frames | {vision_s * per_1000:.3f} |",
        f"| prefill (LLM, chunked), s per 1,000 frames | {prefill_s * per_1000:.3f} |",
        f"| prefill total, s per 1,000 frames | {(vision_s + prefill_s) * per_1000:.3f} |",
        f"| block selection + decode cache, s | {select_s:.3f} |",
        f"| decode, ms/token (median of {len(step_ms)} steps, {replayed} of them CUDA graph replays) | "
        f"{statistics.median(step_ms) if step_ms else float('nan'):.2f} |",
        f"| peak device bytes (cudaMemGetInfo) | {peak:,} ({format_bytes(peak)}) |",
        f"| pinned host bytes | {report.pop('pinned_host'):,} |",
        f"| arena bytes in use (sum of the regions below) | {sum(report.values()):,} ({format_bytes(sum(report.values()))}) |",
        "",
        "| arena region | bytes |",
        "|---|---|",
        *[f"| {name} | {nbytes:,} ({format_bytes(nbytes)}) |" for name, nbytes in report.items()],
    ]
    backend.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from videoxl.runtime.device import gpu_problem

    problem = gpu_problem()
    if problem is not None:
        fail(f"needs an NVIDIA GPU: {problem}")
    from videoxl.engines.trt_module import TensorRTUnavailableError

    with tempfile.TemporaryDirectory(prefix="videoxl-bench-trt-") as tmp:
        try:
            engines = args.engines or build(Path(tmp), args)
        except TensorRTUnavailableError as err:
            fail(str(err))
        print("\n".join(run(Path(engines), args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
