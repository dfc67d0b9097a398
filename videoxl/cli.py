"""`videoxl` command line: run, serve, export, build, check, plan, demo.

Flags follow trtexec/polygraphy habits: --onnx, --engines, --fp16, --max-frames, --verbose.
The CLI prints; the library logs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import videoxl
from videoxl import logger
from videoxl.layout import PREFILL_RULES
from videoxl.presets import PRESETS

DEFAULT_QUESTION = "What happens in this video?"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, ``videoxl run: error: argument --fps: ...``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _dense_blocks(value: str) -> int | tuple[int, ...] | str:
    """'all', a top-k like 4, or a block list like 3,7,9."""
    if value == "all":
        return "all"
    try:
        if "," in value or value.startswith("["):
            blocks = tuple(int(v) for v in value.strip("[]").split(",") if v.strip())
            if not blocks or min(blocks) < 0:
                raise ValueError
            return blocks
        top_k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count K >= 0, a block list like 3,7,9, or 'all'; got {value!r}") from None
    if top_k < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {top_k}")
    return top_k


def _int_at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= least, refused with the value otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def _finite(*, low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] when low_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low or (low_open and value == low) or value > high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if math.isfinite(high) else ''}{bounds}, got {text}")
        return value

    return parse


def _byte_size(text: str) -> int:
    """An argparse type: a positive byte count like 16GiB."""
    from videoxl.engines.profiles import parse_bytes

    try:
        value = parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return value


def _unit_list(value: str) -> tuple[int, ...]:
    """'3,1,24' or '[3, 1, 24]'; '' or '[]' is the empty selection (every block dense)."""
    return tuple(int(v) for v in value.strip().strip("[]").split(",") if v.strip())


def _given(value, default):
    """The flag's value when given (0 included: it is then refused, not replaced), else the default."""
    return default if value is None else value


def _cache_dir() -> Path:
    """$XDG_CACHE_HOME/videoxl; an empty or relative XDG_CACHE_HOME counts as unset (XDG spec)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "videoxl"


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
    p.add_argument("--device", default="cpu", help="torch device of --backend torch, e.g. cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the first-use export and of --backend torch (default: %(default)s)")
    p.add_argument("--gpu-memory-budget", type=_byte_size, default=None, help="device bytes for --backend tensorrt, e.g. 16GiB (default: 90%% of free)")
    p.add_argument("--dense-tier", choices=("auto", "device", "host"), default="auto",
                   help="--backend tensorrt: where the dense KV tier lives. device: with the sparse tier; host: pinned host "
                        "memory (each chunk's rows copied out once, the chosen blocks' rows back per question; needs "
                        "--prefill-rule streaming); auto: the device when the budget holds the engines' frame limit, "
                        "else the host (default: %(default)s)")


def _add_prepare_flags(p) -> None:
    """Frame sampling, prefill and block choice (run and serve; serve takes them as per-request defaults)."""
    p.add_argument("--max-frames", type=_int_at_least(1), default=None, help="frames sampled at most (default: the config's)")
    p.add_argument("--fps", type=_finite(low=0, low_open=True), default=None, help="sampling rate (default 1; short videos up to 4)")
    p.add_argument("--prefill", choices=("chunked", "dense"), default="chunked",
                   help="chunked: sparse across chunks (the model's); dense: full causal (default: %(default)s)")
    p.add_argument("--prefill-rule", choices=PREFILL_RULES, default="evaluation",
                   help="what a chunk's timestamp tokens see: evaluation, the whole history (the paper's eval code); "
                        "streaming, only their chunk's window (the released forward_streaming; linear in frames) "
                        "(default: %(default)s)")
    p.add_argument("--decode", choices=("bilevel", "dense"), default="bilevel",
                   help="bilevel: dense KV only for the chosen blocks; dense: the whole KV (default: %(default)s)")
    p.add_argument("--dense-blocks", type=_dense_blocks, default=None,
                   help="K (task-aware top-K), a list like 3,7,9 (explicit), or 'all' (default: 4)")
    p.add_argument("--chunk-groups", type=_int_at_least(1), default=None, help="groups per prefill chunk (C; default: the config's)")
    p.add_argument("--window", type=_int_at_least(0), default=None, help="previous chunks visible in full (P; default: the config's)")
    p.add_argument("--block-groups", type=_int_at_least(1), default=None, help="groups per bi-level block (S; default: the config's)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=None, help="default: 128 (1024 with --eval, as the evaluation)")


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="answer a question about a video", description="Answer questions about a video.")
    _add_model_flags(p)
    p.add_argument("--video", required=True, help="video file or folder of images (frames in name order)")
    p.add_argument("--question", action="append", default=None,
                   help=f"repeatable: later questions reuse the video's vision and prefill (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--interactive", action="store_true",
                   help="after the --question ones, read questions from stdin, one per line, until end of input")
    _add_prepare_flags(p)
    p.add_argument("--dense-units", type=_unit_list, default=None,
                   help="a published selection of 8-frame units, like 3,1,24 (block u // (S/2) + 1; '' = every block dense)")
    p.add_argument("--dense-units-file", type=Path, default=None,
                   help="an official selection JSON file (selected_infos/*.json); its entry for --dense-units-key")
    p.add_argument("--dense-units-key", default=None,
                   help="entry of --dense-units-file (default: '<video file name>_<question>', then without the extension)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="an official evaluation setting: frames, C, P, S, and --eval; explicit flags override it")
    p.add_argument("--eval", action="store_true",
                   help="evaluation prompt and output: mm:ss in the question as 'N seconds', greedy, stripped answer")
    p.add_argument("--temperature", type=_finite(low=0), default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=_finite(low=0, high=1, low_open=True), default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="sampling seed (default: %(default)s)")
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
    p.add_argument("--port", type=_int_at_least(1), default=8000, help="default: %(default)s")
    p.add_argument("--model-name", default="video-xl-2", help="the model id clients send (default: %(default)s)")
    p.add_argument("--queue-size", type=_int_at_least(1), default=8, help="requests waiting at most; more get HTTP 429 (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=None, help="prepared-video cache directory (kept across restarts)")
    p.add_argument("--cache-memory", type=_byte_size, default="4GiB", help="prepared videos kept in memory, LRU by bytes (default: %(default)s)")
    _add_prepare_flags(p)
    p.set_defaults(func=cmd_serve)


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs with videoxl custom ops")
    p.add_argument("--checkpoint", type=Path, required=True, help="Video-XL-2 checkpoint directory (Hugging Face layout)")
    p.add_argument("--out", type=Path, required=True, help="ONNX directory to write (replaced only on success)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="graph dtype; ONNX Runtime on the CPU runs fp32 (default: %(default)s)")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset of the graphs; the exporter writes 23 (default: %(default)s)")
    p.add_argument("--weights", default="fp", metavar="fp|int8|int4",
                   help="weight-only quantization of the LLM, lm_head and projector linears: int8 per output channel, "
                        "int4 block-wise with an int8 lm_head; embeddings and vision stay float (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="int4 only: input rows per scale, a power of two >= 16 dividing every linear's input width (default: 128)")
    p.add_argument("--max-frames", type=_int_at_least(1), default=None, help="longest video the graphs are meant for")
    p.add_argument("--external-data", action="store_true", default=None, help="force weights into .data files (auto above 2 GB)")
    p.set_defaults(func=cmd_export)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="tiny end to end run: checkpoint + video written, exported, answered on ONNX Runtime")
    p.add_argument("--workdir", type=Path, default=Path("artifacts/demo"), help="default: %(default)s")
    p.add_argument("--seconds", type=_finite(low=0, low_open=True), default=24.0, help="length of the synthetic video (default: %(default)s)")
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
        return TensorRTBackend(
            args.engines, gpu_memory_budget=getattr(args, "gpu_memory_budget", None), dense_tier=getattr(args, "dense_tier", "auto"),
        )
    if backend == "torch":
        from videoxl.export.torch_backend import TorchBackend

        if not checkpoint:
            raise SystemExit("--backend torch needs --checkpoint")
        return TorchBackend(checkpoint, dtype=args.dtype, device=args.device)
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

        from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    except ImportError as err:  # neither extra installed
        raise SystemExit(f"ONNX Runtime is not installed ({err}): pip install 'videoxl[cpu]', or 'videoxl[gpu]' for its CUDA provider") from err
    from videoxl.runtime.artifacts import ArtifactError

    onnx_dir = args.onnx
    if onnx_dir is None:
        if not checkpoint:
            raise SystemExit("--backend onnxruntime needs --onnx DIR or --checkpoint DIR")
        if args.dtype not in ("fp32", "fp16"):
            raise ValueError(f"--dtype {args.dtype}: ONNX Runtime runs fp32 or fp16 graphs; use --dtype fp32, fp16 or --backend torch")
        onnx_dir = cached_export(checkpoint, args.dtype)
    try:
        return OnnxRuntimeBackend(onnx_dir)
    except (InvalidProtobuf, InvalidGraph, Fail) as err:  # a graph the manifest's checks could not catch
        raise ArtifactError(f"{onnx_dir}: ONNX Runtime cannot load a graph ({str(err).splitlines()[0]}); re-export the directory") from err


@contextlib.contextmanager
def _locked(path: Path, waiting_note: str) -> Iterator[None]:
    """An exclusive flock on ``path``; says ``waiting_note`` when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting_note, file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_export(checkpoint: Path, dtype: str) -> Path:
    """The checkpoint's export in the cache: made once, verified, re-made when damaged.

    Processes sharing the cache take a lock: one exports, the others wait and reuse it.
    """
    from videoxl.files import UnsafePathError
    from videoxl.runtime.artifacts import MANIFEST, ArtifactError, load_onnx_artifacts

    onnx_dir = _cache_dir() / "onnx" / f"{checkpoint_fingerprint(checkpoint)}-{dtype}"
    with _locked(_cache_dir() / "locks" / f"{onnx_dir.name}.lock", f"waiting for another videoxl exporting into {onnx_dir}"):
        if (onnx_dir / MANIFEST).is_file():
            try:
                load_onnx_artifacts(onnx_dir)
                return onnx_dir
            except (ArtifactError, UnsafePathError) as err:
                print(f"the cached export is damaged ({err}); exporting again", file=sys.stderr)
                _remove_cache_entry(onnx_dir)
        elif onnx_dir.exists():
            _remove_cache_entry(onnx_dir)
        from videoxl.export.onnx_export import export_onnx

        print(f"exporting {checkpoint} to {onnx_dir} (once)", file=sys.stderr)
        export_onnx(checkpoint, onnx_dir, dtype=dtype)
    return onnx_dir


def _remove_cache_entry(onnx_dir: Path) -> None:
    """The cache is videoxl's own: a damaged entry is moved aside, then deleted."""
    import shutil

    aside = onnx_dir.with_name(f".{onnx_dir.name}.damaged-{os.getpid()}")
    onnx_dir.rename(aside)
    shutil.rmtree(aside)


def tokenizer_dir(args, backend) -> Path:
    """Where the tokenizer lives: the checkpoint, the ONNX directory or the backend's artifacts."""
    found = args.checkpoint or args.onnx or getattr(backend, "artifact_dir", None)
    if found is None:
        raise SystemExit("need --checkpoint or --onnx for the tokenizer")
    return Path(found)


def inference_options(args, backend, *, preset=None, dense_blocks=None, block_groups=None):
    """The prefill and block-choice options from the flags (and a preset); engines fix the chunk
    geometry they were built for."""
    from videoxl.runtime.pipeline import InferenceOptions

    limits = getattr(backend, "limits", {})
    return InferenceOptions(
        prefill=args.prefill, prefill_rule=args.prefill_rule, decode=args.decode,
        dense_blocks=_given(dense_blocks, _given(args.dense_blocks, 4)),
        chunk_groups=_given(args.chunk_groups, preset.chunk_groups if preset else limits.get("chunk_groups")),
        window_chunks=_given(args.window, preset.window_chunks if preset else limits.get("window_chunks")),
        block_groups=_given(block_groups, args.block_groups),
    )


def cmd_run(args) -> int:
    from videoxl.runtime.pipeline import Pipeline
    from videoxl.runtime.prepared_cache import sampling_settings
    from videoxl.sampling import GenerationConfig
    from videoxl.text import load_tokenizer

    questions = _questions(args)
    first_question = next(questions, None)  # --interactive with empty input is known before any work
    if first_question is None:
        raise ValueError("--interactive: no question given (stdin ended before the first line) and no --question")
    backend = open_backend(args, checkpoint=args.checkpoint)
    cfg = backend.config
    preset = PRESETS.get(args.preset)
    evaluating = args.eval or preset is not None
    gen = GenerationConfig(
        max_new_tokens=_given(args.max_new_tokens, 1024 if evaluating else 128), temperature=args.temperature,
        top_p=args.top_p, seed=args.seed,
    )
    sampling = sampling_settings(
        backend, fps=_given(args.fps, preset.fps if preset else None),
        max_frames=_given(args.max_frames, preset.max_frames if preset else None),
    )
    video = _open_video(args.video, **sampling)
    backend.check_frames(video.num_frames)
    block_groups, dense_blocks = _dense_block_choice(args, preset, cfg, video)
    options = inference_options(args, backend, preset=preset, dense_blocks=dense_blocks, block_groups=block_groups)
    pipeline = Pipeline(backend, load_tokenizer(tokenizer_dir(args, backend)), progress=not args.no_progress)
    if args.cache is None:
        prepared = pipeline.prepare(video, options=options, max_new_tokens=gen.max_new_tokens)
    else:
        from videoxl.runtime.prepared_cache import PreparedCache, backend_fingerprint, video_content_hash

        cache = PreparedCache(fingerprint=backend_fingerprint(backend), directory=args.cache)
        key = cache.key(video_hash=video_content_hash(args.video), sampling=sampling, options=options)
        prepared, tier = cache.get_or_prepare(
            key, backend, lambda: pipeline.prepare(video, options=options, max_new_tokens=gen.max_new_tokens)
        )
        print(f"prepared video {'loaded from' if tier else 'saved to'} the cache {args.cache}", file=sys.stderr)
        prepared.options = options  # decode-time choices are this run's, whatever the entry was saved with
    for number, question in enumerate(_chain(first_question, questions)):
        if number:
            print()
        report = _ask_and_stream(pipeline, prepared, question, gen, evaluating=evaluating)
        print(f"backend           {backend.name}")
        print("\n".join(report.lines()))
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from videoxl.server import ServeSettings, create_app
    except ImportError as err:
        raise SystemExit(f"videoxl serve needs the serve extra ({err.name} is missing): pip install 'videoxl[serve]'") from err
    from videoxl.runtime.prepared_cache import PreparedCache, backend_fingerprint
    from videoxl.text import load_tokenizer

    backend = open_backend(args, checkpoint=args.checkpoint)
    settings = ServeSettings(
        model_name=args.model_name, allowed_dirs=tuple(args.allow_dir), queue_size=args.queue_size,
        options=inference_options(args, backend), fps=args.fps, max_frames=args.max_frames,
        max_new_tokens=_given(args.max_new_tokens, 128),
    )
    cache = PreparedCache(fingerprint=backend_fingerprint(backend), memory_budget_bytes=args.cache_memory, directory=args.cache)
    app = create_app(backend, load_tokenizer(tokenizer_dir(args, backend)), settings, cache)
    print(f"serving {args.model_name} ({backend.name}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _dense_block_choice(args, preset, cfg, video) -> tuple[int | None, int | tuple[int, ...] | str]:
    """Block size S and the dense-block option from --dense-blocks, --dense-units(-file) and --preset."""
    from videoxl.layout import unit_dense_blocks
    from videoxl.presets import load_unit_selection

    block_groups = _given(args.block_groups, preset.block_groups if preset else None)
    given = [flag for flag, value in (("--dense-blocks", args.dense_blocks), ("--dense-units", args.dense_units),
                                      ("--dense-units-file", args.dense_units_file)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both choose the dense blocks; give one")
    if args.dense_units_key is not None and args.dense_units_file is None:
        raise ValueError("--dense-units-key needs --dense-units-file")
    if args.dense_units is None and args.dense_units_file is None:
        return block_groups, _given(args.dense_blocks, 4)
    units = args.dense_units
    if args.dense_units_file is not None:
        if args.dense_units_key is None and (args.interactive or len(args.question or []) != 1):
            raise ValueError("--dense-units-file without --dense-units-key needs exactly one --question (each has its own entry)")
        name = Path(args.video).name
        keys = [args.dense_units_key] if args.dense_units_key is not None else [
            f"{name}_{args.question[0]}", f"{Path(name).stem}_{args.question[0]}"]
        selection = load_unit_selection(args.dense_units_file, keys)
        if selection.block_groups is not None:
            if args.block_groups is not None and args.block_groups != selection.block_groups:
                raise ValueError(
                    f"--block-groups {args.block_groups} differs from the selection's selected_chunk_size "
                    f"{selection.block_groups} (its units map to blocks of that many groups)"
                )
            block_groups = selection.block_groups
        units = selection.units
    groups = -(-video.num_frames // cfg.frames_per_group)
    blocks = unit_dense_blocks(units, num_groups=groups, block_groups=block_groups or cfg.block_groups)
    return block_groups, tuple(sorted(blocks))


def _open_video(path, **sampling):
    """open_video, with the input errors it lets through today turned into VideoError (one line).

    PIL's DecompressionBombError (an image header claiming e.g. 30000x30000) and a damaged
    container's AttributeError are not VideoErrors yet; video.py should raise those itself.
    """
    from PIL import Image

    from videoxl.video import VideoError, open_video

    try:
        return open_video(path, **sampling)
    except Image.DecompressionBombError as err:
        raise VideoError(f"{path}: refusing an image this large ({err})") from err
    except AttributeError as err:  # PyAV on a damaged container, raised while opening only
        raise VideoError(f"{path}: not a readable video file ({err})") from err


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _questions(args) -> Iterator[str]:
    """The --question flags (the default one if none and not interactive), then stdin lines with --interactive."""
    yield from args.question or ([] if args.interactive else [DEFAULT_QUESTION])
    if not args.interactive:
        return
    while True:
        if sys.stdin.isatty():
            print("question (Ctrl-D to end)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            return
        if line.strip():
            yield line.strip()


def _ask_and_stream(pipeline, prepared, question: str, gen, *, evaluating: bool = False):
    """Print the question, then the answer as it is decoded; returns the run report.

    Evaluating, the model reads the question with mm:ss times as seconds, and the answer is
    printed once, stripped, as the evaluation scores it.
    """
    print(f"Q: {question}", flush=True)
    if evaluating:
        from videoxl.text import times_as_seconds

        asked = times_as_seconds(question)
        if asked != question:
            logger.info("question as asked: %r", asked)
        answer = pipeline.ask(prepared, asked, gen=gen)
        print(f"A: {answer.text.strip()}", end="\n\n")
        return answer.report
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

    from videoxl.weight_format import WeightFormat

    weights = WeightFormat.parse(args.weights, args.block_size)  # a bad flag fails here, before any work
    out = export_onnx(
        args.checkpoint, args.out, dtype=args.dtype, opset=args.opset, max_frames=args.max_frames,
        external_data=args.external_data, weights=weights,
    )
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
    parser = OneLineParser(prog="videoxl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"videoxl {videoxl.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    add_serve_parser(sub)
    add_export_parser(sub)
    add_demo_parser(sub)
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
    """The `videoxl` command; returns the exit status (2 for usage errors, one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.verbose or os.environ.get("VIDEOXL_LOG_LEVEL"):
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logger.setLevel(logging.INFO)
    from videoxl.config import ConfigError
    from videoxl.outdir import Terminated, describe_os_error, is_filesystem_error
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
    except OSError as err:  # disk full, read-only, permission denied: one line; anything else is a bug
        if not is_filesystem_error(err):
            raise
        print(f"videoxl {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C ends a long run or an interactive session without a traceback
        print(f"\nvideoxl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM during an export: its staging folder is already gone
        print(f"videoxl {args.command}: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
