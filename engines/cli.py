"""`videoxl build` and `videoxl check`: argument parsing and one-line errors (libraries raise, the CLI prints).

    videoxl build --onnx artifacts/onnx --out artifacts/engines --fp16 --max-frames 1024 \\
                  --chunk-groups 4 --window 3 --target sm_89 --target sm_120
    videoxl check --engines artifacts/engines --onnx artifacts/onnx

The package CLI wires these in with ``add_build_parser(subparsers)`` and
``add_check_parser(subparsers)``; each sets ``func`` to a handler returning the exit code.
"""

from __future__ import annotations

import argparse
import sys

from videoxl.engines.errors import EngineBuildError, EngineMismatchError, GPUUnavailableError
from videoxl.engines.profiles import DEFAULT_MAX_ENGINE_WEIGHTS, GRAPHS, format_bytes, parse_bytes
from videoxl.engines.trt_module import FLAVOURS, TensorRTUnavailableError

_EXPECTED_ERRORS = (EngineBuildError, EngineMismatchError, GPUUnavailableError, TensorRTUnavailableError)


def add_build_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build",
        help="build TensorRT engines from an exported ONNX directory",
        description=f"Build the {len(GRAPHS)} TensorRT engines ({', '.join(GRAPHS)}) with a checked manifest. "
        "TensorRT for RTX builds without a GPU for the --target compute capabilities. With --no-plugins the "
        "engines need no videoxl plugin library (stock TensorRT loads them).",
    )
    parser.add_argument("--onnx", required=True, metavar="DIR", help="output directory of `videoxl export`")
    parser.add_argument("--out", required=True, metavar="DIR", help="engine directory to write (replaced only on success)")
    precision = parser.add_mutually_exclusive_group()
    for name in ("fp16", "bf16", "fp32"):
        precision.add_argument(
            f"--{name}", dest="precision", action="store_const", const=name,
            help=f"{name} engines (must match the export dtype; default: the export's)",
        )
    parser.set_defaults(precision=None)
    parser.add_argument("--max-frames", type=int, metavar="N", help="frames the engines must accept (default: the config's)")
    parser.add_argument("--chunk-groups", type=int, metavar="C", help="groups of 4 frames per prefill chunk (default: the config's)")
    parser.add_argument("--window", type=int, dest="window_chunks", metavar="P", help="previous chunks a visual token sees (default: the config's)")
    parser.add_argument("--timing-cache", metavar="FILE", help="load and update this timing cache (standard TensorRT)")
    parser.add_argument(
        "--target", action="append", dest="targets", metavar="sm_XX",
        help="compute capability to build for, repeatable (TensorRT for RTX; default sm_89)",
    )
    parser.add_argument("--flavour", choices=FLAVOURS, help="TensorRT flavour (default: standard if importable, else RTX)")
    parser.add_argument("--no-plugins", dest="use_plugins", action="store_false", help="inline the custom ops' ONNX bodies (standard ONNX Attention -> TensorRT's fused attention) instead of the videoxl plugins: engines that stock TensorRT loads with no plugin library")
    parser.add_argument(
        "--gpu-memory-budget", type=parse_bytes, metavar="BYTES",
        help="GPU memory the engines must run in (e.g. 16GiB, 24GB): before building, plan one request at --max-frames "
        "as `videoxl plan` does (weights, each LLM engine its own copy; activations; the KV regions; the dense tier on "
        "the device or else in pinned host memory) and refuse a build that does not fit, naming the largest --max-frames that does",
    )
    parser.add_argument(
        "--unified-memory", action="store_true",
        help="with --gpu-memory-budget: host and device share that memory (Jetson), so the pinned dense tier counts against it",
    )
    parser.add_argument(
        "--memory-budget", type=parse_bytes, metavar="BYTES",
        help="refuse profiles whose KV cache alone (video region + decode region) exceeds this (e.g. 16GiB); "
        "counts no weights nor activations: see --gpu-memory-budget",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: when stderr is a terminal)")
    parser.add_argument(
        "--decode-on-prefill", action="store_true",
        help="build no decode engine: the runtime decodes on the prefill_chunk engine (profile widened to the decode "
        "capacity), one copy of the LLM weights fewer on the GPU; one-token decode steps replay CUDA graphs with the "
        "plugins, and run plainly without them",
    )
    ranges = parser.add_mutually_exclusive_group()
    ranges.add_argument(
        "--max-engine-weights", type=_engine_weights, default=DEFAULT_MAX_ENGINE_WEIGHTS, metavar="BYTES",
        help="build an LLM graph with more weights than this as layer-range engines of at most this much each "
        f"(default {format_bytes(DEFAULT_MAX_ENGINE_WEIGHTS)}: the 8B model builds in ~10 GiB of memory; 'none': one engine per graph)",
    )
    ranges.add_argument("--layers-per-engine", type=int, metavar="N", help="build every LLM graph as engines of N decoder layers each")
    parser.set_defaults(func=run_build)
    return parser


def add_check_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="run each engine against ONNX Runtime and compare (needs a GPU)",
        description="Compare every engine of an engine directory with ONNX Runtime on random and recorded inputs.",
    )
    parser.add_argument("--engines", required=True, metavar="DIR", help="engine directory written by `videoxl build`")
    parser.add_argument("--onnx", required=True, metavar="DIR", help="the ONNX directory the engines were built from")
    parser.add_argument("--graph", action="append", dest="graphs", choices=GRAPHS, help="check only this graph (repeatable)")
    parser.add_argument("--samples", type=int, default=2, metavar="N", help="random feeds per graph (default 2)")
    parser.add_argument("--inputs", dest="inputs_dir", metavar="DIR", help="also compare on recorded feeds {graph}*.npz from DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_check)
    return parser


def _engine_weights(text: str) -> int | None:
    return None if text.lower() == "none" else parse_bytes(text)


def run_build(args: argparse.Namespace) -> int:
    from videoxl.engines.build import build_engines

    try:
        out = build_engines(
            args.onnx, args.out, precision=args.precision, max_frames=args.max_frames,
            chunk_groups=args.chunk_groups, window_chunks=args.window_chunks, timing_cache=args.timing_cache,
            targets=args.targets, flavour=args.flavour, use_plugins=args.use_plugins,
            memory_budget_bytes=args.memory_budget, gpu_memory_budget_bytes=args.gpu_memory_budget,
            unified_memory=args.unified_memory,
            max_engine_weights=args.max_engine_weights, layers_per_engine=args.layers_per_engine,
            decode_on_prefill=args.decode_on_prefill,
            progress=sys.stderr.isatty() if args.progress is None else args.progress,
        )
    except _EXPECTED_ERRORS as err:
        print(f"videoxl build: error: {err}", file=sys.stderr)
        return 1
    print(f"engines written to {out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from videoxl.engines.check import check_engines

    try:
        results = check_engines(
            args.engines, args.onnx, graphs=tuple(args.graphs) if args.graphs else None,
            samples=args.samples, seed=args.seed, inputs_dir=args.inputs_dir,
        )
    except _EXPECTED_ERRORS as err:
        print(f"videoxl check: error: {err}", file=sys.stderr)
        return 1
    for result in results:
        print(f"{result.graph:14s} {'PASS' if result.passed else 'FAIL'}  ({result.feeds} feeds, {result.detail})")
    return 0 if all(r.passed for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m videoxl.engines.cli build ...``)."""
    parser = argparse.ArgumentParser(prog="videoxl")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_build_parser(subparsers)
    add_check_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
