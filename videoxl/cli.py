"""`videoxl` command line: run, serve, export, build, check, plan, demo.

Flags follow trtexec/polygraphy habits: --onnx, --engines, --fp16, --max-frames, --verbose.
The CLI prints; the library logs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from videoxl import logger

DEFAULT_QUESTION = "What happens in this video?"


def _dense_blocks(value: str) -> int | tuple[int, ...] | str:
    if value == "all":
        return "all"
    if "," in value or value.startswith("["):
        return tuple(int(v) for v in value.strip("[]").split(",") if v.strip())
    return int(value)


def _given(value, default):
    """The flag's value when given (0 included: it is then refused, not replaced), else the default."""
    return default if value is None else value


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "videoxl"


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """Names the cached export: the config plus each weight and tokenizer file's name, size and mtime.

    Retrained weights under the same config get a fresh export instead of stale graphs.
    """
    from videoxl.config import VideoXLConfig

    parts = [VideoXLConfig.from_checkpoint(checkpoint).model_hash()]
    for path in sorted(Path(checkpoint).glob("*")):
        if path.suffix in (".safetensors", ".json"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _add_model_flags(p) -> None:
    """Where the model comes from and which backend runs it (run and serve)."""
    p.add_argument("--checkpoint", type=Path, help="Video-XL-2 checkpoint directory (Hugging Face layout)")
    p.add_argument("--onnx", type=Path, help="exported ONNX directory (default: exported on first use into the cache)")
    p.add_argument("--engines", type=Path, help="TensorRT engine directory (--backend tensorrt)")
    p.add_argument("--backend", choices=("onnxruntime", "torch", "tensorrt"), default=None,
                   help="default: tensorrt with --engines and a usable GPU, else onnxruntime")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the first-use export and of --backend torch (default: %(default)s)")
    p.add_argument("--gpu-memory-budget", default=None, help="device bytes for --backend tensorrt, e.g. 16GiB (default: 90%% of free)")


def _add_prepare_flags(p) -> None:
    """Frame sampling, prefill and block choice (run and serve; serve takes them as per-request defaults)."""
    p.add_argument("--max-frames", type=int, default=None, help="frames sampled at most (default: the config's)")
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default 1; short videos up to 4)")
    p.add_argument("--prefill", choices=("chunked", "dense"), default="chunked",
                   help="chunked: sparse across chunks (the model's); dense: full causal (default: %(default)s)")
    p.add_argument("--decode", choices=("bilevel", "dense"), default="bilevel",
                   help="bilevel: dense KV only for the chosen blocks; dense: the whole KV (default: %(default)s)")
    p.add_argument("--dense-blocks", type=_dense_blocks, default=4,
                   help="K (task-aware top-K), a list like 3,7,9 (explicit), or 'all' (default: %(default)s)")
    p.add_argument("--chunk-groups", type=int, default=None, help="groups per prefill chunk (C; default: the config's)")
    p.add_argument("--window", type=int, default=None, help="previous chunks visible in full (P; default: the config's)")
    p.add_argument("--block-groups", type=int, default=None, help="groups per bi-level block (S; default: the config's)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="answer a question about a video")
    _add_model_flags(p)
    p.add_argument("--video", required=True, help="video file or folder of images (frames in name order)")
    p.add_argument("--question", action="append", default=None,
                   help=f"repeatable: later questions reuse the video's vision and prefill (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--interactive", action="store_true",
                   help="after the --question ones, read questions from stdin, one per line, until end of input")
    _add_prepare_flags(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=None,
                   help="prepared-video cache directory: a video prepared once (same file, settings and model) "
                        "skips decoding, vision and prefill in later runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: chat completions about local videos")
    _add_model_flags(p)
    p.add_argument("--allow-dir", type=Path, action="append", required=True,
                   help="repeatable: videos are read only from under these directories (symlinks and .. resolved)")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--model-name", default="video-xl-2", help="the model id clients send (default: %(default)s)")
    p.add_argument("--queue-size", type=int, default=8, help="requests waiting at most; more get HTTP 429 (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=None, help="prepared-video cache directory (kept across restarts)")
    p.add_argument("--cache-memory", default="4GiB", help="prepared videos kept in memory, LRU by bytes (default: %(default)s)")
    _add_prepare_flags(p)
    p.set_defaults(func=cmd_serve)


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs with videoxl custom ops")
    p.add_argument("--checkpoint", type=Path, required=True, help="Video-XL-2 checkpoint directory (Hugging Face layout)")
    p.add_argument("--out", type=Path, required=True, help="ONNX directory to write (replaced only on success)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="graph dtype; ONNX Runtime on the CPU runs fp32 (default: %(default)s)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    p.add_argument("--max-frames", type=int, default=None, help="longest video the graphs are meant for")
    p.add_argument("--external-data", action="store_true", default=None, help="force weights into .data files (auto above 2 GB)")
    p.set_defaults(func=cmd_export)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="tiny end to end run: checkpoint + video written, exported, answered on ONNX Runtime")
    p.add_argument("--workdir", type=Path, default=Path("artifacts/demo"), help="default: %(default)s")
    p.add_argument("--seconds", type=float, default=24.0, help="length of the synthetic video (default: %(default)s)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="default: %(default)r")
    p.set_defaults(func=cmd_demo)


def open_backend(args, *, checkpoint: Path | None):
    """The backend the user asked for, with one-line errors for what is missing."""
    backend = args.backend
    if backend is None:
        from videoxl.runtime.device import gpu_problem

        cpu_artifacts, problem = args.onnx or checkpoint, gpu_problem() if args.engines else None
        if args.engines and problem is not None and cpu_artifacts:
            print(f"--engines needs a GPU ({problem}); running on ONNX Runtime instead", file=sys.stderr)
        # engines with no CPU fallback go to TensorRT, whose error names what is missing
        backend = "tensorrt" if args.engines and (problem is None or not cpu_artifacts) else "onnxruntime"
    if backend == "tensorrt":
        from videoxl.runtime.trt_backend import TensorRTBackend

        if not args.engines:
            raise SystemExit("--backend tensorrt needs --engines DIR (build them with `videoxl build`)")
        from videoxl.engines.profiles import parse_bytes

        budget = parse_bytes(args.gpu_memory_budget) if getattr(args, "gpu_memory_budget", None) else None
        return TensorRTBackend(args.engines, gpu_memory_budget=budget)
    if backend == "torch":
        from videoxl.export.torch_backend import TorchBackend

        if not checkpoint:
            raise SystemExit("--backend torch needs --checkpoint")
        return TorchBackend(checkpoint, dtype=args.dtype)
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend

    onnx_dir = args.onnx
    if onnx_dir is None:
        if not checkpoint:
            raise SystemExit("--backend onnxruntime needs --onnx DIR or --checkpoint DIR")
        onnx_dir = _cache_dir() / "onnx" / f"{checkpoint_fingerprint(checkpoint)}-{args.dtype}"
        if not (onnx_dir / "export_manifest.json").is_file():
            from videoxl.export.onnx_export import export_onnx

            print(f"exporting {checkpoint} to {onnx_dir} (once)", file=sys.stderr)
            export_onnx(checkpoint, onnx_dir, dtype=args.dtype)
    return OnnxRuntimeBackend(onnx_dir)


def tokenizer_dir(args, backend) -> Path:
    """Where the tokenizer lives: the checkpoint, the ONNX directory or the backend's artifacts."""
    found = args.checkpoint or args.onnx or getattr(backend, "artifact_dir", None)
    if found is None:
        raise SystemExit("need --checkpoint or --onnx for the tokenizer")
    return Path(found)


def inference_options(args, backend):
    """The prefill and block-choice options from the flags; engines fix the chunk geometry they were built for."""
    from videoxl.runtime.pipeline import InferenceOptions

    limits = getattr(backend, "limits", {})
    return InferenceOptions(
        prefill=args.prefill, decode=args.decode, dense_blocks=args.dense_blocks,
        chunk_groups=_given(args.chunk_groups, limits.get("chunk_groups")),
        window_chunks=_given(args.window, limits.get("window_chunks")),
        block_groups=args.block_groups,
    )


def cmd_run(args) -> int:
    from videoxl.runtime.pipeline import Pipeline
    from videoxl.runtime.prepared_cache import sampling_settings
    from videoxl.sampling import GenerationConfig
    from videoxl.text import load_tokenizer
    from videoxl.video import open_video

    backend = open_backend(args, checkpoint=args.checkpoint)
    options = inference_options(args, backend)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    sampling = sampling_settings(backend, fps=args.fps, max_frames=args.max_frames)
    video = open_video(args.video, **sampling)
    backend.check_frames(video.num_frames)
    pipeline = Pipeline(backend, load_tokenizer(tokenizer_dir(args, backend)), progress=not args.no_progress)
    if args.cache is None:
        prepared = pipeline.prepare(video, options=options)
    else:
        from videoxl.runtime.prepared_cache import PreparedCache, backend_fingerprint, video_content_hash

        cache = PreparedCache(fingerprint=backend_fingerprint(backend), directory=args.cache)
        key = cache.key(video_hash=video_content_hash(args.video), sampling=sampling, options=options)
        prepared, tier = cache.get_or_prepare(key, backend, lambda: pipeline.prepare(video, options=options))
        print(f"prepared video {'loaded from' if tier else 'saved to'} the cache {args.cache}", file=sys.stderr)
        prepared.options = options  # decode-time choices are this run's, whatever the entry was saved with
    for number, question in enumerate(_questions(args)):
        if number:
            print()
        report = _ask_and_stream(pipeline, prepared, question, gen)
        print(f"backend           {backend.name}")
        print("\n".join(report.lines()))
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from videoxl.server import ServeSettings, create_app
    except ImportError as err:
        raise SystemExit(f"videoxl serve needs the serve extra ({err.name} is missing): pip install 'videoxl[serve]'") from err
    from videoxl.engines.profiles import parse_bytes
    from videoxl.runtime.prepared_cache import PreparedCache, backend_fingerprint
    from videoxl.text import load_tokenizer

    backend = open_backend(args, checkpoint=args.checkpoint)
    settings = ServeSettings(
        model_name=args.model_name, allowed_dirs=tuple(args.allow_dir), queue_size=args.queue_size,
        options=inference_options(args, backend), fps=args.fps, max_frames=args.max_frames,
        max_new_tokens=args.max_new_tokens,
    )
    cache = PreparedCache(fingerprint=backend_fingerprint(backend), memory_budget_bytes=parse_bytes(args.cache_memory),
                          directory=args.cache)
    app = create_app(backend, load_tokenizer(tokenizer_dir(args, backend)), settings, cache)
    print(f"serving {args.model_name} ({backend.name}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _questions(args) -> Iterator[str]:
    """The --question flags (the default one if none and not interactive), then stdin lines with --interactive."""
    yield from args.question or ([] if args.interactive else [DEFAULT_QUESTION])
    if not args.interactive:
        return
    while True:
        if sys.stdin.isatty():
            print("question (Ctrl-D to end)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _ask_and_stream(pipeline, prepared, question: str, gen):
    """Print the question, then the answer as it is decoded; returns the run report."""
    print(f"Q: {question}", flush=True)
    started = []

    def stream(text: str) -> None:
        if not started:
            started.append(True)
            print("A: ", end="")
        print(text, end="", flush=True)

    answer = pipeline.ask(prepared, question, gen=gen, on_text=stream)
    print("" if started else "A: (empty answer)", end="\n\n")
    return answer.report


def cmd_export(args) -> int:
    from videoxl.export.onnx_export import export_onnx

    out = export_onnx(args.checkpoint, args.out, dtype=args.dtype, opset=args.opset, max_frames=args.max_frames, external_data=args.external_data)
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from videoxl.export.onnx_export import export_onnx
    from videoxl.tiny import write_tiny_checkpoint
    from videoxl.video import write_synthetic_video

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = write_tiny_checkpoint(work / "checkpoint")
    video = write_synthetic_video(work / "video.mp4", seconds=args.seconds, fps=8)
    print(f"tiny checkpoint  {checkpoint}\nsynthetic video  {video} ({args.seconds:.0f} s at 8 fps)")
    onnx_dir = export_onnx(checkpoint, work / "onnx")
    print(f"ONNX graphs      {onnx_dir}")
    run_args = build_parser().parse_args([  # the run command's own parser: its defaults, no copy of them
        "run", "--checkpoint", str(checkpoint), "--onnx", str(onnx_dir), "--video", str(video),
        "--question", args.question, "--backend", "onnxruntime", "--dense-blocks", "1",
        "--chunk-groups", "2", "--window", "1", "--block-groups", "2", "--max-new-tokens", "24",
    ])
    return cmd_run(run_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videoxl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    add_export_parser(sub)
    add_demo_parser(sub)
    add_serve_parser(sub)
    try:
        from videoxl.engines.cli import add_build_parser, add_check_parser
    except ImportError:
        pass
    else:
        add_build_parser(sub)
        add_check_parser(sub)
    try:
        from videoxl.runtime.memory_plan import add_plan_parser
    except ImportError:
        pass
    else:
        add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logger.setLevel(logging.INFO)
    from videoxl.config import ConfigError
    from videoxl.runtime.artifacts import ArtifactError
    from videoxl.runtime.kv_store import HostMemoryError
    from videoxl.runtime.trt_backend import BackendUnavailable
    from videoxl.video import VideoError

    try:
        return int(args.func(args) or 0)
    except BackendUnavailable as err:  # already one line naming the fix
        print(err, file=sys.stderr)
        return 1
    except (ConfigError, ArtifactError, VideoError, HostMemoryError, ValueError, FileNotFoundError) as err:
        print(f"videoxl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C ends a long run or an interactive session without a traceback
        print(f"\nvideoxl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
