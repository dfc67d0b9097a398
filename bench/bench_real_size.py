"""The real 8B Video-XL-2 on a small box: synthetic checkpoint -> export -> engine builds, measured.

Every step runs in its own process, so its peak RSS is its own (``os.wait4``), under a hard
address-space cap (``--cap-gib``, default 20) so that a step can never take the machine down:

    checkpoint   python -m videoxl.synthetic (full size, bf16, 4 GiB shards)
    export       videoxl export --dtype fp16 | bf16 (external data)  + the path-based ONNX checker
    build        videoxl build per target (sm_89, sm_120) with and without plugins
    ranges       the LLM graphs as layer-range engines (videoxl build's default for the 8B model), one
                 graph per process (disk: the engines of one graph, ~15 GB, are deleted after it),
                 per engine: build seconds, peak RSS (VmHWM, reset before each engine), engine bytes
                 and TensorRT's own memory report (activations, weights)
    plan         videoxl plan --config real, beside what the builds report

Results are appended to bench/RESULTS.md under "Real size" (``--write``) and printed.
Not part of ``make test``: the full run takes about an hour and ~50 GB of disk.

    python bench/bench_real_size.py --workdir /big/disk/realsize [--steps checkpoint,export,build] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def run_step(label: str, argv: list[str], *, cap_gib: float, log_path: Path) -> dict:
    """Run ``argv`` niced under an address-space cap; returns seconds, peak RSS and the exit code."""
    cap = int(cap_gib * GIB)

    def limit() -> None:
        os.nice(10)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    result = {"step": label, "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
              "exit": os.waitstatus_to_exitcode(status), "log": str(log_path)}
    print(f"{label}: {result['exit']=} {seconds:.0f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    return result


def graph_bytes(onnx_dir: Path) -> dict[str, dict]:
    """Per graph: its .onnx bytes, the external data it references, and the path-based checker's verdict."""
    import onnx

    from videoxl.engines.build import graph_weight_bytes
    from videoxl.export.onnx_export import GRAPH_FILES

    out = {}
    for name, file in GRAPH_FILES.items():
        path = onnx_dir / file
        try:
            onnx.checker.check_model(str(path))  # by path: the only form that handles > 2 GB
            checker = "ok"
        except Exception as err:  # the checker raises its own ValidationError; keep its words
            checker = f"{type(err).__name__}: {err}"[:200]
        out[name] = {"onnx_bytes": path.stat().st_size, "weight_bytes": graph_weight_bytes(path), "checker": checker}
    return out


def trt_memory_report() -> dict[str, int]:
    """A dict the builder's log fills as engines build: "activation" and "weights", the bytes TensorRT reports."""
    import logging
    import re

    report: dict[str, int] = {}

    class _MemoryReport(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"Total (Activation|Weights) Memory: (\d+) bytes", record.getMessage())
            if found:
                report[found.group(1).lower()] = int(found.group(2))

    trt_log = logging.getLogger("videoxl.engines.trt_module")
    trt_log.setLevel(logging.DEBUG)
    trt_log.addHandler(_MemoryReport(logging.DEBUG))
    return report


def measure_graph(onnx_dir: Path, out: Path, *, graph: str, target: str, plugins: bool, max_frames: int) -> list[dict]:
    """In this process: build ``graph``'s engines (its layer ranges) and measure each; see the docstring."""
    import re

    import videoxl.engines.build as build

    report = trt_memory_report()
    measured: list[dict] = []
    build_one = build._build_one

    def measured_build(trt, logger, part, *args, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: each engine's own peak
        report.clear()
        entry, timing = build_one(trt, logger, part, *args, **kwargs)
        peak_kib = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
        measured.append({
            "engine": part.engine_file, "weight_bytes": part.part.weight_bytes if part.part else build.graph_weight_bytes(part.path),
            "build_seconds": entry["build_seconds"], "peak_rss_bytes": peak_kib * 1024, "bytes": entry["bytes"],
            "trt_activation_bytes": report.get("activation"), "trt_weights_bytes": report.get("weights"),
        })
        print(json.dumps(measured[-1]), flush=True)
        (out.parent / f"{out.name}.engines.partial.json").write_text(json.dumps(measured, indent=2))  # survives a failed later range
        return entry, timing

    build._build_one = measured_build
    build.GRAPHS = [graph]  # this graph only: one graph's engines on disk at a time
    build.build_engines(onnx_dir, out, targets=[target], flavour="tensorrt_rtx", use_plugins=plugins, max_frames=max_frames)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", default="checkpoint,export,build,plan")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--targets", default="sm_89,sm_120")
    parser.add_argument("--cap-gib", type=float, default=20.0)
    parser.add_argument("--max-frames", type=int, default=1024)
    parser.add_argument("--keep-exports", action="store_true", help="keep every export (default: delete after its builds)")
    parser.add_argument("--graphs", default="prefill_chunk,decode", help="graphs of the ranges step (score holds no weights: bench_score_engine.py)")
    parser.add_argument("--plugins", default="no,yes", help="ranges step: without and/or with the plugins")
    parser.add_argument("--measure-graph", nargs=5, metavar=("ONNX", "OUT", "GRAPH", "TARGET", "PLUGINS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_graph:  # the child process of the ranges step
        onnx_dir, out, graph, target, plugins = args.measure_graph
        measured = measure_graph(Path(onnx_dir), Path(out), graph=graph, target=target, plugins=plugins == "yes", max_frames=args.max_frames)
        (Path(out).parent / f"{Path(out).name}.engines.json").write_text(json.dumps(measured, indent=2))
        return 0
    steps = set(args.steps.split(","))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    results: dict = {"steps": []}
    results_path = work / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    checkpoint = work / "checkpoint"
    if "checkpoint" in steps:
        step = run_step("checkpoint", [py, "-m", "videoxl.synthetic", str(checkpoint)], cap_gib=args.cap_gib,
                        log_path=work / "checkpoint.log")
        step["bytes"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        results["steps"].append(step)
        save()
    for dtype in args.dtypes.split(","):
        onnx_dir = work / f"onnx_{dtype}"
        if "export" in steps:
            step = run_step(f"export {dtype}", [py, "-m", "videoxl.cli", "export", "--checkpoint", str(checkpoint),
                                                "--out", str(onnx_dir), "--dtype", dtype, "--opset", "23",
                                                "--max-frames", str(args.max_frames)],
                            cap_gib=args.cap_gib, log_path=work / f"export_{dtype}.log")
            if step["exit"] == 0:
                step["graphs"] = graph_bytes(onnx_dir)
            results["steps"].append(step)
            save()
        if "build" in steps:
            for target in args.targets.split(","):
                if dtype == "bf16" and target != "sm_89":
                    continue  # one bf16 build shows the dtype; sm_120 is checked in fp16
                for plugins in (False, True):
                    out = work / f"engines_{dtype}_{target}_{'plugins' if plugins else 'inlined'}"
                    label = f"build {dtype} {target} {'plugins' if plugins else 'no plugins'}"
                    step = run_step(label, [py, "-m", "videoxl.cli", "build", "--onnx", str(onnx_dir), "--out", str(out),
                                            "--target", target, "--max-frames", str(args.max_frames),
                                            *([] if plugins else ["--no-plugins"])],
                                    cap_gib=args.cap_gib, log_path=work / f"{out.name}.log")
                    manifest = out / "manifest.json"
                    if step["exit"] == 0 and manifest.is_file():
                        engines = json.loads(manifest.read_text())["engines"]
                        step["engines"] = {n: {k: e.get(k) for k in ("bytes", "build_seconds", "weights", "device_memory_bytes")}
                                           for n, e in engines.items()}
                    results["steps"].append(step)
                    save()
        if "ranges" in steps:
            for target in args.targets.split(","):
                for plugins in args.plugins.split(","):
                    for graph in args.graphs.split(","):
                        out = work / f"engines_{dtype}_{target}_{graph}_{'plugins' if plugins == 'yes' else 'inlined'}"
                        step = run_step(f"ranges {dtype} {target} {graph} plugins={plugins}",
                                        [py, str(Path(__file__).resolve()), "--workdir", str(work), "--max-frames", str(args.max_frames),
                                         "--measure-graph", str(onnx_dir), str(out), graph, target, plugins],
                                        cap_gib=args.cap_gib, log_path=work / f"{out.name}.log")
                        measured = work / f"{out.name}.engines.json"
                        partial = work / f"{out.name}.engines.partial.json"
                        step["engines"] = json.loads((measured if measured.is_file() else partial).read_text()) if (measured.is_file() or partial.is_file()) else []
                        if step["engines"]:  # the child resets VmHWM per engine, so its ru_maxrss is the last engine's
                            step["peak_rss_bytes"] = max(e["peak_rss_bytes"] for e in step["engines"])
                        results["steps"].append(step)
                        save()
                        subprocess.run(["rm", "-rf", str(out)], check=False)  # disk: ~15 GB of engines per graph
        if not args.keep_exports and "build" in steps and dtype != args.dtypes.split(",")[-1]:
            subprocess.run(["rm", "-rf", str(onnx_dir)], check=False)  # disk: one export at a time
    if "plan" in steps:
        plan = subprocess.run([py, "-m", "videoxl.cli", "plan", "--config", "real", "--frames", str(args.max_frames), "--gpu-memory-budget", "80GiB"],
                              capture_output=True, text=True, cwd=ROOT)
        results["plan"] = plan.stdout + plan.stderr
        save()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
