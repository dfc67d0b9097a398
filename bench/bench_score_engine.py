"""The weightless score graph (graph contract v3) at real size: TensorRT's own activation report.

Writes ``score.onnx`` for the released 8B config (``LLMGraphWriter.score`` reads only the config:
no checkpoint, no weights) and builds it with the project's builder step (``_build_one``) at the
profile ``dimension_ranges(...)["score"]`` gives for ``--max-frames``, fp16, for a named target
(no GPU needed). Prints one JSON line: TensorRT's "Total Activation Memory" and "Total Weights
Memory" from its build log, the engine's bytes and the profile maxima. Not part of ``make test``;
run under the heavy-job lock (bench/RESULTS.md, "Real size").

    python bench/bench_score_engine.py --workdir /tmp/score --max-frames 1024 --target sm_89
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_size import trt_memory_report  # noqa: E402 (the sibling script's TensorRT log reader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--max-frames", type=int, default=1024)
    parser.add_argument("--target", default="sm_89")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the graph (default: the config's 28)")
    args = parser.parse_args(argv)

    import videoxl.engines.build as build
    from videoxl.config import VideoXLConfig
    from videoxl.engines.profiles import BuildLimits, dimension_ranges, input_profile, shape_input_values
    from videoxl.engines.trt_module import import_tensorrt, trt_logger
    from videoxl.export.onnx_llm import LLMGraphWriter
    from videoxl.export.onnx_export import GRAPH_FILES

    cfg = VideoXLConfig()
    if args.layers is not None:  # how the activations scale with the layer count
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    onnx_dir = args.workdir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(onnx_dir / "config.json")
    # score() reads the config only: a stand-in model with the config and an empty state suffices
    writer = LLMGraphWriter(types.SimpleNamespace(cfg=cfg), args.dtype, state={})
    onnx.save(writer.score(), str(onnx_dir / GRAPH_FILES["score"]))

    report = trt_memory_report()

    trt = import_tensorrt("tensorrt_rtx")
    limits = BuildLimits(max_frames=args.max_frames, chunk_groups=cfg.chunk_groups, window_chunks=cfg.window_chunks)
    graph = build._read_graph(onnx_dir, "score", cfg)
    ranges = dimension_ranges(cfg, limits)["score"]
    staging = args.workdir / "engines"
    staging.mkdir(exist_ok=True)
    entry, _ = build._build_one(
        trt, trt_logger(trt), graph, input_profile("score", graph.inputs, ranges), staging,
        shape_values=shape_input_values(cfg, limits)["score"], targets=(args.target,), use_plugins=False,
        precision=args.dtype, use_timing_cache=False, cache_bytes=None, timing=None, progress=False,
    )
    print(json.dumps({
        "graph": "score", "layers": cfg.num_hidden_layers, "target": args.target, "dtype": args.dtype, "max_frames": args.max_frames,
        "profile_max": {name: dim.max for name, dim in ranges.items()},
        "engine_bytes": entry["bytes"], "build_seconds": entry["build_seconds"],
        "trt_activation_bytes": report.get("activation"), "trt_weights_bytes": report.get("weights"),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
